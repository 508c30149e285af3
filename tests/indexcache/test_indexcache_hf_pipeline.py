"""`python -m pipelines.indexcache --model hf:<dir>` on tiny random DSA checkpoints (real Ray, real MLflow).

The searched glm_moe_dsa pattern is checked where a user meets it: the config.json the run logs,
loaded by plain transformers beside the checkpoint's weights, scores the calibration and held-out
windows exactly as the search and its report did.
"""

from __future__ import annotations

import json
import os

import mlflow
import pytest
import torch

from pipelines import indexcache, indexcache_export, kvtuner, prefixkv
from pipelines.indexcache import IndexCacheConfig, SearchStopped, load_data, load_model, main, resume_config, run
from tuning.indexcache.patterns import indexer_fraction_removed
from tuning.indexcache.search import SearchState, greedy_search
from workers.eval import token_nll
from workers.indexcache.evaluate import ShardEvaluator
from workers.model.hf.address import load_tokenizer
from workers.runtime import cli

ARGS = [
    "--retention", "0.5", "0.25", "--workers", "2", "--seq-len", "64", "--calib-windows", "6",
    "--heldout-windows", "6", "--batch-size", "3", "--worker-cpus", "0.25", "--experiment", "indexcache-hf-tests",
]  # fmt: skip


def _nll(model, windows: torch.Tensor) -> torch.Tensor:
    """Per-window mean next-token NLL [R] of a plain transformers model on windows [R, T + 1]."""
    with torch.no_grad():
        return token_nll(model(windows[:, :-1]).logits, windows[:, 1:]).double().mean(dim=1)


