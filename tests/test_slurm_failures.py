"""Runs that end badly end honestly: signals, lost SLURM jobs, a failing squeue.

Each case runs the CLI as a subprocess, as a batch script would, and checks the
exit status, the one line it prints, the old output byte for byte, that no
temporary is left, and (on SLURM) that no job is left in the queue.

- SIGINT / SIGTERM on the threads and processes schedulers (no SLURM, fast);
- on the local SLURM (``scripts/local-slurm.sh``): SIGINT and SIGTERM of the
  CLI, ``scancel`` of the worker job, a walltime shorter than the run, squeue
  failing, a missing input (no job submitted), and ``jobqueue.yaml`` settings
  reaching the job script.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import flip_bytes_in_chunk, read_images

from rollmed_dask import rolling_median_reference
from rollmed_dask.example import write_example
from rollmed_dask.sinks import partial_path, temporaries

OLD = b"the old output"
# slow enough to interrupt on the local schedulers: scipy on 40-event blocks
SLOW = ["-k", "20", "--engine", "scipy", "--event-chunk", "40"]


@pytest.fixture(scope="module")
def long_rtdc(example_dir):
    """3000 events: tens of seconds with the scipy engine on 40-event blocks."""
    return write_example(example_dir / "long-slurm-failures.rtdc", n_events=3000, seed=4)


def start_cli(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "rollmed_dask", *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def run_cli(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "rollmed_dask", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def wait_for(condition, seconds, proc, what):
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the CLI ended before {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.2)


# ------------------------------------------------------------------ local schedulers


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scheduler", ["threads", "processes"])
@pytest.mark.parametrize(
    "sig, status, word",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["SIGINT", "SIGTERM"],
)
def test_signal_on_a_local_scheduler(scheduler, sig, status, word, long_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    out.write_bytes(OLD)
    proc = start_cli(long_rtdc, out, *SLOW, "--overwrite", "--scheduler", scheduler)
    wait_for(lambda: bool(temporaries(out)), 120, proc, "temporary output")
    time.sleep(1)
    assert proc.poll() is None, "the run must still be going when the signal comes"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status, stderr
    assert "Traceback" not in stderr
    assert last_line(stderr) == f"rollmed-dask: {word}; {out} was left as it was"
    assert out.read_bytes() == OLD
    assert [p.name for p in tmp_path.iterdir()] == [out.name], "no temporary is left"


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_ctrl_c_while_a_sigterm_closes_the_cluster_stays_a_sigterm(long_rtdc, tmp_path):
    """SIGTERM, then Ctrl-C while the cluster it started closes (held there by the
    test hook ``cluster-closing``): the run ends as terminated (143), once, and
    the cluster is closed; the press waited and was not raised over the SIGTERM."""
    out, hook = tmp_path / "bg.rtdc", tmp_path / "hook"
    out.write_bytes(OLD)
    hook.mkdir()
    env = {**os.environ, "ROLLMED_DASK_TEST_PAUSE_AT": f"cluster-closing:{hook}"}
    proc = start_cli(long_rtdc, out, *SLOW, "--overwrite", "--workers", "1", env=env)
    wait_for(lambda: bool(temporaries(out)), 120, proc, "temporary output")
    proc.send_signal(signal.SIGTERM)
    wait_for((hook / "cluster-closing.here").exists, 180, proc, "the cluster's close")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    (hook / "cluster-closing.go").touch()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert last_line(stderr) == f"rollmed-dask: terminated; {out} was left as it was"
    assert out.read_bytes() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.rtdc", "hook"], "no temporary"


@pytest.mark.timeout(300)
def test_sigterm_keeps_a_resumable_zarr_partial(long_rtdc, tmp_path):
    out = tmp_path / "bg.zarr"
    proc = start_cli(long_rtdc, out, *SLOW, "--resume")
    wait_for(partial_path(out).exists, 120, proc, "temporary output")
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert last_line(stderr) == (
        f"rollmed-dask: terminated; the partial output {partial_path(out)} is kept: "
        "run the same command again, with --resume, to continue"
    )
    assert not out.exists() and partial_path(out).exists()
    # that a resumed output is exact is tested in test_safety and below on SLURM
    rerun = run_cli(long_rtdc, out, "-k", "20", "--event-chunk", "40", "--resume")
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming:" in rerun.stderr


@pytest.mark.parametrize("sig, status, word", [("TERM", 143, "terminated")])
def test_a_signal_just_after_the_move_says_the_new_output_is_there(
    sig, status, word, small_rtdc, tmp_path
):
    out = tmp_path / "bg.rtdc"
    out.write_bytes(OLD)
    env = {**os.environ, "ROLLMED_DASK_TEST_SIGNAL_AT": f"moved:{sig}"}
    result = run_cli(small_rtdc, out, "-k", "20", "--overwrite", env=env)
    assert result.returncode == status, result.stderr
    assert last_line(result.stderr) == (
        f"rollmed-dask: {word}; {out} holds the new, complete output (it was moved into place)"
    )
    expected = rolling_median_reference(read_images(small_rtdc), 20)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    assert [p.name for p in tmp_path.iterdir()] == [out.name], "no temporary or lock is left"


def test_workers_beyond_the_machine_are_lowered_with_one_line(small_rtdc, tmp_path):
    # refused by a check before any worker starts: only the lowering is seen
    result = run_cli(small_rtdc, tmp_path / "bg.rtdc", "--workers", "1000", "--event-chunk",
                     "50", "-k", "100")  # fmt: skip
    assert result.returncode == 2, result.stderr
    first, last = result.stderr.strip().splitlines()
    assert re.fullmatch(
        rf"rollmed-dask: --workers 1000 lowered to {os.cpu_count()}: this machine has "
        rf"{os.cpu_count()} core\(s\)( and .* of memory, enough for \d+ worker\(s\) .*)?",
        first,
    ), first
    assert last.startswith("rollmed-dask: error: --event-chunk 50 is shorter than -k 100")


def test_slurm_options_without_slurm_are_a_usage_error(small_rtdc, tmp_path):
    result = run_cli(small_rtdc, tmp_path / "bg.rtdc", "--memory", "4GB", "--walltime", "1:00")
    assert result.returncode == 2
    assert last_line(result.stderr) == (
        "rollmed-dask: error: --memory, --walltime: SLURM options; add --slurm, or drop them"
    )


def test_help_says_where_slurm_defaults_come_from():
    result = run_cli("--help")
    text = " ".join(result.stdout.split())
    assert "jobqueue.slurm in ~/.config/dask/jobqueue.yaml" in text
    assert "cores per job (default: config)" in text
    assert "removed unless the run fails" in text


# ------------------------------------------------------------------ on the local SLURM


def queue(*args) -> list[str]:
    proc = subprocess.run(
        ["squeue", "-h", "-o", "%i", *args], capture_output=True, text=True, timeout=30, check=True
    )
    return proc.stdout.split()


def wait_queue_empty(name: str, seconds: float = 30) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := queue("-n", name)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture
def job_name():
    """A job name of this test's own, so that its jobs can be found and counted."""
    name = f"rollmed-test-{uuid.uuid4().hex[:8]}"
    yield name
    # whatever happened, leave no job behind for the next test
    subprocess.run(["scancel", "-n", name], capture_output=True, timeout=30)


