"""The converted model (`workers.model.hf.lightning`) and its IndexCache adapter, without training or Ray.

The dense model is the trained tiny dense fixture exported to a LlamaForCausalLM folder.
"""

from __future__ import annotations

import pytest
import torch

from workers.dsa.quality import window_nll
from workers.dsa.warmup import eval_kls
from workers.model.config import IndexerConfig
from workers.model.hf import HFModelError
from workers.model.hf.dsa import DSAModel, load_dsa
from workers.model.hf.lightning import add_indexers, attention_mode, attentions, check_convertible, save_converted

ICFG = IndexerConfig(n_heads=2, head_dim=16, rope_dim=8, topk=16)


@pytest.fixture(scope="module")
def dense_dir(tiny_dense_trained, tmp_path_factory):
    from workers.model.hf.export import export_llama

    return export_llama(tiny_dense_trained[1], tmp_path_factory.mktemp("dense_hf"))


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def test_dense_mode_is_the_dense_model_and_sparse_differs(dense_dir):
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    hf = _load(dense_dir)
    with torch.no_grad():
        ref = hf(x).logits
        add_indexers(hf, ICFG)
        with attention_mode(hf, "dense"):
            dense = hf(x).logits
        with attention_mode(hf, "sparse", topk=64):  # k = T keeps every key: sparse == dense
            full = hf(x).logits
        sparse = hf(x).logits
        with attention_mode(hf, "random"):
            rand = hf(x).logits
    assert torch.equal(dense, ref)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    assert (sparse - ref).abs().max() > 1e-3 and (rand - sparse).abs().max() > 1e-3
    with pytest.raises(HFModelError, match="already has lightning indexers"):
        check_convertible(hf.config, "x")


def test_kl_trains_only_the_indexers(dense_dir):
    from workers.dsa.warmup import layer_kls, load_with_indexers

    hf, params = load_with_indexers(str(dense_dir), ICFG, seed=0)
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    kls = layer_kls(hf, x)
    assert kls.shape == (4,) and bool((kls > 0).all())
    kls.mean().backward()
    trained = {id(p) for p in params}
    for name, p in hf.named_parameters():
        assert (p.grad is not None) == (id(p) in trained), name
    assert all(float(p.grad.abs().sum()) > 0 for p in params if p.dim() == 2)


def test_converted_folder_loads_as_a_dsa_model_and_s_layers_skip_their_indexer(dense_dir, tmp_path, corpus):
    from transformers import AutoModelForCausalLM

    hf = _load(dense_dir)
    add_indexers(hf, ICFG, seed=3)
    save_converted(hf, tmp_path / "conv")
    windows = corpus.eval_windows("heldout", 65, 4)
    before = window_nll(hf, windows, "sparse")
    model = load_dsa(f"hf:{tmp_path / 'conv'}")
    assert isinstance(model, DSAModel) and model.cfg.indexer.topk == 16 and model.cfg.n_layers == 4
    with torch.no_grad():
        allf = model(windows[:, :-1], pattern="FFFF").logits
        assert model.indexer_calls() == [1, 1, 1, 1]
        fs = model(windows[:, :-1], pattern="FSFS").logits
        assert model.indexer_calls() == [2, 1, 2, 1]
    from workers.eval import token_nll

    torch.testing.assert_close(token_nll(allf, windows[:, 1:]).double().mean(1), before)
    assert (fs - allf).abs().max() > 1e-4
    # plain transformers still reads the folder as the dense model (indexer weights ignored)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "conv", local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(windows[:, :-1]).logits, _load(dense_dir)(windows[:, :-1]).logits)
    assert eval_kls(hf, windows[:, :-1]).shape == (4,)
    assert len(attentions(hf)) == 4


def test_distillation_of_a_converted_model_trains_only_its_retained_indexers(dense_dir, tmp_path, corpus):
    from workers.indexcache.distill import DistillConfig, distill, multi_layer_kl

    hf = _load(dense_dir)
    add_indexers(hf, ICFG, seed=3)
    save_converted(hf, tmp_path / "conv")
    model = load_dsa(f"hf:{tmp_path / 'conv'}")
    train = corpus.eval_windows("train", 65, 8)
    pattern = "FSFS"
    with torch.no_grad():
        before = float(multi_layer_kl(model, train[:4, :-1], pattern))
    tuned, curve = distill(model, pattern, train, DistillConfig(steps=4, lr=3e-3, batch_size=4))
    with torch.no_grad():
        after = float(multi_layer_kl(tuned, train[:4, :-1], pattern))
    assert after < before and len(curve) == 4
    a, b = dict(model.hf.named_parameters()), dict(tuned.hf.named_parameters())
    changed = {n for n in a if not torch.equal(a[n], b[n])}
    assert changed and all(".self_attn.indexer." in n for n in changed)
    assert {int(n.split(".")[2]) for n in changed} == {0, 2}  # the F layers' indexers, nothing else
