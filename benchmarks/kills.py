"""Kill cases for training (issue 17 item 1): a driver or a Ray Train worker killed mid-run, resumed,
compared with an uninterrupted run. UNFINISHED: only the training cases exist (``train_case``), called
from Python; there is no command line, no search or serving cases, no table writer and no tests yet.

``train_case`` kills a run as its ``extra`` says (a subprocess driver that SIGKILLs itself through
``ray_train.KillDriverAt`` once a checkpoint is uploaded and before Ray Train registers it, or a
worker that dies through ``ray_train.CrashAt``), resumes it in this process (``--resume``'s code
path), and reports the step it resumed from, the held-out numbers against a reference, models lost,
runs left RUNNING and the logged train_loss steps (each once).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_REL_TOL = 1e-5  # the same steps on the same seeds and data: equal up to float summation order


@dataclass
class Outcome:
    """What one kill case measured."""

    case: str
    fault: str
    resumed_at: str  # the step (or item) the resume continued from, as the pipeline reported it
    expected_at: str  # the step it must continue from (the newest checkpoint or finished item)
    same_result: bool  # the final numbers equal the uninterrupted run's
    detail: str  # which numbers, and how far apart
    lost_models: int = 0
    left_running: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.same_result
            and self.resumed_at == self.expected_at
            and not self.lost_models
            and not self.left_running
            and not self.problems
        )


def env_for(store: Path, storage: Path) -> dict[str, str]:
    """A subprocess's environment: this tree on the path, its own MLflow store and Ray Train storage."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CALIBRAY_DEBUG")}
    env.update(
        PYTHONPATH=str(REPO),
        MLFLOW_TRACKING_URI=f"sqlite:///{store}",
        CALIBRAY_STORAGE=str(storage),
        RAY_DEDUP_LOGS="0",
    )
    return env


def reap(pgid: int) -> None:
    """Kill what a killed driver left behind: its process group (it was started as a session leader,
    and the local Ray it started runs in that group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def start(code_or_cmd: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """A driver subprocess in its own session (so it and its Ray can be killed as one group)."""
    with log.open("wb") as f:
        return subprocess.Popen(
            code_or_cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_killed(proc: subprocess.Popen, timeout_s: float, log: Path) -> None:
    """Wait for a driver that kills itself (fault injection) or is killed; then reap its group."""
    try:
        proc.wait(timeout=timeout_s)
    finally:
        reap(proc.pid)
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"driver exited {proc.returncode}, not killed; its log:\n{log.read_text()[-4000:]}")


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout_s: float, log: Path) -> None:
    """SIGKILL the driver (and its Ray) once `ready()` holds, polled every 0.2 s."""
    t0 = time.monotonic()
    try:
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"driver ended ({proc.returncode}) before the kill; log:\n{log.read_text()[-4000:]}")
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"not ready to kill within {timeout_s} s; log:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        reap(proc.pid)


# --- training (pipelines.train_moe) ---------------------------------------------------------------

TRAIN_DRIVER = """
import json, os, sys
from pipelines import train_moe
from workers.training.config import TrainConfig
tc = TrainConfig.from_dict(json.loads(sys.argv[1]))
extra = {k: v for k, v in json.loads(sys.argv[2]).items()}
if "kill_driver_at_step" in extra:
    extra["driver_pid"] = os.getpid()
train_moe.run(tc, experiment=sys.argv[3], extra=extra)
"""


def train_config(workers: int = 1, steps: int = 12, ckpt_every: int = 4):
    """The smallest training the kill cases run: the tiny DSA-MoE preset, every step logged."""
    from workers.training.config import tiny

    return tiny().replace(
        steps=steps,
        ckpt_every=ckpt_every,
        log_every=1,
        eval_windows=8,
        num_workers=workers,
        ep_size=workers,
        cpus_per_worker=0.5,
        max_failures=2,
    )


def killed_train_driver(tc, extra: dict, experiment: str, work: Path, store: Path, storage: Path) -> str:
    """Run train_moe in a subprocess driver that the fault in `extra` kills; returns its MLflow run id."""
    from mlflow.tracking import MlflowClient

    log = work / f"{experiment}-driver.log"
    cmd = [sys.executable, "-c", TRAIN_DRIVER, json.dumps(tc.to_dict()), json.dumps(extra), experiment]
    wait_killed(start(cmd, env=env_for(store, storage), cwd=work, log=log), 600, log)
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run.info.run_id


def heldout(metrics: dict[str, float]) -> dict[str, float]:
    """The final numbers compared: held-out NLL of the model (sparse and dense attention); random-k is random."""
    return {k: v for k, v in metrics.items() if k.startswith("heldout_") and "random" not in k}


def compare(got: dict[str, float], want: dict[str, float], rel_tol: float) -> tuple[bool, str]:
    import math

    if set(got) != set(want):
        return False, f"metrics differ: {sorted(set(got) ^ set(want))}"
    worst = max((abs(got[k] - want[k]) / max(abs(want[k]), 1e-12), k) for k in want)
    return worst[0] <= rel_tol and all(
        math.isfinite(v) for v in got.values()
    ), f"max rel diff {worst[0]:.1e} ({worst[1]})"


def train_health(client, experiment: str) -> tuple[int, int]:
    """(models lost, runs left RUNNING) in an experiment: a run that trained to the end without a
    model artifact counts as lost unless a later run resumed it and holds one."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    running = sum(r.info.status == "RUNNING" for r in runs)
    with_model = [r for r in runs if any(a.path == "model" for a in client.list_artifacts(r.info.run_id))]
    return (0 if with_model else 1), running


def train_case(
    case: str, fault: str, tc, extra: dict, expected_step: int, reference: dict[str, float], work: Path
) -> Outcome:
    """Kill a training run as `extra` says (in a subprocess driver when the fault kills the driver),
    resume it in this process, compare with `reference` (an uninterrupted run's held-out metrics)."""
    from mlflow.tracking import MlflowClient

    from pipelines import train_moe
    from workers.runtime import tracking

    t0 = time.monotonic()
    experiment = f"kills-{case.replace('/', '-')}"
    client = MlflowClient(tracking.tracking_uri())
    if "kill_driver_at_step" in extra:
        store = Path(tracking.tracking_uri().removeprefix("sqlite:///"))
        killed = killed_train_driver(tc, extra, experiment, work, store, Path(os.environ["CALIBRAY_STORAGE"]))
        resumed = train_moe.run(tc, experiment=experiment, resume=killed)
        resumed_at = client.get_run(resumed).data.tags["resumed_at_step"]
        steps = [m.step for m in client.get_metric_history(resumed, "train_loss")]
        want_steps = list(range(expected_step + 1, tc.steps + 1))
    else:  # the worker dies inside one fit: Ray Train replaces it, the run goes on
        resumed = train_moe.run(tc, experiment=experiment, extra=extra)
        history = client.get_metric_history(resumed, "resumed_from_step")
        resumed_at = ",".join(str(int(m.value)) for m in history) or "none (step 0)"
        steps = [m.step for m in client.get_metric_history(resumed, "train_loss")]
        want_steps = list(range(1, tc.steps + 1))
    same, detail = compare(heldout(client.get_run(resumed).data.metrics), reference, TRAIN_REL_TOL)
    lost, running = train_health(client, experiment)
    problems = [] if sorted(steps) == want_steps else [f"train_loss logged at steps {sorted(steps)}"]
    seconds = time.monotonic() - t0
    return Outcome(case, fault, resumed_at, str(expected_step), same, detail, lost, running, seconds, problems)
