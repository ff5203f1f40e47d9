"""Trust the data, not the names: every output records what it was made from.

No rerun, resume or in-process cache may pass off a background of other
frames as current (issue 20, found cases 1-5 and others of the class):
changes that keep the name, the size or the mtime, a folder moved or copied
elsewhere, an input replaced by another measurement of the same shape.
"""

import json
import os
import pathlib
import shutil

import h5py
import hdf5plugin
import numpy as np
import pytest
from conftest import interrupt_at_write, read_images

from rollmed_dask import (
    batch,
    compute_background,
    compute_backgrounds,
    identity,
    rolling_median,
)
from rollmed_dask import sources as sources_module
from rollmed_dask.core import rolling_median_reference
from rollmed_dask.sinks import PROGRESS_DIR, ZARR_JOB_ATTR, partial_path

K = 5
N = 120  # 3 output chunks of 40 frames of 80x320
SHAPE = (80, 320)


def write_plain(path, seed, n=N, pad=0, filters=None):
    """Random uint8 frames, uncompressed: two seeds give files of one size."""
    img = np.random.default_rng(seed).integers(0, 255, (n, *SHAPE), dtype=np.uint8)
    with h5py.File(path, "w") as h5:
        if pad:  # moves the image chunks to other file addresses
            h5["pad"] = np.zeros(pad, np.uint8)
        h5.create_dataset("events/image", data=img, chunks=(40, *SHAPE), **(filters or {}))
    return img


def replace_keeping_times(path, seed):
    """Another measurement of the same shape under the same name, size and mtime."""
    st = os.stat(path)
    img = write_plain(path, seed)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size
    return img


def exact(path, img, dataset="events/image_bg"):
    np.testing.assert_array_equal(read_images(path, dataset), rolling_median_reference(img, K))


