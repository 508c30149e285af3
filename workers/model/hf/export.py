"""Export a dense Llama-shaped CalibLM to a Hugging Face ``LlamaForCausalLM`` directory.

The layouts already match (rotate-half RoPE, RMSNorm with fp32 statistics, SwiGLU,
bias-free projections), so export is a rename of the state dict; the exported model gives
the same logits. The byte tokenizer is written beside it as Hugging Face tokenizer files, so the
export is a normal checkpoint that transformers, kvpress or vLLM load with its tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workers.data.tokenizer import ByteTokenizer
from workers.model.config import ConfigError
from workers.model.transformer import CalibLM


def to_llama_config(model: CalibLM):
    from transformers import LlamaConfig

    cfg = model.cfg
    if not cfg.is_dense_llama:
        raise ConfigError("export: only dense Llama-shaped configs (no indexer, no MoE) export to LlamaForCausalLM")
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def llama_state_dict(model: CalibLM) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": model.embed_tokens.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, blk in enumerate(model.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = blk.input_norm.weight
        sd[p + "post_attention_layernorm.weight"] = blk.post_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = getattr(blk.attn, name).weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{name}.weight"] = getattr(blk.ffn, name).weight
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def export_llama(model: CalibLM, directory: str | Path) -> Path:
    """Write a ``LlamaForCausalLM`` checkpoint and its tokenizer, loadable with ``from_pretrained(directory)``."""
    from transformers import LlamaForCausalLM

    d = Path(directory)
    hf = LlamaForCausalLM(to_llama_config(model))
    missing, unexpected = hf.load_state_dict(llama_state_dict(model), strict=False)
    # rotary inv_freq buffers are recomputed by transformers; nothing else may be missing.
    bad = [k for k in missing if "rotary" not in k] + list(unexpected)
    if bad:
        raise RuntimeError(f"export: state dict mismatch {bad}")
    hf.save_pretrained(d)
    ByteTokenizer().save_pretrained(d)
    return d
