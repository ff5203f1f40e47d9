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
from test_safety import one_error_line, run_cli, snapshot

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
