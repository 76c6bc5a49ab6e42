"""HFEngine.stream, the endpoint's streaming source, against HFEngine.generate (no Ray)."""

from __future__ import annotations

import time

import pytest

from pipeline.config import load_config
from pipeline.records import Record, Result
from tests.conftest import encode, hf_engine, photo, preprocessor, resized


@pytest.fixture(scope="module")
def setup(tiny_llava):
    cfg = load_config({"model": {"name": tiny_llava}, "generation": {"max_new_tokens": 40}})
    pre = preprocessor(cfg)
    requests = [
        pre.prepare(Record(id="a", images=[encode(photo("astronaut"))], prompt="What is this?")),
        pre.prepare(Record(id="b", images=[resized("rocket", 427, 640)], prompt="Describe the picture.")),
    ]
    return cfg, hf_engine(cfg), requests


def _collect(engine, request, sampling) -> tuple[list[str], Result]:
    items = list(engine.stream(request, sampling))
    assert all(isinstance(i, str) for i in items[:-1]) and isinstance(items[-1], Result)
    return items[:-1], items[-1]


def test_deltas_join_to_generate_text_and_end_with_its_result(setup):
    cfg, engine, requests = setup
    for request in requests:
        [expected] = engine.generate([request], cfg.generation)
        deltas, result = _collect(engine, request, cfg.generation)
        assert "".join(deltas) == expected.text and result == expected
        assert len(deltas) > 3 and all(deltas)  # text arrives in pieces, no empty events


def test_stop_strings_are_never_streamed(setup):
    cfg, engine, requests = setup
    full = engine.generate(requests[:1], cfg.generation)[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    sampling = cfg.generation.model_copy(update={"stop": [stop, "never-appears"]})
    [expected] = engine.generate(requests[:1], sampling)
    deltas, result = _collect(engine, requests[0], sampling)
    assert "".join(deltas) == expected.text == full[: full.index(stop)]
    assert result == expected and result.finish_reason == "stop"


def test_closing_the_stream_early_frees_the_engine(setup):
    cfg, engine, requests = setup
    sampling = cfg.generation.model_copy(update={"max_new_tokens": 1500})
    start = time.perf_counter()
    engine.generate(requests[:1], sampling)
    full = time.perf_counter() - start
    stream = engine.stream(requests[0], sampling)
    next(stream), next(stream)
    start = time.perf_counter()
    stream.close()  # returns once the generate thread has stopped
    assert time.perf_counter() - start < full / 3


def test_a_row_that_breaks_its_batch_fails_alone(setup):
    """A batch that raises is retried row by row: the bad row gets an `engine:` error, the
    others the answers they get on their own."""
    import dataclasses

    import numpy as np

    cfg, engine, requests = setup
    alone = [engine.generate([r], cfg.generation)[0] for r in requests]
    # Tiles of the wrong shape: the vision tower cannot take them, in a batch or alone.
    broken = dataclasses.replace(requests[0], id="broken", tiles=np.zeros((1, 3, 7, 7), np.uint8))
    out = engine.generate([requests[0], broken, requests[1]], cfg.generation)
    assert [r.id for r in out] == ["a", "broken", "b"]
    assert out[0] == alone[0] and out[2] == alone[1]
    assert (out[1].text, out[1].error) == (None, "engine: ValueError: Input image size (7*7) doesn't match model (336*336).")
    assert out[1].prompt_tokens == broken.prompt_tokens


def test_a_batch_mixing_stopped_and_unstopped_rows_equals_each_row_alone(setup):
    """A row cut by a stop string ends early; the batch runs on for the others and pads it with
    the pad token, which for llava-hf tokenizers is not EOS. Its text and completion_tokens (the
    online usage, the output column, tokens/s) are what it gets alone."""
    cfg, engine, requests = setup
    assert engine.pad_id not in engine.eos_ids
    a, b = (engine.generate([r], cfg.generation)[0].text for r in requests)
    stop = next(a[i : i + 3] for i in range(len(a) // 3, len(a) - 3) if a[i : i + 3].strip() and a[i : i + 3] not in b)
    sampling = cfg.generation.model_copy(update={"stop": [stop]})
    alone = [engine.generate([r], sampling)[0] for r in requests]
    assert [r.finish_reason for r in alone] == ["stop", "length"]
    together = engine.generate(requests, sampling)
    assert together == alone
    assert together[0].completion_tokens < together[1].completion_tokens == cfg.generation.max_new_tokens
