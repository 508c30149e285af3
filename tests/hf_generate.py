"""Plain transformers greedy generation, the reference the calibrated-cache tests compare against."""

from __future__ import annotations

import torch


def plain_model(path):
    """The checkpoint as transformers loads it (no calibray bridge), fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new: int, cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, P] -> (sequences [B, P + new], logits [B, new, V]); `cache` as past_key_values."""
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),  # explicit: random ids include the pad id 0
        past_key_values=cache,
        max_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences, torch.stack(out.logits, 1)
