"""Tiny random transformers MoE checkpoints, one per supported family (tests, CPU demos).

    save_tiny("qwen3_moe", "artifacts/tiny_qwen3_moe")   # config.json + weights + tokenizer files

Each is 2 decoder layers of width 64 with 8 routed experts, top-2, on the 256-byte vocabulary;
the byte tokenizer is written beside it as Hugging Face tokenizer files, so the checkpoint is
tokenized by its own tokenizer like any other `hf:` model. DeepSeek-V3 keeps its risky parts:
sigmoid scores, 4 expert groups of which 2 are kept per token, a shared expert, layer 0 dense,
routed_scaling_factor 2.5, and a non-zero `e_score_correction_bias` (drawn here, as a
pretrained model would carry one).
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    num_experts_per_tok=2,
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
    tie_word_embeddings=False,
)
TINY = {
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=32, head_dim=16, norm_topk_prob=True),
    "olmoe": dict(num_experts=8, intermediate_size=32),
    "mixtral": dict(num_local_experts=8, intermediate_size=32),
    "deepseek_v3": dict(
        n_routed_experts=8,
        moe_intermediate_size=32,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        num_key_value_heads=4,  # MLA: one latent per token, expanded to every head
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    ),
}


def tiny_config(kind: str, **changes):
    """The tiny transformers config of family `kind` (KeyError names the families)."""
    from transformers import AutoConfig

    if kind not in TINY:
        raise KeyError(f"kind={kind!r}: one of {sorted(TINY)}")
    return AutoConfig.for_model(kind, **{**COMMON, **TINY[kind], **changes})


def tiny_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32, **changes):
    """A freshly initialised tiny model (eval mode) of family `kind`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **changes), dtype=dtype)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(0.05 * torch.randn(buf.shape, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def save_tiny(kind: str, directory: str | Path, seed: int = 0, **changes) -> Path:
    """Write a tiny checkpoint of `kind` with the byte tokenizer's files; returns the directory."""
    from workers.data.tokenizer import ByteTokenizer

    out = Path(directory)
    tiny_model(kind, seed, **changes).save_pretrained(out)
    ByteTokenizer().save_pretrained(out)
    return out
