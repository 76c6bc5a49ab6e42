"""OpenAI request -> pipeline types, without a server: sampling defaults, refusals, roles."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from deployments.errors import failed_result, to_api_error
from deployments.protocol import ChatCompletionRequest
from pipeline.config import GenerationConfig
from pipeline.errors import EngineDead, EngineError, ImageError, MessagesError, Overloaded, PromptTooLong
from pipeline.records import Result

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}


def request(**kw) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": [IMAGE, {"type": "text", "text": "Hi"}]}], **kw}
    return ChatCompletionRequest.model_validate(body)


def test_sampling_comes_from_the_request_over_the_config_defaults():
    default = GenerationConfig(max_new_tokens=64, temperature=0.0, top_p=1.0, stop=["###"])
    assert request().to_generation(default) == default
    assert request(max_tokens=10, temperature=0.7, top_p=0.9, seed=3, stop="END").to_generation(default) == GenerationConfig(
        max_new_tokens=10, temperature=0.7, top_p=0.9, seed=3, stop=["END"]
    )
    assert request(max_tokens=10, max_completion_tokens=5).to_generation(default).max_new_tokens == 5


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n", 3, "only n=1 is supported, got 3"),
        ("logprobs", True, "logprobs is not supported by this endpoint; leave it unset"),
        ("tools", [{"type": "function"}], "tools is not supported by this endpoint; leave it unset"),
        ("presence_penalty", 0.5, "presence_penalty is not supported by this endpoint; leave it unset"),
        ("stop", ["a", "b", "c", "d", "e"], "at most 4 stop sequences, got 5"),
    ],
)
def test_fields_that_cannot_be_honoured_are_refused_by_name(field, value, message):
    with pytest.raises(ValidationError) as e:
        request(**{field: value})
    error = to_api_error(e.value)
    assert (error.status, error.param, error.message) == (422, field, f"{field}: {message}")


def test_unknown_fields_are_ignored_and_the_developer_role_is_the_system_prompt():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "user": "someone",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [IMAGE, {"type": "text", "text": "Hi"}], "name": "ann"},
            ],
        }
    )
    assert req.to_record("r1").messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE["image_url"]["url"], "detail": "low"}},
                                     {"type": "text", "text": "Hi"}]},
    ]


@pytest.mark.parametrize("exc, code", [
    (Overloaded("queue full"), "overloaded"),
    (BackPressureError(num_queued_requests=9, max_queued_requests=8), "overloaded"),  # Serve's own
    (EngineDead("CUDA error: an illegal memory access"), "engine_unavailable"),
    (RayActorError(), "replica_unavailable"),  # the replica stopped mid-request
    (ActorUnavailableError("gone", None), "replica_unavailable"),
], ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v)
def test_what_the_endpoint_cannot_take_now_is_a_503_with_retry_after(exc, code):
    """The README's 503 codes, each with `Retry-After: 1`, by the exception's type."""
    err = to_api_error(exc)
    assert (err.status, err.code, err.type, err.headers) == (503, code, "server_error", {"Retry-After": "1"})
    assert err.body()["error"]["code"] == code


def test_a_request_the_engine_could_not_answer_is_a_500_with_its_cause():
    """The engine failed on this request alone (after its batch was retried row by row): the
    server's failure, with the engine's one-line cause, not a client's 4xx."""
    err = failed_result(Result.failed("r", EngineError.wrap(RuntimeError("probability tensor contains inf")), 7))
    assert (err.status, err.type, err.message) == (500, "server_error", "engine: RuntimeError: probability tensor contains inf")


def test_an_unexpected_error_is_a_500_naming_only_its_type():
    """A server fault (not the client's): 500 `server_error`, its text left to the server log."""
    err = to_api_error(KeyError("/secret/path/weights.bin"))
    assert (err.status, err.type, err.code) == (500, "server_error", None)
    assert err.message == "internal error (KeyError); see the server log"


def test_pipeline_errors_map_to_openai_statuses():
    image = to_api_error(ImageError("cannot identify image file"))
    assert (image.status, image.code, image.body()["error"]["message"]) == (400, "invalid_image", "image: cannot identify image file")
    long = to_api_error(PromptTooLong("5000 tokens exceeds the model's context of 4096 tokens"))
    assert (long.status, long.code, long.type) == (400, "context_length_exceeded", "invalid_request_error")
    assert long.message == "prompt: 5000 tokens exceeds the model's context of 4096 tokens"
    other = to_api_error(MessagesError("turn 0: needs a role of system, user or assistant"))
    assert (other.status, other.code, other.message) == (400, None, "messages: turn 0: needs a role of system, user or assistant")
