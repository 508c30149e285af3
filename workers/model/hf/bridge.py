"""transformers side of the HF adapter: the Cache bridge, the position-masked attention, `HFCausalLM`.

Imported lazily by `workers.model.hf.address` (importing transformers is slow; CalibLM users never pay it).
Shape legend: B batch, T new tokens, S attended keys, H query heads, Hkv key/value heads, Dh head dim.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from workers.model.hf import ATTN_IMPL, check_model_type

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("calibray_hf_bridge", default=None)


@dataclass(frozen=True)
class HFConfigView:
    """The fields of `ModelConfig` that caches and searches read, taken from an HF config."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    model_type: str
    indexer: None = None


@dataclass
class HFOutput:
    logits: torch.Tensor  # [B, T, V]
    aux_loss: torch.Tensor
    indexer_kl: torch.Tensor
    stats: dict


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """query [B,H,T,Dh], key/value [B,Hkv,S,Dh] -> ([B,T,H,Dh], None), masked by true positions.

    `sliding_window` comes from the calling layer (None on full-attention layers), so models that
    mix window and full layers (qwen2/qwen3 `max_window_layers`, smollm3 `layer_types`) get each
    layer's own rule. A key is visible within the window when q_pos - k_pos < sliding_window, as
    in transformers' masks. `attention_mask` is None: no mask function is registered for
    ATTN_IMPL, so transformers builds none and causality comes from the positions alone.
    """
    bridge = _ACTIVE.get()
    if bridge is None:
        raise RuntimeError("calibray attention called outside HFCausalLM.forward")
    layer = module.layer_idx
    q_pos = bridge.q_pos  # [B, T]
    k_pos = bridge.k_pos[layer]  # [B, S]
    view, bridge.views[layer] = bridge.views[layer], None
    if view is not None:  # BridgeLayer left it unread: attend the codes, else read it as tensors now
        if bridge.observer is None and not sliding_window:
            out = view.fused_attend(query.transpose(1, 2), q_pos, scaling)
            if out is not None:
                return out.to(query.dtype).contiguous(), None
        key, value = view.k.transpose(1, 2), view.v.transpose(1, 2)
    if bridge.observer is not None:
        bridge.observer(layer, query.transpose(1, 2), key.transpose(1, 2), q_pos, k_pos)
    allowed = (k_pos[:, None, None, :] <= q_pos[:, None, :, None]) & (k_pos[:, None, None, :] >= 0)
    if sliding_window:
        allowed &= k_pos[:, None, None, :] > q_pos[:, None, :, None] - sliding_window
    out = F.scaled_dot_product_attention(
        query, key.to(query.dtype), value.to(query.dtype), attn_mask=allowed, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPL, _attention)


class ProtocolLayer(CacheLayerMixin):
    """One transformers cache layer over a calibray cache-protocol object: HF layout [B,Hkv,T,Dh] <->
    protocol layout [B,T,Hkv,Dh]. Subclasses say where the new tokens' positions come from."""

    is_sliding = False
    is_compileable = False

    def __init__(self, proto, layer: int):
        super().__init__()
        self.proto, self.layer = proto, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def write(self, key_states, value_states, pos):
        """Hand the new keys/values [B,Hkv,T,Dh] at positions pos [B,T] to the protocol -> its KVView."""
        return self.proto.update(self.layer, key_states.transpose(1, 2), value_states.transpose(1, 2), pos)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.proto.length(self.layer)

    def get_max_length(self) -> int:
        return -1


class BridgeLayer(ProtocolLayer):
    """A layer of `BridgeCache`: positions are the forward's own, and the attention reads the view's."""

    def __init__(self, owner: BridgeCache, layer: int):
        super().__init__(owner.proto, layer)
        self.owner = owner

    def update(self, key_states, value_states, *args, **kwargs):
        view = self.write(key_states, value_states, self.owner.q_pos)
        self.owner.k_pos[self.layer] = view.pos
        if hasattr(view, "fused_attend"):
            # Not read here: the attention may attend the packed codes without dequantizing them.
            # The model hands these placeholders straight to the attention function, which uses the view.
            self.owner.views[self.layer] = view
            return key_states[:, :, :0], value_states[:, :, :0]
        return view.k.transpose(1, 2), view.v.transpose(1, 2)


class BridgeCache(Cache):
    """transformers `Cache` forwarding every layer update to a calibray cache-protocol object."""

    def __init__(self, proto, n_layers: int, q_pos: torch.Tensor, observer=None):
        self.proto, self.q_pos, self.observer = proto, q_pos, observer
        self.k_pos: list[torch.Tensor | None] = [None] * n_layers
        self.views: list = [None] * n_layers  # views BridgeLayer left for the attention to read
        super().__init__(layers=[BridgeLayer(self, i) for i in range(n_layers)])


class HFCausalLM(nn.Module):
    """A transformers causal LM with `CalibLM`'s `forward(tokens, *, positions, cache, observer)`.

    What the family computes before its attention call (q/k norms, RoPE or none on NoPE layers,
    MoE routing) stays the model's own code; the cache stores keys exactly as the model hands them.
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        c = hf_model.config
        check_model_type(c)
        self.hf = hf_model.eval()
        self.hf.config._attn_implementation = ATTN_IMPL
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.cfg = HFConfigView(
            n_layers=c.num_hidden_layers,
            n_heads=c.num_attention_heads,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim,
            vocab_size=c.vocab_size,
            max_seq_len=getattr(c, "max_position_embeddings", 4096),
            model_type=c.model_type,
        )

    def forward(self, tokens: torch.Tensor, *, positions=None, cache=None, observer=None, **unused) -> HFOutput:
        """tokens [B, T] -> logits [B, T, V]; `cache` follows the workers.caches.protocol protocol."""
        from workers.caches.protocol import DynamicCache

        B, T = tokens.shape
        if positions is None:
            start = 0 if cache is None else cache.length(0)
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        proto = cache if cache is not None else DynamicCache(self.cfg.n_layers)
        bridge = BridgeCache(proto, self.cfg.n_layers, positions, observer)
        token = _ACTIVE.set(bridge)
        try:
            out = self.hf(input_ids=tokens, position_ids=positions, cache=bridge, use_cache=True)
        finally:
            _ACTIVE.reset(token)
        zero = torch.zeros((), device=tokens.device)
        return HFOutput(out.logits.float(), zero, zero, {})
