"""KVTuner benchmark: packed vs full-precision KV cache (bytes, decode time) and vs transformers' QuantizedCache.

    python -m benchmarks.kvtuner                                     # synthetic shapes only
    python -m benchmarks.kvtuner --model runs:/<id>/model --kv-precision kv_precision.json

Three comparisons, each measured in this one run and reported as a ratio:
1. KV bytes per token of `PackedKVCache` (int32-packed codes + fp32 scale/min + fp window)
   against the full-precision cache, at context --context, for uniform maps and the searched map.
2. Decode-step attention time at long context on CPU: `kernels.decode_attention` over the
   packed cache against dense attention over the full-precision cache (and the protocol path
   that dequantizes a view), median of alternating repeats so machine load hits both alike.
3. With --model (a dense Llama-shaped checkpoint, exported to HF, or hf:<dir>): held-out
   continuation NLL and cache bytes of our packed cache (searched map, uniform KV4, KV2) against
   transformers' `QuantizedCache` (quanto backend, 4 and 2 bits: the uniform settings it has).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.decode_attention import decode_attention, decode_attention_dense
from workers.caches.precision import KVQuantConfig
from workers.caches.protocol import DynamicCache
from workers.caches.quantized import PackedKVCache, make_cache
from workers.eval import token_nll
from workers.kvtuner import artifact as kv_precision


def fill(cache, n_layers: int, S: int, H: int, D: int, chunk: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for layer in range(n_layers):
        for s0 in range(0, S, chunk):
            T = min(chunk, S - s0)
            k, v = torch.randn(1, T, H, D, generator=g), torch.randn(1, T, H, D, generator=g)
            cache.update(layer, k, v, torch.arange(s0, s0 + T)[None])
    return cache


def bytes_per_token(maps: dict[str, KVQuantConfig], n_layers, S, H, D) -> list[dict]:
    full = fill(DynamicCache(n_layers), n_layers, S, H, D).nbytes() / S
    rows = [{"cache": "full fp32", "bytes_per_token": full, "ratio_vs_full": 1.0, "nominal_bits": 32}]
    for name, cfg in maps.items():
        c = fill(PackedKVCache(cfg), n_layers, S, H, D)
        b = c.nbytes() / S
        rows.append(
            {
                "cache": f"packed {name}",
                "bytes_per_token": b,
                "ratio_vs_full": b / full,
                "nominal_bits": cfg.nominal_bits,
                "stored_bits": c.stored_bits(),
            }
        )
    return rows


def _median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def decode_times(cfg: KVQuantConfig, S: int, H: int, D: int, reps: int) -> dict:
    """One layer, batch 1, one new token at context S: seconds per decode step (attention only)."""
    packed = fill(PackedKVCache(cfg), 1, S, H, D)
    full = fill(DynamicCache(1), 1, S, H, D)
    q = torch.randn(1, 1, H, D)
    qpos = torch.tensor([[S]])
    kq, vq, ppos, kw, vw, wpos = packed.packed_view(0)
    fv = full.layers[0]

    def run_full():
        decode_attention_dense(q, fv.k, fv.v, fv.pos, qpos)

    def run_packed():
        decode_attention(q, kq, vq, ppos, kw, vw, wpos, qpos)

    def run_view():
        view = packed._view(0, torch.float32)
        F.scaled_dot_product_attention(q.transpose(1, 2), view.k.transpose(1, 2), view.v.transpose(1, 2))

    t = {"full": [], "packed": [], "packed_view": []}
    for fn in (run_full, run_packed, run_view):  # warm-up
        fn()
    for _ in range(reps):  # alternate so load changes hit all three alike
        t["full"].append(_median_time(run_full, 1))
        t["packed"].append(_median_time(run_packed, 1))
        t["packed_view"].append(_median_time(run_view, 1))
    med = {k: statistics.median(v) for k, v in t.items()}
    return {
        "context": S,
        "full_s": med["full"],
        "packed_s": med["packed"],
        "packed_view_s": med["packed_view"],
        "packed_over_full": med["packed"] / med["full"],
        "packed_view_over_full": med["packed_view"] / med["full"],
    }


def tensor_bytes(t) -> int:
    """Bytes of a tensor, or of a quanto packed tensor's parts (data, scale, shift)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _hf_dir(model: str) -> Path:
    if model.startswith("hf:"):
        return Path(model[3:])
    from workers.model.checkpoint import load
    from workers.model.hf.export import export_llama

    out = Path(tempfile.mkdtemp(prefix="kvt-hf-"))
    export_llama(load(model), out)
    return out


