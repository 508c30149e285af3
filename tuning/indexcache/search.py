"""Training-free greedy IndexCache search over an abstract candidate evaluator.

    pattern = "F" * N
    repeat K = N - n_full(min retention) times:
        for every layer l >= 1 still F: loss[l] = calibration NLL with pattern[l] := S
        commit the l with the smallest loss (ties: lowest l)

One run serves every requested retention: the trace passes through each number of F
layers on its way down. The search state (pattern + trace + cost) is a small JSON document
saved after every step, so a stopped search resumes exactly where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tuning.indexcache.fidelity import EXACT, FidelityConfig, rank, score_candidates
from tuning.indexcache.losses import CandidateEvaluator, LossSum
from tuning.indexcache.patterns import flip, n_full_layers, validate_pattern, validate_retention

STATE_VERSION = 1
MODES = ("prefix", "naive")


@dataclass
class StepRecord:
    """One greedy step: every rung's candidate losses and the committed layer."""

    step: int
    committed: int
    loss: float
    pattern: str
    rungs: list[tuple[float, dict[int, LossSum]]]
    units: int = 0

    @property
    def final(self) -> dict[int, LossSum]:
        return self.rungs[-1][1]

    @property
    def gap(self) -> float | None:
        """Second-best minus best mean NLL on the final rung (None with one candidate)."""
        order = rank(self.final)
        if len(order) < 2:
            return None
        return self.final[order[1]].mean - self.final[order[0]].mean

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "committed": self.committed,
            "loss": self.loss,
            "pattern": self.pattern,
            "gap": self.gap,
            "units": self.units,
            "rungs": [{"fraction": f, "losses": {str(k): v.to_list() for k, v in ls.items()}} for f, ls in self.rungs],
        }

    @classmethod
    def from_dict(cls, d: dict) -> StepRecord:
        rungs = [
            (float(r["fraction"]), {int(k): LossSum.from_list(v) for k, v in r["losses"].items()}) for r in d["rungs"]
        ]
        return cls(d["step"], d["committed"], d["loss"], d["pattern"], rungs, d.get("units", 0))


@dataclass
class SearchState:
    """Everything needed to resume a search and to report it."""

    n_layers: int
    retentions: tuple[float, ...]
    mode: str = "prefix"
    fidelity: FidelityConfig = EXACT
    baseline: LossSum | None = None
    steps: list[StepRecord] = field(default_factory=list)
    init_units: int = 0

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if not self.retentions:
            raise ValueError("at least one retention is required")
        self.retentions = tuple(sorted({validate_retention(r) for r in self.retentions}, reverse=True))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def target_full(self) -> int:
        """F layers left when the search ends (the smallest requested retention)."""
        return n_full_layers(min(self.retentions), self.n_layers)

    @property
    def n_steps(self) -> int:
        return self.n_layers - self.target_full

    @property
    def done(self) -> bool:
        return len(self.steps) >= self.n_steps

    @property
    def pattern(self) -> str:
        return self.steps[-1].pattern if self.steps else "F" * self.n_layers

    def pattern_with_full(self, n_full: int) -> str:
        """The searched pattern once only `n_full` F layers remain."""
        k = self.n_layers - n_full
        if not 0 <= k <= len(self.steps):
            raise ValueError(f"the trace has {len(self.steps)} steps; {n_full} F layers needs {k}")
        return self.steps[k - 1].pattern if k else "F" * self.n_layers

    def loss_with_full(self, n_full: int) -> float:
        k = self.n_layers - n_full
        return self.steps[k - 1].loss if k else self.baseline.mean

    def pattern_at(self, retention: float) -> str:
        return self.pattern_with_full(n_full_layers(retention, self.n_layers))

    def total_units(self) -> int:
        return self.init_units + sum(s.units for s in self.steps)

    def to_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "n_layers": self.n_layers,
            "retentions": list(self.retentions),
            "mode": self.mode,
            "fidelity": self.fidelity.to_dict(),
            "baseline": self.baseline.to_list() if self.baseline else None,
            "init_units": self.init_units,
            "steps": [s.to_dict() for s in self.steps],
        }

    @classmethod
    def from_dict(cls, d: dict) -> SearchState:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"search state version {d.get('version')!r} is not {STATE_VERSION}")
        state = cls(
            n_layers=int(d["n_layers"]),
            retentions=tuple(d["retentions"]),
            mode=d["mode"],
            fidelity=FidelityConfig.from_dict(d["fidelity"]),
            baseline=LossSum.from_list(d["baseline"]) if d["baseline"] else None,
            init_units=int(d.get("init_units", 0)),
        )
        state.steps = [StepRecord.from_dict(s) for s in d["steps"]]
        for s in state.steps:
            validate_pattern(s.pattern, state.n_layers)
        return state

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def loads(cls, text: str) -> SearchState:
        return cls.from_dict(json.loads(text))


