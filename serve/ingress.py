"""HTTP ingress: OpenAI's API in front of the model deployment.

    GET  /v1/models              the served model, its context, chat support and calibration
    GET  /v1/models/{id}         one model card, or 404
    POST /v1/completions         prompt (text, texts, token ids, lists of ids), n, best_of, logprobs,
                                 echo, penalties, logit_bias, stop, seed, stream (+ include_usage)
    POST /v1/chat/completions    messages through the model's chat template, n, logprobs and
                                 top_logprobs, penalties, stop, seed, stream (role, then content deltas)

Each (prompt, choice) is one sequence on the model deployment; the replica's engine batches them
with everything else in flight. Choice i of a seeded request uses seed + i, so choice 0 is the
text the same request with n=1 gives. Every error (validation, 404, 405, a replica's 4xx) has
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` and names the offending field;
a parameter this server does not implement is a 400 naming it. A replica that dies before a
sequence's first event is retried on another replica.

No `from __future__ import annotations` here: FastAPI must see the real request type on the
methods Serve wraps, or it would read the body model as a query parameter.
"""

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException

from serve.choices import Sequence
from serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
)

# Replica death surfaces as one of these, depending on when it happens.
try:
    from ray.exceptions import ActorUnavailableError

    RETRYABLE: tuple[type[BaseException], ...] = (RayActorError, ActorUnavailableError)
except ImportError:  # pragma: no cover - older Ray
    RETRYABLE = (RayActorError,)
# A request whose replica dies before it sent the client any output is sent again, to another
# replica or to the one Serve starts in its place, for up to this long.
REPLICA_RETRY_S = 60.0
MAX_SEQUENCES = 64  # prompts x (best_of or n) in one request

api = FastAPI(
    title="calibray OpenAI-compatible API",
    version="0.2.0",
    description="OpenAI completions and chat completions served by calibrated replicas on Ray Serve.",
)
ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code=None):
    body = ErrorResponse(error={"message": message, "type": kind, "param": param, "code": code})
    return JSONResponse(status_code=status, content=body.model_dump())


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error(exc.status, exc.message, exc.param, exc.kind, exc.code)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """404 (no such route) and 405 (wrong method) in OpenAI's shape, not FastAPI's {"detail": ...}."""
    # OpenAI answers both as invalid_request_error; the code tells them apart.
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    msg = f"{request.method} {request.url.path}: {exc.detail}"
    if exc.status_code == 405:
        msg = f"{request.method} is not allowed on {request.url.path}"
    return error(exc.status_code, msg, None, "invalid_request_error", code)


# "<field>: ..." at the start of a model-level ValueError names its field (serve.schemas writes them so).
_NAMED = re.compile(r"^(?:Value error, )?([a-z_]+): ")
# Locations pydantic adds inside a union or a list (which member, which item): not field names.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*|\d+)$")


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request", "type": ""}
    loc = [str(x) for x in first.get("loc", ())]
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return error(400, f"malformed JSON body: {msg}", "body")
    # Unions (the prompt's four forms) report each member's failure; the field is what matters.
    fields = [x for x in loc[1:] if not _UNION_MEMBER.match(x)] if loc[:1] == ["body"] else loc
    param = ".".join(fields) or "body"
    if param == "body" and (m := _NAMED.match(msg)):
        param = m.group(1)
        msg = msg[m.end() :]
    if first.get("type") == "extra_forbidden":
        return error(400, f"{param}: this server does not support the {param!r} parameter", param)
    return error(400, f"{param}: {msg.removeprefix('Value error, ')}", param)


# Helpers sit above the deployment class: Serve pickles the class when it is decorated, with the
# module globals defined at that point, so a helper defined below it is a NameError in the replica.
def _seed(seed: int | None, i: int) -> int | None:
    return None if seed is None else (seed + i) % (2**63)


def _usage(seqs: list[Sequence], per_prompt: int) -> Usage:
    """Prompt tokens once per prompt, completion tokens of every sequence (best_of's discarded ones too)."""
    prompt = sum(s.prompt_tokens for s in seqs[::per_prompt]) if seqs else 0
    completion = sum(s.completion_tokens for s in seqs)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        kv_cache_bytes=sum(s.kv_cache_bytes for s in seqs),
    )


