"""PrefixKV (calibray) side by side with NVIDIA kvpress presses, same HF model, same tokens.

kvpress 0.5.5 pins transformers < 5.3, so it lives in its own environment that reuses the
main one's torch (never a second torch):

    python -m venv .venv-kvpress
    echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-kvpress/lib/python3.11/site-packages/zz_main.pth
    .venv-kvpress/bin/pip install kvpress==0.5.5          # pulls transformers 5.2 into .venv-kvpress only
    .venv-kvpress/bin/python -m benchmarks.prefixkv_kvpress --model hf:<dir> --calibration runs:/<id>/prefixkv.json
    .venv-kvpress/bin/python -m benchmarks.prefixkv_kvpress --data retrieval --model hf:<dir> --calibration <json>

For every keep ratio r (kvpress compression_ratio = 1 - r) and every method, on the same
held-out windows: prefill the context with the method, then score the continuation with the
cache left as it is (kvpress compresses only during prefill; our cache's decode cap acts only
after a forward, so one teacher-forced forward is the same protocol). Reported: continuation
NLL (nats, paired SE versus the full cache) and the measured bytes of cached keys and values,
as a ratio to the full cache. kvpress runs token by token, exactly as its own pipeline decodes.
The calibray half runs in a child process of the main environment (`--python`), on the same
windows, so each environment keeps its own transformers; `--part` runs one half alone.

`--data retrieval` runs the same comparison on held-out queries of the retrieval task
(workers.data.retrieval.eval_set, sequences of --context + 3 bytes, default 256: the prompt
ends with `?key=`, the 3 value bytes follow). Exact match = the argmax at the prompt's last
position and at the next two positions (value bytes teacher-forced) gives all 3 value bytes;
reported with its binomial SE, the paired difference versus the full cache (paired SE over the
same queries), the value bytes' mean NLL and the KV bytes ratio. Two settings, both halves:

- `agnostic` (question after compression, kvpress's default pipeline: the question is not
  compressed and the press never sees it): prefill prompt[:-5] (the prompt without `?key=`)
  under the method, then feed `?key=` and the first two value bytes through the cache as left.
- `aware` (question inside the compressed prefill, kvpress's `compress_questions` setting):
  prefill the prompt minus its final `=` (so `?key` is scored by the method), evict, then feed
  `=` and two value bytes, so every value byte is predicted through the compressed cache (the
  prefill forward, which still sees everything, predicts nothing that is scored). Same split
  as workers.eval.retrieval_accuracy and pipelines.prefixkv. calibray scores this setting with
  `--aware-score` (default `window`: attention from the last `window` prefill queries, which
  cover the question, like SnapKV's observation window); `agnostic` uses `--score`.

KV bytes are measured right after the prefill, so each setting's ratio is to its own full cache.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from workers.data.corpus import load_corpus
from workers.data.retrieval import KEY_LEN, VALUE_LEN, eval_set
from workers.eval import exact_match, token_nll
from workers.stats import mean_se, paired_difference

# Prompt bytes fed after the compressed prefill, per retrieval setting.
SETTINGS = {"agnostic": 1 + KEY_LEN + 1, "aware": 1}  # "?key=" / "="


def kvpress_presses(ratio: float) -> dict:
    """kvpress presses at their default settings (nothing tuned), compression_ratio = 1 - keep."""
    from kvpress import ExpectedAttentionPress, PyramidKVPress, SnapKVPress

    c = round(1.0 - ratio, 6)
    return {
        "kvpress-snapkv": SnapKVPress(compression_ratio=c),
        "kvpress-pyramidkv": PyramidKVPress(compression_ratio=c),
        "kvpress-expected-attention": ExpectedAttentionPress(compression_ratio=c),
    }


@torch.no_grad()
def kvpress_logits(hf, context, continuation, press):
    """HF model + press: prefill context[:, :-1] under the press, then decode token by token.

    Returns logits [N, M, V] fp32 for the continuation tokens and the KV bytes after prefill.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    pre = context[:, :-1]
    n = pre.shape[1]
    pos = torch.arange(n).unsqueeze(0).expand(pre.shape[0], -1)
    if press is None:
        hf(input_ids=pre, past_key_values=cache, position_ids=pos, use_cache=True)
    else:
        with press(hf):
            hf(input_ids=pre, past_key_values=cache, position_ids=pos, use_cache=True)
    kv_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    feed = torch.cat([context[:, -1:], continuation[:, :-1]], 1)
    logits = []
    for t in range(feed.shape[1]):
        p = torch.full((feed.shape[0], 1), n + t)
        out = hf(
            input_ids=feed[:, t : t + 1], past_key_values=cache, position_ids=p, cache_position=p[0], use_cache=True
        )
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1), kv_bytes


