"""PrefixKV (calibray) side by side with NVIDIA kvpress presses, same HF model, same tokens.

kvpress 0.5.5 pins transformers < 5.3, so it lives in its own environment that reuses the
main one's torch (never a second torch):

    python -m venv .venv-kvpress
    echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-kvpress/lib/python3.11/site-packages/zz_main.pth
    .venv-kvpress/bin/pip install kvpress==0.5.5          # pulls transformers 5.2 into .venv-kvpress only
    .venv-kvpress/bin/python -m benchmarks.prefixkv_kvpress --model hf:<dir> --calibration runs:/<id>/prefixkv.json

For every keep ratio r (kvpress compression_ratio = 1 - r) and every method, on the same
held-out windows: prefill the context with the method, then score the continuation with the
cache left as it is (kvpress compresses only during prefill; our cache's decode cap acts only
after a forward, so one teacher-forced forward is the same protocol). Reported: continuation
NLL (nats, paired SE versus the full cache) and the measured bytes of cached keys and values,
as a ratio to the full cache. kvpress runs token by token, exactly as its own pipeline decodes.
The calibray half runs in a child process of the main environment (`--python`), on the same
windows, so each environment keeps its own transformers; `--part` runs one half alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from workers.data.corpus import load_corpus
from workers.eval import mean_se, paired_difference


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
def kvpress_nll(hf, context, continuation, press):
    """HF model + press: prefill context[:, :-1] under the press, then decode token by token."""
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
    nll = F.cross_entropy(torch.stack(logits, 1).transpose(1, 2), continuation, reduction="none").mean(1)
    return nll.tolist(), kv_bytes


@torch.no_grad()
def calibray_nll(model, context, continuation, method):
    """Our HF path + an evicting cache; KV bytes measured right after prefill, like kvpress's."""
    from workers.eval import continuation_logits

    seen = {}

    def after_prefill(cache, _context):
        seen["bytes"] = sum(
            cache.layers[i].k.numel() * cache.layers[i].k.element_size() * 2 for i in range(len(cache.layers))
        )

    logits = continuation_logits(model, context, continuation, after_prefill=after_prefill, **method.forward_kwargs())
    nll = F.cross_entropy(logits.float().transpose(1, 2), continuation, reduction="none").mean(1)
    return nll.tolist(), seen["bytes"]


def _windows(a):
    g = torch.Generator().manual_seed(a.seed)
    w = load_corpus().sample_windows("heldout", a.context + a.continuation, a.samples, g)
    return w[:, : a.context], w[:, a.context :]


def run_kvpress(a, ratios) -> dict:
    """kvpress half (this environment must have kvpress): {key: (per-example NLL, KV bytes)}."""
    import transformers
    from transformers import AutoModelForCausalLM

    path = a.model[3:] if a.model.startswith("hf:") else a.model
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ctx, cont = _windows(a)
    out = {"transformers": transformers.__version__, "rows": {}}
    out["rows"]["full@1"] = kvpress_nll(hf, ctx, cont, None)
    for r in ratios:
        for name, press in kvpress_presses(r).items():
            out["rows"][f"{name}@{r:g}"] = kvpress_nll(hf, ctx, cont, press)
    return out


def run_calibray(a, ratios) -> dict:
    """calibray half (main environment): PrefixKV, uniform and pyramid with the calibrated scoring."""
    import transformers

    from workers.hf_adapter import load_hf
    from workers.prefixkv.calibration_file import load_calibration
    from workers.prefixkv.methods import Method

    cal = load_calibration(a.calibration)
    ours = load_hf(a.model)
    n_layers = ours.cfg.n_layers
    if cal.n_layers != n_layers:
        raise ValueError(f"--calibration has {cal.n_layers} layers, --model has {n_layers}")
    ctx, cont = _windows(a)
    score = cal.score(a.score)
    out = {"transformers": transformers.__version__, "rows": {}}
    out["rows"]["full@1"] = calibray_nll(ours, ctx, cont, Method("full", 1.0, n_layers))
    for r in ratios:
        for name in ("prefixkv", "uniform", "pyramid"):
            m = Method(name, r, n_layers, score, cal.n_sink, calibrated=cal.fractions(a.score))
            out["rows"][f"calibray-{name}-{score.mode}@{r:g}"] = calibray_nll(ours, ctx, cont, m)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefixkv_kvpress", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="hf:<dir> of a Llama-shaped model (e.g. the exported dense model)")
    p.add_argument("--calibration", required=True, help="prefixkv.json (path or runs:/<id>/prefixkv.json)")
    p.add_argument("--score", default=None, help="calibrated score mode to use (default: the file's default)")
    p.add_argument("--ratios", default="0.1,0.2,0.5", help="keep ratios")
    p.add_argument("--context", type=int, default=192, help="context tokens")
    p.add_argument("--continuation", type=int, default=64, help="scored tokens")
    p.add_argument("--samples", type=int, default=64, help="held-out windows")
    p.add_argument("--seed", type=int, default=1, help="window sampling seed")
    p.add_argument("--part", choices=("both", "kvpress", "calibray"), default="both", help="which half to run")
    p.add_argument("--python", default=".venv/bin/python", help="main-environment python for the calibray half")
    p.add_argument("--out", default=None, help="write the result JSON here")
    a = p.parse_args(argv)
    ratios = [float(r) for r in a.ratios.split(",")]
    for r in ratios:
        if not 0 < r < 1:
            raise ValueError(f"--ratios: keep ratio {r} must be in (0, 1) (kvpress compression_ratio = 1 - keep)")
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
        for flag in ("model", "calibration", "score", "ratios", "context", "continuation", "samples", "seed"):
            if getattr(a, flag) is not None:
                args += [f"--{flag}", str(getattr(a, flag))]
        child = subprocess.Popen(args)
        kv = run_kvpress(a, ratios)
        if child.wait() != 0:
            raise RuntimeError(f"calibray half failed: {' '.join(args)}")
        ours = json.loads(Path(tmp.name).read_text())
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
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
