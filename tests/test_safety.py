"""Never lose data: interrupts for real, damaged and truncated inputs, permissions,
and workers with little memory.

The interrupt tests start the CLI as a subprocess on a job that takes tens of
seconds (the scipy engine on small blocks), send SIGINT or SIGKILL while it
runs, and check what is on disk afterwards.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import flip_bytes_in_chunk, read_images, write_bad_stacks

from rollmed_dask import compute_background, rolling_median_reference
from rollmed_dask.example import write_example
from rollmed_dask.sinks import partial_path

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
    tmp = partial_path(out)
    deadline = time.monotonic() + seconds
    while not tmp.exists():
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
    assert not partial_path(out).exists(), "the rerun replaced the stale temporary"


@pytest.mark.timeout(300)
def test_sigkill_then_resume_computes_only_what_is_missing(long_rtdc, tmp_path):
    out = tmp_path / "bg.zarr"
    proc = start_cli(long_rtdc, out, *SLOW, "--resume")
    wait_until_running(proc, out)
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
    assert not out.exists() and not partial_path(out).exists()
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
def test_worker_with_little_memory_is_not_killed(example_dir, tmp_path):
    from rollmed_dask.cluster import close_client, start_local_cluster

    source = write_example(example_dir / "for-memory.rtdc", n_events=2000, seed=4)
    client = start_local_cluster(1, memory_limit="400MiB")
    try:
        pid = client.run(os.getpid)
        # the default budget (256 MiB a task) would not fit; it is lowered to fit
        compute_background(source, tmp_path / "bg.zarr", 100, scheduler=client, progress=False)
        assert client.run(os.getpid) == pid, "the worker was never restarted"
    finally:
        close_client(client)
    expected = rolling_median_reference(read_images(source), 100)
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
]


@pytest.mark.parametrize(("source", "target", "kwargs", "error", "message"), API_ERRORS)
def test_api_bad_input_matrix(source, target, kwargs, error, message, bad_inputs):
    before = {p.name: p.stat().st_mtime_ns for p in bad_inputs.iterdir()}
    kwargs = {"kernel_size": 5, "progress": False, **kwargs}
    with pytest.raises(error, match=message):
        compute_background(bad_inputs / source, bad_inputs / target, **kwargs)
    assert {p.name: p.stat().st_mtime_ns for p in bad_inputs.iterdir()} == before