def kvpress_nll(hf, context, continuation, press):
    logits, kv_bytes = kvpress_logits(hf, context, continuation, press)
    nll = token_nll(logits, continuation).mean(1)
    return nll.tolist(), kv_bytes


@torch.no_grad()
def calibray_logits(model, context, continuation, method):
    """Our HF path + an evicting cache; KV bytes measured right after prefill, like kvpress's."""
    from workers.eval import continuation_logits

    seen = {}

    def after_prefill(cache, _context):
        seen["bytes"] = sum(
            cache.layers[i].k.numel() * cache.layers[i].k.element_size() * 2 for i in range(len(cache.layers))
        )

    logits = continuation_logits(model, context, continuation, after_prefill=after_prefill, **method.forward_kwargs())
    return logits.float(), seen["bytes"]


def calibray_nll(model, context, continuation, method):
    logits, kv_bytes = calibray_logits(model, context, continuation, method)
    nll = token_nll(logits, continuation).mean(1)
    return nll.tolist(), kv_bytes


def _windows(a):
    g = torch.Generator().manual_seed(a.seed)
    w = load_corpus().sample_windows("heldout", a.context + a.continuation, a.samples, g)
    return w[:, : a.context], w[:, a.context :]


def _queries(a):
    """Held-out retrieval queries: prompt [n, context] ending with `?key=`, value [n, 3]."""
    es = eval_set(load_corpus().heldout, n=a.samples, length=a.context + VALUE_LEN, seed=a.seed, split="heldout")
    return es.prompt, es.value


def retrieval_split(prompt, value, fed: int):
    """(context, continuation) for the continuation protocol: context[:, :-1] = prompt[:, :-fed] is
    prefilled; prompt[:, -fed:] and value[:, :-1] are fed; the last 3 logits predict the value."""
    seq = torch.cat([prompt, value], 1)
    cut = prompt.shape[1] - fed + 1
    return seq[:, :cut], seq[:, cut:]


def retrieval_row(logits, value, kv_bytes) -> dict:
    """logits [N, M, V] whose last 3 positions predict value [N, 3] -> hits, value NLL, KV bytes."""
    lg = logits[:, -VALUE_LEN:]
    hits = exact_match(lg, value)
    nll = token_nll(lg, value).mean(1).tolist()
    return {"hits": hits, "nll": nll, "kv_bytes": kv_bytes}


def _retrieval_rows(a, ratios, run) -> dict:
    """run(context, continuation, setting, ratio | None) -> {name: (logits, kv_bytes)} per cell."""
    prompt, value = _queries(a)
    rows = {}
    for setting in a.settings.split(","):
        ctx, cont = retrieval_split(prompt, value, SETTINGS[setting])
        for r in [None, *ratios]:
            for name, (logits, b) in run(ctx, cont, setting, r).items():
                rows[f"{setting}/{name}@{1 if r is None else r:g}"] = retrieval_row(logits, value, b)
    return rows


def _load_kvpress_model(a):
    from transformers import AutoModelForCausalLM

    path = a.model[3:] if a.model.startswith("hf:") else a.model
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def run_kvpress(a, ratios) -> dict:
    """kvpress half (this environment must have kvpress): {key: (per-example NLL, KV bytes)}
    for text, {key: retrieval_row} for retrieval."""
    import transformers

    hf = _load_kvpress_model(a)
    out = {"transformers": transformers.__version__, "rows": {}}
    if a.data == "retrieval":

        def run(ctx, cont, _setting, r):
            presses = {"full": None} if r is None else kvpress_presses(r)
            return {name: kvpress_logits(hf, ctx, cont, press) for name, press in presses.items()}

        out["rows"] = _retrieval_rows(a, ratios, run)
        return out
    ctx, cont = _windows(a)
    out["rows"]["full@1"] = kvpress_nll(hf, ctx, cont, None)
    for r in ratios:
        for name, press in kvpress_presses(r).items():
            out["rows"][f"{name}@{r:g}"] = kvpress_nll(hf, ctx, cont, press)
    return out


