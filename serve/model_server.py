"""The model deployment: one CalibLM replica with its calibration and a batching engine.

Callers stream events from ``generate`` (``handle.options(stream=True).generate.remote(body)``):
first ``{"type": "accepted", "prompt_tokens": n}`` or ``{"type": "error", "status": 4xx, "param", "message"}``,
then the engine's token events and one ``done`` event. Validation that needs the tokenizer and
the model's context lives here, so it holds for every client of the deployment, not only HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from ray import serve

from serve.caches import cache_factory
from serve.calibration import Calibration
from serve.engine import Engine, EngineConfig, GenRequest
from workers.data.tokenizer import ByteTokenizer


@dataclass(frozen=True)
class ModelInfo:
    """What the builder needs to validate a deployment before loading any weights."""

    n_layers: int
    max_seq_len: int
    vocab_size: int
    has_indexer: bool


def describe_model(address: str) -> ModelInfo:
    """Any model address (workers.model.hf.address) -> ModelInfo (reads configs only).

    Serving tokenizes with the byte tokenizer, so an hf: model must have the 256-token byte
    vocabulary (the project's own exports, workers.model.hf.export); others are refused here."""
    from workers.model.hf.address import describe

    d = describe(address)
    info = ModelInfo(d.n_layers, d.max_seq_len, d.vocab_size, d.has_indexer)
    if info.vocab_size != ByteTokenizer.vocab_size:
        raise ValueError(
            f"model={address!r}: vocabulary of {info.vocab_size} tokens; serving uses the byte tokenizer "
            f"({ByteTokenizer.vocab_size} ids)"
        )
    return info


def load_model(address: str, device: str) -> torch.nn.Module:
    """CalibLM for runs:/ and checkpoint directories, HFCausalLM (workers.model.hf.address) for hf:."""
    from workers.model.hf.address import load_any

    return load_any(address, device=device).eval()


def _bad(param: str, message: str, status: int = 400) -> dict:
    return {"type": "error", "status": status, "param": param, "message": message}


@serve.deployment(name="Model")
class ModelServer:
    def __init__(
        self,
        model: str,
        served_name: str,
        calibration: dict,
        engine: dict,
        max_tokens_limit: int,
        torch_threads: int | None = None,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model, device)
        self.cal = Calibration.from_dict(calibration)
        cfg = self.model.cfg  # ModelConfig, or HFConfigView for hf: models
        engine_cfg = EngineConfig(**{"max_context": cfg.max_seq_len, **engine})
        self.engine = Engine(
            self.model, cache_factory(cfg, self.cal), lambda t: bytes([t]), engine_cfg, pattern=self.cal.pattern
        )
        self.tokenizer = ByteTokenizer()
        self.name = served_name
        self.max_tokens_limit = max_tokens_limit

    def info(self) -> dict:
        return {
            "name": self.name,
            "max_context": self.engine.config.max_context,
            "max_tokens_limit": self.max_tokens_limit,
            "calibration": self.cal.describe(),
            "stats": self.engine.stats(),
        }

    async def generate(self, body: dict) -> AsyncIterator[dict]:
        """body: a validated CompletionRequest as a dict. Yields events (see module docstring)."""
        ids = self.tokenizer.encode(body["prompt"])
        ctx, max_tokens = self.engine.config.max_context, body["max_tokens"]
        if max_tokens > self.max_tokens_limit:
            yield _bad(
                "max_tokens", f"max_tokens={max_tokens} exceeds this deployment's limit of {self.max_tokens_limit}"
            )
            return
        if len(ids) >= ctx:
            yield _bad("prompt", f"prompt is {len(ids)} tokens; the context holds {ctx} (prompt + max_tokens)")
            return
        if len(ids) + max_tokens > ctx:
            yield _bad(
                "max_tokens",
                f"max_tokens={max_tokens} with a {len(ids)}-token prompt exceeds the context of {ctx} tokens",
            )
            return
        yield {"type": "accepted", "prompt_tokens": len(ids)}
        req = GenRequest(ids, max_tokens, body["temperature"], body["top_p"], body["seed"], body["stop"] or [])
        async for event in self.engine.generate(req):
            yield event

    def check_health(self) -> None:
        if not self.engine.healthy():
            raise RuntimeError(f"engine unhealthy: {self.engine.stats()}")
