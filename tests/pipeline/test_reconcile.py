"""The resume reconcile, block by block, on outputs laid out as Ray Data writes them (one
checkpoint file per block, named after its data file): plain calls, no job; the cluster-side
repeat count on a local Ray."""

from __future__ import annotations

import posixpath
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.errors import JobError
from pipeline.readers import output_repeats
from pipeline.resume import all_done, checkpoint_path, finish_commits, reconcile, split_output


def _config(tmp_path: Path, **input_):
    return load_config({"model": {"name": "any"}, "input": {"path": str(tmp_path / "in.parquet"), **input_},
                        "output": {"path": str(tmp_path / "out")}})


def _write(cfg, blocks: dict[str, list[str]], listed: dict[str, list[str]] | None = None) -> None:
    """Data files `<base>-0.parquet` (one per block) and their committed checkpoints `<base>.parquet`
    (what `listed` says, else the block's own ids)."""
    out, ckpt = Path(cfg.output.path), Path(checkpoint_path(cfg))
    out.mkdir(parents=True)
    ckpt.mkdir(parents=True)
    for base, ids in blocks.items():
        pq.write_table(pa.table({"id": ids, "text": [f"t{i}" for i in ids]}), out / f"{base}-0.parquet")
    for base, ids in (blocks if listed is None else listed).items():
        pq.write_table(pa.table({"id": pa.array(ids, pa.string())}), ckpt / f"{base}.parquet")


def _listed(cfg) -> dict[str, set]:
    return {p.name: set(pq.read_table(p).column("id").to_pylist()) for p in sorted(Path(checkpoint_path(cfg)).glob("*.parquet"))}


def _never(files, rows):
    raise AssertionError("the driver's bound was not reached: no cluster check")


BLOCKS = {"w_000000": ["a", "b"], "w_000001": ["c", "d"], "w_000002": ["e"], "w_000010": ["f", "g"]}


def test_an_output_that_agrees_with_its_checkpoint_is_left_alone(tmp_path):
    cfg = _config(tmp_path)
    _write(cfg, BLOCKS)
    before = _listed(cfg)
    assert reconcile(cfg, pa.string(), _never).note is None
    assert _listed(cfg) == before


def test_each_damaged_block_is_rebuilt_from_its_own_data_file(tmp_path):
    cfg = _config(tmp_path)
    listed = {"w_000000": ["a", "b"], "w_000001": ["c"], "w_000002": ["e", "x"],  # d unlisted, x lost
              "w_000099": ["y", "z"]}  # its data file deleted by hand; w_000010's checkpoint deleted
    _write(cfg, BLOCKS, listed)
    note = reconcile(cfg, pa.string(), _never).note
    assert note == ("checkpoint rebuilt from the output for 4 blocks: 3 checkpointed ids had no output row (they run "
                    "again), 3 output rows were missing from the checkpoint (they do not)")
    # every data file listed by the checkpoint Ray names after it, and nothing else listed
    assert _listed(cfg) == {"w_000000.parquet": {"a", "b"}, "w_000001.parquet": {"c", "d"},
                            "w_000002.parquet": {"e"}, "w_000010-0.parquet": {"f", "g"}}
    assert reconcile(cfg, pa.string(), _never).note is None  # and a second start finds nothing to repair


def test_ids_repeated_across_blocks_are_one_line_on_the_driver(tmp_path):
    cfg = _config(tmp_path)
    _write(cfg, {**BLOCKS, "w_000003": ["b", "c"]})
    with pytest.raises(JobError, match=r"^output.path: 2 rows of the existing output repeat an id"):
        reconcile(cfg, pa.string(), _never)


def test_another_inputs_output_is_one_line(tmp_path):
    cfg = _config(tmp_path)
    _write(cfg, BLOCKS)
    with pytest.raises(JobError, match=r"^output.path: the existing checkpoint has string ids but the input's are int64"):
        reconcile(cfg, pa.int64(), _never)


def test_past_the_drivers_bound_repeats_are_counted_on_the_cluster(ray_local, tmp_path):
    """driver_id_check_max_rows=3: the 7-row output's ids go to a Ray Data aggregation, over a
    Parquet file and a JSON Lines file (a resumed output may hold both)."""
    cfg = _config(tmp_path, driver_id_check_max_rows=3)
    _write(cfg, BLOCKS)
    asked = []

    def on_cluster(files, rows):
        asked.append(([posixpath.basename(f) for f in files], rows))
        return output_repeats(cfg, files, pa.string(), rows)

    assert reconcile(cfg, pa.string(), on_cluster) == (None, None)  # past the bound: no ids kept on the driver
    assert asked == [([f"{b}-0.parquet" for b in sorted(BLOCKS)], 7)]

    (Path(cfg.output.path) / "v_000000-0.json").write_text('{"id": "g", "text": "again"}\n{"id": "h", "text": "new"}\n')
    with pytest.raises(JobError, match=r"^output.path: 1 rows of the existing output repeat an id"):
        reconcile(cfg, pa.string(), on_cluster)


