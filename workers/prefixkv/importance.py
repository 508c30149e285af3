"""Per-layer token importance from one prefill, through the model's observer hook.

    imp = collect_importance(model, tokens, ScoreConfig("sum"))    # [L, B, N] float64

Works for any model with `forward(tokens, *, observer=...)` that calls
`observer(layer, q [B,T,H,Dh], k [B,S,Hkv,Dh], q_pos [B,T], k_pos [B,S])` before attending:
`CalibLM` and `workers.hf_adapter.HFCausalLM`. The attention map itself is never stored: the
kernel `attention_received` reduces it in query chunks to one number per key.
"""

from __future__ import annotations

import torch

from workers.caches import scorers
from workers.caches.scoring import ScoreConfig, received


class ImportanceCollector:
    """Observer that records, per layer, the attention each prompt token receives: [B, N]."""

    def __init__(self, n_layers: int, score: ScoreConfig) -> None:
        if not score.uses_attention:
            raise ValueError(
                f"importance needs an attention score mode, one of {scorers.names(attention=True)}, got {score.mode!r}"
            )
        self.n_layers, self.score = n_layers, score
        self.per_layer: list[torch.Tensor | None] = [None] * n_layers

    def __call__(self, layer, q, k, q_pos, k_pos) -> None:
        if self.per_layer[layer] is not None:
            raise RuntimeError(f"layer {layer} observed twice; collect importance from a single prefill")
        self.per_layer[layer] = received(self.score, q, k, q_pos, k_pos).double().cpu()

    def result(self) -> torch.Tensor:
        """[L, B, N] float64 importance in original token order."""
        missing = [i for i, t in enumerate(self.per_layer) if t is None]
        if missing:
            raise RuntimeError(f"layers {missing} were never observed; does the model call its observer?")
        return torch.stack(self.per_layer)


@torch.no_grad()
def collect_importance(model, tokens: torch.Tensor, score: ScoreConfig, n_layers: int | None = None):
    """tokens [B, N] -> importance [L, B, N] float64 from one cache-less prefill."""
    if tokens.dim() != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be [B, N] with N >= 1, got shape {tuple(tokens.shape)}")
    n_layers = n_layers or model.cfg.n_layers
    collector = ImportanceCollector(n_layers, score)
    model(tokens, observer=collector)
    return collector.result()
