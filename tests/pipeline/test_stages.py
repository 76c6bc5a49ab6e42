"""What crosses from the CPU actors to the model actors: exact, and compact."""

import numpy as np
import pyarrow as pa
import pytest
import transformers as tf
from PIL import Image

from pipeline.config import load_config
from pipeline.records import Record
from pipeline.stages import PREPARED_FIELDS, prepared_to_row, row_to_prepared
from tests.conftest import preprocessor, resized


def test_prepared_row_round_trips_and_is_at_most_a_quarter_of_the_processor_output(tiny_llava_next):
    import io

    pre = preprocessor(load_config({"model": {"name": tiny_llava_next}}))
    images = [resized("astronaut", 480, 640), resized("coffee", 300, 900), resized("rocket", 1024, 768)]
    processor = tf.AutoProcessor.from_pretrained(tiny_llava_next)
    ours = theirs = 0
    for i, image in enumerate(images):
        prepared = pre.prepare(Record(id=i, images=[image], prompt="What is this?"))
        row = prepared_to_row(prepared)
        back = row_to_prepared(row, i)
        assert np.array_equal(back.input_ids, prepared.input_ids) and np.array_equal(back.tiles, prepared.tiles)
        assert (back.tiles_per_image, back.image_sizes, back.prompt) == (prepared.tiles_per_image, prepared.image_sizes, prepared.prompt)
        ours += pa.Table.from_pylist([row], schema=pa.schema(PREPARED_FIELDS)).nbytes
        enc = processor(images=[Image.open(io.BytesIO(image))], text=prepared.prompt, return_tensors="np")
        theirs += sum(v.nbytes for v in enc.values())
    assert ours / theirs <= 0.25, ours / theirs


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_llava_next"])
def test_the_system_prompt_reaches_the_model(request, family):
    """Both stages as plain callables, as Ray Data calls them, with `prompt.system` set: the
    answer and the prompt's length are transformers' own for the conversation with that turn."""
    from pipeline.stages import GenerateStage, PreprocessStage
    from tests.conftest import reference

    ckpt = request.getfixturevalue(family)
    image = resized("chelsea", 300, 451)
    cfg = {"model": {"name": ckpt}, "generation": {"max_new_tokens": 8}, "input": {"path": "unused"},
           "prompt": {"system": "You are a terse assistant."}}
    out = GenerateStage(cfg)(PreprocessStage(cfg)(pa.table({"id": [1], "image": [image], "prompt": ["Who is this?"]}))).to_pylist()[0]
    system = {"role": "system", "content": [{"type": "text", "text": "You are a terse assistant."}]}
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who is this?"}]}
    ref = reference(ckpt, [image], conversation=[system, user], max_new_tokens=8)
    without = reference(ckpt, [image], "Who is this?", 8)
    assert (out["text"], out["prompt_tokens"]) == (ref.text, ref.prompt_tokens)
    assert ref.prompt_tokens > without.prompt_tokens  # the turn is really there


def test_a_cpu_actor_decodes_one_row_per_cpu_at_once_while_more_rows_read_their_bytes(tiny_llava, monkeypatch):
    import threading
    import time

    import pipeline.preprocess
    from pipeline.stages import PreprocessStage

    cfg = load_config({"model": {"name": tiny_llava}, "input": {"path": "rows.parquet"}, "resources": {"preprocess_cpus": 2}, "fetch": {"concurrency": 8}})
    stage = PreprocessStage(cfg.model_dump())
    lock, running, peaks = threading.Lock(), {"load_bytes": 0, "decode_image": 0}, {"load_bytes": 0, "decode_image": 0}

    def counted(name):
        real = getattr(pipeline.preprocess, name)

        def call(*args, **kwargs):
            with lock:
                running[name] += 1
                peaks[name] = max(peaks[name], running[name])
            time.sleep(0.05)
            with lock:
                running[name] -= 1
            return real(*args, **kwargs)
        return call

    for name in running:
        monkeypatch.setattr(pipeline.preprocess, name, counted(name))
    rows = [{"id": i, "image": resized("coffee", 120, 160), "prompt": "hi"} for i in range(8)]
    prepared = list(stage.pool.map(stage._prepare, rows))  # what __call__ does with a batch's rows
    assert [p["error"] for p in prepared] == [None] * 8
    assert peaks["decode_image"] == 2  # one per CPU: PIL releases the GIL, so they do run at once
    assert peaks["load_bytes"] > 2  # reads of S3 / http(s) images overlap beyond the CPUs


