"""Every error the endpoint answers, in OpenAI's shape: {"error": {message, type, param, code}}.

`APIError` carries a status and the body fields; `to_api_error` maps the pipeline's own
exception types (pipeline/errors.py: bad image, bad conversation, prompt too long, a full queue,
a dead engine, ...), schema errors and Serve's own (backpressure, a replica gone) to one, by type,
so each failure has exactly one status and code wherever it is raised.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from pipeline.errors import EngineDead, ImageError, Overloaded, PromptTooLong, RowError, describe_validation_error
from pipeline.records import Result

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 503 asks clients to wait: a queue place or a new replica is seconds away
OVERLOADED = "the model is overloaded (its request queue is full); retry shortly"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(err: ValidationError) -> APIError:
    """422 naming the first bad field as a dotted path (messages.0.content), as `param`."""
    loc, message = describe_validation_error(err)
    return APIError(422, f"{loc}: {message}" if loc else message, param=loc or None, code="invalid_value")


def unavailable(message: str, code: str) -> APIError:
    """503 with Retry-After: the request was fine, the endpoint cannot take it now."""
    return APIError(503, message, type="server_error", code=code, headers={"Retry-After": str(RETRY_AFTER_S)})


def failed_result(result: Result) -> APIError:
    """A request the model ran and could not answer (its Result's `engine: ...` error, after the
    engine retried it alone): the server's failure, not the client's, so 500 `server_error` with
    the engine's one-line cause. (Offline the same failure is the row's error.)"""
    return APIError(500, result.error, type="server_error")


def to_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ImageError):
        return APIError(400, str(exc), param="messages", code="invalid_image")
    if isinstance(exc, PromptTooLong):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, RowError):
        return APIError(400, str(exc), param="messages")
    if isinstance(exc, ValidationError):
        return validation_error(exc)
    if isinstance(exc, (Overloaded, BackPressureError)):
        return unavailable(OVERLOADED, "overloaded")
    if isinstance(exc, EngineDead):  # its replica reports unhealthy and Serve replaces it
        return unavailable("the model replica's engine failed; retry shortly", "engine_unavailable")
    if isinstance(exc, (RayActorError, ActorUnavailableError)):  # stopped or crashed mid-request
        logger.warning("a replica went away during a request: %s", exc)
        return unavailable("the model replica went away; retry shortly", "replica_unavailable")
    logger.exception("unexpected error serving a request")
    return APIError(500, f"internal error ({type(exc).__name__}); see the server log", type="server_error")
