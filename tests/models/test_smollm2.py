"""The shipped real model: SmolLM2-135M-Instruct through the project's wrapper, checked against plain transformers."""

from __future__ import annotations

import torch

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


def test_smollm2_nll_equals_plain_transformers(smollm2_dir):
    from transformers import LlamaForCausalLM

    text = (smollm2_dir / "chat_template.jinja").read_text() + torch.__doc__ * 4
    tok = load_tokenizer("smollm2-135m")
    ids = torch.tensor(tok.encode(text)[: 2 * 128]).view(2, 128)
    ours = load_any("smollm2-135m")
    ref = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        lp = torch.log_softmax(ours(ids).logits[:, :-1].float(), -1)
        nll = -lp.gather(-1, ids[:, 1:, None]).mean()
        ref_nll = ref(ids, labels=ids).loss
    assert abs(float(nll) - float(ref_nll)) <= 1e-4