def remaining_candidates(pattern: str) -> list[int]:
    """Layers that can still be flipped: every F layer except layer 0."""
    return [i for i, c in enumerate(pattern) if c == "F" and i >= 1]


def greedy_search(
    state: SearchState,
    evaluator: CandidateEvaluator,
    on_step: Callable[[SearchState, StepRecord], None] | None = None,
    max_steps: int | None = None,
    resume_rtol: float = 1e-4,
) -> SearchState:
    """Run (or continue) the greedy search in `state`; `on_step` sees every committed step.

    On resume the evaluator is reset to the committed pattern and its loss is checked
    against the trace: a mismatch means a different model or calibration set.
    """
    if evaluator.n_layers != state.n_layers:
        raise ValueError(f"evaluator has {evaluator.n_layers} layers, search state has {state.n_layers}")
    before = evaluator.units()
    loss = evaluator.reset(state.pattern)
    if state.baseline is None:
        state.baseline = loss
        state.init_units = evaluator.units() - before
    elif state.steps:
        expected = state.steps[-1].loss
        if abs(loss.mean - expected) > resume_rtol * max(1.0, abs(expected)):
            raise ValueError(
                f"resumed pattern {state.pattern} scores {loss.mean:.6f} but the trace recorded "
                f"{expected:.6f}: the model or calibration data differ from the stopped run"
            )
    done_now = 0
    while not state.done and (max_steps is None or done_now < max_steps):
        before = evaluator.units()
        final, rungs = score_candidates(remaining_candidates(state.pattern), evaluator.evaluate, state.fidelity)
        best = rank(final)[0]
        record = StepRecord(
            step=len(state.steps) + 1,
            committed=best,
            loss=final[best].mean,
            pattern=flip(state.pattern, best),
            rungs=rungs,
        )
        evaluator.commit(best)
        record.units = evaluator.units() - before
        state.steps.append(record)
        done_now += 1
        if on_step is not None:
            on_step(state, record)
    return state


def trace_rows(state: SearchState) -> list[dict]:
    """One row per step for the MLflow trace table."""
    rows = []
    for s in state.steps:
        order = rank(s.final)
        rows.append(
            {
                "step": s.step,
                "committed_layer": s.committed,
                "n_full": s.pattern.count("F"),
                "loss": s.loss,
                "second_layer": order[1] if len(order) > 1 else None,
                "gap_to_second": s.gap,
                "n_candidates": len(s.rungs[0][1]),
                "n_full_fidelity": len(s.final),
                "pattern": s.pattern,
                "candidate_losses": {k: round(v.mean, 6) for k, v in sorted(s.rungs[0][1].items())},
            }
        )
    return rows


def check_compatible(state: SearchState, n_layers: int, retentions: Sequence[float], mode: str) -> None:
    """Refuse to resume a state with a different model depth, retentions or mode."""
    if state.n_layers != n_layers:
        raise ValueError(f"resumed search has {state.n_layers} layers, the model has {n_layers}")
    if mode != state.mode:
        raise ValueError(f"resumed search ran in mode {state.mode!r}, not {mode!r}")
    want = n_full_layers(min(retentions), n_layers)
    if want != state.target_full:
        raise ValueError(
            f"resumed search targets {state.target_full} F layers, retentions {list(retentions)} need {want}"
        )
