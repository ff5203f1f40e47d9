"""A folder run stopped by signals: SIGTERM as Ctrl-C, and Ctrl-C pressed again.

Each case: exit 130 / 143, the report is written, every file on disk is
complete and listed as done (none as "not started"), no temporary or lock is
left, and the last line says what was kept, as the disk shows it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import read_images

from rollmed_dask import rolling_median_reference
from rollmed_dask.example import write_example

K = 10


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    for i in range(4):
        write_example(root / f"s{i:02d}.rtdc", n_events=300, seed=30 + i)
    return root


def _stop(inputs, out, report, sig, presses):
    """A folder run, sent ``sig`` ``presses`` times once its first file is done."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollmed_dask", "-r", inputs, out, "-k", str(K),
         "--scheduler", "threads", "--report", report],
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "done " in line:
            for _ in range(presses):
                proc.send_signal(sig)
                time.sleep(0.05)
            break
    lines += proc.stderr.readlines()
    return proc.wait(timeout=120), "".join(lines)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "sig, presses, status, word",
    # two presses: the second came after the line and ended the process with -2
    [(signal.SIGTERM, 1, 143, "terminated"), (signal.SIGINT, 2, 130, "interrupted")],
)  # fmt: skip
def test_a_stopped_folder_run_says_what_was_kept(
    sig, presses, status, word, inputs, tmp_path
):  # fmt: skip
    out, report = tmp_path / "out", tmp_path / "report.json"
    code, stderr = _stop(inputs, out, report, sig, presses)
    assert code == status, stderr
    assert "Traceback" not in stderr
    finished = sorted(p.name for p in out.glob("*.rtdc"))
    assert 0 < len(finished) < 4, stderr
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary or lock"
    for name in finished:  # complete and exact
        expected = rolling_median_reference(read_images(inputs / name.replace("_bg", "")), K)
        np.testing.assert_array_equal(read_images(out / name, "events/image_bg"), expected)
    results = json.loads(report.read_text())["files"]
    done = sorted(r["output"].rsplit("/", 1)[-1] for r in results if r["status"] == "done")
    assert done == finished, results
    last = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()][-1]
    kept = f"rollmed-dask: {word}; {len(finished)} finished file(s) kept in {out}"
    assert last.startswith(kept), last
    assert "no output was written" not in last
    assert "run the same command again to do them" in last
