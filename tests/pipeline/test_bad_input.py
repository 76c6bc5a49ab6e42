"""Messy data offline: every bad row comes out with a one-line error naming its stage and cause,
every usable one with the answer transformers gives, and nothing ends the batch.

The rows go through the job's own stage classes called as plain functions (PreprocessStage,
then GenerateStage, as Ray Data calls them), so a corpus of many kinds runs in seconds; a real
job on Ray runs a few of them too. What can be known from the input's schema or the config is
refused at job start, in one line, before Ray starts (test_job_start_refusals).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.errors import ERROR_KINDS, ConfigError, JobError
from pipeline.job import run_job
from pipeline.stages import GenerateStage, PreprocessStage
from tests.conftest import (
    encode,
    photo,
    pil_error,
    png_claiming,
    reference,
    resized,
    saved,
)

MAX_NEW = 6
GOOD = resized("astronaut", 240, 320)


def _bad_utf8_strings(values: list[str | bytes | None]) -> pa.Array:
    """A STRING column whose bytes need not be UTF-8, as a careless Parquet writer leaves them."""
    raw = [v.encode() if isinstance(v, str) else v for v in values]
    offsets = np.cumsum([0] + [len(v or b"") for v in raw]).astype(np.int32)
    validity = pa.array([v is not None for v in raw]).buffers()[1]
    return pa.Array.from_buffers(pa.string(), len(raw), [validity, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(v or b"" for v in raw))])


def _chat(*turns) -> str:
    return json.dumps(list(turns))


def corpus(tmp_path) -> tuple[list[dict], dict[str, tuple[str, object]]]:
    """Rows, and per id what must come out: ("error", exact message) or ("text", reference inputs)."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    fifo = tmp_path / "never-written.fifo"
    os.mkfifo(fifo)
    on_disk = tmp_path / "on-disk.png"
    on_disk.write_bytes(GOOD)
    truncated = encode(photo("coffee"), "JPEG")[:2000]
    rgb = Image.fromarray(photo("coffee")).resize((320, 240))
    grey = np.asarray(Image.fromarray(photo("camera")).resize((256, 256)))
    f_tiff = saved(Image.fromarray(grey.astype(np.float32) / 255.0, mode="F"), "TIFF")
    gif_frames = [Image.fromarray(photo(n)).resize((64, 48)) for n in ("chelsea", "coffee")]
    gif = io.BytesIO()
    gif_frames[0].save(gif, "GIF", save_all=True, append_images=gif_frames[1:], duration=100, loop=0)
    big = encode(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8))  # > max_image_bytes below

    err = lambda m: ("error", m)  # noqa: E731
    ok = lambda images, prompt="Describe this image in one sentence.", **kw: ("text", (images, prompt, kw))  # noqa: E731
    cases: dict[str, tuple[dict, tuple]] = {
        # images that decode and are answered
        "good": ({"image": GOOD}, ok([GOOD])),
        "good_path": ({"image_path": str(on_disk)}, ok([GOOD])),
        "cmyk_jpeg": ({"image": saved(rgb.convert("CMYK"), "JPEG")}, ok([saved(rgb.convert("CMYK"), "JPEG")])),
        "png16": ({"image": encode(grey.astype(np.uint16) * 257)}, ok([encode(grey)])),  # scaled, as viewers show it
        "float_tiff": ({"image": f_tiff}, ok([encode(grey)])),  # mode F in 0..1: the same as its 8-bit picture
        "palette_alpha": ({"image": saved(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0)},
                          ok([saved(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0)])),
        "animated_gif": ({"image": gif.getvalue()}, ok([gif.getvalue()])),  # the first frame, as the processor takes it
        "one_pixel": ({"image": encode(np.full((1, 1, 3), 200, np.uint8))}, ok([encode(np.full((1, 1, 3), 200, np.uint8))])),
        "hf_image_bytes": ({"hf": {"bytes": GOOD, "path": "ignored.png"}}, ok([GOOD])),
        "hf_image_path": ({"hf": {"bytes": None, "path": str(on_disk)}}, ok([GOOD])),
        "messages_image_url": ({"messages": _chat({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(on_disk)}}, {"type": "text", "text": "What is it?"}]})}, ok([GOOD], "What is it?")),
        "bad_utf8_passthrough": ({"image": GOOD, "tag": b"caf\xe9"}, ok([GOOD])),  # carried as it came
        # images that cannot be used
        "no_image": ({}, err("input: the row has no image")),
        "empty_bytes": ({"image": b""}, err("image: empty (0 bytes)")),
        "truncated_jpeg": ({"image": truncated}, err(f"image: truncated or corrupt JPEG data: {pil_error(truncated)}")),
        "random_bytes": ({"image": np.random.default_rng(1).bytes(4096)}, err("image: cannot identify image file")),
        "text_bytes": ({"image": b"hello, I am not an image\n" * 10}, err("image: cannot identify image file")),
        "bomb": ({"image": png_claiming(40000, 40000)}, err("image: 40000x40000 exceeds limits.max_pixels=4000000")),
        "too_many_pixels": ({"image": encode(np.zeros((2100, 2000, 3), np.uint8))}, err("image: 2000x2100 exceeds limits.max_pixels=4000000")),
        "thin": ({"image": encode(np.zeros((20000, 1, 3), np.uint8))}, err("image: 1x20000 aspect ratio exceeds limits.max_aspect_ratio=50")),
        "too_many_bytes": ({"image": big}, err(f"image: {len(big)} bytes exceeds limits.max_image_bytes=1000000")),
        "lab_tiff": ({"image": saved(Image.new("LAB", (32, 32)), "TIFF")}, err("image: mode LAB images are not supported; convert them to RGB (or 8/16-bit greyscale)")),
        "nan_tiff": ({"image": saved(Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F"), "TIFF")}, err("image: mode F image holds NaN or infinite values")),
        "missing_path": ({"image_path": str(tmp_path / "nope.jpg")}, err(f"image: not found: {tmp_path / 'nope.jpg'}")),
        "folder_path": ({"image_path": str(folder)}, err(f"image: {folder} is a folder, not a regular file")),
        "fifo_path": ({"image_path": str(fifo)}, err(f"image: {fifo} is a FIFO, not a regular file")),
        "device_path": ({"image_path": "/dev/zero"}, err("image: /dev/zero is a device, not a regular file")),
        "ftp_url": ({"image_path": "ftp://example.com/x.jpg"}, err("image: unsupported URL scheme 'ftp' in 'ftp://example.com/x.jpg'; use a path, s3://, http(s):// or data:")),
        "http_off": ({"image_path": "http://example.com/x.jpg"}, err("image: http(s) image URLs are disabled; set fetch.allow_http=true to fetch them")),
        "bad_base64": ({"image_path": "data:image/png;base64,!!!"}, err("image: invalid base64 in data: URI")),
        "data_not_base64": ({"image_path": "data:image/png,rawbytes"}, err("image: data: URI must be base64-encoded (data:image/png;base64,...)")),
        "hf_image_empty": ({"hf": {"bytes": None, "path": None}}, err("input: column 'hf' holds NoneType; expected encoded image bytes or a path/URL string")),
        "bad_utf8_path": ({"image_path": b"/tmp/caf\xe9.jpg"}, err("input: column 'image_path': cannot read the value (invalid UTF-8)")),
        # prompts and conversations
        "bad_utf8_prompt": ({"image": GOOD, "prompt": b"caf\xe9?"}, err("input: column 'prompt': cannot read the value (invalid UTF-8)")),
        "bad_utf8_messages": ({"image": GOOD, "messages": b"[\xff]"}, err("input: column 'messages': cannot read the value (invalid UTF-8)")),
        "placeholder_in_prompt": ({"image": GOOD, "prompt": "Look: <image> what?"}, err("prompt: the text must not contain the image placeholder '<image>'")),
        "huge_prompt": ({"image": GOOD, "prompt": "x" * 60_000}, err("prompt: 60000 characters of text cannot fit the model's context of 4096 tokens")),
        "two_images": ({"image_path": None, "messages": _chat({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(on_disk)}}, {"type": "image_url", "image_url": {"url": str(on_disk)}}]})},
            err("image: 2 images in one row; llava takes at most 1 (limits.max_images_per_row=4)")),
        "messages_not_json": ({"image": GOOD, "messages": "{not json"}, err("messages: not valid JSON (Expecting property name enclosed in double quotes at char 1)")),
        "messages_not_list": ({"image": GOOD, "messages": "{}"}, err("messages: expected a non-empty list of {role, content} objects")),
        "messages_empty": ({"image": GOOD, "messages": "[]"}, err("messages: expected a non-empty list of {role, content} objects")),
        "messages_no_role": ({"image": GOOD, "messages": _chat({"content": "hi"})}, err("messages: turn 0: needs a role of system, user or assistant")),
        "messages_tool_role": ({"image": GOOD, "messages": _chat({"role": "tool", "content": "hi"})}, err("messages: turn 0: needs a role of system, user or assistant")),
        "messages_number_content": ({"image": GOOD, "messages": _chat({"role": "user", "content": 5})}, err("messages: turn 0: content must be a string or a list of parts")),
        "messages_text_not_string": ({"image": GOOD, "messages": _chat({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": 3}]})},
                                     err("messages: a 'text' part needs a string 'text'")),
        "messages_video": ({"image": GOOD, "messages": _chat({"role": "user", "content": [{"type": "video"}]})},
                           err("messages: turn 0: unsupported part type 'video'; use text, image_url or image")),
        "messages_url_missing": ({"image": GOOD, "messages": _chat({"role": "user", "content": [{"type": "image_url", "image_url": {}}]})},
                                 err("messages: turn 0: an 'image_url' part needs image_url.url")),
        "messages_extra_image": ({"messages": _chat({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]})},
                                 err("messages: turn 0: more 'image' parts than the row has images")),
    }
    rows = [{"id": k, "image": None, "image_path": None, "hf": None, "prompt": None, "messages": None, "tag": "t"} | row
            for k, (row, _) in cases.items()]
    return rows, {k: want for k, (_, want) in cases.items()}


def _table(rows: list[dict]) -> pa.Table:
    strings = lambda name: _bad_utf8_strings([r[name] for r in rows])  # noqa: E731
    return pa.table({
        "id": pa.array([r["id"] for r in rows]),
        "image": pa.array([r["image"] for r in rows], pa.binary()),
        "image_path": strings("image_path"),
        "hf": pa.array([r["hf"] for r in rows], pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "prompt": strings("prompt"),
        "messages": strings("messages"),
        "tag": strings("tag"),
    })


def _config(ckpt, tmp_path, **extra) -> dict:
    return {
        "model": {"name": ckpt}, "generation": {"max_new_tokens": MAX_NEW},
        "input": {"path": str(tmp_path / "in.parquet"), "passthrough": ["tag"]}, "output": {"path": str(tmp_path / "out")},
        "limits": {"max_pixels": 4_000_000, "max_image_bytes": 1_000_000},
        **extra,
    }


def test_the_corpus_through_the_stages(tiny_llava, tmp_path):
    rows, wanted = corpus(tmp_path)
    data = _config(tiny_llava, tmp_path)
    data["input"]["columns"] = {"image": "image", "image_path": "image_path"}
    table = _table(rows)
    # The Hugging Face layout lives in its own image column: run those rows with input.columns.image=hf.
    hf = [i for i, r in enumerate(rows) if r["hf"] is not None]
    plain = [i for i in range(len(rows)) if i not in hf]
    out = {}
    for indices, image_column in ((plain, "image"), (hf, "hf")):
        cfg = {**data, "input": {**data["input"], "columns": {"image": image_column}}}
        part = table.take(indices)
        result = GenerateStage(cfg)(PreprocessStage(cfg)(part))
        assert result.num_rows == part.num_rows  # exactly once through both stages
        assert result.column("tag").equals(part.column("tag"))  # carried as Arrow, invalid bytes and all
        for i, row in zip(indices, result.drop_columns(["tag"]).to_pylist()):
            out[rows[i]["id"]] = row
    assert set(out) == set(wanted)
    for key, (kind, want) in wanted.items():
        row = out[key]
        if kind == "error":
            assert (row["error"], row["text"]) == (want, None), key
            assert "\n" not in row["error"] and row["error_kind"] in ERROR_KINDS, key
        else:
            images, prompt, _ = want
            ref = reference(tiny_llava, images, prompt, MAX_NEW)
            assert row["error"] is None, (key, row["error"])
            assert (row["text"], row["prompt_tokens"]) == (ref.text, ref.prompt_tokens), key
    assert len(wanted) >= 40


@pytest.mark.slow
def test_invalid_utf8_is_carried_untouched_and_costs_only_its_row(ray_local, tiny_llava, tmp_path):
    """The same corpus as a real job on Ray, written to Parquet with its invalid bytes and
    large_string ids (as Polars writes them): the job finishes, every row once, a passthrough
    column's bytes come back as they went in, and a rerun finds every id done."""
    import pyarrow.parquet as pq

    rows, wanted = corpus(tmp_path)
    keep = ["good", "bad_utf8_passthrough", "bad_utf8_prompt", "bad_utf8_messages", "bad_utf8_path", "fifo_path", "truncated_jpeg"]
    rows = [r for r in rows if r["id"] in keep]
    table = _table(rows).drop_columns(["hf"])
    pq.write_table(table.set_column(0, "id", table.column("id").cast(pa.large_string())), tmp_path / "in.parquet")
    cfg = load_config(_config(tiny_llava, tmp_path, resources={"rows_per_block": 2, "model_batch_size": 2, "preprocess_batch_size": 2}))
    summary = run_job(cfg)
    assert (summary.rows_total, summary.rows_ok) == (len(keep), 2)
    assert run_job(cfg).rows_processed == 0  # resumed on large_string ids: every id found done
    got = pq.read_table(tmp_path / "out")
    ids = got.column("id").to_pylist()
    tags = dict(zip(ids, got.column("tag").cast(pa.binary()).to_pylist()))  # the bytes as they went in
    assert tags["bad_utf8_passthrough"] == b"caf\xe9" and tags["good"] == b"t"
    errors = dict(zip(ids, got.column("error").to_pylist()))
    for key in keep:
        kind, want = wanted[key]
        assert errors[key] == (want if kind == "error" else None), key


def _write(tmp_path, table: pa.Table, name="in.parquet") -> str:
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / name)
    return str(tmp_path / name)


ID_TYPES = {
    "int32": (pa.array([1, 2], pa.int32()), None),
    "uint64": (pa.array([1, 2], pa.uint64()), None),
    "string": (pa.array(["a", "b"]), None),
    "large_string": (pa.array(["a", "b"], pa.large_string()), None),
    "float": (pa.array([1.0, float("nan")]), "input: id column 'id' is double; expected integers or strings (cast float, dictionary, binary or timestamp ids to int64 or string)"),
    "dictionary": (pa.array(["a", "b"]).dictionary_encode(), "input: id column 'id' is dictionary<values=string, indices=int32, ordered=0>; expected integers or strings (cast float, dictionary, binary or timestamp ids to int64 or string)"),
    "timestamp": (pa.array([1, 2], pa.timestamp("ms")), "input: id column 'id' is timestamp[ms]; expected integers or strings (cast float, dictionary, binary or timestamp ids to int64 or string)"),
    "binary": (pa.array([b"a", b"b"]), "input: id column 'id' is binary; expected integers or strings (cast float, dictionary, binary or timestamp ids to int64 or string)"),
}


@pytest.mark.parametrize("kind", list(ID_TYPES))
def test_every_id_type_a_parquet_writer_produces(tiny_llava, tmp_path, kind):
    """Integers and strings key the output; other types are refused at start, in one line."""
    from pipeline.inputs import inspect_input
    from pipeline.readers import open_input

    ids, refusal = ID_TYPES[kind]
    path = _write(tmp_path, pa.table({"id": ids, "image": pa.array([GOOD, GOOD], pa.binary())}))
    cfg = load_config(_config(tiny_llava, tmp_path, input={"path": path}))
    if refusal is None:
        plan = inspect_input(cfg, open_input(cfg))
        assert (plan.rows, plan.columns) == (2, ["id", "image"])
    else:
        with pytest.raises(JobError) as e:
            inspect_input(cfg, open_input(cfg))
        assert str(e.value) == refusal


def test_job_start_refusals(tiny_llava, tmp_path, ray_never_started):
    """What the schemas, the ids and the paths tell before any work: one line each, nothing written."""
    good = pa.table({"id": [1, 2], "image": pa.array([GOOD, GOOD], pa.binary())})
    cases = {
        "image int": (pa.table({"id": [1], "image": [5]}), {}, "input: column 'image' is int64; expected binary (encoded image bytes), struct<bytes, path> (Hugging Face Image), or a list of them"),
        "prompt int": (pa.table({"id": [1], "image": pa.array([GOOD], pa.binary()), "prompt": [3]}), {}, "input: column 'prompt' is int64; expected string"),
        "null id": (pa.table({"id": pa.array([1, None]), "image": pa.array([GOOD, GOOD], pa.binary())}), {}, "input: 1 rows have a null id (column 'id'); every row needs an id"),
        "passthrough text": (good.append_column("text", pa.array(["a", "b"])), {"passthrough": ["text"]},
                             "input.passthrough: input column 'text' collides with a column the job writes; rename it in the input"),
        "id named error": (pa.table({"error": [1], "image": pa.array([GOOD], pa.binary())}), {"columns": {"id": "error"}},
                           "input.columns.id: input column 'error' collides with a column the job writes; rename it in the input"),
        "no image column": (pa.table({"id": [1], "picture": pa.array([GOOD], pa.binary())}), {},
                            "input: no image column: expected 'image' (bytes) or 'image_path' (path/URL); columns are ['id', 'picture'] (input.columns.image / image_path)"),
        "struct not hf": (pa.table({"id": [1], "image": pa.array([{"data": GOOD}])}), {},
                          "input: column 'image' is struct<data: binary>; expected binary (encoded image bytes), struct<bytes, path> (Hugging Face Image), or a list of them"),
    }
    for name, (table, extra, message) in cases.items():
        data = _config(tiny_llava, tmp_path)
        data["input"] = {"path": _write(tmp_path, table, f"{name}.parquet"), "passthrough": [], **extra}
        with pytest.raises(JobError) as e:
            run_job(load_config(data))
        assert str(e.value) == message, name

    # ids of different types in different files
    mixed = [_write(tmp_path, pa.table({"id": [1], "image": pa.array([GOOD], pa.binary())}), "m1.parquet"),
             _write(tmp_path, pa.table({"id": ["x"], "image": pa.array([GOOD], pa.binary())}), "m2.parquet")]
    with pytest.raises(JobError) as e:
        run_job(load_config(_config(tiny_llava, tmp_path, input={"path": mixed, "passthrough": []})))
    assert str(e.value) == f"input: column 'id' is int64 in {mixed[0]} but string in {mixed[1]}; write every file with one type"
    assert not (tmp_path / "out").exists()


def test_outputs_that_would_destroy_or_reread_the_input(tiny_llava, tmp_path, ray_never_started):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    inp = _write(inputs, pa.table({"id": [1, 2], "image": pa.array([GOOD, GOOD], pa.binary())}))
    link = tmp_path / "link-to-inputs"
    link.symlink_to(inputs)
    for input_path, output in [(inp, inp), (str(inputs), str(inputs)), (str(inputs), str(inputs / "out-inside")),
                               (str(inputs), str(link / "in.parquet")), (inp, os.path.relpath(inp)), (inp, str(tmp_path)),
                               (str(inputs / "*.parquet"), str(inputs / "out"))]:
        data = _config(tiny_llava, tmp_path, input={"path": input_path, "passthrough": []}, output={"path": output, "mode": "overwrite"})
        with pytest.raises(JobError) as e:
            run_job(load_config(data))
        assert str(e.value).startswith(f"output.path: {output} overlaps the input"), str(e.value)
    assert Path(inp).read_bytes() and sorted(p.name for p in inputs.iterdir()) == ["in.parquet"]  # nothing deleted, nothing written

    from pipeline.outputs import check_no_overlap  # object stores: s3a:// is s3:// too

    s3 = load_config({"model": {"name": "m"}, "input": {"path": "s3://bucket/data/"}, "output": {"path": "s3a://bucket/data/out"}})
    with pytest.raises(JobError, match=r"^output.path: s3a://bucket/data/out overlaps the input \(bucket/data\)"):
        check_no_overlap(s3, [])


def test_outputs_that_cannot_be_written(tiny_llava, tmp_path, ray_never_started):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    inp = _write(inputs, pa.table({"id": [1, 2], "image": pa.array([GOOD, GOOD], pa.binary())}))
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"x")
    for output, message in [("/proc/llava-ray-test/out", "output.path: cannot write to /proc/llava-ray-test/out: "),
                            (str(a_file / "out"), f"output.path: cannot write to {a_file / 'out'}: ")]:
        data = _config(tiny_llava, tmp_path, input={"path": inp, "passthrough": []}, output={"path": output})
        with pytest.raises(JobError) as e:
            run_job(load_config(data))
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    data = _config(tiny_llava, tmp_path, input={"path": inp, "passthrough": []}, output={"path": str(a_file)})
    with pytest.raises(JobError) as e:
        run_job(load_config(data))
    assert str(e.value) == f"output.path: {a_file} is a file; the output is a folder of Parquet files"
    data["output"]["format"] = "jsonl"
    with pytest.raises(JobError) as e:
        run_job(load_config(data))
    assert str(e.value) == f"output.path: {a_file} is a file; the output is a folder of JSON Lines files"


