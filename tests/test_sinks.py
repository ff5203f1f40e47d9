"""The safety lines of the sinks, each with a test that fails without it (issue 23).

Where timing hides a bug (a slow image copy, a writeback that only fires on
large files, a lock released at the wrong moment), the test forces the path
with a hook or a monkeypatch instead of waiting for luck.
"""

import errno
import json
import os
import re
import shutil
import stat
import threading

import h5py
import numpy as np
import pytest
from conftest import read_images
from test_safety import fill_disk, small_disk  # noqa: F401 (fixture)

from rollmed_dask import compute_background, rolling_median_reference, sinks
from rollmed_dask.h5chunks import ChunkCopy
from rollmed_dask.sinks import (
    HDF5Sink,
    TargetBusyError,
    TargetLock,
    WriteBehind,
    run_partial_path,
    temporaries,
)


def output_with_copied_images(source, target, **kwargs):
    """A new ``.rtdc`` output that holds a copy of the input's images (an
    option: by default ``events/image`` is a virtual dataset)."""
    return compute_background(source, target, progress=False, copy_images=True, **kwargs)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "input.rtdc")


def _open_files():
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the listing's own descriptor
            pass
    return found


# --- temporaries and the lock ---


def test_two_runs_in_one_process_get_different_temporaries(tmp_path):
    """The exit-time cleanup removes a run's temporary by name: never another's."""
    target = tmp_path / "bg.rtdc"
    first, second = run_partial_path(target), run_partial_path(target)
    assert first != second
    for path in (first, second):
        path.touch()
    assert sorted(temporaries(target)) == sorted([first, second])


