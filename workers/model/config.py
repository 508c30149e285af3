"""Typed, validated configuration of the calibray model family.

Every config is a frozen dataclass checked in ``__post_init__``: a bad value raises a
``ConfigError`` that names the field and the value before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from tuning.indexcache import patterns


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}")


ROUTER_STRATEGIES = ("none", "aux_loss", "loss_free", "bip")
BIP_MODES = ("pre", "causal")
BIP_Q_MODES = ("restart", "carry")


@dataclass(frozen=True)
class IndexerConfig:
    """DSA lightning indexer: H_idx heads of size d_idx, one shared key per token."""

    n_heads: int = 4
    head_dim: int = 32
    rope_dim: int = 16  # RoPE on the first rope_dim dims of q_idx/k_idx (non-interleaved)
    topk: int = 32

    def __post_init__(self) -> None:
        _check(self.n_heads >= 1, "indexer.n_heads", self.n_heads, "must be >= 1")
        _check(self.head_dim >= 2, "indexer.head_dim", self.head_dim, "must be >= 2")
        _check(
            0 <= self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0,
            "indexer.rope_dim",
            self.rope_dim,
            f"must be even and in [0, head_dim={self.head_dim}]",
        )
        _check(self.topk >= 1, "indexer.topk", self.topk, "must be >= 1")


@dataclass(frozen=True)
class RouterConfig:
    """Which experts each token goes to. Gate weights always come from the raw scores."""

    strategy: str = "none"
    alpha: float = 0.01  # aux_loss weight
    bias_rate: float = 1e-3  # loss_free update rate u
    bip_iters: int = 4  # BIP inner iterations T
    bip_mode: str = "pre"  # pre: route the batch with the q computed on it; causal: previous step's q
    # carry: the T rounds start from the layer's q of the previous step (the paper's rule, kept in
    # the router's `bip_price` buffer, so checkpoints carry it); restart: from 0 on every batch.
    # carry is the default because it won the issue-20 sweep (docs/MOE.md): lower mean MaxVio at
    # every seed, held-out perplexity within noise
    bip_q_mode: str = "carry"
    score_fn: str = "softmax"

    def __post_init__(self) -> None:
        _check(
            self.strategy in ROUTER_STRATEGIES,
            "router.strategy",
            self.strategy,
            f"one of {ROUTER_STRATEGIES}",
        )
        _check(self.alpha >= 0, "router.alpha", self.alpha, "must be >= 0")
        _check(self.bias_rate > 0, "router.bias_rate", self.bias_rate, "must be > 0")
        _check(self.bip_iters >= 1, "router.bip_iters", self.bip_iters, "must be >= 1")
        _check(self.bip_mode in BIP_MODES, "router.bip_mode", self.bip_mode, f"one of {BIP_MODES}")
        _check(self.bip_q_mode in BIP_Q_MODES, "router.bip_q_mode", self.bip_q_mode, f"one of {BIP_Q_MODES}")
        _check(self.score_fn in ("softmax", "sigmoid"), "router.score_fn", self.score_fn, "softmax or sigmoid")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts FFN: m experts of width expert_hidden, top-K, optional shared expert."""

    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 128
    shared_expert: bool = True
    capacity_factor: float | None = None  # None = dropless
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        _check(self.n_experts >= 2, "moe.n_experts", self.n_experts, "must be >= 2")
        _check(1 <= self.top_k <= self.n_experts, "moe.top_k", self.top_k, f"must be in [1, {self.n_experts}]")
        _check(self.expert_hidden >= 1, "moe.expert_hidden", self.expert_hidden, "must be >= 1")
        _check(
            self.capacity_factor is None or self.capacity_factor > 0,
            "moe.capacity_factor",
            self.capacity_factor,
            "must be None (dropless) or > 0",
        )


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only LM: RMSNorm, RoPE, GQA, SwiGLU; optional DSA indexer and MoE FFN."""

    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_hidden: int = 172
    vocab_size: int = 256
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    indexer: IndexerConfig | None = None
    moe: MoEConfig | None = None
    pattern: str | None = None  # IndexCache F/S per layer; None = all F

    def __post_init__(self) -> None:
        _check(self.n_layers >= 1, "n_layers", self.n_layers, "must be >= 1")
        _check(self.d_model >= 2, "d_model", self.d_model, "must be >= 2")
        _check(self.n_heads >= 1, "n_heads", self.n_heads, "must be >= 1")
        _check(
            self.d_model % self.n_heads == 0,
            "n_heads",
            self.n_heads,
            f"must divide d_model={self.d_model}",
        )
        _check(self.head_dim % 2 == 0, "d_model/n_heads", self.head_dim, "head dim must be even for RoPE")
        _check(
            self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            self.n_kv_heads,
            f"must divide n_heads={self.n_heads}",
        )
        _check(self.ffn_hidden >= 1, "ffn_hidden", self.ffn_hidden, "must be >= 1")
        _check(self.vocab_size >= 2, "vocab_size", self.vocab_size, "must be >= 2")
        _check(self.max_seq_len >= 2, "max_seq_len", self.max_seq_len, "must be >= 2")
        _check(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0")
        if self.pattern is not None:
            validate_pattern(self.pattern, self.n_layers, has_indexer=self.indexer is not None)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_dense_llama(self) -> bool:
        """Llama-shaped (exportable to Hugging Face): no indexer, no MoE."""
        return self.indexer is None and self.moe is None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}")
        if d.get("indexer") is not None:
            d["indexer"] = IndexerConfig(**d["indexer"])
        if d.get("moe") is not None:
            moe = dict(d["moe"])
            moe["router"] = RouterConfig(**moe.get("router", {}))
            d["moe"] = MoEConfig(**moe)
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def flat_params(self) -> dict[str, Any]:
        """Config flattened to dotted keys, for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("model", self.to_dict())
        return out


def validate_pattern(pattern: str, n_layers: int, *, has_indexer: bool = True) -> str:
    """An IndexCache pattern for this model: it needs an indexer, then the one F/S rule
    (tuning.indexcache.patterns.validate_pattern), raised as a ConfigError naming the pattern."""
    _check(has_indexer, "pattern", pattern, "needs a model with an indexer (config.indexer is None)")
    try:
        return patterns.validate_pattern(pattern, n_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
