"""A folder run stopped by signals: SIGTERM as Ctrl-C, and Ctrl-C pressed again.

Each case: exit 130 / 143, the report is written, every file on disk is
complete and listed as done (none as "not started"), no temporary or lock is
left, and the last line says what was kept, as the disk shows it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
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


def _start_until_first_done(inputs, out, report, *options, env=None):
    """A folder run of the CLI, returned with its stderr lines once the line of its
    first finished file came."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollmed_dask", "-r", inputs, out, "-k", str(K),
         *options, "--report", report],
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "done " in line:
            break
    return proc, lines


def _stop(inputs, out, report, sig, presses):
    """A folder run, sent ``sig`` ``presses`` times once its first file is done."""
    proc, lines = _start_until_first_done(inputs, out, report, "--scheduler", "threads")
    for _ in range(presses):
        proc.send_signal(sig)
        time.sleep(0.05)
    lines += proc.stderr.readlines()
    return proc.wait(timeout=120), "".join(lines)


def _check_what_was_kept(inputs, out, report, stderr, word) -> list[str]:
    """No temporary or lock; each finished file exact and listed as done in the
    report; the last line counts them. Returns the finished files' names."""
    assert "Traceback" not in stderr
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary or lock"
    finished = sorted(p.name for p in out.glob("*.rtdc"))
    for name in finished:  # complete and exact
        expected = rolling_median_reference(read_images(inputs / name.replace("_bg", "")), K)
        np.testing.assert_array_equal(read_images(out / name, "events/image_bg"), expected)
    results = json.loads(report.read_text())["files"]
    done = sorted(r["output"].rsplit("/", 1)[-1] for r in results if r["status"] == "done")
    assert done == finished, results
    last = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()][-1]
    kept = f"rollmed-dask: {word}; {len(finished)} finished file(s) kept in {out}"
    assert last.startswith(kept), last
    return finished


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
    finished = _check_what_was_kept(inputs, out, report, stderr, word)
    assert 0 < len(finished) < 4, stderr
    last = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert "no output was written" not in last
    assert "run the same command again to do them" in last


@pytest.fixture(scope="module")
def longer_inputs(tmp_path_factory):
    """One short file, done first, and longer ones in many blocks: a press right
    after the first file's line finds the others computing, never committing."""
    root = tmp_path_factory.mktemp("longer")
    write_example(root / "a-short.rtdc", n_events=100, seed=40)
    write_example(root / "b0.rtdc", n_events=1500, seed=41)
    for i in (1, 2):
        shutil.copy(root / "b0.rtdc", root / f"b{i}.rtdc")
    return root


@pytest.mark.timeout(240)
def test_ctrl_c_pressed_again_while_files_stop_waits_for_them(longer_inputs, tmp_path):
    """The second and third press land while a file is stopping (held at the test
    hook ``job-aborting``, before its temporary is removed): the run waits for it,
    says so, and then ends as one press would, with nothing left behind."""
    inputs = longer_inputs
    out, report, hook = tmp_path / "out", tmp_path / "report.json", tmp_path / "hook"
    hook.mkdir()
    env = {**os.environ, "ROLLMED_DASK_TEST_PAUSE_AT": f"job-aborting:{hook}"}
    proc, lines = _start_until_first_done(
        inputs, out, report, "--event-chunk", "50", "--scheduler", "threads", env=env
    )
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60
    while not (hook / "job-aborting.here").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.02)
    temporaries = [p.name for p in out.iterdir() if p.name.startswith(".")]
    for _ in range(2):  # the file is stopping: its temporary and lock are still there
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
    (hook / "job-aborting.go").touch()
    lines += proc.stderr.readlines()
    stderr = "".join(lines)
    assert proc.wait(timeout=120) == 130, stderr
    assert temporaries, "no file was stopping when the presses came"
    assert "rollmed-dask: stopping: waiting for" in stderr
    _check_what_was_kept(inputs, out, report, stderr, "interrupted")
    results = json.loads(report.read_text())["files"]
    assert sorted(r["status"] for r in results).count("interrupted") >= 1, results


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_ctrl_c_stops_the_running_files_on_a_cluster_too(longer_inputs, tmp_path):
    """With --workers (a distributed scheduler, which runs no dask callbacks) the
    files running at Ctrl-C stop at their next block too, rather than run on."""
    out, report = tmp_path / "out", tmp_path / "report.json"
    proc, lines = _start_until_first_done(
        longer_inputs, out, report, "--event-chunk", "50", "--workers", "1"
    )
    deadline = time.monotonic() + 60  # a longer file is being written
    while not list(out.glob(".b*.partial")):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    lines += proc.stderr.readlines()
    stderr = "".join(lines)
    assert proc.wait(timeout=120) == 130, stderr
    results = json.loads(report.read_text())["files"]
    assert "interrupted" in [r["status"] for r in results], results
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary or lock"


def _interrupt_after_first_file(monkeypatch, out, error=KeyboardInterrupt):
    """Ctrl-C in the batch's own thread (where Python raises it) right after the
    first finished file's line, once a longer file is being written: its
    temporary is there."""
    from rollmed_dask import batch

    finished = batch._BatchProgress.finished

    def and_then_ctrl_c(self, result):
        finished(self, result)
        # a file counted twice: a wait that never ends (and fills the memory)
        assert self.files_done <= self.n_files, "a finished file is collected again"
        if self.files_done == 1:
            deadline = time.monotonic() + 60
            while not list(out.glob(".b0*.partial")):
                assert time.monotonic() < deadline, "the longer file never started"
                time.sleep(0.01)
            raise error()

    monkeypatch.setattr(batch._BatchProgress, "finished", and_then_ctrl_c)


