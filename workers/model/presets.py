"""Named model configurations. Each is a function returning a full, validated ModelConfig."""

from __future__ import annotations

from collections.abc import Callable

from workers.model.config import ConfigError, IndexerConfig, ModelConfig, MoEConfig, RouterConfig


def tiny() -> ModelConfig:
    """Seconds to train; for tests. 4 layers so IndexCache has real choices; GQA 2:1."""
    return ModelConfig(
        n_layers=4,
        d_model=32,
        n_heads=2,
        n_kv_heads=1,
        ffn_hidden=64,
        max_seq_len=128,
        indexer=IndexerConfig(n_heads=2, head_dim=16, rope_dim=8, topk=8),
        moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32, shared_expert=False),
    )


def demo() -> ModelConfig:
    """The demo DSA-MoE model: 12 layers (IndexCache needs choices), k/L = 1/8 at L=256."""
    return ModelConfig(
        n_layers=12,
        d_model=96,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=256,
        max_seq_len=256,
        indexer=IndexerConfig(n_heads=4, head_dim=16, rope_dim=8, topk=32),
        moe=MoEConfig(
            n_experts=8,
            top_k=2,
            expert_hidden=96,
            shared_expert=False,
            router=RouterConfig(strategy="bip", bip_iters=4, bip_mode="pre"),
        ),
    )


def dense() -> ModelConfig:
    """Plain Llama-shaped text model (exports to LlamaForCausalLM)."""
    return ModelConfig(n_layers=6, d_model=96, n_heads=4, n_kv_heads=2, ffn_hidden=256, max_seq_len=256)


def retrieval() -> ModelConfig:
    """The retrieval testbed: small, dense, Llama-shaped, where the KV cache demonstrably matters."""
    return ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, ffn_hidden=172, max_seq_len=256)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "demo": demo,
    "dense": dense,
    "retrieval": retrieval,
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r}: one of {sorted(PRESETS)}")
    return PRESETS[name]()
