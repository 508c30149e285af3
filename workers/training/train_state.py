"""The training checkpoint layout, one directory per reported checkpoint (the same for every layout):

    train_state.pt       {"model": unsharded state_dict, "step"}  (rank 0; what evaluation and resume load)
    train_meta.json      {"step", "world_size", "config", "maxvio_history"}  (rank 0)
    optim_rank<r>.pt     optimizer state of rank r (rank 0 only when every rank holds the same state)

The model is always unsharded, so a run resumes on any expert-parallel size; optimizer state is
restored only where it still fits (replicated, or the same world size).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.training.config import TrainConfig

STATE_FILE = "train_state.pt"
META_FILE = "train_meta.json"


def optim_file(rank: int) -> str:
    return f"optim_rank{rank}.pt"


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


def meta(tc: TrainConfig, step: int, world: int, maxvio_history: list[list[float]]) -> dict:
    return {"step": step, "world_size": world, "config": tc.to_dict(), "maxvio_history": maxvio_history}


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


def latest_checkpoint(results: Path, run_id: str) -> Path | None:
    """The newest complete checkpoint directory a run's trainer left under `results` (Ray Train's storage)."""
    best, best_step = None, -1
    for meta in (results / f"train-{run_id}").rglob(META_FILE):
        step = json.loads(meta.read_text())["step"]
        if step > best_step and (meta.parent / STATE_FILE).exists():
            best, best_step = meta.parent, step
    return best
