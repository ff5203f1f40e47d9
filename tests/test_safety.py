"""Never lose data: interrupts for real, damaged and truncated inputs, permissions,
and workers with little memory.

The interrupt tests start the CLI as a subprocess on a job that takes tens of
seconds (the scipy engine on small blocks), send SIGINT or SIGKILL while it
runs, and check what is on disk afterwards.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import _in_ci, flip_bytes_in_chunk, read_images, write_bad_stacks

from rollmed_dask import compute_background, rolling_median_reference
from rollmed_dask.example import write_example
from rollmed_dask.sinks import PROGRESS_DIR, partial_path, temporaries

SLOW = ["-k", "20", "--engine", "scipy", "--event-chunk", "40"]


@pytest.fixture(scope="module")
def long_rtdc(example_dir):
    """3000 events: about a minute with the scipy engine on 40-event blocks."""
    return write_example(example_dir / "long.rtdc", n_events=3000, seed=3)


def start_cli(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "rollmed_dask", *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "rollmed_dask", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def wait_until_running(proc, out: Path, seconds=60):
    """Until the temporary output exists and a block or two are done."""
    deadline = time.monotonic() + seconds
    while not temporaries(out):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the job never started writing"
        time.sleep(0.1)
    time.sleep(4)
    assert proc.poll() is None, "the job must still be running when it is interrupted"


class _TaskRecord:
    def __init__(self):
        self.started, self.finished = [], []


def _timed_block(i, record):
    record.started.append(i)
    time.sleep(0.2 + 0.4 * i)  # block 1 still runs when block 0 reaches the writer
    record.finished.append(i)
    return i


def test_a_failed_stream_returns_only_when_no_block_task_runs():
    # Right after a failure the sink removes its temporary output: a task still
    # writing into it would recreate it, or break the removal (seen in CI:
    # "Directory not empty" on Ctrl-C during a Zarr run).
    from dask import delayed

    from rollmed_dask.scheduling import resolve_scheduler, stream_blocks

    record = _TaskRecord()
    tasks = [delayed(_timed_block)(i, record) for i in range(2)]

    def failing_writer(_payload):
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError, match="the writer failed"):
        stream_blocks(tasks, failing_writer, resolve_scheduler("threads"), num_workers=2)
    assert sorted(record.finished) == sorted(record.started) == [0, 1]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("suffix", [".rtdc", ".zarr"])
def test_sigint_keeps_the_old_output_and_leaves_no_temporary(suffix, long_rtdc, tmp_path):
    out = tmp_path / f"bg{suffix}"
    if suffix == ".rtdc":
        out.write_bytes(b"the old output")
    proc = start_cli(long_rtdc, out, *SLOW, "--overwrite")
    wait_until_running(proc, out)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)  # Ctrl-C stops within seconds, not a minute
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr.strip().splitlines()[-1]
    if suffix == ".rtdc":
        assert out.read_bytes() == b"the old output"
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([out.name] if out.exists() else [])
    rerun = run_cli(long_rtdc, out, "-k", "20", "--overwrite", "-q")
    assert rerun.returncode == 0, rerun.stderr
    expected = rolling_median_reference(read_images(long_rtdc), 20)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)


@pytest.mark.timeout(300)
def test_sigkill_keeps_the_old_output_and_a_rerun_is_exact(long_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    out.write_bytes(b"the old output")
    proc = start_cli(long_rtdc, out, *SLOW, "--overwrite")
    wait_until_running(proc, out)
    proc.kill()
    proc.communicate(timeout=30)
    assert out.read_bytes() == b"the old output"
    rerun = run_cli(long_rtdc, out, "-k", "20", "--event-chunk", "40", "--overwrite", "-q")
    assert rerun.returncode == 0, rerun.stderr
    expected = rolling_median_reference(read_images(long_rtdc), 20)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    assert not temporaries(out), "the rerun removed the stale temporary"


@pytest.mark.timeout(300)
def test_sigkill_then_resume_computes_only_what_is_missing(long_rtdc, tmp_path):
    out = tmp_path / "bg.zarr"
    proc = start_cli(long_rtdc, out, *SLOW, "--resume")
    wait_until_running(proc, out)
    # a block's marker, not a time: on a loaded machine 4 s may not finish one
    progress = partial_path(out) / PROGRESS_DIR
    deadline = time.monotonic() + 120
    while not any(marker.name.isdigit() for marker in progress.glob("*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no block was written"
        time.sleep(0.1)
    proc.kill()
    proc.communicate(timeout=30)
    assert not out.exists()
    # the same job (K, block length) with the fast engine: the engine never
    # changes the bits, so the blocks already written are kept
    rerun = run_cli(long_rtdc, out, "-k", "20", "--event-chunk", "40", "--resume")
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming:" in rerun.stderr
    summary = rerun.stderr.strip().splitlines()[-1]
    resumed = int(summary.split(" resumed")[0].rsplit(", ", 1)[1])
    assert resumed > 0, summary
    expected = rolling_median_reference(read_images(long_rtdc), 20)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    assert not partial_path(out).exists()


def test_damaged_chunk_is_caught_and_named(rtdc_copy, tmp_path):
    first = flip_bytes_in_chunk(rtdc_copy, "events/image", 3)[0]
    assert first == 120
    out = tmp_path / "bg.rtdc"
    with pytest.raises(OSError, match="events 120 to 159"):
        compute_background(rtdc_copy, out, 10, progress=False)
    assert not out.exists() and not temporaries(out)
    result = run_cli(rtdc_copy, out, "-k", "10")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("rollmed-dask: error:") and "events 120 to 159" in last
    assert "checksum" in last
    assert not out.exists()


def test_truncated_file(rtdc_copy, tmp_path):
    size = rtdc_copy.stat().st_size
    with open(rtdc_copy, "r+b") as f:
        f.truncate(size // 2)
    result = run_cli(rtdc_copy, tmp_path / "bg.rtdc")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "truncated or damaged" in line


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to 'nobody' needs root")
def test_no_write_permission(small_rtdc):
    # pytest's tmp_path lies in a folder only root may enter; nobody needs a way in
    base = Path(tempfile.mkdtemp(prefix="rollmed-perm-"))
    try:
        base.chmod(0o755)
        source = Path(shutil.copy(small_rtdc, base / "input.rtdc"))
        source.chmod(0o644)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        result = subprocess.run(
            [sys.executable, Path(__file__).with_name("cli_as_nobody.py"), source,
             locked / "bg.rtdc", "-k", "5"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line == f"rollmed-dask: error: cannot write into the output folder '{locked}'"
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(base)


@pytest.mark.cluster
@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore::UserWarning:distributed")
def test_blocks_are_planned_to_a_quarter_of_the_smallest_worker(small_rtdc, tmp_path):
    """A worker whose memory limit is exceeded is killed by its nanny: the budget
    (256 MiB a task by default) is lowered to a quarter of a worker's share per
    thread. (A run cannot show it on a test-sized input: its blocks are far below
    either budget, and the worker lived with the lowering removed.)"""
    from rollmed_dask.cluster import close_client, start_local_cluster
    from rollmed_dask.job import fit_budget_to_workers
    from rollmed_dask.scheduling import resolve_scheduler

    client = start_local_cluster(1, threads_per_worker=2, memory_limit="400MiB")
    try:
        resolved = resolve_scheduler(client)
        assert fit_budget_to_workers("256MiB", resolved) == 400 * 2**20 // 2 // 4
        assert fit_budget_to_workers("20MiB", resolved) == 20 * 2**20  # a smaller one is kept
        compute_background(small_rtdc, tmp_path / "bg.zarr", 9, scheduler=client, progress=False)
    finally:
        close_client(client)
    assert fit_budget_to_workers("256MiB", resolve_scheduler("threads")) == 256 * 2**20
    expected = rolling_median_reference(read_images(small_rtdc), 9)
    np.testing.assert_array_equal(read_images(tmp_path / "bg.zarr", "events/image_bg"), expected)


@pytest.fixture
def bad_inputs(tmp_path):
    """Files with each way an input can be wrong, for the API-level matrix."""
    (tmp_path / "text.rtdc").write_text("not hdf5")
    (tmp_path / "exists.rtdc").write_bytes(b"keep me")
    write_bad_stacks(tmp_path / "cases.h5")
    return tmp_path


API_ERRORS = [
    # source, target, keyword arguments, exception, message
    ("nope.rtdc", "out.rtdc", {}, FileNotFoundError, "does not exist"),
    (".", "out.rtdc", {}, ValueError, "not a Zarr store"),
    ("text.rtdc", "out.rtdc", {}, ValueError, "is not an HDF5 file"),
    ("cases.h5", "out.rtdc", {"dataset": "nope"}, KeyError, "events/image"),
    ("cases.h5", "out.rtdc", {"dataset": "flat/image"}, ValueError, "ndim=2"),
    ("cases.h5", "out.rtdc", {"dataset": "deep/image"}, ValueError, "ndim=4"),
    ("cases.h5", "out.rtdc", {"dataset": "empty/image"}, ValueError, "no events"),
    ("cases.h5", "out.rtdc", {"dataset": "bool/image"}, ValueError, "dtype bool"),
    ("cases.h5", "out.rtdc", {"dataset": "complex/image"}, ValueError, "dtype complex64"),
    ("cases.h5", "out.rtdc", {"kernel_size": 0}, ValueError, "at least 1"),
    ("cases.h5", "out.rtdc", {"kernel_size": -2}, ValueError, "at least 1"),
    ("cases.h5", "out.rtdc", {"kernel_size": 2.5}, ValueError, "whole number"),
    ("cases.h5", "out.rtdc", {"kernel_size": 20}, ValueError, "at most 19"),
    ("cases.h5", "missing/out.rtdc", {"kernel_size": 3}, FileNotFoundError, "output folder"),
    ("cases.h5", "exists.rtdc", {"kernel_size": 3}, FileExistsError, "overwrite=True"),
    ("cases.h5", "cases.h5", {"kernel_size": 3}, ValueError, "in_place=True"),
    (
        "cases.h5",
        "out.rtdc",
        {"kernel_size": 3, "format": "tif"},
        ValueError,
        "format='tif' is not known; pass one of hdf5, zarr, tiff",
    ),
    (
        "cases.h5",
        "out.zarr",
        {"kernel_size": 3, "in_place": True},
        ValueError,
        "in_place works with HDF5 files only",
    ),
    (
        "cases.h5",
        "new.rtdc",
        {"kernel_size": 3, "in_place": True},
        FileNotFoundError,
        "in_place needs an existing HDF5 file",
    ),
    # a wrong option is said before the input is opened, whatever the input
    ("nope.rtdc", "out.rtdc", {"compression": "zstd-99"}, ValueError, "is not known"),
    ("nope.rtdc", "out.rtdc", {"memory_budget": "lots"}, ValueError, "is not a size"),
]


@pytest.mark.parametrize(("source", "target", "kwargs", "error", "message"), API_ERRORS)
def test_api_bad_input_matrix(source, target, kwargs, error, message, bad_inputs):
    before = {p.name: p.stat().st_mtime_ns for p in bad_inputs.iterdir()}
    kwargs = {"kernel_size": 5, "progress": False, **kwargs}
    with pytest.raises(error, match=message):
        compute_background(bad_inputs / source, bad_inputs / target, **kwargs)
    assert {p.name: p.stat().st_mtime_ns for p in bad_inputs.iterdir()} == before


# --- Targets that are not ours are never replaced (issue 11, item 1) ---


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("rollmed-dask: error: ")
    return line


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_an_ordinary_folder_is_never_replaced(fmt, small_rtdc, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "notes.txt").write_text("the user's own file")
    # the API refuses the folder as a target, with a message that does not
    # lead into deleting it
    with pytest.raises(FileExistsError, match="is a folder that rollmed-dask did not write") as e:
        compute_background(small_rtdc, results, 5, format=fmt, overwrite=True, progress=False)
    assert "overwrite" not in str(e.value)
    assert snapshot(results) == {"notes.txt": b"the user's own file"}
    # the CLI reads an existing folder as the place to write into (README:
    # Folders of measurements): the folder and the user's file stay
    result = run_cli(small_rtdc, results, "-k", "5", "--format", fmt, "--overwrite", "-q")
    assert result.returncode == 0, result.stderr
    out = results / f"small_bg.{'zarr' if fmt == 'zarr' else 'rtdc'}"
    expected = rolling_median_reference(read_images(small_rtdc), 5)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    assert (results / "notes.txt").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_the_folder_that_holds_the_input_is_never_replaced(small_rtdc, tmp_path):
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    raw = Path(shutil.copy(small_rtdc, mydata / "run1.rtdc"))
    before = snapshot(mydata)
    with pytest.raises(ValueError, match="holds the input"):
        compute_background(raw, mydata, 5, overwrite=True, progress=False)
    assert snapshot(mydata) == before
    # the CLI writes beside the input, into the folder, and touches nothing else
    result = run_cli(raw, mydata, "-k", "5", "--overwrite", "-q")
    assert result.returncode == 0, result.stderr
    after = snapshot(mydata)
    assert after.pop("run1_bg.rtdc")
    assert after == before


def test_our_zarr_output_is_replaced_with_overwrite(small_rtdc, tmp_path):
    out = tmp_path / "bg.zarr"
    compute_background(small_rtdc, out, 5, progress=False)
    compute_background(small_rtdc, out, 7, progress=False, overwrite=True)
    expected = rolling_median_reference(read_images(small_rtdc), 7)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.zarr"]


def test_a_symlink_output_is_refused(small_rtdc, tmp_path):
    real = tmp_path / "real.rtdc"
    real.write_bytes(b"the file the link points to")
    link = tmp_path / "link.rtdc"
    link.symlink_to(real)
    line = one_error_line(run_cli(small_rtdc, link, "-k", "5", "--overwrite", "-q"))
    assert "is a symbolic link to" in line and str(real) in line
    assert link.is_symlink() and real.read_bytes() == b"the file the link points to"


def test_a_symlink_to_an_up_to_date_zarr_output_is_refused_on_resume(small_rtdc, tmp_path):
    """A resumable run checks first whether the output is already up to date:
    through a link it would say so of the file the link points to."""
    real = tmp_path / "real.zarr"
    compute_background(small_rtdc, real, 5, progress=False)
    link = tmp_path / "link.zarr"
    link.symlink_to(real)
    with pytest.raises(ValueError, match="is a symbolic link to"):
        compute_background(small_rtdc, link, 5, resume=True, progress=False)
    assert link.is_symlink()


def test_the_cli_names_its_flags_and_the_api_its_keywords(small_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    out.write_bytes(b"keep me")
    line = one_error_line(run_cli(small_rtdc, out, "-k", "5"))
    assert "pass --overwrite to replace it" in line
    assert "overwrite=True" not in line and "CLI:" not in line
    with pytest.raises(FileExistsError, match="pass overwrite=True to replace it") as info:
        compute_background(small_rtdc, out, 5, progress=False)
    assert "CLI" not in str(info.value)
    line = one_error_line(run_cli(small_rtdc, small_rtdc, "-k", "5"))
    assert line.endswith("with --in-place")


# --- In place into another file (item 3), a locked file (item 11), growth (item 13) ---


def test_in_place_into_a_file_with_other_events_is_refused(small_rtdc, tmp_path):
    other = write_example(tmp_path / "other.rtdc", n_events=500, seed=2)
    before = other.read_bytes()
    line = one_error_line(run_cli(small_rtdc, other, "--in-place", "-k", "5", "-q"))
    assert "holds 500 events" in line and "has 300" in line
    assert other.read_bytes() == before


@contextlib.contextmanager
def open_for_writing_elsewhere(path):
    """Another process holds ``path`` open for writing (HDF5 locks it) while the block runs."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, h5py; f = h5py.File(sys.argv[1], 'a'); print('open', flush=True); "
         "sys.stdin.read()", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "open"
        yield
    finally:
        holder.communicate("", timeout=30)


