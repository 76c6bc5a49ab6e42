"""The offline job end to end on local Ray: parity with transformers, exactly-once, bad rows."""

import json

import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.errors import JobError
from pipeline.job import run_job
from tests.conftest import (
    encode,
    photo,
    pil_error,
    read_output,
    reference,
    resized,
    write_parquet,
)

pytestmark = pytest.mark.slow
MAX_NEW = 12


def _job(ckpt, tmp_path, rows, schema=None, **extra):
    cfg = {
        "model": {"name": ckpt},
        "generation": {"max_new_tokens": MAX_NEW},
        "input": {"path": write_parquet(tmp_path / "in.parquet", rows, schema)},
        "output": {"path": str(tmp_path / "out")},
        "resources": {"model_batch_size": 4, "preprocess_batch_size": 4, "rows_per_block": 4},
    }
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return load_config(cfg)


def test_llava_job_matches_transformers_and_accounts_for_every_row(ray_local, tiny_llava, tmp_path):
    # Distinct photos and prompts of distinct lengths per row: a dropped prompt, a lost system
    # turn or two swapped rows change the text and the token counts.
    good = {
        "astronaut": (encode(photo("astronaut")), "What is the person wearing?"),
        "chelsea": (resized("chelsea", 300, 451), None),
        "coffee": (resized("coffee", 400, 600, "PNG"), "What drink is this?  Answer in a few words please."),
        "rocket": (resized("rocket", 427, 640), "Describe it."),
    }
    path_img = tmp_path / "camera.png"
    path_img.write_bytes(encode(photo("camera")))
    corrupt = encode(photo("coffee"), "JPEG")[:300]
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "An astronaut."}]},
             {"role": "user", "content": [{"type": "text", "text": "Where is she standing?"}]}]
    rows = [{"id": k, "image": img, "image_path": None, "prompt": p, "messages": None, "tag": f"t-{k}"} for k, (img, p) in good.items()]
    rows += [
        {"id": "from-path", "image": None, "image_path": str(path_img), "prompt": "What is this?", "messages": None, "tag": "p"},
        {"id": "chat", "image": resized("astronaut", 256, 256), "image_path": None, "prompt": None, "tag": "c",
         "messages": json.dumps([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who?"}]},
                                 {"role": "assistant", "content": "An astronaut."},
                                 {"role": "user", "content": "Where is she standing?"}])},
        {"id": "corrupt", "image": corrupt, "image_path": None, "prompt": None, "messages": None, "tag": "x"},
        {"id": "empty", "image": b"", "image_path": None, "prompt": None, "messages": None, "tag": "x"},
        {"id": "text", "image": b"just some text, not an image", "image_path": None, "prompt": None, "messages": None, "tag": "x"},
        {"id": "missing", "image": None, "image_path": str(tmp_path / "nope.jpg"), "prompt": None, "messages": None, "tag": "x"},
        {"id": "huge", "image": encode(photo("hubble_deep_field")), "image_path": None, "prompt": None, "messages": None, "tag": "x"},
        {"id": "long", "image": resized("coffee", 64, 64), "image_path": None, "prompt": "coffee " * 3600, "messages": None, "tag": "x"},
        {"id": "badchat", "image": resized("coffee", 64, 64), "image_path": None, "prompt": None, "messages": "{not json", "tag": "x"},
    ]
    cfg = _job(tiny_llava, tmp_path, rows, input={"passthrough": ["tag"]}, limits={"max_pixels": 800_000})
    summary = run_job(cfg)
    out = read_output(cfg.output.path)

    assert set(out) == {r["id"] for r in rows}  # every input row exactly once
    assert (summary.rows_total, summary.rows_ok, summary.rows_failed, summary.rows_processed) == (len(rows), 6, 7, len(rows))
    expected = {k: reference(tiny_llava, [img], prompt or cfg.prompt.default, MAX_NEW) for k, (img, prompt) in good.items()}
    expected["from-path"] = reference(tiny_llava, [path_img.read_bytes()], "What is this?", MAX_NEW)
    expected["chat"] = reference(tiny_llava, [resized("astronaut", 256, 256)], conversation=turns, max_new_tokens=MAX_NEW)
    for key, ref in expected.items():
        row = out[key]
        assert row["error"] is None, (key, row["error"])
        assert (row["text"], row["prompt_tokens"], row["image_tokens"], row["completion_tokens"]) == (
            ref.text, ref.prompt_tokens, ref.image_tokens, ref.completion_tokens), key
        assert row["model"] == tiny_llava and row["backend"] == "transformers/float32/sdpa"
    assert out["astronaut"]["tag"] == "t-astronaut" and out["from-path"]["tag"] == "p"
    assert len({r.prompt_tokens for r in expected.values()}) == len(expected)  # a swap would show
    assert len({r.text for r in expected.values()}) == len(expected)

    long_tokens = reference(tiny_llava, [resized("coffee", 64, 64)], "coffee " * 3600, 1).prompt_tokens
    errors = {k: out[k]["error"] for k in ("corrupt", "empty", "text", "missing", "huge", "long", "badchat")}
    assert errors == {
        "corrupt": f"image: truncated or corrupt data: {pil_error(corrupt)}",  # 300 bytes: the header is cut
        "empty": "image: empty (0 bytes)",
        "text": "image: cannot identify image file",
        "missing": f"image: not found: {tmp_path / 'nope.jpg'}",
        "huge": "image: 1000x872 exceeds limits.max_pixels=800000",
        "long": f"prompt: {long_tokens} tokens (576 for images) + max_new_tokens {MAX_NEW} exceeds the model's context of 4096 tokens",
        "badchat": "messages: not valid JSON (Expecting property name enclosed in double quotes at char 1)",
    }
    for k in errors:
        assert out[k]["text"] is None and out[k]["tag"] == "x"