@pytest.fixture
def raw(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    imgs = {name: write_plain(folder / f"{name}.rtdc", seed) for seed, name in enumerate("ab")}
    return folder, imgs


def run(raw_folder, out, **kw):
    results = compute_backgrounds(raw_folder, out, K, recursive=True, progress=False, **kw)
    return {pathlib.Path(r["input"]).stem: r for r in results}


def stored_record(output):
    """The record of the input's data in an output's run log."""
    return batch._read_run_logs(output)[-1]["parameters"][identity.ATTR]


@pytest.fixture
def count_slow_path(monkeypatch):
    calls = []
    original = identity.compute_identity

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(identity, "compute_identity", counted)
    return calls


# --- case 1: a folder rerun ------------------------------------------------


def test_folder_rerun_after_an_input_was_replaced_keeping_name_size_and_mtime(raw, tmp_path):
    folder, imgs = raw
    run(folder, tmp_path / "bg")
    new = replace_keeping_times(folder / "a.rtdc", seed=7)
    again = run(folder, tmp_path / "bg")
    assert again["b"]["status"] == "skipped"
    assert again["a"]["status"] == "failed"
    assert "was made from other data" in again["a"]["error"]
    assert "--overwrite" in again["a"]["error"]
    exact(tmp_path / "bg" / "a_bg.rtdc", imgs["a"])  # refused: left as it was
    forced = run(folder, tmp_path / "bg", overwrite=True)
    assert forced["a"]["status"] == forced["b"]["status"] == "done"  # overwrite recomputes all
    exact(tmp_path / "bg" / "a_bg.rtdc", new)


def test_one_frame_changed_in_place_is_seen(raw, tmp_path, monkeypatch):
    folder, _ = raw
    monkeypatch.setattr(identity, "QUIET_NS", 0)  # the stat recorded: ctime must tell
    run(folder, tmp_path / "bg")
    st = os.stat(folder / "b.rtdc")
    with h5py.File(folder / "b.rtdc", "r+") as h5:
        h5["events/image"][N - 1, 0, 0] ^= 1  # the last frame, which no window reads
    os.utime(folder / "b.rtdc", ns=(st.st_atime_ns, st.st_mtime_ns))
    again = run(folder, tmp_path / "bg")
    assert again["b"]["status"] == "failed" and "other data" in again["b"]["error"]


def test_fast_path_reads_nothing_and_a_touched_file_is_read_and_still_current(
    raw, tmp_path, monkeypatch, count_slow_path
):
    folder, _ = raw
    monkeypatch.setattr(identity, "QUIET_NS", 0)  # the inputs were just written
    run(folder, tmp_path / "bg")
    stored = stored_record(tmp_path / "bg" / "a_bg.rtdc")
    assert stored["files"][0][0] == str(folder / "a.rtdc")
    assert {r["status"] for r in run(folder, tmp_path / "bg").values()} == {"skipped"}
    assert count_slow_path == []  # unchanged stat: decided without reading
    (folder / "a.rtdc").touch()
    assert {r["status"] for r in run(folder, tmp_path / "bg").values()} == {"skipped"}
    assert len(count_slow_path) == 1  # touched: read and hashed, same data


def test_stat_is_not_trusted_when_the_input_was_written_just_before_the_job(raw, tmp_path):
    folder, _ = raw
    compute_background(folder / "a.rtdc", tmp_path / "a.rtdc", K, progress=False)
    stored = stored_record(tmp_path / "a.rtdc")
    assert stored["files"] is None  # a rewrite in the same clock tick could keep it
    assert stored["digest"].startswith(identity.PREFIX)


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_finished_folder_moved_or_copied_elsewhere_is_up_to_date(
    how, raw, tmp_path, monkeypatch, count_slow_path
):
    folder, _ = raw
    monkeypatch.setattr(identity, "QUIET_NS", 0)
    run(folder, tmp_path / "bg")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    move = shutil.move if how == "moved" else shutil.copytree
    move(folder, elsewhere / "raw")
    move(tmp_path / "bg", elsewhere / "bg")
    again = run(elsewhere / "raw", elsewhere / "bg")
    assert {r["status"] for r in again.values()} == {"skipped"}
    assert len(count_slow_path) == 2  # the slow path: the data read and compared


def test_overwrite_recomputes_an_up_to_date_single_file(raw, tmp_path):
    folder, imgs = raw
    out = tmp_path / "a_bg.rtdc"
    compute_background(folder / "a.rtdc", out, K, progress=False)
    before = os.stat(out).st_ino
    compute_background(folder / "a.rtdc", out, K, progress=False, overwrite=True)
    assert os.stat(out).st_ino != before
    exact(out, imgs["a"])


# --- item 5: one test per comparison of the up-to-date check ---------------


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"kernel_size": K + 2}, f"was made with kernel_size={K}, this run has {K + 2}"),
        ({"batch_size": 500}, "was made with batch_size=10000, this run has 500"),
        ({"compression": "gzip"}, "was made with compression='zstd-1', this run has 'gzip'"),
        (
            {"dataset": "events/copy"},
            "was made with dataset='events/image', this run has 'events/copy'",
        ),
    ],
)
def test_each_parameter_of_the_up_to_date_check_is_named(change, expected, raw, tmp_path):
    folder, _ = raw
    for name in ("a", "b"):
        with h5py.File(folder / f"{name}.rtdc", "r+") as h5:
            h5["events/copy"] = h5["events/image"][:]
    run(folder, tmp_path / "bg")
    opts = {"kernel_size": K, **change}
    results = compute_backgrounds(folder, tmp_path / "bg", recursive=True, progress=False, **opts)
    for r in results:
        assert r["status"] == "failed"
        assert expected in r["error"], r["error"]


def test_the_event_count_is_compared(raw, tmp_path):
    folder, _ = raw
    run(folder, tmp_path / "bg")
    write_plain(folder / "a.rtdc", seed=0, n=N + 40)  # the same frames and 40 more
    again = run(folder, tmp_path / "bg")
    assert again["a"]["status"] == "failed"
    assert f"has {N} events, the input {N + 40}" in again["a"]["error"]


def test_an_output_without_a_recorded_identity_is_not_current(raw, tmp_path):
    folder, _ = raw
    run(folder, tmp_path / "bg")
    with h5py.File(tmp_path / "bg" / "a_bg.rtdc", "r+") as h5:  # as an older version wrote it
        (name,) = [n for n in h5["logs"] if n.startswith("rollmed-dask-job")]
        info = json.loads(b"\n".join(h5["logs"][name][:]))
        del info["parameters"][identity.ATTR]
        del h5["logs"][name]
        h5["logs"][name] = json.dumps(info).encode().split(b"\n")
    again = run(folder, tmp_path / "bg")
    assert "records no identity of its input data" in again["a"]["error"]
    assert again["b"]["status"] == "skipped"