def test_search_on_a_tiny_glm_moe_dsa_end_to_end(ray_local, mlflow_uri, tiny_dsa_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_dsa_dirs["glm_moe_dsa"]
    summary = main(["--model", f"hf:{src}", *ARGS, "--multi-fidelity"])
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    run_ = client.get_run(summary["run_id"])
    assert run_.info.status == "FINISHED"
    params, metrics = run_.data.params, run_.data.metrics
    assert params["model_type"] == "glm_moe_dsa" and params["n_layers"] == "6" and params["topk"] == "8"
    assert params["tokenizer"] == f"hf:{src}" and params["multi_fidelity"] == "True"
    assert metrics["search/total_layer_forwards"] == metrics["search/analytic_layer_forwards"]
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{summary['run_id']}/indexcache/retentions.json"))
    assert "heldout_bits_per_token" in table["columns"] and "heldout_bpb" not in table["columns"]  # BPE, not bytes
    doc = json.loads(mlflow.artifacts.load_text(f"runs:/{summary['run_id']}/indexcache.json"))
    cfg = IndexCacheConfig.from_json(mlflow.artifacts.load_text(f"runs:/{summary['run_id']}/search/config.json"))
    data = load_data(cfg, 64, load_tokenizer(cfg.model))
    for r, n_full in (("0.5", 3), ("0.25", 2)):
        searched = doc["patterns"][r]["searched"]
        pattern = searched["pattern"]
        assert pattern.count("F") == n_full and pattern[0] == "F"
        assert searched["indexer_work_removed_measured"] == pytest.approx(indexer_fraction_removed(pattern))
        # the logged config.json, beside the checkpoint's weights, in plain transformers
        exported = tmp_path / f"r{r}"
        exported.mkdir()
        logged = client.download_artifacts(summary["run_id"], f"indexcache/glm_config/r{r}/config.json", str(tmp_path))
        os.replace(logged, exported / "config.json")
        for f in src.iterdir():
            if f.name != "config.json":
                os.symlink(f, exported / f.name)
        plain = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
        assert "".join("F" if t == "full" else "S" for t in plain.config.indexer_types) == pattern
        assert _nll(plain, data.calib).mean().item() == pytest.approx(searched["calib_nll"], rel=1e-9)
        assert _nll(plain, data.heldout).mean().item() == pytest.approx(searched["heldout_nll"], rel=1e-9)
    assert doc["all_f"]["calib_nll"] != doc["patterns"]["0.25"]["searched"]["calib_nll"]
    # the export command writes the same pattern into a directory plain transformers loads as is
    out = indexcache_export.main(
        ["--model", f"hf:{src}", "--run", summary["run_id"], "--retention", "0.25", "--out", str(tmp_path / "x")]
    )
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert plain.config.index_topk_pattern == doc["patterns"]["0.25"]["searched"]["pattern"]
    assert _nll(plain, data.calib).mean().item() == pytest.approx(doc["patterns"]["0.25"]["searched"]["calib_nll"])


def test_deepseek_v32_search_stops_and_resumes_to_the_in_process_search(ray_local, mlflow_uri, tiny_dsa_dirs):
    cfg = IndexCacheConfig(
        model=f"hf:{tiny_dsa_dirs['deepseek_v32']}",
        retentions=(0.25,),
        workers=2,
        seq_len=64,
        calib_windows=6,
        heldout_windows=6,
        batch_size=3,
        worker_cpus=0.25,
        max_steps=2,
        overlap=False,
        experiment="indexcache-hf-tests",
    )
    with pytest.raises(SearchStopped, match="--resume"):
        run(cfg)
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("indexcache-hf-tests").experiment_id
    stopped = client.search_runs([exp], order_by=["start_time DESC"])[0].info.run_id
    cfg, state = resume_config(stopped, max_steps=0)
    assert len(state.steps) == 2
    resumed = run(cfg, resume=stopped, state=state)
    # the same search, uninterrupted, in this process on the whole calibration set
    data = load_data(cfg, 64, load_tokenizer(cfg.model))
    local = greedy_search(SearchState(6, (0.25,)), ShardEvaluator(load_model(cfg.model), data.calib, batch_size=3))
    assert resumed["pattern"] == local.pattern and local.pattern.count("F") == 2
    trace = [s["loss"] for s in resumed["indexcache"]["trace"]]
    assert trace == pytest.approx([s.loss for s in local.steps], rel=1e-9)
    assert client.get_run(stopped).info.status == "FINISHED"
    assert "glm_configs" not in resumed  # DeepSeek-V3.2's config has no F/S field to write


def _cli(capsys, entry, argv):
    with pytest.raises(SystemExit) as e:
        cli.run(entry, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line_and_exit_2_before_any_work(capsys, mlflow_uri, tiny_dsa_dirs, tiny_qwen3_dir, tmp_path):
    client = mlflow.tracking.MlflowClient(mlflow_uri)
    before = sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())
    glm = f"hf:{tiny_dsa_dirs['glm_moe_dsa']}"
    err = _cli(capsys, main, ["--model", f"hf:{tiny_qwen3_dir}", *ARGS])
    assert "model_type 'qwen3' has no lightning indexer" in err
    assert "--distill-steps on model_type 'glm_moe_dsa': the training-aware variant" in _cli(
        capsys, main, ["--model", glm, *ARGS, "--distill-steps", "2"]
    )
    assert "seq_len=4096 exceeds the model's max_seq_len=128" in _cli(
        capsys, main, ["--model", glm, *ARGS, "--seq-len", "4096"]
    )
    out = tmp_path / "exported"
    for bad, msg in {
        "SFFFFF": "pattern='SFFFFF': must start with 'F' (layer 0 always runs its indexer)",
        "FSF": "pattern='FSF': has 3 layers, the model has 6",
        "FSXSFS": "pattern='FSXSFS': has characters ['X']; only 'F' and 'S' are allowed",
    }.items():
        assert msg in _cli(capsys, indexcache_export.main, ["--model", glm, "--pattern", bad, "--out", str(out)])
    ds = f"hf:{tiny_dsa_dirs['deepseek_v32']}"
    err = _cli(capsys, indexcache_export.main, ["--model", ds, "--pattern", "FSFSFS", "--out", str(out)])
    assert "model_type='deepseek_v32': only glm_moe_dsa configs carry an F/S pattern" in err
    assert not out.exists()
    # both are MLA models: the KV-cache methods refuse them, naming the type
    for kind, path in tiny_dsa_dirs.items():
        msg = f"KV-cache methods need per-head K/V; {kind} caches compressed latents (MLA)"
        assert msg in _cli(capsys, kvtuner.main, ["--model", f"hf:{path}", "--work-dir", str(tmp_path / "w")])
        assert msg in _cli(capsys, prefixkv.main, ["--model", f"hf:{path}"])
    assert not (tmp_path / "w").exists()
    assert sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments()) == before
    assert indexcache.is_hf_model(glm)
