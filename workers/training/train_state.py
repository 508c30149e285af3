"""The training checkpoint layout, one directory per reported checkpoint (the same for every layout):

    train_state.pt       {"model": unsharded state_dict, "step"}  (rank 0; what evaluation and resume load)
    train_meta.json      {"step", "world_size", "writers", "config", "maxvio_history"}  (rank 0)
    optim_rank<r>.pt     optimizer state of rank r (rank 0 only when every rank holds the same state)
    files_rank<r>.json   {file name: bytes} of what rank r wrote (every writing rank)

The model is always unsharded, so a run resumes on any expert-parallel size; optimizer state is
restored only where it still fits (replicated, or the same world size).

In Ray Train's storage a checkpoint is the directory ``step_<step>`` (``dir_name``). Each rank
uploads its own share; ``newest_complete`` finds the newest directory whose every share arrived
whole (by the ``files_rank`` manifests), which is how a resume finds a checkpoint that was written
after the driver died and so never registered with Ray Train's controller.

A training run's MLflow tags ``ray_train_name`` / ``ray_storage`` (``ray_run``) name the Ray Train
run it trains in; ``find_resume`` reads them back, so a resumed run trains in the same Ray Train
run (same ``RunConfig(name, storage_path)``: Ray Train restores it) and every resume of a resume
finds the same checkpoints. One mechanism for every training pipeline (train_moe, train_moe_hf).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.training.config import TrainConfig

STATE_FILE = "train_state.pt"
META_FILE = "train_meta.json"
DIR_PREFIX = "step_"


def optim_file(rank: int) -> str:
    return f"optim_rank{rank}.pt"


def manifest_file(rank: int) -> str:
    return f"files_rank{rank}.json"


def dir_name(step: int) -> str:
    """The checkpoint's directory in Ray Train's storage: sortable, and the step is readable from a listing."""
    return f"{DIR_PREFIX}{step:08d}"


@dataclass
class Restored:
    """What a checkpoint gives back beyond the model weights."""

    step: int = 0
    opt_state: dict | None = None  # this rank's optimizer state, None = start it fresh
    maxvio_history: list[list[float]] = field(default_factory=list)  # [steps][layers]


def write(directory: Path, rank: int, *, model_state: dict | None, opt_state: dict | None, meta: dict) -> None:
    """This rank's share of one checkpoint: the model and meta when given (rank 0), its optimizer state when given."""
    if model_state is not None:
        torch.save({"model": model_state, "step": meta["step"]}, directory / STATE_FILE)
        (directory / META_FILE).write_text(json.dumps(meta))
    if opt_state is not None:
        torch.save(opt_state, directory / optim_file(rank))
    # sizes taken once the rest is written: a share whose upload was cut short has a file missing or short
    sizes = {f.name: f.stat().st_size for f in directory.iterdir() if f.name != manifest_file(rank)}
    (directory / manifest_file(rank)).write_text(json.dumps(sizes))


def meta(
    tc: TrainConfig, step: int, world: int, maxvio_history: list[list[float]], writers: Sequence[int] = (0,)
) -> dict:
    """writers: the ranks whose shares the checkpoint needs (all of them when optimizer state is sharded)."""
    return {
        "step": step,
        "world_size": world,
        "writers": list(writers),
        "config": tc.to_dict(),
        "maxvio_history": maxvio_history,
    }


def read(directory: Path, model: torch.nn.Module, rank: int, world: int, *, replicated: bool) -> Restored:
    """Load the unsharded weights into the (not yet sharded) model; return the rest.

    replicated: every rank holds the same optimizer state (rank 0's file serves all, at any world
    size); otherwise this rank's own file, and only when the world size is unchanged.
    """
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    info = json.loads((directory / META_FILE).read_text())
    source = 0 if replicated else (rank if info.get("world_size") == world else None)
    opt_state = None
    if source is not None and (directory / optim_file(source)).exists():
        # weights_only=False: DeepSpeed's ZeRO state holds more than tensors; these files are our own
        opt_state = torch.load(directory / optim_file(source), map_location="cpu", weights_only=False)
    elif replicated and state.get("opt") is not None:
        # checkpoints written before the loops merged kept the data-parallel AdamW state inline
        opt_state = state["opt"]
    return Restored(int(state["step"]), opt_state, [list(r) for r in info.get("maxvio_history", [])])


