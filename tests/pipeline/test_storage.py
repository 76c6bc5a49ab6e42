"""Local writes publish a file under its name only once it is complete (`storage.open_atomic`),
through the same pyarrow path Ray Data's Parquet writer takes."""

import contextlib
import gc
import os
import resource
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.config import StorageConfig
from pipeline.storage import arrow_fs, open_atomic, output_files


@contextlib.contextmanager
def _file_size_limit(n_bytes: int):
    """A real I/O error: writes past `n_bytes` fail with EFBIG, as on a full disk (Python
    ignores SIGXFSZ, so the write raises instead of killing the process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _big_table() -> pa.Table:
    return pa.table({"x": np.random.default_rng(0).random(500_000)})


def test_an_error_mid_write_publishes_nothing(tmp_path):
    fs, root = arrow_fs(str(tmp_path), StorageConfig())
    with pytest.raises(RuntimeError, match="boom"):
        with fs.open_output_stream(f"{root}/part-0.parquet") as f:
            f.write(b"PAR1 half a file")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []  # neither under its name nor as the hidden partial file


@pytest.mark.parametrize("writer", ["write_table", "write_dataset"])
def test_a_failed_write_publishes_nothing(tmp_path, writer):
    fs, root = arrow_fs(str(tmp_path), StorageConfig())
    table = _big_table()
    with pytest.raises(OSError, match="too large"), _file_size_limit(200_000):
        if writer == "write_table":
            pq.write_table(table, f"{root}/part-0.parquet", filesystem=fs)
        else:  # what Ray Data's ParquetDatasink calls
            pads.write_dataset(table, root, format="parquet", filesystem=fs, basename_template="part-{i}.parquet",
                               existing_data_behavior="overwrite_or_ignore")
    assert output_files(str(tmp_path), StorageConfig()) == []  # nothing published
    # The dataset writer drops its stream unclosed, and its I/O threads may still hold it when the
    # error reaches us: the partial file goes once the stream is collected.
    deadline = time.monotonic() + 30
    while os.listdir(tmp_path) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert os.listdir(tmp_path) == []


def test_a_complete_write_is_published_whole(tmp_path):
    fs, root = arrow_fs(str(tmp_path), StorageConfig())
    table = _big_table()
    pads.write_dataset(table, root, format="parquet", filesystem=fs, basename_template="part-{i}.parquet",
                       existing_data_behavior="overwrite_or_ignore")
    assert os.listdir(tmp_path) == ["part-0.parquet"]
    assert pq.read_table(tmp_path / "part-0.parquet").sort_by("x").equals(table.sort_by("x"))


def test_open_atomic_publishes_on_a_clean_close_only(tmp_path):
    fs = fsspec.filesystem("file")
    with open_atomic(fs, str(tmp_path / "a.json")) as f:
        f.write(b"{}")
    with pytest.raises(ValueError):
        with open_atomic(fs, str(tmp_path / "b.json")) as f:
            f.write(b"{")
            raise ValueError
    try:  # a file opened while another error is being handled still publishes on its clean close
        raise KeyError("unrelated")
    except KeyError:
        f = open_atomic(fs, str(tmp_path / "c.json"))
        f.write(b"{}")
        f.close()
    assert sorted(os.listdir(tmp_path)) == ["a.json", "c.json"]
