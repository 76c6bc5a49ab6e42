"""The endpoint's replicas over their life, live on 127.0.0.1: refused past the queue bound,
drained without loss when redeployed, replaced when their engine can no longer serve."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time

import httpx
import pytest

from pipeline.config import load_config
from tests.conftest import encode, free_port, photo, settled, value
from tests.image_server import ImageServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a model load, a redeploy and a replacement on 2 cores
MODEL = "llava-tiny"
IMAGE = "data:image/png;base64," + base64.b64encode(encode(photo("astronaut"))).decode()
OVERRIDES = {
    "generation.max_new_tokens": 24,
    "serve.served_model_name": MODEL,
    "serve.api_key_env": None,
    "serve.max_ongoing_requests": 4,
    "serve.max_queued_requests": 4,  # admission bound: 4 x 1 replica + 4 = 8 requests
    "serve.health_check_period_s": 1,
    "serve.graceful_shutdown_timeout_s": 120,
    "fetch.allow_http": True,
    "fetch.allowed_private_hosts": ["127.0.0.2"],
    "fetch.retries": 0,
    "fetch.timeout_s": 120,
    "fetch.concurrency": 8,  # room for every held fetch below
}
BOUND = 8


def body(url: str = IMAGE, prompt: str = "What is this?", **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}


def config(ckpt: str, port: int, **more):
    return load_config("configs/serve-tiny.yaml", overrides={**OVERRIDES, "model.name": ckpt, "serve.port": port, **more})


@pytest.fixture(scope="module")
def app(ray_local, tiny_llava):
    from ray import serve

    from deployments.app import serve_local

    port = free_port()
    url = serve_local(config(tiny_llava, port), blocking=False)
    yield url, port
    serve.shutdown()


def chat(url: str, payload: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", json=payload, timeout=timeout)


def model_replica() -> tuple[str, int]:
    """(actor name, pid) of the one live LlavaModel replica."""
    import ray

    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::llava#LlavaModel#")]
    return name, ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda _: __import__("os").getpid()))


def wait_for(condition, what: str, bound_s: float = 180):
    """Poll until `condition()` is truthy; the bound only keeps a broken run from hanging."""
    deadline = time.monotonic() + bound_s
    while not (found := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.5)
    return found


def drop_streams(url: str, n: int) -> list[int]:
    """n streams at once, each left by its client after its first event; their statuses."""
    async def drop(client):
        async with client.stream("POST", f"{url}/chat/completions", json=body(stream=True, max_tokens=2000, min_tokens=2000)) as r:
            await r.aiter_lines().__anext__()
            return r.status_code

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(drop(client) for _ in range(n)))

    return asyncio.run(run())


def test_past_the_queue_bound_the_ingress_answers_503_with_retry_after(app, metrics_url):
    """By construction: BOUND requests held in the ingress by image fetches that do not answer
    yet fill the admission bound (4 at the model + 4 queued) while the model holds nothing, so
    the next one is refused by the ingress at once; once they finish, service resumes. Streams
    dropped by their clients before give their places back: else fewer would be let in here."""
    url, _ = app
    aborted = lambda s: value(s, "ray_llava_ray_streams_aborted_total")  # noqa: E731
    start = aborted(settled(metrics_url))
    assert drop_streams(url, BOUND) == [200] * BOUND
    assert aborted(settled(metrics_url, lambda s: aborted(s) - start >= BOUND)) - start == BOUND  # the model stopped them all
    gate = threading.Event()
    with ImageServer("127.0.0.2") as images:
        held = images.add("/held.png", encode(photo("astronaut")), gate=gate)

        async def scenario():
            async with httpx.AsyncClient(timeout=180) as client:
                waiting = [asyncio.create_task(client.post(f"{url}/chat/completions", json=body(held))) for _ in range(BOUND)]
                while len(images.seen) < BOUND:  # all are in the ingress, fetching
                    await asyncio.sleep(0.1)
                refused = await client.post(f"{url}/chat/completions", json=body())
                gate.set()
                return refused, await asyncio.gather(*waiting)

        try:
            refused, answered = asyncio.run(asyncio.wait_for(scenario(), 300))
        finally:
            gate.set()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": {"message": "the model is overloaded (its request queue is full); retry shortly",
                                        "type": "server_error", "param": None, "code": "overloaded"}}
    assert [r.status_code for r in answered] == [200] * BOUND
    assert chat(url, body(max_tokens=2)).status_code == 200


def test_a_redeploy_loses_no_request_in_flight(app, tiny_llava):
    """Requests in flight (plain and streamed) and requests sent during the redeploy all get
    their whole answer, none a 5xx: the old replicas stop taking requests, finish what they
    hold, and only then go (serve.graceful_shutdown_timeout_s)."""
    from ray import serve

    from deployments.app import APP_NAME, build

    url, port = app
    long = {"max_tokens": 600, "min_tokens": 600}
    expected = chat(url, body(**long)).json()["choices"][0]["message"]["content"]
    _, old_pid = model_replica()
    statuses: list[int] = []
    stop = threading.Event()

    def steady():  # a client that keeps asking while the redeploy runs
        while not stop.is_set():
            try:
                statuses.append(chat(url, body(max_tokens=4)).status_code)
            except httpx.HTTPError as e:  # a lost request, counted against the redeploy
                statuses.append(type(e).__name__)

    async def in_flight():
        async with httpx.AsyncClient(timeout=300) as client:
            plain = [asyncio.create_task(client.post(f"{url}/chat/completions", json=body(**long))) for _ in range(2)]
            async with client.stream("POST", f"{url}/chat/completions", json=body(stream=True, **long)) as streamed:
                lines = streamed.aiter_lines()
                assert streamed.status_code == 200 and (await lines.__anext__()).startswith("data: ")
                # The model is generating: redeploy (a new config is a new version of both deployments).
                new = build(config(tiny_llava, port, **{"serve.max_batch_size": 4}))
                await asyncio.to_thread(serve.run, new, name=APP_NAME, route_prefix="/")
                events = [line.removeprefix("data: ") async for line in lines if line]
            return await asyncio.gather(*plain), streamed.status_code, events

    client = threading.Thread(target=steady)
    client.start()
    try:
        plain, stream_status, events = asyncio.run(in_flight())
    finally:
        stop.set()
        client.join()
    assert [r.status_code for r in plain] == [200, 200] and stream_status == 200
    assert [r.json()["choices"][0]["message"]["content"] for r in plain] == [expected, expected]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert statuses and set(statuses) == {200}, statuses
    assert model_replica()[1] != old_pid  # it really was replaced


def test_a_replica_whose_engine_cannot_serve_is_replaced(app):
    """The loaded model is broken in the replica's own process (its weights dropped to the meta
    device: every generate fails); the health check's known-good request fails, Serve replaces
    the replica, and the new one answers as the old one did."""
    import ray

    url, _ = app
    before = chat(url, body(max_tokens=8)).json()["choices"][0]["message"]["content"]
    name, old_pid = model_replica()

    def break_model(replica_actor):
        server = replica_actor._replica_impl._user_callable_wrapper.user_callable
        server.engine.model.to("meta")

    ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(break_model))
    failed = chat(url, body(max_tokens=8))
    # an engine error (500), or already refused as dead (503 engine_unavailable): never a client's 4xx
    error = failed.json()["error"]
    assert (failed.status_code, error["type"]) in ((500, "server_error"), (503, "server_error")), failed.text
    assert failed.status_code == 500 or (error["code"], failed.headers["retry-after"]) == ("engine_unavailable", "1")
    wait_for(lambda: _pid_or_none() not in (None, old_pid), "a new model replica")
    answer = wait_for(lambda: (r := chat(url, body(max_tokens=8))).status_code == 200 and r, "an answer from it")
    assert answer.json()["choices"][0]["message"]["content"] == before


def _pid_or_none() -> int | None:
    try:
        return model_replica()[1]
    except Exception:  # between replicas: none alive, or the new one still starting
        return None
