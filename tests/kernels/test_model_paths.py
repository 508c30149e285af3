"""The model runs the same on either kernel path: tiny DSA-MoE CalibLM, reference vs forced Triton.

This is the interoperability check (torchtitan's habit): the Triton kernels, run through
Triton's interpreter, slot into the real model (indexer -> top-k -> sparse attention, MoE
dispatch) and give the reference path's logits and parameter gradients.
"""

from __future__ import annotations

import torch

from tests.kernels._util import assert_close
from workers.model.presets import tiny
from workers.model.transformer import CalibLM


def _run(model, tokens):
    model.zero_grad()
    out = model(tokens, attn="sparse", indexer_loss=True)
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
    total = loss + out.indexer_kl if out.indexer_kl is not None else loss
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def test_tiny_model_reference_and_triton_paths_agree(monkeypatch):
    torch.manual_seed(0)
    model = CalibLM(tiny())
    tokens = torch.randint(0, 256, (1, 12))  # > topk=8, so attention is really sparse
    logits_ref, grads_ref = _run(model, tokens)
    monkeypatch.setenv("CALIBRAY_FORCE_TRITON", "1")
    logits_tri, grads_tri = _run(model, tokens)
    assert_close("logits", logits_tri, logits_ref, 1e-5)
    assert grads_tri.keys() == grads_ref.keys()
    for name in grads_ref:
        assert_close(f"grad {name}", grads_tri[name], grads_ref[name], 1e-4)
