"""Served and offline numbers agree: the serving engine with a kv_precision.json gives the token
logprobs that a user's own transformers `generate` gives with `CalibratedCache` from the same file."""

from __future__ import annotations

import asyncio

import pytest
import torch

from serve.caches import cache_factory
from serve.calibration import resolve
from serve.config import ServeArgs
from serve.engine import Engine, EngineConfig, GenRequest
from serve.sampling import SamplingParams
from tests.hf_generate import greedy, plain_model
from workers.model.hf.address import load_hf
from workers.model.hf.calibrated_cache import CalibratedCache

PROMPT, NEW = 40, 8


def _offline(path, ids: torch.Tensor, source: str, prefill: str) -> tuple[list[int], list[float]]:
    """Plain transformers greedy generate with the calibrated cache -> (tokens, their logprobs)."""
    model = plain_model(path)
    model.generation_config.eos_token_id = None  # the engine below is given no stop ids either
    cache = CalibratedCache.from_kv_precision(source, model, budget=3.0, prefill=prefill)
    seq, logits = greedy(model, ids, NEW, cache)
    toks = seq[0, ids.shape[1] :].tolist()
    lps = [float(torch.log_softmax(lg.float(), -1)[t]) for lg, t in zip(logits[0], toks)]
    return toks, lps


def _served(path, ids: torch.Tensor, source: str, prefill: str) -> tuple[list[int], list[float]]:
    """The serving engine with the deployment's calibration resolved from the same file."""
    args = ServeArgs(model=f"hf:{path}", kv_precision=source, kv_budget=3.0, kv_prefill=prefill)
    model = load_hf(f"hf:{path}")
    cal = resolve(args, model.cfg.n_layers)
    engine = Engine(model, cache_factory(model.cfg, cal), lambda t: b"x", EngineConfig(max_context=128))
    req = GenRequest(ids[0].tolist(), NEW, SamplingParams(temperature=0.0, logprobs=1))
    events: list[dict] = []

    async def go():
        async for ev in engine.generate(req):
            events.append(ev)

    asyncio.run(go())
    tokens = [ev for ev in events if ev["type"] == "token" and ev["token"] is not None]
    return [ev["token"] for ev in tokens], [ev["logprob"] for ev in tokens]


@pytest.mark.parametrize("prefill", ["full", "quantized"])
def test_served_logprobs_equal_generate_with_the_calibrated_cache(llama_3l, kv_precision_3l, prefill):
    ids = torch.randint(1, 256, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    off_toks, off_lps = _offline(llama_3l, ids, str(kv_precision_3l), prefill)
    srv_toks, srv_lps = _served(llama_3l, ids, str(kv_precision_3l), prefill)
    assert srv_toks == off_toks
    torch.testing.assert_close(torch.tensor(srv_lps), torch.tensor(off_lps), rtol=0, atol=1e-4)


def test_the_regime_is_on_the_served_path(llama_3l, kv_precision_3l):
    ids = torch.randint(1, 256, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    _, full = _served(llama_3l, ids, str(kv_precision_3l), "full")
    _, quant = _served(llama_3l, ids, str(kv_precision_3l), "quantized")
    assert abs(full[0] - quant[0]) > 1e-4  # the first token comes from the prefill itself
