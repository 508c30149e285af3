"""Checkpoints round-trip bit-identically; the dense preset exports to a HF LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from workers.model import checkpoint
from workers.model.presets import dense
from workers.model.transformer import CalibLM


def test_checkpoint_round_trip_is_bit_identical(tiny_trained, tmp_path):
    _, model, _ = tiny_trained
    checkpoint.save(model, tmp_path / "m")
    loaded = checkpoint.load(tmp_path / "m")
    assert loaded.cfg == model.cfg
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    x = torch.randint(0, 256, (2, 32))
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="missing config.json"):
        checkpoint.load(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="runs:/nonexistent/model"):
        checkpoint.load("runs:/nonexistent/model")


def test_exported_hf_llama_gives_the_same_logits(tiny_dense_trained, tmp_path):
    from transformers import LlamaForCausalLM

    from workers.model.hf.export import export_llama

    _, model, _ = tiny_dense_trained
    export_llama(model, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 256, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    big = CalibLM(dense()).eval()  # GQA preset too
    export_llama(big, tmp_path / "hf2")
    hf2 = LlamaForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf2(x).logits, big(x).logits, atol=1e-5, rtol=1e-5)


def test_export_refuses_non_llama_configs(tiny_trained, tmp_path):
    from workers.model.config import ConfigError
    from workers.model.hf.export import export_llama

    with pytest.raises(ConfigError, match="only dense Llama-shaped"):
        export_llama(tiny_trained[1], tmp_path / "x")