def test_stale_temporaries_of_every_kind_are_removed_and_nothing_else(tmp_path):
    """A killed run leaves a file (HDF5), a folder (Zarr) or, from another tool,
    a link: each goes, and a link's target stays."""
    target = tmp_path / "bg.rtdc"
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "data").write_text("x")
    stale_file = target.with_name(".bg.rtdc.111-0123abcd.partial")
    stale_file.write_text("x")
    stale_dir = target.with_name(".bg.rtdc.222-0123abcd.partial")
    stale_dir.mkdir()
    (stale_dir / "chunk").write_text("x")
    target.with_name(".bg.rtdc.333-0123abcd.partial").symlink_to(kept)
    sinks.remove_stale_temporaries(target, keep_resumable=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert (kept / "data").read_text() == "x"


def test_resuming_keeps_only_the_resumable_temporary(tmp_path):
    target = tmp_path / "bg.zarr"
    stable = sinks.partial_path(target)
    stable.mkdir()
    stale = target.with_name(".bg.zarr.111-0123abcd.partial")
    stale.mkdir()
    assert sorted(temporaries(target)) == sorted([stable, stale])
    sinks.remove_stale_temporaries(target, keep_resumable=True)
    assert temporaries(target) == [stable]


def test_a_zarr_store_of_another_tool_is_never_replaced(tmp_path):
    foreign = tmp_path / "other.zarr"
    foreign.mkdir()
    (foreign / "zarr.json").write_text(
        '{"zarr_format": 3, "node_type": "group", "attributes": {}}'
    )
    assert not sinks.is_our_zarr(foreign)
    with pytest.raises(FileExistsError, match="never replaced"):
        sinks.check_target(foreign, overwrite=True)


def test_a_busy_target_names_its_holder_and_keeps_no_descriptor(tmp_path):
    target = tmp_path / "bg.rtdc"
    with TargetLock(target):
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(TargetBusyError, match=rf"\(pid {os.getpid()} on "):
            TargetLock(target).__enter__()
        assert len(os.listdir("/proc/self/fd")) == before


def test_a_waiter_on_the_released_lock_file_takes_the_new_one(tmp_path, monkeypatch):
    """The holder unlinks the lock file and closes it while a waiter has the old
    file open: the waiter's flock then succeeds on a file no one else sees, and
    must open the lock file again, or a third run would get the lock too."""
    import fcntl

    target = tmp_path / "bg.rtdc"
    fds = len(os.listdir("/proc/self/fd"))
    holder = TargetLock(target).__enter__()
    real_flock = fcntl.flock

    def release_then_flock(fd, op):
        if holder.fd is not None:  # the waiter opened the old file: now the holder lets go
            holder.__exit__(None, None, None)
            holder.fd = None
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", release_then_flock)
    waiter = TargetLock(target).__enter__()
    monkeypatch.setattr(fcntl, "flock", real_flock)
    try:
        assert os.fstat(waiter.fd).st_ino == os.stat(waiter.path).st_ino
        with pytest.raises(TargetBusyError), TargetLock(target):
            pass
    finally:
        waiter.__exit__(None, None, None)
    assert len(os.listdir("/proc/self/fd")) == fds, "the old lock file's descriptor leaked"


# --- publishing: fsync before the rename ---


@pytest.mark.parametrize("in_place", [False, True], ids=["new-file", "in-place"])
def test_the_output_is_on_disk_before_the_rename_that_publishes_it(
    in_place, rtdc_copy, tmp_path, monkeypatch
):
    target = rtdc_copy if in_place else tmp_path / "bg.rtdc"
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        if str(dst) == str(target):  # not the replaces of numba's cache
            calls.append(("replace", str(src)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    compute_background(rtdc_copy, target, 10, in_place=in_place, progress=False)
    published = [path for kind, path in calls if kind == "replace"]
    assert len(published) == 1
    tmp = published[0]
    assert ("fsync", tmp) in calls
    assert calls.index(("fsync", tmp)) < calls.index(("replace", tmp))


# --- in place ---


def test_in_place_keeps_the_files_mode(rtdc_copy):
    rtdc_copy.chmod(0o640)
    compute_background(rtdc_copy, rtdc_copy, 10, in_place=True, progress=False)
    assert stat.S_IMODE(rtdc_copy.stat().st_mode) == 0o640


def test_in_place_refuses_before_copying_when_the_copy_cannot_fit(
    small_rtdc,
    small_disk,  # noqa: F811
    monkeypatch,
):
    """The copy would fit only partly: refused before a byte is written, so the
    disk never reaches 100 % (the copy failing midway says the same words)."""
    raw = shutil.copy(small_rtdc, small_disk / "raw.rtdc")
    before = open(raw, "rb").read()
    fill_disk(small_disk, len(before) // 2)
    copies = []
    monkeypatch.setattr(shutil, "copyfile", lambda *a, **k: copies.append(a))
    with pytest.raises(OSError, match="in_place copies") as err:
        compute_background(raw, raw, 10, in_place=True, progress=False)
    assert err.value.errno == errno.ENOSPC
    assert copies == []
    assert open(raw, "rb").read() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "raw.rtdc"]


def test_in_place_goes_on_when_the_copy_just_fits(rtdc_copy, monkeypatch):
    real = shutil.disk_usage
    size = rtdc_copy.stat().st_size
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=size))
    compute_background(rtdc_copy, rtdc_copy, 10, in_place=True, progress=False)
    assert read_images(rtdc_copy, "events/image_bg").shape == read_images(rtdc_copy).shape


# --- the image copy beside the computation ---


def test_the_commit_waits_for_a_slow_image_copy(rtdc_copy, tmp_path, monkeypatch):
    """The copy is held until the commit starts and then goes on slowly: an
    output published before it ended would lack image chunks (zeros)."""
    committing = threading.Event()
    real_commit, real_step = HDF5Sink.commit, ChunkCopy.step

    def commit(self, *args, **kwargs):
        committing.set()
        return real_commit(self, *args, **kwargs)

    def slow_step(self):
        assert committing.wait(60), "the job never committed"
        threading.Event().wait(0.02)  # slow, not a synchronisation: the commit must wait
        return real_step(self)

    monkeypatch.setattr(HDF5Sink, "commit", commit)
    monkeypatch.setattr(ChunkCopy, "step", slow_step)
    out = tmp_path / "bg.rtdc"
    output_with_copied_images(rtdc_copy, out, kernel_size=10)
    # the copy's handle on the input is closed (a batch would run out of them)
    assert str(rtdc_copy) not in _open_files()
    with h5py.File(rtdc_copy) as hi, h5py.File(out) as ho:
        src, dst = hi["events/image"], ho["events/image"]
        assert dst.id.get_num_chunks() == src.id.get_num_chunks() > 1
        np.testing.assert_array_equal(dst[()], src[()])


# --- write-behind ---


def test_write_behind_runs_on_small_files(rtdc_copy, tmp_path, monkeypatch):
    """A writeback every STEP bytes written, and no more (the thread sleeps
    in between: it does not spin beside the workers)."""
    calls, written = [], []
    real, real_wrote = sinks._start_writeback, WriteBehind.wrote
    monkeypatch.setattr(WriteBehind, "STEP", 4096)
    monkeypatch.setattr(sinks, "_start_writeback", lambda fd: (calls.append(fd), real(fd)))
    monkeypatch.setattr(
        WriteBehind, "wrote", lambda self, n: (written.append(n), real_wrote(self, n))[1]
    )
    out = tmp_path / "bg.rtdc"
    compute_background(rtdc_copy, out, 10, progress=False)
    assert calls, "the write-behind thread never started a writeback"
    assert len(calls) <= sum(written) // 4096, "more writebacks than STEPs written"
    assert [f for f in _open_files() if f.startswith(str(tmp_path))] == []
    np.testing.assert_array_equal(
        read_images(out, "events/image_bg"), rolling_median_reference(read_images(rtdc_copy), 10)
    )


@pytest.mark.parametrize("in_place", [False, True], ids=["new-file", "in-place"])
def test_a_write_behind_error_fails_the_job_and_leaves_nothing(
    in_place, rtdc_copy, tmp_path, monkeypatch
):
    def failing_writeback(fd):
        raise OSError(errno.EIO, "Input/output error (injected)")

    monkeypatch.setattr(WriteBehind, "STEP", 4096)
    monkeypatch.setattr(sinks, "_start_writeback", failing_writeback)
    before = rtdc_copy.read_bytes()
    target = rtdc_copy if in_place else tmp_path / "bg.rtdc"
    with pytest.raises(OSError, match="injected") as err:
        compute_background(rtdc_copy, target, 10, in_place=in_place, progress=False)
    assert err.value.errno == errno.EIO
    assert rtdc_copy.read_bytes() == before
    assert _leftovers(tmp_path) == []


# --- the lock file, the folder swap and its checks (second mutation run) ---


def test_a_stale_lock_file_names_only_its_new_holder(tmp_path):
    """A killed run leaves its lock file (with its pid): the next holder's pid
    replaces it entirely, or a waiter's message would name the dead run."""
    import socket

    target = tmp_path / "bg.rtdc"
    lock = target.with_name(".bg.rtdc.lock")
    lock.write_text("4194304 on a-much-longer-host-name-of-a-killed-run\n")
    with TargetLock(target):
        assert lock.read_text() == f"{os.getpid()} on {socket.gethostname()}\n"


def _our_zarr(path, value):
    path.mkdir()
    meta = {"zarr_format": 3, "node_type": "group", "attributes": {sinks.ZARR_LOG_ATTR: {}}}
    (path / "zarr.json").write_text(json.dumps(meta))
    (path / "data").mkdir()
    (path / "data" / "chunk").write_text(value)


def test_a_folder_that_changed_hands_before_the_move_is_not_replaced(tmp_path, monkeypatch):
    """``move_into_place`` checks the old folder again: it may have become
    someone else's since ``check_target``. Unchecked, the new output would be
    installed and the old one left half removed as ``.NAME.old``."""
    target, tmp = tmp_path / "bg.zarr", tmp_path / ".bg.zarr.1-0123abcd.partial"
    _our_zarr(target, "old")
    _our_zarr(tmp, "new")
    sinks.check_target(target, overwrite=True)
    # now the old output's data folder becomes one this user may not change
    blocked = str(target / "data")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **k: str(p) != blocked and real_access(p, m))
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: pytest.fail("removed something"))
    with pytest.raises(PermissionError, match="may not remove '.*/bg.zarr/data'"):
        sinks.move_into_place(tmp, target)
    assert (target / "data" / "chunk").read_text() == "old"
    assert (tmp / "data" / "chunk").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name, "bg.zarr"]


