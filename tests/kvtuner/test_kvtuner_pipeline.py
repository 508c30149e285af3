"""End to end: `python -m pipelines.kvtuner` on a tiny HF Llama (hf:<tmp dir>), real Ray Tune and MLflow."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from pipelines import kvtuner

ARGS = [
    "--budget", "4.0", "3.0",
    "--length", "64", "--continuation", "16", "--group", "16", "--residual", "16",
    "--calib-n", "6", "--valid-n", "6", "--report-n", "8",
    "--num-samples", "4", "--population", "4", "--clusters", "1",
    "--actors", "1", "--cpus-per-actor", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def hf_llama(tiny_llama_dir):
    return tiny_llama_dir("kvt_llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3)


def test_bad_inputs_fail_before_any_run(hf_llama, tmp_path, mlflow_uri):
    client = MlflowClient(mlflow_uri)
    before = len(client.search_experiments())
    with pytest.raises(ValueError, match="budget"):
        kvtuner.main(["--model", f"hf:{hf_llama}", "--budget", "1.5"])
    with pytest.raises(ValueError, match="bits"):
        kvtuner.main(["--model", f"hf:{hf_llama}", "--baselines", "K3V4"])
    with pytest.raises(ValueError, match="config.json"):
        kvtuner.main(["--model", f"hf:{tmp_path / 'missing'}"])
    with pytest.raises(FileNotFoundError, match="missing"):
        kvtuner.main(["--model", str(tmp_path / "missing")])
    assert len(client.search_experiments()) == before


def test_pipeline_end_to_end_and_resume(hf_llama, tmp_path, ray_local, mlflow_uri):
    work = tmp_path / "work"
    argv = ["--model", f"hf:{hf_llama}", *ARGS, "--work-dir", str(work)]
    res = kvtuner.main(argv)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(res["run_id"])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert not [k for k in m if "_b3.0" in k or "_b4.0" in k]  # a budget is a child's param, not in a name
    assert m["search_rejected_infeasible"] >= 0 and m["search_evaluated"] >= 1
    # every Tune trial is a child run (written live by Tune's MLflow callback), its map as params
    kids = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    trials = [k for k in kids if k.data.tags["pipeline"] == "kvtuner_trial"]
    assert len(trials) == m["search_evaluated"] and all(t.info.status == "FINISHED" for t in trials)
    assert all("damage" in t.data.metrics and "g00" in t.data.params for t in trials)
    # one child per budget: the budget a param, the same metric names at every budget (compare view)
    per_budget = {k.data.params["budget"]: k.data.metrics for k in kids if k.data.tags["pipeline"] == "kvtuner_budget"}
    assert set(per_budget) == {"4", "3"} and per_budget["3"].keys() == per_budget["4"].keys()
    # every budget got a map within it; the search rejected over-budget maps without evaluating them
    for b in ("4", "3"):
        assert per_budget[b]["chosen_bits"] <= float(b)
    assert per_budget["3"]["heldout_KV4"] == m["heldout_KV4"] and "delta_vs_full" in per_budget["3"]
    rows = json.loads((work / "out" / "search_rows.json").read_text())
    assert all(r["bits"] <= 4.0 for r in rows["rows"])
    assert len({tuple(r["key"]) for r in rows["rows"]}) == len(rows["rows"])  # no map evaluated twice
    # layer 0 alone; k = min(1, N - 1) = 1 group for the rest
    clusters = json.loads((work / "out" / "clusters.json").read_text())
    assert clusters["groups"] == [0, 1, 1]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    for name in ("kv_precision.json", "pareto.png", "pareto.md", "profile_heatmap.png", "clusters.json", "report.md"):
        assert name in arts
    budgets = {a.path for a in client.list_artifacts(run.info.run_id, "budgets")}
    assert budgets == {"budgets/4", "budgets/3"}
    prec = json.loads((work / "out_budgets" / "3" / "kv_precision.json").read_text())
    assert len(prec["layers"]) == 3 and prec["equivalent_bits"] <= 3.0 and prec["mode"] == "kivi"
    # uniform baselines on the same held-out tokens as the chosen maps
    report = json.loads((work / "out" / "report.json").read_text())
    by = {r["name"]: r for r in report["rows"]}
    for b in ("full", "KV8", "K8V4", "KV4", "K4V2", "KV2", "K2V4", "kvtuner_b3.0", "reversed_b3.0"):
        assert len(by[b]["per_example"]) == 8
    assert by["KV2"]["stored_bits"] < by["KV8"]["stored_bits"] < by["full"]["stored_bits"]
    # the best uniform map at no more bits is the one with the lowest calibration KL, not held-out NLL
    calib = {r["name"]: r["damage"] for r in rows["baselines"]}
    bits = per_budget["3"]["chosen_bits"]
    fits = [n for n in calib if by[n]["nominal_bits"] <= bits + 1e-9]
    (label,) = [c["label"] for c in report["comparisons"] if c["a"] == "kvtuner_b3.0" and "best uniform" in c["label"]]
    assert label.endswith(f"on calibration ({min(fits, key=calib.get)})")
    # the profile measured something: 2-bit keys and values damage more than 8 bits
    prof = json.loads((work / "profile.json").read_text())
    assert all(row[0] < row[-1] for row in prof["damage"])  # KV8 column < KV2 column

    # rerunning the same command resumes the same MLflow run from the saved state
    mtime = (work / "profile.json").stat().st_mtime
    res2 = kvtuner.main(argv)
    assert res2["run_id"] == res["run_id"]
    assert (work / "profile.json").stat().st_mtime == mtime
    assert client.get_run(res["run_id"]).info.status == "FINISHED"
    assert res2["chosen"] == res["chosen"]
    again = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert len([k for k in again if k.data.tags["pipeline"] == "kvtuner_budget"]) == 2  # not logged twice


def test_work_dir_of_another_search_is_refused(tmp_path):
    """A work dir resumes only the search that made it: another model (or other settings) would
    silently reuse its profile and trials, so it is refused by name; placement flags may change."""
    work = tmp_path / "work"
    work.mkdir()
    cfg = kvtuner.parse_args(["--model", "runs:/aaaa/model", "--budget", "4.0"])
    kvtuner.check_work_dir(cfg, work)
    kvtuner.check_work_dir(
        kvtuner.parse_args(["--model", "runs:/aaaa/model", "--budget", "4.0", "--actors", "1"]), work
    )
    other = kvtuner.parse_args(["--model", "runs:/bbbb/model", "--budget", "4.0"])
    with pytest.raises(ValueError, match=r"model='runs:/aaaa/model' there vs 'runs:/bbbb/model' now"):
        kvtuner.check_work_dir(other, work)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "run_id").write_text("0123")
    with pytest.raises(ValueError, match="unknown search"):
        kvtuner.check_work_dir(cfg, legacy)
