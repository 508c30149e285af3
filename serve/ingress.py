"""HTTP ingress: the OpenAI-style completions API in front of the model deployment.

    GET  /v1/models        the served model, its context and calibration
    POST /v1/completions   prompt, max_tokens, temperature, top_p, seed, stop, stream (SSE)

Every client error is a 4xx with an OpenAI-style body ``{"error": {"message", "type", "param"}}``
whose ``param`` names the offending field. A replica that dies before a request's first event
is retried on another replica, so one replica's death does not fail requests routed to it.

No `from __future__ import annotations` here: FastAPI must see the real request type on the
methods Serve wraps, or it would read the body model as a query parameter.
"""

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError

from serve.schemas import (
    Choice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    new_completion_id,
    now,
)

# Replica death surfaces as one of these, depending on when it happens.
try:
    from ray.exceptions import ActorUnavailableError

    RETRYABLE: tuple[type[BaseException], ...] = (RayActorError, ActorUnavailableError)
except ImportError:  # pragma: no cover - older Ray
    RETRYABLE = (RayActorError,)
FIRST_EVENT_ATTEMPTS = 3

api = FastAPI(
    title="calibray completions",
    version="0.1.0",
    description="OpenAI-style completions served by calibrated CalibLM replicas on Ray Serve.",
)
ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    body = ErrorResponse(error={"message": message, "type": kind, "param": param, "code": None})
    return JSONResponse(status_code=status, content=body.model_dump())


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request", "type": ""}
    loc = [str(x) for x in first.get("loc", ())]
    if first.get("type") == "json_invalid":
        return error(400, f"malformed JSON body: {first.get('msg', '')}", "body")
    param = ".".join(loc[1:]) if loc[:1] == ["body"] and len(loc) > 1 else ".".join(loc) or "body"
    return error(400, f"{param}: {first.get('msg', 'invalid value')}", param)


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

    @api.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        info = await self.info()
        card = ModelCard(
            id=self.name,
            created=now(),
            max_context=info["max_context"],
            max_tokens_limit=info["max_tokens_limit"],
            calibration=info["calibration"],
        )
        return ModelList(data=[card])

    @api.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(self, req: CompletionRequest):
        if req.model != self.name:
            return error(404, f"model={req.model!r} is not served here; GET /v1/models lists {self.name!r}", "model")
        body = req.model_dump()
        try:
            stream, first = await self._start(body)
        except RETRYABLE as e:
            return error(503, f"no replica could take the request ({type(e).__name__})", None, "unavailable")
        if first["type"] == "error":
            return error(first.get("status", 500), first["message"], first.get("param"))
        cid, created = new_completion_id(), now()
        if req.stream:
            return StreamingResponse(self._sse(stream, cid, created), media_type="text/event-stream")
        text, done = [], None
        try:
            async for ev in stream:
                if ev["type"] == "token":
                    text.append(ev["text"])
                elif ev["type"] in ("done", "error"):
                    done = ev
        except RETRYABLE as e:
            return error(503, f"the replica serving this request died ({type(e).__name__})", None, "unavailable")
        if done is None or done["type"] == "error":
            msg = done["message"] if done else "generation ended without a result"
            return error(500, msg, None, "server_error")
        return CompletionResponse(
            id=cid,
            created=created,
            model=self.name,
            choices=[Choice(text="".join(text), finish_reason=done["finish_reason"])],
            usage=Usage(**done["usage"]),
        )

    async def _start(self, body: dict):
        """Open the event stream and read its first event, retrying if a replica died first."""
        for attempt in range(FIRST_EVENT_ATTEMPTS):
            stream = self.model.options(stream=True).generate.remote(body)
            try:
                return stream, await stream.__anext__()
            except RETRYABLE:
                if attempt == FIRST_EVENT_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _sse(self, stream, cid: str, created: int) -> AsyncIterator[str]:
        def chunk(text: str, finish=None, usage=None) -> str:
            resp = CompletionResponse(
                id=cid,
                created=created,
                model=self.name,
                choices=[Choice(text=text, finish_reason=finish)],
                usage=Usage(**usage) if usage else None,
            )
            return f"data: {resp.model_dump_json()}\n\n"

        try:
            async for ev in stream:
                if ev["type"] == "token" and ev["text"]:
                    yield chunk(ev["text"])
                elif ev["type"] == "done":
                    yield chunk("", ev["finish_reason"], ev["usage"])
                elif ev["type"] == "error":
                    yield f"data: {json.dumps({'error': {'message': ev['message'], 'type': 'server_error'}})}\n\n"
        except RETRYABLE as e:
            yield f"data: {json.dumps({'error': {'message': f'replica died ({type(e).__name__})'}})}\n\n"
        yield "data: [DONE]\n\n"
