"""Training: the loss falls; the Ray Train pipeline logs params, metrics and the model to MLflow;
a crashed run ends FAILED with what it logged, and --resume continues from its last checkpoint."""

from __future__ import annotations

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines import train_moe
from tests.training import golden
from workers.model import checkpoint
from workers.model.config import ConfigError
from workers.runtime import tracking
from workers.training import train_state
from workers.training.config import tiny


def test_tiny_training_loss_falls(tiny_trained):
    _, _, losses = tiny_trained
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.8, (first, last)


def test_pipeline_logs_params_metrics_and_model(ray_local, mlflow_uri, tmp_path):
    tc = tiny().replace(steps=12, num_workers=2, cpus_per_worker=0.5, log_every=2, ckpt_every=6, eval_windows=8)
    run_id = train_moe.run(tc, experiment="test-train")
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "12" and run.data.params["model.n_layers"] == "4"
    assert len(run.data.tags["corpus_sha256"]) == 64 and run.data.tags["pipeline"] == "train_moe"
    history = MlflowClient(mlflow_uri).get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == [2, 4, 6, 8, 10, 12]
    assert tc == golden.ray_configs()["ddp2"]  # the loss curve (golden.match) of the loop before the merge
    assert golden.match(golden.logged_curve(MlflowClient(mlflow_uri), run_id), golden.load()["ray_train"]["ddp2"])
    for key in ("heldout_bpb", "unigram_bpb", "heldout_dense_bpb", "heldout_random_k_bpb", "maxvio"):
        assert key in run.data.metrics, key
    model = checkpoint.load(f"runs:/{run_id}/model")
    assert model.cfg == tc.model


def test_crashed_run_ends_failed_and_resume_finishes(ray_local, mlflow_uri, tmp_path):
    tc = tiny().replace(steps=12, ckpt_every=4, log_every=2, max_failures=0, eval_windows=8, cpus_per_worker=0.5)
    extra = {"crash_at_step": 6, "crash_marker": str(tmp_path / "crashed")}
    with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker death in its own error types
        train_moe.run(tc, experiment="test-resume", extra=extra)
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("test-resume")
    (failed,) = client.search_runs([exp.experiment_id])
    assert failed.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(failed.info.run_id, "train_loss")] == [2, 4, 6]
    assert train_state.find_resume(failed.info.run_id).step == 4
    resumed = train_moe.run(tc, experiment="test-resume", resume=failed.info.run_id)
    run = client.get_run(resumed)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from"] == failed.info.run_id
    steps = [m.step for m in client.get_metric_history(resumed, "train_loss")]
    assert steps == [6, 8, 10, 12]  # continued from the step-4 checkpoint, not from scratch
    want = golden.load()["ray_train"]  # both curves (golden.match) of the loop before the merge
    assert tc == golden.ray_configs()["single_crash"]
    assert golden.match(golden.logged_curve(client, failed.info.run_id), want["single_crashed"])
    assert golden.match(golden.logged_curve(client, resumed), want["single_resumed"])


def test_start_run_marks_failed_and_keeps_what_was_logged(mlflow_uri):
    with pytest.raises(RuntimeError, match="boom"), tracking.start_run("unit", experiment="test-failed") as run:
        mlflow.log_metric("x", 1.0)
        raise RuntimeError("boom")
    r = MlflowClient(mlflow_uri).get_run(run.info.run_id)
    assert r.info.status == "FAILED" and r.data.metrics["x"] == 1.0


def test_bad_cli_values_fail_before_any_work():
    with pytest.raises(ConfigError, match="seq_len=4096"):
        train_moe.config_from_args(train_moe.build_parser().parse_args(["--seq-len", "4096"]))
    with pytest.raises(ConfigError, match="ep_size=3"):
        train_moe.config_from_args(train_moe.build_parser().parse_args(["--workers", "2", "--ep-size", "3"]))
    with pytest.raises(ConfigError, match="indexer.topk=0"):
        train_moe.config_from_args(train_moe.build_parser().parse_args(["--topk", "0"]))
    with pytest.raises(ConfigError, match="router.bip_iters=0"):
        train_moe.config_from_args(train_moe.build_parser().parse_args(["--preset", "demo", "--bip-iters", "0"]))
    args = train_moe.build_parser().parse_args(["--preset", "demo", "--bip-iters", "2", "--bip-q-mode", "restart"])
    router = train_moe.config_from_args(args).model.moe.router
    assert (router.strategy, router.bip_iters, router.bip_q_mode) == ("bip", 2, "restart")