KEY, SECRET, API_KEY = "AKIA-not-for-actors", "s3cret-not-for-actors", "api-key-not-for-actors"


def test_no_secret_travels_in_an_actors_arguments(ray_local, tiny_llava):
    """Ray shows actor arguments in its dashboard and task specs: the constructor kwargs of both
    pools, pickled as Ray pickles them, hold no secret; the preprocessing stage built from them
    still has the configured credentials (by reference, from the object store). That an actor
    reads s3:// images with them is test_s3's jobs."""
    import ray.cloudpickle as cloudpickle

    from pipeline.stages import PreprocessStage, generate_kwargs, preprocess_kwargs

    cfg = load_config({"model": {"name": tiny_llava}, "input": {"path": "in.parquet"},
                       "storage": {"key": KEY, "secret": SECRET}, "serve": {"api_key": API_KEY}})
    pre, gen = preprocess_kwargs(cfg), generate_kwargs(cfg)
    for kwargs in (pre, gen):
        sent = cloudpickle.dumps(kwargs["fn_constructor_kwargs"]) + repr(kwargs).encode()
        assert not [s for s in (KEY, SECRET, API_KEY) if s.encode() in sent]
    stage = PreprocessStage(**pre["fn_constructor_kwargs"])
    assert (stage.cfg.storage.key, stage.cfg.storage.secret, stage.cfg.serve.api_key) == (KEY, SECRET, None)


def test_the_model_actor_closes_its_engine_when_ray_data_drops_it(tiny_llava):
    """Ray Data deletes the actor's UDF on a graceful stop (`__ray_shutdown__`): its engine is
    closed then, the model's weights freed (vLLM's worker processes stopped), not left behind."""
    import gc
    import weakref

    from pipeline.stages import GenerateStage

    stage = GenerateStage({"model": {"name": tiny_llava}, "input": {"path": "unused"}})
    engine = stage.engine
    model = weakref.ref(engine.model)
    del stage
    gc.collect()
    assert engine.model is None and model() is None


def test_the_object_store_budget_scales_with_the_model_actors_and_none_keeps_ray_s_default():
    from ray.data import ExecutionResources

    from pipeline.stages import object_store_budget

    default = ExecutionResources.for_limits()
    cfg = load_config({"model": {"name": "m"}, "resources": {"model_actors": 3}})
    assert object_store_budget(cfg, default).object_store_memory == 3 * 256 * 2**20
    assert object_store_budget(cfg, default).cpu == default.cpu  # only the store is bounded
    unbounded = load_config({"model": {"name": "m"}, "resources": {"object_store_mb_per_model_actor": None}})
    assert object_store_budget(unbounded, default) is default


def test_drop_repeated_ids_keeps_each_ids_first_row_across_batches():
    """keep_first's one actor, as a plain callable: across batches only the first row of a
    repeated id is kept (here int32 ids, the repeats listed as Python ints as the driver sends them)."""
    from pipeline.stages import DropRepeatedIds

    drop = DropRepeatedIds("id", [5, 1])
    first = drop(pa.table({"id": pa.array([5, 1, 5, 2], pa.int32()), "row": ["a", "b", "c", "d"]}))
    second = drop(pa.table({"id": pa.array([1, 3, 5], pa.int32()), "row": ["e", "f", "g"]}))
    assert (first.column("row").to_pylist(), second.column("row").to_pylist()) == (["a", "b", "d"], ["f"])
    assert first.schema == pa.schema([("id", pa.int32()), ("row", pa.string())])


# An actor's process: the stage (argv[4]) built and called there as Ray Data does, its output written back.
_STAGE = """
import json, sys
import pyarrow as pa
import pipeline.stages
cfg, src, dst = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
with pa.memory_map(src) as f:
    batch = pa.ipc.open_file(f).read_all()
out = getattr(pipeline.stages, sys.argv[4])(cfg)(batch)
with pa.OSFile(dst, "wb") as f, pa.ipc.new_file(f, out.schema) as w:
    w.write_table(out)
"""