def slurm_args(job_name, *extra):
    return [
        "--slurm",
        "--cores=1",
        "--memory=1GB",
        "--walltime=00:10:00",
        "--scheduler-host=127.0.0.1",
        f"--job-extra=--job-name={job_name}",
        *extra,
    ]


def start_slurm_cli(input_path, out, job_name, *extra, env=None, tmp_path):
    """The CLI on SLURM with stderr to a file; returns once the worker joined.

    The run takes a minute or more (SLOW): still going when the test interrupts it."""
    err_path = tmp_path / "stderr.txt"
    err = err_path.open("w")
    # the logs a failed run keeps go to the test's folder, not /tmp
    (tmp_path / "temp").mkdir()
    env = {**(env or os.environ), "TMPDIR": str(tmp_path / "temp")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollmed_dask", str(input_path), str(out), *SLOW,
         *slurm_args(job_name, *extra)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env,
    )  # fmt: skip
    err.close()
    # printed once the worker has joined, right before the blocks go out
    wait_for(lambda: "dashboard:" in err_path.read_text(), 120, proc, "worker")
    return proc, err_path


def finish(proc, err_path, seconds):
    proc.wait(timeout=seconds)
    return err_path.read_text()


@pytest.mark.slurm
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "sig, status, word",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["SIGINT", "SIGTERM"],
)
def test_signal_on_slurm(slurm, sig, status, word, long_rtdc, job_name, tmp_path):
    out = tmp_path / "out" / "bg.rtdc"
    out.parent.mkdir()
    out.write_bytes(OLD)
    logs = tmp_path / "logs"
    proc, err_path = start_slurm_cli(
        long_rtdc, out, job_name, "--overwrite", f"--log-dir={logs}", tmp_path=tmp_path
    )
    (job_id,) = queue("-n", job_name)
    time.sleep(1)
    assert proc.poll() is None, "the run must still be going when the signal comes"
    proc.send_signal(sig)
    stderr = finish(proc, err_path, 60)
    assert proc.returncode == status, stderr
    assert "Traceback" not in stderr
    assert last_line(stderr) == f"rollmed-dask: {word}; {out} was left as it was"
    assert out.read_bytes() == OLD
    assert [p.name for p in out.parent.iterdir()] == [out.name], "no temporary is left"
    assert wait_queue_empty(job_name) == [], "the worker job was cancelled"
    assert any(logs.glob(f"*{job_id}*")), "the job logs went to --log-dir"


