"""The one tracking layer: MLflow URI resolution, runs that end FAILED on error, tags.

``tracking_uri()``: ``MLFLOW_TRACKING_URI`` if set (a cluster's ``mlflow server``), else a
SQLite file at the repository root (``mlruns.db``). ``file:`` stores are refused by MLflow 3.
One writer at a time: the driver, or rank 0 inside a Ray Train fit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DB = REPO_ROOT / "mlruns.db"
ARTIFACTS = REPO_ROOT / "artifacts"  # pipelines' local outputs (Ray Train results, exports)


class TrackingError(ValueError):
    pass


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        if uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks")):
            raise TrackingError(
                f"MLFLOW_TRACKING_URI={uri!r}: file stores are refused by MLflow 3; "
                "use sqlite:///path.db or http://host:port"
            )
        return uri
    return f"sqlite:///{DEFAULT_DB}"


def download(uri: str) -> Path:
    """A local copy of an MLflow artifact (``runs:/<id>/<path>``, ``mlflow-artifacts:...``) from this store."""
    mlflow.set_tracking_uri(tracking_uri())
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (query string dropped); None for any other store."""
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]) if uri.startswith("sqlite:///") else None


def _artifact_location(uri: str) -> Path | None:
    """A local store keeps artifacts beside its database (`mlartifacts/`), not in the caller's working
    directory; a tracking server decides for itself (None). Decided by the URI alone: MLflow's
    set_tracking_uri exports MLFLOW_TRACKING_URI, so a rule on that variable changed mid-process."""
    db = _sqlite_path(uri)
    return None if db is None else db.parent / "mlartifacts"


def _probe_dir(d: Path, what: str) -> None:
    """`d` exists (or can be made) and a file can be created in it; else a TrackingError naming it.

    A real write, not os.access: root passes os.access everywhere, read-only mounts fail only on write."""
    import tempfile

    existing = next((p for p in (d, *d.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise TrackingError(f"{what} {d}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise TrackingError(f"{what} {d}: cannot write in {existing} ({e.strerror or e})") from None


def check_store(uri: str | None = None) -> str:
    """Fail in seconds, naming the path, when the local store cannot be written; returns the URI.

    MLflow retries a SQLite store it cannot write for about 109 s, then raises a bare sqlite
    error. Checked: the database file opens for writing (a write transaction that is rolled
    back), its directory takes new files (SQLite's journal goes beside the database), and the
    artifact directory can be written. A tracking server (http) checks its own storage."""
    import sqlite3

    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///"):
        return uri
    db = _sqlite_path(uri)
    if not db.parent.is_dir():
        raise TrackingError(f"MLFLOW_TRACKING_URI={uri!r}: the directory {db.parent} does not exist")
    _probe_dir(db.parent, f"MLFLOW_TRACKING_URI={uri!r}: the store's directory")
    if db.exists():
        try:
            con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=2)
            try:
                # A real write, rolled back: a read-only file opens "rw" silently read-only, and
                # BEGIN IMMEDIATE alone succeeds on it.
                con.execute("BEGIN IMMEDIATE")
                con.execute("CREATE TABLE calibray_write_probe (x)")
                con.rollback()
            finally:
                con.close()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e):  # busy with another writer is not an unusable store
                raise TrackingError(f"MLFLOW_TRACKING_URI={uri!r}: cannot write {db} ({e})") from None
        except sqlite3.DatabaseError as e:
            raise TrackingError(f"MLFLOW_TRACKING_URI={uri!r}: {db} is not an SQLite database ({e})") from None
    location = _artifact_location(uri)
    if location is not None:
        _probe_dir(location, "artifact directory")
    return uri


# MLflow stores each experiment's and run's artifact location as an absolute URI; these tables and
# columns hold them (MLflow 3's schema), rewritten by `relocate` when the store has moved.
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
)


def relocate(uri: str) -> str | None:
    """A local store whose directory was moved (or copied) keeps working: locations recorded under
    an artifact root that no longer exists are re-pointed at this store's own root, beside its
    database. Returns the old root when it rewrote anything. Artifacts are thus found relative
    to the store, wherever it lives; a tracking server (http) keeps its own locations."""
    import sqlite3

    root = _artifact_location(uri)
    db = _sqlite_path(uri)
    if root is None or db is None or not db.is_file():
        return None
    new = root.as_uri()
    con = sqlite3.connect(db, timeout=30)
    try:
        found = [r[0] for r in con.execute("SELECT DISTINCT artifact_location FROM experiments")]
        olds = {loc for loc in found if loc and loc.startswith("file://") and loc != new}
        olds = {o for o in olds if o.rstrip("/").endswith(root.name) and not Path(o.removeprefix("file://")).exists()}
        if len(olds) != 1:
            return None  # nothing moved, or several foreign roots: leave the store as it is
        (old,) = olds
        with con:
            for table, column in LOCATION_COLUMNS:
                con.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, len(old), old),
                )
        return old
    finally:
        con.close()


