"""Reporting for the IndexCache search: paired held-out comparisons, tables, heatmap, JSON.

All NLLs are mean next-token NLL in nats per token of the model's tokenizer: per byte for a
CalibLM (its tokens are bytes; bits per byte = nats / ln 2), per BPE token for a transformers
DSA checkpoint (the table then gives bits per token, never labelled per byte). Comparisons are paired over the same held-out windows: d_w = NLL_A(w) -
NLL_B(w), reported as mean(d) and its standard error std(d) / sqrt(n) (`workers.stats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workers.stats import paired_difference

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Paired:
    """Mean paired difference (A - B) over windows and its standard error (nats)."""

    mean: float
    se: float
    n: int

    @property
    def z(self) -> float:
        return self.mean / self.se if self.se > 0 else float("inf") * (1 if self.mean > 0 else -1)


def paired(a: torch.Tensor, b: torch.Tensor) -> Paired:
    """Paired difference of per-window NLLs a, b [W] (W >= 2, so that it has a standard error)."""
    if a.shape != b.shape or a.dim() != 1 or a.numel() < 2:
        raise ValueError(f"paired() needs two equal 1-D vectors of >= 2 windows, got {a.shape}, {b.shape}")
    return Paired(*paired_difference(a.tolist(), b.tolist()), a.numel())


def retention_rows(results: list[dict], per_byte: bool = True) -> list[dict]:
    """Flatten the per-retention results into table rows (one per retention and pattern kind).

    per_byte: the tokens are bytes (CalibLM), so bits per token are bits per byte."""
    bits = "heldout_bpb" if per_byte else "heldout_bits_per_token"
    rows = []
    for r in results:
        for kind in ("searched", "uniform", "all_f"):
            k = r[kind]
            rows.append(
                {
                    "retention": r["retention"],
                    "n_full": r["n_full"],
                    "kind": kind,
                    "pattern": k["pattern"],
                    "calib_nll": k["calib_nll"],
                    "heldout_nll": k["heldout_nll"],
                    bits: k["heldout_nll"] / LN2,
                    "delta_vs_all_f": k.get("delta_vs_all_f"),
                    "delta_vs_all_f_se": k.get("delta_vs_all_f_se"),
                    "indexer_work_removed": k["indexer_work_removed"],
                }
            )
    return rows


def log_rows(rows: list[dict], artifact_file: str) -> None:
    """Log table rows to the active MLflow run (nested values as JSON strings)."""
    import json

    import mlflow
    import pandas as pd

    flat = [{k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()} for r in rows]
    mlflow.log_table(pd.DataFrame(flat), artifact_file)


def overlap_rows(matrix: torch.Tensor) -> list[dict]:
    """The [N, N] top-k overlap matrix as rows {layer_i, layer_j, overlap}."""
    n = matrix.shape[0]
    return [{"layer_i": i, "layer_j": j, "overlap": float(matrix[i, j])} for i in range(n) for j in range(n)]


def overlap_heatmap(matrix: torch.Tensor, path: str, title: str = "top-k overlap |T_i ∩ T_j| / k") -> str:
    """Save the overlap matrix as a PNG heatmap at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * n, 0.6 + 0.4 * n))
    im = ax.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{float(matrix[i, j]):.2f}", ha="center", va="center", fontsize=6, color="w")
    ax.set_xlabel("layer j")
    ax.set_ylabel("layer i")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def adjacent_overlap(matrix: torch.Tensor) -> list[float]:
    """Overlap of each layer with the next one: [N - 1]."""
    return [float(matrix[i, i + 1]) for i in range(matrix.shape[0] - 1)]


def _indexer_work_measured(model, windows: torch.Tensor, pattern: str) -> float:
    """1 - (indexer calls with `pattern`) / (calls with all-F), counted on one forward."""
    before = sum(model.indexer_calls())
    with torch.no_grad():
        model(windows[:1, :-1], pattern=pattern, attn="sparse")
    calls = sum(model.indexer_calls()) - before
    return 1.0 - calls / len(pattern)


def _distill(cfg, model, data, jobs: list[tuple[float, str, str]]) -> dict[tuple[float, str], dict]:
    """Run the training-aware variant for every (retention, kind, pattern) as Ray tasks."""
    import ray

    from workers.indexcache.distill import DistillConfig, distill_and_score

    dcfg = DistillConfig(steps=cfg.distill_steps, lr=cfg.distill_lr, batch_size=cfg.distill_batch, seed=cfg.split_seed)
    model_ref, train_ref, held_ref = ray.put(model), ray.put(data.train), ray.put(data.heldout)
    task = distill_and_score.options(num_cpus=cfg.worker_cpus)
    refs = {
        (r, kind): task.remote(model_ref, pattern, train_ref, held_ref, dcfg, cfg.batch_size, cfg.threads)
        for r, kind, pattern in jobs
    }
    return {key: ray.get(ref) for key, ref in refs.items()}


