"""Crash windows and concurrency: SIGKILL at named points of the final move, the
in-place install and the Zarr marker write; two runs on one target; two clients
on one distributed scheduler, one of them killed.

The kills use the test hook ``ROLLMED_DASK_TEST_KILL_AT=<point>`` (see
``rollmed_dask.sinks.crash_point``): the process SIGKILLs itself there, so each
window is hit every time, not by timing luck. After each kill, the old output
(or the raw input) must be intact bit for bit, and a rerun must be exact.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import read_images
from test_safety import SLOW, one_error_line, run_cli, snapshot, start_cli

from rollmed_dask import compute_background, rolling_median_reference
from rollmed_dask.example import write_example
from rollmed_dask.sinks import (
    PROGRESS_DIR,
    TargetLock,
    _zarr_write_block,
    backup_path,
    partial_path,
    temporaries,
)


@pytest.fixture(scope="module")
def long_rtdc(example_dir):
    """3000 events: about a minute with the scipy engine on 40-event blocks."""
    return write_example(example_dir / "long-crash.rtdc", n_events=3000, seed=3)


def run_killed_at(point, *args):
    env = {**os.environ, "ROLLMED_DASK_TEST_KILL_AT": point}
    result = subprocess.run(
        [sys.executable, "-m", "rollmed_dask", *map(str, args), "-q"],
        env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == -signal.SIGKILL, f"not killed at {point}: {result.stderr}"


def expected_bg(source, k):
    return rolling_median_reference(read_images(source), k)


@pytest.mark.parametrize("point", ["move-parked", "move-installed"])
def test_kill_during_the_folder_swap_loses_nothing(point, small_rtdc, tmp_path):
    out = tmp_path / "bg.zarr"
    compute_background(small_rtdc, out, 5, progress=False)
    old = snapshot(out)
    run_killed_at(point, small_rtdc, out, "-k", "7", "--overwrite")
    assert backup_path(out).is_dir()
    # the next run first puts a stranded old output back (or drops the old copy
    # that a complete new one replaced), then refuses: no --overwrite
    result = run_cli(small_rtdc, out, "-k", "7")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert "already exists" in lines[-1]
    assert not backup_path(out).exists()
    if point == "move-parked":
        assert lines[0] == (
            f"rollmed-dask: restored '{out}' from .bg.zarr.old, left by a run that was "
            f"killed while replacing it"
        )
        assert snapshot(out) == old
    else:
        assert len(lines) == 1
        np.testing.assert_array_equal(
            read_images(out, "events/image_bg"), expected_bg(small_rtdc, 7)
        )
    assert run_cli(small_rtdc, out, "-k", "7", "--overwrite", "-q").returncode == 0
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected_bg(small_rtdc, 7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.zarr"]


def test_kill_before_the_file_rename_keeps_the_old_file(small_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    out.write_bytes(b"the old output")
    run_killed_at("move-file", small_rtdc, out, "-k", "7", "--overwrite")
    assert out.read_bytes() == b"the old output"
    assert run_cli(small_rtdc, out, "-k", "7", "--overwrite", "-q").returncode == 0
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected_bg(small_rtdc, 7))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.rtdc"]


@pytest.mark.parametrize("point", ["inplace-copied", "inplace-written", "inplace-replaced"])
def test_kill_during_the_in_place_install(point, small_rtdc, tmp_path):
    raw = Path(shutil.copy(small_rtdc, tmp_path / "raw.rtdc"))
    before = raw.read_bytes()
    run_killed_at(point, raw, raw, "--in-place", "-k", "7")
    if point == "inplace-replaced":  # the new file is complete and in place
        np.testing.assert_array_equal(read_images(raw, "events/image_bg"), expected_bg(raw, 7))
    else:
        assert raw.read_bytes() == before
    result = run_cli(raw, raw, "--in-place", "--overwrite", "-k", "7", "-q")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(read_images(raw, "events/image_bg"), expected_bg(raw, 7))
    with h5py.File(small_rtdc) as old, h5py.File(raw) as new:
        assert sorted(new["events"]) == sorted([*old["events"], "image_bg"])
        # only dcnum's pipeline ids are added (README: From dcnum and ChipStream)
        added = {key: new.attrs[key] for key in set(new.attrs) - set(old.attrs)}
        assert added == {
            "pipeline:dcnum background": "rollmed:k=7^b=10000",
            "pipeline:dcnum data": "hdf:p=0.34^i=0",
            "pipeline:dcnum generation": "13",
        }
        assert {key: new.attrs[key] for key in old.attrs} == dict(old.attrs)
        for name in old["events"]:
            np.testing.assert_array_equal(new["events"][name][:], old["events"][name][:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.rtdc"]


@pytest.mark.parametrize("point", ["zarr-data", "zarr-marker"])
def test_kill_around_the_zarr_marker_then_resume_is_exact(point, small_rtdc, tmp_path):
    out = tmp_path / "bg.zarr"
    run_killed_at(point, small_rtdc, out, "-k", "5", "--event-chunk", "40", "--resume")
    markers = [p.name for p in (partial_path(out) / PROGRESS_DIR).iterdir() if p.name.isdigit()]
    assert len(markers) == (0 if point == "zarr-data" else 1)
    result = run_cli(small_rtdc, out, "-k", "5", "--event-chunk", "40", "--resume")
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected_bg(small_rtdc, 5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.zarr"]


def test_a_block_whose_data_fails_to_write_leaves_no_marker(tmp_path):
    # resume trusts markers: one written before the block's data would make a
    # resumed run skip a block that was never stored
    import zarr

    store = tmp_path / "store.zarr"
    root = zarr.open_group(store=str(store), mode="w")
    root.create_array("events/image_bg", shape=(20, 4, 4), dtype="uint8", chunks=(10, 4, 4))
    (store / PROGRESS_DIR).mkdir()
    wrong = np.full((10, 4, 4), "x")  # text: cannot be stored as uint8
    with pytest.raises(ValueError, match="invalid literal"):
        _zarr_write_block(str(store), "events/image_bg", wrong, 10)
    assert list((store / PROGRESS_DIR).iterdir()) == []
    _zarr_write_block(str(store), "events/image_bg", np.ones((10, 4, 4), np.uint8), 10)
    assert [p.name for p in (store / PROGRESS_DIR).iterdir()] == ["10"]


# --- Two runs on one target ---


def test_a_second_run_on_a_locked_target_is_refused(small_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    with TargetLock(out):
        line = one_error_line(run_cli(small_rtdc, out, "-k", "5", "--overwrite"))
        assert f"another rollmed-dask run (pid {os.getpid()}" in line
        assert f"is writing '{out}'" in line
    assert not out.exists()
    assert run_cli(small_rtdc, out, "-k", "5", "-q").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.rtdc"]


@pytest.mark.timeout(300)
def test_two_runs_on_one_target_one_killed(long_rtdc, small_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    first = start_cli(long_rtdc, out, *SLOW, "--overwrite")
    deadline = time.monotonic() + 60
    while not temporaries(out):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.1)
    line = one_error_line(run_cli(small_rtdc, out, "-k", "5", "--overwrite"))
    assert f"another rollmed-dask run (pid {first.pid}" in line
    first.kill()
    first.communicate(timeout=30)
    assert not out.exists()
    # the killed run's lock is released by the kernel; its temporary is stale
    assert run_cli(small_rtdc, out, "-k", "5", "-q").returncode == 0
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected_bg(small_rtdc, 5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.rtdc"]


def test_stale_temporaries_are_removed_and_no_other(small_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    stale = tmp_path / ".bg.rtdc.999999-deadbeef.partial"
    stale.write_bytes(b"left by a killed run")
    other = tmp_path / ".bg.rtdc.x.999999-deadbeef.partial"  # bg.rtdc.x's temporary
    other.write_bytes(b"another target's")
    assert run_cli(small_rtdc, out, "-k", "5", "-q").returncode == 0
    assert not stale.exists() and other.read_bytes() == b"another target's"


# --- Two clients on one distributed scheduler, one killed ---


@pytest.mark.cluster
@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore::UserWarning:distributed")
def test_two_clients_on_one_scheduler_one_killed(example_dir, tmp_path):
    from rollmed_dask.cluster import close_client, start_local_cluster

    other = write_example(example_dir / "other-client.rtdc", n_events=600, seed=5)
    killed_input = write_example(example_dir / "killed-client.rtdc", n_events=1200, seed=6)
    client = start_local_cluster(2)
    try:
        address = client.scheduler.address
        out_a, out_b = tmp_path / "a.rtdc", tmp_path / "b.zarr"
        killed = start_cli(killed_input, out_a, *SLOW, "--scheduler", address)
        deadline = time.monotonic() + 60
        while not temporaries(out_a):
            assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()
            time.sleep(0.1)
        survivor = start_cli(other, out_b, "-k", "9", "--scheduler", address, "-q")
        time.sleep(2)
        killed.kill()
        killed.communicate(timeout=30)
        _, stderr = survivor.communicate(timeout=240)
        assert survivor.returncode == 0, stderr
        np.testing.assert_array_equal(read_images(out_b, "events/image_bg"), expected_bg(other, 9))
        assert not out_a.exists()
        rerun = run_cli(killed_input, out_a, "-k", "20", "--scheduler", address, "-q")
        assert rerun.returncode == 0, rerun.stderr
        expected = expected_bg(killed_input, 20)
        np.testing.assert_array_equal(read_images(out_a, "events/image_bg"), expected)
    finally:
        close_client(client)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.rtdc", "b.zarr"]
