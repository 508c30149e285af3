"""Golden per-step train losses of the training loops before they were merged into one, and the
configs they were recorded with.

golden_losses.json was written by this module, run on the tree of commit 486b1d9 (three loops:
workers/training/loop.py, workers/moe/train_loop.py, workers/moe/experiment.py `train_arm`)::

    git worktree add /tmp/base 486b1d9
    cd /tmp/base && PYTHONPATH=/tmp/base python /path/to/calibray/tests/training/golden.py OUT.json

on the project's x86-64 CPU machine, torch 2.13.0, one intra-op thread (as in the test suite).
It only uses entry points both trees have (``train_local``, ``train_arm``, ``train_moe.run``).
Float results depend on the CPU's kernels: on the recording machine the curves are reproduced
bit for bit; on another (an AMD EPYC sandbox) the last bits differ, and in models that route
(MoE top-k, the DSA indexer's top-k, BIP) a flipped routing decision makes the curves drift: up to
5e-3 relative over 60 steps there, against 1e-7 for the dense models. So tests compare with
``match``: equal structure and step numbers, values within ``rel_tol`` (REL_TOL for routed models,
DENSE_REL_TOL for dense ones). A change to the loop itself (data order, learning-rate schedule, a
skipped or repeated step, another seed) moves per-step losses by more than that. Re-record only
from 486b1d9, never from the tree under test.

The Ray Train curves are those of existing pipeline tests (their configs are repeated here and
checked equal there): the MLflow ``train_loss`` history as [step, value] in logging order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

from workers.model.config import RouterConfig
from workers.model.presets import tiny as tiny_model
from workers.training.config import CurriculumStage, TrainConfig, recipe, tiny

GOLDEN = Path(__file__).with_name("golden_losses.json")
ARMS = ["none", "aux_loss_0.01", "loss_free", "bip_pre_t4", "bip_causal_t4"]
ARM_SEED = 0


def local_configs() -> dict[str, TrainConfig]:
    """``train_local``: the conftest's tiny DSA-MoE and tiny dense models, and a short retrieval curriculum
    (two stages, then the main task) for the weighted-loss path."""
    return {
        "tiny": tiny(),
        "tiny_dense": tiny().replace(model=tiny_model().replace(indexer=None, moe=None), dense_warmup_steps=0),
        "retrieval_short": recipe("retrieval").replace(
            steps=8,
            batch_size=4,
            warmup_steps=2,
            curriculum=(
                CurriculumStage(steps=2, min_records=1, max_records=1, max_queries=1, filler="blank"),
                CurriculumStage(steps=2, filler="text"),
            ),
        ),
    }


def arm_config():
    """``train_arm``: the balancing sweep's tiny preset as tests/moe/test_sweep.py runs it."""
    from pipelines import moe_sweep

    return moe_sweep.tiny().replace(steps=12, eval_windows=8)


def ep_config(**changes) -> TrainConfig:
    """tests/moe/test_train_ep.py's ``ep_config``: 2 workers, 2 experts each, loss-free routing."""
    model = tiny_model()
    moe = dataclasses.replace(model.moe, router=RouterConfig(strategy="loss_free"))
    base = dict(
        model=model.replace(indexer=None, moe=moe),
        steps=8,
        batch_size=4,
        seq_len=32,
        num_workers=2,
        ep_size=2,
        cpus_per_worker=1.0,
        log_every=1,
        ckpt_every=3,
        eval_windows=8,
        warmup_steps=2,
    )
    return tiny().replace(**{**base, **changes})


def ray_configs() -> dict[str, TrainConfig]:
    return {
        # tests/foundation/test_training.py::test_pipeline_logs_params_metrics_and_model: DDP, 2 workers
        "ddp2": tiny().replace(steps=12, num_workers=2, cpus_per_worker=0.5, log_every=2, ckpt_every=6, eval_windows=8),
        # tests/foundation/test_training.py::test_crashed_run_ends_failed_and_resume_finishes: 1 worker,
        # dies after step 6 (crash_at_step=6, max_failures=0), then --resume from the step-4 checkpoint
        "single_crash": tiny().replace(
            steps=12, ckpt_every=4, log_every=2, max_failures=0, eval_windows=8, cpus_per_worker=0.5
        ),
        # tests/moe/test_train_ep.py::test_ep_worker_killed_resumes_from_checkpoint_and_finishes: EP 2, ZeRO 2,
        # rank 1 killed after step 5 (crash_at_step=5), replaced, resumed from the step-3 checkpoint
        "ep2_zero2_crash": ep_config(zero_stage=2),
        # tests/training/test_golden_losses.py: EP 2 without ZeRO (MoEOptimizer's own all-reduce and clipping)
        "ep2": ep_config(steps=6),
    }


