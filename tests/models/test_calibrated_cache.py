"""A calibrated kv_precision.json applied inside a plain transformers `model.generate`, and the prefill regime."""

from __future__ import annotations

import pytest
import torch

from tests.hf_generate import greedy, plain_model
from workers.caches.precision import KVQuantConfig
from workers.caches.quantized import make_cache
from workers.kvtuner import artifact
from workers.model.hf.address import load_hf
from workers.model.hf.calibrated_cache import CalibratedCache

PROMPT, NEW = 40, 6


def _plain(path):
    return plain_model(path)


def _generate(model, ids, cache=None):
    return greedy(model, ids, NEW, cache)


@torch.no_grad()
def test_generate_with_the_calibrated_cache_equals_the_projects_evaluation(llama_3l, kv_precision_3l):
    ids = torch.randint(0, 256, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    model = _plain(llama_3l)
    cache = CalibratedCache.from_kv_precision(kv_precision_3l, model)
    seq, logits = _generate(model, ids, cache)
    assert cache.proto.nq == [32, 32, 32] and cache.proto.n == [PROMPT + NEW - 1] * 3  # codes are stored
    # the project's own path: the same map and regime through HFCausalLM, fed the generated tokens
    ours = load_hf(f"hf:{llama_3l}")
    proto = make_cache(cache.config, 3, "packed")
    steps = [ours(ids, cache=proto).logits[:, -1]]
    for t in range(PROMPT, PROMPT + NEW - 1):
        steps.append(ours(seq[:, t : t + 1], cache=proto).logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), logits, rtol=0, atol=1e-4)
    # the cache is on the path: full-precision generation scores differently
    _, full = _generate(_plain(llama_3l), ids)
    torch.testing.assert_close(full[:, 0], logits[:, 0], rtol=0, atol=1e-4)  # the prefill attends full precision
    assert (full[:, 1:] - logits[:, 1:]).abs().max() > 1e-3  # decode reads the quantized prompt


@torch.no_grad()
def test_full_precision_prefill_logits_equal_the_full_models_and_the_next_step_differs(llama_3l):
    """prefill="full" (default): prefill logits == full precision exactly; the next step's differ.
    prefill="quantized": the prefill's own logits already move."""
    model = load_hf(f"hf:{llama_3l}")
    ids = torch.randint(0, 256, (2, PROMPT + 1), generator=torch.Generator().manual_seed(4))
    n = model.cfg.n_layers
    full = make_cache(None, n)
    ref_pre = model(ids[:, :PROMPT], cache=full).logits
    ref_next = model(ids[:, PROMPT:], cache=full).logits
    for kind in ("fake", "packed"):
        fp = make_cache(KVQuantConfig.uniform("KV2", n, group=8, residual=8), n, kind)
        assert torch.equal(model(ids[:, :PROMPT], cache=fp).logits, ref_pre)
        assert (model(ids[:, PROMPT:], cache=fp).logits - ref_next).abs().max() > 1e-3
        old = make_cache(KVQuantConfig.uniform("KV2", n, group=8, residual=8, prefill="quantized"), n, kind)
        assert (model(ids[:, :PROMPT], cache=old).logits - ref_pre).abs().max() > 1e-3


def test_a_map_for_another_depth_is_refused(llama_3l, tmp_path):
    qc = KVQuantConfig(("KV4", "KV4"), group=8, residual=8)
    path = artifact.write_map(tmp_path / artifact.FILE_NAME, qc)
    with pytest.raises(ValueError, match="2-layer map for a 3-layer model"):
        CalibratedCache.from_kv_precision(path, _plain(llama_3l))
