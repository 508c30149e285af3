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
from workers.caches.precision import KVQuantConfig
from workers.kvtuner import artifact
from workers.model.hf.address import load_hf
from workers.model.hf.calibrated_cache import CalibratedCache

PROMPT, NEW = 40, 8


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return tiny_llama_dir("served_offline_llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3)


@pytest.fixture(scope="module")
def precision_file(tmp_path_factory):
    qc = KVQuantConfig(("K8V4", "KV2", "K4V2"), group=8, residual=8)
    return artifact.write_map(tmp_path_factory.mktemp("kvp") / artifact.FILE_NAME, qc, budget=3.0)


def _offline(path, ids: torch.Tensor, source: str, prefill: str) -> tuple[list[int], list[float]]:
    """Plain transformers greedy generate with the calibrated cache -> (tokens, their logprobs)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    model.generation_config.eos_token_id = None  # the engine below is given no stop ids either
    cache = CalibratedCache.from_kv_precision(source, model, budget=3.0, prefill=prefill)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    toks = out.sequences[0, ids.shape[1] :].tolist()
    lps = [float(torch.log_softmax(lg[0].float(), -1)[t]) for lg, t in zip(out.logits, toks)]
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
def test_served_logprobs_equal_generate_with_the_calibrated_cache(llama, precision_file, prefill):
    ids = torch.randint(1, 256, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    off_toks, off_lps = _offline(llama, ids, str(precision_file), prefill)
    srv_toks, srv_lps = _served(llama, ids, str(precision_file), prefill)
    assert srv_toks == off_toks
    torch.testing.assert_close(torch.tensor(srv_lps), torch.tensor(off_lps), rtol=0, atol=1e-4)


def test_the_regime_is_on_the_served_path(llama, precision_file):
    ids = torch.randint(1, 256, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    _, full = _served(llama, ids, str(precision_file), "full")
    _, quant = _served(llama, ids, str(precision_file), "quantized")
    assert abs(full[0] - quant[0]) > 1e-4  # the first token comes from the prefill itself
