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
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import default_signals, read_images

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
        preexec_fn=default_signals,  # it gets SIGINT/SIGTERM, whatever pytest ignores
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
        r"failed \(exit 1: squeue: error: Unable to contact slurm controller\) — .*\n",
        proc.stdout,
    ), proc.stdout
    assert wait_queue_empty(job_name) == []
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith("rollmed-dask-slurm-")]
    assert left == [], "no empty log folder is kept"


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_lost_worker_while_squeue_fails_stops_after_the_timeout(
    slurm, failing_squeue, long_rtdc, job_name, tmp_path
):
    out = tmp_path / "out" / "bg.rtdc"
    out.parent.mkdir()
    proc, err_path = start_slurm_cli(
        long_rtdc, out, job_name, "--lost-worker-timeout=4", env=failing_squeue,
        tmp_path=tmp_path,
    )  # fmt: skip
    (job_id,) = queue("-n", job_name)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    stderr = finish(proc, err_path, 60)
    assert proc.returncode == 1, stderr
    line = last_line(stderr)
    assert re.match(
        r"rollmed-dask: error: no dask worker for [4-9] s, and SLURM cannot be asked about "
        rf"job\(s\) {job_id} \(squeue failed \(exit 1: squeue: error: Unable to contact "
        r"slurm controller\)\), so the run stopped \(job logs: ",
        line,
    ), line
    assert line.endswith(f"; no output was written to {out}"), line
    assert list(out.parent.iterdir()) == []
    assert wait_queue_empty(job_name) == []


def all_jobs() -> set[str]:
    """Every job SLURM knows, ended ones too (kept MinJobAge seconds)."""
    return set(queue("--states=all"))


@pytest.mark.slurm
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["missing input", "existing output", "unknown dataset"])
def test_a_run_that_cannot_succeed_submits_no_job(slurm, case, small_rtdc, job_name, tmp_path):
    out = tmp_path / "bg.rtdc"
    source, extra = small_rtdc, []
    if case == "missing input":
        source = tmp_path / "missing.rtdc"
    elif case == "existing output":
        out.write_bytes(OLD)
    else:
        extra = ["--dataset", "events/nothing"]
    before = all_jobs()
    result = run_cli(source, out, "-k", "20", *slurm_args(job_name), *extra)
    assert result.returncode == 2, result.stderr
    assert last_line(result.stderr).startswith("rollmed-dask: error: ")
    # ended jobs of earlier tests may leave the list meanwhile: count new ones
    assert all_jobs() - before == set(), "no job was submitted"
    assert out.read_bytes() == OLD if case == "existing output" else not out.exists()


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