def test_in_place_on_a_file_open_for_writing_elsewhere_says_it_is_locked(rtdc_copy):
    with open_for_writing_elsewhere(rtdc_copy):
        line = one_error_line(run_cli(rtdc_copy, rtdc_copy, "--in-place", "-k", "5", "-q"))
    assert "is locked by another program" in line
    assert "damaged" not in line


def test_in_place_overwrite_does_not_grow_the_file(rtdc_copy):
    sizes = []
    for _ in range(3):
        result = run_cli(rtdc_copy, rtdc_copy, "--in-place", "--overwrite", "-k", "5", "-q")
        assert result.returncode == 0, result.stderr
        sizes.append(rtdc_copy.stat().st_size)
    with h5py.File(rtdc_copy) as h5:
        bg_bytes = h5["events/image_bg"].id.get_storage_size()
        logs = [name for name in h5["logs"] if name.startswith("rollmed-dask-job")]
    # each run adds its log entry (a few KiB), not another copy of the dataset
    assert sizes[2] - sizes[1] < bg_bytes / 10, (sizes, bg_bytes)
    assert len(logs) == 3
    expected = rolling_median_reference(read_images(rtdc_copy), 5)
    np.testing.assert_array_equal(read_images(rtdc_copy, "events/image_bg"), expected)


