"""The IndexCache model adapter on transformers' DSA families (random tiny glm_moe_dsa and deepseek_v32).

Windows are 64 BPE tokens of the pydoc calibration split and index_topk is 8, so a reused top-k
is a different selection and S layers change the logits; every check runs on both families.
"""

from __future__ import annotations

import json

import pytest
import torch

from tuning.indexcache.patterns import serving_layer
from tuning.indexcache.search import SearchState, greedy_search
from workers.indexcache.evaluate import ShardEvaluator, topk_overlap
from workers.indexcache.hf_export import glm_config, link_checkpoint
from workers.model.hf import HFModelError
from workers.model.hf.address import load_tokenizer
from workers.model.hf.dsa import load_dsa

KINDS = ("glm_moe_dsa", "deepseek_v32")
N = 6


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def models(tiny_dsa_dirs):
    return {k: load_dsa(f"hf:{tiny_dsa_dirs[k]}") for k in KINDS}


@pytest.fixture(scope="module")
def windows(tiny_dsa_dirs, corpus):
    """[6, 65] calibration windows in the checkpoints' own BPE tokens."""
    return corpus.eval_windows("calib", 65, 6, load_tokenizer(f"hf:{tiny_dsa_dirs['glm_moe_dsa']}"))


def _plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def _used_topk(model, kind):
    """Forward hooks recording the top-k [B, T, K] each layer's attention attended with."""
    used = {}

    def hook(layer):
        def record(module, args, out):
            used[layer] = (out[2] if kind == "glm_moe_dsa" else out).clone()

        return record

    mods = [layer.self_attn if kind == "glm_moe_dsa" else layer.self_attn.indexer for layer in model.layers]
    return used, [m.register_forward_hook(hook(i)) for i, m in enumerate(mods)]


def test_all_f_equals_the_unmodified_model(kind, models, tiny_dsa_dirs, windows):
    x = windows[:4, :-1]
    with torch.no_grad():
        ref = _plain(tiny_dsa_dirs[kind])(x).logits
    assert torch.equal(models[kind](x, pattern="F" * N).logits, ref)


def test_s_layers_change_logits_and_never_call_their_indexer(kind, models, windows):
    model, x = models[kind], windows[:2, :-1]
    base = model(x, pattern="F" * N).logits
    for layer in range(1, N):
        pattern = "F" * layer + "S" + "F" * (N - layer - 1)
        before = model.indexer_calls()
        logits = model(x, pattern=pattern).logits
        calls = [a - b for a, b in zip(model.indexer_calls(), before, strict=True)]
        assert calls == [0 if i == layer else 1 for i in range(N)], pattern
        assert (logits - base).abs().max() > 1e-3, pattern
    before = model.indexer_calls()
    model(x, pattern="FSSFSS")
    assert [a - b for a, b in zip(model.indexer_calls(), before, strict=True)] == [1, 0, 0, 1, 0, 0]


def test_an_s_layer_attends_with_its_f_layers_indices(kind, models, windows):
    model, x = models[kind], windows[:2, :-1]
    used, hooks = _used_topk(model, kind)
    try:
        model(x, pattern="F" * N)
        own = dict(used)
        model(x, pattern="FSFSSF")
    finally:
        for h in hooks:
            h.remove()
    for layer, f in enumerate(serving_layer("FSFSSF")):  # within the one forward: 0,0,2,2,2,5
        assert torch.equal(used[layer], used[f]), layer
    # the reuse is a real change: with its own indexer (all-F) layer 1 selects other keys than layer 0
    assert torch.equal(used[0], own[0]) and not torch.equal(own[1], own[0])
    assert used[0].shape == (2, 64, 8)


def test_prefix_reuse_equals_naive_on_the_hf_model(kind, models, windows):
    """The search code of CalibLM, unchanged, on the adapter: same commits and losses in both modes."""
    runs = {}
    for mode in ("prefix", "naive"):
        ev = ShardEvaluator(models[kind], windows, batch_size=3, mode=mode)
        runs[mode] = greedy_search(SearchState(N, (0.5,), mode=mode), ev)
    p, q = runs["prefix"], runs["naive"]
    assert p.pattern == q.pattern and p.pattern.count("F") == 3
    for a, b in zip(p.steps, q.steps, strict=True):
        assert a.committed == b.committed
        for layer in a.final:
            assert a.final[layer].mean == pytest.approx(b.final[layer].mean, rel=1e-6)
    total, count = topk_overlap(models[kind], windows[:2], batch_size=2)
    assert total.shape == (N, N) and count == 2 * (64 - 8)
    assert torch.allclose(total.diagonal() / count, torch.ones(N, dtype=torch.float64))


def test_patterns_are_validated_against_the_model(kind, models, windows):
    model, x = models[kind], windows[:1, :-1]
    cases = {
        "SFFFFF": "pattern='SFFFFF': must start with 'F'",
        "FSF": "pattern='FSF': has 3 layers, the model has 6",
        "FSXFFF": r"pattern='FSXFFF': has characters \['X'\]",
    }
    for bad, msg in cases.items():
        with pytest.raises(ValueError, match=msg):
            model(x, pattern=bad)
    assert model.pattern != "SFFFFF" and model(x, pattern="FSFSFS").logits.shape == (1, 64, 512)


def test_exported_glm_config_reloads_in_plain_transformers(models, tiny_dsa_dirs, windows, tmp_path):
    src, x = tiny_dsa_dirs["glm_moe_dsa"], windows[:4, :-1]
    pattern = "FSFSSF"
    out = link_checkpoint(src, pattern, tmp_path / "exported")
    doc = json.loads((out / "config.json").read_text())
    assert doc["index_topk_pattern"] == pattern and "indexer_types" not in doc
    plain = _plain(out)
    assert plain.config.indexer_types == ["full", "shared", "full", "shared", "shared", "full"]
    assert [layer.self_attn.indexer is None for layer in plain.model.layers] == [c == "S" for c in pattern]
    with torch.no_grad():
        assert torch.equal(plain(x).logits, models["glm_moe_dsa"](x, pattern=pattern).logits)
    with pytest.raises(ValueError, match="pattern='FSF': has 3 layers, the model has 6"):
        glm_config(doc, "FSF")
    with pytest.raises(ValueError, match="model_type='deepseek_v32': only glm_moe_dsa"):
        glm_config(json.loads((tiny_dsa_dirs["deepseek_v32"] / "config.json").read_text()), pattern)


def test_non_dsa_and_shared_checkpoints_are_refused(tiny_qwen3_dir, tiny_dsa_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(HFModelError, match="model_type 'qwen3' has no lightning indexer"):
        load_dsa(f"hf:{tiny_qwen3_dir}")
    # saved with shared layers, a glm checkpoint holds no indexer weights for them: they could never be F
    linked = link_checkpoint(tiny_dsa_dirs["glm_moe_dsa"], "FFSFFS", tmp_path / "linked")
    AutoModelForCausalLM.from_pretrained(linked).save_pretrained(tmp_path / "saved_shared")
    with pytest.raises(HFModelError, match=r"no indexer weights for layers \[2, 5\]"):
        load_dsa(f"hf:{tmp_path / 'saved_shared'}")
