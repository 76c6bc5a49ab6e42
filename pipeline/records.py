"""The three shapes of the one data path: Record -> PreparedRequest -> Result (ARCHITECTURE.md).

A `Record` is one input row (offline) or one chat request (online); the Preprocessor turns it
into a `PreparedRequest`; an engine turns that into a `Result`. No I/O, no Ray.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from .config import ColumnsConfig
from .errors import InputError, PromptError, RowError


class Record(BaseModel):
    """One input: an id, its images (bytes or path/URL strings), and a prompt or a conversation."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    id: Any
    images: list[bytes | str] = []
    prompt: str | None = None
    messages: list[dict[str, Any]] | str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any], columns: ColumnsConfig, template: str | None = None) -> "Record":
        """An offline input row (column names from `input.columns`) -> Record; a value of the
        wrong type is an InputError naming its column. A row without its own prompt gets
        `template` (prompt.template) formatted from its columns; a field it lacks is a PromptError."""
        images = _images(row.get(columns.image), columns.image)
        if not images:
            images = _images(row.get(columns.image_path), columns.image_path)
        messages = row.get(columns.messages)
        if messages is not None and not isinstance(messages, (str, list)):
            raise InputError(f"column {columns.messages!r} holds {type(messages).__name__}; expected a JSON string")
        prompt = _text(row.get(columns.prompt), columns.prompt)
        if prompt is None and template is not None and messages is None:
            prompt = _RowFormatter().format(template, **row)
        return cls(id=row.get(columns.id), images=images, prompt=prompt, messages=messages)


class _RowFormatter(string.Formatter):
    """str.format over a row: `{col}` a column, `{col.field}` a field of a struct column (a dict)
    or of a JSON object held as text (a WebDataset sample's `json` member, a JSON string column)."""

    def get_field(self, field_name: str, args, kwargs) -> tuple[Any, str]:
        value: Any = kwargs
        for part in field_name.split("."):
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    raise PromptError(f"prompt.template names {{{field_name}}}, but this row's value is not a "
                                      "JSON object") from None
            value = value.get(part) if isinstance(value, dict) else None
            if value is None:
                raise PromptError(f"prompt.template names {{{field_name}}}, which this row lacks (missing or null)")
        return value, field_name


def _images(value: Any, column: str) -> list[bytes | str]:
    """A cell of an image column: bytes, a path/URL, a Hugging Face Image {bytes, path}, or a list."""
    out = []
    for item in value if isinstance(value, list) else [] if value is None else [value]:
        if isinstance(item, dict):  # datasets' Image layout: the bytes when present, else the path
            item = item.get("bytes") or item.get("path")
        if not isinstance(item, (bytes, str)):
            raise InputError(f"column {column!r} holds {type(item).__name__}; expected encoded image bytes or a path/URL string")
        out.append(item)
    return out


def _text(value: Any, column: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise InputError(f"column {column!r} holds {type(value).__name__}; expected a string")
    return value


@dataclass
class PreparedRequest:
    """What the CPU stage hands the model stage: compact, so it is cheap to move between actors.

    For transformers: `input_ids` already hold one `<image>` token per image feature, and
    `tiles` are the processor's resized/cropped tiles as uint8 (the model side rescales and
    normalises). For vLLM: `prompt` and the decoded RGB `images` are what the engine takes.
    """

    id: Any
    prompt: str
    input_ids: np.ndarray  # [L] int32, image tokens expanded
    image_tokens: int = 0
    tiles: np.ndarray | None = None  # [total_tiles, 3, H, W] uint8 (all images of the row)
    tiles_per_image: list[int] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) as decoded
    images: list[np.ndarray] = field(default_factory=list)  # [H, W, 3] uint8, vLLM only

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class TokenCount:
    """What the model would be given for one row, counted from image headers (`llava-ray plan`)."""

    id: Any
    image_sizes: list[tuple[int, int]]  # (height, width) of the upright photos
    tiles_per_image: list[int]  # what the vision tower runs on: 1, or AnyRes's base tile + grid
    prompt_tokens: int  # image tokens expanded, as in PreparedRequest.input_ids
    image_tokens: int


@dataclass
class Result:
    id: Any
    text: str | None
    finish_reason: str | None  # "stop" | "length" | None on error
    prompt_tokens: int = 0
    image_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_kind: str | None = None  # pipeline.errors.ERROR_KINDS

    @classmethod
    def failed(cls, request_id: Any, error: RowError | str, prompt_tokens: int = 0, image_tokens: int = 0,
               kind: str | None = None) -> "Result":
        """A failed row: from the RowError itself, or from a message and kind carried this far."""
        if isinstance(error, RowError):
            error, kind = str(error), error.kind
        return cls(request_id, None, None, prompt_tokens, image_tokens, 0, error, kind)