def run_calibray(a, ratios) -> dict:
    """calibray half (main environment): PrefixKV, uniform and pyramid with the calibrated scoring."""
    import transformers

    from workers.model.hf.address import load_hf
    from workers.prefixkv import artifact
    from workers.prefixkv.methods import Method

    cal = artifact.load(a.calibration)
    ours = load_hf(a.model)
    n_layers = ours.cfg.n_layers
    if cal.n_layers != n_layers:
        raise ValueError(f"--calibration has {cal.n_layers} layers, --model has {n_layers}")
    out = {"transformers": transformers.__version__, "rows": {}}
    if a.data == "retrieval":
        modes = {"agnostic": a.score, "aware": a.aware_score}

        def run(ctx, cont, setting, r):
            if r is None:
                return {"full": calibray_logits(ours, ctx, cont, Method("full", 1.0, n_layers))}
            score, fractions = cal.score(modes[setting]), cal.fractions(modes[setting])
            res = {}
            for name in ("prefixkv", "uniform", "pyramid"):
                m = Method(name, r, n_layers, score, cal.n_sink, calibrated=fractions)
                res[f"calibray-{name}-{score.mode}"] = calibray_logits(ours, ctx, cont, m)
            return res

        out["rows"] = _retrieval_rows(a, ratios, run)
        return out
    ctx, cont = _windows(a)
    score = cal.score(a.score)
    out["rows"]["full@1"] = calibray_nll(ours, ctx, cont, Method("full", 1.0, n_layers))
    for r in ratios:
        for name in ("prefixkv", "uniform", "pyramid"):
            m = Method(name, r, n_layers, score, cal.n_sink, calibrated=cal.fractions(a.score))
            out["rows"][f"calibray-{name}-{score.mode}@{r:g}"] = calibray_nll(ours, ctx, cont, m)
    return out


def report_text(a, kv, ours, t0) -> dict:
    full_nll, full_bytes = kv["rows"].pop("full@1")
    ours_full, ours_full_bytes = ours["rows"].pop("full@1")
    out = {
        "transformers": {"kvpress": kv["transformers"], "calibray": ours["transformers"]},
        "args": vars(a),
        "full_nll": mean_se(full_nll),
        "full_per_example": full_nll,
        "full_kv_bytes": full_bytes,
        "full_paths_max_abs_diff": max(abs(x - y) for x, y in zip(full_nll, ours_full)),
        "rows": [],
        "seconds": round(time.time() - t0, 1),
    }
    print(
        f"full cache: NLL {out['full_nll'][0]:.4f} +- {out['full_nll'][1]:.4f}, KV {full_bytes} bytes; "
        f"kvpress vs calibray full-cache paths differ by at most {out['full_paths_max_abs_diff']:.2e} nats"
    )
    print(
        "| method@keep | NLL | SE | minus full | paired SE | KV bytes / full |\n| --- | --- | --- | --- | --- | --- |"
    )
    rows = sorted({**kv["rows"], **ours["rows"]}.items(), key=lambda kv_: (float(kv_[0].split("@")[1]), kv_[0]))
    for key, (nll, b) in rows:
        m, se = mean_se(nll)
        d, dse = paired_difference(nll, full_nll)
        out["rows"].append(
            {"key": key, "nll": m, "se": se, "diff_vs_full": d, "diff_se": dse, "kv_bytes": b, "per_example": nll}
        )
        print(f"| {key} | {m:.4f} | {se:.4f} | {d:+.4f} | {dse:.4f} | {b / full_bytes:.3f} |")
    return out