@pytest.mark.parametrize("new_is_folder", [True, False], ids=["file-to-folder", "folder-to-file"])
def test_a_file_and_a_folder_replace_each_other(new_is_folder, tmp_path):
    """An output's format changed between two runs (``--format``): one rename
    cannot swap a file and a folder, the old one is parked first."""
    target, tmp = tmp_path / "bg", tmp_path / ".bg.1-0123abcd.partial"
    folder, file = (tmp, target) if new_is_folder else (target, tmp)
    _our_zarr(folder, "folder")
    file.write_text("file")
    sinks.move_into_place(tmp, target)
    assert target.is_dir() == new_is_folder
    if new_is_folder:
        assert (target / "data" / "chunk").read_text() == "folder"
    else:
        assert target.read_text() == "file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg"]


def test_a_failed_folder_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    """The new folder cannot be renamed in after the old one was parked: the
    old one goes back under its name, the error is raised, and Ctrl-C works
    again (the interrupts were held back only for the swap)."""
    import signal

    target, tmp = tmp_path / "bg.zarr", tmp_path / ".bg.zarr.1-0123abcd.partial"
    _our_zarr(target, "old")
    _our_zarr(tmp, "new")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    real_replace = os.replace

    def replace(src, dst):
        if str(src) == str(tmp):
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        sinks.move_into_place(tmp, target)
    assert (target / "data" / "chunk").read_text() == "old"
    assert (tmp / "data" / "chunk").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name, "bg.zarr"]
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_someone_elses_folder_in_a_sticky_folder_is_never_replaced(tmp_path, monkeypatch):
    """In a sticky folder (``/tmp``, shared folders) only an entry's owner (or
    the folder's) may rename it, or rename over it: a folder or a file output
    is refused before anything changes, unless this user owns it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    target = shared / "bg.zarr"
    _our_zarr(target, "old")
    uid = 4242  # a user who owns neither the folder nor the output
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    with pytest.raises(
        PermissionError,
        match=rf"may not remove '{re.escape(str(target))}' .*owner uid {os.getuid()}",
    ):
        sinks.check_removable(target)
    with pytest.raises(PermissionError, match="may not remove"):  # before any work
        sinks.check_target(target, overwrite=True)
    os.chown(target, uid, -1)
    sinks.check_removable(target)  # its own output: fine
    os.chown(target, 0, -1)
    old_file = shared / "bg.rtdc"  # a file output: its final rename would fail after the work
    old_file.write_bytes(b"old")
    with pytest.raises(PermissionError, match=f"may not remove '{re.escape(str(old_file))}'"):
        sinks.check_target(old_file, overwrite=True)
    shared.chmod(0o777)
    sinks.check_removable(target)  # not sticky: whoever may write the folder may rename in it
    sinks.check_target(old_file, overwrite=True)


def test_a_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    target = tmp_path / "bg.zarr"
    _our_zarr(target, "old")
    hidden = str(target / "data")
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path) == hidden:
            raise PermissionError(errno.EACCES, "Permission denied (injected)", hidden)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError, match=f"may not remove '{re.escape(hidden)}'"):
        sinks.check_removable(target)


def test_an_output_folder_without_write_permission_is_refused_early(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m, **k: str(p) != str(folder) and real_access(p, m, **k)
    )
    with pytest.raises(PermissionError, match="cannot write into the output folder"):
        sinks.check_output_folder(folder / "bg.rtdc")
    sinks.check_output_folder(tmp_path / "bg.rtdc")


def test_check_target_refuses_a_link_and_a_missing_folder_by_itself(tmp_path):
    """``check_target`` makes the checks of the output's name and folder itself,
    not only its caller (the job makes them before taking the lock)."""
    (tmp_path / "real.rtdc").write_text("x")
    (tmp_path / "link.rtdc").symlink_to(tmp_path / "real.rtdc")
    with pytest.raises(ValueError, match="is a symbolic link"):
        sinks.check_target(tmp_path / "link.rtdc", overwrite=True)
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        sinks.check_target(tmp_path / "missing" / "bg.rtdc", overwrite=False)


def test_a_temporary_that_cannot_be_removed_at_once_raises_nothing(tmp_path, monkeypatch):
    """A worker may still write a chunk into the temporary Zarr store while it
    is removed after an error: the removal must not replace the job's error
    (what is left goes when the interpreter exits)."""
    tmp = tmp_path / ".bg.zarr.1-0123abcd.partial"
    _our_zarr(tmp, "chunk")
    real_rmdir = os.rmdir

    def rmdir(path, *args, **kwargs):
        if str(path) == str(tmp):
            raise OSError(errno.ENOTEMPTY, "Directory not empty (a chunk written meanwhile)")
        return real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", rmdir)
    sinks._remove_temporary(tmp)
    assert list(tmp.iterdir()) == []


def test_a_chunk_written_after_the_removal_goes_when_the_process_exits(tmp_path):
    """After an interrupt a worker may finish its block and write a chunk into
    the temporary just removed: it goes when the interpreter exits."""
    import subprocess
    import sys

    tmp = tmp_path / ".bg.zarr.1-0123abcd.partial"
    code = (
        "import pathlib, sys\n"
        "from rollmed_dask import sinks\n"
        "tmp = pathlib.Path(sys.argv[1])\n"
        "(tmp / 'events').mkdir(parents=True)\n"
        "sinks._remove_temporary(tmp)\n"
        "assert not tmp.exists()\n"
        "(tmp / 'events').mkdir(parents=True)  # the late chunk\n"
        "(tmp / 'events' / 'c.0').write_text('x')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp)], check=True, timeout=60)
    assert not tmp.exists()


# --- the image copy fails, or the job fails while it runs ---


def _wait_for_no_thread(name):
    for _ in range(6000):
        if name not in [t.name for t in threading.enumerate()]:
            return
        threading.Event().wait(0.01)
    pytest.fail(f"the thread {name} never ended")


@pytest.mark.parametrize("when", ["before-a-block", "at-the-commit"])
def test_a_failed_image_copy_fails_the_job_and_leaves_nothing(
    when, rtdc_copy, tmp_path, monkeypatch
):
    """The copy fails (a full disk): the next block ends the job, without
    writing it; a copy that fails once all blocks are written fails the commit."""
    from rollmed_dask import h5chunks

    committing = threading.Event()
    written = []
    real_commit, real_write = HDF5Sink.commit, HDF5Sink.write
    real_write_chunks = h5chunks.write_chunks

    def commit(self, *args, **kwargs):
        committing.set()
        return real_commit(self, *args, **kwargs)

    def write(self, payload):
        _wait_for_no_thread("rollmed-image-copy")  # the copy has failed
        return real_write(self, payload)

    def failing_step(self):
        if when == "at-the-commit":
            assert committing.wait(60), "the job never committed"
        raise OSError(errno.EIO, "Input/output error (injected)")

    monkeypatch.setattr(HDF5Sink, "commit", commit)
    if when == "before-a-block":
        monkeypatch.setattr(HDF5Sink, "write", write)
    monkeypatch.setattr(
        h5chunks, "write_chunks", lambda *a: (written.append(a[1]), real_write_chunks(*a))
    )
    monkeypatch.setattr(ChunkCopy, "step", failing_step)
    with pytest.raises(OSError, match="injected"):
        output_with_copied_images(rtdc_copy, tmp_path / "bg.rtdc", kernel_size=10)
    assert (written == []) == (when == "before-a-block")
    assert _leftovers(tmp_path) == []


def test_a_failed_job_stops_the_image_copy_and_closes_its_files(rtdc_copy, tmp_path, monkeypatch):
    """The job fails at its first block while the copy runs: the copy stops at
    the next chunk (not after all of them), its thread is gone and the input
    it held open is closed when the job returns."""
    from rollmed_dask import h5chunks

    aborting = threading.Event()
    steps = []
    real_abort, real_step = HDF5Sink.abort, ChunkCopy.step

    def abort(self):
        aborting.set()
        return real_abort(self)

    def slow_step(self):
        assert aborting.wait(60), "the job never aborted"
        steps.append(len(self.chunks))
        threading.Event().wait(0.3)  # still copying when the rest of the abort is done
        return real_step(self)

    def failing_write_chunks(*args):
        raise OSError(errno.EIO, "Input/output error (injected)")

    monkeypatch.setattr(HDF5Sink, "abort", abort)
    monkeypatch.setattr(ChunkCopy, "step", slow_step)
    monkeypatch.setattr(h5chunks, "write_chunks", failing_write_chunks)
    with pytest.raises(OSError, match="injected"):
        output_with_copied_images(rtdc_copy, tmp_path / "bg.rtdc", kernel_size=10)
    threads = [t.name for t in threading.enumerate()]
    assert "rollmed-image-copy" not in threads
    assert "rollmed-write-behind" not in threads
    assert len(steps) == 1 < steps[0], "the copy went on after the job failed"
    assert [f for f in _open_files() if f.startswith(str(tmp_path))] == []
    assert _leftovers(tmp_path) == []


# --- blocks that cannot be compressed by the workers ---


def test_blocks_written_through_h5py_when_the_workers_cannot_compress(
    rtdc_copy, tmp_path, monkeypatch
):
    """A filter pipeline the workers cannot reproduce: the writer stores the
    plain blocks through h5py, and they count towards the write-behind."""
    from rollmed_dask import h5chunks

    calls = []
    real = sinks._start_writeback
    monkeypatch.setattr(h5chunks, "_SUPPORTED_KINDS", "")
    monkeypatch.setattr(WriteBehind, "STEP", 4096)
    monkeypatch.setattr(sinks, "_start_writeback", lambda fd: (calls.append(fd), real(fd)))
    out = tmp_path / "bg.rtdc"
    compute_background(rtdc_copy, out, 10, progress=False)
    assert calls, "the blocks were not counted towards the write-behind"
    np.testing.assert_array_equal(
        read_images(out, "events/image_bg"), rolling_median_reference(read_images(rtdc_copy), 10)
    )


# --- the write-behind's writeback ---


@pytest.mark.parametrize("linux", [True, False], ids=["sync_file_range", "fdatasync"])
def test_a_writeback_error_is_raised(linux, tmp_path, monkeypatch):
    """``sync_file_range`` (Linux) and ``fdatasync`` (elsewhere) both report an
    error; a pipe cannot be synced."""
    if not linux:
        monkeypatch.setattr(sinks, "_SYNC_FILE_RANGE", [None])
    path = tmp_path / "data"
    path.write_bytes(b"x" * 10000)
    fd = os.open(path, os.O_RDONLY)
    try:
        sinks._start_writeback(fd)
    finally:
        os.close(fd)
    read, write = os.pipe()
    try:
        with pytest.raises(OSError) as err:
            sinks._start_writeback(read)
        assert err.value.errno == (errno.ESPIPE if linux else errno.EINVAL)
    finally:
        os.close(read)
        os.close(write)


# --- logs and the Zarr partial ---


def test_runs_in_the_same_second_get_numbered_logs(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        assert sinks._free_log_name(h5, "run") == "run"
        h5.create_group("logs/run")
        assert sinks._free_log_name(h5, "run") == "run-2"
        h5.create_group("logs/run-2")
        assert sinks._free_log_name(h5, "run") == "run-3"


def test_a_partial_without_a_readable_job_record_is_not_continued(small_rtdc, tmp_path):
    """The partial's record of its parameters is damaged: refused, and kept."""
    out = tmp_path / "bg.zarr"
    partial = sinks.ZarrSink(
        out, "events/image_bg", (40, 8, 8), "uint8", chunk_events=10, job_params={}, resume=True
    )
    partial.open({})
    (partial.tmp / sinks.PROGRESS_DIR / "job.json").write_text("{damaged")
    with pytest.raises(ValueError, match="no readable record of its parameters"):
        compute_background(small_rtdc, out, 10, progress=False, resume=True)
    assert partial.tmp.is_dir()
    assert not out.exists()


