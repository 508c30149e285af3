"""A transformers `Cache` that applies a calibrated KV precision map inside anyone's `model.generate`.

    from transformers import AutoModelForCausalLM
    from workers.model.hf.calibrated_cache import CalibratedCache

    model = AutoModelForCausalLM.from_pretrained(path)               # the user's own model, any attention
    cache = CalibratedCache.from_kv_precision("runs:/<run_id>/kv_precision.json", model, budget=3.25)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64)

Each layer stores its keys and values in one of the project's quantized caches (packed int codes by
default, `workers.caches.quantized`), with the map's bits, group, residual window and the prefill
regime (default "full": the prompt attends to itself at full precision, what is stored is quantized,
decode reads the quantized cache plus the full-precision window). The model's own attention and
masks run unchanged: a quantized cache holds every token, so positions and mask sizes are the usual ones.

Shape legend: B batch, T new tokens, S cached tokens, Hkv key/value heads, Dh head dim.
Eviction (PrefixKV budgets) is not offered here: an evicting cache holds fewer keys than positions,
which transformers' standard masks cannot express (the project's bridge masks by positions instead).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from workers.caches.precision import KVQuantConfig
from workers.caches.quantized import make_cache
from workers.model.hf.bridge import ProtocolLayer


class _CalibratedLayer(ProtocolLayer):
    """A quantized cache holds every token, so the new tokens' positions follow the ones it holds."""

    def update(self, key_states, value_states, *args, **kwargs):
        B, _, T, _ = key_states.shape
        start = self.proto.length(self.layer)
        view = self.write(
            key_states, value_states, torch.arange(start, start + T, device=key_states.device).expand(B, T)
        )
        return view.k.transpose(1, 2), view.v.transpose(1, 2)


class CalibratedCache(Cache):
    """transformers `Cache` over a quantized project cache; `proto.nbytes()` is what it holds."""

    def __init__(self, config: KVQuantConfig, kind: str = "packed"):
        self.config = config
        self.proto = make_cache(config, config.n_layers, kind)
        super().__init__(layers=[_CalibratedLayer(self.proto, i) for i in range(config.n_layers)])

    @classmethod
    def from_kv_precision(
        cls, source, model=None, *, budget: float | None = None, prefill: str = "full", kind: str = "packed"
    ) -> CalibratedCache:
        """A kv_precision.json (path, directory, run id or runs:/ URI; `budget` picks one map of an
        every-budget file), checked against `model`'s layer count when a model is given."""
        from workers.kvtuner import artifact

        chosen = artifact.load(source).select(budget=budget)
        if model is not None:
            chosen.check_layers(model.config.num_hidden_layers)
        return cls(chosen.config(prefill), kind)

    def nbytes(self) -> int:
        return self.proto.nbytes()
