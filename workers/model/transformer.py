"""CalibLM: the decoder-only model family every calibray pipeline shares.

Llama-shaped (RMSNorm, RoPE, GQA, SwiGLU) with two options: a DSA lightning indexer with
top-k sparse attention in every layer (IndexCache F/S patterns honoured in forward), and a
mixture-of-experts FFN with a pluggable router.

Shape legend: B batch, T tokens, D width, V vocab, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.attention import ATTN_MODES, Attention, AttnContext
from workers.model.config import ConfigError, ModelConfig, validate_pattern
from workers.model.layers import RMSNorm, SwiGLU, rope_cos_sin
from workers.model.moe.ffn import MoEFFN


@dataclass
class LMOutput:
    logits: torch.Tensor  # [B, T, V]
    aux_loss: torch.Tensor  # scalar: router auxiliary losses summed over layers
    indexer_kl: torch.Tensor  # scalar: indexer KL averaged over the F layers that computed it
    stats: dict = field(default_factory=dict)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.post_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoEFFN(cfg.d_model, cfg.moe) if cfg.moe else SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, h, ctx: AttnContext, is_full: bool, index_buffer):
        a, index_buffer, kl = self.attn(self.input_norm(h), ctx, is_full, index_buffer)
        h = h + a
        if isinstance(self.ffn, MoEFFN):
            f, aux = self.ffn(self.post_norm(h))
        else:
            f, aux = self.ffn(self.post_norm(h)), None
        return h + f, index_buffer, kl, aux


class CalibLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    # -- settings ---------------------------------------------------------------------------
    def resolve_pattern(self, pattern: str | None) -> str:
        if pattern is None:
            pattern = self.cfg.pattern or "F" * self.cfg.n_layers
            return pattern
        return validate_pattern(pattern, self.cfg.n_layers, has_indexer=self.cfg.indexer is not None)

    def resolve_mode(self, attn: str) -> str:
        if attn not in ATTN_MODES:
            raise ConfigError(f"attn={attn!r}: one of {ATTN_MODES}")
        if attn == "auto":
            return "sparse" if self.cfg.indexer is not None else "dense"
        if attn == "sparse" and self.cfg.indexer is None:
            raise ConfigError("attn='sparse' needs a model with an indexer (config.indexer is None)")
        return attn

    def context(
        self,
        B: int,
        T: int,
        *,
        positions=None,
        device=None,
        cache=None,
        attn="auto",
        observer=None,
        indexer_loss=False,
        random_seed=0,
    ) -> AttnContext:
        """Build the per-forward context. positions [B, T] default to 0..T-1 after the cache's length."""
        device = device or self.embed_tokens.weight.device
        if positions is None:
            start = cache.length(0) if cache is not None else 0
            positions = torch.arange(start, start + T, device=device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        return AttnContext(positions, cos, sin, self.resolve_mode(attn), cache, observer, indexer_loss, random_seed)

    # -- layer-level API (IndexCache prefix reuse) ------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> hidden [B, T, D]."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        return self.embed_tokens(tokens)

    def run_layers(
        self,
        h,
        start: int,
        end: int,
        *,
        ctx: AttnContext,
        pattern: str,
        index_buffer: torch.Tensor | None = None,
        collect=None,
    ):
        """Run layers [start, end) on hidden h [B, T, D]. Returns (h, index_buffer, kls, auxes).

        ``index_buffer`` [B, T, K] holds the top-k *positions* chosen by the last F layer;
        S layers reuse it and never call their indexer. ``collect(layer, h_in, index_buffer_in)``
        is called before each layer (prefix caches hook here).
        """
        kls, auxes = [], []
        for i in range(start, end):
            if collect is not None:
                collect(i, h, index_buffer)
            h, index_buffer, kl, aux = self.layers[i](h, ctx, pattern[i] == "F", index_buffer)
            if kl is not None:
                kls.append(kl)
            if aux is not None:
                auxes.append(aux)
        return h, index_buffer, kls, auxes

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D] -> logits [B, T, V]."""
        return self.lm_head(self.norm(h))

    # -- whole model ------------------------------------------------------------------------
    def forward(
        self,
        tokens,
        *,
        positions=None,
        cache=None,
        pattern=None,
        attn="auto",
        observer=None,
        indexer_loss=False,
        random_seed=0,
    ) -> LMOutput:
        """tokens [B, T] (byte ids) -> LMOutput with logits [B, T, V]."""
        pattern = self.resolve_pattern(pattern)
        B, T = tokens.shape
        ctx = self.context(
            B,
            T,
            positions=positions,
            device=tokens.device,
            cache=cache,
            attn=attn,
            observer=observer,
            indexer_loss=indexer_loss,
            random_seed=random_seed,
        )
        h, _, kls, auxes = self.run_layers(self.embed(tokens), 0, self.cfg.n_layers, ctx=ctx, pattern=pattern)
        zero = h.new_zeros((), dtype=torch.float32)
        return LMOutput(
            logits=self.head(h),
            aux_loss=torch.stack(auxes).sum() if auxes else zero,
            indexer_kl=torch.stack(kls).mean() if kls else zero,
        )

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def indexer_calls(self) -> list[int]:
        return [blk.attn.indexer_calls for blk in self.layers]


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token NLL in nats: logits [B, T, V] predict tokens[:, 1:]; optional weights [B, T-1]."""
    if weights is None:
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")
    return (nll * weights).sum() / weights.sum()
