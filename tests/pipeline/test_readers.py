"""Input formats (pipeline/readers.py): JSON Lines and CSV manifests, local and on S3 (moto)."""

import csv
import io
import json
import logging
import os

import pytest

from pipeline.config import load_config
from pipeline.errors import JobError
from pipeline.inputs import inspect_input
from pipeline.job import run_job
from pipeline.readers import open_input
from tests.conftest import BUCKET, encode, photo, resized, s3_fs, s3_storage, write_parquet

# LAION / DataComp-style columns, mapped with input.columns.
LAION = {"columns": {"id": "key", "image_path": "URL"}, "passthrough": ["TEXT"]}


def _manifest(fmt: str, rows: list[dict]) -> bytes:
    if fmt == "json":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])
    return buf.getvalue().encode()


def _config(ckpt, path, out, **extra):
    return load_config({"model": {"name": ckpt}, "generation": {"max_new_tokens": 4},
                        "input": {"path": path, **LAION}, "output": {"path": out},
                        "resources": {"rows_per_block": 2, "model_batch_size": 2, "preprocess_batch_size": 2}} | extra)


@pytest.mark.parametrize("fmt, ext", [("json", "jsonl"), ("json", "json"), ("json", "ndjson"), ("csv", "csv")])
def test_auto_reads_a_manifest_by_its_extension_and_says_so(tiny_llava, tmp_path, caplog, fmt, ext):
    rows = [{"key": f"k{i}", "URL": f"/x/{i}.jpg", "TEXT": None if i == 1 else f"alt {i}"} for i in range(3)]
    (tmp_path / f"a.{ext}").write_bytes(_manifest(fmt, rows[:2]))
    (tmp_path / f"b.{ext}").write_bytes(_manifest(fmt, rows[2:]))
    (tmp_path / "notes.txt").write_text("not input")
    cfg = _config(tiny_llava, str(tmp_path), str(tmp_path / "out"))
    with caplog.at_level(logging.INFO, logger="pipeline.readers"):
        plan = inspect_input(cfg, open_input(cfg))
    assert f"reading {tmp_path} as {fmt}" in caplog.text
    assert (plan.reader.format, plan.columns, plan.rows) == (fmt, ["key", "URL", "TEXT"], 3)
    assert [str(plan.schema.field(c).type) for c in plan.columns] == ["string", "string", "string"]