@pytest.mark.timeout(120)
def test_ctrl_c_in_a_session_stops_the_running_files_and_lists_every_one(
    longer_inputs, tmp_path, monkeypatch, capsys
):
    """In process (a notebook's Ctrl-C): the running file stops at its next task and
    removes its temporary, the queued ones are "not started", the finished one is
    kept; ``BatchInterrupted`` lists them all, and the batch's hooks are gone."""
    from dask.callbacks import Callback

    from rollmed_dask import batch, compute_backgrounds
    from rollmed_dask.scheduling import STOP_CHECKS

    out = tmp_path / "out"
    _interrupt_after_first_file(monkeypatch, out)
    names = ["a-short", "b0", "b1", "b2"]
    callbacks = set(Callback.active)
    with pytest.raises(KeyboardInterrupt) as stopped:
        compute_backgrounds(
            [longer_inputs / f"{n}.rtdc" for n in names], out, K, scheduler="threads",
            num_workers=2, files_at_once=2, event_chunk=50, progress=True,
        )  # fmt: skip
    assert type(stopped.value) is batch.BatchInterrupted
    assert stopped.value.args == ("batch interrupted",)
    assert type(stopped.value.cause) is KeyboardInterrupt
    statuses = [r["status"] for r in stopped.value.results]
    assert statuses == ["done", "interrupted", "not started", "not started"]
    assert [p.name for p in out.iterdir()] == ["a-short_bg.rtdc"]
    expected = rolling_median_reference(read_images(longer_inputs / "a-short.rtdc"), K)
    np.testing.assert_array_equal(
        read_images(out / "a-short_bg.rtdc", "events/image_bg"), expected
    )
    assert not STOP_CHECKS and set(Callback.active) == callbacks
    # the bar is closed (its line ended) while the exception is still held
    err = capsys.readouterr().err
    assert f"interrupted {longer_inputs / 'b0.rtdc'} -> " in err
    last = err.splitlines()[-1].rsplit("\r", 1)[-1]
    assert err.endswith("\n") and last.startswith("files 2/4:") and "/4.60k [" in last, last


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["batch", "stopping file"])
def test_a_bug_while_files_run_or_stop_is_raised_not_taken_for_ctrl_c(
    where, longer_inputs, tmp_path, monkeypatch
):
    """An error that is no signal, in the batch's loop or from a file's thread
    while the batch waits for it to stop, is raised as it is: no
    ``BatchInterrupted`` that would hide it, and no endless wait for that file."""
    from rollmed_dask import batch, compute_backgrounds

    class NoWaitingLine(io.StringIO):
        def write(self, text):  # a wait for a file that failed would never end
            assert "stopping: waiting for" not in text, "waits on for a failed file"
            return super().write(text)

    monkeypatch.setattr(sys, "stderr", NoWaitingLine())
    out = tmp_path / "out"
    if where == "batch":
        _interrupt_after_first_file(monkeypatch, out, error=lambda: RuntimeError("a bug"))
    else:
        _interrupt_after_first_file(monkeypatch, out)
        run_one = batch._run_one

        def failing(job, *args):
            result = run_one(job, *args)
            if job.input.name == "b0.rtdc":
                raise RuntimeError("a bug")
            return result

        monkeypatch.setattr(batch, "_run_one", failing)
    with pytest.raises(RuntimeError, match="a bug"):
        compute_backgrounds(
            [longer_inputs / "a-short.rtdc", longer_inputs / "b0.rtdc"], out, K,
            scheduler="threads", num_workers=2, files_at_once=2, event_chunk=50,
            progress=False,
        )  # fmt: skip
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary or lock"


@pytest.mark.timeout(120)
def test_the_report_of_a_stopped_and_of_a_finished_folder_run_holds_its_time(
    longer_inputs, tmp_path, monkeypatch, capsys
):
    """The command line in process: a Ctrl-C after the first file writes the report
    (its time that of the run) and ends with 130 and the kept line; the rerun
    finishes the rest, and its report holds its own time."""
    from rollmed_dask import cli

    out, report = tmp_path / "out", tmp_path / "report.json"
    argv = [str(longer_inputs / "a-short.rtdc"), str(longer_inputs / "b0.rtdc"), str(out)]
    argv += ["-k", str(K), "--event-chunk", "50", "--scheduler", "threads", "-q"]
    argv += ["--report", str(report)]
    _interrupt_after_first_file(monkeypatch, out)
    for code, statuses in [(130, ["done", "interrupted"]), (0, ["skipped", "done"])]:
        t0 = time.perf_counter()
        assert cli.main(argv) == code
        elapsed = time.perf_counter() - t0
        written = json.loads(report.read_text())
        assert [r["status"] for r in written["files"]] == statuses
        assert 0 < written["totals"]["seconds"] <= elapsed
        monkeypatch.undo()
    assert capsys.readouterr().err.splitlines()[0] == (
        f"rollmed-dask: interrupted; 1 finished file(s) kept in {out}; 1 interrupted or not "
        "started (nothing of them left): run the same command again to do them"
    )
