"""Every exception the project raises on purpose, in one leaf module (it imports nothing of ours).

Callers test the type, never the text: the job turns a `RowError` into that row's `error`, the
CLI turns a `ConfigError` / `JobError` into one line and an exit code, and the endpoint maps each
type to one OpenAI status and error code (deployments/errors.py). See ARCHITECTURE.md, "Errors".
"""

from __future__ import annotations

from typing import Any


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error quotes of a library's exception."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def one_line(e: BaseException) -> str:
    """`Type: first line of the message`, for errors that name a library's failure."""
    return f"{type(e).__name__}: {first_line(e)}"


class LlavaRayError(Exception):
    """Base of the project's own errors."""


class ConfigError(LlavaRayError):
    """A setting that cannot work, as one line naming the key: `key: what is wrong; the fix`.

    Not a ValueError on purpose: raised inside a pydantic validator it propagates as itself
    instead of being wrapped into a ValidationError that would hide the key.
    """

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


class JobError(LlavaRayError):
    """The job cannot start (input layout, duplicate ids, output location): one line, before
    any work."""


class LeaseLost(JobError):
    """This run's lease on its output was taken over (it was paused past the expiry): it stops
    before publishing another output file."""


# The `error_kind` of a failed output row, one per cause a user acts on differently.
ERROR_KINDS = ("input", "fetch", "decode", "limits", "prompt", "messages", "engine")


class RowError(LlavaRayError):
    """One row's (or one request's) own fault. str() is the row's `error`: `<stage>: <cause>`;
    `kind` is its `error_kind` (ERROR_KINDS)."""

    stage = "input"
    kind = "input"

    def __init__(self, message: str):
        # One line wherever it is raised: an engine's or a library's message may span several.
        super().__init__(f"{self.stage}: {' '.join(message.splitlines())}")


class InputError(RowError):
    """A column value of the wrong type or shape."""


class ImageError(RowError):
    """Bytes that are not a usable image (empty, corrupt, an unsupported mode)."""

    stage = "image"
    kind = "decode"


class FetchError(ImageError):
    """An image that could not be read: missing, not a regular file, refused URL, HTTP error, timeout."""

    kind = "fetch"


class LimitsError(ImageError):
    """An image over a configured limit: bytes, pixels, aspect ratio, images per row."""

    kind = "limits"


class MessagesError(RowError):
    """A conversation that is not a valid list of turns, or that the chat template refuses."""

    stage = "messages"
    kind = "messages"


class PromptError(RowError):
    """A prompt the model cannot take as given (e.g. it holds the image placeholder itself)."""

    stage = "prompt"
    kind = "prompt"


class PromptTooLong(PromptError):
    """Prompt tokens (+ max_new_tokens) over the model's context or limits.max_prompt_tokens."""

    kind = "limits"


class EngineError(RowError):
    """The engine failed on this row alone (after the batch was retried row by row)."""

    stage = "engine"
    kind = "engine"

    @classmethod
    def wrap(cls, error: BaseException) -> "EngineError":
        return cls(f"{type(error).__name__}: {error}")


class EngineDead(LlavaRayError):
    """The engine process died: nothing more can run in this process (restart the actor)."""


class Overloaded(LlavaRayError):
    """The endpoint holds and queues all it may (serve.max_queued_requests): a request past
    that is refused at once, for the client to retry, rather than left to time out."""


_UNION_TAGS = ("str", "int", "float", "bool", "list[", "dict[", "tagged-union[", "function-")


def describe_validation_error(err: Any) -> tuple[str, str]:
    """(dotted location, one-line message) of a pydantic ValidationError. Of a union's errors
    the deepest is the one that names the field at fault; the union branches' own tags
    ("str", "list[...]") are left out of the location."""
    first = max(err.errors(), key=lambda e: len(e["loc"]))
    loc = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and p.startswith(_UNION_TAGS)))
    msg = "unknown key (check the spelling)" if first["type"] == "extra_forbidden" else first["msg"]
    msg = msg.removeprefix("Value error, ")
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return loc, f"{msg}{more}".replace("\n", " ")