def test_a_manifest_that_cannot_serve_the_job_is_one_line_at_start(tiny_llava, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"key": "a", "URL": "/x.jpg", "TEXT": "t"}\n{"key": "a", "URL": "/y.jpg", "TEXT": "t"}\n')
    cfg = _config(tiny_llava, str(tmp_path / "a.jsonl"), str(tmp_path / "out"))
    with pytest.raises(JobError, match=r"^input: 1 rows repeat an id \(1 ids, e.g. 'a'\)"):
        inspect_input(cfg, open_input(cfg))
    (tmp_path / "a.jsonl").write_text('{"key": "a", "URL": "/x.jpg"}\n{"key": \n')
    with pytest.raises(JobError, match=r"^input.path: .*a.jsonl is not a readable JSON Lines file: "):
        inspect_input(cfg, open_input(cfg))
    (tmp_path / "b.csv").write_text("key,URL,TEXT\nb,/x.jpg,t\n")
    cfg = _config(tiny_llava, str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(JobError, match=r"^input.format: auto cannot tell the format of \['.csv', '.jsonl'\]"):
        open_input(cfg)
    cfg = _config(tiny_llava, str(tmp_path / "b.csv"), str(tmp_path / "out"), input={"path": str(tmp_path / "b.csv"),
                  "columns": {"id": "key", "image_path": "url"}})
    with pytest.raises(JobError, match=r"^input: no image column: expected 'image' \(bytes\) or 'url'"):
        inspect_input(cfg, open_input(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("store, fmt, ext", [("local", "json", "jsonl"), ("s3", "csv", "csv")])
def test_manifest_job_every_row_once_bad_rows_named(ray_local, tiny_llava, tmp_path, request, store, fmt, ext):
    """LAION-style rows (key, URL, TEXT): good images, a missing file, an empty URL, a corrupt JPEG.
    Every row once, ids as the manifest gives them; a rerun processes nothing. Each format and each
    store runs once (each extension's columns, types and row count: the test above)."""
    images = {"a.jpg": resized("chelsea", 64, 80), "b.png": resized("coffee", 48, 48, "PNG"),
              "c.jpg": encode(photo("rocket"), "JPEG")[:200]}
    if store == "s3":
        url = request.getfixturevalue("s3_endpoint")
        fs, root = s3_fs(url), f"{BUCKET}/{fmt}-manifest"
        for name, data in images.items():
            fs.pipe(f"{root}/img/{name}", data)
        prefix, extra = f"s3://{root}", {"storage": s3_storage(url)}
    else:
        (tmp_path / "img").mkdir()
        for name, data in images.items():
            (tmp_path / "img" / name).write_bytes(data)
        prefix, extra = str(tmp_path), {}
    rows = [
        {"key": "good-a", "URL": f"{prefix}/img/a.jpg", "TEXT": "a cat"},
        {"key": "good-b", "URL": f"{prefix}/img/b.png", "TEXT": None},
        {"key": "missing", "URL": f"{prefix}/img/nope.jpg", "TEXT": "gone"},
        {"key": "no-url", "URL": None, "TEXT": "no url"},
        {"key": "corrupt", "URL": f"{prefix}/img/c.jpg", "TEXT": "cut"},
    ]
    manifest = _manifest(fmt, rows)
    if store == "s3":
        fs.pipe(f"{root}/in/rows.{ext}", manifest)
    else:
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / f"rows.{ext}").write_bytes(manifest)
    cfg = _config(tiny_llava, f"{prefix}/in", f"{prefix}/out", **extra)

    summary = run_job(cfg)
    out = _read_output(cfg)
    assert sorted(out) == sorted(r["key"] for r in rows)
    assert (summary.rows_total, summary.rows_ok, summary.rows_failed) == (5, 2, 3)
    assert [out[k]["TEXT"] for k in ("good-a", "good-b", "no-url")] == ["a cat", None, "no url"]
    assert all(out[k]["text"] and out[k]["error"] is None for k in ("good-a", "good-b"))
    assert out["no-url"]["error"] == "input: the row has no image"
    assert out["missing"]["error"] == f"image: not found: {prefix}/img/nope.jpg"
    assert out["corrupt"]["error_kind"] == "decode" and out["corrupt"]["error"].startswith("image: ")
    assert run_job(cfg).rows_processed == 0  # the same ids on a rerun: nothing left to do


def _read_output(cfg, key: str = "key") -> dict:
    """The job's output (local or S3) as {id: row}, through the job's own output reader."""
    from pipeline.storage import output_rows

    rows = output_rows(cfg.output.path, cfg.storage, [key, "TEXT", "txt", "text", "prompt_tokens", "error", "error_kind"]).to_pylist()
    by_id = {r[key]: r for r in rows}
    assert len(by_id) == len(rows), "duplicate ids in the output"
    return by_id


def _s3_store(request, folder: str):
    """(put(name, bytes) under `<prefix>/in/`, prefix, extra config) on S3 (moto)."""
    url = request.getfixturevalue("s3_endpoint")
    fs, root = s3_fs(url), f"{BUCKET}/{folder}"
    return (lambda name, data: fs.pipe(f"{root}/in/{name}", data)), f"s3://{root}", {"storage": s3_storage(url)}


def _local_put(root):
    def put(name, data):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return put


def _image_folder(put, n: int, bad: bool = True) -> dict[str, bytes]:
    """`n` small real photos under nested folders (and a corrupt JPEG and a stray text file)."""
    names = ["astronaut", "coffee", "rocket", "chelsea"]
    files = {f"{'sub/' if i % 2 else ''}{i:03d}.{'png' if i % 3 == 0 else 'jpg'}":
             resized(names[i % 4], 40 + i, 56, "PNG" if i % 3 == 0 else "JPEG") for i in range(n)}
    if bad:
        files["sub/corrupt.jpg"] = encode(photo("coffee"), "JPEG")[:200]
    for name, data in {**files, "notes.txt": b"not an image"}.items():
        put(name, data)
    return files


def test_image_ids_are_paths_under_the_folder_glob_or_file(tiny_llava, tmp_path):
    files = _image_folder(_local_put(tmp_path / "in"), 3, bad=False)
    for path, ids in [(f"{tmp_path}/in", sorted(files)), (f"{tmp_path}/in/sub/*.jpg", ["001.jpg"]),
                      (f"{tmp_path}/in/000.png", ["000.png"])]:
        cfg = load_config({"model": {"name": tiny_llava}, "input": {"path": path}, "output": {"path": str(tmp_path / "out")}})
        plan = inspect_input(cfg, open_input(cfg))
        assert (plan.reader.format, plan.columns, plan.reader.ids("id").to_pylist()) == ("images", ["id", "image_path"], ids)
    assert plan.reader.urls == [f"{tmp_path}/in/000.png"]


# The README's image files, each written in its own format: a folder of them is one row each, and
# the CPU stage decodes every one.
IMAGE_FILES = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "tif": "TIFF",
               "tiff": "TIFF"}


def test_every_image_extension_the_readme_names_is_a_row_and_decodes(tiny_llava, tmp_path):
    import pyarrow as pa

    from pipeline.stages import PreprocessStage

    put = _local_put(tmp_path / "in")
    for ext, fmt in IMAGE_FILES.items():
        put(f"photo.{ext}", encode(photo("coffee")[::8, ::8], fmt))
    put("notes.txt", b"not an image")
    cfg = load_config({"model": {"name": tiny_llava}, "input": {"path": str(tmp_path / "in")}, "output": {"path": str(tmp_path / "out")}})
    plan = inspect_input(cfg, open_input(cfg))
    assert (plan.reader.format, sorted(plan.reader.ids("id").to_pylist())) == ("images", sorted(f"photo.{e}" for e in IMAGE_FILES))
    rows = pa.table({"id": [f"photo.{e}" for e in IMAGE_FILES], "image_path": [str(tmp_path / "in" / f"photo.{e}") for e in IMAGE_FILES]})
    prepared = PreprocessStage(cfg.model_dump())(rows)
    assert prepared.column("error").to_pylist() == [None] * len(IMAGE_FILES)


@pytest.mark.slow
def test_image_folder_job_on_s3_ids_are_relative_paths(ray_local, tiny_llava, tmp_path, request):
    """On S3; a local folder's job runs end to end in the killed-and-rerun test below."""
    put, prefix, extra = _s3_store(request, "images-folder")
    files = _image_folder(put, 4)
    cfg = load_config({"model": {"name": tiny_llava}, "generation": {"max_new_tokens": 4},
                       "input": {"path": f"{prefix}/in/"}, "output": {"path": f"{prefix}/out"},
                       "resources": {"rows_per_block": 2, "model_batch_size": 2, "preprocess_batch_size": 2}} | extra)
    assert open_input(cfg).format == "images"
    summary = run_job(cfg)
    out = _read_output(cfg, "id")
    assert sorted(out) == sorted(files)  # every image once, keyed by its path under input.path
    assert (summary.rows_total, summary.rows_ok, summary.rows_failed) == (5, 4, 1)
    assert out["sub/corrupt.jpg"]["error"].startswith("image: ")
    assert run_job(cfg).rows_processed == 0  # the same ids on a rerun


def _killed_and_rerun(ray, tiny_llava, tmp_path, fmt: str, ids: list[str]) -> None:
    """A job over `tmp_path/in` (the rows `ids` name, 40 or more) killed mid-run (SIGKILL of its
    driver, attached to the session's Ray as a RayJob's is), then rerun at once: exactly once, and
    only the rows the first run did not commit are processed."""
    import yaml

    from tests.pipeline.test_resume import _committed_ids, _kill_attached, _start_job, hold_mid_job, raylet_pid

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": tiny_llava}, "generation": {"max_new_tokens": 16},
        "input": {"path": str(tmp_path / "in"), "format": fmt},
        "output": {"path": str(tmp_path / "out"), "lease_expiry_s": 5, "lease_wait_s": 0},
        "resources": {"rows_per_block": 4, "model_batch_size": 4, "preprocess_batch_size": 4}}))
    cfg = load_config(path)
    proc, _ = hold_mid_job(lambda: _start_job(path, ray), lambda: len(_committed_ids(cfg)), 8, raylet_pid())
    _kill_attached(proc, ray)
    done = _committed_ids(cfg)
    assert 8 <= len(done) < len(ids), "the stop should land mid-job"
    summary = run_job(cfg)
    out = _read_output(cfg, "id")
    assert sorted(out) == sorted(ids) and all(r["error"] is None for r in out.values())
    assert summary.rows_processed == len(ids) - len(done)  # only what was missing