@pytest.mark.slurm
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "sig, status, word",
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["SIGINT", "SIGTERM"],
)
def test_signal_while_the_job_pends(slurm, sig, status, word, small_rtdc, job_name, tmp_path):
    temp = tmp_path / "temp"
    temp.mkdir()
    out = tmp_path / "bg.rtdc"
    proc = start_cli(
        small_rtdc, out, *slurm_args(job_name, "--job-extra=--begin=now+3600"),
        env={**os.environ, "TMPDIR": str(temp)},
    )  # fmt: skip
    wait_for(lambda: bool(queue("-n", job_name)), 60, proc, "pending job")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status, stderr
    assert last_line(stderr) == f"rollmed-dask: {word}; no output was written to {out}"
    assert wait_queue_empty(job_name) == [], "the pending job was cancelled"
    left = [p.name for p in temp.iterdir() if p.name.startswith("rollmed-dask-slurm-")]
    assert left == [], "an interrupted run leaves no temporary log folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["temp"]


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_sigterm_just_after_the_move_on_slurm(slurm, small_rtdc, job_name, tmp_path):
    temp = tmp_path / "temp"
    temp.mkdir()
    out = tmp_path / "out" / "bg.rtdc"
    out.parent.mkdir()
    out.write_bytes(OLD)
    env = {**os.environ, "TMPDIR": str(temp), "ROLLMED_DASK_TEST_SIGNAL_AT": "moved:TERM"}
    result = run_cli(small_rtdc, out, "-k", "20", "--overwrite", *slurm_args(job_name), env=env)
    assert result.returncode == 143, result.stderr
    assert last_line(result.stderr) == (
        f"rollmed-dask: terminated; {out} holds the new, complete output (it was moved into place)"
    )
    expected = rolling_median_reference(read_images(small_rtdc), 20)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    assert [p.name for p in out.parent.iterdir()] == [out.name], "no temporary or lock is left"
    # cancelled before the CLI ended, not by the job_name fixture afterwards
    assert queue("-n", job_name, "--states=PENDING,RUNNING") == [], "the job was cancelled"
    left = [p.name for p in temp.iterdir() if p.name.startswith("rollmed-dask-slurm-")]
    assert left == [], "the temporary log folder is removed"


