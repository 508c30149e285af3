"""The shipped real model: SmolLM2-135M-Instruct through the project's wrapper, checked against plain transformers."""

from __future__ import annotations

import math

import pytest
import torch

from workers.data.corpus import load_corpus
from workers.eval import heldout_nll
from workers.model.hf.address import load_any, load_tokenizer


def test_smollm2_answers_through_its_chat_template(smollm2_dir):
    tok = load_tokenizer("smollm2-135m")
    assert tok.vocab_size == 49152 and tok.byte_level
    prompt = tok.hf.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tok.hf.encode(prompt, add_special_tokens=False)])
    model = load_any("smollm2-135m")
    out = []
    with torch.no_grad():
        for _ in range(12):  # greedy, full recompute: 12 short forwards
            nxt = model(torch.cat([ids, torch.tensor([out], dtype=torch.long)], 1)).logits[0, -1].argmax()
            out.append(int(nxt))
    assert "Paris" in tok.decode(out)


def test_smollm2_heldout_nll_and_bits_per_byte_equal_plain_transformers(smollm2_dir):
    """The project's held-out NLL of N token windows of the stdlib corpus is transformers' loss on the
    same windows (|diff| <= 1e-4 nats/token); bits/byte = NLL sum / (ln 2 x bytes of the scored tokens)."""
    from transformers import LlamaForCausalLM

    tok = load_tokenizer("smollm2-135m")
    windows = load_corpus("stdlib").eval_windows("heldout", 128, max_windows=2, tokenizer=tok)  # [2, 128]
    res = heldout_nll(load_any("smollm2-135m"), windows, tokenizer=tok)
    ref = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        ref_nll = float(ref(windows, labels=windows).loss)
    assert abs(res.nats - ref_nll) <= 1e-4
    scored = "".join(tok.decode(w[1:]) for w in windows)
    assert res.n_bytes == len(scored.encode("utf-8"))
    assert res.bpb == pytest.approx(res.nats * res.n_tokens / (math.log(2) * res.n_bytes), rel=1e-12)
    assert 2.5 < res.n_bytes / res.n_tokens < 6  # a BPE over Python source: several bytes per token
