"""The OpenAI-compatible endpoint, live on 127.0.0.1: parity with the offline job and with
transformers, batching, errors, SSRF refusals and the API key, through the official client."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from pipeline.config import load_config
from tests.conftest import (
    encode,
    grown,
    photo,
    pil_error,
    read_output,
    reference,
    resized,
    saved,
    settled,
    value,
    write_parquet,
)
from tests.image_server import ImageServer

pytestmark = pytest.mark.slow
MAX_NEW = 24
KEY = "test-key-123"
MODEL = "llava-tiny"  # serve.served_model_name
SERVE_CONFIG = "configs/serve-tiny.yaml"
DEFAULT_PROMPT = load_config(SERVE_CONFIG).prompt.default


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(image_url: str, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]}


ASTRONAUT = encode(photo("astronaut"))
CHELSEA = resized("chelsea", 300, 451)
COFFEE = resized("coffee", 400, 600, "PNG")
CHAT_TURNS = [("What is this?", "A cat sitting on a table."), ("What color is it?", None)]


def chat_messages(image_url: str) -> list[dict]:
    (q1, a1), (q2, _) = CHAT_TURNS
    return [user(image_url, q1), {"role": "assistant", "content": a1}, {"role": "user", "content": q2}]


@pytest.fixture(scope="module")
def job_out(ray_local, tiny_llava, tmp_path_factory):
    """The offline job's answers for the parity cases (run before Serve takes its CPUs)."""
    from pipeline.job import run_job

    tmp = tmp_path_factory.mktemp("serve-job")
    chat = json.dumps(
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CHAT_TURNS[0][0]}]},
            {"role": "assistant", "content": CHAT_TURNS[0][1]},
            {"role": "user", "content": CHAT_TURNS[1][0]},
        ]
    )
    rows = [
        {"id": "astronaut", "image": ASTRONAUT, "image_path": None, "prompt": "What is the person wearing?", "messages": None},
        {"id": "chelsea", "image": CHELSEA, "image_path": None, "prompt": None, "messages": None},
        {"id": "chat", "image": COFFEE, "image_path": None, "prompt": None, "messages": chat},
    ]
    cfg = load_config(
        {
            "model": {"name": tiny_llava},
            "generation": {"max_new_tokens": MAX_NEW},
            "input": {"path": write_parquet(tmp / "in.parquet", rows)},
            "output": {"path": str(tmp / "out")},
        }
    )
    run_job(cfg)
    return read_output(cfg.output.path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(job_out, tiny_llava):
    """serve-tiny.yaml on the test checkpoint, with a key, tight limits, and http fetching on
    for 127.0.0.2 only (127.0.0.1 and every other private address stay refused)."""
    from ray import serve

    from deployments.app import serve_local

    cfg = load_config(
        SERVE_CONFIG,
        overrides={
            "model.name": tiny_llava,
            "generation.max_new_tokens": MAX_NEW,
            "serve.port": _free_port(),
            "serve.served_model_name": MODEL,
            "serve.api_key": KEY,
            "serve.max_ongoing_requests": 8,
            "serve.max_queued_requests": 16,  # 8 + 16 > the 16-request test
            "serve.max_body_bytes": 2_000_000,
            "limits.max_image_bytes": 1_000_000,
            "limits.max_pixels": 4_000_000,
            "fetch.allow_http": True,
            "fetch.allowed_private_hosts": ["127.0.0.2"],
            "fetch.retries": 0,
            "fetch.timeout_s": 3,
        },
    )
    url = serve_local(cfg, blocking=False)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=app, api_key=KEY, max_retries=0, timeout=60)


def ask(client, messages, **kw) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=MODEL, messages=messages, **{"temperature": 0, **kw})


def ask_streaming(client, messages, **kw) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def post(app: str, body, key: str | None = KEY, headers: dict | None = None) -> httpx.Response:
    """POST a body as a client would: JSON content type unless `headers` say otherwise."""
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{app}/chat/completions", content=content, headers=sent, timeout=60)