USER_CLUSTER = """
import signal, sys
import dask_jobqueue
from rollmed_dask import compute_background
from rollmed_dask.cluster import SlurmJobLost
src, out, name, logs = sys.argv[1:5]
cluster = dask_jobqueue.SLURMCluster(
    cores=1, memory="1GB", walltime="00:10:00", python=sys.executable, log_directory=logs,
    scheduler_options={"host": "127.0.0.1", "dashboard_address": ":0"},
    job_extra_directives=[f"--job-name={name}"],
)
client = cluster.get_client()
cluster.scale(jobs=1)
client.wait_for_workers(1, timeout=120)
print("joined", flush=True)
try:
    compute_background(src, out, 20, engine="scipy", event_chunk=40, scheduler=client,
                       progress=False)
except SlurmJobLost as exc:
    print("lost:", exc, flush=True)
# the import made Ctrl-C call sys.exit(): status 0 for an interrupted notebook script
print("sigint:", signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)
cluster.close()
"""


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_scancel_under_a_users_own_slurm_cluster_stops_the_run(
    slurm, long_rtdc, job_name, tmp_path
):
    out = tmp_path / "bg.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-c", USER_CLUSTER, long_rtdc, out, job_name, tmp_path / "logs"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout.readline() == "joined\n"
    time.sleep(3)
    (job_id,) = queue("-n", job_name)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout
    assert f"lost: SLURM job {job_id} is CANCELLED" in stdout, stdout
    assert "sigint: True" in stdout
    assert not out.exists() and temporaries(out) == []


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_a_pending_job_is_reported_then_ends_the_run_after_worker_wait(
    slurm, small_rtdc, job_name, tmp_path
):
    out = tmp_path / "bg.rtdc"
    extra = ["--job-extra=--begin=now+3600", "--worker-wait=7"]  # a line after 5 s
    result = run_cli(small_rtdc, out, "-k", "20", *slurm_args(job_name, *extra))
    assert result.returncode == 1, result.stderr  # a run that failed, not a mistake
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert re.fullmatch(
        r"rollmed-dask: waiting for the first dask worker for \d+ s of 7 \(--worker-wait\): "
        r"SLURM job \d+ is PENDING, reason BeginTime",
        lines[0],
    ), result.stderr
    assert lines[-1].startswith("rollmed-dask: error: no SLURM worker started within 7 s: job "), (
        lines[-1]
    )
    assert "state is PENDING (reason BeginTime); the jobs were cancelled" in lines[-1]
    assert wait_queue_empty(job_name) == []


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_a_job_that_fails_before_its_worker_joins_is_a_failed_run(
    slurm, small_rtdc, job_name, tmp_path
):
    # no such Python on the "compute node": the job script fails at once
    env = {**os.environ, "DASK_JOBQUEUE__SLURM__PYTHON": "/nonexistent/python",
           "TMPDIR": str(tmp_path)}  # fmt: skip
    out = tmp_path / "bg.rtdc"
    result = run_cli(small_rtdc, out, "-k", "20", "-q", *slurm_args(job_name), env=env)
    assert result.returncode == 1, result.stderr  # a failed run, not a user's mistake
    line = last_line(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.fullmatch(
        r"rollmed-dask: error: SLURM job \d+ is FAILED, reason NonZeroExitCode; it ended "
        r"before its dask worker joined the scheduler; the end of its log: '.*/nonexistent/"
        rf"python: No such file or directory' \({tmp_path}/rollmed-dask-slurm-\w+/.*\.err\); "
        rf"no output was written to {out}",
        line,
    ), line


PAUSED_ON_SLURM = """
import sys
from rollmed_dask import compute_background
from rollmed_dask.cluster import WorkersPaused, close_client, start_slurm_cluster

src, out, name = sys.argv[1:4]
client = start_slurm_cluster(
    cores=1, memory="1GB", walltime="00:10:00", scheduler_host="127.0.0.1",
    job_extra=[f"--job-name={name}"], lost_worker_timeout=5,
    # the worker's own limit below what it uses idle (the last --memory-limit
    # wins), and its nanny told not to kill it at 95 %: paused from the start
    worker_extra_args=["--memory-limit", "100MB"],
    job_script_prologue=["export DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE=False"],
)
try:
    compute_background(src, out, 20, scheduler=client, progress=False)
except WorkersPaused as exc:
    print("paused:", exc, flush=True)
finally:
    close_client(client)
"""


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_a_slurm_worker_paused_for_memory_stops_the_run(slurm, small_rtdc, job_name, tmp_path):
    out = tmp_path / "bg.zarr"
    proc = subprocess.run(
        [sys.executable, "-c", PAUSED_ON_SLURM, small_rtdc, out, job_name],
        capture_output=True, text=True, timeout=200, stdin=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(
        r"paused: no block finished for \d+ s: the dask worker is paused for memory "
        r"\(tcp://\S+ uses .* of its 95.37 MiB limit; dask pauses a worker at 80 %\), so the "
        r"run stopped; give each worker more memory \(--memory, .*\n",
        proc.stdout,
    ), proc.stdout
    assert not out.exists() and temporaries(out) == []
    assert wait_queue_empty(job_name) == []


def job_state(job_id: str) -> str:
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    )
    found = re.search(r"JobState=(\S+)", proc.stdout)
    return found.group(1) if found else ""


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_scancel_of_the_worker_job_stops_the_run_at_once(slurm, long_rtdc, job_name, tmp_path):
    out = tmp_path / "out" / "bg.rtdc"
    out.parent.mkdir()
    out.write_bytes(OLD)
    proc, err_path = start_slurm_cli(long_rtdc, out, job_name, "--overwrite", tmp_path=tmp_path)
    (job_id,) = queue("-n", job_name)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    t0 = time.monotonic()
    stderr = finish(proc, err_path, 60)  # not the 60 s lost-worker timeout: SLURM says why
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    line = last_line(stderr)
    assert line.startswith(
        f"rollmed-dask: error: SLURM job {job_id} is CANCELLED: it was cancelled (scancel, "
        "or an administrator); no dask worker is left to finish the run (job logs: "
    ), line
    assert line.endswith(f"); {out} was left as it was"), line
    log_dir = Path(line.split("(job logs: ")[1].split(")")[0])
    assert log_dir.parent == tmp_path / "temp"
    assert any(log_dir.glob(f"*{job_id}*")), "the logs of a failed run are kept"
    assert out.read_bytes() == OLD
    assert [p.name for p in out.parent.iterdir()] == [out.name], "no temporary is left"
    assert wait_queue_empty(job_name) == []


def job_pids(job_id: str) -> list[int]:
    """The processes of a SLURM job on this machine (its script and dask worker)."""
    pids = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            environ = (proc_dir / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in environ:
            pids.append(int(proc_dir.name))
    return pids


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_walltime_in_the_middle_of_a_run_says_resume(slurm, long_rtdc, job_name, tmp_path):
    # SLURM's time limits are whole minutes, checked every 30 s: a job with a
    # 1-minute walltime ends 60-90 s after it starts. The worker is frozen
    # (SIGSTOP) meanwhile, so the run is certainly longer, without burning CPU.
    out = tmp_path / "bg.zarr"
    # the same bits as a run that was never stopped, computed meanwhile (numpy's
    # reference would take a minute; the engines' exactness is tested elsewhere)
    fresh = start_cli(long_rtdc, tmp_path / "fresh.rtdc", "-k", "20", "-q")
    proc, err_path = start_slurm_cli(
        long_rtdc, out, job_name, "--resume", "--walltime=00:01:00", tmp_path=tmp_path
    )
    (job_id,) = queue("-n", job_name)
    for pid in job_pids(job_id):
        os.kill(pid, signal.SIGSTOP)
    stderr = finish(proc, err_path, 150)
    assert job_state(job_id) == "TIMEOUT"
    assert proc.returncode == 1, stderr
    line = last_line(stderr)
    assert line.startswith(
        f"rollmed-dask: error: SLURM job {job_id} is TIMEOUT, reason TimeLimit: it reached "
        "its walltime: ask for more (--walltime); no dask worker is left"
    ), line
    assert line.endswith(
        f"the partial output {partial_path(out)} is kept: run the same command again, "
        "with --resume, to continue"
    ), line
    assert wait_queue_empty(job_name) == []
    rerun = run_cli(long_rtdc, out, "-k", "20", "--event-chunk", "40", "--resume", "-q")
    assert rerun.returncode == 0, rerun.stderr
    assert fresh.wait(timeout=60) == 0, fresh.communicate()
    np.testing.assert_array_equal(
        read_images(out, "events/image_bg"),
        read_images(tmp_path / "fresh.rtdc", "events/image_bg"),
    )


@pytest.fixture
def failing_squeue(tmp_path):
    """An environment for the CLI whose squeue fails as when slurmctld cannot be
    reached (the tests themselves keep the real one)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "squeue"
    fake.write_text(
        "#!/bin/sh\necho 'squeue: error: Unable to contact slurm controller' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_failing_squeue_is_not_read_as_dead_jobs(slurm, failing_squeue, job_name, tmp_path):
    # a job that pends (eligible in an hour) while squeue fails: a timeout that
    # says SLURM cannot be asked, not "the job ended before its worker joined"
    code = (
        "import sys\n"
        "from rollmed_dask.cluster import start_slurm_cluster\n"
        "try:\n"
        "    start_slurm_cluster(cores=1, memory='1GB', timeout=5, job_extra=sys.argv[1:],\n"
        "                        scheduler_host='127.0.0.1')\n"
        "except TimeoutError as exc:\n"
        "    print(str(exc).splitlines()[0])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "--begin=now+3600", f"--job-name={job_name}"],
        capture_output=True, text=True, timeout=100,
        env={**failing_squeue, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(
        r"no SLURM worker started within 5 s: cannot ask SLURM about job\(s\) \d+: squeue "
        r"failed \(exit 1: squeue: error: Unable to contact slurm controller\); the jobs "
        r"were cancelled; wait longer \(--worker-wait, timeout=\), .*\n",
        proc.stdout,
    ), proc.stdout
    assert wait_queue_empty(job_name) == []
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith("rollmed-dask-slurm-")]
    assert left == [], "no empty log folder is kept"


@pytest.fixture
def unanswered_squeue(tmp_path):
    """squeue as when slurmctld does not answer: it fails after 9 s."""
    bin_dir = tmp_path / "slow-bin"
    bin_dir.mkdir()
    fake = bin_dir / "squeue"
    fake.write_text(
        "#!/bin/sh\nsleep 9\n"
        "echo 'squeue: error: Unable to contact slurm controller' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_lost_worker_while_squeue_fails_stops_after_the_timeout(
    slurm, unanswered_squeue, long_rtdc, job_name, tmp_path
):
    out = tmp_path / "out" / "bg.rtdc"
    out.parent.mkdir()
    # squeue is cut off after a third of the timeout: the run stops near 4 s
    # without a worker, not after 9 s more for every squeue
    proc, err_path = start_slurm_cli(
        long_rtdc, out, job_name, "--lost-worker-timeout=4", env=unanswered_squeue,
        tmp_path=tmp_path,
    )  # fmt: skip
    (job_id,) = queue("-n", job_name)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    stderr = finish(proc, err_path, 60)
    assert proc.returncode == 1, stderr
    line = last_line(stderr)
    assert re.match(
        r"rollmed-dask: error: no dask worker for [4-7] s, and SLURM cannot be asked about "
        rf"job\(s\) {job_id} \(squeue did not answer within 2 s\), so "
        r"the run stopped \(job logs: ",
        line,
    ), line
    assert line.endswith(f"; no output was written to {out}"), line
    assert list(out.parent.iterdir()) == []
    assert wait_queue_empty(job_name) == []


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_a_run_that_fails_in_a_block_keeps_the_jobs_logs(slurm, small_rtdc, job_name, tmp_path):
    """A block fails on the worker (a corrupt stored chunk): the temporary folder of
    the jobs' logs is kept, as --help says ("removed unless the run fails")."""
    source = Path(shutil.copy(small_rtdc, tmp_path / "input.rtdc"))
    flip_bytes_in_chunk(source, "events/image", 3)
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = run_cli(source, tmp_path / "bg.rtdc", "-k", "5", "-q", *slurm_args(job_name),
                   env={**os.environ, "TMPDIR": str(temp)})  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "fletcher32 checksum mismatch" in last_line(proc.stderr)
    kept = list(temp.glob("rollmed-dask-slurm-*"))
    assert len(kept) == 1 and list(kept[0].glob("*.err")), proc.stderr
    assert wait_queue_empty(job_name) == []


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_a_failed_scancel_after_a_good_run_is_said(slurm, small_rtdc, job_name, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scancel"
    fake.write_text("#!/bin/sh\necho 'scancel: error: Unable to contact slurm controller' >&2\n"
                    "exit 1\n")  # fmt: skip
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "bg.rtdc"
    result = run_cli(small_rtdc, out, "-k", "20", "-q", *slurm_args(job_name), env=env)
    assert result.returncode == 0, result.stderr
    (job_id,) = queue("--states=all", "-n", job_name)
    assert result.stderr.strip() == (
        f"rollmed-dask: warning: scancel {job_id} failed (scancel: error: Unable to contact "
        "slurm controller): check with `squeue --me` and cancel what is left yourself"
    )


def all_jobs() -> set[str]:
    """Every job SLURM knows, ended ones too (kept MinJobAge seconds)."""
    return set(queue("--states=all"))


@pytest.mark.slurm
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "case, says",
    [
        ("missing input", "does not exist"),
        ("existing output", "already exists"),
        ("unknown dataset", "events/nothing"),
        ("memory budget 1MiB", "give a memory budget of at least 20MiB"),
        ("event chunk shorter than K", "--event-chunk 50 is shorter than -k 100"),
        ("resume of another run's partial", "--resume"),
        ("log dir is a file", "is a file, not a folder"),
        ("memory per job too small", "--memory 300MB with 1 worker process(es) of 1 thread(s)"),
    ],
)
def test_a_run_that_cannot_succeed_submits_no_job(
    slurm, case, says, small_rtdc, job_name, tmp_path
):
    out = tmp_path / "bg.rtdc"
    source, extra, k = small_rtdc, [], "20"
    if case == "missing input":
        source = tmp_path / "missing.rtdc"
    elif case == "existing output":
        out.write_bytes(OLD)
    elif case == "unknown dataset":
        extra = ["--dataset", "events/nothing"]
    elif case == "memory budget 1MiB":
        extra, k = ["--memory-budget", "1MiB"], "100"
    elif case == "event chunk shorter than K":
        extra, k = ["--event-chunk", "50"], "100"
    elif case == "resume of another run's partial":
        out = tmp_path / "bg.zarr"
        env = {**os.environ, "ROLLMED_DASK_TEST_KILL_AT": "zarr-marker"}
        run_cli(source, out, "-k", "10", "--resume", "-q", env=env)  # killed: a partial of K=10
        assert partial_path(out).is_dir()
        extra = ["--resume"]
    elif case == "log dir is a file":
        (tmp_path / "logs").write_text("not a folder")
        extra = [f"--log-dir={tmp_path / 'logs'}"]
    else:
        extra = ["--memory=300MB"]  # the worker alone uses about 260 MiB: paused at 80 %
    before = all_jobs()
    result = run_cli(source, out, "-k", k, *slurm_args(job_name), *extra)
    assert result.returncode == 2, result.stderr
    line = last_line(result.stderr)
    assert line.startswith("rollmed-dask: error: ") and says in line, line
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # ended jobs of earlier tests may leave the list meanwhile: count new ones
    assert all_jobs() - before == set(), "no job was submitted"
    if case == "existing output":
        assert out.read_bytes() == OLD
    elif case != "resume of another run's partial":
        assert not out.exists()


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_jobqueue_yaml_reaches_sbatch_and_the_temporary_logs_go(slurm, small_rtdc, tmp_path):
    name = f"rollmed-yaml-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "dask-config"
    config.mkdir()
    (config / "jobqueue.yaml").write_text(
        "jobqueue:\n"
        "  slurm:\n"
        f"    name: {name}\n"
        "    cores: 1\n"
        "    memory: 1000MB\n"
        "    walltime: '00:07:00'\n"
        "    job-extra-directives: ['--comment=from-jobqueue-yaml']\n"
    )
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**os.environ, "DASK_CONFIG": str(config), "TMPDIR": str(temp)}
    out = tmp_path / "bg.rtdc"
    try:
        # no --cores/--memory/--walltime: all from the configuration
        result = run_cli(
            small_rtdc, out, "-k", "20", "--slurm", "--scheduler-host=127.0.0.1", "-q", env=env
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", "a good quiet run prints nothing (no dask ERROR line)"
        (job_id,) = queue("--states=all", "-n", name)
        script = subprocess.run(
            ["scontrol", "write", "batch_script", job_id, "-"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
    finally:
        subprocess.run(["scancel", "-n", name], capture_output=True, timeout=30)
    assert "#SBATCH -t 00:07:00" in script
    assert "#SBATCH --mem=954M" in script  # 1000 MB in MiB, as dask-jobqueue writes it
    assert "#SBATCH --cpus-per-task=1" in script
    assert "#SBATCH --comment=from-jobqueue-yaml" in script
    expected = rolling_median_reference(read_images(small_rtdc), 20)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    left = [p.name for p in temp.iterdir() if p.name.startswith("rollmed-dask-slurm-")]
    assert left == [], "the temporary log folder of a good run is removed"