REL_TOL = 2e-2  # routed models (every tiny() config): see the module docstring
DENSE_REL_TOL = 1e-5


MAXVIO_ABS_TOL = 0.15  # MaxVio moves in steps of experts/tokens when one assignment flips


def match(got, want, rel_tol: float = REL_TOL, abs_tol: float = 1e-9) -> bool:
    """`got` equals `want` in structure, ints and strings, and in every float to `rel_tol` relative
    (or `abs_tol` absolute); a dict's "maxvio" series to MAXVIO_ABS_TOL."""
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and got.keys() == want.keys()
            and all(match(got[k], want[k], rel_tol, MAXVIO_ABS_TOL if k == "maxvio" else abs_tol) for k in want)
        )
    if isinstance(want, list | tuple):
        return (
            isinstance(got, list | tuple)
            and len(got) == len(want)
            and all(match(g, w, rel_tol, abs_tol) for g, w in zip(got, want))
        )
    if isinstance(want, float) or isinstance(got, float):
        return math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol)
    return got == want


def load() -> dict:
    return json.loads(GOLDEN.read_text())


def local_curve(tc: TrainConfig, corpus) -> list[float]:
    from workers.training.loop import train_local

    return train_local(tc, corpus.tokens("train"), corpus.train)[1]


def arm_curves(arm: str) -> dict:
    from workers.moe.experiment import train_arm

    out = train_arm(arm_config(), arm, ARM_SEED)
    return {
        "train_loss": out["series"]["train_loss"],
        "maxvio": out["series"]["maxvio"],
        "heldout_nll": out["summary"]["heldout_nll"],
    }


def logged_curve(client, run_id: str) -> list[list[float]]:
    """A run's MLflow train_loss history, [step, value] in logging order."""
    history = client.get_metric_history(run_id, "train_loss")
    return [[m.step, m.value] for m in sorted(history, key=lambda m: (m.timestamp, m.step))]


def logged_once(curve: list[list[float]]) -> list[list[float]]:
    """A recorded curve as the pipeline logs it now: the steps a replaced worker re-runs after its
    checkpoint are no longer logged again (issue 17), so each step keeps its first [step, value]."""
    seen: set[int] = set()
    return [p for p in curve if not (p[0] in seen or seen.add(p[0]))]


def record_ray(scratch: Path) -> dict:
    """The Ray Train runs of ``ray_configs``, with the pipeline tests' fault injection."""
    from mlflow.tracking import MlflowClient

    from pipelines import train_moe

    train_moe.ARTIFACTS = scratch / "artifacts"
    from workers.runtime.cluster import init_ray

    init_ray(num_cpus=4)  # as tests/conftest.py
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    cfg = ray_configs()
    out = {"ddp2": logged_curve(client, train_moe.run(cfg["ddp2"], experiment="golden-ddp2"))}
    with contextlib.suppress(Exception):  # the run is meant to fail
        train_moe.run(
            cfg["single_crash"],
            experiment="golden-crash",
            extra={"crash_at_step": 6, "crash_marker": str(scratch / "crashed")},
        )
    (failed,) = client.search_runs([client.get_experiment_by_name("golden-crash").experiment_id])
    out["single_crashed"] = logged_curve(client, failed.info.run_id)
    resumed = train_moe.run(cfg["single_crash"], experiment="golden-crash", resume=failed.info.run_id)
    out["single_resumed"] = logged_curve(client, resumed)
    extra = {"crash_at_step": 5, "crash_marker": str(scratch / "killed")}
    out["ep2_zero2_crash"] = logged_curve(
        client, train_moe.run(cfg["ep2_zero2_crash"], experiment="golden-ep", extra=extra)
    )
    out["ep2"] = logged_curve(client, train_moe.run(cfg["ep2"], experiment="golden-ep"))
    return out


def main(out: Path, scratch: Path) -> None:
    from workers.data.corpus import load_corpus

    torch.set_num_threads(1)
    corpus = load_corpus()
    golden = {
        "recorded": {"commit": "486b1d9", "torch": torch.__version__, "threads": 1},
        "train_local": {name: local_curve(tc, corpus) for name, tc in local_configs().items()},
        "train_arm": {arm: arm_curves(arm) for arm in ARMS},
        "ray_train": record_ray(scratch),
    }
    out.write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__":
    scratch = Path(tempfile.mkdtemp(prefix="golden-losses-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlruns.db'}"  # before Ray starts, as the tests do
    os.environ.pop("RAY_ADDRESS", None)
    main(Path(sys.argv[1]), scratch)
