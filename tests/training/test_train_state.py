"""The checkpoint layout: written and read back, and checkpoints from before the loops merged still resume."""

from __future__ import annotations

import json

import torch

from workers.model import presets
from workers.model.transformer import CalibLM
from workers.training import train_state
from workers.training.config import tiny
from workers.training.optim import AdamWOptimizer


def _trained_pair(tc):
    torch.manual_seed(0)
    model = CalibLM(tc.model)
    opt = AdamWOptimizer(model, lr=1e-3, weight_decay=0.1, grad_clip=1.0)
    x = torch.randint(0, 256, (2, 16))
    opt.backward(model(x).logits.float().logsumexp(-1).mean())
    opt.step(1e-3)
    return model, opt


def test_round_trip_restores_weights_optimizer_and_history(tmp_path):
    tc = tiny().replace(model=presets.tiny().replace(indexer=None, moe=None), dense_warmup_steps=0)
    model, opt = _trained_pair(tc)
    meta = train_state.meta(tc, 7, 1, [[0.5, 0.25]])
    train_state.write(tmp_path, 0, model_state=model.state_dict(), opt_state=opt.state_dict(), meta=meta)
    fresh = CalibLM(tc.model)
    got = train_state.read(tmp_path, fresh, 0, 1, replicated=True)
    assert got.step == 7 and got.maxvio_history == [[0.5, 0.25]]
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert got.opt_state["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])


def test_checkpoint_with_inline_optimizer_state_resumes_it(tmp_path):
    """Data-parallel checkpoints written before the merge kept AdamW's state inside train_state.pt."""
    tc = tiny().replace(model=presets.tiny().replace(indexer=None, moe=None), dense_warmup_steps=0)
    model, opt = _trained_pair(tc)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": 5}, tmp_path / train_state.STATE_FILE)
    (tmp_path / train_state.META_FILE).write_text(json.dumps({"step": 5, "config": tc.to_dict()}))
    got = train_state.read(tmp_path, CalibLM(tc.model), 0, 1, replicated=True)
    assert got.step == 5 and got.opt_state is not None
    resumed = AdamWOptimizer(CalibLM(tc.model), lr=1e-3, weight_decay=0.1, grad_clip=1.0)
    resumed.load_state_dict(got.opt_state)
    assert resumed.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
