"""Hugging Face causal LMs behind CalibLM's forward/cache API: addresses (`address`), the
transformers bridge (`bridge`), the export of dense CalibLMs (`export`) and the DSA models of
IndexCache (`dsa`).

What every module of the package shares lives here, so none of them imports another's
heavy dependencies (transformers loads only when a bridge is built).
"""

# Families whose attention goes through AttentionInterface with per-head K/V in the standard
# cache; each is tested with a tiny random config in tests/models/test_hf_families.py, its
# risky feature included (sliding windows, NoPE layers, q/k norms, MoE routing).
SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral", "smollm3", "qwen3_moe", "mixtral", "olmoe")
# Multi-head latent attention: the cache holds one compressed latent per token, not per-head K/V,
# so no KV-cache method of this project applies. Any config with `kv_lora_rank` is MLA as well.
MLA_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa")
# MLA models with a DSA lightning indexer per layer: IndexCache runs on them (workers.model.hf.dsa).
DSA_TYPES = ("glm_moe_dsa", "deepseek_v32")
ATTN_IMPL = "calibray"


class HFModelError(ValueError):
    """An `hf:` address that does not hold a supported model."""


def check_model_type(config, address: str | None = None) -> None:
    """Raise HFModelError unless the bridge supports `config` (a transformers config; only attributes read)."""
    where = "" if address is None else f"model={address!r}: "
    kind = config.model_type
    if kind in MLA_TYPES or getattr(config, "kv_lora_rank", None):
        raise HFModelError(f"{where}KV-cache methods need per-head K/V; {kind} caches compressed latents (MLA)")
    if kind not in SUPPORTED_TYPES:
        raise HFModelError(f"{where}model_type {kind!r} is not supported; use one of {', '.join(SUPPORTED_TYPES)}")
