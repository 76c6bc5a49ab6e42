"""The ingress: OpenAI HTTP in, Preprocessor on CPU, the model deployment, OpenAI JSON or SSE out.

The same `Preprocessor` as the offline job turns a request into a `PreparedRequest`
(`local_ok=False`: only data: and guarded http(s) image URLs), so one image and prompt get the
same answer here and in a job. Every failure leaves through `errors.to_api_error`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.checkpoint import TORCH, Checkpoint
from pipeline.config import Config
from pipeline.errors import Overloaded
from pipeline.metrics import REQUEST_SECONDS, REQUESTS, TIME_PER_OUTPUT_TOKEN, TIME_TO_FIRST_TOKEN, metric
from pipeline.preprocess import Preprocessor
from pipeline.records import PreparedRequest, Result

from .errors import APIError, failed_result, to_api_error
from .protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    Usage,
    completion_id,
)

logger = logging.getLogger(__name__)

api = FastAPI(title="llava-ray", docs_url=None, redoc_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods get OpenAI's error shape too."""
    return APIError(exc.status_code, str(exc.detail), code=None).response()


def _sse(payload: BaseModel | dict[str, Any] | str) -> str:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json()
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for item in rest:
        yield item


class HeldStream(StreamingResponse):
    """A stream that holds its admission place until it ends, however it ends (done, failed,
    or its client gone): `on_close` runs when Starlette's call of the response returns."""

    def __init__(self, content, on_close: Callable[[], None], **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Timing:
    """One request's latencies, recorded as the endpoint's histograms (pipeline/metrics.py)."""

    def __init__(self):
        self.start, self.first = time.monotonic(), None

    def first_text(self) -> None:
        if self.first is None:
            self.first = time.monotonic()
            metric(TIME_TO_FIRST_TOKEN).observe(self.first - self.start)

    def done(self, completion_tokens: int = 0) -> None:
        end = time.monotonic()
        metric(REQUEST_SECONDS).observe(end - self.start)
        if self.first is not None and completion_tokens > 1:
            metric(TIME_PER_OUTPUT_TOKEN).observe((end - self.first) / (completion_tokens - 1))


async def sse_events(request_id: str, model: str, first, deltas, include_usage: bool,
                     timing: Timing | None = None) -> AsyncIterator[str]:
    """OpenAI's chunk sequence from the model's stream (`first`, then `deltas`: text deltas, then
    the request's Result): role, content deltas, finish_reason, [usage], [DONE]. Once headers are
    sent a failure can only travel as an error event, followed by [DONE]."""

    def chunk(delta: Delta, finish_reason: str | None = None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason)
        return _sse(ChatCompletionChunk(id=request_id, model=model, choices=[choice]))

    result = None
    try:
        yield chunk(Delta(role="assistant", content=""))
        async for item in _chain(first, deltas):
            if isinstance(item, Result):
                result = item
            elif item:
                if timing:
                    timing.first_text()
                yield chunk(Delta(content=item))
        if result.error:
            raise failed_result(result)
        yield chunk(Delta(), result.finish_reason)
        if include_usage:
            usage = ChatCompletionChunk(id=request_id, model=model, choices=[], usage=Usage.of(result))
            yield _sse(usage)
    except Exception as e:
        yield _sse(to_api_error(e).body())
    finally:
        deltas.cancel()
        if timing:
            timing.done(result.completion_tokens if result else 0)
    yield _sse("[DONE]")


def key_digest(key: str | None) -> str | None:
    """sha256 of an API key: what the ingress compares (API keys are random, so their digest
    reveals nothing usable)."""
    return hashlib.sha256(key.encode()).hexdigest() if key is not None else None


class LlavaIngressServer:
    """The `LlavaIngress` replica's state and handlers; `model` is the LlavaModel handle.

    Routes below are plain functions that get this object from the replica context (Serve's
    class-based views rewrite methods only in the process that applies `serve.ingress`).
    """

    def __init__(self, cfg: Config, model, api_key_sha256: str | None = None):
        """`api_key_sha256`: the digest of the key the app was built with; the key itself never
        travels in a replica's arguments (Ray shows them). Without it, the key is the one
        serve.api_key_env names in this replica's own environment."""
        self.cfg = cfg
        self.model = model
        self.served_name = cfg.served_name
        self.api_key_sha256 = api_key_sha256 or key_digest(cfg.serve.resolved_api_key())
        self.preprocessor = Preprocessor(cfg, Checkpoint.load(cfg.model, unused=TORCH), local_ok=False)
        self.admission_bound, self.in_flight = cfg.serve.admission_bound(), 0
        # Decoding blocks, and http(s) fetches block for up to fetch.timeout_s: both run off the
        # event loop, on two pools, so requests with inline (data:) images never queue behind
        # slow fetches.
        self.fetch_pool = ThreadPoolExecutor(cfg.fetch.concurrency, thread_name_prefix="fetch")
        self.inline_pool = ThreadPoolExecutor(cfg.fetch.concurrency, thread_name_prefix="inline")
        logger.info("ingress ready for %s (api key %s)", self.served_name, "on" if self.api_key_sha256 else "off")

    async def answer(self, request: Request, handler, *args) -> Response:
        """Authorize, run `handler`, and turn any failure into OpenAI's error JSON."""
        try:
            self._authorize(request)
            return await handler(*args)
        except Exception as e:
            return to_api_error(e).response()

    async def answer_chat(self, request: Request) -> Response:
        """`answer` for chat completions, counted by status and streaming, with its latencies."""
        timing = Timing()
        response = await self.answer(request, self.chat, request, timing)
        stream = isinstance(response, StreamingResponse)
        metric(REQUESTS).inc(tags={"status": str(response.status_code), "stream": str(stream).lower()})
        if not stream:  # a stream records its own when its last event is sent
            timing.done()
        return response

    def _authorize(self, request: Request) -> None:
        if self.api_key_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401, "missing API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(key_digest(token.strip()), self.api_key_sha256):
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def models(self) -> Response:
        return JSONResponse(ModelList(data=[ModelCard(id=self.served_name)]).model_dump())

    async def model_card(self, model_id: str) -> Response:
        self._check_model(model_id)
        return JSONResponse(ModelCard(id=self.served_name).model_dump())

    def _check_model(self, name: str) -> None:
        if name != self.served_name:
            raise APIError(
                404, f"the model {name!r} does not exist; this endpoint serves {self.served_name!r}",
                param="model", code="model_not_found",
            )

    async def _read_json(self, request: Request) -> Any:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":  # also what keeps a browser's form post out when no key is set
            raise APIError(415, f"the body must be JSON (Content-Type: application/json), got {media or 'no Content-Type'!r}",
                           code="unsupported_media_type")
        limit = self.cfg.serve.max_body_bytes
        too_big = APIError(413, f"request body exceeds serve.max_body_bytes={limit}", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        try:
            return json.loads(body)
        except json.JSONDecodeError as e:
            raise APIError(400, f"request body is not valid JSON: {e.msg} at char {e.pos}", code="invalid_json") from None
        except UnicodeDecodeError:
            raise APIError(400, "request body is not valid JSON: not UTF-8", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "request body is not valid JSON: nested too deeply", code="invalid_json") from None
        except ValueError as e:  # e.g. an integer of thousands of digits
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None

    async def chat(self, request: Request, timing: Timing) -> Response:
        """Refused at once past the admission bound, before the body is read or prepared. A
        request holds its place until its answer is sent (a stream: until it ends)."""
        if self.admission_bound is not None and self.in_flight >= self.admission_bound:
            raise Overloaded(f"{self.in_flight} requests in flight (serve.max_queued_requests)")
        self.in_flight += 1
        response = None
        try:
            response = await self._chat(request, timing)
            return response
        finally:
            if not isinstance(response, HeldStream):  # a stream gives its place back when it ends
                self._leave()

    def _leave(self) -> None:
        self.in_flight -= 1

    async def _chat(self, request: Request, timing: Timing) -> Response:
        req = ChatCompletionRequest.model_validate(await self._read_json(request))
        self._check_model(req.model)
        sampling = req.to_generation(self.cfg.generation)
        request_id = completion_id()
        prepared: PreparedRequest = await asyncio.get_running_loop().run_in_executor(
            self.fetch_pool if req.fetches() else self.inline_pool,
            self.preprocessor.prepare, req.to_record(request_id), sampling.max_new_tokens,
        )
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(request_id, prepared, sampling, include_usage, timing)
        result: Result = await self.model.generate.remote(prepared, sampling)
        if result.error:
            raise failed_result(result)
        return Response(ChatCompletion.of(request_id, self.served_name, result).model_dump_json(), media_type="application/json")

    async def _stream(self, request_id: str, prepared: PreparedRequest, sampling, include_usage: bool, timing: Timing) -> Response:
        deltas = self.model.options(stream=True).stream.remote(prepared, sampling)
        # Pull the first item before answering 200, so an overloaded model is a 503, not a broken stream.
        first = await deltas.__anext__()
        return HeldStream(
            sse_events(request_id, self.served_name, first, deltas, include_usage, timing), self._leave,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

def _server() -> LlavaIngressServer:
    return serve.get_replica_context().servable_object


@api.get("/health")
async def health(server: LlavaIngressServer = Depends(_server)) -> dict[str, str]:
    return {"status": "ok", "model": server.served_name}


@api.get("/v1/models")
async def list_models(request: Request, server: LlavaIngressServer = Depends(_server)) -> Response:
    return await server.answer(request, server.models)


@api.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request, server: LlavaIngressServer = Depends(_server)) -> Response:
    return await server.answer(request, server.model_card, model_id)


@api.post("/v1/chat/completions")
async def chat_completions(request: Request, server: LlavaIngressServer = Depends(_server)) -> Response:
    return await server.answer_chat(request)