def test_llava_next_job_mixed_aspect_ratios_and_multi_image_row(ray_local, tiny_llava_next, tmp_path):
    images = {
        "tall": [resized("astronaut", 480, 640)],
        "wide": [resized("coffee", 300, 900)],
        "landscape": [resized("rocket", 1024, 768)],
        "pair": [resized("chelsea", 300, 451), resized("coffee", 400, 600)],
    }
    rows = [{"id": k, "image": v, "prompt": f"Describe the {k} one."} for k, v in images.items()]
    schema = pa.schema([("id", pa.string()), ("image", pa.list_(pa.binary())), ("prompt", pa.string())])
    cfg = _job(tiny_llava_next, tmp_path, rows, schema)
    run_job(cfg)
    out = read_output(cfg.output.path)
    assert set(out) == set(images)
    for k, imgs in images.items():
        ref = reference(tiny_llava_next, imgs, f"Describe the {k} one.", MAX_NEW)
        row = out[k]
        assert row["error"] is None
        assert (row["text"], row["prompt_tokens"], row["image_tokens"], row["completion_tokens"]) == (
            ref.text, ref.prompt_tokens, ref.image_tokens, ref.completion_tokens), k
    assert out["pair"]["image_tokens"] > out["tall"]["image_tokens"]


# The id check on the driver (the default for up to 1M rows) and as a Ray Data aggregation on the
# cluster (any input over input.driver_id_check_max_rows): the same verdicts.
WHERE = pytest.mark.parametrize("where", [{}, {"driver_id_check_max_rows": 0}], ids=["driver", "cluster"])


@WHERE
def test_duplicate_ids_fail_before_any_work(ray_local, tiny_llava, tmp_path, where):
    img = resized("coffee", 64, 64)
    rows = [{"id": i, "image": img} for i in (1, 2, 2, 3, 3, 3)]
    cfg = _job(tiny_llava, tmp_path, rows, input=where)
    with pytest.raises(JobError, match=r"input: 3 rows repeat an id \(2 ids, e.g. [23]\).*input.duplicate_ids=keep_first"):
        run_job(cfg)
    out = tmp_path / "out"  # nothing written (the cluster's check runs after the writability check's mkdir)
    assert not out.exists() or not any(out.iterdir())
    nulls = _job(tiny_llava, tmp_path, [{"id": 1, "image": img}, {"id": None, "image": img}], input=where)
    with pytest.raises(JobError, match=r"^input: 1 rows have a null id \(column 'id'\); every row needs an id$"):
        run_job(nulls)


@WHERE
def test_keep_first_gives_the_drop_stage_the_same_repeats_wherever_ids_are_checked(ray_local, tiny_llava, tmp_path, where):
    """The verdict the drop stage acts on; a keep_first job end to end (the rows kept are the first
    occurrences, in the input's order): test_cli.py's run test."""
    from pipeline.inputs import check_ids_on_cluster, inspect_input
    from pipeline.readers import open_input

    rows = [{"id": i, "image": resized("coffee", 60 + n, 64), "prompt": f"Row {n}?"} for n, i in enumerate((5, 1, 5, 2, 1))]
    cfg = _job(tiny_llava, tmp_path, rows, input={"duplicate_ids": "keep_first", **where})
    plan = inspect_input(cfg, open_input(cfg))
    assert plan.ids_checked == (where == {})
    plan = check_ids_on_cluster(cfg, plan)
    assert (plan.rows, plan.dropped_duplicates, sorted(plan.repeated_ids)) == (5, 2, [1, 5])
    assert {type(i) for i in plan.repeated_ids} == {int}  # as the drop stage takes them, either way


