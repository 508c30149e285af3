"""Every supported HF family through HFCausalLM: tiny random configs saved with save_pretrained.

Each family's logits through the bridge (prefill, then token-by-token decode) equal plain
transformers'; every cache in its identity setting gives the same logits; each risky feature
(sliding windows, NoPE layers, q/k norms) is shown to matter on the test config, so ignoring it
would break the equality; MLA and unknown types are refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from workers.caches.composed import FULL_BITS, ComposedCache, ComposedSpec
from workers.caches.evicting import EvictingCache
from workers.caches.precision import KVQuantConfig
from workers.caches.protocol import DynamicCache
from workers.caches.quantized import make_cache
from workers.caches.scoring import ScoreConfig
from workers.eval import heldout_nll
from workers.model.hf import SUPPORTED_TYPES, HFModelError
from workers.model.hf.address import load_hf

V, T, PREFILL = 512, 24, 20
COMMON = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,  # sharp attention, so a masking or norm mistake moves the logits
)
MOE = dict(num_experts_per_tok=2, num_experts=4)
FAMILIES = {
    "llama": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),  # layer 1 windowed only
    "qwen3": dict(head_dim=32),  # head_dim != hidden / heads
    "mistral": dict(sliding_window=6),
    "smollm3": dict(no_rope_layers=[1, 0]),  # layer 1 is NoPE
    "qwen3_moe": dict(MOE, moe_intermediate_size=64),
    "mixtral": dict(MOE),
    "olmoe": dict(MOE, clip_qkv=2.0),
}


def _build(kind: str, **changes) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(kind, **{**COMMON, **FAMILIES[kind], **changes})
    return AutoModelForCausalLM.from_config(cfg).eval()


def _variant(ref: nn.Module, kind: str, **changes) -> nn.Module:
    """The same weights under a config with `changes` (the feature switched off)."""
    model = _build(kind, **changes)
    model.load_state_dict(ref.state_dict())
    return model


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, tokens):
    """(kind, plain transformers model, HFCausalLM loaded from its save_pretrained folder, reference logits)."""
    kind = request.param
    torch.manual_seed(0)
    ref = _build(kind)
    path = tmp_path_factory.mktemp(kind)
    ref.save_pretrained(path)
    with torch.no_grad():
        logits = ref(tokens).logits
    return kind, ref, load_hf(f"hf:{path}"), logits


def _run(model, tokens, cache, observer=None) -> torch.Tensor:
    """Prefill PREFILL tokens, then decode the rest one at a time -> logits [B, T, V]."""
    with torch.no_grad():
        parts = [model(tokens[:, :PREFILL], cache=cache, observer=observer).logits]
        for t in range(PREFILL, tokens.shape[1]):
            parts.append(model(tokens[:, t : t + 1], cache=cache, observer=observer).logits)
    return torch.cat(parts, 1)


def test_families_are_the_supported_types():
    assert set(FAMILIES) == set(SUPPORTED_TYPES)


def test_bridge_matches_transformers(family, tokens):
    kind, ref, model, logits = family
    attn = ref.model.layers[0].self_attn
    assert model.cfg.model_type == kind and model.cfg.n_layers == 2 and model.cfg.n_kv_heads == 2
    assert model.cfg.head_dim * model.cfg.n_kv_heads == attn.k_proj.out_features
    assert logits.abs().max() > 1  # a random model with real logits, so atol 1e-4 means something
    torch.testing.assert_close(_run(model, tokens, DynamicCache(2)), logits, rtol=0, atol=1e-4)
    with torch.no_grad():  # the project's held-out NLL is transformers' loss on the same windows
        assert abs(heldout_nll(model, tokens).nats - float(ref(tokens, labels=tokens).loss)) <= 1e-4


def test_identity_caches_match_full(family, tokens):
    _, _, model, _ = family
    full = _run(model, tokens, DynamicCache(2))
    n = model.cfg.n_layers
    passthrough = KVQuantConfig.uniform("KV2", n, group=8, residual=2 * T)  # every token stays in the window
    for kind in ("fake", "packed"):
        torch.testing.assert_close(_run(model, tokens, make_cache(passthrough, n, kind)), full, rtol=0, atol=1e-5)
    keep_all = EvictingCache.build(n, [1.0] * n, ratio=1.0, n_sink=2, score=ScoreConfig("window", window=4))
    torch.testing.assert_close(_run(model, tokens, keep_all, keep_all.observe), full, rtol=0, atol=1e-5)
    bits = (FULL_BITS,) * n
    composed = ComposedCache(ComposedSpec(n, bits, bits, group=8, residual=0, fractions=(1.0,) * n))
    torch.testing.assert_close(_run(model, tokens, composed, composed.observe), full, rtol=0, atol=1e-5)
    # the cache is on the path: 2-bit keys/values with no full-precision window move the logits
    kv2 = make_cache(KVQuantConfig.uniform("KV2", n, group=8, residual=0), n)
    assert (_run(model, tokens, kv2) - full).abs().max() > 1e-2


def _no_qk_norm(ref: nn.Module, kind: str) -> nn.Module:
    model = copy.deepcopy(ref)
    for layer in model.model.layers:
        layer.self_attn.q_norm = nn.Identity()
        layer.self_attn.k_norm = nn.Identity()
    return model


SWITCHED_OFF = {
    "mistral sliding window": ("mistral", lambda ref, k: _variant(ref, k, sliding_window=None)),
    "qwen2 sliding window": ("qwen2", lambda ref, k: _variant(ref, k, use_sliding_window=False)),
    # the window on every layer, not only those past max_window_layers
    "qwen2 per-layer window": ("qwen2", lambda ref, k: _variant(ref, k, max_window_layers=0)),
    "smollm3 NoPE layer": ("smollm3", lambda ref, k: _variant(ref, k, no_rope_layers=[1, 1])),
    "qwen3 q/k norms": ("qwen3", _no_qk_norm),
    "qwen3_moe q/k norms": ("qwen3_moe", _no_qk_norm),
    "olmoe q/k norms": ("olmoe", _no_qk_norm),
}


@pytest.mark.parametrize("family, feature", [(k, f) for f, (k, _) in SWITCHED_OFF.items()], indirect=["family"])
def test_risky_feature_matters(family, feature, tokens):
    """The bridge equals transformers with the feature on; switched off, the logits change."""
    kind, ref, model, logits = family
    make_off = SWITCHED_OFF[feature][1]
    with torch.no_grad():
        off = make_off(ref, kind)(tokens).logits
    assert (off - logits).abs().max() > 1e-2
    assert (_run(model, tokens, DynamicCache(2)) - logits).abs().max() < 1e-4


@pytest.mark.parametrize(
    "kind, extra", [("deepseek_v3", {}), ("deepseek_v32", {}), ("glm_moe_dsa", {}), ("minicpm3", {})]
)
def test_mla_is_refused(kind, extra, tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model(kind, **extra).save_pretrained(tmp_path)
    msg = f"KV-cache methods need per-head K/V; {kind} caches compressed latents (MLA)"
    with pytest.raises(HFModelError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load_hf(f"hf:{tmp_path}")


def test_missing_or_unsupported_model_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from workers.model.hf.bridge import HFCausalLM

    with pytest.raises(HFModelError, match="config.json"):
        load_hf(f"hf:{tmp_path / 'missing'}")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256))
    gpt2.save_pretrained(tmp_path)
    for build in (lambda: load_hf(f"hf:{tmp_path}"), lambda: HFCausalLM(gpt2)):
        with pytest.raises(HFModelError, match="'gpt2' is not supported; use one of llama, qwen2, .*olmoe"):
            build()
