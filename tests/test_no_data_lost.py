"""Data lost or hidden in other ways (issue 20): another program writing an
in-place target during the run, ``--report`` over a file that is not a report,
a Zarr resume killed before its final rename, the folder swap under signals and
without permission to remove the old output, and the small mistakes found with
them (a trailing slash, ``--resume`` with HDF5, empty folders and frames, a
locked input, two folder runs at once).

Windows that are too short to hit by timing use the test hooks of
``rollmed_dask.sinks``: ``ROLLMED_DASK_TEST_KILL_AT`` and
``ROLLMED_DASK_TEST_PAUSE_AT`` (the process waits at the named point until the
test lets it go on).
"""

import os
import re
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
from test_crash_safety import run_killed_at
from test_safety import (
    mounted_tmpfs,
    one_error_line,
    open_for_writing_elsewhere,
    run_cli,
    snapshot,
)

from rollmed_dask import compute_background, rolling_median_reference
from rollmed_dask.sinks import backup_path, partial_path


def expected_bg(source, k):
    return rolling_median_reference(read_images(source), k)


def start_paused_at(point, hook: Path, *args):
    """The CLI, stopped at ``point`` until :func:`go` (see ``sinks.pause_point``)."""
    hook.mkdir(exist_ok=True)
    env = {**os.environ, "ROLLMED_DASK_TEST_PAUSE_AT": f"{point}:{hook}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollmed_dask", *map(str, args)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not (hook / f"{point}.here").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"never reached {point}"
        time.sleep(0.05)
    return proc


def go(proc, point, hook: Path):
    (hook / f"{point}.go").touch()
    stdout, stderr = proc.communicate(timeout=180)
    return proc.returncode, stderr


# --- in place: another program writes the file during the run ---


def test_in_place_keeps_what_another_program_wrote_during_the_run(small_rtdc, tmp_path):
    raw = Path(shutil.copy(small_rtdc, tmp_path / "raw.rtdc"))
    hook = tmp_path / "hook"
    proc = start_paused_at("inplace-written", hook, raw, raw, "--in-place", "-k", "7", "-q")
    # a real second process, as dclab or a user's script would be
    code = f"import h5py\nwith h5py.File({str(raw)!r}, 'a') as h5: h5.attrs['note'] = 'theirs'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    after_them = raw.read_bytes()
    status, stderr = go(proc, "inplace-written", hook)
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert lines == [
        f"rollmed-dask: error: '{raw}' was changed by another program during the run; the "
        f"background was not added and the file is as that program left it: run again when "
        f"nothing else writes to it"
    ]
    assert raw.read_bytes() == after_them
    with h5py.File(raw) as h5:
        assert h5.attrs["note"] == "theirs" and "image_bg" not in h5["events"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hook", "raw.rtdc"]


# --- small mistakes that did nothing, or the wrong thing, without a word ---


def test_a_trailing_slash_makes_the_output_a_folder(small_rtdc, tmp_path):
    new = tmp_path / "newdir"
    result = run_cli(small_rtdc, f"{new}/", "-k", "7", "-q")
    assert result.returncode == 0, result.stderr
    assert new.is_dir() and [p.name for p in new.iterdir()] == [f"{small_rtdc.stem}_bg.rtdc"]
    out = new / f"{small_rtdc.stem}_bg.rtdc"
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected_bg(small_rtdc, 7))


@pytest.mark.parametrize("form", ["file", "folder"])
def test_resume_with_an_hdf5_output_is_refused(form, small_rtdc, tmp_path):
    if form == "file":
        args = [small_rtdc, tmp_path / "bg.rtdc"]
    else:
        (tmp_path / "raw").mkdir()
        shutil.copy(small_rtdc, tmp_path / "raw" / "a.rtdc")
        args = ["-r", tmp_path / "raw", tmp_path / "bg"]
    before = snapshot(tmp_path)
    line = one_error_line(run_cli(*args, "-k", "7", "--resume", "-q"))
    assert line == (
        "rollmed-dask: error: resume works with Zarr output only (an .rtdc/HDF5 output is "
        "always written whole); drop --resume, or write a .zarr output"
    )
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == sorted(
        [] if form == "file" else ["raw"]
    )


def test_an_input_open_for_writing_elsewhere_says_it_is_locked(rtdc_copy, tmp_path):
    with open_for_writing_elsewhere(rtdc_copy):
        line = one_error_line(run_cli(rtdc_copy, tmp_path / "new_bg.rtdc", "-k", "5", "-q"))
    assert line == (
        f"rollmed-dask: error: input '{rtdc_copy}' is locked by another program that has "
        f"it open for writing (HDF5 file locking); close it there and run again"
    )


@pytest.mark.parametrize("kind", ["numpy", "dask", "file"])
def test_frames_without_pixels_are_one_clear_error(kind, tmp_path):
    import dask.array as da

    from rollmed_dask import rolling_median

    images = np.zeros((50, 0, 320), np.uint8)
    if kind == "dask":
        images = da.from_array(images, chunks=(10, 0, 320))
    elif kind == "file":
        with h5py.File(tmp_path / "empty.rtdc", "w") as h5:
            h5["events/image"] = images
        images = tmp_path / "empty.rtdc"
    with pytest.raises(ValueError, match=r"has shape \(50, 0, 320\): its frames have no pixels"):
        rolling_median(images, 3)
    with pytest.raises(ValueError, match=r"has shape \(50, 0, 320\): its frames have no pixels"):
        compute_background(images, tmp_path / "bg.rtdc", 3, progress=False)
    assert not (tmp_path / "bg.rtdc").exists()


def test_a_stack_of_one_event_is_told_it_needs_two(tmp_path):
    from rollmed_dask import rolling_median

    with pytest.raises(ValueError) as info:
        rolling_median(np.zeros((1, 4, 4), np.uint8), 1)
    assert str(info.value) == (
        "the image stack has 1 event (N=1); a rolling median needs at least 2 events: "
        "check the input dataset"
    )


def test_an_empty_folder_is_an_error_even_when_quiet(tmp_path):
    (tmp_path / "raw").mkdir()
    line = one_error_line(run_cli("-r", "-q", tmp_path / "raw", tmp_path / "bg"))
    assert line == (
        f"rollmed-dask: error: no .rtdc files found below '{tmp_path / 'raw'}': check the folder"
    )
    assert sorted(os.listdir(tmp_path)) == ["raw"]


def test_in_place_with_an_output_folder_is_refused(small_rtdc, tmp_path):
    raw, bg = tmp_path / "raw", tmp_path / "bg"
    raw.mkdir()
    shutil.copy(small_rtdc, raw / "a.rtdc")
    assert run_cli("-r", raw, bg, "-k", "7", "-q").returncode == 0
    before = snapshot(tmp_path)
    line = one_error_line(run_cli("-r", "--in-place", raw, bg, "-k", "7", "-q"))
    assert line == (
        f"rollmed-dask: error: '{bg}' holds only outputs of rollmed-dask, no measurement; "
        f"give the folders of the measurements (with --in-place every path is an input, "
        f"there is no OUTPUT)"
    )
    assert snapshot(tmp_path) == before


# --- a Zarr --resume run killed just before its final rename ---


def test_a_resume_killed_before_the_final_move_is_completed_by_the_next(small_rtdc, tmp_path):
    out = tmp_path / "bg.zarr"
    args = [small_rtdc, out, "-k", "5", "--event-chunk", "40", "--resume"]
    run_killed_at("move-file", *args)  # the new target: one rename
    assert partial_path(out).is_dir() and not out.exists()
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "(8 blocks, 8 resumed" in result.stderr.strip().splitlines()[-1]
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected_bg(small_rtdc, 5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.zarr"]


def test_a_complete_partial_of_other_data_is_not_moved_into_place(small_rtdc, tmp_path):
    """Killed before its move, then the input was replaced by other frames of the
    same shape: the next --resume refuses the complete partial instead of moving
    a background of the old data into place."""
    from rollmed_dask.example import write_example

    source = Path(shutil.copy(small_rtdc, tmp_path / "input.rtdc"))
    out = tmp_path / "bg.zarr"
    args = [source, out, "-k", "5", "--event-chunk", "40", "--resume"]
    run_killed_at("move-file", *args)
    write_example(tmp_path / "other.rtdc", n_events=300, seed=2)
    os.replace(tmp_path / "other.rtdc", source)
    line = one_error_line(run_cli(*args, "-q"))
    # which words name the change depends on whether the input's stat was recorded:
    # only if it was quiet for a second when the killed run began (identity.QUIET_NS)
    assert re.search(
        r"was made from other data \(the input (has other frames now|is not the file "
        r"'[^']*input.rtdc' it was made from, and holds other frames)\); rerun without --resume",
        line,
    ), line
    assert not out.exists() and partial_path(out).is_dir()


# --- the folder swap: never split by a signal, never half done ---


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_folder_swap_waits_for_its_end(sig, small_rtdc, tmp_path):
    out = tmp_path / "bg.zarr"
    compute_background(small_rtdc, out, 5, progress=False)
    hook = tmp_path / "hook"
    proc = start_paused_at("move-parked", hook, small_rtdc, out, "-k", "7", "--overwrite", "-q")
    proc.send_signal(sig)  # between the two renames: the old output is parked
    time.sleep(0.5)
    status, stderr = go(proc, "move-parked", hook)
    assert status == 128 + sig, stderr
    assert "Traceback" not in stderr
    # the interrupt landed after the whole swap: the new output, complete, in place
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected_bg(small_rtdc, 7))
    assert not backup_path(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.zarr", "hook"]


def test_overwrite_of_an_output_this_user_may_not_remove_changes_nothing(small_rtdc):
    # pytest's tmp_path lies in a folder only root may enter; nobody needs a way in
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="rollmed-shared-"))
    try:
        base.chmod(0o777)  # a shared folder everyone may write into
        source = Path(shutil.copy(small_rtdc, base / "input.rtdc"))
        source.chmod(0o644)
        out = base / "bg.zarr"
        compute_background(source, out, 5, progress=False)  # root's output
        before = snapshot(out)
        result = subprocess.run(
            [sys.executable, Path(__file__).with_name("cli_as_nobody.py"), source, out,
             "-k", "7", "--overwrite", "-q"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
            env={**os.environ, "ROLLMED_AS_NOBODY_WARM": "1"},  # a job that runs can finish
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line == (
            f"rollmed-dask: error: cannot replace '{out}': this user may not remove "
            f"'{out}' of the old output (owner uid 0); nothing was changed: ask its owner "
            f"to remove it, or write to another path"
        )
        assert snapshot(out) == before
        assert sorted(p.name for p in base.iterdir()) == ["bg.zarr", "input.rtdc"]
    finally:
        shutil.rmtree(base)


# --- --report FILE never replaces an input, nor a file that is not a report ---


def test_report_never_replaces_an_input_nor_another_file(small_rtdc, tmp_path):
    import json

    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(small_rtdc, raw / "a.rtdc")
    before = snapshot(tmp_path)
    for report in (raw / "a.rtdc", raw):
        line = one_error_line(run_cli("-r", raw, tmp_path / "bg", "--report", report, "-q"))
        assert "--report" in line and str(report) in line
    line = one_error_line(
        run_cli("-r", raw, tmp_path / "bg", "--report", raw / "a.rtdc", "--overwrite", "-q")
    )
    assert line == f"rollmed-dask: error: --report '{raw / 'a.rtdc'}' is an input of this run; " \
        "give another file name"  # fmt: skip
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    line = one_error_line(run_cli("-r", raw, tmp_path / "bg", "-k", "7", "--report", notes))
    assert line == (
        f"rollmed-dask: error: --report '{notes}' exists and is not a report of rollmed-dask; "
        f"give another file name, or pass --overwrite to replace it"
    )
    assert snapshot(tmp_path) == {**before, "notes.txt": b"my notes"}
    # a report of ours is replaced; with --overwrite, any file that is not an input
    for args in (["--overwrite"], []):
        result = run_cli("-r", raw, tmp_path / "bg", "-k", "7", "--report", notes, "-q", *args)
        assert result.returncode == 0, result.stderr
        assert json.loads(notes.read_text())["totals"]["done" if args else "skipped"] == 1
    assert sorted(os.listdir(tmp_path)) == ["bg", "notes.txt", "raw"]


# --- two folder runs at once over one folder ---


def test_two_folder_runs_at_once_skip_each_others_files(small_rtdc, tmp_path):
    raw, bg = tmp_path / "raw", tmp_path / "bg"
    raw.mkdir()
    for name in "abcd":
        shutil.copy(small_rtdc, raw / f"{name}.rtdc")
    hook = tmp_path / "hook"
    # run A holds its first files just before their final rename (their targets locked)
    first = start_paused_at("move-file", hook, "-r", raw, bg, "-k", "7")
    second = run_cli("-r", raw, bg, "-k", "7")
    assert second.returncode == 0, second.stderr
    assert "another run is writing it" in second.stderr
    status, stderr = go(first, "move-file", hook)
    assert status == 0, stderr
    for result in (second.stderr, stderr):
        assert "failed" not in result.replace("failed       0 files", "")
        assert "overwrite=True" not in result
    assert "up to date" in stderr  # what B finished meanwhile, A skips
    want = expected_bg(small_rtdc, 7)
    for name in "abcd":
        np.testing.assert_array_equal(read_images(bg / f"{name}_bg.rtdc", "events/image_bg"), want)
    assert sorted(os.listdir(bg)) == [f"{name}_bg.rtdc" for name in "abcd"]


# --- Zarr on a full disk: one line, at every size ---


@pytest.fixture(scope="module")
def medium_rtdc(example_dir):
    from rollmed_dask.example import write_example

    return write_example(example_dir / "medium-full-disk.rtdc", n_events=3000, seed=4)


@pytest.fixture
def tmpfs(request, tmp_path):
    with mounted_tmpfs(tmp_path / "disk", request.param) as disk:
        yield disk


@pytest.mark.parametrize(
    "scheduler, tmpfs",
    [("threads", "2m"), ("threads", "5m"), ("processes", "2m")],
    indirect=["tmpfs"],
)
def test_zarr_on_a_full_disk_is_exactly_one_line(scheduler, tmpfs, medium_rtdc):
    result = run_cli(medium_rtdc, tmpfs / "bg.zarr", "-k", "10", "-q", "--scheduler", scheduler)
    line = one_error_line(result)  # nothing of zarr's event loop after it
    assert "[Errno 28] the disk is full" in line
    assert os.listdir(tmpfs) == []


# --- the memory-budget minimum: what a block really needs ---


def test_the_budget_minimum_counts_at_most_the_whole_stack():
    from rollmed_dask.pipeline import plan_chunks

    # K = 19999 on 20,000 frames of 80 x 320 uint8: one block, the whole stack,
    # 512 MB. Measured peak RSS of that run: 1.22 GB (check_budget_holds_a_row);
    # the old minimum counted 1 + 2K = 39999 frames and asked for 3907 MiB.
    shape = (20000, 80, 320)
    chunks = plan_chunks(shape, np.uint8, 19999, (40, 80, 320), memory_budget="1954MiB")
    assert chunks[0] == (20000,)
    with pytest.raises(ValueError) as info:
        plan_chunks(shape, np.uint8, 19999, (40, 80, 320), memory_budget="1953MiB")
    assert "with K=19999 that is the whole stack, N = 20000 events" in str(info.value)
    assert "at least 1954MiB" in str(info.value)
