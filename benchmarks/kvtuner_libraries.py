"""KVTuner beside the quantized caches users already have, on a finished KVTuner run's held-out windows.

    python -m benchmarks.kvtuner_libraries --work-dir <a text run's --work-dir> [--greedy-n 50]

The run's held-out text windows are rebuilt exactly as pipelines.kvtuner builds them (its model,
corpus, tokenizer, seed, length, continuation; from the run's MLflow params), and the
full-precision NLL of every window is checked against the run's report (|delta| <= 1e-4 per
window) before anything is compared. Then, on those windows:

- KIVI-4 and KIVI-2 (this project's kivi mode, G = 32, R = 128: the KIVI paper's setting),
  through the project's evaluation with the shared full-precision prefill;
- transformers' `QuantizedCache`, quanto backend, 4 and 2 bits, at its defaults (q_group_size 64,
  residual_length 128), on the transformers model itself. QuantizedCache attends the prefill at
  full precision and stores it quantized, so its cache is filled from one full-precision
  transformers prefill per batch, shared by both bit-widths (and by transformers' own full cache,
  the cross-check that both stacks score the windows alike).

Continuation NLL of each is paired, window by window, against full precision and against the
run's searched maps (their per-window values from `out/report.json`). Greedy agreement (issue 15
item 3c): from the first `--greedy-n` windows' contexts, `--greedy-tokens` greedy tokens through
each cache (the run's searched maps and calibration-picked uniform baselines included) against
the full cache's: the fraction of positions that match and the tokens before the first mismatch.
Results go to MLflow (pipeline kvtuner_libraries) and print as markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.kvtuner import tensor_bytes
from workers.runtime import tracking

KIVI_PAPER = {"mode": "kivi", "group": 32, "residual": 128}  # KIVI's own setting (Liu et al. 2024)
QUANTO = {"q_group_size": 64, "residual_length": 128}  # QuantizedCache's defaults: what a user gets
AGREE_TOL = 1e-4  # nats, per window: both environments must score the full cache alike


def run_params(work: Path) -> tuple[str, dict]:
    run_id = (work / "run_id").read_text().strip()
    import mlflow

    return run_id, mlflow.get_run(run_id).data.params


def run_maps(rows: dict, params: dict) -> dict:
    """{report row name: KVQuantConfig (None for full)}: every map a text run reported, at its
    quantizer settings (mode, G, R, prefill regime)."""
    from tuning.kvtuner.space import parse_pair
    from workers.caches.precision import KVQuantConfig

    L = int(params["n_layers"])
    quant = {"mode": params["mode"], "group": int(params["group"]), "residual": int(params["residual"])}
    quant["prefill"] = params["prefill"]
    out = {}
    for name, r in rows.items():
        m = r["map"]  # the report's display form: one pair (uniform) or L pairs joined by "-"
        pairs = m.split("-") if "-" in m else [m] * L
        out[name] = None if name == "full" else KVQuantConfig(tuple(parse_pair(x) for x in pairs), **quant)
    return out


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def hf_prefill(hf, ctx: torch.Tensor):
    """transformers' full-precision prefill of ctx[:, :-1]: per layer (keys, values) [N, Hkv, C-1, Dh]."""
    from transformers import DynamicCache

    dc = DynamicCache(config=hf.config)
    hf(input_ids=ctx[:, :-1], cache=dc, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in dc.layers]


def hf_cache(hf, kv, nbits: int | None):
    """A fresh transformers cache holding the prefill kv: DynamicCache (nbits None) or QuantizedCache."""
    from transformers import DynamicCache
    from transformers.cache_utils import QuantizedCache

    c = DynamicCache(config=hf.config) if nbits is None else QuantizedCache("quanto", hf.config, nbits=nbits, **QUANTO)
    for i, (k, v) in enumerate(kv):
        c.update(k, v, i)
    return c


def _quanto_bytes(cache) -> int:
    """What a QuantizedCache holds: its packed keys and values and its full-precision residual."""
    parts = ("_quantized_keys", "_quantized_values", "keys", "values")
    held = (getattr(layer, name, None) for layer in cache.layers for name in parts)
    return sum(tensor_bytes(t) for t in held if t is not None)


def _hf_nll(hf, ctx, y, cache) -> torch.Tensor:
    """Per-window NLL [N] of y, teacher-forced through cache after ctx[:, :-1] (as workers.eval does)."""
    from workers.eval import token_nll

    feed = torch.cat([ctx[:, -1:], y[:, :-1]], 1)
    return token_nll(hf(input_ids=feed, cache=cache, use_cache=True).logits, y).mean(1)


def _hf_greedy(hf, ctx, cache, steps: int) -> torch.Tensor:
    tok, out = ctx[:, -1:], []
    for _ in range(steps):
        tok = hf(input_ids=tok, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, 1)


def _ours_greedy(model, ctx, cache, prefilled, steps: int) -> torch.Tensor:
    for layer, kv in enumerate(prefilled):
        cache.update(layer, kv.k, kv.v, kv.pos, kv.idx_k)
    C, tok, out = ctx.shape[1], ctx[:, -1:], []
    for s in range(steps):
        pos = torch.full_like(tok, C - 1 + s)
        tok = model(tok, positions=pos, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, 1)