@pytest.mark.slow
def test_image_folder_job_killed_and_rerun_processes_only_the_missing_rows(ray_local, tiny_llava, tmp_path):
    _killed_and_rerun(ray_local, tiny_llava, tmp_path, "images", list(_image_folder(_local_put(tmp_path / "in"), 40, bad=False)))


TEMPLATE = "The alt text is: {TEXT}. The page is {meta.title}. Write a detailed caption."


def test_a_template_field_no_input_column_has_is_one_line_at_start(tiny_llava, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"key": "a", "URL": "/x.jpg", "TEXT": "t"}\n')
    cfg = _config(tiny_llava, str(tmp_path / "a.jsonl"), str(tmp_path / "out"), prompt={"template": "{TEXT} {txt}"})
    with pytest.raises(JobError, match=r"^prompt.template: \{txt\} names no input column; columns are \['TEXT', 'URL', 'key'\]$"):
        inspect_input(cfg, open_input(cfg))


@pytest.mark.slow
def test_prompt_template_equals_transformers_on_the_formatted_prompt(ray_local, tiny_llava, tmp_path):
    from tests.conftest import reference

    images = {"a": resized("chelsea", 64, 80), "b": resized("coffee", 48, 64)}
    rows = [{"key": k, "URL": str(tmp_path / f"{k}.jpg"), "TEXT": f"alt text {k * (i + 1)}", "meta": {"title": f"page {k}"}}
            for i, k in enumerate(images)]
    rows += [{"key": "no-text", "URL": str(tmp_path / "a.jpg"), "TEXT": None, "meta": {"title": "x"}},
             {"key": "no-title", "URL": str(tmp_path / "a.jpg"), "TEXT": "t", "meta": {}}]
    for k, data in images.items():
        (tmp_path / f"{k}.jpg").write_bytes(data)
    (tmp_path / "rows.jsonl").write_bytes(_manifest("json", rows))
    cfg = _config(tiny_llava, str(tmp_path / "rows.jsonl"), str(tmp_path / "out"), prompt={"template": TEMPLATE})
    run_job(cfg)
    out = _read_output(cfg)
    assert sorted(out) == sorted(r["key"] for r in rows)
    for row in rows[:2]:
        prompt = f"The alt text is: {row['TEXT']}. The page is {row['meta']['title']}. Write a detailed caption."
        ref = reference(tiny_llava, [images[row["key"]]], prompt, 4)
        got = out[row["key"]]
        assert (got["text"], got["prompt_tokens"], got["error"]) == (ref.text, ref.prompt_tokens, None)
    assert out["no-text"]["error"] == "prompt: prompt.template names {TEXT}, which this row lacks (missing or null)"
    assert out["no-title"]["error"] == "prompt: prompt.template names {meta.title}, which this row lacks (missing or null)"
    assert out["no-title"]["error_kind"] == "prompt"