def setup(experiment: str | None = None) -> str | None:
    """Point MLflow at the tracking URI (a moved local store re-pointed first: `relocate`) and make
    sure ``experiment`` exists; returns its id (None: only point MLflow at the store)."""
    uri = check_store()
    relocate(uri)
    mlflow.set_tracking_uri(uri)
    if experiment is None:
        return None
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = _artifact_location(uri)
    try:
        # the experiment kind MLflow's UI opens on: runs and metrics, not its GenAI trace overview
        tags = {"mlflow.experimentKind": "custom_model_development"}
        return client.create_experiment(
            experiment, artifact_location=location.as_uri() if location else None, tags=tags
        )
    except mlflow.exceptions.MlflowException:
        return client.get_experiment_by_name(experiment).experiment_id  # created concurrently


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _clean(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def log_params(params: dict[str, Any], run_id: str | None = None) -> None:
    """Log a flat dict as params (in batches; MLflow caps a batch at 100)."""
    items = [mlflow.entities.Param(k, _clean(v)) for k, v in sorted(params.items())]
    client = MlflowClient(tracking_uri())
    run_id = run_id or mlflow.active_run().info.run_id
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def metric_key(name: str) -> str:
    """A display name ("KIVI-4 (G32 R128)") as an MLflow metric or param key (letters, digits, _ . - only)."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name).strip("_")


def trial_runs(
    pipeline: str,
    *,
    name: Callable[[dict], str] | None = None,
    tags: Callable[[dict], dict] | None = None,
    params: Callable[[dict], dict] | None = None,
):
    """A Ray Tune callback (Tune's `MLflowLoggerCallback`) that logs every trial live as an MLflow
    child run of the active run: its config as params (the setting, never in a metric name), each
    reported result's numbers as metrics at the result's `step` (else the trial's iteration), ended
    FINISHED or FAILED with the trial. Tune runs callbacks in the driver, the store's one writer.

    `name(config)` is the child's run name (default: Tune's trial name), `tags(config)` and
    `params(config)` add per-trial tags and params. Tune's own bookkeeping (time, pid, config,
    iteration counters) and non-numbers are not logged, and each result is one batched write
    rather than one write per key."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.result import AUTO_RESULT_KEYS
    from ray.tune.utils import flatten_dict

    run = mlflow.active_run()
    uri = tracking_uri()
    experiment = MlflowClient(uri).get_experiment(run.info.experiment_id).name
    common = run_tags(f"{pipeline}_trial", **{"mlflow.parentRunId": run.info.run_id})
    skip = {*AUTO_RESULT_KEYS, "done", "step", "trial_id", "experiment_tag"}

    class TrialRuns(MLflowLoggerCallback):
        def log_trial_start(self, trial):
            if trial in self._trial_runs:
                return
            cfg = trial.config
            own = {"trial_name": str(trial), **(tags(cfg) if tags else {})}
            child = self.mlflow_util.start_run(tags={**self.tags, **own}, run_name=name(cfg) if name else str(trial))
            self._trial_runs[trial] = child.info.run_id
            log_params({**flatten_dict(cfg, delimiter="."), **(params(cfg) if params else {})}, child.info.run_id)

        def log_trial_result(self, iteration, trial, result):
            numbers = {
                k: v
                for k, v in result.items()
                if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            step = int(result.get("step", result["training_iteration"]))
            log_metrics(numbers, step=step, run_id=self._trial_runs[trial])

    return TrialRuns(tracking_uri=uri, experiment_name=experiment, tags=common, save_artifact=False)


def model_label(address: str) -> str:
    """A model address as a run-name part: `runs:/<id>/model` -> `run<id[:8]>`, a path -> its last
    component, a shipped name as is."""
    a = str(address).rstrip("/")
    m = re.match(r"^runs:/([0-9a-f]{8})", a)
    if m:
        return f"run{m.group(1)}"
    return Path(a.removeprefix("hf:")).name


def run_label(method: str, model: str, *settings: str) -> str:
    """The one shape of a default run name: what ran, on which model, at which setting
    (e.g. `kvtuner-smollm2-135m-text-b3.25`), so the MLflow run list reads without opening runs."""
    return "-".join([method, model_label(model), *(s for s in settings if s)])


def log_report(result: dict, markdown: str, stem: str) -> None:
    """A benchmark's whole result as <stem>.json and its printed table as <stem>.md, on the active run."""
    mlflow.log_text(json.dumps(result, indent=1), f"{stem}.json")
    mlflow.log_text(markdown, f"{stem}.md")


def log_metrics(metrics: dict[str, float], step: int | None = None, run_id: str | None = None) -> None:
    client = MlflowClient(tracking_uri())
    run_id = run_id or mlflow.active_run().info.run_id
    ts = int(time.time() * 1000)
    items = [mlflow.entities.Metric(k, float(v), ts, step or 0) for k, v in sorted(metrics.items())]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


_RUNS_STARTED = 0
# (run id, experiment) of the run every start_run nests under while `nested_under` is active: the
# demo's parent. A tag, not MLflow's active-run stack, so each pipeline keeps its own `with` block.
_PARENT: tuple[str, str] | None = None
VERSIONED = ("torch", "transformers", "ray", "mlflow", "deepspeed", "triton")


def versions() -> dict[str, str]:
    """`version.<package>` tags: what produced a run, recorded on every run."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in VERSIONED:
        try:
            out[f"version.{name}"] = version(name)
        except PackageNotFoundError:
            out[f"version.{name}"] = "absent"
    return out


def run_tags(pipeline: str, **extra: str) -> dict[str, str]:
    """What every run records about itself, however it is created (start_run, a sweep's or a
    search's child runs, the demo's parent): its pipeline, the git commit, the versions."""
    return {"pipeline": pipeline, "git_commit": git_commit(), **versions(), **extra}


@contextlib.contextmanager
def nested_under(run_id: str, experiment: str) -> Iterator[None]:
    """Inside this block every `start_run` lands in `experiment` as a child of `run_id` (the MLflow
    UI's nesting), whatever experiment its pipeline would have chosen."""
    global _PARENT
    before, _PARENT = _PARENT, (run_id, experiment)
    try:
        yield
    finally:
        _PARENT = before


def runs_started() -> int:
    """How many runs `start_run` began in this process."""
    return _RUNS_STARTED


@contextlib.contextmanager
def start_run(
    pipeline: str,
    *,
    experiment: str | None = None,
    run_name: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    run_id: str | None = None,
    nested: bool = False,
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that ends FINISHED, or FAILED (keeping what it logged) on any exception.

    ``experiment`` defaults to the pipeline's name (one experiment per pipeline); inside
    `nested_under` the run goes to the parent's experiment, as its child. ``run_id`` resumes an
    existing run (a run killed outright stays RUNNING; resuming it is how it gets a proper end).
    """
    global _RUNS_STARTED
    all_tags = run_tags(pipeline, **(tags or {}))
    if _PARENT is not None:
        all_tags["mlflow.parentRunId"], experiment = _PARENT
    exp_id = setup(experiment or pipeline)  # an unusable store is bad input: nothing started yet
    _RUNS_STARTED += 1  # from here on an error is the run's failure, not bad input (workers.runtime.cli)
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else exp_id,
        run_name=run_name,
        nested=nested,
        tags=None if run_id else all_tags,
    ) as run:
        if run_id:
            mlflow.set_tags({"resumed": "true"})
        elif params:
            log_params(params)
        try:
            yield run
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise


def check_run(run_id: str, what: str = "--resume") -> None:
    """A run id the user gave names a run of this store; else a TrackingError naming both, raised
    without creating a store where there is none (MLflow makes an empty database on first query)."""
    uri = check_store()
    db = _sqlite_path(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"{what} {run_id!r}: no such run, the MLflow store {db} does not exist")
    try:
        MlflowClient(uri).get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"{what} {run_id!r}: no such run in the MLflow store {uri} ({e.message})") from None


def mark_failed_if_running(run_id: str, what: str = "--resume") -> None:
    """A run killed outright stays RUNNING; a resume marks it FAILED before continuing elsewhere,
    and with it the child runs it was writing (live Tune trials), which died with it. A run id that
    is not in the store is bad input (check_run; `what` says where the id came from)."""
    check_run(run_id, what)
    client = MlflowClient(tracking_uri())
    run = client.get_run(run_id)
    stale = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'"
    )
    for r in [run, *stale]:
        if r.info.status == "RUNNING":
            client.set_terminated(r.info.run_id, status="FAILED")