def agreement(tokens: torch.Tensor, ref: torch.Tensor) -> dict:
    """tokens, ref [N, T] -> mean fraction of matching positions, mean prefix match, all-T matches."""
    same = tokens == ref
    prefix = torch.where(same.all(1), same.shape[1], (~same).float().argmax(1)).float()
    return {
        "match": float(same.float().mean()),
        "prefix": float(prefix.mean()),
        "identical": float(same.all(1).float().mean()),
    }


def _ci(d: float, se: float) -> str:
    return f"{d:+.4f} ± {se:.4f} [{d - 1.96 * se:+.4f}, {d + 1.96 * se:+.4f}]"


@torch.no_grad()  # every forward below: else transformers' prefill keeps its graph alive through the cache (18 GB)
def compare(work: Path, windows: int | None, greedy_n: int, greedy_tokens: int, batch: int) -> dict:
    from transformers import AutoModelForCausalLM

    from pipelines.kvtuner import heldout_seed
    from workers.caches.precision import KVQuantConfig
    from workers.caches.protocol import KVView
    from workers.data.corpus import load_corpus
    from workers.eval import continuation_nll, prefill_kv
    from workers.kvtuner.evaluate import build_data, cache_factory
    from workers.model.hf.address import load_any, load_tokenizer, local_dir
    from workers.stats import paired_difference

    run_id, p = run_params(work)
    if p["task"] != "text":
        raise SystemExit(f"--work-dir {work}: run {run_id} is a {p['task']!r} run; this compares text runs")
    report = json.loads((work / "out" / "report.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    model_addr, L = p["model"], int(p["n_layers"])
    tok = load_tokenizer(model_addr)
    data = build_data(
        "text",
        load_corpus(p["corpus"]),
        "heldout",
        int(p["report_n"]),
        heldout_seed(p),
        int(p["length"]),
        int(p["continuation"]),
        (0, 1),
        tok,
    )
    if data.name != report["data"]:
        raise SystemExit(f"rebuilt held-out set {data.name!r} is not the run's {report['data']!r}")
    n_all = len(data)
    N = n_all if windows is None else min(windows, n_all)  # a fixed prefix: the same windows every time
    ours = load_any(model_addr, dtype=p.get("dtype") if p.get("dtype") not in (None, "None") else None)
    hf = AutoModelForCausalLM.from_pretrained(local_dir(model_addr), dtype=torch.float32).eval()
    maps = run_maps(rows, p)

    ours_nll = {
        "full": None,
        "KIVI-4 (G32 R128)": KVQuantConfig.uniform("KV4", L, **KIVI_PAPER),
        "KIVI-2 (G32 R128)": KVQuantConfig.uniform("KV2", L, **KIVI_PAPER),
    }
    searched = sorted((n for n in rows if n.startswith("kvtuner_b")), key=lambda n: -float(n[9:]))
    greedy_ours = {**ours_nll, **{n: maps[n] for n in [*searched, "KV4", "K4V2", "KV2"] if n in rows}}
    hf_arms = {"transformers full": None, "quanto 4-bit (G64 R128)": 4, "quanto 2-bit (G64 R128)": 2}
    per = {n: [] for n in [*ours_nll, *hf_arms]}
    nbytes: dict[str, int] = {}
    gen = {n: [] for n in [*greedy_ours, *hf_arms]}
    T = data.context.shape[1]
    for sl in _batches(N, batch):
        ctx, y = data.context[sl], data.continuation[sl]
        pre = prefill_kv(ours, ctx)
        for name, cfg in ours_nll.items():
            r = continuation_nll(ours, ctx, y, make_cache=cache_factory(cfg, L), batch_size=len(ctx), prefilled=[pre])
            per[name] += [float(x) for x in r.per_example]
        g = slice(0, max(0, min(greedy_n - sl.start, len(ctx))))
        if g.stop > 0:
            pre_g = [KVView(kv.k[g], kv.v[g], kv.pos[g], None if kv.idx_k is None else kv.idx_k[g]) for kv in pre]
            for name, cfg in greedy_ours.items():
                gen[name].append(_ours_greedy(ours, ctx[g], cache_factory(cfg, L)(), pre_g, greedy_tokens))
        del pre
        kv = hf_prefill(hf, ctx)
        for name, nbits in hf_arms.items():
            cache = hf_cache(hf, kv, nbits)
            per[name] += _hf_nll(hf, ctx, y, cache).tolist()
            if nbits is not None:
                nbytes[name] = _quanto_bytes(cache) // len(ctx)
            if g.stop > 0:
                kv_g = [(k[g], v[g]) for k, v in kv]
                gen[name].append(_hf_greedy(hf, ctx[g], hf_cache(hf, kv_g, nbits), greedy_tokens))
        print(f"windows {sl.stop}/{N}", file=sys.stderr, flush=True)
    rows = {n: {**r, "per_example": r["per_example"][:N]} for n, r in rows.items()}
    full_run = rows["full"]["per_example"]
    worst = max(abs(a - b) for a, b in zip(per["full"], full_run))
    worst_hf = max(abs(a - b) for a, b in zip(per["transformers full"], per["full"]))
    if worst > AGREE_TOL:
        raise SystemExit(f"full-precision NLL differs from run {run_id}'s report by {worst:.2e} on a window")
    ref = {n: rows[n]["per_example"] for n in ["full", *searched]}
    table = []
    for name in [*ours_nll, *hf_arms][1:]:
        if name == "transformers full":
            continue
        row = {"cache": name, "nll": sum(per[name]) / N}
        for other, vals in ref.items():
            d, se = paired_difference(per[name], vals)
            row[f"minus_{other}"], row[f"minus_{other}_se"] = d, se
        table.append(row)
    gref = torch.cat(gen["full"])
    gen_table = [{"cache": n, **agreement(torch.cat(v), gref)} for n, v in gen.items() if n != "full"]
    stored_bits = {
        n: cfg.stored_bits(T + int(p["continuation"]) - 1, int(p["head_dim"]))
        for n, cfg in ours_nll.items()
        if cfg is not None
    }
    return {
        "run_id": run_id,
        "data": data.name,
        "n_windows": N,
        "n_heldout": n_all,
        "context": T,
        "continuation": int(p["continuation"]),
        "full_nll": sum(per["full"]) / N,
        "max_abs_full_vs_report": worst,
        "max_abs_transformers_vs_ours_full": worst_hf,
        "nll": table,
        "stored_bits_ours": stored_bits,
        "quanto_bytes_per_window": nbytes,
        "greedy_n": int(gref.shape[0]),
        "greedy_tokens": greedy_tokens,
        "greedy": gen_table,
        "searched": {n: rows[n]["map"] for n in searched},
    }


def markdown(res: dict) -> str:
    refs = ["full", *res["searched"]]
    out = [
        f"Held-out windows: {res['n_windows']} x ({res['context']} context + {res['continuation']} scored tokens), "
        f"`{res['data']}` of KVTuner run `{res['run_id']}`; full precision {res['full_nll']:.4f} nats/token "
        f"(max |delta| vs the run's report {res['max_abs_full_vs_report']:.1e}; transformers' own full cache vs "
        f"ours {res['max_abs_transformers_vs_ours_full']:.1e}).",
        "",
        "| cache | NLL | " + " | ".join(f"minus {r} (95% CI)" for r in refs) + " |",
        "|---|---|" + "---|" * len(refs),
    ]
    for r in res["nll"]:
        cells = [_ci(r[f"minus_{o}"], r[f"minus_{o}_se"]) for o in refs]
        out.append(f"| {r['cache']} | {r['nll']:.4f} | " + " | ".join(cells) + " |")
    out += [
        "",
        f"Greedy agreement with the full cache, {res['greedy_tokens']} tokens from {res['greedy_n']} contexts:",
        "",
        "| cache | positions matching | tokens before first mismatch | all tokens identical |",
        "|---|---|---|---|",
    ]
    out += [f"| {g['cache']} | {g['match']:.3f} | {g['prefix']:.1f} | {g['identical']:.2f} |" for g in res["greedy"]]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kvtuner_libraries", description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", required=True, type=Path, help="a finished text run's pipelines.kvtuner --work-dir")
    p.add_argument("--windows", type=int, default=None, help="the first n held-out windows (default: all)")
    p.add_argument("--greedy-n", type=int, default=50, help="contexts for greedy agreement (first n windows)")
    p.add_argument("--greedy-tokens", type=int, default=32, help="greedy tokens per context")
    p.add_argument("--batch", type=int, default=7, help="windows per forward")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--experiment", default="calibray-bench", help="MLflow experiment name")
    a = p.parse_args(argv)
    if not (a.work_dir / "run_id").is_file() or not (a.work_dir / "out" / "report.json").is_file():
        p.error(f"--work-dir {a.work_dir}: no run_id and out/report.json (not a finished pipelines.kvtuner run)")
    for name in ("windows", "greedy_n", "greedy_tokens", "batch", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(a, name)}: must be >= 1")
    torch.set_num_threads(a.threads)
    params = {k: str(v) for k, v in vars(a).items() if k != "experiment"}
    with tracking.start_run(
        "kvtuner_libraries", experiment=a.experiment, run_name="kvtuner-vs-libraries", params=params
    ):
        res = compare(a.work_dir, a.windows, a.greedy_n, a.greedy_tokens, a.batch)
        key = tracking.metric_key
        tracking.log_metrics({f"nll/{key(r['cache'])}": r["nll"] for r in res["nll"]})
        tracking.log_metrics({f"minus_full/{key(r['cache'])}": r["minus_full"] for r in res["nll"]})
        tracking.log_metrics({f"greedy_match/{key(g['cache'])}": g["match"] for g in res["greedy"]})
        text = markdown(res)
        tracking.log_report(res, text, "kvtuner_libraries")
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