def report(cfg, model, data, state, pool) -> dict:
    """Every report of a finished search, logged to the active MLflow run; returns the summary."""
    import tempfile
    from pathlib import Path

    import mlflow

    from tuning.indexcache.patterns import indexer_fraction_removed, n_full_layers, uniform_interleave
    from workers.indexcache import artifact
    from workers.runtime import tracking

    n = state.n_layers
    all_f = "F" * n
    levels = []
    for r in cfg.retentions:
        nf = n_full_layers(r, n)
        levels.append((r, nf, state.pattern_with_full(nf), uniform_interleave(n, nf)))
    patterns = sorted({all_f} | {p for *_, s, u in levels for p in (s, u)})
    held = pool.score_windows(data.heldout, patterns, cfg.batch_size)
    calib = {all_f: state.baseline.mean}
    for _, nf, searched, uniform in levels:
        calib[searched] = state.loss_with_full(nf)
        if uniform not in calib:
            calib[uniform] = pool.reset(uniform).mean
    results, metrics = [], {"all_f/calib_nll": calib[all_f], "all_f/heldout_nll": float(held[all_f].mean())}
    for r, nf, searched, uniform in levels:
        entry = {"retention": r, "n_full": nf}
        for kind, pat in (("searched", searched), ("uniform", uniform), ("all_f", all_f)):
            d = paired(held[pat], held[all_f]) if pat != all_f else None
            entry[kind] = {
                "pattern": pat,
                "calib_nll": calib[pat],
                "heldout_nll": float(held[pat].mean()),
                "delta_vs_all_f": d.mean if d else 0.0,
                "delta_vs_all_f_se": d.se if d else 0.0,
                "indexer_work_removed": indexer_fraction_removed(pat),
                "indexer_work_removed_measured": _indexer_work_measured(model, data.heldout, pat),
            }
        su = paired(held[searched], held[uniform]) if searched != uniform else Paired(0.0, 0.0, held[all_f].numel())
        entry["searched_minus_uniform"] = {"mean": su.mean, "se": su.se, "n_windows": su.n}
        results.append(entry)
        for kind in ("searched", "uniform"):
            for key in ("calib_nll", "heldout_nll", "delta_vs_all_f", "delta_vs_all_f_se", "indexer_work_removed"):
                metrics[f"r{r}/{kind}_{key}"] = entry[kind][key]
        metrics[f"r{r}/searched_minus_uniform"] = su.mean
        metrics[f"r{r}/searched_minus_uniform_se"] = su.se
    per_byte = data.summary.get("tokenizer", "bytes") == "bytes"
    log_rows(retention_rows(results, per_byte), "indexcache/retentions.json")

    overlap = None
    if cfg.overlap:
        overlap = pool.overlap(data.heldout, cfg.batch_size)
        log_rows(overlap_rows(overlap), "indexcache/overlap.json")
        with tempfile.TemporaryDirectory() as d:
            mlflow.log_artifact(overlap_heatmap(overlap, str(Path(d) / "overlap_heatmap.png")), "indexcache")
        adj = adjacent_overlap(overlap)
        metrics["overlap/adjacent_mean"] = sum(adj) / len(adj)
        for i, v in enumerate(adj):
            metrics[f"overlap/adjacent_{i}_{i + 1}"] = v
    pool.shutdown()  # frees the actors' CPUs for the distillation tasks

    if cfg.distill_steps:
        wanted = set(cfg.distill_retentions or cfg.retentions)
        jobs = [
            (e["retention"], kind, e[kind]["pattern"])
            for e in results
            if e["retention"] in wanted
            for kind in ("searched", "uniform")
        ]
        out = _distill(cfg, model, data, jobs)
        for e in results:
            r = e["retention"]
            if r not in wanted:
                continue
            e["distilled"], nlls = {}, {}
            for kind in ("searched", "uniform"):
                o = out[(r, kind)]
                nll = nlls[kind] = torch.tensor(o["heldout"], dtype=torch.float64)
                d = paired(nll, held[all_f])
                tf = paired(nll, held[o["pattern"]])  # the same pattern with its training-free indexers
                e["distilled"][kind] = {
                    "pattern": o["pattern"],
                    "heldout_nll": float(nll.mean()),
                    "delta_vs_all_f": d.mean,
                    "delta_vs_all_f_se": d.se,
                    "minus_training_free": tf.mean,
                    "minus_training_free_se": tf.se,
                    "kl_first": o["curve"][0],
                    "kl_last": o["curve"][-1],
                }
                metrics[f"r{r}/distilled_{kind}_heldout_nll"] = float(nll.mean())
                metrics[f"r{r}/distilled_{kind}_delta_vs_all_f"] = d.mean
                metrics[f"r{r}/distilled_{kind}_delta_vs_all_f_se"] = d.se
                metrics[f"r{r}/distilled_{kind}_minus_training_free"] = tf.mean
                metrics[f"r{r}/distilled_{kind}_minus_training_free_se"] = tf.se
                for step, kl in enumerate(o["curve"]):
                    tracking.log_metrics({f"r{r}/distill_{kind}_kl": kl}, step=step)
            # The paper's claim with both patterns' indexers distilled: greedy against uniform.
            gap = paired(nlls["searched"], nlls["uniform"])  # two distillations even where the patterns agree
            e["distilled"]["searched_minus_uniform"], e["distilled"]["searched_minus_uniform_se"] = gap.mean, gap.se
            metrics[f"r{r}/distilled_searched_minus_uniform"] = gap.mean
            metrics[f"r{r}/distilled_searched_minus_uniform_se"] = gap.se
    tracking.log_metrics(metrics)

    doc = {
        "model": cfg.model,
        "n_layers": n,
        "topk": model.cfg.indexer.topk,
        "seq_len": int(data.heldout.shape[1] - 1),
        "corpus": data.summary,
        "split_seed": cfg.split_seed,
        "mode": state.mode,
        "fidelity": state.fidelity.to_dict(),
        "all_f": {"calib_nll": calib[all_f], "heldout_nll": float(held[all_f].mean())},
        "patterns": {str(e["retention"]): e for e in results},
        "trace": [
            {"step": s.step, "committed": s.committed, "loss": s.loss, "gap": s.gap, "pattern": s.pattern}
            for s in state.steps
        ],
        "overlap": overlap.tolist() if overlap is not None else None,
    }
    mlflow.log_text(artifact.dumps(doc), artifact.FILE_NAME)
    return {"retentions": results, "metrics": metrics, "indexcache": doc}
