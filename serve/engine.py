"""Incremental decoding with continuous batching, independent of Ray Serve.

A single step loop owns the model. Each step it (1) admits waiting requests up to
``max_batch_size``, prefilling each prompt into the request's own KV cache, then (2) runs one
decode step for every active request as one batch (``BatchCache`` stacks their caches). A
request that finishes leaves the batch at once and a waiting one takes its place, so
throughput grows with concurrency while each request's text depends only on its own seed.
The model runs in a worker thread, so the replica's event loop keeps answering health checks
and accepting requests during a step. With ``kv_cache_bytes`` set, admission is also bounded by
KV-cache memory: each request reserves the bytes its cache holds at prompt + max_tokens tokens
(serve.admission) and is admitted, in arrival order, when that fits beside the running requests.

Events a request receives: with ``prompt_logprobs``, first ``{"type": "prompt_logprobs", "logprobs":
[[logprob, top], ...]}`` for prompt tokens 1.. (token 0 has no context); then
``{"type": "token", "text": str, "token": int}`` per token, with ``"logprob"`` and ``"top"``
([[id, logprob], ...]) when the request asked for logprobs (a last ``token: None`` event carries text
held back until the end); then one ``{"type": "done", "finish_reason": "stop"|"length", "usage": {...}}``
or ``{"type": "error", ...}``. A token in ``stop_ids`` (the model's end-of-sequence ids) ends the
completion with ``stop``: it is counted in ``completion_tokens`` but not shown, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from serve.sampling import Choice, SamplingParams, choose, make_generator, top_logprobs
from serve.textstream import TextStream
from workers.caches.batch import BatchCache
from workers.caches.protocol import observer_for


@dataclass(frozen=True)
class EngineConfig:
    """Batching and limits of one model replica."""

    max_batch_size: int = 16
    batch_wait_s: float = 0.002  # when idle, wait this long for companions before the first step
    max_context: int = 512  # prompt + generated tokens per request
    max_consecutive_failures: int = 3  # steps failing in a row before the replica reports unhealthy
    kv_cache_bytes: int | None = None  # KV-cache bytes the running requests may hold together (None: no bound)
    # Tokens (padding included) in one prefill forward: its activations, and an eviction scorer's
    # attention matrix ([B, H, T, T]), grow with it; 16 prompts of 2048 tokens at once ran a 2-core,
    # 24 GiB machine out of memory. A longer prompt is prefilled alone.
    max_prefill_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size!r}: must be >= 1")
        if self.batch_wait_s < 0:
            raise ValueError(f"batch_wait_s={self.batch_wait_s!r}: must be >= 0")
        if self.max_context < 2:
            raise ValueError(f"max_context={self.max_context!r}: must be >= 2")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens={self.max_prefill_tokens!r}: must be >= 1")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes={self.kv_cache_bytes!r}: must be >= 1 (or None for no bound)")


@dataclass
class GenRequest:
    """One generation request after validation; prompt_ids are token ids."""

    prompt_ids: list[int]
    max_tokens: int = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, matched on the text
    stop_ids: frozenset[int] = frozenset()  # end-of-sequence token ids
    prompt_logprobs: bool = False  # report the prompt's logprobs too (echo with logprobs)


@dataclass
class _Seq:
    req: GenRequest
    cache: object
    generator: torch.Generator
    text: TextStream
    queue: asyncio.Queue
    last_token: int = -1
    next_pos: int = 0
    generated: int = 0
    peak_kv_bytes: int = 0
    reserved: int = 0  # KV-cache bytes held for this request while it is active
    cancelled: bool = False
    ended: bool = False  # generated an end-of-sequence token
    counts: Counter = field(default_factory=Counter)  # generated tokens, for the penalties
    prompt_lp: list | None = None  # prompt logprobs computed by the prefill, not yet emitted


class Engine:
    """Owns a model and a per-request cache factory; ``generate`` streams events for one request.

    model: CalibLM-like (``forward(tokens [B,T], positions=, cache=, pattern=, observer=)``).
    cache_factory: () -> new empty cache for one request (the KV-cache protocol).
    token_bytes: token id -> bytes of its text (the tokenizer's ``token_bytes``; b"" for special tokens).
    reserve: n tokens -> KV-cache bytes one request holds at n tokens (serve.admission.KVReservations);
        required with ``config.kv_cache_bytes``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache_factory: Callable[[], object],
        token_bytes: Callable[[int], bytes],
        config: EngineConfig,
        pattern: str | None = None,
        reserve: Callable[[int], int] | None = None,
    ) -> None:
        if config.kv_cache_bytes is not None and reserve is None:
            raise ValueError("EngineConfig.kv_cache_bytes needs reserve= (the bytes a request's cache holds)")
        self.model = model.eval()
        self.cache_factory = cache_factory
        self.token_bytes = token_bytes
        self.config = config
        self.pattern = pattern
        self.reserve = reserve
        self.device = next(model.parameters()).device
        self._waiting: list[_Seq] = []
        self._active: list[_Seq] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._failures = 0
        self.steps = 0  # decode steps run, and the batch sizes they had (for stats)
        self.batch_tokens = 0
        self.peak_active = 0  # most requests decoded together so far

    # -- public ---------------------------------------------------------------------------------
    async def kv_reservation(self, n_tokens: int) -> tuple[int, str | None]:
        """(bytes a request of n_tokens, prompt + max_tokens, reserves; why it can never be admitted,
        or None). (0, None) without a KV budget."""
        budget = self.config.kv_cache_bytes
        if budget is None:
            return 0, None
        need = await asyncio.to_thread(self.reserve, n_tokens)  # the first of a length bucket builds a cache
        if need <= budget:
            return need, None
        return need, (
            f"prompt + max_tokens ({n_tokens} tokens) needs {need} bytes of KV cache; "
            f"this replica's budget is {budget} bytes"
        )

    async def generate(self, req: GenRequest) -> AsyncIterator[dict]:
        """Raises ValueError (before queueing) for a request that can never run: longer than the context,
        or needing more KV-cache bytes than the whole budget."""
        n = len(req.prompt_ids) + req.max_tokens
        if n > self.config.max_context:
            raise ValueError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.max_tokens}) exceeds "
                f"the context of {self.config.max_context} tokens"
            )
        reserved, never = await self.kv_reservation(n)
        if never:
            raise ValueError(never)
        self._ensure_loop()
        seq = _Seq(req, self.cache_factory(), make_generator(req.seed), TextStream(req.stop), asyncio.Queue())
        seq.reserved = reserved
        self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                event = await seq.queue.get()
                yield event
                if event["type"] in ("done", "error"):
                    return
        finally:
            # A client that goes away frees its batch slot at the next step.
            seq.cancelled = True

    def healthy(self) -> bool:
        if self._task is not None and self._task.done():
            return False
        return self._failures < self.config.max_consecutive_failures

    def stats(self) -> dict:
        return {
            "active": len(self._active),
            "waiting": len(self._waiting),
            "decode_steps": self.steps,
            "mean_decode_batch": self.batch_tokens / max(self.steps, 1),
            "peak_active": self.peak_active,
            "kv_reserved_bytes": sum(s.reserved for s in self._active),
            "kv_cache_bytes": self.config.kv_cache_bytes,
        }

    # -- the step loop ----------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            self._active = [s for s in self._active if not s.cancelled]
            self._waiting = [s for s in self._waiting if not s.cancelled]
            if not self._active and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                if self.config.batch_wait_s > 0 and self.config.max_batch_size > 1:
                    await asyncio.sleep(self.config.batch_wait_s)
                continue
            admitted = self._admit()
            # New prompts are prefilled together (right-padded), in groups of similar length.
            for group in self._prefill_groups(admitted):
                if await self._run_step(self._prefill, group):
                    self._active.extend(group)
            self.peak_active = max(self.peak_active, len(self._active))
            self._active = [s for s in self._active if not self._finish_if_done(s)]
            # Requests admitted this round already got their first token from the prefill.
            batch = [s for s in self._active if s not in admitted]
            if batch:
                await self._run_step(self._decode, batch)
            self._active = [s for s in self._active if not self._finish_if_done(s)]
            await asyncio.sleep(0)

    def _admit(self) -> list[_Seq]:
        """Take waiting requests, in arrival order, while a batch slot and their KV reservation fit."""
        room = self.config.max_batch_size - len(self._active)
        budget = self.config.kv_cache_bytes
        held = sum(s.reserved for s in self._active)
        n = 0
        for s in self._waiting[:room]:
            if budget is not None and held + s.reserved > budget:
                break
            held += s.reserved
            n += 1
        admitted, self._waiting = self._waiting[:n], self._waiting[n:]
        return admitted

    async def _run_step(self, fn, seqs: list[_Seq]) -> bool:
        try:
            tokens = await asyncio.to_thread(fn, seqs)
        except Exception as exc:  # a failed step fails its requests, not the replica
            self._failures += 1
            for s in seqs:
                s.queue.put_nowait({"type": "error", "message": f"{type(exc).__name__}: {exc}"})
                s.cancelled = True
            return False
        self._failures = 0
        for s, choice in zip(seqs, tokens):
            self._emit(s, choice)
        return True

    # -- model work (worker thread) -----------------------------------------------------------------
    def _prefill_groups(self, seqs: list[_Seq]) -> list[list[_Seq]]:
        """Split by prompt length so padding stays under a quarter of each group's tokens, and each
        group's padded tokens within max_prefill_tokens."""
        groups: list[list[_Seq]] = []
        for s in sorted(seqs, key=lambda s: len(s.req.prompt_ids)):
            g = groups[-1] if groups else None
            longest = len(s.req.prompt_ids)
            fits = g and longest * (len(g) + 1) <= self.config.max_prefill_tokens
            if fits and sum(longest - len(x.req.prompt_ids) for x in g) <= 0.25 * longest * (len(g) + 1):
                g.append(s)
            else:
                groups.append([s])
        return groups

    @torch.inference_mode()
    def _prefill(self, seqs: list[_Seq]) -> list[Choice]:
        lens = [len(s.req.prompt_ids) for s in seqs]
        T = max(lens)
        ids = torch.zeros(len(seqs), T, dtype=torch.long, device=self.device)
        for b, s in enumerate(seqs):
            ids[b, : lens[b]] = torch.tensor(s.req.prompt_ids, dtype=torch.long)
        # Padding queries sit after each prompt; BatchCache never stores or observes them.
        pos = torch.arange(T, device=self.device).expand(len(seqs), T)
        cache = BatchCache([s.cache for s in seqs], lens) if len(seqs) > 1 else seqs[0].cache
        logits = self._forward(ids, pos, cache)
        for b, (s, n) in enumerate(zip(seqs, lens)):
            s.next_pos = n
            if s.req.prompt_logprobs:  # emitted by _emit, on the event loop (queues are not thread-safe)
                s.prompt_lp = self._prompt_logprobs(s, logits[b, : n - 1])
        return [self._sample(s, logits[b, n - 1]) for b, (s, n) in enumerate(zip(seqs, lens))]

    @torch.inference_mode()
    def _decode(self, seqs: list[_Seq]) -> list[Choice]:
        ids = torch.tensor([[s.last_token] for s in seqs], dtype=torch.long, device=self.device)
        pos = torch.tensor([[s.next_pos] for s in seqs], dtype=torch.long, device=self.device)
        cache = BatchCache([s.cache for s in seqs]) if len(seqs) > 1 else seqs[0].cache
        logits = self._forward(ids, pos, cache)
        self.steps += 1
        self.batch_tokens += len(seqs)
        for s in seqs:
            s.next_pos += 1
        return [self._sample(s, logits[b, -1]) for b, s in enumerate(seqs)]

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        # Caches that score keys (eviction) watch attention through the model's observer hook; the
        # others get none, so a packed cache's decode attends its codes.
        out = self.model(ids, positions=pos, cache=cache, pattern=self.pattern, observer=observer_for(cache))
        return out.logits if hasattr(out, "logits") else out

    def _sample(self, seq: _Seq, logits: torch.Tensor) -> Choice:
        return choose(logits, seq.req.sampling, seq.generator, seq.counts)

    @staticmethod
    def _prompt_logprobs(seq: _Seq, logits: torch.Tensor) -> list[list]:
        """logits [n-1, V] at prompt positions 0..n-2 -> [[logprob of prompt token i+1, top], ...]."""
        lp = torch.log_softmax(logits.float().cpu(), dim=-1)
        ids = seq.req.prompt_ids[1:]
        k = seq.req.sampling.logprobs or 0
        return [[float(lp[i, t]), top_logprobs(lp[i], k)] for i, t in enumerate(ids)]

    # -- bookkeeping (event loop) -------------------------------------------------------------------
    def _emit(self, seq: _Seq, choice: Choice) -> None:
        if seq.prompt_lp is not None:
            seq.queue.put_nowait({"type": "prompt_logprobs", "logprobs": seq.prompt_lp})
            seq.prompt_lp = None
        token = choice.token
        seq.last_token = token
        seq.generated += 1
        seq.counts[token] += 1
        with contextlib.suppress(Exception):
            seq.peak_kv_bytes = max(seq.peak_kv_bytes, int(seq.cache.nbytes()))
        if token in seq.req.stop_ids:
            seq.ended = True
            return
        # Every token is an event (text may be empty while a character or stop string is pending).
        event = {"type": "token", "text": seq.text.push(self.token_bytes(token)), "token": token}
        if choice.logprob is not None:
            event["logprob"], event["top"] = choice.logprob, choice.top
        seq.queue.put_nowait(event)

    def _finish_if_done(self, seq: _Seq) -> bool:
        if seq.cancelled:
            return True
        stopped = seq.text.stopped or seq.ended
        if not stopped and seq.generated < seq.req.max_tokens:
            return False
        reason = "stop" if stopped else "length"
        tail = seq.text.finish()
        if tail:
            seq.queue.put_nowait({"type": "token", "text": tail, "token": None})
        seq.queue.put_nowait(
            {
                "type": "done",
                "finish_reason": reason,
                "usage": {
                    "prompt_tokens": len(seq.req.prompt_ids),
                    "completion_tokens": seq.generated,
                    "total_tokens": len(seq.req.prompt_ids) + seq.generated,
                    "kv_cache_bytes": seq.peak_kv_bytes,
                },
            }
        )
        return True