def test_a_commit_stopped_between_copy_and_delete_keeps_its_block(tmp_path):
    """On S3 the commit's rename is a copy, then a delete: a stop in between leaves the committed
    checkpoint beside the pending one. The block is committed; its data file stays, and nothing runs again."""
    cfg = _config(tmp_path)
    _write(cfg, BLOCKS)
    ckpt = Path(checkpoint_path(cfg))
    (ckpt / "w_000001.pending.parquet").write_bytes((ckpt / "w_000001.parquet").read_bytes())
    (ckpt / "w_000002.parquet").rename(ckpt / "w_000002.pending.parquet")  # a stop before the copy: not committed
    assert finish_commits(cfg) == 1
    assert sorted(p.name for p in ckpt.iterdir()) == ["w_000000.parquet", "w_000001.parquet", "w_000002.pending.parquet",
                                                       "w_000010.parquet"]
    assert split_output(cfg)[1] == [str(Path(cfg.output.path) / "w_000002-0.parquet")]  # only that block runs again
    assert reconcile(cfg, pa.string(), _never).note is None


def test_all_done_when_every_input_id_has_an_output_row(tmp_path):
    """Within the driver's bound reconcile returns every committed output id: a finished job's
    rerun is decided from those, without reading the output again."""
    cfg = _config(tmp_path)
    _write(cfg, BLOCKS)
    (Path(checkpoint_path(cfg)) / "w_000000.parquet").rename(Path(checkpoint_path(cfg)) / "w_000000.pending.parquet")
    written = reconcile(cfg, pa.string(), _never).output_ids
    assert sorted(written.to_pylist()) == ["c", "d", "e", "f", "g"]  # a and b's block is not committed
    assert all_done(pa.chunked_array([["c", "g", "e", "c"]]), written)  # output rows of ids gone from the input are fine
    assert not all_done(pa.chunked_array([["c", "z"]]), written)  # z: a new input row
    assert not all_done(pa.chunked_array([["a"]]), written)


def test_a_run_whose_lease_was_taken_over_changes_nothing_at_start_or_end(tmp_path):
    """Besides the blocks (test_lease), every change a run makes to its output and checkpoint goes
    through its lease's fence: the retry-failed rewrite, the checkpoint rebuild, a finished
    commit and the manifest. A run whose lease another run holds now changes none of them."""
    import json

    from pipeline import manifest
    from pipeline.errors import LeaseLost
    from pipeline.lease import Lease
    from pipeline.resume import PENDING, drop_failed_rows

    cfg = _config(tmp_path)
    cfg.output.lease_wait_s = 0
    _write(cfg, BLOCKS, listed={"w_000000": ["a"]})  # a checkpoint to rebuild
    for f in Path(cfg.output.path).glob("*.parquet"):  # rows with an `error` column; row "e" failed
        t = pq.read_table(f)
        pq.write_table(t.append_column("error", pa.array(["image: not found" if i == "e" else None for i in t.column("id").to_pylist()], pa.string())), f)
    ckpt = Path(checkpoint_path(cfg))
    pq.write_table(pa.table({"id": pa.array(["a"], pa.string())}), ckpt / f"w_000000{PENDING}")  # a commit to finish
    (Path(cfg.output.path) / manifest.NAME).write_text(json.dumps([{"run": "earlier"}]))
    before = {p: p.read_bytes() for p in [*Path(cfg.output.path).iterdir(), *ckpt.iterdir()]}

    mine = Lease(cfg).acquire()
    fence = mine.fence()
    mine.release()
    other = Lease(cfg).acquire()  # another run holds the output now
    try:
        for change in (lambda: drop_failed_rows(cfg, None, fence), lambda: reconcile(cfg, pa.string(), _never, fence),
                       lambda: finish_commits(cfg, fence), lambda: manifest.append(cfg, {"run": "mine"}, fence)):
            with pytest.raises(LeaseLost):
                change()
    finally:
        other.release()
    after = {p: p.read_bytes() for p in [*Path(cfg.output.path).iterdir(), *ckpt.iterdir()]}
    assert after == before  # nothing written, rewritten or removed

    with Lease(cfg) as holder:  # the holder's own fence passes
        assert drop_failed_rows(cfg, None, holder.fence()) == 1
