"""Configuration, validation and data of pipelines.prefixkv (everything checked before any work)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tuning.prefixkv import RATIO_GRID, n_protected, validate_ratio
from workers.data.corpus import load_corpus
from workers.data.retrieval import VALUE_LEN, eval_set

ATTENTION_SCORES = ("sum", "window")


@dataclass(frozen=True)
class RunConfig:
    model: str
    samples: int = 32
    workers: int = 2
    data: str = "text"
    corpus: str = "pydoc"
    context: int = 192
    continuation: int = 64
    scores: tuple[str, ...] = ("sum", "window")
    window: int = 16
    pool: int = 1  # SnapKV-style score pooling over neighbouring keys (odd; 1 = off)
    n_sink: int = 4
    max_steps: int = 64
    eval_ratios: tuple[float, ...] = (0.1, 0.2, 0.5)
    eval_samples: int = 64
    batch_size: int = 8
    bootstrap: int = 200
    seed: int = 0
    device: str = "cpu"
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    experiment: str = "prefixkv"
    run_name: str | None = None
    resume: str | None = None

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"--{field.replace('_', '-')}={getattr(self, field)!r}: {why}")

        for field in ("samples", "workers", "context", "continuation", "window", "max_steps", "batch_size"):
            if getattr(self, field) < 1:
                bad(field, "must be >= 1")
        if self.pool < 1 or self.pool % 2 == 0:
            bad("pool", "must be an odd int >= 1 (1 = no pooling)")
        for field in ("eval_samples", "bootstrap", "n_sink"):
            if getattr(self, field) < 0:
                bad(field, "must be >= 0")
        if self.workers > self.samples:
            bad("workers", f"more actors than calibration samples ({self.samples})")
        if self.data not in ("text", "retrieval"):
            bad("data", "one of text, retrieval")
        if (
            not self.scores
            or any(s not in ATTENTION_SCORES for s in self.scores)
            or len(set(self.scores)) != len(self.scores)
        ):
            bad("scores", f"a comma-separated list of distinct scorings from {ATTENTION_SCORES}")
        for r in self.eval_ratios:
            try:
                validate_ratio(r)
            except ValueError as e:
                raise ValueError(f"--eval-ratios: {e}") from None
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            bad("device", "cpu or cuda[:N]")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError(
                f"--cpus-per-worker must be > 0 and --gpus-per-worker >= 0, got {self.cpus_per_worker}, "
                f"{self.gpus_per_worker}"
            )
        # The smallest grid ratio must leave room beyond the sinks and the last token.
        need = n_protected(self.context, self.n_sink)
        for r in (min(RATIO_GRID), *self.eval_ratios):
            if math.floor(r * self.context + 0.5) < need:
                raise ValueError(
                    f"--context={self.context}: keep ratio {r} keeps {math.floor(r * self.context + 0.5)} tokens "
                    f"per layer, fewer than the {need} sinks + last token (--n-sink={self.n_sink})"
                )

    def params(self) -> dict:
        d = dataclasses.asdict(self)
        d["scores"] = ",".join(self.scores)
        d["eval_ratios"] = ",".join(f"{r:g}" for r in self.eval_ratios)
        d["ratio_grid"] = ",".join(f"{r:g}" for r in RATIO_GRID)
        return d

    @property
    def sequence_len(self) -> int:
        return self.context + (self.continuation if self.data == "text" else VALUE_LEN)


def validate_model(cfg: RunConfig) -> int:
    """Check the model address resolves and fits the sequence length -> number of layers."""
    from workers.hf_adapter import HFModelError, is_hf_address

    if is_hf_address(cfg.model):
        path = Path(cfg.model[3:]).expanduser()
        if not (path / "config.json").is_file():
            raise HFModelError(f"--model={cfg.model!r}: no config.json in {path}")
        c = json.loads((path / "config.json").read_text())
        n_layers, max_len = int(c["num_hidden_layers"]), int(c.get("max_position_embeddings", 1 << 30))
    else:
        from workers.model.checkpoint import load_config

        mc = load_config(cfg.model)
        n_layers, max_len = mc.n_layers, mc.max_seq_len
    if cfg.sequence_len > max_len:
        raise ValueError(
            f"--context={cfg.context} plus {cfg.sequence_len - cfg.context} scored tokens exceeds the model's "
            f"max_seq_len={max_len}"
        )
    return n_layers


def calibration_data(cfg: RunConfig) -> tuple[torch.Tensor, str]:
    """Calibration prompts [samples, context] from the calib split, and the corpus SHA-256."""
    corpus = load_corpus(cfg.corpus)
    if cfg.data == "text":
        g = torch.Generator().manual_seed(cfg.seed)
        return corpus.sample_windows("calib", cfg.context, cfg.samples, g), corpus.sha256
    es = eval_set(corpus.calib, n=cfg.samples, length=cfg.context + VALUE_LEN, seed=cfg.seed, split="calib")
    return es.prompt, corpus.sha256


def eval_data(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out (context [n, C], continuation [n, M]) for text, (prompt, value) for retrieval."""
    corpus = load_corpus(cfg.corpus)
    if cfg.data == "text":
        g = torch.Generator().manual_seed(cfg.seed + 1)
        w = corpus.sample_windows("heldout", cfg.sequence_len, cfg.eval_samples, g)
        return w[:, : cfg.context], w[:, cfg.context :]
    es = eval_set(corpus.heldout, n=cfg.eval_samples, length=cfg.sequence_len, seed=cfg.seed + 1, split="heldout")
    return es.prompt, es.value