def test_in_place_rerun_with_an_empty_or_truncated_file_names_the_real_cause(raw, tmp_path):
    folder, _ = raw
    (folder / "empty.rtdc").write_bytes(b"")
    data = (folder / "b.rtdc").read_bytes()
    (folder / "cut.rtdc").write_bytes(data[: len(data) // 2])
    results = compute_backgrounds(folder, None, K, recursive=True, in_place=True, progress=False)
    errors = {pathlib.Path(r["input"]).stem: r["error"] for r in results}
    for name in ("empty", "cut"):
        assert "not a readable HDF5 file" in errors[name], errors[name]
        assert "overwrite" not in errors[name]
    assert errors["a"] is None and errors["b"] is None
    again = compute_backgrounds(folder, None, K, recursive=True, in_place=True, progress=False)
    assert [r["status"] for r in again if r["error"] is None] == ["skipped", "skipped"]


# --- case 2: --resume of a complete Zarr output ----------------------------


def test_resume_of_a_complete_zarr_after_the_input_changed(raw, tmp_path):
    folder, _ = raw
    src, out = folder / "a.rtdc", tmp_path / "a_bg.zarr"
    compute_background(src, out, K, progress=False, resume=True)
    summary = compute_background(src, out, K, progress=False, resume=True)
    assert summary.complete_already
    new = replace_keeping_times(src, seed=9)
    with pytest.raises(FileExistsError, match="was made from other data.*overwrite=True"):
        compute_background(src, out, K, progress=False, resume=True)
    summary = compute_background(src, out, K, progress=False, resume=True, overwrite=True)
    assert not summary.complete_already
    exact(out, new)


def test_resume_of_a_complete_zarr_without_a_recorded_identity_is_refused(raw, tmp_path):
    folder, _ = raw
    src, out = folder / "a.rtdc", tmp_path / "a_bg.zarr"
    compute_background(src, out, K, progress=False, resume=True)
    meta = json.loads((out / "zarr.json").read_text())  # as an older version wrote it
    del meta["attributes"][ZARR_JOB_ATTR][identity.ATTR]
    (out / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(FileExistsError, match="records no identity of its input data"):
        compute_background(src, out, K, progress=False, resume=True)


def test_resume_of_a_complete_zarr_made_from_an_array_compares_the_arrays(tmp_path):
    img = np.random.default_rng(5).integers(0, 255, (N, *SHAPE), dtype=np.uint8)
    out = tmp_path / "bg.zarr"
    compute_background(img, out, K, progress=False, resume=True)
    assert compute_background(img.copy(), out, K, progress=False, resume=True).complete_already
    with pytest.raises(FileExistsError, match="was made from other data.*overwrite=True"):
        compute_background(img[::-1].copy(), out, K, progress=False, resume=True)
    exact(out, img)


# --- case 3: --resume of a Zarr partial ------------------------------------


def make_partial(src, out, monkeypatch, keep=(0,), **kw):
    """A resumable partial whose blocks ``keep`` (of 40 events) are done, as an
    interrupted run leaves it."""
    interrupt_at_write(monkeypatch, N // 40, src, out, K, progress=False, event_chunk=40, **kw)
    progress = partial_path(out) / PROGRESS_DIR
    assert (progress / "input.json").is_file()
    for start in range(0, N, 40):
        if start not in keep:
            (progress / str(start)).unlink()


def test_a_done_block_whose_marker_is_damaged_is_computed_again(raw, tmp_path, monkeypatch):
    """A marker without readable digests (cut short by a crash, an older version):
    the block is not trusted, so it is computed again, not taken as done."""
    folder, imgs = raw
    src, out = folder / "a.rtdc", tmp_path / "a_bg.zarr"
    make_partial(src, out, monkeypatch, keep=(0, 40))
    (partial_path(out) / PROGRESS_DIR / "0").write_text("{damaged")
    summary = compute_background(src, out, K, progress=False, resume=True, event_chunk=40)
    assert (summary.blocks_resumed, summary.events_resumed) == (1, 40)
    # the block computed again is exact (its windows end within the first 40 + K
    # rows; the reference of the whole stack would double this test's time)
    np.testing.assert_array_equal(
        read_images(out, "events/image_bg")[:40],
        rolling_median_reference(imgs["a"][: 40 + K], K)[:40],
    )
    assert batch._read_run_logs(out)[-1]["parameters"]["blocks_resumed"] == 1


def test_resume_reads_the_done_blocks_again_only_after_the_input_was_touched(
    raw, tmp_path, monkeypatch
):
    """Unchanged stat: the done blocks are trusted without a read. Touched: the rows
    each done block read (the last block's too) are read and hashed again, and
    match: the same data, so the partial is continued."""
    from rollmed_dask import job

    folder, imgs = raw
    src = folder / "a.rtdc"
    monkeypatch.setattr(identity, "QUIET_NS", 0)  # the input was just written
    reads = []
    original = job._read_digests

    def counted(view, start, stop, chunk_events):
        reads.append(start)
        return original(view, start, stop, chunk_events)

    monkeypatch.setattr(job, "_read_digests", counted)
    for touched, out in ((False, tmp_path / "a_bg.zarr"), (True, tmp_path / "b_bg.zarr")):
        make_partial(src, out, monkeypatch, keep=(40, 80))
        if touched:
            src.touch()
        reads.clear()
        summary = compute_background(src, out, K, progress=False, resume=True, event_chunk=40)
        assert summary.blocks_resumed == 2
        assert sorted(reads) == ([40, 80] if touched else [])
        exact(out, imgs["a"])


def test_resume_of_a_touched_input_checks_a_last_block_in_the_tail(tmp_path, monkeypatch):
    """N = 123, K = 3: blocks of 40, 40, 40 and 3 events. The last starts at N-K,
    where every window is window N-K-1, so its task read row N-K-1 before it; the
    check after a touch reads the rows the task read, and continues."""
    src, out = tmp_path / "a.rtdc", tmp_path / "a_bg.zarr"
    img = write_plain(src, seed=4, n=123)
    monkeypatch.setattr(identity, "QUIET_NS", 0)  # the input was just written
    written = interrupt_at_write(monkeypatch, 4, src, out, 3, progress=False, event_chunk=40)
    assert sorted(written) == [0, 40, 80, 120]
    (partial_path(out) / PROGRESS_DIR / "0").unlink()
    src.touch()
    summary = compute_background(src, out, 3, progress=False, resume=True, event_chunk=40)
    assert (summary.blocks, summary.blocks_resumed) == (4, 3)
    np.testing.assert_array_equal(
        read_images(out, "events/image_bg"), rolling_median_reference(img, 3)
    )


def test_resume_of_a_partial_whose_input_was_replaced_is_refused(raw, tmp_path, monkeypatch):
    folder, _ = raw
    src, out = folder / "a.rtdc", tmp_path / "a_bg.zarr"
    make_partial(src, out, monkeypatch)
    new = replace_keeping_times(src, seed=11)
    with pytest.raises(ValueError, match="made from other data.*rerun without resume=True"):
        compute_background(src, out, K, progress=False, resume=True, event_chunk=40)
    assert partial_path(out).exists()  # refused: kept as it was
    compute_background(src, out, K, progress=False, event_chunk=40)
    exact(out, new)


def test_resume_after_a_change_outside_the_done_blocks_overlap_continues(
    raw, tmp_path, monkeypatch
):
    folder, imgs = raw
    src, out = folder / "a.rtdc", tmp_path / "a_bg.zarr"
    make_partial(src, out, monkeypatch)  # block 0 done: read rows 0 .. 40+K-2
    with h5py.File(src, "r+") as h5:
        h5["events/image"][40 + K - 1, 5, 5] ^= 0xFF
    img = read_images(src, "events/image")
    summary = compute_background(src, out, K, progress=False, resume=True, event_chunk=40)
    assert summary.blocks_resumed == 1
    exact(out, img)


def test_resume_after_a_change_in_a_done_blocks_overlap_is_refused(raw, tmp_path, monkeypatch):
    folder, _ = raw
    src, out = folder / "a.rtdc", tmp_path / "a_bg.zarr"
    make_partial(src, out, monkeypatch)  # block 0 read rows 40 .. 43 of block 1 too
    with h5py.File(src, "r+") as h5:
        h5["events/image"][40 + K - 2, 5, 5] ^= 0xFF
    with pytest.raises(ValueError, match=r"other data \(the input changed since, at events 0-40"):
        compute_background(src, out, K, progress=False, resume=True, event_chunk=40)


def test_resume_of_a_partial_made_from_an_array_checks_the_array(tmp_path, monkeypatch):
    img = np.random.default_rng(3).integers(0, 255, (N, *SHAPE), dtype=np.uint8)
    out = tmp_path / "bg.zarr"
    make_partial(img, out, monkeypatch)
    with pytest.raises(ValueError, match="made from other data"):
        compute_background(img[::-1].copy(), out, K, progress=False, resume=True, event_chunk=40)
    compute_background(img, out, K, progress=False, resume=True, event_chunk=40)
    exact(out, img)


def test_resume_names_the_parameter_that_differs(raw, tmp_path, monkeypatch):
    folder, _ = raw
    out = tmp_path / "a_bg.zarr"
    make_partial(folder / "a.rtdc", out, monkeypatch)
    with pytest.raises(ValueError, match=f"made with kernel_size={K}, this run has {K + 1}"):
        compute_background(
            folder / "a.rtdc", out, K + 1, progress=False, resume=True, event_chunk=40
        )
    with pytest.raises(ValueError, match="made with input=.*a.rtdc', this run has .*b.rtdc'"):
        compute_background(folder / "b.rtdc", out, K, progress=False, resume=True, event_chunk=40)


# --- case 5: the same input spelled differently ----------------------------


def test_resume_with_the_input_spelled_relative_continues(raw, tmp_path, monkeypatch):
    folder, imgs = raw
    out = tmp_path / "a_bg.zarr"
    make_partial((folder / "a.rtdc").absolute(), out, monkeypatch)
    monkeypatch.chdir(folder)
    summary = compute_background("a.rtdc", out, K, progress=False, resume=True, event_chunk=40)
    assert summary.blocks_resumed == 1
    exact(out, imgs["a"])


# --- case 4: in-process caches, a file rewritten between two calls ---------


@pytest.mark.parametrize(
    "filters",
    [{"compression": "gzip"}, {**hdf5plugin.Zstd(), "fletcher32": True}],
    ids=["gzip", "zstd+fletcher32"],
)
def test_input_rewritten_in_place_between_two_calls_in_one_process(filters, tmp_path, monkeypatch):
    # file times are coarse: two rewrites within a few ms keep size, mtime and ctime
    monkeypatch.setattr(sources_module, "file_state", lambda path: ("one clock tick",))
    path = tmp_path / "x.rtdc"
    first = write_plain(path, 0, pad=1000, filters=filters)
    np.testing.assert_array_equal(
        rolling_median(path, K).compute(), rolling_median_reference(first, K)
    )
    second = write_plain(path, 1, pad=9000, filters=filters)  # chunks at other addresses
    np.testing.assert_array_equal(
        rolling_median(path, K).compute(), rolling_median_reference(second, K)
    )
    out = tmp_path / "bg.rtdc"
    compute_background(path, out, K, progress=False)
    exact(out, second)


# --- basins: the identity of the events as the job sees them ---------------


@pytest.mark.parametrize("mapping", [None, np.arange(1, N, 2)], ids=["basin", "mapped-basin"])
def test_a_basin_input_is_current_until_its_basin_changes(mapping, tmp_path, monkeypatch):
    from rollmed_dask.rtdc.basins import store_file_basin

    monkeypatch.setattr(identity, "QUIET_NS", 0)  # the fast path: the basin's stat counts

    images = tmp_path / "images.rtdc"  # outside the input folder: not an input itself
    img = write_plain(images, 0)
    raw = tmp_path / "raw"
    raw.mkdir()
    n = N if mapping is None else len(mapping)
    with h5py.File(raw / "m.rtdc", "w") as h5:
        h5["events/index"] = np.arange(1, n + 1, dtype=np.uint32)
        store_file_basin(
            h5, "images", [str(images)], features=["image"], identifier=None, mapping=mapping
        )
    run(raw, tmp_path / "bg")
    seen = img if mapping is None else img[mapping]
    exact(tmp_path / "bg" / "m_bg.rtdc", seen)
    assert run(raw, tmp_path / "bg")["m"]["status"] == "skipped"
    replace_keeping_times(images, seed=5)  # the input file itself is untouched
    again = run(raw, tmp_path / "bg")["m"]
    assert again["status"] == "failed" and "other data" in again["error"]


def test_an_input_changed_during_the_run_fails_the_job(rtdc_copy, tmp_path, monkeypatch):
    """The input's stat changes while a block waits (the test hook holds it where
    it would write to the Zarr temporary): the job fails with one line and
    writes nothing, for a background of two versions of the input is wrong."""
    import threading
    import time

    hook = tmp_path / "hook"
    hook.mkdir()
    monkeypatch.setenv("ROLLMED_DASK_TEST_PAUSE_AT", f"zarr-opened:{hook}")

    def another_program_touches_the_input():
        deadline = time.monotonic() + 60
        while not (hook / "zarr-opened.here").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        stat = os.stat(rtdc_copy)
        os.utime(rtdc_copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        (hook / "zarr-opened.go").touch()

    out = tmp_path / "out" / "bg.zarr"
    out.parent.mkdir()
    threading.Thread(target=another_program_touches_the_input, daemon=True).start()
    with pytest.raises(ValueError, match="changed while it was read .another program wrote it.; "
                       "nothing was written: run again once it is complete"):  # fmt: skip
        compute_background(rtdc_copy, out, 5, progress=False, event_chunk=20)
    assert list(out.parent.iterdir()) == []