async def _merge(streams: list[tuple], reopen) -> AsyncIterator[tuple[int, dict, bool]]:
    """(index, event, is_first) from every sequence as they arrive; first events come first.

    reopen(i) -> a new (stream, first event) for sequence i: used when its replica dies before the
    sequence produced anything past its first event (the client has seen no output of it yet)."""
    for i, (_, first) in enumerate(streams):
        yield i, first, True
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        sent = 0
        try:
            while True:
                try:
                    async for ev in stream:
                        sent += 1
                        await queue.put((i, ev))
                    return
                except RETRYABLE as e:
                    if sent:
                        why = f"the replica serving this request died after it streamed output ({type(e).__name__})"
                        ev = {"type": "error", "message": why + "; send the request again", "code": "unavailable"}
                        await queue.put((i, ev))
                        return
                    stream, _ = await reopen(i)  # the same prompt: its first event is the one already sent
        except RETRYABLE as e:
            why = f"no replica could take the request ({type(e).__name__})"
            await queue.put((i, {"type": "error", "message": why, "code": "unavailable"}))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, st)) for i, (st, _) in enumerate(streams)]
    try:
        open_ = len(tasks)
        while open_:
            i, ev = await queue.get()
            if ev is None:
                open_ -= 1
            else:
                yield i, ev, False
    finally:
        for t in tasks:
            t.cancel()


