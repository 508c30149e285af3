"""Quantized caches inside real forwards: CalibLM (DSA-MoE tiny) and an HF Llama via hf:<path>.

The bridge itself (every family, identity caches, refusals) is tested in tests/models/test_hf_families.py.
"""

from __future__ import annotations

import pytest
import torch

from workers.caches.precision import KVQuantConfig
from workers.caches.protocol import DynamicCache
from workers.caches.quantized import make_cache
from workers.eval import continuation_nll
from workers.model.hf.address import load_hf


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_hf_quantized_cache_is_seen_by_the_metric(hf_llama):
    model = load_hf(f"hf:{hf_llama}")
    g = torch.Generator().manual_seed(2)
    ctx, cont = torch.randint(0, 256, (4, 96), generator=g), torch.randint(0, 256, (4, 16), generator=g)
    nll = {}
    for name in (None, "KV8", "KV2"):
        cfg = None if name is None else KVQuantConfig.uniform(name, 3, group=16, residual=16)
        nll[name] = continuation_nll(model, ctx, cont, make_cache=lambda c=cfg: make_cache(c, 3)).per_example
    d8 = max(abs(a - b) for a, b in zip(nll["KV8"], nll[None]))
    d2 = max(abs(a - b) for a, b in zip(nll["KV2"], nll[None]))
    assert 0 < d8 < d2  # the quantized cache reaches the scored tokens; 2 bits hurts more than 8
    # fake-quant and packed caches give the same logits through the HF model
    cfg = KVQuantConfig(("K8V4", "KV2", "K4V2"), group=16, residual=16)
    with torch.no_grad():
        lf = model(ctx, cache=make_cache(cfg, 3, "fake")).logits
        lp = model(ctx, cache=make_cache(cfg, 3, "packed")).logits
    assert torch.equal(lf, lp)


def test_calib_lm_dsa_model_through_quantized_cache():
    """Our DSA-MoE family: indexer keys ride along in full precision; KV8 ~ full, packed == fake."""
    from workers.model.presets import get_preset
    from workers.model.transformer import CalibLM

    torch.manual_seed(0)
    model = CalibLM(get_preset("tiny")).eval()
    n = model.cfg.n_layers
    x = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x, cache=DynamicCache(n)).logits
        kv8 = model(x, cache=make_cache(KVQuantConfig.uniform("KV8", n, group=16, residual=8), n)).logits
        cfg = KVQuantConfig.uniform("K4V2", n, group=16, residual=8)
        c_fake, c_packed = make_cache(cfg, n, "fake"), make_cache(cfg, n, "packed")
        a = model(x[:, :70], cache=c_fake).logits, model(x[:, 70:], cache=c_fake).logits
        b = model(x[:, :70], cache=c_packed).logits, model(x[:, 70:], cache=c_packed).logits
    # mean, not max: a random model's top-k / expert choice may flip on one token
    assert (kv8 - full).abs().mean() < 0.02 * full.abs().mean()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert c_packed.idx[0] is not None and c_packed.length(0) == 100
    assert c_packed.nbytes() < c_fake.nbytes()
