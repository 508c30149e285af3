"""Hugging Face causal LMs (`hf:<local path>`) behind the same forward/cache API as `CalibLM`.

    model = load_hf("hf:/path/to/llama")            # Llama, Qwen2, Mistral families
    out = model(tokens, positions=pos, cache=cache)   # cache: any workers.caches.protocol protocol

Shape legend: B batch, T new tokens, S attended keys, H query heads, Hkv key/value heads, Dh head dim.

How it plugs in, through transformers' own interfaces (no model code is copied):
1. `BridgeCache` is a `transformers.Cache` whose layers forward `update(k, v)` to our cache
   protocol (`update(layer, k [B,T,Hkv,Dh], v, pos [B,T]) -> KVView`); the model therefore
   attends to exactly what our cache returns (quantized, evicted, ...).
2. The model runs with `attn_implementation="calibray"`, an attention function registered
   with `AttentionInterface` that masks by true positions (key pos > query pos, or empty
   slot pos < 0) instead of by index, so caches that drop tokens stay causal, and that calls
   the optional `observer(layer, q, k, q_pos, k_pos)` hook like `CalibLM` does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from workers.model.hf import ATTN_IMPL, SUPPORTED_TYPES, HFModelError


def is_hf_address(address: str | Path) -> bool:
    return str(address).startswith("hf:")


def load_hf(address: str | Path, device: str | torch.device = "cpu", dtype=torch.float32) -> nn.Module:
    """`hf:<dir>` (or a plain directory with an HF config.json) -> HFCausalLM in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from workers.model.hf.bridge import HFCausalLM

    path = Path(str(address)[3:] if is_hf_address(address) else str(address)).expanduser()
    if not (path / "config.json").is_file():
        raise HFModelError(f"model={str(address)!r}: no config.json in {path}")
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    if cfg.model_type not in SUPPORTED_TYPES:
        raise HFModelError(f"model={str(address)!r}: model_type {cfg.model_type!r} not in {SUPPORTED_TYPES}")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTN_IMPL, local_files_only=True)
    return HFCausalLM(hf.to(device))


def load_any(address: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """`hf:<dir>` -> HFCausalLM; `runs:/<id>/model` or a checkpoint directory -> CalibLM."""
    if is_hf_address(address):
        return load_hf(address, device)
    from workers.model.checkpoint import load

    return load(address, device)


def model_shape(address: str) -> tuple[int, int, int]:
    """(n_layers, head_dim, n_kv_heads) read from the model's config only; clear error if missing."""
    if is_hf_address(address):
        from transformers import AutoConfig

        path = Path(str(address)[3:]).expanduser()
        if not (path / "config.json").is_file():
            raise HFModelError(f"model={address!r}: no config.json in {path}")
        c = AutoConfig.from_pretrained(path, local_files_only=True)
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_hidden_layers, hd, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    from workers.model.checkpoint import load_config

    c = load_config(address)
    return c.n_layers, c.head_dim, c.n_kv_heads