def test_a_settle_that_times_out_leaves_no_waiting_task(tmp_path):
    """zarr's loop still runs a task when the wait for it times out: the
    waiting task is cancelled, not left on the loop for the rest of the run."""
    import asyncio
    import sys

    import zarr

    zarr.open_group(store=str(tmp_path / "s.zarr"), mode="w")  # zarr's loop runs
    loop = sys.modules["zarr.core.sync"].loop[0]
    release = threading.Event()

    async def busy():
        while not release.is_set():
            await asyncio.sleep(0.01)

    async def settling():
        return [t for t in asyncio.all_tasks() if t.get_name() == "rollmed-dask settle"]

    busy_task = asyncio.run_coroutine_threadsafe(busy(), loop)
    try:
        sinks.settle_zarr_io(timeout=0.1)
        for _ in range(100):  # the cancel takes a turn of the loop
            left = asyncio.run_coroutine_threadsafe(settling(), loop).result(5)
            if not left:
                break
            threading.Event().wait(0.01)
        assert left == []
    finally:
        release.set()
        busy_task.result(5)


def test_an_interrupt_during_a_zarr_metadata_write_leaves_no_temporary(
    small_rtdc, tmp_path, monkeypatch
):
    """Ctrl-C while zarr's loop writes the commit's metadata: the interrupted
    call returns at once, and its write goes on. The job's abort waits for it
    before removing the temporary; removed under it, the write would make the
    temporary's folders again (zarr creates a key's parents) and leave them.
    (Named without "ctrl_c": the mutation run of sinks.py leaves out the slow
    CLI signal tests by that word, and this one is fast.)"""
    import asyncio
    import signal

    from zarr.storage import LocalStore

    original, writing = LocalStore.set, threading.Event()

    async def slow_attribute_write(self, key, value):
        if key.endswith("zarr.json") and b'"CLASS"' in value.to_bytes():  # commit's attrs
            writing.set()
            await asyncio.sleep(1.0)
        return await original(self, key, value)

    def ctrl_c_once_writing():
        if writing.wait(60):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(LocalStore, "set", slow_attribute_write)
    target = tmp_path / "bg.zarr"
    threading.Thread(target=ctrl_c_once_writing, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        compute_background(small_rtdc, target, kernel_size=10, progress=False)
    assert writing.is_set()
    threading.Event().wait(1.5)  # longer than the slowed write
    assert os.listdir(tmp_path) == []


def test_a_settle_reads_the_errors_of_failed_tasks_and_skips_cancelled_ones(tmp_path, caplog):
    """A full disk fails several chunk writes at once: the first error is the
    job's, the others are read and dropped (no "exception was never
    retrieved" at exit); a cancelled task has no error to read."""
    import asyncio
    import gc
    import sys

    import zarr

    zarr.open_group(store=str(tmp_path / "s.zarr"), mode="w")  # zarr's loop runs
    loop = sys.modules["zarr.core.sync"].loop[0]

    async def failing():
        await asyncio.sleep(0.05)
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    async def start():
        loop.create_task(failing(), name="chunk write")
        asyncio.create_task(asyncio.sleep(10), name="cancelled chunk write").cancel()

    asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    sinks.settle_zarr_io()
    gc.collect()
    assert "never retrieved" not in caplog.text


def test_a_zarr_output_carries_dcnums_image_and_pipeline_attributes(small_rtdc, tmp_path):
    """The Zarr array of the background has the attributes an `.rtdc` output's
    ``image_bg`` has: HDF5's image class and dcnum's pipeline id (a rerun reads
    it to tell an up-to-date output)."""
    import zarr

    from rollmed_dask import rtdc

    out = tmp_path / "bg.zarr"
    compute_background(small_rtdc, out, 5, batch_size=500, progress=False)
    attrs = dict(zarr.open_group(str(out), mode="r")["events/image_bg"].attrs)
    for key, value in rtdc.IMAGE_ATTRS.items():
        assert attrs[key] == value.decode()
    assert attrs["dcnum ppid background"] == rtdc.bg_ppid(5, 500)


def test_a_finished_zarr_output_keeps_no_progress_markers(small_rtdc, tmp_path):
    """The per-block markers (and their digests) serve a resumed run only: the
    finished store holds the background and its metadata, nothing else of ours."""
    out = tmp_path / "bg.zarr"
    compute_background(small_rtdc, out, 5, resume=True, event_chunk=40, progress=False)
    assert not (out / sinks.PROGRESS_DIR).exists()
    assert sorted(p.name for p in out.iterdir()) == ["events", "zarr.json"]
