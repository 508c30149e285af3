"""`KVTunerConfig`: every setting of `python -m pipelines.kvtuner`, validated before any work starts."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from kernels.kv_quant import MODES
from tuning.kvtuner_space import UNIFORM_BASELINES, parse_pair, validate_budget

TASKS = ("text", "retrieval")


@dataclass(frozen=True)
class KVTunerConfig:
    model: str
    budget: list[float] = field(default_factory=lambda: [4.0, 3.25])
    task: str = "text"
    mode: str = "kivi"
    group: int = 32
    residual: int = 32
    clusters: int = 4
    num_samples: int = 48
    population: int = 8
    baselines: list[str] = field(default_factory=lambda: list(UNIFORM_BASELINES))
    length: int = 256
    continuation: int = 32
    calib_n: int = 32
    valid_n: int = 64
    report_n: int = 256
    fidelity2: bool = True
    seed: int = 0
    corpus: str = "pydoc"
    actors: int = 2
    cpus_per_actor: float = 1.0
    work_dir: str | None = None
    run_name: str | None = None

    def __post_init__(self):
        if not self.budget:
            raise ValueError("budget: give at least one average-bits budget")
        object.__setattr__(self, "budget", [validate_budget(b) for b in self.budget])
        object.__setattr__(self, "baselines", [parse_pair(b).name for b in self.baselines])
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("group", "clusters", "num_samples", "calib_n", "valid_n", "report_n", "actors", "length"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.residual < 0:
            raise ValueError(f"residual must be >= 0, got {self.residual!r}")
        if self.population < 2:
            raise ValueError(f"population must be >= 2 (NSGA-II), got {self.population!r}")
        if self.task == "text" and not 0 < self.continuation < self.length:
            raise ValueError(f"continuation must be in (0, length={self.length}), got {self.continuation!r}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor!r}")

    def quant(self) -> dict:
        """Quantizer settings shared by every cache of the run (KVQuantConfig keyword arguments)."""
        return {"mode": self.mode, "group": self.group, "residual": self.residual}

    def check_model(self, n_layers: int) -> None:
        if n_layers < 1:
            raise ValueError(f"model {self.model!r} has no layers")

    def name(self) -> str:
        return self.run_name or f"{Path(str(self.model).rstrip('/')).name}-{self.task}-{self.mode}"

    def to_params(self) -> dict:
        return {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in dataclasses.asdict(self).items()}


def model_shape(address: str) -> tuple[int, int, int]:
    """(n_layers, head_dim, n_kv_heads) read from the model's config only; clear error if missing."""
    from workers.hf_adapter import HFModelError, is_hf_address

    if is_hf_address(address):
        from transformers import AutoConfig

        path = Path(str(address)[3:]).expanduser()
        if not (path / "config.json").is_file():
            raise HFModelError(f"model={address!r}: no config.json in {path}")
        c = AutoConfig.from_pretrained(path, local_files_only=True)
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_hidden_layers, hd, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    from workers.model.checkpoint import load_config

    c = load_config(address)
    return c.n_layers, c.head_dim, c.n_kv_heads