def test_health_models_and_unknown_model(app, client):
    assert httpx.get(app.removesuffix("/v1") + "/health").json() == {"status": "ok", "model": MODEL}
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[user(data_uri(ASTRONAUT), "Hi")])
    assert e.value.body == {
        "message": f"the model 'gpt-4o' does not exist; this endpoint serves {MODEL!r}",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_the_ingress_replica_never_loads_torch_and_the_model_replica_does(app):
    """The ingress prepares requests with the checkpoint's processor alone (Checkpoint.load
    without torch): its process maps no libtorch, which the model replica's process does."""
    from ray._private.state import actors  # the GCS actor table; the public state API needs the dashboard

    def maps_torch(pid: int) -> bool:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()

    alive = [a for a in actors().values() if a["State"] == "ALIVE" and a["ActorClassName"].startswith("ServeReplica:llava:")]
    by_kind = {kind: {maps_torch(a["Pid"]) for a in alive if a["ActorClassName"].endswith(kind)}
               for kind in ("LlavaIngress", "LlavaModel")}
    assert by_kind == {"LlavaIngress": {False}, "LlavaModel": {True}}


def _hf_turn(role: str, text: str, image: bool = False) -> dict:
    return {"role": role, "content": [{"type": "image"}] * image + [{"type": "text", "text": text}]}


(Q1, A1), (Q2, _) = CHAT_TURNS
PARITY = {  # case: (request messages, the image, the same conversation in HF's chat format)
    "astronaut": ([user(data_uri(ASTRONAUT), "What is the person wearing?")], ASTRONAUT,
                  [_hf_turn("user", "What is the person wearing?", image=True)]),
    "chelsea": ([user(data_uri(CHELSEA, "image/jpeg"), DEFAULT_PROMPT)], CHELSEA, [_hf_turn("user", DEFAULT_PROMPT, image=True)]),
    "chat": (chat_messages(data_uri(COFFEE)), COFFEE,
             [_hf_turn("user", Q1, image=True), _hf_turn("assistant", A1), _hf_turn("user", Q2)]),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_answers_equal_the_offline_job_and_transformers(client, job_out, tiny_llava, case):
    messages, image, conversation = PARITY[case]
    answer = ask(client, messages, max_tokens=MAX_NEW)
    streamed, chunks = ask_streaming(client, messages, max_tokens=MAX_NEW, stream_options={"include_usage": True})
    row = job_out[case]
    ref = reference(tiny_llava, [image], conversation=conversation, max_new_tokens=MAX_NEW)

    text = answer.choices[0].message.content
    assert row["error"] is None
    assert text == streamed == row["text"] == ref.text
    assert answer.choices[0].finish_reason == row["finish_reason"] == chunks[-2].choices[0].finish_reason
    assert answer.usage.prompt_tokens == row["prompt_tokens"] == chunks[-1].usage.prompt_tokens == ref.prompt_tokens
    assert row["image_tokens"] == ref.image_tokens
    assert answer.usage.completion_tokens == row["completion_tokens"] == chunks[-1].usage.completion_tokens == ref.completion_tokens
    assert answer.usage.total_tokens == row["prompt_tokens"] + row["completion_tokens"]
    assert answer.model == MODEL and answer.object == "chat.completion"


def test_parity_cases_differ_in_prompt_length_and_answer(job_out):
    """A swap of two cases, or a lost turn, would show in the comparisons above."""
    assert len({job_out[c]["prompt_tokens"] for c in PARITY}) == len({job_out[c]["text"] for c in PARITY}) == len(PARITY)


def test_sse_stream_shape(app):
    body = {"model": MODEL, "messages": [user(data_uri(ASTRONAUT), "Hi")], "stream": True, "max_tokens": 5}
    with httpx.stream("POST", f"{app}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert sum(1 for c in chunks[1:-1] if c["choices"][0]["delta"]["content"]) >= 2  # text arrives in pieces


def test_a_dropped_stream_stops_its_generation(client):
    """A client that goes away mid-stream frees the model at once: the engine runs one
    generation at a time, so a short request right after would otherwise wait for the long one."""
    messages = [user(data_uri(ASTRONAUT), "Describe it.")]
    start = time.perf_counter()
    long = {"max_tokens": 2000, "extra_body": {"min_tokens": 2000}}  # min_tokens: vLLM's extension, no early EOS
    assert ask(client, messages, **long).usage.completion_tokens == 2000
    full = time.perf_counter() - start
    with client.chat.completions.create(model=MODEL, messages=messages, temperature=0, stream=True, **long) as stream:
        events = iter(stream)
        next(events), next(events)
    start = time.perf_counter()
    assert ask(client, messages, max_tokens=2).usage.completion_tokens == 2
    assert time.perf_counter() - start < full / 3


def test_sampling_parameters(client):
    messages = [user(data_uri(ASTRONAUT), "Describe it.")]
    greedy = ask(client, messages, max_tokens=MAX_NEW).choices[0].message.content
    # stop: the answer ends before the first occurrence of the stop string, and says so.
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 3]
    cut = ask(client, messages, max_tokens=MAX_NEW, stop=[stop])
    assert cut.choices[0].message.content == greedy[: greedy.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert ask_streaming(client, messages, max_tokens=MAX_NEW, stop=stop)[0] == greedy[: greedy.index(stop)]
    # max_completion_tokens wins over max_tokens, and is honoured exactly.
    short = ask(client, messages, max_tokens=MAX_NEW, max_completion_tokens=3)
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (3, "length")
    # a seed makes sampling reproducible, and sampling really samples.
    def sample(seed):
        return ask(client, messages, temperature=1.5, top_p=0.95, seed=seed, max_tokens=MAX_NEW).choices[0].message.content

    seven, again, eight = sample(7), sample(7), sample(8)
    assert seven == again
    assert seven != greedy and seven != eight


def _batched(samples) -> tuple[float, float]:
    """(batches, requests in them) from the batch-size histogram's per-size buckets."""
    at = lambda k: value(samples, "ray_llava_ray_batch_size_bucket", le=f"{float(k)}")  # noqa: E731
    return at(16), sum(k * (at(k) - at(k - 1)) for k in range(1, 17))


def test_16_concurrent_requests_are_answered_in_batches(app, client, metrics_url):
    images = [ASTRONAUT, CHELSEA, COFFEE, resized("rocket", 427, 640)]
    prompts = ["What is this?", "Describe the picture.", "What color is the sky?", "How many people are there?"]
    requests = [[user(data_uri(images[i % 4]), prompts[i // 4])] for i in range(16)]
    alone = [ask(client, m, max_tokens=MAX_NEW).choices[0].message.content for m in requests]
    before = settled(metrics_url)
    sizes = lambda s: _batched(s)[1] - _batched(before)[1]  # noqa: E731

    async def together():
        aclient = openai.AsyncOpenAI(base_url=app, api_key=KEY, max_retries=0, timeout=120)
        return await asyncio.gather(
            *(aclient.chat.completions.create(model=MODEL, messages=m, temperature=0, max_tokens=MAX_NEW) for m in requests)
        )

    answers = asyncio.run(together())
    after = settled(metrics_url, lambda s: sizes(s) >= 16)
    assert [a.choices[0].message.content for a in answers] == alone
    assert sizes(after) == 16  # every request in exactly one batch
    batches = _batched(after)[0] - _batched(before)[0]
    singles = value(after, "ray_llava_ray_batch_size_bucket", le="1.0") - value(before, "ray_llava_ray_batch_size_bucket", le="1.0")
    assert batches < 16 and singles < batches, (batches, singles)  # some batches held several requests


def test_endpoint_metrics_count_what_was_sent(app, client, metrics_url):
    def requests(s, status, stream):
        return value(s, "ray_llava_ray_requests_total", status=status, stream=stream)

    before = settled(metrics_url)
    messages = [user(data_uri(ASTRONAUT), "Count me.")]
    for _ in range(3):
        ask(client, messages, max_tokens=4)
    text, _ = ask_streaming(client, messages, max_tokens=6)
    assert post(app, {"model": MODEL, "messages": [user("data:image/png;base64,AAAA", "Hi")]}).status_code == 400

    counts = {"ray_llava_ray_requests_total": 5, "ray_llava_ray_request_seconds_count": 5,
              "ray_llava_ray_time_to_first_token_seconds_count": 1, "ray_llava_ray_time_per_output_token_seconds_count": 1}
    counted = grown(before, counts)
    after = settled(metrics_url, lambda s: counted(s) and _batched(s)[1] - _batched(before)[1] >= 3)
    assert (requests(after, "200", "false") - requests(before, "200", "false"),
            requests(after, "200", "true") - requests(before, "200", "true"),
            requests(after, "400", "false") - requests(before, "400", "false")) == (3, 1, 1)
    # every request timed once, the stream's first token and its per-token time once
    assert {name: value(after, name) - value(before, name) for name in counts} == counts
    assert _batched(after)[1] - _batched(before)[1] == 3  # the plain requests; a stream is not batched, a 400 never reaches the model
    assert text


BIG_NOISE = encode(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8))  # ~1.5 MB of PNG
FLAT_9MP = encode(np.zeros((3000, 3000, 3), np.uint8))  # 9 megapixels in a few KiB


@pytest.mark.parametrize(
    "body, status, message, param, code",
    [
        (b"{not json", 400, "request body is not valid JSON: Expecting property name enclosed in double quotes at char 1", None, "invalid_json"),
        ({"model": "M"}, 422, "messages: Field required", "messages", "invalid_value"),
        ({"model": "M", "messages": [user(data_uri(ASTRONAUT), "Hi")], "temperature": 5}, 422,
         "temperature: Input should be less than or equal to 2", "temperature", "invalid_value"),
        ({"model": "M", "messages": [user(data_uri(ASTRONAUT), "Hi")], "n": 2}, 422,
         "n: only n=1 is supported, got 2", "n", "invalid_value"),
        ({"model": "M", "messages": [{"role": "user", "content": "Hi, no image"}]}, 400,
         "input: the row has no image", "messages", None),
        ({"model": "M", "messages": [user("data:image/png;base64,!!!notbase64", "Hi")]}, 400,
         "image: invalid base64 in data: URI", "messages", "invalid_image"),
        ({"model": "M", "messages": [user(data_uri(b"plain text, not an image"), "Hi")]}, 400,
         "image: cannot identify image file", "messages", "invalid_image"),
        ({"model": "M", "messages": [user(data_uri(BIG_NOISE), "Hi")]}, 400,
         "image: data: URI exceeds limits.max_image_bytes=1000000", "messages", "invalid_image"),
        ({"model": "M", "messages": [user(data_uri(FLAT_9MP), "Hi")]}, 400,
         "image: 3000x3000 exceeds limits.max_pixels=4000000", "messages", "invalid_image"),
        ({"model": "M", "messages": [user("/etc/passwd", "Hi")]}, 400,
         "image: only data: and http(s):// image URLs are accepted, got '/etc/passwd'", "messages", "invalid_image"),
        ({"model": "M", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(ASTRONAUT)}},
            {"type": "image_url", "image_url": {"url": data_uri(COFFEE)}}, {"type": "text", "text": "Compare."}]}]}, 400,
         "image: 2 images in one row; llava takes at most 1 (limits.max_images_per_row=4)", "messages", "invalid_image"),
        ({"model": "M", "messages": [user(data_uri(COFFEE), "coffee " * 3600)]}, 400,
         lambda ckpt: f"prompt: {reference(ckpt, [COFFEE], 'coffee ' * 3600, 1).prompt_tokens} tokens (576 for images) "
                      f"+ max_new_tokens {MAX_NEW} exceeds the model's context of 4096 tokens",
         "messages", "context_length_exceeded"),
        (b"x" * 2_000_001, 413, "request body exceeds serve.max_body_bytes=2000000", None, "request_too_large"),
    ],
    ids=["not-json", "no-messages", "temperature", "n", "no-image", "bad-base64", "not-an-image", "too-many-bytes",
         "too-many-pixels", "local-path", "two-images", "too-long", "body-too-big"],
)
def test_bad_requests_get_openai_errors_and_the_replica_keeps_serving(app, client, tiny_llava, body, status, message, param, code):
    r = post(app, {**body, "model": MODEL} if isinstance(body, dict) else body)
    error = r.json()["error"]
    assert r.status_code == status
    assert error["message"] == (message(tiny_llava) if callable(message) else message)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert ask(client, [user(data_uri(ASTRONAUT), "Still there?")], max_tokens=2).choices[0].finish_reason == "length"


def _raw(text_json: str) -> bytes:
    """A JSON body written by hand (escapes and numbers json.dumps would never produce)."""
    return ('{"model": "' + MODEL + '", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "'
            + data_uri(ASTRONAUT) + '"}}, {"type": "text", "text": ' + text_json + '}]}]}').encode()


def _json_error(body: bytes) -> str:
    try:
        json.loads(body)
    except ValueError as e:
        return f"request body is not valid JSON: {e}"
    raise AssertionError("valid JSON")


HUGE_INT = b'{"model": "M", "messages": [], "seed": ' + b"9" * 5000 + b"}"
LAB = data_uri(saved(Image.new("LAB", (32, 32)), "TIFF"), "image/tiff")
IMG = data_uri(ASTRONAUT)


def with_image(text: str, **extra) -> dict:
    return {"model": "M", "messages": [user(IMG, text)], **extra}


# (body, extra headers, status, message, param, code, type): what a hostile or careless client sends.
CORPUS = {
    "placeholder": (with_image("Look: <image> here"), {}, 400, "prompt: the text must not contain the image placeholder '<image>'", "messages", None),
    "placeholder-stream": (with_image("<image>", stream=True), {}, 400, "prompt: the text must not contain the image placeholder '<image>'", "messages", None),
    "placeholder-system": ({"model": "M", "messages": [{"role": "system", "content": "Say <image>"}, user(IMG, "Hi")]}, {}, 400,
                           "prompt: the text must not contain the image placeholder '<image>'", "messages", None),
    "nested-arrays": (b"[" * 100_000 + b"]" * 100_000, {}, 400, "request body is not valid JSON: nested too deeply", None, "invalid_json"),
    "huge-integer": (HUGE_INT, {}, 400, _json_error(HUGE_INT), None, "invalid_json"),
    "text-plain": (json.dumps(with_image("Hi")).encode(), {"Content-Type": "text/plain"}, 415,
                   "the body must be JSON (Content-Type: application/json), got 'text/plain'", None, "unsupported_media_type"),
    "form-post": (b"model=M", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
                  "the body must be JSON (Content-Type: application/json), got 'application/x-www-form-urlencoded'", None, "unsupported_media_type"),
    "max-tokens-huge": (with_image("Hi", max_tokens=10**9), {}, 422, "max_tokens: Input should be less than or equal to 8192", "max_tokens", "invalid_value"),
    "max-completion-huge": (with_image("Hi", max_completion_tokens=10**9), {}, 422,
                            "max_completion_tokens: Input should be less than or equal to 8192", "max_completion_tokens", "invalid_value"),
    "min-over-max": (with_image("Hi", max_tokens=5, min_tokens=10), {}, 422, "min_tokens (10) must be <= max_tokens (5)", None, "invalid_value"),
    "seed-huge": (with_image("Hi", seed=2**70), {}, 422, "seed: Input should be less than or equal to 9223372036854775807", "seed", "invalid_value"),
    "seed-negative": (with_image("Hi", seed=-1), {}, 422, "seed: Input should be greater than or equal to 0", "seed", "invalid_value"),
    "stop-empty": (with_image("Hi", stop=[""]), {}, 422, "stop: stop strings must not be empty", "stop", "invalid_value"),
    "stop-five": (with_image("Hi", stop=["a", "b", "c", "d", "e"]), {}, 422, "stop: at most 4 stop sequences, got 5", "stop", "invalid_value"),
    "prompt-1MB": (with_image("x" * 1_000_000), {}, 400, "prompt: 1000000 characters of text cannot fit the model's context of 4096 tokens",
                     "messages", "context_length_exceeded"),
    "lone-surrogate": (_raw('"\\ud800 hi"'), {}, 400, "prompt: the text holds an unpaired UTF-16 surrogate, which is not a character", "messages", None),
    "image-url-string": ({"model": "M", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": IMG}]}]}, {}, 422,
                         "messages.0.content.0.image_url.image_url: Input should be a valid dictionary or instance of ImageURL (+1 more)",
                         "messages.0.content.0.image_url.image_url", "invalid_value"),
    "image-url-no-url": ({"model": "M", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, {}, 422,
                         "messages.0.content.0.image_url.image_url.url: Field required (+1 more)", "messages.0.content.0.image_url.image_url.url",
                         "invalid_value"),
    "part-video": ({"model": "M", "messages": [{"role": "user", "content": [{"type": "video"}]}]}, {}, 422,
                   "messages.0.content.0: Input tag 'video' found using 'type' does not match any of the expected tags: 'text', 'image_url' (+1 more)",
                   "messages.0.content.0", "invalid_value"),
    "role-tool": ({"model": "M", "messages": [{"role": "tool", "content": "x"}]}, {}, 422,
                  "messages.0.role: Input should be 'system', 'developer', 'user' or 'assistant'", "messages.0.role", "invalid_value"),
    "content-number": ({"model": "M", "messages": [{"role": "user", "content": 5}]}, {}, 422,
                       "messages.0.content: Input should be a valid string (+1 more)", "messages.0.content", "invalid_value"),
    "messages-empty": ({"model": "M", "messages": []}, {}, 422, "messages: List should have at least 1 item after validation, not 0",
                       "messages", "invalid_value"),
    "model-missing": (json.dumps({"messages": [user(IMG, "Hi")]}).encode(), {}, 422, "model: Field required", "model", "invalid_value"),
    "logit-bias": (with_image("Hi", logit_bias={"5": -100}), {}, 422, "logit_bias: logit_bias is not supported by this endpoint; leave it unset",
                   "logit_bias", "invalid_value"),
    "tool-choice-required": (with_image("Hi", tool_choice="required"), {}, 422,
                             "tool_choice: 'required' needs tools, which this endpoint does not support; leave it unset or 'none'",
                             "tool_choice", "invalid_value"),
    "tools": (with_image("Hi", tools=[{"type": "function", "function": {"name": "f"}}]), {}, 422,
              "tools: tools is not supported by this endpoint; leave it unset", "tools", "invalid_value"),
    "json-mode": (with_image("Hi", response_format={"type": "json_object"}), {}, 422,
                  "response_format: type 'json_object' is not supported by this endpoint; only 'text' (the default)", "response_format", "invalid_value"),
    "presence-penalty": (with_image("Hi", presence_penalty=0.5), {}, 422,
                         "presence_penalty: presence_penalty is not supported by this endpoint; leave it unset", "presence_penalty", "invalid_value"),
    "ftp-image": ({"model": "M", "messages": [user("ftp://example.com/x.png", "Hi")]}, {}, 400,
                  "image: only data: and http(s):// image URLs are accepted, got 'ftp://example.com/x.png'", "messages", "invalid_image"),
    "data-not-base64": ({"model": "M", "messages": [user("data:image/png,raw", "Hi")]}, {}, 400,
                        "image: data: URI must be base64-encoded (data:image/png;base64,...)", "messages", "invalid_image"),
    "truncated-image": ({"model": "M", "messages": [user(data_uri(ASTRONAUT[:3000]), "Hi")]}, {}, 400,
                        f"image: truncated or corrupt PNG data: {pil_error(ASTRONAUT[:3000])}", "messages", "invalid_image"),
    "lab-image": ({"model": "M", "messages": [user(LAB, "Hi")]}, {}, 400,
                  "image: mode LAB images are not supported; convert them to RGB (or 8/16-bit greyscale)", "messages", "invalid_image"),
    "assistant-only": ({"model": "M", "messages": [{"role": "assistant", "content": "Hello"}]}, {}, 400,
                       "input: the row has no image", "messages", None),
}


@pytest.mark.parametrize("case", list(CORPUS))
def test_hostile_requests_are_4xx_and_the_replica_keeps_serving(app, client, case):
    body, headers, status, message, param, code = CORPUS[case]
    r = post(app, {**body, "model": MODEL} if isinstance(body, dict) else body, headers=headers)
    assert r.status_code == status, r.text[:300]
    assert r.json() == {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    assert ask(client, [user(IMG, "Still there?")], max_tokens=2).choices[0].finish_reason == "length"


@pytest.mark.parametrize("extra", [{"response_format": {"type": "text"}}, {"logit_bias": {}}, {"tool_choice": "none"},
                                   {"tool_choice": "auto"}, {"presence_penalty": 0, "frequency_penalty": 0}, {"logprobs": False}])
def test_the_no_op_values_clients_send_by_default_are_accepted(app, extra):
    r = post(app, {**with_image("Hi", max_tokens=2), "model": MODEL, **extra})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text[:300]


def test_errors_surface_as_the_client_exceptions(client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [user("data:image/png;base64,AAAA", "Hi")])
    assert e.value.status_code == 400 and e.value.code == "invalid_image"
    with pytest.raises(openai.UnprocessableEntityError):
        ask(client, [user(data_uri(ASTRONAUT), "Hi")], top_p=0)


def test_api_key_is_required(app):
    body = {"model": "M", "messages": [user(data_uri(ASTRONAUT), "Hi")]}
    missing, wrong = post(app, body, key=None), post(app, body, key="wrong")
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert missing.json()["error"] == {
        "message": "missing API key: send the header 'Authorization: Bearer <key>'",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert wrong.json()["error"]["message"] == "incorrect API key"
    assert httpx.get(f"{app}/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=app, api_key="wrong", max_retries=0).models.list()


@pytest.fixture(scope="module")
def image_hosts():
    """127.0.0.1 (refused by the app) and 127.0.0.2 (listed in fetch.allowed_private_hosts)."""
    with ImageServer("127.0.0.1") as private, ImageServer("127.0.0.2") as allowed:
        private.add("/img.png", ASTRONAUT)
        allowed.add("/img.png", ASTRONAUT)
        yield private, allowed


@pytest.mark.parametrize(
    "url, message",
    [
        ("{private}/img.png", "image: refused 127.0.0.1 (127.0.0.1): loopback addresses are not fetched; "
                              "list the host in fetch.allowed_private_hosts to allow it"),
        ("http://169.254.169.254/latest/meta-data/", "image: refused 169.254.169.254 (169.254.169.254): link-local "
                                                    "(cloud metadata) addresses are not fetched; list the host in "
                                                    "fetch.allowed_private_hosts to allow it"),
        ("file:///etc/passwd", "image: only data: and http(s):// image URLs are accepted, got 'file:///etc/passwd'"),
        ("{allowed}/to-private", "image: refused 127.0.0.1 (127.0.0.1): loopback addresses are not fetched; "
                                 "list the host in fetch.allowed_private_hosts to allow it"),
        ("{allowed}/to-metadata", "image: refused 169.254.169.254 (169.254.169.254): link-local (cloud metadata) "
                                  "addresses are not fetched; list the host in fetch.allowed_private_hosts to allow it"),
    ],
    ids=["loopback", "metadata", "file", "redirect-to-loopback", "redirect-to-metadata"],
)
def test_image_urls_to_private_addresses_are_refused(client, image_hosts, url, message):
    private, allowed = image_hosts
    allowed.redirect("/to-private", private.url("/img.png"))
    allowed.redirect("/to-metadata", "http://169.254.169.254/latest/meta-data/")
    seen_before = len(private.seen)
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, [user(url.format(private=private.url(""), allowed=allowed.url("")), "Hi")])
    assert e.value.body["message"] == message
    assert len(private.seen) == seen_before  # nothing reached the refused server


def test_image_url_on_an_allowed_host_is_fetched(client, image_hosts):
    _, allowed = image_hosts
    fetched = ask(client, [user(allowed.url("/img.png"), "What is this?")], max_tokens=MAX_NEW)
    inline = ask(client, [user(data_uri(ASTRONAUT), "What is this?")], max_tokens=MAX_NEW)
    assert fetched.choices[0].message.content == inline.choices[0].message.content
    assert ("/img.png", f"127.0.0.2:{allowed.port}") in allowed.seen


@pytest.fixture(scope="module")
def tight_app(app, tmp_path_factory):
    """A second app on the same Serve: one request in flight at the model and one queued, on a
    wider checkpoint whose long answers take seconds (a replica holds its slot while it
    generates, not while a client reads: Serve does not hold a stream back for a slow reader)."""
    from ray import serve

    from deployments.app import build
    from pipeline.tiny import build_tiny_checkpoint

    slow = build_tiny_checkpoint(tmp_path_factory.mktemp("slow") / "ckpt", "llava", text_hidden=256, layers=4)
    cfg = load_config(SERVE_CONFIG, overrides={
        "model.name": str(slow), "serve.served_model_name": MODEL, "serve.api_key": KEY,
        "serve.max_ongoing_requests": 1, "serve.max_queued_requests": 1, "serve.max_batch_size": 1,
    })
    serve.run(build(cfg), name="tight", route_prefix="/tight")
    yield app.removesuffix("/v1") + "/tight/v1"
    serve.delete("tight")


def test_overload_is_a_503_in_openai_shape_and_service_resumes(tight_app):
    """By construction: a long generation holds the one model slot (about 10 s here), then two
    requests arrive for the one queue place; exactly one is refused, whatever their order."""
    messages = [user(data_uri(ASTRONAUT), "Describe it.")]
    short = {"model": MODEL, "messages": messages, "max_tokens": 2}

    async def flood():
        async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {KEY}"}) as h:
            long = {**short, "max_tokens": 3400, "min_tokens": 3400, "stream": True}
            async with h.stream("POST", f"{tight_app}/chat/completions", json=long) as running:
                assert running.status_code == 200
                lines = running.aiter_lines()  # kept: a dropped line iterator closes the response
                await lines.__anext__()  # the model is generating it now
                second = asyncio.create_task(h.post(f"{tight_app}/chat/completions", json=short))
                await asyncio.sleep(3)  # order does not matter: one queue place, two requests
                third = await h.post(f"{tight_app}/chat/completions", json=short)
                await running.aclose()
            return [await second, third]

    responses = asyncio.run(flood())
    assert sorted(r.status_code for r in responses) == [200, 503], [r.text[:200] for r in responses]
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"] == {
        "message": "the model is overloaded (its request queue is full); retry shortly",
        "type": "server_error",
        "param": None,
        "code": "overloaded",
    }
    after = httpx.post(f"{tight_app}/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60, json=short)
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] == "length"


def test_unknown_routes_and_methods_get_openai_json(app):
    root = app.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {KEY}"}
    missing = httpx.get(f"{root}/v1/completions-typo", headers=headers)
    assert missing.status_code == 404
    assert missing.json() == {"error": {"message": "Not Found", "type": "invalid_request_error", "param": None, "code": None}}
    wrong = httpx.get(f"{app}/chat/completions", headers=headers)
    assert wrong.status_code == 405
    assert wrong.json() == {"error": {"message": "Method Not Allowed", "type": "invalid_request_error", "param": None, "code": None}}
    with pytest.raises(openai.NotFoundError) as e:
        openai.OpenAI(base_url=app, api_key=KEY, max_retries=0).models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


def _replica_rss(ray_local) -> int:
    from ray._private.state import actors

    [pid] = [a["Pid"] for a in actors().values() if a["State"] == "ALIVE" and a["ActorClassName"].endswith("llava:LlavaModel")]
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_dropped_streams_are_aborted_and_memory_plateaus(app, ray_local, metrics_url):
    """Rounds of concurrent streams, each left by its client after the first event: every one
    is aborted in the engine (counted), and the replica's memory stops growing after the first
    round (measured 1.25 -> 1.73 GB over two rounds of 200 before the fix)."""
    body = {"model": MODEL, "messages": [user(data_uri(ASTRONAUT), "Describe it.")], "max_tokens": 2000,
            "min_tokens": 2000, "stream": True}

    async def round_of(n):
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as h:
            async def drop():
                async with h.stream("POST", f"{app}/chat/completions", json=body) as r:
                    lines = r.aiter_lines()
                    await lines.__anext__()
            await asyncio.gather(*(drop() for _ in range(n)))

    aborted = lambda s: value(s, "ray_llava_ray_streams_aborted_total")  # noqa: E731
    rss = []
    start = aborted(settled(metrics_url))
    for n in range(12, 73, 12):
        asyncio.run(round_of(12))  # within the model's 8 in flight + 16 queued: none refused
        after = settled(metrics_url, lambda s: aborted(s) - start >= n)
        assert aborted(after) - start == n  # every dropped stream was stopped in the engine, once
        rss.append(_replica_rss(ray_local))
    assert rss[5] - rss[2] < 0.05 * rss[2], rss  # a plateau after the first rounds
