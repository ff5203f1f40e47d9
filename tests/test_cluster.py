"""rollmed_dask.cluster against real clusters: a LocalCluster and a real (local) SLURM.

The SLURM tests need the one-node SLURM of ``scripts/local-slurm.sh``. When it
is not up, the ``slurm`` fixture starts it if ``CI`` is set (or
``ROLLMED_START_SLURM=1``) and we are root; if SLURM still cannot be reached the
tests fail under CI and are skipped elsewhere, saying how to start it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from rollmed_dask.cluster import (
    SlurmSubmitError,
    close_client,
    start_local_cluster,
    start_slurm_cluster,
)


def _queued(name: str) -> list[str]:
    proc = subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True, timeout=30
    )
    return proc.stdout.split()


def _wait_gone(name: str, seconds: float = 20.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while (left := _queued(name)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


def _median_over_events(x):
    """Per-pixel median over axis 0, blockwise over pixels: exact, so numpy must agree."""
    import dask.array as da

    d = da.from_array(x, chunks=(x.shape[0], 8, 8))
    return d.map_blocks(lambda b: np.median(b, axis=0), drop_axis=0, dtype=np.float64)


def _check_computations(client):
    import dask.array as da

    n = 1_000_003
    assert da.arange(n, chunks=100_000).sum().compute(scheduler=client) == n * (n - 1) // 2
    rng = np.random.default_rng(42)
    x = rng.integers(0, 256, size=(31, 24, 16), dtype=np.uint8)
    got = _median_over_events(x).compute(scheduler=client)
    np.testing.assert_array_equal(got, np.median(x, axis=0))


# ------------------------------------------------------------------------------ no cluster


def test_import_does_not_import_distributed_or_jobqueue():
    code = (
        "import sys, rollmed_dask\n"
        "before = set(sys.modules)\n"
        "import rollmed_dask.cluster\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(new & {'distributed', 'dask_jobqueue'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("memory, processes", [("1000MB", 3), ("300MB", 1), ("7GiB", 4)])
def test_slurm_worker_memory_is_the_limit_jobqueue_gives_each_worker(memory, processes):
    """The check before any job uses each worker's ``--memory-limit`` as the job
    script has it (dask-jobqueue rounds it to 2 decimals), not the quotient."""
    from dask.utils import parse_bytes
    from dask_jobqueue.slurm import SLURMJob

    from rollmed_dask.cluster import slurm_worker_memory

    job = SLURMJob(scheduler="tcp://127.0.0.1:1", name="w", cores=processes,
                   processes=processes, memory=memory)  # fmt: skip
    assert f"--memory-limit {job.worker_process_memory}" in job.job_script()
    (limit, threads), spelled = slurm_worker_memory(
        {"memory": memory, "cores": processes, "processes": processes}
    )
    assert (limit, threads) == (parse_bytes(job.worker_process_memory), 1)
    assert spelled == f"--memory {memory} with {processes} worker process(es) of 1 thread(s)"


def test_missing_jobqueue_is_a_friendly_import_error():
    # a None entry in sys.modules makes `import dask_jobqueue` fail as if not installed
    code = (
        "import sys\n"
        "sys.modules['dask_jobqueue'] = None\n"
        "from rollmed_dask.cluster import start_slurm_cluster\n"
        "try:\n"
        "    start_slurm_cluster()\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "dask-jobqueue" in out.stdout
    assert 'pip install "rollmed-dask[hpc]"' in out.stdout


def test_ctrl_c_stays_a_keyboard_interrupt_after_importing_jobqueue():
    # dask_jobqueue's runner module makes SIGINT call sys.exit(): a run on SLURM
    # interrupted with Ctrl-C ended with exit status 0, as if it had succeeded
    code = (
        "import signal, dask_jobqueue\n"
        "from rollmed_dask.cluster import _import_jobqueue\n"
        "_import_jobqueue()\n"
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "True"


def test_local_cluster_rejects_zero_workers():
    with pytest.raises(ValueError, match="at least one worker"):
        start_local_cluster(0)


# ------------------------------------------------------------------------------ LocalCluster


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_local_cluster_two_worker_processes(capfd):
    client = start_local_cluster(2, threads_per_worker=1, memory_limit="1GiB")
    cluster = client.cluster
    try:
        assert sorted(client.nthreads().values()) == [1, 1]
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids  # processes, not threads
        assert ":8787/" not in client.dashboard_link  # a free port, not the default
        _check_computations(client)
    finally:
        close_client(client)
    assert client.status == "closed"
    assert cluster.status.name == "closed"
    close_client(client)  # twice is harmless
    out, _ = capfd.readouterr()
    assert out == ""  # prints nothing itself


# ------------------------------------------------------------------------------ SLURM


@pytest.mark.slurm
@pytest.mark.timeout(240)
def test_slurm_cluster_runs_workers_as_slurm_jobs(slurm, tmp_path):
    name = f"rollmed-test-{uuid.uuid4().hex[:8]}"
    client = start_slurm_cluster(
        cores=1,
        memory="1GB",
        walltime="00:10:00",
        jobs=2,
        min_workers=2,
        timeout=90,
        scheduler_host="127.0.0.1",
        log_directory=str(tmp_path),
        job_name=name,
    )
    try:
        cluster = client.cluster
        job_ids = {str(w.job_id) for w in cluster.workers.values()}
        assert len(job_ids) == 2
        # both 1-core jobs run side by side on the one node
        assert set(_queued(name)) == job_ids
        # every worker runs inside one of our SLURM jobs, with this Python
        env = client.run(lambda: (os.environ.get("SLURM_JOB_ID"), sys.executable))
        assert {job for job, _ in env.values()} == job_ids
        assert {exe for _, exe in env.values()} == {sys.executable}
        assert all(addr.startswith("tcp://127.0.0.1:") for addr in env)
        _check_computations(client)
    finally:
        close_client(client)
    # closing cancelled the jobs
    assert _wait_gone(name) == []
    assert sorted(p.name for p in tmp_path.iterdir())  # the job logs went to log_directory


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_slurm_job_pending_forever_is_a_clear_timeout(slurm, tmp_path):
    name = f"rollmed-test-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    with pytest.raises(
        TimeoutError,
        match=r"no SLURM worker started within 5 s: job \d+ state is PENDING "
        r"\(reason BeginTime\); the jobs were cancelled; wait longer \(--worker-wait",
    ):
        start_slurm_cluster(
            cores=1,
            memory="1GB",
            walltime="00:10:00",
            timeout=5,
            job_extra=["--begin=now+3600"],  # eligible in an hour: pending until then
            scheduler_host="127.0.0.1",
            log_directory=str(tmp_path),
            job_name=name,
        )
    assert time.monotonic() - t0 < 60
    assert _wait_gone(name) == []  # the pending job was cancelled


@pytest.mark.slurm
@pytest.mark.parametrize("missing", ["cores", "memory"])
def test_slurm_cores_and_memory_set_nowhere_fail_before_any_job(slurm, missing):
    import dask

    given = {"cores": 1, "memory": "1GB"}
    del given[missing]
    with dask.config.set({f"jobqueue.slurm.{missing}": None}):
        with pytest.raises(ValueError, match=rf"^{missing} per SLURM job is not set: pass"):
            start_slurm_cluster(**given)


@pytest.mark.slurm
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["unknown partition", "more memory than the node"])
def test_slurm_impossible_request_fails_at_once(slurm, tmp_path, case):
    name = f"rollmed-test-{uuid.uuid4().hex[:8]}"
    if case == "unknown partition":
        kw = {"queue": "no-such-partition", "memory": "1GB"}
        expected = r"(?i)invalid partition"
    else:
        kw = {"memory": f"{2 * slurm['memory_mb']}MB"}
        expected = r"Requested node configuration is not available"
    t0 = time.monotonic()
    with pytest.raises(SlurmSubmitError, match=expected) as info:
        start_slurm_cluster(
            cores=1,
            walltime="00:10:00",
            timeout=60,
            scheduler_host="127.0.0.1",
            log_directory=str(tmp_path),
            job_name=name,
            **kw,
        )
    assert isinstance(info.value, ValueError)
    assert "check the queue/partition" in str(info.value)
    assert time.monotonic() - t0 < 30
    assert _queued(name) == []  # nothing was queued
