"""Expert-parallel training through the real pipeline: Ray Train, gloo, MLflow, DeepSpeed ZeRO."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines import train_moe
from tests.training import golden
from tests.training.golden import ep_config
from workers.model.config import ConfigError


def test_loop_selection_and_bad_values():
    assert ep_config().expert_parallel and ep_config(ep_size=1, zero_stage=2).expert_parallel
    assert not ep_config(ep_size=1).expert_parallel
    with pytest.raises(ConfigError, match="ep_size=3"):
        ep_config(ep_size=3)
    with pytest.raises(ConfigError, match="zero_stage=3"):
        ep_config(zero_stage=3)


def test_ep_worker_killed_resumes_from_checkpoint_and_finishes(ray_local, mlflow_uri, tmp_path):
    """Rank 1 dies outright at step 5; Ray Train replaces it and both ranks restart from the
    step-3 checkpoint (unsharded model + per-rank optimizer state), then finish all 8 steps."""
    marker = tmp_path / "killed"
    tc = ep_config(zero_stage=2)
    run_id = train_moe.run(tc, experiment="test-moe-ep", extra={"crash_at_step": 5, "crash_marker": str(marker)})
    assert marker.exists()
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    resumed = client.get_metric_history(run_id, "resumed_from_step")
    assert [m.value for m in resumed] == [3.0]
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 9))  # steps 4 and 5, run twice, logged once
    assert tc == golden.ray_configs()["ep2_zero2_crash"]  # the loss curve (golden.match) of the loop before the merge
    want = golden.logged_once(golden.load()["ray_train"]["ep2_zero2_crash"])
    assert golden.match(golden.logged_curve(client, run_id), want)
    m = run.data.metrics
    assert {"maxvio/layer_0", "load/layer_0/expert_3", "straggler_ratio", "avg_maxvio", "heldout_nll"} <= set(m)
    # the saved model is unsharded and carries the moved loss-free bias of every layer
    from workers.model.checkpoint import load

    model = load(f"runs:/{run_id}/model")
    assert model.layers[0].ffn.w_gate.shape[0] == 4
    assert all(float(b.ffn.router.balance_bias.abs().sum()) > 0 for b in model.layers)
    assert torch.isfinite(torch.tensor(m["heldout_nll"]))