def _in_an_actors_process(stage: str, cfg: dict, batch: pa.Table, tmp_path) -> tuple[pa.Table, list[str]]:
    """`stage` (a class of pipeline.stages) on `batch` in a fresh process: its output, and the
    torch, torchvision and scipy modules that process imported (`in_a_fresh_process`)."""
    import json

    from tests.conftest import in_a_fresh_process

    with pa.OSFile(str(tmp_path / "in.arrow"), "wb") as f, pa.ipc.new_file(f, batch.schema) as w:
        w.write_table(batch)
    _, loaded = in_a_fresh_process(_STAGE, json.dumps(cfg), str(tmp_path / "in.arrow"), str(tmp_path / "out.arrow"), stage)
    with pa.memory_map(str(tmp_path / "out.arrow")) as f:
        return pa.ipc.open_file(f).read_all(), loaded


@pytest.mark.parametrize("family,exact", [("tiny_llava", False), ("tiny_llava_next", False), ("tiny_llava_next", True)])
def test_a_cpu_actor_prepares_without_torch_exactly_what_it_prepares_with_it(request, tmp_path, family, exact):
    """A CPU actor's process never imports torch (the checkpoint's processor needs none), and its
    prepared rows -- token ids, tiles, counts, errors -- equal those of the same stage in this
    process, where torch is loaded. `exact`: the checkpoint's own image processor makes the tiles."""
    from pipeline.stages import PreprocessStage

    cfg = {"model": {"name": request.getfixturevalue(family)}, "input": {"path": "unused"},
           "preprocess": {"exact": exact}}
    images = [resized("astronaut", 480, 640), resized("coffee", 300, 900), resized("rocket", 1024, 768), b"not an image"]
    batch = pa.table({"id": list(range(4)), "image": images, "prompt": [f"Row {i}: what is this?" for i in range(4)]})
    there, loaded = _in_an_actors_process("PreprocessStage", cfg, batch, tmp_path)
    assert loaded == []  # torch, torchvision and scipy never imported
    here = PreprocessStage(cfg)(batch)
    assert there.equals(here)
    assert here.column("error").null_count == 3 and here.column("error_kind")[3].as_py() == "decode"


def test_a_model_actor_answers_without_scipy_exactly_what_it_answers_with_it(tiny_llava_next, tmp_path):
    """A model actor's process on transformers never imports scipy (transformers would import
    scipy.optimize for its object-detection losses), and its result rows equal those of the same
    stage in this process, where scipy is loaded. (Every job's model actor runs without scipy too,
    and the job tests compare its answers with transformers' here: this test pins the process.)"""
    import sys

    from pipeline.stages import GenerateStage, PreprocessStage

    cfg = {"model": {"name": tiny_llava_next}, "generation": {"max_new_tokens": 8}, "input": {"path": "unused"}}
    images = [resized("astronaut", 480, 640), resized("coffee", 300, 900), b"not an image"]
    prepared = PreprocessStage(cfg)(pa.table({"id": [0, 1, 2], "image": images, "prompt": ["What is this?"] * 3}))
    there, loaded = _in_an_actors_process("GenerateStage", cfg, prepared, tmp_path)
    assert "torch" in loaded and not [m for m in loaded if m.split(".")[0] == "scipy"]
    here = GenerateStage(cfg)(prepared)
    assert "scipy.optimize" in sys.modules  # here transformers took it, as it does wherever scipy is installed
    assert there.equals(here)
    assert here.column("error").null_count == 2 and all(here.column("text").to_pylist()[:2])


def test_anyres_tiles_per_image_are_transformers_count(tiny_llava_next):
    """ImageFacts counts AnyRes tiles without the modeling module (it imports torch), as
    transformers' `image_size_to_num_patches` counts them, for every shape from tall to wide."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    facts = preprocessor(load_config({"model": {"name": tiny_llava_next}})).checkpoint.images
    sizes = [(h, w) for h in (1, 90, 336, 337, 500, 671, 672, 673, 1000, 3024) for w in (1, 120, 336, 672, 1008, 4032)]
    expected = [image_size_to_num_patches(s, [list(p) for p in facts.pinpoints], facts.tile[0]) for s in sizes]
    assert facts.tiles(sizes) == expected
    assert len(set(expected)) > 2  # the sizes reach different grids
