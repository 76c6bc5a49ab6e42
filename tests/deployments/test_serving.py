"""The ingress's server-sent events, driven by a plain async source in place of the Serve
handle's stream (no Ray): what a client sees when the model fails mid-stream."""

import asyncio
import json

from deployments.serving import sse_events
from pipeline.errors import EngineError
from pipeline.records import Result


class Stream:
    """What `model.options(stream=True).stream.remote(...)` hands the ingress: an async iterator
    with `cancel()`."""

    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


def _events(first, rest, include_usage=False) -> list:
    async def collect():
        return [e async for e in sse_events("chatcmpl-1", "m", first, rest, include_usage)]

    lines = asyncio.run(collect())
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in lines)
    return [e[6:-2] if e[6:-2] == "[DONE]" else json.loads(e[6:-2]) for e in lines]


def test_a_stream_ends_with_finish_reason_usage_and_done():
    rest = Stream([" world", Result("r", "Hello world", "length", 7, 0, 2)])
    events = _events("Hello", rest, include_usage=True)
    assert [e["choices"][0]["delta"] for e in events[:3]] == [{"role": "assistant", "content": ""}, {"content": "Hello", "role": None}, {"content": " world", "role": None}]
    assert events[3]["choices"][0]["finish_reason"] == "length"
    assert events[4]["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert events[5] == "[DONE]" and rest.cancelled


def test_an_engine_error_mid_stream_is_an_error_event_then_done():
    rest = Stream([" more", Result.failed("r", EngineError("RuntimeError: out of memory"), 7)])
    events = _events("Some", rest)
    assert [e["choices"][0]["delta"]["content"] for e in events[1:3]] == ["Some", " more"]
    assert events[3] == {"error": {"message": "engine: RuntimeError: out of memory", "type": "server_error",
                                   "param": None, "code": None}}
    assert events[4] == "[DONE]" and rest.cancelled


def test_a_broken_connection_to_the_model_is_an_error_event_too():
    rest = Stream([RuntimeError("replica died")])
    events = _events("Partial", rest)
    assert events[-2]["error"]["type"] == "server_error" and events[-2]["error"]["message"].startswith("internal error (RuntimeError)")
    assert events[-1] == "[DONE]"
