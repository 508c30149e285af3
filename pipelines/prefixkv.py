"""PrefixKV: calibrate per-layer KV keep fractions by binary search, then evaluate eviction.

    python -m pipelines.prefixkv --model runs:/<run_id>/model --samples 32 --workers 2
    python -m pipelines.prefixkv --model hf:/path/to/llama --samples 32 --data text
    python -m pipelines.prefixkv --model smollm2-135m --corpus stdlib --samples 16 --eval-samples 64
    python -m pipelines.prefixkv --model <retrieval ckpt> --data retrieval --samples 64 --eval-samples 200
    ray job submit --working-dir . -- python -m pipelines.prefixkv --model runs:/<id>/model --samples 64

1. Calibration samples (the corpus's calib split) are spread over Ray actors that each load the
   model once; each sample's prefill gives per-layer importance curves, and every ratio on the
   grid 0.05..0.95 is solved by bisection (checked against the k-th-value solution).
2. The driver reduces the per-sample fractions in sample order (mean, bootstrap SE) and logs
   prefixkv.json, the curves and per-layer budget plots to MLflow. Finished samples are logged as
   they arrive; `--resume <run_id>` skips them.
3. Evaluation on held-out data, same tokens for every method: continuation NLL (text) or exact
   match (retrieval) for PrefixKV, uniform, pyramid (each with every --scores scoring), recency,
   random and the full cache, at --eval-ratios; paired differences with standard errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch

from tuning.prefixkv.search import RATIO_GRID, global_budget, n_protected, validate_ratio
from workers.caches import scorers
from workers.caches.scoring import ScoreConfig
from workers.data.corpus import Corpus, load_corpus
from workers.data.retrieval import eval_set, value_tokens
from workers.data.tokenizer import Tokenizer
from workers.eval import bits_per_byte, scored_bytes
from workers.model.hf.address import ADDRESS_HELP, DTYPES, check_weights, describe, dtype_name, load_tokenizer
from workers.prefixkv import artifact
from workers.prefixkv.actor import PrefixKVActor
from workers.prefixkv.calibrate import reduce_samples
from workers.prefixkv.evaluate import method_grid
from workers.prefixkv.report import budgets_figure, curves_figure, results_table, summarize
from workers.runtime import cli, faults, tracking
from workers.runtime.cluster import init_ray
from workers.runtime.pool import ActorPool


@dataclass(frozen=True)
class RunConfig:
    model: str
    samples: int = 32
    workers: int = 2
    data: str = "text"
    corpus: str = "pydoc"
    context: int = 192
    continuation: int = 64
    scores: tuple[str, ...] = ("sum", "window")
    window: int = 16
    pool: int = 1  # SnapKV-style score pooling over neighbouring keys (odd; 1 = off)
    n_sink: int = 4
    max_steps: int = 64
    eval_ratios: tuple[float, ...] = (0.1, 0.2, 0.5)
    eval_samples: int = 64
    batch_size: int = 8
    bootstrap: int = 200
    seed: int = 0
    # held-out examples' seed; None: seed + 1. Set it to vary the calibration seed over the same
    # held-out examples (calibration seeds compared on one test set).
    eval_seed: int | None = None
    device: str = "cpu"
    dtype: str | None = None  # None: fp32 on CPU, bf16 on GPU
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    experiment: str = "prefixkv"
    run_name: str | None = None
    resume: str | None = None

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"--{field.replace('_', '-')}={getattr(self, field)!r}: {why}")

        for field in ("samples", "workers", "context", "continuation", "window", "max_steps", "batch_size"):
            if getattr(self, field) < 1:
                bad(field, "must be >= 1")
        if self.pool < 1 or self.pool % 2 == 0:
            bad("pool", "must be an odd int >= 1 (1 = no pooling)")
        for field in ("eval_samples", "bootstrap", "n_sink"):
            if getattr(self, field) < 0:
                bad(field, "must be >= 0")
        if self.workers > self.samples:
            bad("workers", f"more actors than calibration samples ({self.samples})")
        if self.data not in ("text", "retrieval"):
            bad("data", "one of text, retrieval")
        attention = scorers.names(attention=True)  # PrefixKV calibrates on attention; plug-ins count
        if not self.scores or any(s not in attention for s in self.scores) or len(set(self.scores)) != len(self.scores):
            bad("scores", f"a comma-separated list of distinct attention scorings from {attention}")
        for r in self.eval_ratios:
            try:
                validate_ratio(r)
            except ValueError as e:
                raise ValueError(f"--eval-ratios: {e}") from None
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            bad("device", "cpu or cuda[:N]")
        if self.dtype is not None and self.dtype not in DTYPES:
            bad("dtype", f"one of {', '.join(DTYPES)}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError(
                f"--cpus-per-worker must be > 0 and --gpus-per-worker >= 0, got {self.cpus_per_worker}, "
                f"{self.gpus_per_worker}"
            )
        n_protected(self.context, self.n_sink)  # a context shorter than the sinks fails here; budgets
        # depend on the model's layer count too: check_budgets, once the model is known

    def check_budgets(self, n_layers: int) -> None:
        """Every ratio calibrated (the grid) or evaluated keeps at least the sinks and last token of
        every layer, by the same total-budget rule the actors apply (global_budget)."""
        need = n_protected(self.context, self.n_sink)
        for r in (min(RATIO_GRID), *self.eval_ratios):
            try:
                global_budget(r, self.context * n_layers, need * n_layers, n_layers)
            except ValueError as e:
                raise ValueError(f"--context={self.context} (--n-sink={self.n_sink}): {e}") from None

    def params(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_dtype"] = dtype_name(self.dtype, self.device)
        d["scores"] = ",".join(self.scores)
        d["eval_ratios"] = ",".join(f"{r:g}" for r in self.eval_ratios)
        d["ratio_grid"] = ",".join(f"{r:g}" for r in RATIO_GRID)
        return d

    @property
    def heldout_seed(self) -> int:
        return self.seed + 1 if self.eval_seed is None else self.eval_seed

    def sequence_len(self, tokenizer: Tokenizer | None = None) -> int:
        """Tokens per example: the context plus the scored continuation (text) or value (retrieval)."""
        return self.context + (self.continuation if self.data == "text" else value_tokens(tokenizer))


def validate_model(cfg: RunConfig, tokenizer: Tokenizer) -> int:
    """Check the model address resolves and fits the sequence length -> number of layers."""
    shape = describe(cfg.model)
    if cfg.sequence_len(tokenizer) > shape.max_seq_len:
        raise ValueError(
            f"--context={cfg.context} plus {cfg.sequence_len(tokenizer) - cfg.context} scored tokens exceeds the "
            f"model's max_seq_len={shape.max_seq_len}"
        )
    cfg.check_budgets(shape.n_layers)
    return shape.n_layers


def calibration_data(cfg: RunConfig, corpus: Corpus, tokenizer: Tokenizer | None = None) -> torch.Tensor:
    """Calibration prompts [samples, context] from the calib split, in the model's tokens."""
    if cfg.data == "text":
        g = torch.Generator().manual_seed(cfg.seed)
        return corpus.sample_windows("calib", cfg.context, cfg.samples, g, tokenizer)
    length = cfg.sequence_len(tokenizer)
    return eval_set(
        corpus.calib, n=cfg.samples, length=length, seed=cfg.seed, split="calib", tokenizer=tokenizer
    ).prompt


