"""The model family: causality, sparse == dense at k >= L, S layers skip the indexer, bad configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers.caches.protocol import DynamicCache
from workers.model.config import ConfigError, IndexerConfig, ModelConfig, MoEConfig
from workers.model.presets import tiny
from workers.model.transformer import CalibLM


def _model(cfg=None, seed=0) -> CalibLM:
    torch.manual_seed(seed)
    return CalibLM(cfg or tiny()).eval()


@pytest.mark.parametrize("attn", ["dense", "sparse", "random"])
def test_changing_a_future_token_changes_no_earlier_logit(attn):
    m = _model()
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 30] = (y[:, 30] + 7) % 256
    a, b = m(x, attn=attn).logits, m(y, attn=attn).logits
    assert torch.equal(a[:, :30], b[:, :30])
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_sparse_attention_equals_dense_when_k_covers_the_sequence():
    cfg = tiny()
    cfg = cfg.replace(indexer=dataclasses.replace(cfg.indexer, topk=64))
    m = _model(cfg)
    x = torch.randint(0, 256, (2, 64))
    torch.testing.assert_close(m(x, attn="sparse").logits, m(x, attn="dense").logits, atol=1e-5, rtol=1e-5)
    small = _model(tiny())  # k=8 < L: sparse really is sparse
    assert not torch.allclose(small(x, attn="sparse").logits, small(x, attn="dense").logits, atol=1e-3)


def test_s_layers_make_no_indexer_call_and_reuse_the_previous_f_indices():
    m = _model()
    x = torch.randint(0, 256, (1, 40))
    seen = {}

    def spy(layer):
        original = m.layers[layer].attn.forward

        def wrapped(h, ctx, is_full, index_buffer):
            out = original(h, ctx, is_full, index_buffer)
            seen[layer] = (index_buffer, out[1])
            return out

        m.layers[layer].attn.forward = wrapped

    for i in range(4):
        spy(i)
    before = m.indexer_calls()
    m(x, pattern="FSSF")
    calls = [a - b for a, b in zip(m.indexer_calls(), before)]
    assert calls == [1, 0, 0, 1]
    f_out = seen[0][1]
    assert torch.equal(seen[1][0], f_out) and torch.equal(seen[1][1], f_out)  # S: input buffer = F's output
    assert torch.equal(seen[2][1], f_out)
    assert not torch.equal(seen[3][1], f_out)  # the next F layer chooses its own


def test_incremental_decoding_with_cache_matches_full_forward():
    m = _model()
    x = torch.randint(0, 256, (2, 40))
    cache = DynamicCache(m.cfg.n_layers)
    parts = [m(x[:, :25], cache=cache).logits]
    for t in range(25, 40):
        parts.append(m(x[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), m(x).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: IndexerConfig(topk=0), "indexer.topk=0"),
        (lambda: tiny().replace(pattern="FSF"), "pattern='FSF'"),
        (lambda: tiny().replace(pattern="SFFF"), "pattern='SFFF'"),
        (lambda: tiny().replace(pattern="FXFF"), "pattern='FXFF'"),
        (lambda: ModelConfig(d_model=64, n_heads=5), "n_heads=5"),
        (lambda: ModelConfig(n_heads=4, n_kv_heads=3), "n_kv_heads=3"),
        (lambda: MoEConfig(n_experts=4, top_k=5), "moe.top_k=5"),
        (lambda: ModelConfig(pattern="FF", n_layers=2), "needs a model with an indexer"),
    ],
)
def test_bad_config_value_raises_an_error_naming_it(build, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_bad_pattern_at_forward_time_is_rejected_before_work():
    m = _model()
    with pytest.raises(ConfigError, match="pattern='FFS'"):
        m(torch.zeros(1, 8, dtype=torch.long), pattern="FFS")
