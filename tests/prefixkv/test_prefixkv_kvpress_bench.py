"""benchmarks.prefixkv_kvpress --data retrieval: the query split and the full-cache paths (no kvpress needed)."""

import json

import pytest
import torch

from benchmarks.prefixkv_kvpress import SETTINGS, calibray_logits, kvpress_logits, main, retrieval_split
from tuning.prefixkv.search import RATIO_GRID
from workers.caches.protocol import DynamicCache
from workers.data.retrieval import eval_set
from workers.eval import retrieval_accuracy
from workers.model.hf.address import load_hf
from workers.prefixkv.methods import Method


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    path = tiny_llama_dir("tiny_llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    return LlamaForCausalLM.from_pretrained(path).eval(), path


@pytest.fixture(scope="module")
def queries(corpus):
    es = eval_set(corpus.heldout, n=4, length=100, seed=1)
    return es.prompt, es.value


def test_split_feeds_query_then_value(queries):
    prompt, value = queries
    agn_ctx, agn_cont = retrieval_split(prompt, value, SETTINGS["agnostic"])
    assert bytes(agn_ctx[0, -1:].tolist()) == b"?"  # prefill = context[:, :-1] ends before "?key="
    assert torch.equal(agn_cont, torch.cat([prompt[:, -4:], value], 1))
    aw_ctx, aw_cont = retrieval_split(prompt, value, SETTINGS["aware"])
    assert torch.equal(aw_ctx, prompt) and torch.equal(aw_cont, value)  # workers.eval.retrieval_accuracy's split


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_full_cache_paths_equal_one_forward(tiny, queries, setting):
    ref, path = tiny
    prompt, value = queries
    ctx, cont = retrieval_split(prompt, value, SETTINGS[setting])
    with torch.no_grad():
        whole = ref(torch.cat([prompt, value], 1)).logits[:, prompt.shape[1] - 1 : -1]  # predicts the value
    ours, ours_bytes = calibray_logits(load_hf(f"hf:{path}"), ctx, cont, Method("full", 1.0, 2))
    theirs, their_bytes = kvpress_logits(ref, ctx, cont, None)
    torch.testing.assert_close(ours[:, -3:], whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(theirs[:, -3:], whole, rtol=1e-4, atol=1e-4)
    # K and V, 2 layers, 4 queries, 2 KV heads, head dim 8, fp32, the prefilled tokens
    assert ours_bytes == their_bytes == 2 * 2 * 4 * 2 * 8 * 4 * (ctx.shape[1] - 1)


def test_calibray_half_runs_both_settings(tiny, corpus, tmp_path):
    _, path = tiny
    cal = {
        "version": 1,
        "n_layers": 2,
        "n_sink": 4,
        "ratios": list(RATIO_GRID),
        "default_score": "sum",
        "window": 8,
        "scores": {m: {"fractions": [[r, r] for r in RATIO_GRID]} for m in ("sum", "window")},
    }
    (tmp_path / "prefixkv.json").write_text(json.dumps(cal))
    flags = ["--model", f"hf:{path}", "--calibration", str(tmp_path / "prefixkv.json"), "--data", "retrieval"]
    res = main([*flags, "--part", "calibray", "--samples", "4", "--context", "97", "--ratios", "0.5"])
    rows = res["rows"]
    assert sorted(rows) == sorted(
        [f"{s}/full@1" for s in SETTINGS]
        + [f"agnostic/calibray-{n}-sum@0.5" for n in ("prefixkv", "uniform", "pyramid")]
        + [f"aware/calibray-{n}-window@0.5" for n in ("prefixkv", "uniform", "pyramid")]
    )
    es = eval_set(corpus.heldout, n=4, length=100, seed=1)  # the benchmark's queries
    acc = retrieval_accuracy(load_hf(f"hf:{path}"), es, make_cache=lambda: DynamicCache(2))
    assert rows["aware/full@1"]["hits"] == rows["agnostic/full@1"]["hits"] == acc.per_example
    assert rows["aware/full@1"]["nll"] == pytest.approx(rows["agnostic/full@1"]["nll"], abs=1e-4)
    half = rows["aware/calibray-uniform-window@0.5"]["kv_bytes"] / rows["aware/full@1"]["kv_bytes"]
    assert half == pytest.approx(0.5, abs=0.02)


def test_retrieval_run_report_pairs_labelled_arms_with_their_own_uniform_and_presses_with_the_first():
    """--retrieval-run on a kv_retrieval run of two labelled PrefixKV files (the report half: no kvpress needed)."""
    import argparse

    from benchmarks.prefixkv_kvpress import report_retrieval_run

    logged = {
        "full": [1, 1, 1, 1],
        "prefixkv-window@0.2 [a]": [1, 1, 0, 0],
        "uniform-window@0.2 [a]": [1, 0, 0, 0],
        "prefixkv-window@0.2 [b]": [1, 1, 1, 0],
        "uniform-window@0.2 [b]": [1, 1, 1, 1],
        "pyramid-window@0.2 [b]": [0, 0, 0, 0],
        "recency@0.2": [0, 0, 0, 0],
        "prefixkv-window@0.5 [a]": [1, 1, 1, 1],  # another keep: left out of a 0.2 report
    }
    kv = {
        "transformers": "5.2",
        "rows": {
            "full@1": {"hits": [1, 1, 1, 1], "kv_bytes": 100},
            "kvpress-snapkv@0.2": {"hits": [1, 1, 0, 1], "kv_bytes": 20},
        },
    }
    ours = {"run_id": "r", "model": "m", "transformers": "5.24", "full_greedy": [[1]] * 4, "logged": logged}
    kv["rows"]["full@1"]["greedy"] = [[1]] * 4
    out = report_retrieval_run(argparse.Namespace(ratios="0.2"), kv, ours, 0.0)
    rows = {r["key"]: r for r in out["rows"]}
    assert set(rows) == {
        "prefixkv-window@0.2 [a]", "uniform-window@0.2 [a]", "prefixkv-window@0.2 [b]", "uniform-window@0.2 [b]",
        "pyramid-window@0.2 [b]", "recency@0.2", "kvpress-snapkv@0.2",
    }  # fmt: skip
    assert rows["pyramid-window@0.2 [b]"]["diff_vs_uniform"] == pytest.approx(-1.0)  # b's uniform, not a's
    assert rows["prefixkv-window@0.2 [a]"]["diff_vs_uniform"] == pytest.approx(0.25)  # its own file's uniform
    assert rows["prefixkv-window@0.2 [b]"]["diff_vs_uniform"] == pytest.approx(-0.25)
    assert rows["kvpress-snapkv@0.2"]["diff_vs_uniform"] == pytest.approx(0.5)  # the first file's uniform
    assert rows["kvpress-snapkv@0.2"]["kv_ratio"] == pytest.approx(0.2) and out["full_greedy_differ"] == 0