def test_trust_reads_no_ids(tiny_llava, tmp_path):
    """input.duplicate_ids: trust takes the input as unique: no pass over its ids at all (a
    repeat in such an input is the user's word against it, not checked)."""
    from pipeline.inputs import inspect_input
    from pipeline.readers import open_input

    rows = [{"id": i, "image": b"x"} for i in (1, 2, 2)]
    cfg = _job(tiny_llava, tmp_path, rows, input={"duplicate_ids": "trust"})
    plan = inspect_input(cfg, open_input(cfg))
    assert (plan.rows, plan.dropped_duplicates, plan.repeated_ids, plan.ids_checked) == (3, 0, [], True)
    checked = _job(tiny_llava, tmp_path, rows, input={"driver_id_check_max_rows": 2})
    assert inspect_input(checked, open_input(checked)).ids_checked is False  # left to the cluster


def test_missing_columns_are_named(tiny_llava, tmp_path, ray_never_started):
    cfg = _job(tiny_llava, tmp_path, [{"key": 1, "image": b"x"}])
    with pytest.raises(JobError, match=r"input: id column 'id' not found; columns are \['image', 'key'\]"):
        run_job(cfg)


def test_globs_lists_image_url_parts_and_overwrite(ray_local, tiny_llava_next, tmp_path):
    """input.path as a list holding a glob and a file; rows naming several image paths, or an
    OpenAI conversation with image_url parts; then `overwrite` replaces the whole output."""
    photos = {name: tmp_path / f"{name}.jpg" for name in ("astronaut", "coffee", "rocket", "chelsea")}
    for i, (name, path) in enumerate(photos.items()):
        path.write_bytes(resized(name, 300 + 40 * i, 400))
    conversation = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(photos["rocket"])}}, {"type": "text", "text": "What flies here?"}]}]
    schema = pa.schema([("id", pa.string()), ("image_path", pa.list_(pa.string())), ("prompt", pa.string()), ("messages", pa.string())])
    (tmp_path / "parts").mkdir()
    write_parquet(tmp_path / "parts" / "part-0.parquet",
                  [{"id": "pair", "image_path": [str(photos["astronaut"]), str(photos["coffee"])], "prompt": "Compare the two.", "messages": None}], schema)
    write_parquet(tmp_path / "parts" / "part-1.parquet",
                  [{"id": "url-part", "image_path": None, "prompt": None, "messages": json.dumps(conversation)}], schema)
    single = write_parquet(tmp_path / "single.parquet",
                           [{"id": "one", "image_path": [str(photos["chelsea"])], "prompt": "Who sits here?", "messages": None}], schema)
    cfg = _job(tiny_llava_next, tmp_path, [], input={"path": [str(tmp_path / "parts" / "part-*.parquet"), single]},
               output={"mode": "overwrite"})
    summary = run_job(cfg)
    out = read_output(cfg.output.path)
    assert set(out) == {"pair", "url-part", "one"} and summary.rows_ok == 3
    expected = {
        "pair": reference(tiny_llava_next, [photos["astronaut"].read_bytes(), photos["coffee"].read_bytes()], "Compare the two.", MAX_NEW),
        "url-part": reference(tiny_llava_next, [photos["rocket"].read_bytes()], "What flies here?", MAX_NEW),
        "one": reference(tiny_llava_next, [photos["chelsea"].read_bytes()], "Who sits here?", MAX_NEW),
    }
    for key, ref in expected.items():
        assert (out[key]["text"], out[key]["prompt_tokens"], out[key]["image_tokens"]) == (ref.text, ref.prompt_tokens, ref.image_tokens), key

    rerun = cfg.model_copy(update={"input": cfg.input.model_copy(update={"path": single})})
    assert run_job(rerun).rows_total == 1
    assert set(read_output(cfg.output.path)) == {"one"}  # overwrite removed the old rows


_PREFLIGHT_IN_A_PROGRAM = """
import json, sys
from pipeline.config import Config
from pipeline.job import preflight
checkpoint, plan = preflight(Config.model_validate_json(sys.argv[1]))
import torch  # the program's own use of torch, after a job's checks
from transformers import LlavaForConditionalGeneration  # noqa: F401
print(json.dumps([plan.rows, checkpoint.images.describe(), torch.__version__]))
"""


def test_a_program_calling_the_job_keeps_torch(tiny_llava, tmp_path):
    """Torch is left out only of processes llava-ray owns (its CLI's, its actors'): a program
    that calls `run_job` (here its preflight) can still import torch and load transformers
    models afterwards, and the checks read what they read beside an imported torch."""
    import torch

    from pipeline.job import preflight
    from tests.conftest import in_a_fresh_process

    cfg = _job(tiny_llava, tmp_path, [{"id": i, "image": resized("coffee", 200, 300), "prompt": "?"} for i in range(3)])
    printed, loaded = in_a_fresh_process(_PREFLIGHT_IN_A_PROGRAM, cfg.model_dump_json())
    checkpoint, plan = preflight(cfg)
    assert json.loads(printed[-1]) == [3, checkpoint.images.describe(), torch.__version__] and "torch" in loaded
