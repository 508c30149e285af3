"""The model deployment: one model replica with its tokenizer, its calibration and a batching engine.

Callers stream events from ``generate`` (``handle.options(stream=True).generate.remote(body)``):
first ``{"type": "accepted", "prompt_tokens": n}`` (with ``prompt_text``, and ``prompt_pieces`` for
logprobs, when the body asks to echo) or ``{"type": "error", "status": 4xx, "param", "message"}``,
then the engine's events (serve.engine) with each token's ``bytes`` added for logprobs, and one
``done`` event. Everything that needs the tokenizer or the model lives here (prompt as text,
token ids or chat messages; ids and logit-bias keys within the vocabulary; the context), so it
holds for every client of the deployment, not only HTTP.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from ray import serve

from serve.admission import KVReservations, KVShape
from serve.caches import cache_factory
from serve.calibration import Calibration
from serve.engine import Engine, EngineConfig, GenRequest
from serve.sampling import SamplingParams
from workers.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelInfo:
    """What the builder needs to validate a deployment before loading any weights."""

    n_layers: int
    max_seq_len: int
    vocab_size: int
    has_indexer: bool


def describe_model(address: str) -> ModelInfo:
    """Any model address (workers.model.hf.address) -> ModelInfo (reads configs and tokenizer files only;
    a model without a tokenizer that fits it is refused here, before any replica starts)."""
    from workers.model.hf.address import describe, load_tokenizer

    d = describe(address)
    load_tokenizer(address)
    return ModelInfo(d.n_layers, d.max_seq_len, d.vocab_size, d.has_indexer)


def stop_token_ids(address: str, tokenizer: Tokenizer) -> frozenset[int]:
    """The ids that end a sequence: generation_config.json's eos_token_id (int or list) and the
    tokenizer's eos token (SmolLM2's chat turn ends with <|im_end|>). None for byte models."""
    from workers.model.hf.address import config_file

    ids: set[int] = set()
    gen = config_file(address).parent / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
    hf = getattr(tokenizer, "hf", None)
    if hf is not None and hf.eos_token_id is not None:
        ids.add(int(hf.eos_token_id))
    return frozenset(ids)


def chat_template(tokenizer: Tokenizer) -> bool:
    hf = getattr(tokenizer, "hf", None)
    return bool(hf is not None and getattr(hf, "chat_template", None))


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
        from workers.model.hf.address import load_tokenizer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model, device)
        self.tokenizer = load_tokenizer(model)
        self.vocab_size = self.model.cfg.vocab_size
        self.stop_ids = stop_token_ids(model, self.tokenizer)
        self.chat = chat_template(self.tokenizer)
        self.cal = Calibration.from_dict(calibration)
        cfg = self.model.cfg  # ModelConfig, or HFConfigView for hf: models
        engine_cfg = EngineConfig(**{"max_context": cfg.max_seq_len, **engine})
        make_cache = cache_factory(cfg, self.cal)
        dtype = next(self.model.parameters()).dtype
        self.engine = Engine(
            self.model,
            make_cache,
            self.tokenizer.token_bytes,
            engine_cfg,
            pattern=self.cal.pattern,
            reserve=KVReservations(make_cache, KVShape.of(cfg, dtype)),
        )
        self.name = served_name
        self.max_tokens_limit = max_tokens_limit

    def info(self) -> dict:
        return {
            "name": self.name,
            "max_context": self.engine.config.max_context,
            "max_tokens_limit": self.max_tokens_limit,
            "chat": self.chat,
            "calibration": self.cal.describe(),
            "stats": self.engine.stats(),
        }

    def _prompt_ids(self, body: dict) -> tuple[list[int] | None, dict | None]:
        """body's prompt (text or ids) or messages -> (token ids, None) or (None, error event)."""
        if "messages" in body:
            if not self.chat:
                return None, _bad("messages", f"model {self.name!r} has no chat template; use /v1/completions")
            text = self.tokenizer.hf.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
            return self.tokenizer.encode(text), None
        prompt = body["prompt"]
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt), None
        bad = [t for t in prompt if t >= self.vocab_size]
        if bad:
            return None, _bad("prompt", f"token id {bad[0]} is outside the vocabulary of {self.vocab_size} ids")
        return list(prompt), None

    def _check(self, ids: list[int], body: dict) -> tuple[int, dict | None]:
        """-> (max_tokens, None) or (0, error event): the limits that depend on the deployment."""
        ctx, max_tokens = self.engine.config.max_context, body.get("max_tokens")
        for key in body.get("logit_bias") or {}:
            if int(key) >= self.vocab_size:
                return 0, _bad("logit_bias", f"token id {key} is outside the vocabulary of {self.vocab_size} ids")
        if len(ids) >= ctx:
            return 0, _bad("prompt", f"prompt is {len(ids)} tokens; the context holds {ctx} (prompt + max_tokens)")
        if max_tokens is None:  # chat without a limit: as much as the deployment and the context allow
            return min(self.max_tokens_limit, ctx - len(ids)), None
        if max_tokens > self.max_tokens_limit:
            return 0, _bad(
                "max_tokens", f"max_tokens={max_tokens} exceeds this deployment's limit of {self.max_tokens_limit}"
            )
        if len(ids) + max_tokens > ctx:
            return 0, _bad(
                "max_tokens",
                f"max_tokens={max_tokens} with a {len(ids)}-token prompt exceeds the context of {ctx} tokens",
            )
        return max_tokens, None

    async def _check_kv(self, n_tokens: int) -> dict | None:
        """A request whose KV cache alone exceeds the replica's KV budget can never be admitted."""
        _, never = await self.engine.kv_reservation(n_tokens)
        return None if never is None else _bad("max_tokens", never)

    async def generate(self, body: dict) -> AsyncIterator[dict]:
        """body: one prompt of a validated request (serve.ingress). Yields events (see module docstring)."""
        ids, err = self._prompt_ids(body)
        if err is None:
            max_tokens, err = self._check(ids, body)
        if err is None:
            err = await self._check_kv(len(ids) + max_tokens)
        if err is not None:
            yield err
            return
        k = body.get("logprobs")
        sampling = SamplingParams(
            temperature=body["temperature"],
            top_p=body["top_p"],
            presence_penalty=body.get("presence_penalty", 0.0),
            frequency_penalty=body.get("frequency_penalty", 0.0),
            logit_bias={int(t): b for t, b in (body.get("logit_bias") or {}).items()},
            logprobs=k,
        )
        echo = bool(body.get("echo"))
        accepted = {"type": "accepted", "prompt_tokens": len(ids)}
        if echo:
            accepted["prompt_text"] = self.tokenizer.decode(ids)
            if k is not None:
                accepted["prompt_pieces"] = [self.tokenizer.token_bytes(t) for t in ids]
        yield accepted
        req = GenRequest(
            ids, max_tokens, sampling, body.get("seed"), body.get("stop") or [], self.stop_ids, echo and k is not None
        )
        piece = self.tokenizer.token_bytes
        async for event in self.engine.generate(req):
            if event["type"] == "token" and "logprob" in event:
                event["bytes"] = piece(event["token"])
                event["top"] = [(t, lp, piece(t)) for t, lp in event["top"]]
            elif event["type"] == "prompt_logprobs":
                event["logprobs"] = [[lp, [(t, v, piece(t)) for t, v in top]] for lp, top in event["logprobs"]]
            yield event

    def check_health(self) -> None:
        if not self.engine.healthy():
            raise RuntimeError(f"engine unhealthy: {self.engine.stats()}")
