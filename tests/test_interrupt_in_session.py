"""Ctrl-C in a long-lived process (a notebook): nothing is left once the
interrupt is back, not only once the process exits.

A block that was still running when the run stopped went on writing into the
Zarr temporary after the job had removed it; in a notebook that temporary
stayed on disk until the kernel ended (3 of 4 tries on a user's SLURMCluster).
The job now waits until no block runs before it removes the temporary: on the
threads scheduler (its own pool) and on a distributed Client (the workers are
asked). ``tests/interrupted_in_session.py`` holds one block at the point where
it would write, presses Ctrl-C, lets the block go on 1 s later, and lists the
output's folder 3 s after the interrupt came back.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("interrupted_in_session.py")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("route", ["threads", pytest.param("cluster", marks=pytest.mark.cluster)])
def test_ctrl_c_in_a_session_leaves_no_temporary(route, small_rtdc, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    hook = tmp_path / "hook"
    hook.mkdir()
    proc = subprocess.run(
        [sys.executable, SCRIPT, route, small_rtdc, out_dir / "bg.zarr", hook],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (hook / "zarr-opened.go").exists(), "the run was never held at a block's write"
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state == {"outcome": "interrupted", "left": []}, proc.stderr
