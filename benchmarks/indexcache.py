"""IndexCache benchmarks: search cost and prefill speed, each a ratio measured in one run.

    python -m benchmarks.indexcache --model runs:/<run_id>/model                 # all parts
    python -m benchmarks.indexcache --model artifacts/demo --parts search fidelity --calib-windows 16
    python -m benchmarks.indexcache --parts prefill --prefill-len 4096            # demo-shaped random weights
    python -m benchmarks.indexcache --model runs:/<run_id>/hf_model --parts prefill --prefill-len 4096 \
        --pattern FSSF...                                # a converted HF model, with a searched pattern

Parts:
- search:   the exact greedy search with prefix reuse against the naive loop (same windows,
            same model, in one process): counted layer forwards, wall time, identical patterns.
- fidelity: multi-fidelity (successive halving) against the exact prefix search: cost ratio
            (vs exact and vs naive), pattern agreement per retention, and the held-out NLL of
            both patterns as a paired difference with its standard error.
- prefill:  one forward over --prefill-len tokens with the 1/4 pattern against all-F (median
            of interleaved repeats); --pattern adds a searched pattern. Speed does not depend on
            the weights, so a random-init model of the same shape is allowed here.

The model is anything `python -m pipelines.indexcache` searches: a CalibLM with an indexer or a
transformers DSA checkpoint (a converted Llama-family model included), windows in its own tokens.
Results print as JSON and, with --mlflow, are logged to an MLflow run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tuning.indexcache.cost import naive_units
from tuning.indexcache.fidelity import FidelityConfig
from tuning.indexcache.patterns import n_full_layers, uniform_interleave
from tuning.indexcache.search import SearchState, greedy_search
from workers.data.corpus import SplitConfig, load_corpus
from workers.indexcache.evaluate import ShardEvaluator, window_nll
from workers.indexcache.report import paired
from workers.runtime import cli


def run_search(model, windows, retentions, mode, batch_size, fidelity=None) -> tuple[SearchState, float, int]:
    ev = ShardEvaluator(model, windows, batch_size=batch_size, mode=mode)
    kw = {"fidelity": fidelity} if fidelity else {}
    start = time.perf_counter()
    state = greedy_search(SearchState(len(model.layers), retentions, mode=mode, **kw), ev)
    return state, time.perf_counter() - start, ev.units()


def bench_search(model, calib, retentions, batch_size) -> tuple[dict, SearchState]:
    prefix, t_prefix, u_prefix = run_search(model, calib, retentions, "prefix", batch_size)
    naive, t_naive, u_naive = run_search(model, calib, retentions, "naive", batch_size)
    rows = calib.shape[0]
    diffs = [abs(a.final[k].mean - b.final[k].mean) for a, b in zip(prefix.steps, naive.steps) for k in a.final]
    return {
        "n_layers": len(model.layers),
        "steps": len(prefix.steps),
        "calib_windows": rows,
        "prefix_layer_forwards": u_prefix / rows,
        "naive_layer_forwards": u_naive / rows,
        "naive_analytic": naive_units(len(model.layers), len(prefix.steps), 1),
        "layer_forward_ratio": u_prefix / u_naive,
        "prefix_wall_s": t_prefix,
        "naive_wall_s": t_naive,
        "wall_ratio": t_prefix / t_naive,
        "same_pattern": prefix.pattern == naive.pattern,
        "same_trace": [s.committed for s in prefix.steps] == [s.committed for s in naive.steps],
        "max_loss_diff": max(diffs) if diffs else 0.0,
        "gaps": [s.gap for s in prefix.steps],
        "pattern": prefix.pattern,
    }, prefix


def bench_fidelity(model, calib, heldout, retentions, batch_size, exact: SearchState, fidelity) -> dict:
    mf, t_mf, u_mf = run_search(model, calib, retentions, "prefix", batch_size, fidelity)
    rows, n = calib.shape[0], len(model.layers)
    per_r = {}
    for r in retentions:
        nf = n_full_layers(r, n)
        pe, pm = exact.pattern_with_full(nf), mf.pattern_with_full(nf)
        entry = {"exact": pe, "multi_fidelity": pm, "agree": pe == pm}
        if pe != pm:
            d = paired(window_nll(model, heldout, pm, batch_size), window_nll(model, heldout, pe, batch_size))
            entry.update(heldout_diff=d.mean, heldout_diff_se=d.se, within_2se=abs(d.mean) <= 2 * d.se)
        else:
            entry.update(heldout_diff=0.0, heldout_diff_se=0.0, within_2se=True)
        per_r[str(r)] = entry
    return {
        "fidelity": fidelity.to_dict(),
        "mf_layer_forwards": u_mf / rows,
        "exact_layer_forwards": exact.total_units() / rows,
        "cost_ratio_vs_exact": u_mf / exact.total_units(),
        "cost_ratio_vs_naive": (u_mf / rows) / naive_units(n, len(exact.steps), 1),
        "mf_wall_s": t_mf,
        "agreement": sum(e["agree"] for e in per_r.values()) / len(per_r),
        "retentions": per_r,
    }


@torch.no_grad()
def bench_prefill(model, length: int, repeats: int, searched: str | None) -> dict:
    n = len(model.layers)
    patterns = {"all_f": "F" * n, "uniform_1_4": uniform_interleave(n, n_full_layers(0.25, n))}
    if searched:
        patterns["searched_1_4"] = searched
    x = torch.randint(0, model.cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    model(x[:, :256], pattern="F" * n)  # warm-up (allocator, kernels) outside the timings
    times = {k: [] for k in patterns}
    for _ in range(repeats):  # interleaved so machine load hits both alike
        for k, p in patterns.items():
            start = time.perf_counter()
            model(x, pattern=p, attn="sparse")
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"length": length, "repeats": repeats, "median_s": med, "times_s": times}
    for k in patterns:
        if k != "all_f":
            out[f"speedup_{k}"] = med["all_f"] / med[k]
    out["paper_speedup_1_4"] = 1.82
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, bool | int | float) and v is not None:
            out[key] = float(v)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="runs:/<run_id>/model or a checkpoint dir (required for search/fidelity)")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["search", "fidelity", "prefill"],
        choices=["search", "fidelity", "prefill"],
        help="which comparisons to run",
    )
    p.add_argument("--retention", type=float, nargs="+", default=[0.5, 0.25, 0.125], help="retentions reported")
    p.add_argument("--calib-windows", type=int, default=16, help="calibration windows")
    p.add_argument("--heldout-windows", type=int, default=64, help="held-out windows (fidelity part)")
    p.add_argument("--seq-len", type=int, default=0, help="window length (0: the model's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--fidelity-rungs", type=float, nargs="+", default=[0.25, 1.0], help="successive-halving rungs")
    p.add_argument("--fidelity-eta", type=float, default=4.0, help="keep ceil(n/eta) candidates per rung")
    p.add_argument("--prefill-len", type=int, default=4096, help="prefill length in tokens")
    p.add_argument("--repeats", type=int, default=3, help="prefill repeats per pattern")
    p.add_argument("--pattern", help="a searched F/S pattern timed beside the uniform 1/4 one (prefill part)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--split-seed", type=int, default=0, help="corpus split seed")
    p.add_argument("--mlflow", action="store_true", help="log the results to an MLflow run")
    a = p.parse_args(argv)
    FidelityConfig(rungs=tuple(a.fidelity_rungs), eta=a.fidelity_eta)  # validate before work
    if {"search", "fidelity"} & set(a.parts) and not a.model:
        p.error("--model is required for the search and fidelity parts (they need a trained model)")
    torch.set_num_threads(a.threads)
    from pipelines.indexcache import load_model
    from workers.model.hf.address import load_tokenizer
    from workers.model.presets import get_preset
    from workers.model.transformer import CalibLM

    model = load_model(a.model) if a.model else CalibLM(get_preset("demo")).eval()
    tokenizer = load_tokenizer(a.model) if a.model else None
    if a.pattern:
        from tuning.indexcache.patterns import validate_pattern

        validate_pattern(a.pattern, len(model.layers))
    seq_len = a.seq_len or model.cfg.max_seq_len
    results: dict = {"model": a.model or "random-init demo preset"}
    cli.work_started()  # the model loaded: errors from here on are the benchmark's, with a traceback
    exact = None
    if {"search", "fidelity"} & set(a.parts):
        corpus = load_corpus(split=SplitConfig(seed=a.split_seed))
        calib = corpus.eval_windows("calib", seq_len + 1, a.calib_windows, tokenizer)
        heldout = corpus.eval_windows("heldout", seq_len + 1, a.heldout_windows, tokenizer)
        retentions = tuple(a.retention)
        if "search" in a.parts:
            results["search"], exact = bench_search(model, calib, retentions, a.batch_size)
        else:
            exact, _, _ = run_search(model, calib, retentions, "prefix", a.batch_size)
        if "fidelity" in a.parts:
            fid = FidelityConfig(rungs=tuple(a.fidelity_rungs), eta=a.fidelity_eta)
            results["fidelity"] = bench_fidelity(model, calib, heldout, retentions, a.batch_size, exact, fid)
    if "prefill" in a.parts:
        searched = exact.pattern_with_full(n_full_layers(0.25, exact.n_layers)) if exact else None
        if exact is not None and 0.25 not in exact.retentions:
            searched = None
        searched = a.pattern or searched
        results["prefill"] = bench_prefill(model, a.prefill_len, a.repeats, searched)
    if a.mlflow:
        import mlflow

        from workers.runtime import tracking

        with tracking.start_run("indexcache_benchmark", params={**vars(a), "threads": a.threads}) as r:
            tracking.log_metrics(_flatten(results))
            mlflow.log_text(json.dumps(results, indent=1), "benchmark.json")
            results["run_id"] = r.info.run_id
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    cli.run(main)