# --- A full disk (item 4), on a real 16 MiB tmpfs ---


@contextlib.contextmanager
def mounted_tmpfs(disk: Path, size: str):
    """A real tmpfs of ``size`` (``16m``) mounted on the new folder ``disk`` for
    the ``with`` block; CI must be able to mount one (it runs as root)."""
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", disk],
        capture_output=True, text=True,
    )  # fmt: skip
    if mount.returncode != 0:
        if _in_ci():
            pytest.fail(f"CI must be able to mount a small tmpfs (as root): {mount.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", disk], check=True)


@pytest.fixture
def small_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "16m") as disk:
        yield disk


def fill_disk(disk: Path, leave: int) -> None:
    """Leave only ``leave`` bytes free on ``disk``."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(bytes(free - leave))


@pytest.mark.parametrize("suffix", [".rtdc", ".zarr"])
def test_a_full_disk_is_one_line_and_leaves_nothing(suffix, small_rtdc, small_disk):
    fill_disk(small_disk, 300_000)
    line = one_error_line(run_cli(small_rtdc, small_disk / f"bg{suffix}", "-k", "10", "-q"))
    assert "[Errno 28] the disk is full" in line and str(small_disk) in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("spare", [-1_000_000, 100_000], ids=["no-room-to-copy", "full-midway"])
def test_a_full_disk_in_place_leaves_the_raw_file_as_it_was(spare, small_rtdc, small_disk):
    raw = Path(shutil.copy(small_rtdc, small_disk / "raw.rtdc"))
    before = raw.read_bytes()
    fill_disk(small_disk, len(before) + spare)
    line = one_error_line(run_cli(raw, raw, "--in-place", "-k", "10", "-q"))
    assert "the disk is full" in line
    assert raw.read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "raw.rtdc"]


# --- Resume, interrupts (items 5 and 11) ---


def test_resume_of_a_complete_output_has_nothing_to_do(small_rtdc, tmp_path):
    out = tmp_path / "bg.zarr"
    assert run_cli(small_rtdc, out, "-k", "5", "--resume").returncode == 0
    before = snapshot(out)
    result = run_cli(small_rtdc, out, "-k", "5", "--resume")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"nothing to do: {out}")
    assert snapshot(out) == before
    # another job on the same output is not "nothing to do"
    line = one_error_line(run_cli(small_rtdc, out, "-k", "7", "--resume", "-q"))
    assert "was made with -k 5, this run has 7; pass --overwrite" in line


@pytest.mark.timeout(300)
def test_ctrl_c_with_resume_says_the_partial_was_kept(long_rtdc, tmp_path):
    out = tmp_path / "bg.zarr"
    proc = start_cli(long_rtdc, out, *SLOW, "--resume")
    wait_until_running(proc, out)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert f"partial output {partial_path(out)} is kept" in last
    assert "run the same command again, with --resume, to continue" in last
    assert partial_path(out).is_dir()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("attempt", [1, 2])
def test_two_quick_ctrl_c_end_with_130_and_leave_nothing(attempt, long_rtdc, tmp_path):
    out = tmp_path / "bg.zarr"
    proc = start_cli(long_rtdc, out, "-k", "20", "--engine", "scipy", "--event-chunk", "40")
    wait_until_running(proc, out)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05 * attempt)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Errno" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_a_partial_without_array_metadata_says_what_to_do(small_rtdc, tmp_path):
    out = tmp_path / "bg.zarr"
    env = {**os.environ, "ROLLMED_DASK_TEST_KILL_AT": "zarr-marker"}
    killed = subprocess.run(
        [sys.executable, "-m", "rollmed_dask", small_rtdc, out, "-k", "5", "--resume", "-q"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    (partial_path(out) / "events" / "image_bg" / "zarr.json").unlink()
    line = one_error_line(run_cli(small_rtdc, out, "-k", "5", "--resume", "-q"))
    assert "lacks the metadata" in line and "rerun without --resume to start over" in line
    assert run_cli(small_rtdc, out, "-k", "5", "-q").returncode == 0
    expected = rolling_median_reference(read_images(small_rtdc), 5)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)


def test_events_per_second_counts_only_computed_events(small_rtdc, tmp_path):
    out = tmp_path / "bg.zarr"
    env = {**os.environ, "ROLLMED_DASK_TEST_KILL_AT": "zarr-marker"}
    subprocess.run(
        [sys.executable, "-m", "rollmed_dask", small_rtdc, out, "-k", "5", "--resume", "-q",
         "--event-chunk", "40", "--scheduler", "synchronous"],
        env=env, capture_output=True, timeout=120,
    )  # fmt: skip
    summary = compute_background(
        small_rtdc, out, 5, resume=True, event_chunk=40, scheduler="synchronous", progress=False
    )
    assert summary.blocks_resumed == 1 and 0 < summary.events_resumed < 300
    assert summary.events_per_second == (300 - summary.events_resumed) / summary.seconds


def test_a_failed_run_never_removes_a_later_runs_resumable_partial(tmp_path):
    # The cleanup that a failed run leaves for the interpreter's exit names
    # only its own temporary, never the resumable partial of another run.
    script = Path(__file__).with_name("crash_helper_atexit.py")
    out = tmp_path / "bg.zarr"
    result = subprocess.run(
        [sys.executable, script, out], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert partial_path(out).is_dir(), "the resumable partial was removed at exit"