def eval_data(cfg: RunConfig, corpus: Corpus, tokenizer: Tokenizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out (context [n, C], continuation [n, M]) for text, (prompt, value) for retrieval."""
    length = cfg.sequence_len(tokenizer)
    if cfg.data == "text":
        g = torch.Generator().manual_seed(cfg.heldout_seed)
        w = corpus.sample_windows("heldout", length, cfg.eval_samples, g, tokenizer)
        return w[:, : cfg.context], w[:, cfg.context :]
    es = eval_set(
        corpus.heldout, n=cfg.eval_samples, length=length, seed=cfg.heldout_seed, split="heldout", tokenizer=tokenizer
    )
    return es.prompt, es.value


SAMPLES_FILE = "calibration/samples.jsonl"


def parse_args(argv=None) -> RunConfig:
    p = argparse.ArgumentParser(prog="python -m pipelines.prefixkv", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=ADDRESS_HELP)
    p.add_argument("--samples", type=int, default=32, help="calibration samples (prefills)")
    p.add_argument("--workers", type=int, default=2, help="Ray actors, each loads the model once")
    p.add_argument("--data", choices=("text", "retrieval"), default="text", help="calibration/eval data")
    p.add_argument("--corpus", default="pydoc", help="corpus: 'pydoc', 'stdlib' or a .txt/.jsonl/.parquet path")
    p.add_argument("--context", type=int, default=192, help="prompt tokens per sample")
    p.add_argument("--continuation", type=int, default=64, help="scored tokens after the context (text)")
    p.add_argument("--scores", default="sum,window", help="attention scorers to calibrate and evaluate")
    p.add_argument("--window", type=int, default=16, help="observation window of the 'window' scoring")
    p.add_argument("--pool", type=int, default=1, help="average scores over this many neighbouring keys (odd; 1 = off)")
    p.add_argument("--n-sink", type=int, default=4, help="sink tokens always kept (plus the last token)")
    p.add_argument("--max-steps", type=int, default=64, help="bisection step bound")
    p.add_argument("--eval-ratios", default="0.1,0.2,0.5", help="keep ratios evaluated")
    p.add_argument("--eval-samples", type=int, default=64, help="held-out examples (0 = calibrate only)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of calibration samples")
    p.add_argument("--seed", type=int, default=0, help="seed of sample selection and bootstrap")
    p.add_argument("--eval-seed", type=int, default=None, help="held-out examples' seed (default: --seed + 1)")
    p.add_argument("--device", default="cpu", help="torch device of the actors (cpu, cuda)")
    p.add_argument(
        "--dtype", default=None, choices=tuple(DTYPES), help="model dtype (default fp32 on CPU, bf16 on GPU)"
    )
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs per actor (fractions ok)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="Ray GPUs per actor")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: the pipeline's own)")
    p.add_argument("--run-name", default=None, help="MLflow run name")
    p.add_argument("--resume", default=None, help="run id of an interrupted run: skip its finished samples")
    a = p.parse_args(argv)
    return RunConfig(
        model=a.model,
        samples=a.samples,
        workers=a.workers,
        data=a.data,
        corpus=a.corpus,
        context=a.context,
        continuation=a.continuation,
        scores=tuple(s.strip() for s in a.scores.split(",") if s.strip()),
        window=a.window,
        pool=a.pool,
        n_sink=a.n_sink,
        max_steps=a.max_steps,
        eval_ratios=tuple(float(r) for r in a.eval_ratios.split(",") if r.strip()),
        eval_samples=a.eval_samples,
        batch_size=a.batch_size,
        bootstrap=a.bootstrap,
        seed=a.seed,
        eval_seed=a.eval_seed,
        device=a.device,
        dtype=a.dtype,
        cpus_per_worker=a.cpus_per_worker,
        gpus_per_worker=a.gpus_per_worker,
        experiment=a.experiment,
        run_name=a.run_name,
        resume=a.resume,
    )


def _done_samples(run_id: str) -> dict[int, dict]:
    """Per-sample results an interrupted run already logged."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=SAMPLES_FILE)
    except Exception:  # no artifact yet: nothing finished
        return {}
    out = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        out[int(rec["index"])] = rec["result"]
    return out


def calibrate(cfg: RunConfig, actors: ActorPool, tokens: torch.Tensor, workdir: Path) -> dict[int, dict]:
    """Spread sample batches over the actors; log each batch (in order) once done; return {index: result}."""
    results = _done_samples(cfg.resume) if cfg.resume else {}
    todo = [i for i in range(tokens.shape[0]) if i not in results]
    batches = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    scores = [ScoreConfig(s, window=cfg.window, pool=cfg.pool) for s in cfg.scores]
    log = workdir / Path(SAMPLES_FILE).name
    log.write_text("".join(json.dumps({"index": k, "result": v}) + "\n" for k, v in sorted(results.items())))
    call = lambda actor, batch: actor.calibrate.remote(
        batch, tokens[batch], scores, cfg.n_sink, RATIO_GRID, cfg.max_steps
    )
    for out in actors.map(call, batches):
        with log.open("a") as f:
            for k in sorted(out):
                f.write(json.dumps({"index": int(k), "result": out[k]}) + "\n")
        results.update(out)
        mlflow.log_artifact(str(log), artifact_path=str(Path(SAMPLES_FILE).parent))
        tracking.log_metrics({"samples_done": len(results)}, step=len(results))
        faults.point("prefixkv.batch_saved")
    return results


def write_calibration(cfg: RunConfig, results: dict[int, dict], n_layers: int, workdir: Path) -> dict:
    data = {
        "version": 1,
        "model": cfg.model,
        "dtype": dtype_name(cfg.dtype, cfg.device),
        "n_layers": n_layers,
        "n_sink": cfg.n_sink,
        "context": cfg.context,
        "samples": len(results),
        "data": cfg.data,
        "ratios": list(RATIO_GRID),
        "default_score": cfg.scores[0],
        "window": cfg.window,
        "pool": cfg.pool,
        "scores": {},
    }
    for mode in cfg.scores:
        red = reduce_samples(results, mode, cfg.bootstrap, cfg.seed)
        data["scores"][mode] = {
            k: np.asarray(red[k]).round(6).tolist() for k in ("fractions", "bootstrap_se", "sample_sd")
        }
        metrics = {f"{mode}_max_bisect_steps": red["max_steps_taken"], f"{mode}_kth_agrees": float(red["kth_agrees"])}
        for j, r in enumerate(RATIO_GRID):
            fr, se = red["fractions"][j], red["bootstrap_se"][j]
            metrics[f"{mode}_r{r:g}_frac_min"] = float(fr.min())
            metrics[f"{mode}_r{r:g}_frac_max"] = float(fr.max())
            metrics[f"{mode}_r{r:g}_boot_se_max"] = float(np.nanmax(se)) if np.isfinite(se).any() else float("nan")
        tracking.log_metrics(metrics)
        for layer in range(n_layers):
            mlflow.log_metrics(
                {f"{mode}_r0.2_frac_layer": float(red["fractions"][RATIO_GRID.index(0.2)][layer])}, step=layer
            )
        name = cfg.run_name or "prefixkv"
        mlflow.log_figure(curves_figure(red["curves"], f"{name}: {mode} importance curves"), f"plots/curves_{mode}.png")
        fig = budgets_figure(RATIO_GRID, red["fractions"], red["bootstrap_se"], cfg.eval_ratios, f"{name}: {mode}")
        mlflow.log_figure(fig, f"plots/budgets_{mode}.png")
        mlflow.log_dict({"curves": red["curves"].round(6).tolist()}, f"calibration/curves_{mode}.json")
    path = artifact.write(data, workdir / artifact.FILE_NAME)
    mlflow.log_artifact(str(path))
    return data


def evaluate(cfg: RunConfig, actors: ActorPool, data, calibrated: dict, workdir: Path, tokenizer=None) -> dict:
    """Shard the held-out examples over the actors; reassemble per-example results in order.

    Text NLL is reported per token (nats) and per byte (bits, through the model's `tokenizer`),
    the same scored tokens for every method."""
    specs = method_grid(cfg.eval_ratios, cfg.scores)
    kw = dict(n_sink=cfg.n_sink, window=cfg.window, pool=cfg.pool, calibrated=calibrated, batch_size=cfg.batch_size)
    first = data[0]
    n = first.shape[0]
    step = -(-n // len(actors))
    call = "nll" if cfg.data == "text" else "retrieval"
    shard = lambda actor, s: getattr(actor, call).remote(data[0][s : s + step], data[1][s : s + step], specs, **kw)
    parts = list(actors.map(shard, range(0, n, step)))
    per = {s.key: [v for part in parts for v in part[s.key]] for s in specs}

    def baseline(key: str):
        name, ratio = key.split("@")
        if name.startswith("prefixkv-"):
            return f"uniform-{name.split('-', 1)[1]}@{ratio}"
        return None if name == "full" else "full@1"

    rows = summarize(per, baseline)
    metric = "nll" if cfg.data == "text" else "acc"
    if cfg.data == "text":
        y = data[1]
        n_bytes = scored_bytes(tokenizer, y) or y.numel()
        for r in rows:
            r["bpb"] = bits_per_byte(r["mean"], y.numel(), n_bytes)

    def name(key: str) -> str:  # MLflow metric names may not contain "@"
        return key.replace("@", "_r")

    out = {}
    for r in rows:
        out[f"{metric}_{name(r['key'])}"] = r["mean"]
        out[f"{metric}_se_{name(r['key'])}"] = r["se"]
        if "bpb" in r:
            out[f"bpb_{name(r['key'])}"] = r["bpb"]
        if "diff" in r:
            out[f"{metric}_diff_{name(r['key'])}"] = r["diff"]
            out[f"{metric}_diff_se_{name(r['key'])}"] = r["diff_se"]
    tracking.log_metrics({k: v for k, v in out.items() if v == v})  # NaN (one example) is not logged
    table = results_table(rows, "NLL (nats)" if metric == "nll" else "exact match")
    mlflow.log_text(table, "eval/results.md")
    mlflow.log_dict({"rows": rows, "per_example": per}, "eval/eval.json")
    print(table)
    return {"rows": rows, "per_example": per}


def main(argv=None) -> str:
    cfg = parse_args(argv)
    tracking.check_store()  # an unwritable store fails now, not after MLflow's minutes of retries
    if cfg.resume:
        tracking.check_run(cfg.resume)
    tokenizer = load_tokenizer(cfg.model)  # errors name the bad value before any work starts
    n_layers = validate_model(cfg, tokenizer)
    check_weights(cfg.model)  # else a truncated file fails in every actor after the run started
    corpus = load_corpus(cfg.corpus)
    calib_tokens = calibration_data(cfg, corpus, tokenizer)
    held = eval_data(cfg, corpus, tokenizer) if cfg.eval_samples else None
    tags = {"corpus_sha256": corpus.sha256, "model": cfg.model}
    params = {**cfg.params(), **corpus.summary(), "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size}
    with (
        tracking.start_run(
            "prefixkv",
            experiment=cfg.experiment,
            run_name=cfg.run_name
            or tracking.run_label("prefixkv", cfg.model, cfg.data, f"keep{params['eval_ratios']}"),
            params=params,
            tags=tags,
            run_id=cfg.resume,
        ) as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        workdir = Path(tmp)
        init_ray()
        actors = ActorPool.of(
            PrefixKVActor,
            (cfg.model, cfg.device, 1, cfg.dtype),
            cfg.workers,
            num_cpus=cfg.cpus_per_worker,
            num_gpus=cfg.gpus_per_worker,
            runtime_env=scorers.runtime_env(),  # actors find the driver's plug-in scorers too
        )
        results = calibrate(cfg, actors, calib_tokens, workdir)
        data = write_calibration(cfg, results, n_layers, workdir)
        if held is not None:
            calibrated = {
                m: {float(r): f for r, f in zip(data["ratios"], e["fractions"])} for m, e in data["scores"].items()
            }
            evaluate(cfg, actors, held, calibrated, workdir, tokenizer)
        actors.close()
        print(f"prefixkv run {run.info.run_id}: {artifact.FILE_NAME} logged")
        return run.info.run_id


if __name__ == "__main__":
    cli.run(main)