def load_model_state(directory: Path) -> dict:
    """The unsharded model state_dict of a checkpoint."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)["model"]


def _read_json(fs, path: str):
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def is_complete(fs, path: str) -> bool:
    """Every writing rank's share of the checkpoint at ``path`` (in pyarrow filesystem ``fs``) arrived whole."""
    import pyarrow.fs

    sizes = {i.base_name: i.size for i in fs.get_file_info(pyarrow.fs.FileSelector(path)) if i.is_file}
    try:
        writers = _read_json(fs, f"{path}/{META_FILE}")["writers"] if META_FILE in sizes else None
        if writers is None:
            return False
        for rank in writers:
            if manifest_file(rank) not in sizes:
                return False
            if any(sizes.get(name) != size for name, size in _read_json(fs, f"{path}/{manifest_file(rank)}").items()):
                return False
    except (OSError, ValueError, KeyError, TypeError):  # a share cut short mid-write
        return False
    return STATE_FILE in sizes


def newest_complete(experiment_uri: str) -> tuple[str, int] | None:
    """(URI, step) of the newest complete checkpoint of a Ray Train run's storage directory, if any."""
    import pyarrow.fs

    from workers.runtime.storage import filesystem, join

    fs, root = filesystem(experiment_uri)
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        return None
    steps = sorted(
        (int(i.base_name.removeprefix(DIR_PREFIX)), i.path)
        for i in fs.get_file_info(pyarrow.fs.FileSelector(root))
        if i.type == pyarrow.fs.FileType.Directory
        and i.base_name.startswith(DIR_PREFIX)
        and i.base_name.removeprefix(DIR_PREFIX).isdigit()
    )
    for step, path in reversed(steps):
        if is_complete(fs, path):
            return join(experiment_uri, dir_name(step)), step
    return None


def step_of(checkpoint) -> int:
    """The step of a ``ray.train.Checkpoint`` in this layout, read from its storage without a download."""
    return int(_read_json(checkpoint.filesystem, f"{checkpoint.path}/{META_FILE}")["step"])


@dataclass(frozen=True)
class Resume:
    """Where a resumed run continues: its Ray Train run (name, storage) and the newest complete
    checkpoint there (URI, step)."""

    run_id: str
    name: str
    storage: str
    uri: str
    step: int

    def tags(self) -> dict[str, str]:
        """The resumed run's MLflow tags saying what it continues."""
        return {"resumed_from": self.run_id, "resumed_at_step": str(self.step)}


def find_resume(run_id: str, storage_given: str | None = None) -> Resume:
    """The Ray Train run an MLflow training run (or the run it resumed) trained in, and its newest
    complete checkpoint; FileNotFoundError when there is none. ``storage_given``: ``--storage``,
    for a storage that moved since (else the run's tag, else the default)."""
    from mlflow.tracking import MlflowClient

    from workers.runtime import storage, tracking

    tags = MlflowClient(tracking.tracking_uri()).get_run(run_id).data.tags
    name = tags.get("ray_train_name", f"train-{run_id}")  # runs from before the tag: named by their id
    where = storage.storage_uri(storage_given or tags.get("ray_storage"))
    found = newest_complete(storage.join(where, name))
    if found is None:
        raise FileNotFoundError(f"--resume={run_id!r}: no complete checkpoint in {storage.join(where, name)}")
    return Resume(run_id, name, where, *found)


def resume_from(run_id: str, storage_given: str | None = None) -> Resume:
    """``find_resume``, then the old run marked FAILED if a kill left it RUNNING (only once its
    checkpoint is known to exist: a resume that cannot start leaves the old run as it was)."""
    from workers.runtime import tracking

    found = find_resume(run_id, storage_given)
    tracking.mark_failed_if_running(run_id)
    print(f"resuming run {run_id} from step {found.step} ({found.uri})", flush=True)
    return found


def ray_run(run_id: str, resume: Resume | None, storage_given: str | None) -> tuple[str, str]:
    """(name, storage) of the Ray Train run the active MLflow run ``run_id`` trains in (a resume's:
    the run it continues), tagged on that MLflow run for ``find_resume``."""
    import mlflow

    from workers.runtime import storage

    if resume is not None:
        name, where = resume.name, resume.storage
    else:
        name, where = f"train-{run_id}", storage.storage_uri(storage_given)
    mlflow.set_tags({"ray_train_name": name, "ray_storage": where})
    return name, where


def local_dir(checkpoint) -> Path:
    """A local directory holding a ``ray.train.Checkpoint`` (downloaded when its storage is remote)."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return Path(checkpoint.path)
    return Path(checkpoint.to_directory())
