"""A packed cache's decode step attends its codes directly: same attention as its tensors, nothing dequantized."""

from __future__ import annotations

import pytest
import torch

from kernels.decode_attention import has_fast_path
from workers.caches.batch import BatchCache
from workers.caches.precision import KVQuantConfig
from workers.caches.protocol import DynamicCache
from workers.caches.quantized import make_cache
from workers.model.attention import dense_attention
from workers.model.hf.address import load_hf

PROMPT, NEW = 40, 4


class Recording:
    """A real cache that also keeps every view it returned (to ask afterwards how each was read)."""

    def __init__(self, inner):
        self.inner, self.views = inner, []

    def update(self, *args, **kwargs):
        self.views.append(self.inner.update(*args, **kwargs))
        return self.views[-1]

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _fill(cache, n, layers=2, hkv=2, dh=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    for layer in range(layers):
        k = torch.randn(1, n, hkv, dh, generator=g)
        cache.update(layer, k, 0.5 * k + 1, torch.arange(n)[None])


@pytest.fixture(scope="module", autouse=True)
def fast_path():
    if not has_fast_path(torch.zeros(1)):
        pytest.fail(
            "the CPU decode kernel did not build: is a C++ compiler installed? (see kernels/decode_attention/cpu.py)"
        )


def test_decode_view_attends_the_codes_and_equals_its_tensors():
    cache = make_cache(KVQuantConfig(("K8V4", "K2V2"), mode="kivi", group=8, residual=5), 2, "packed")
    _fill(cache, 37)
    k = torch.randn(1, 1, 2, 16)
    view = cache.update(1, k, k, torch.tensor([[37]]))
    q, q_pos = torch.randn(1, 1, 4, 16), torch.tensor([[37]])
    out = view.fused_attend(q, q_pos)
    assert not view.materialized  # attended from the codes
    torch.testing.assert_close(out, dense_attention(q, view.k, view.v, q_pos, view.pos), rtol=1e-5, atol=1e-6)
    assert view.fused_attend(torch.randn(1, 2, 4, 16), torch.tensor([[36, 37]])) is None  # prefill reads tensors


def test_batch_of_packed_and_full_rows_attends_row_by_row():
    qc = KVQuantConfig(("K4V2", "KV4"), mode="kivi", group=8, residual=5)
    caches = [make_cache(qc, 2, "packed"), DynamicCache(2), make_cache(qc, 2, "packed")]
    for i, (c, n) in enumerate(zip(caches, (41, 19, 26))):
        _fill(c, n, seed=i)
    pos = torch.tensor([[41], [19], [26]])
    k = torch.randn(3, 1, 2, 16)
    view = BatchCache(caches).update(0, k, k, pos)
    q = torch.randn(3, 1, 4, 16)
    out = view.fused_attend(q, pos)
    assert not any(getattr(v, "materialized", False) for v in view.views)  # nothing stacked or dequantized
    torch.testing.assert_close(out, dense_attention(q, view.k, view.v, pos, view.pos), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_hf_decode_through_the_codes_equals_the_fake_quantized_model(llama_3l):
    """The HF bridge: decode steps of a packed cache attend the codes (no view dequantized) and give the
    logits of the fake-quantized cache, which holds the same values as tensors."""
    model = load_hf(f"hf:{llama_3l}")
    qc = KVQuantConfig(("K8V4", "KV2", "K4V2"), group=8, residual=8)
    ids = torch.randint(0, 256, (1, PROMPT + NEW), generator=torch.Generator().manual_seed(5))
    logits = {}
    for kind in ("fake", "packed"):
        cache = Recording(make_cache(qc, 3, kind))
        steps = [model(ids[:, :PROMPT], cache=cache).logits[:, -1]]
        decode_views = len(cache.views)
        steps += [model(ids[:, t : t + 1], cache=cache).logits[:, -1] for t in range(PROMPT, PROMPT + NEW)]
        logits[kind] = torch.stack(steps, 1)
        if kind == "packed":
            lazy = [v for v in cache.views[decode_views:] if hasattr(v, "fused_attend")]
            assert len(lazy) == 3 * NEW and not any(v.materialized for v in lazy)
    torch.testing.assert_close(logits["packed"], logits["fake"], rtol=0, atol=1e-5)