def _stream_error(ev: dict) -> str:
    """An error event inside a stream that already answered 200 (a replica died mid-stream, a failed step)."""
    message, code = ev["message"], ev.get("code")
    return json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}})


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for c in chunks:
            yield f"data: {c}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, model, served_name: str) -> None:
        self.model = model
        self.name = served_name
        self._info: dict | None = None

    async def info(self) -> dict:
        if self._info is None:
            self._info = await self.model.info.remote()
        return self._info

    async def card(self) -> ModelCard:
        info = await self.info()
        return ModelCard(
            id=self.name,
            created=now(),
            max_context=info["max_context"],
            max_tokens_limit=info["max_tokens_limit"],
            chat=info.get("chat", False),
            calibration=info["calibration"],
        )

    @api.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        return ModelList(data=[await self.card()])

    @api.get("/v1/models/{model_id}", response_model=ModelCard, responses=ERRORS)
    async def model_card(self, model_id: str):
        self._check_model(model_id)
        return await self.card()

    def _check_model(self, model: str) -> None:
        if model != self.name:
            msg = f"model={model!r} is not served here; GET /v1/models lists {self.name!r}"
            raise ApiError(404, msg, "model", code="model_not_found")

    # -- completions ------------------------------------------------------------------------------
    @api.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(self, req: CompletionRequest):
        self._check_model(req.model)
        width = req.best_of or req.n
        k = req.logprobs if req.logprobs is not None else (0 if width > req.n else None)  # best_of ranks by logprob
        base = req.model_dump(include={"temperature", "top_p", "presence_penalty", "frequency_penalty", "logit_bias"})
        base.update(max_tokens=req.max_tokens, stop=req.stop, logprobs=k, echo=req.echo)
        if width * len(req.prompts()) > MAX_SEQUENCES:
            raise ApiError(
                400, f"n: {len(req.prompts())} prompts x {width} choices exceeds {MAX_SEQUENCES} sequences", "n"
            )
        jobs = [{**base, "prompt": p, "seed": _seed(req.seed, i)} for p in req.prompts() for i in range(width)]
        streams = await self._open_all(jobs)
        cid, created = new_id("cmpl"), now()
        if req.stream:
            return _sse(self._stream_completions(req, streams, jobs, cid, created))
        seqs = await self._collect(streams, jobs)
        choices = []
        for p in range(len(req.prompts())):
            group = seqs[p * width : (p + 1) * width]
            kept = sorted(group, key=lambda s: -s.logprob_sum)[: req.n] if width > req.n else group
            for s in kept:
                text = (s.prompt_text if req.echo else "") + "".join(s.text)
                lp = s.completion_logprobs() if req.logprobs is not None else None
                choices.append(Choice(text=text, index=len(choices), logprobs=lp, finish_reason=s.finish_reason))
        usage = _usage(seqs, width)
        return CompletionResponse(id=cid, created=created, model=self.name, choices=choices, usage=usage)

    async def _stream_completions(self, req: CompletionRequest, streams, jobs, cid: str, created: int):
        seqs = [Sequence() for _ in streams]
        chars = [0] * len(streams)  # characters sent per choice, for text_offset

        def chunk(i: int, text: str, finish=None, start: int | None = None) -> str:
            lp = None
            if req.logprobs is not None and start is not None:
                lp = seqs[i].completion_logprobs(start, chars[i])
            chars[i] += len(text)
            c = Choice(text=text, index=i, logprobs=lp, finish_reason=finish)
            return CompletionResponse(id=cid, created=created, model=self.name, choices=[c]).model_dump_json()

        async for i, ev, first in _merge(streams, lambda i: self._open(jobs[i])):
            s = seqs[i]
            before = len(s.scored)
            s.add(ev)
            if first:
                if req.echo and req.logprobs is None:  # with logprobs, the prompt comes with its own
                    yield chunk(i, s.prompt_text)
                continue
            if ev["type"] == "prompt_logprobs":
                yield chunk(i, s.prompt_text, start=before)
            elif ev["type"] == "token" and (ev["text"] or "logprob" in ev):
                yield chunk(i, ev["text"], start=before)
            elif ev["type"] == "done":
                yield chunk(i, "", s.finish_reason)
            elif ev["type"] == "error":
                yield _stream_error(ev)
        if req.include_usage():
            yield CompletionResponse(
                id=cid, created=created, model=self.name, choices=[], usage=_usage(seqs, req.n)
            ).model_dump_json()

    # -- chat -------------------------------------------------------------------------------------
    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(self, req: ChatCompletionRequest):
        self._check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        k = (req.top_logprobs or 0) if req.logprobs else None
        base = req.model_dump(include={"temperature", "top_p", "presence_penalty", "frequency_penalty", "logit_bias"})
        base.update(messages=messages, max_tokens=req.token_limit(), stop=req.stop, logprobs=k)
        jobs = [{**base, "seed": _seed(req.seed, i)} for i in range(req.n)]
        streams = await self._open_all(jobs)
        cid, created = new_id("chatcmpl"), now()
        if req.stream:
            return _sse(self._stream_chat(req, streams, jobs, cid, created))
        seqs = await self._collect(streams, jobs)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content="".join(s.text)),
                logprobs=s.chat_logprobs() if req.logprobs else None,
                finish_reason=s.finish_reason,
            )
            for i, s in enumerate(seqs)
        ]
        usage = _usage(seqs, req.n)
        return ChatCompletionResponse(id=cid, created=created, model=self.name, choices=choices, usage=usage)

    async def _stream_chat(self, req: ChatCompletionRequest, streams, jobs, cid: str, created: int):
        seqs = [Sequence() for _ in streams]

        def chunk(choices: list[ChunkChoice], usage=None) -> str:
            c = ChatCompletionChunk(id=cid, created=created, model=self.name, choices=choices, usage=usage)
            return c.model_dump_json(exclude_none=True)

        async for i, ev, first in _merge(streams, lambda i: self._open(jobs[i])):
            s = seqs[i]
            before = len(s.scored)
            s.add(ev)
            if first:
                yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            elif ev["type"] == "token" and (ev["text"] or "logprob" in ev):
                lp = s.chat_logprobs(before) if req.logprobs else None
                yield chunk([ChunkChoice(index=i, delta=Delta(content=ev["text"]), logprobs=lp)])
            elif ev["type"] == "done":
                yield chunk([ChunkChoice(index=i, delta=Delta(), finish_reason=s.finish_reason)])
            elif ev["type"] == "error":
                yield _stream_error(ev)
        if req.include_usage():
            yield chunk([], _usage(seqs, req.n))

    # -- the model deployment ------------------------------------------------------------------------
    async def _open(self, body: dict):
        """Open one sequence's event stream and read its first event, retrying while replicas die
        (Serve routes the retry to a live replica, or to the one it starts in a dead one's place)."""
        deadline, pause = time.monotonic() + REPLICA_RETRY_S, 0.2
        while True:
            stream = self.model.options(stream=True).generate.remote(body)
            try:
                return stream, await stream.__anext__()
            except RETRYABLE:
                if time.monotonic() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(2 * pause, 2.0)

    async def _open_all(self, jobs: list[dict]) -> list[tuple]:
        """Start every sequence; a 4xx from any (the same for all of a prompt's choices) is the answer."""
        try:
            opened = await asyncio.gather(*(self._open(j) for j in jobs))
        except RETRYABLE as e:
            raise ApiError(503, f"no replica could take the request ({type(e).__name__})", None, "unavailable") from e
        bad = next((first for _, first in opened if first["type"] == "error"), None)
        if bad is not None:
            for stream, _ in opened:
                with contextlib.suppress(Exception):
                    stream.cancel()
            raise ApiError(bad.get("status", 500), bad["message"], bad.get("param"))
        return opened

    async def _collect(self, streams: list[tuple], jobs: list[dict]) -> list[Sequence]:
        """Every sequence to its end. Nothing has reached the client yet, so a sequence whose replica
        dies is started again from its prompt (with its seed: the same text as it would have had)."""

        async def one(stream, first, job) -> Sequence:
            while True:
                s = Sequence()
                s.add(first)
                try:
                    async for ev in stream:
                        s.add(ev)
                    return s
                except RETRYABLE:
                    stream, first = await self._open(job)

        try:
            seqs = await asyncio.gather(*(one(st, f, j) for (st, f), j in zip(streams, jobs)))
        except RETRYABLE as e:
            raise ApiError(
                503, f"the replica serving this request died ({type(e).__name__})", None, "unavailable"
            ) from e
        failed = next((s for s in seqs if s.error or not s.done), None)
        if failed is not None:
            msg = failed.error["message"] if failed.error else "generation ended without a result"
            raise ApiError(500, msg, None, "server_error")
        return seqs
