"""PrefixKV on a Hugging Face LlamaForCausalLM (`hf:<dir>`), exported from the trained tiny dense model."""

import pytest
import torch

from workers.caches.scoring import ScoreConfig
from workers.eval import continuation_logits
from workers.model.hf.address import load_hf
from workers.model.hf.export import export_llama
from workers.prefixkv.importance import collect_importance
from workers.prefixkv.methods import Method


@pytest.fixture(scope="module")
def pair(tiny_dense_trained, tmp_path_factory):
    ours = tiny_dense_trained[1].eval()
    d = export_llama(ours, tmp_path_factory.mktemp("hf") / "tiny_llama")
    return ours, load_hf(f"hf:{d}")


@pytest.fixture(scope="module")
def text(corpus):
    g = torch.Generator().manual_seed(3)
    return corpus.sample_windows("heldout", 100, 3, g)


@pytest.mark.parametrize("mode", ["sum", "window"])
def test_hf_importance_equals_ours(pair, text, mode):
    ours, hf = pair
    score = ScoreConfig(mode, window=8, chunk=13)
    a = collect_importance(ours, text, score)
    b = collect_importance(hf, text, score)
    assert a.shape == b.shape == (ours.cfg.n_layers, 3, 100)
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("name, ratio", [("prefixkv", 0.3), ("pyramid", 0.2), ("recency", 0.1), ("uniform", 1.0)])
def test_hf_eviction_matches_ours(pair, text, name, ratio):
    ours, hf = pair
    n_layers = ours.cfg.n_layers
    cal = {0.3: [0.1 + 0.4 * i / max(1, n_layers - 1) for i in range(n_layers)]}
    ctx, cont = text[:, :80], text[:, 80:]
    outs, kept = [], []
    for model in (ours, hf):
        m = Method(name, ratio, n_layers, ScoreConfig("window", window=8), n_sink=2, calibrated=cal)
        outs.append(continuation_logits(model, ctx, cont, **m.forward_kwargs()))
        kept.append([m.cache.positions(i).tolist() for i in range(n_layers)])
    assert kept[0] == kept[1]
    assert torch.allclose(outs[0], outs[1], atol=1e-4)
    if ratio == 1.0:
        full = continuation_logits(hf, ctx, cont, **Method("full", 1.0, n_layers).forward_kwargs())
        assert torch.equal(outs[1], full)