@pytest.mark.parametrize("settings, message", [
    ({"generation": {"seed": 2**64}}, "generation.seed: Input should be less than or equal to 9223372036854775807"),
    ({"generation": {"seed": -1}}, "generation.seed: Input should be greater than or equal to 0"),
    ({"generation": {"stop": ["ok", ""]}}, "generation.stop: stop strings must not be empty"),
    ({"serve": {"api_key": "  "}}, "serve.api_key: an empty key is not a key; set a real one, or remove serve.api_key to run without one"),
])
def test_settings_the_engine_cannot_take_are_config_errors(settings, message):
    with pytest.raises(ConfigError) as e:
        load_config({"model": {"name": "m"}, **settings})
    assert str(e.value) == message


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is not a loadable checkpoint"),
    (lambda p: p.write_text("hello"), "is not a loadable checkpoint"),
    (lambda p: (p.mkdir(), (p / "weights.bin").write_bytes(b"0")), "is not a loadable checkpoint"),
])
def test_a_model_path_that_is_not_a_checkpoint_is_one_line(tmp_path, make, message):
    from pipeline.checks import check_environment

    path = tmp_path / "model"
    make(path)
    with pytest.raises(ConfigError) as e:
        check_environment(load_config({"model": {"name": str(path)}}))
    assert str(e.value).startswith(f"model.name: '{path}' {message}") and "\n" not in str(e.value)