def test_tracking_uri_refuses_file_stores(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    with pytest.raises(tracking.TrackingError, match="file:///tmp/mlruns"):
        tracking.tracking_uri()


def test_retrieval_curriculum_stages_batches_and_weights(corpus):
    """Each curriculum stage yields its own sequences with loss on the answer bytes only; the main
    task follows at full length with text mixed in and answer bytes up-weighted."""
    from workers.data.retrieval import VALUE_LEN
    from workers.training.batches import weighted_batch
    from workers.training.config import CurriculumStage, TrainConfig, recipe

    tc = recipe("retrieval")
    assert tc.curriculum_steps == 4000 and TrainConfig.from_dict(tc.to_dict()) == tc
    assert tc.flat_params()["train.curriculum"].startswith("blank:64:1-1:q1:1000,")
    tokens = corpus.tokens("train")
    first = tc.curriculum[0].steps
    assert tc.stage_at(first - 1) is tc.curriculum[0] and tc.stage_at(first) is tc.curriculum[1]
    assert tc.stage_at(tc.curriculum_steps) is None

    x, w = weighted_batch(tc, 0, 0, tokens, corpus.train)  # one record, blank filler
    assert x.shape == (tc.batch_size, 64)
    assert torch.equal(w.sum(1), torch.full((tc.batch_size,), float(VALUE_LEN)))  # one answer, nothing else
    text = bytes(x[0].tolist())
    assert text.count(b"#") == 1 and set(text) <= set(b" #?=;abcdefghijklmnopqrstuvwxyz0123456789")

    x, w = weighted_batch(tc, tc.curriculum_steps - 1, 0, tokens, corpus.train)  # text filler
    assert x.shape == (tc.batch_size, 64) and set(w.unique().tolist()) == {0.0, 1.0}
    assert any(ch in bytes(x.flatten().tolist()) for ch in b"ABCDEF(),.")  # real text between records

    x, w = weighted_batch(tc, tc.curriculum_steps, 0, tokens, corpus.train)  # the main task
    assert x.shape == (tc.batch_size, tc.seq_len) and set(w.unique().tolist()) == {1.0, tc.answer_weight}

    with pytest.raises(ConfigError, match="filler='noise'"):
        CurriculumStage(steps=10, filler="noise")
    with pytest.raises(ConfigError, match="length=32"):
        CurriculumStage(steps=10, length=32)
    with pytest.raises(ConfigError, match="curriculum"):
        tc.replace(steps=tc.curriculum_steps)

    # the CLI form is the logged form, and a malformed stage is named
    from workers.training.config import parse_curriculum

    spec = tc.flat_params()["train.curriculum"]
    assert parse_curriculum(spec) == tc.curriculum and parse_curriculum("none") == ()
    with pytest.raises(ConfigError, match="'blank:64:q1:1000'"):
        parse_curriculum("blank:64:q1:1000")
    args = train_moe.build_parser().parse_args(["--preset", "retrieval", "--curriculum", "text:64:2-4:q3:20"])
    assert train_moe.config_from_args(args).curriculum == (CurriculumStage(steps=20),)


@pytest.mark.slow
def test_retrieval_recipe_reaches_080_exact_match(corpus):
    """The full testbed recipe (about 8 minutes on one core): >= 0.8 exact match on 1000 held-out
    queries, as the issue requires (measured 0.936 for the recipe's seed; docs/MODELS.md)."""
    from workers.caches.protocol import DynamicCache
    from workers.data.retrieval import eval_set
    from workers.eval import retrieval_accuracy
    from workers.training.config import recipe
    from workers.training.loop import train_local

    tc = recipe("retrieval")
    model, _ = train_local(tc, corpus.tokens("train"), corpus.train)
    data = eval_set(corpus.heldout, n=1000, length=tc.seq_len)
    acc = retrieval_accuracy(model, data, make_cache=lambda: DynamicCache(tc.model.n_layers))
    assert acc.accuracy >= 0.8, (acc.accuracy, acc.se)
