"""Fixtures for the serving tests: a tiny checkpoint and calibrated-config files.

The tiny preset (DSA indexer, MoE FFN, 4 layers) is trained for a few steps so its outputs are
not uniform noise; it is saved once per session as a real checkpoint directory.
"""

from __future__ import annotations

import json

import pytest
import torch

from workers.model import checkpoint
from workers.model.presets import tiny
from workers.model.transformer import CalibLM, lm_loss

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Ray Serve replicas answer completions; calibrated caches keep fewer bytes. "
) * 8


def _train_tiny(steps: int = 12) -> CalibLM:
    torch.manual_seed(0)
    model = CalibLM(tiny())
    data = torch.tensor(list(TEXT.encode()), dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 49, (4,), generator=g)
        batch = torch.stack([data[s : s + 48] for s in starts])
        loss = lm_loss(model(batch, attn="dense").logits, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model() -> CalibLM:
    return _train_tiny()


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_model, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("serve_ckpt") / "tiny"
    checkpoint.save(tiny_model, d)
    return str(d)


@pytest.fixture(scope="session")
def calib_files(tmp_path_factory) -> dict[str, str]:
    """kv_precision.json / prefixkv.json / indexcache.json in the helpers' formats, for 4 layers."""
    d = tmp_path_factory.mktemp("serve_calib")
    kv = {
        "method": "kvtuner",
        "mode": "kivi",
        "group_size": 8,
        "residual": 8,
        "layers": [{"layer": i, "k_bits": k, "v_bits": v} for i, (k, v) in enumerate([(8, 4), (4, 2), (4, 4), (2, 2)])],
    }
    pkv = {
        "version": 1,
        "model": "tiny",
        "n_layers": 4,
        "n_sink": 2,
        "context": 64,
        "samples": 4,
        "ratios": [0.25, 0.5],
        "default_score": "sum",
        "window": 16,
        "scores": {"sum": {"fractions": [[0.2, 0.3, 0.25, 0.25], [0.4, 0.6, 0.5, 0.5]]}},
    }
    ic = {
        "n_layers": 4,
        "patterns": {
            "0.5": {"retention": 0.5, "searched": {"pattern": "FSFS"}, "uniform": {"pattern": "FSFS"}},
            "0.25": {"retention": 0.25, "searched": {"pattern": "FSSS"}, "uniform": {"pattern": "FSSS"}},
        },
    }
    out = {}
    for name, body in (("kv_precision", kv), ("prefixkv", pkv), ("indexcache", ic)):
        p = d / f"{name}.json"
        p.write_text(json.dumps(body))
        out[name] = str(p)
    return out
