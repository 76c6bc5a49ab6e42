"""OpenAI chat-completions wire format: what the endpoint accepts and what it answers.

Requests validate here (a bad field is a 422 naming it) and convert themselves to the pipeline's
own types: `to_record` for the Preprocessor, `to_generation` for the Engine. Fields OpenAI
defines but this endpoint cannot honour are declared so that setting them is an error rather
than silently ignored; unknown extra fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from pipeline.config import GenerationConfig
from pipeline.errors import describe_validation_error

from .errors import APIError
from pipeline.records import Record, Result


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The pipeline's conversation entry; OpenAI's newer 'developer' role is the system prompt."""
        entry = self.model_dump(exclude_none=True, exclude={"name"})
        return {**entry, "role": "system" if self.role == "developer" else self.role}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0)  # vLLM's extension: no stop (EOS included) before this
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Declared only to refuse them: generation here has no logprobs, tools, biases or penalties.
    # Their no-op values (OpenAI's defaults, which some clients always send) pass.
    logprobs: bool = False
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stops)}")
        return stops

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"only n=1 is supported, got {v}")
        return v

    @field_validator("logprobs", "tools", "logit_bias", "presence_penalty", "frequency_penalty")
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        if v:
            raise ValueError(f"{info.field_name} is not supported by this endpoint; leave it unset")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v: Any) -> Any:
        if v not in (None, "none", "auto"):  # without tools, "none" and "auto" both mean: answer in text
            raise ValueError(f"{v!r} needs tools, which this endpoint does not support; leave it unset or 'none'")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type") != "text":
            raise ValueError(f"type {v.get('type')!r} is not supported by this endpoint; only 'text' (the default)")
        return v

    def to_generation(self, default: GenerationConfig) -> GenerationConfig:
        """Request sampling over the config's defaults, validated as a GenerationConfig; an error
        names the request's own field (max_tokens, min_tokens, ...), not the config's."""
        max_name = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
        given = {
            "max_new_tokens": self.max_completion_tokens or self.max_tokens,
            "min_new_tokens": self.min_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop or None,
        }
        try:
            return GenerationConfig(**{**default.model_dump(), **{k: v for k, v in given.items() if v is not None}})
        except ValidationError as e:
            loc, message = describe_validation_error(e)
            for ours, theirs in (("max_new_tokens", max_name), ("min_new_tokens", "min_tokens")):
                loc, message = loc.replace(ours, theirs), message.replace(ours, theirs)
            raise APIError(422, f"{loc}: {message}" if loc else message, param=loc or None, code="invalid_value") from None

    def fetches(self) -> bool:
        """Whether any image is a URL to fetch (rather than inline data:)."""
        return any(not part.image_url.url.startswith("data:") for m in self.messages if isinstance(m.content, list)
                   for part in m.content if isinstance(part, ImagePart))

    def to_record(self, request_id: str) -> Record:
        return Record(id=request_id, messages=[m.to_dict() for m in self.messages])


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, result: Result) -> "Usage":
        return cls(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage

    @classmethod
    def of(cls, request_id: str, model: str, result: Result) -> "ChatCompletion":
        choice = Choice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)
        return cls(id=request_id, model=model, choices=[choice], usage=Usage.of(result))


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "llava-ray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