def _tar(samples: list[tuple[str, bytes]]) -> bytes:
    """A WebDataset shard: tar members in the order given."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _shards(put, n_per_shard: int = 2, shards: int = 2, bad: bool = True) -> dict[str, dict]:
    """img2dataset-style shards (`key.jpg` + `key.txt` + `key.json`) and a key in every shard
    (`same`, without a json member; its id names its shard); with `bad`, a corrupt JPEG and a
    sample without an image. Returns {id: sample}."""
    names = ["astronaut", "coffee", "rocket", "chelsea"]
    expected: dict[str, dict] = {}
    for s in range(shards):
        members = []
        for i in range(n_per_shard):
            key = f"{s:03d}{i:04d}"
            ext, fmt = ("png", "PNG") if i % 3 == 2 else ("jpg", "JPEG")
            image = resized(names[(s + i) % 4], 40 + i, 56, fmt)
            sample = {"image": image, "txt": f"alt text {key}", "json": json.dumps({"title": f"page {key}"})}
            members += [(f"{key}.{ext}", image), (f"{key}.txt", sample["txt"].encode()), (f"{key}.json", sample["json"].encode())]
            expected[key] = sample
        if bad:
            meta = json.dumps({"title": "t"}).encode()
            members += [(f"corrupt{s}.jpg", encode(photo("coffee"), "JPEG")[:200]), (f"corrupt{s}.txt", b"cut"),
                        (f"corrupt{s}.json", meta)]
            members += [(f"noimage{s}.txt", b"text only"), (f"noimage{s}.json", meta)]
            expected |= {f"corrupt{s}": {"txt": "cut"}, f"noimage{s}": {"txt": "text only"}}
        members += [("same.jpg", resized("rocket", 32, 32)), ("same.txt", f"shard {s}".encode())]
        expected[f"part-{s}.tar/same"] = {"txt": f"shard {s}"}
        put(f"part-{s}.tar", _tar(members))
    return expected


def test_webdataset_ids_are_keys_unique_across_shards_and_columns_are_members(tiny_llava, tmp_path):
    expected = _shards(_local_put(tmp_path / "in"))
    cfg = load_config({"model": {"name": tiny_llava}, "input": {"path": str(tmp_path / "in"), "passthrough": ["txt", "json"]},
                       "output": {"path": str(tmp_path / "out")}})
    plan = inspect_input(cfg, open_input(cfg))
    assert plan.reader.format == "webdataset" and plan.columns == ["id", "image", "txt", "json"]
    assert sorted(plan.reader.ids("id").to_pylist()) == sorted(expected)  # the repeated key is prefixed by its shard
    assert plan.rows == len(expected)


def test_a_webdataset_shard_that_cannot_serve_the_job_is_one_line_at_start(tiny_llava, tmp_path):
    good = _tar([("a.jpg", resized("coffee", 32, 32)), ("a.txt", b"x")])
    cases = {  # a shard cut short; a sample whose members are not adjacent (Ray's reader would fail mid-job)
        "cut.tar": (good[:700], "unexpected end of data"),
        "split.tar": (_tar([("a.jpg", b"1"), ("b.jpg", b"2"), ("a.txt", b"3")]), "WebDataset tar entries for key 'a' are not contiguous"),
    }
    for name, (data, cause) in cases.items():
        (tmp_path / name).write_bytes(data)
        cfg = load_config({"model": {"name": tiny_llava}, "input": {"path": str(tmp_path / name)},
                           "output": {"path": str(tmp_path / "out")}})
        with pytest.raises(JobError) as e:
            inspect_input(cfg, open_input(cfg))
        assert str(e.value).startswith(f"input.path: {tmp_path}/{name} is not a readable WebDataset tar file: {cause}")
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_webdataset_job_on_s3_every_sample_once_bad_members_named(ray_local, tiny_llava, tmp_path, request):
    """Shards on S3 with a corrupt JPEG member, a sample without an image and a key in both shards:
    every sample once, ids stable across reruns, row errors named; the prompt template over the
    `txt` and `json` members equals transformers given the formatted prompt. Local shards (a key in
    both among them) run through a whole job in the killed-and-rerun test below."""
    from tests.conftest import reference

    put, prefix, extra = _s3_store(request, "webdataset")
    expected = _shards(put)
    template = "The alt text is: {txt}. The page is {json.title}. Write a detailed caption."
    cfg = load_config({"model": {"name": tiny_llava}, "generation": {"max_new_tokens": 4},
                       "input": {"path": f"{prefix}/in/", "passthrough": ["txt"]}, "output": {"path": f"{prefix}/out"},
                       "prompt": {"template": template},
                       "resources": {"rows_per_block": 2, "model_batch_size": 2, "preprocess_batch_size": 2}} | extra)
    summary = run_job(cfg)
    out = _read_output(cfg, "id")
    assert sorted(out) == sorted(expected)
    assert (summary.rows_total, summary.rows_ok, summary.rows_failed) == (10, 4, 6)
    assert {k: r["txt"] for k, r in out.items()} == {k: s["txt"] for k, s in expected.items()}  # a member as passthrough
    for s in (0, 1):
        assert out[f"corrupt{s}"]["error_kind"] == "decode" and out[f"corrupt{s}"]["error"].startswith("image: ")
        assert out[f"noimage{s}"]["error"] == "input: the row has no image"
        # `same` has a JPEG but no json member: the template's {json.title} is missing
        assert out[f"part-{s}.tar/same"]["error"] == "prompt: prompt.template names {json.title}, which this row lacks (missing or null)"
    key = "0000001"
    ref = reference(tiny_llava, [expected[key]["image"]], f"The alt text is: alt text {key}. The page is page {key}. Write a detailed caption.", 4)
    assert (out[key]["text"], out[key]["prompt_tokens"], out[key]["error"]) == (ref.text, ref.prompt_tokens, None)
    assert run_job(cfg).rows_processed == 0  # the same ids on a rerun: nothing left to do


@pytest.mark.slow
def test_webdataset_job_killed_and_rerun_processes_only_the_missing_rows(ray_local, tiny_llava, tmp_path):
    _killed_and_rerun(ray_local, tiny_llava, tmp_path, "webdataset", list(_shards(_local_put(tmp_path / "in"), 20, 2, bad=False)))


@pytest.mark.parametrize("files, actors", [(1, "1"), (128, "1"), (129, "2"), (10_000, "32")])
def test_parquet_reader_settings_hold_while_a_job_reads(tmp_path, monkeypatch, files, actors):
    """Ray Data's Parquet reader starts 32 footer-reading actors per read and packs 128 MiB read
    units unless told otherwise: while a job reads, one actor per 128 files (at most Ray's 32)
    and READ_UNIT_BYTES; a user's own setting wins; nothing is left set after."""
    from pipeline.readers import FOOTER_ACTORS_ENV, READ_UNIT_BYTES, READ_UNIT_ENV, ParquetReader

    for name in (FOOTER_ACTORS_ENV, READ_UNIT_ENV):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config({"model": {"name": "any"}, "input": {"path": str(tmp_path)}})
    reader = ParquetReader(cfg, None, [f"part-{k}.parquet" for k in range(files)])
    with reader.reading():
        assert (os.environ[FOOTER_ACTORS_ENV], os.environ[READ_UNIT_ENV]) == (actors, str(READ_UNIT_BYTES))
    assert FOOTER_ACTORS_ENV not in os.environ and READ_UNIT_ENV not in os.environ
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "7")
    monkeypatch.setenv(READ_UNIT_ENV, "1000")
    with reader.reading():
        assert (os.environ[FOOTER_ACTORS_ENV], os.environ[READ_UNIT_ENV]) == ("7", "1000")
    assert (os.environ[FOOTER_ACTORS_ENV], os.environ[READ_UNIT_ENV]) == ("7", "1000")


def test_a_parquet_read_unit_holds_at_most_read_unit_bytes(ray_local, tmp_path, monkeypatch):
    """Ray reads the setting: three files of 10 MiB of image bytes are three read blocks while a
    job reads, and one block of 30 MiB under Ray's own 128 MiB packing."""
    from pipeline.readers import READ_UNIT_BYTES, READ_UNIT_ENV, ParquetReader

    monkeypatch.delenv(READ_UNIT_ENV, raising=False)
    for k in range(3):
        write_parquet(tmp_path / f"part-{k}.parquet", [{"id": f"{k}-{i}", "image": os.urandom(1024**2)} for i in range(10)])
    assert 10 * 1024**2 < READ_UNIT_BYTES < 20 * 1024**2  # one file fits a unit, two do not
    reader = ParquetReader(load_config({"model": {"name": "any"}, "input": {"path": str(tmp_path)}}))
    read = lambda: reader.dataset(["id", "image"], reader.schemas()[0]).materialize()  # noqa: E731
    with reader.reading():
        units = read()
    assert (units.num_blocks(), units.count()) == (3, 30)
    assert read().num_blocks() == 1