@torch.no_grad()
def vs_quantized_cache(model: str, searched: KVQuantConfig | None, n: int, length: int, cont: int) -> list[dict]:
    """Held-out continuation NLL and cache bytes: ours (searched map, packed) vs HF QuantizedCache."""
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import QuantizedCache

    from workers.data.corpus import load_corpus
    from workers.eval import continuation_nll
    from workers.kvtuner.evaluate import build_data
    from workers.model.hf.address import load_hf

    path = _hf_dir(model)
    ours = load_hf(f"hf:{path}")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    data = build_data("text", load_corpus(), "heldout", n, 7, length, cont)
    L = ours.cfg.n_layers
    if searched is None:
        searched = KVQuantConfig.uniform("KV4", L, mode="kivi", group=32, residual=32)
    searched.check_model(L)
    rows = []
    cfgs = [("full", None), (f"ours searched ({searched.name()})", searched)]
    cfgs += [
        (
            f"ours KV{b}",
            KVQuantConfig.uniform(f"KV{b}", L, mode="kivi", group=searched.group, residual=searched.residual),
        )
        for b in (4, 2)
    ]
    for name, cfg in cfgs:
        caches = []

        def make(c=cfg, held=caches):
            held.append(make_cache(c, L, "packed"))
            return held[-1]

        r = continuation_nll(ours, data.context, data.continuation, make_cache=make, batch_size=n)
        bits = 32.0 if cfg is None else cfg.nominal_bits
        rows.append({"cache": name, "nominal_bits": bits, "nll": r.nats, "se": r.se, "bytes": caches[-1].nbytes()})
    ctx, y = data.context, data.continuation
    for nbits in (4, 2):  # quanto packs 2 or 4 bits: the uniform settings nearest any budget in [2, 4]
        qc = QuantizedCache(
            "quanto", hf.config, nbits=nbits, q_group_size=searched.group, residual_length=searched.residual
        )
        hf(input_ids=ctx[:, :-1], cache=qc, use_cache=True)
        logits = hf(input_ids=torch.cat([ctx[:, -1:], y[:, :-1]], 1), cache=qc, use_cache=True).logits
        nll = token_nll(logits, y).mean(1)
        qbytes = 0
        for layer in qc.layers:
            for t in (layer._quantized_keys, layer._quantized_values, layer.keys, layer.values):
                qbytes += tensor_bytes(t) if t is not None else 0
        se = float(nll.std() / len(nll) ** 0.5)
        rows.append(
            {
                "cache": f"HF QuantizedCache quanto {nbits}b",
                "nominal_bits": nbits,
                "nll": float(nll.mean()),
                "se": se,
                "bytes": qbytes,
            }
        )
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kvtuner", description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=8192, help="context length for bytes and decode time")
    p.add_argument("--layers", type=int, default=2, help="layers in the synthetic bytes-per-token cache")
    p.add_argument("--heads", type=int, default=8, help="key/value heads (synthetic)")
    p.add_argument("--head-dim", type=int, default=64, help="head dim (synthetic)")
    p.add_argument("--reps", type=int, default=15, help="timed repeats per variant")
    p.add_argument("--kv-precision", default=None, help="a kv_precision.json from pipelines.kvtuner (searched map)")
    p.add_argument("--model", default=None, help="dense checkpoint or hf:<dir> for the QuantizedCache comparison")
    p.add_argument("--n", type=int, default=32, help="held-out windows for the NLL comparison")
    p.add_argument("--length", type=int, default=256, help="tokens per held-out window")
    p.add_argument("--out", default=None, help="write the results JSON here")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    kw = {"mode": "kivi", "group": 32, "residual": 32}
    maps = {n: KVQuantConfig.uniform(n, a.layers, **kw) for n in ("KV8", "KV4", "K4V2", "KV2")}
    searched = kv_precision.load_config(a.kv_precision) if a.kv_precision else None
    if searched is not None:
        maps["searched"] = KVQuantConfig(
            tuple([searched.layers[i % searched.n_layers] for i in range(a.layers)]),
            mode=searched.mode,
            group=searched.group,
            residual=searched.residual,
        )
    res = {"bytes": bytes_per_token(maps, a.layers, a.context, a.heads, a.head_dim)}
    res["decode"] = [
        {"map": n, **decode_times(KVQuantConfig.uniform(n, 1, **kw), a.context, a.heads, a.head_dim, a.reps)}
        for n in ("KV4", "KV2")
    ]
    if a.model:
        res["vs_quantized_cache"] = vs_quantized_cache(a.model, searched, a.n, a.length, 32)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return res


if __name__ == "__main__":
    main()
