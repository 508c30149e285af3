"""The one training loop reproduces the loss curves of the three loops it replaced (bit for bit
on the recording machine; elsewhere to the tolerances of golden.match): ``train_local``, the balancing sweep's arms, and Ray Train with expert
parallelism. The pipeline tests check the other Ray Train curves (data parallel, crash and resume,
ZeRO) against the same file. How the curves were recorded: tests/training/golden.py."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from pipelines import train_moe
from tests.training import golden


def test_train_local_reproduces_the_pre_merge_curves(tiny_trained, tiny_dense_trained, corpus):
    want, configs = golden.load()["train_local"], golden.local_configs()
    for name, (tc, _, losses) in {"tiny": tiny_trained, "tiny_dense": tiny_dense_trained}.items():
        assert tc == configs[name]
        assert golden.match(losses, want[name], golden.REL_TOL if name == "tiny" else golden.DENSE_REL_TOL), name
    retrieval = golden.local_curve(configs["retrieval_short"], corpus)  # a dense model
    assert golden.match(retrieval, want["retrieval_short"], golden.DENSE_REL_TOL)


def test_sweep_arms_reproduce_the_pre_merge_curves():
    want = golden.load()["train_arm"]
    for arm in golden.ARMS:
        assert golden.match(golden.arm_curves(arm), want[arm]), arm


def test_expert_parallel_ray_train_reproduces_the_pre_merge_curve(ray_local, mlflow_uri):
    run_id = train_moe.run(golden.ray_configs()["ep2"], experiment="test-golden-ep")
    assert golden.match(golden.logged_curve(MlflowClient(mlflow_uri), run_id), golden.load()["ray_train"]["ep2"])
