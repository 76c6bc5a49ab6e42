"""The three shapes of the one data path: Record -> PreparedRequest -> Result (ARCHITECTURE.md).

A `Record` is one input row (offline) or one chat request (online); the Preprocessor turns it
into a `PreparedRequest`; an engine turns that into a `Result`. No I/O, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from .config import ColumnsConfig


class Record(BaseModel):
    """One input: an id, its images (bytes or path/URL strings), and a prompt or a conversation."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    id: Any
    images: list[bytes | str] = []
    prompt: str | None = None
    messages: list[dict[str, Any]] | str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any], columns: ColumnsConfig) -> "Record":
        """An offline input row (column names from `input.columns`) -> Record."""
        images = row.get(columns.image)
        if images is None:
            images = row.get(columns.image_path)
        if images is None:
            images = []
        elif isinstance(images, (bytes, str)):
            images = [images]
        return cls(
            id=row.get(columns.id),
            images=list(images),
            prompt=row.get(columns.prompt),
            messages=row.get(columns.messages),
        )


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
class Result:
    id: Any
    text: str | None
    finish_reason: str | None  # "stop" | "length" | None on error
    prompt_tokens: int = 0
    image_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @classmethod
    def failed(cls, request_id: Any, error: str, prompt_tokens: int = 0, image_tokens: int = 0) -> "Result":
        return cls(request_id, None, None, prompt_tokens, image_tokens, 0, error)