def report_retrieval(a, kv, ours, t0) -> dict:
    """Exact match per (setting, method, keep), paired against the setting's kvpress full cache."""
    out = {
        "transformers": {"kvpress": kv["transformers"], "calibray": ours["transformers"]},
        "args": vars(a),
        "full": {},
        "rows": [],
        "seconds": round(time.time() - t0, 1),
    }
    table = [
        "| setting | method@keep | exact match | SE | minus full | paired SE | value NLL | KV bytes / full |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setting in a.settings.split(","):
        full, ours_full = kv["rows"].pop(f"{setting}/full@1"), ours["rows"].pop(f"{setting}/full@1")
        n = len(full["hits"])
        acc = sum(full["hits"]) / n
        out["full"][setting] = {
            "exact_match": acc,
            "se": math.sqrt(max(acc * (1 - acc), 1e-12) / n),
            "n": n,
            "per_example": full["hits"],
            "value_nll": mean_se(full["nll"]),
            "kv_bytes": full["kv_bytes"],
            "calibray_kv_bytes": ours_full["kv_bytes"],
            "paths_hit_mismatches": sum(x != y for x, y in zip(full["hits"], ours_full["hits"])),
            "paths_max_abs_nll_diff": max(abs(x - y) for x, y in zip(full["nll"], ours_full["nll"])),
        }
        f = out["full"][setting]
        print(
            f"{setting}: full cache exact match {acc:.3f} +- {f['se']:.3f} ({n} queries), KV {f['kv_bytes']} bytes; "
            f"kvpress vs calibray full-cache paths: {f['paths_hit_mismatches']} of {n} hits differ, "
            f"value NLL differs by at most {f['paths_max_abs_nll_diff']:.2e} nats"
        )
        table.append(f"| {setting} | full@1 | {acc:.3f} | {f['se']:.3f} | | | {f['value_nll'][0]:.4f} | 1.000 |")
        cells = {k: v for k, v in {**kv["rows"], **ours["rows"]}.items() if k.startswith(f"{setting}/")}
        for key, row in sorted(cells.items(), key=lambda c: (float(c[0].split("@")[1]), c[0])):
            hits = row["hits"]
            p = sum(hits) / n
            se = math.sqrt(max(p * (1 - p), 1e-12) / n)
            d, dse = paired_difference(hits, full["hits"])
            ratio = row["kv_bytes"] / full["kv_bytes"]
            out["rows"].append(
                {
                    "key": key,
                    "setting": setting,
                    "exact_match": p,
                    "se": se,
                    "diff_vs_full": d,
                    "diff_se": dse,
                    "value_nll": mean_se(row["nll"]),
                    "kv_bytes": row["kv_bytes"],
                    "kv_ratio": ratio,
                    "per_example": hits,
                }
            )
            name = key.split("/", 1)[1]
            table.append(
                f"| {setting} | {name} | {p:.3f} | {se:.3f} | {d:+.3f} | {dse:.3f} | "
                f"{out['rows'][-1]['value_nll'][0]:.4f} | {ratio:.3f} |"
            )
    print("\n".join(table))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefixkv_kvpress", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="hf:<dir> of a Llama-shaped model (e.g. the exported dense model)")
    p.add_argument("--calibration", required=True, help="prefixkv.json (path or runs:/<id>/prefixkv.json)")
    p.add_argument("--data", choices=("text", "retrieval"), default="text", help="held-out text or retrieval queries")
    p.add_argument("--score", default=None, help="calibrated score mode to use (default: the file's default)")
    p.add_argument("--aware-score", default="window", help="retrieval: calibray score mode in the 'aware' setting")
    p.add_argument("--settings", default="agnostic,aware", help="retrieval settings (see the module docstring)")
    p.add_argument("--ratios", default="0.1,0.2,0.5", help="keep ratios")
    p.add_argument("--context", type=int, default=None, help="context tokens (text: 192; retrieval: prompt, 253)")
    p.add_argument("--continuation", type=int, default=64, help="scored tokens (text)")
    p.add_argument("--samples", type=int, default=64, help="held-out windows or retrieval queries")
    p.add_argument("--seed", type=int, default=1, help="window / query sampling seed")
    p.add_argument("--part", choices=("both", "kvpress", "calibray"), default="both", help="which half to run")
    p.add_argument("--python", default=".venv/bin/python", help="main-environment python for the calibray half")
    p.add_argument("--out", default=None, help="write the result JSON here")
    a = p.parse_args(argv)
    if a.context is None:
        a.context = 192 if a.data == "text" else 256 - VALUE_LEN
    ratios = [float(r) for r in a.ratios.split(",")]
    for r in ratios:
        if not 0 < r < 1:
            raise ValueError(f"--ratios: keep ratio {r} must be in (0, 1) (kvpress compression_ratio = 1 - keep)")
    for s in a.settings.split(","):
        if s not in SETTINGS:
            raise ValueError(f"--settings: {s!r} is not one of {tuple(SETTINGS)}")
    t0 = time.time()
    if a.part != "both":
        res = run_kvpress(a, ratios) if a.part == "kvpress" else run_calibray(a, ratios)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f)
        return res
    # The calibray half runs in the main environment (its transformers), on the same windows.
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        args = [a.python, "-m", "benchmarks.prefixkv_kvpress", "--part", "calibray", "--out", tmp.name]
        flags = ("model", "calibration", "data", "score", "aware_score", "settings", "ratios", "context")
        for flag in (*flags, "continuation", "samples", "seed"):
            if getattr(a, flag) is not None:
                args += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
        child = subprocess.Popen(args)
        kv = run_kvpress(a, ratios)
        if child.wait() != 0:
            raise RuntimeError(f"calibray half failed: {' '.join(args)}")
        ours = json.loads(Path(tmp.name).read_text())
    out = (report_retrieval if a.data == "retrieval" else report_text)(a, kv, ours, t0)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
