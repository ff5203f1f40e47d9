"""A distributed run makes progress or ends, with one line: real LocalClusters.

- a worker paused for memory (its limit below what the process uses; dask
  pauses at 80 %): the library route (a user's Client) raises WorkersPaused,
  the CLI's --scheduler ADDRESS route exits 1 with one line naming the
  worker's limit and use and what to change;
- a scheduler without any worker: exit 1 after --lost-worker-timeout;
- nothing of the run is left on disk in either case.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time

import dask
import pytest

from rollmed_dask import compute_background
from rollmed_dask.cluster import RunStalled, WorkersPaused, close_client, start_local_cluster
from rollmed_dask.sinks import temporaries

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


def run_cli(*args, timeout=200):
    return subprocess.run(
        [sys.executable, "-m", "rollmed_dask", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def paused_client():
    """One worker process whose memory limit (95 MiB) is below what a worker
    process uses idle (86 MiB is 90 %): dask pauses it at once. The nanny must
    not kill it at 95 % instead (that is the lost-worker case)."""
    with dask.config.set({"distributed.worker.memory.terminate": False}):
        client = start_local_cluster(1, memory_limit="100MB")
        try:
            yield client
        finally:
            close_client(client)


def test_a_user_client_with_a_paused_worker_stops_with_one_line(
    paused_client, small_rtdc, tmp_path
):
    target = tmp_path / "bg.zarr"
    with dask.config.set({"rollmed-dask.lost-worker-timeout": 3}):
        with pytest.raises(WorkersPaused) as stopped:
            compute_background(small_rtdc, target, kernel_size=20, scheduler=paused_client,
                               progress=False)  # fmt: skip
    message = str(stopped.value)
    assert "\n" not in message
    assert "paused for memory" in message and "of its 95.37 MiB limit" in message
    assert "--memory" in message and "--memory-budget" in message
    assert not target.exists() and temporaries(target) == []


def test_cli_on_a_scheduler_whose_worker_is_paused_exits_1(paused_client, small_rtdc, tmp_path):
    target = tmp_path / "bg.rtdc"
    address = paused_client.scheduler.address
    result = run_cli(small_rtdc, target, "-k", "20", "--scheduler", address,
                     "--lost-worker-timeout", "3", "-q")  # fmt: skip
    assert result.returncode == 1, result.stderr
    line = last_line(result.stderr)
    assert line.startswith("rollmed-dask: error: no block finished for "), line
    assert "paused for memory" in line and line.endswith(f"no output was written to {target}")
    assert "Traceback" not in result.stderr
    assert not target.exists() and temporaries(target) == []


def test_cli_on_a_scheduler_without_workers_exits_1(small_rtdc, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=True, dashboard_address=":0") as cluster:
        target = tmp_path / "bg.rtdc"
        target.write_bytes(b"old")
        address = cluster.scheduler_address
        result = run_cli(small_rtdc, target, "-k", "20", "--overwrite", "--scheduler", address,
                         "--lost-worker-timeout", "2", "-q")  # fmt: skip
    assert result.returncode == 1, result.stderr
    line = last_line(result.stderr)
    assert "has no worker" in line and line.endswith(f"{target} was left as it was"), line
    assert target.read_bytes() == b"old" and temporaries(target) == []


def test_run_stalled_is_the_base_of_the_stalled_errors():
    from rollmed_dask.cluster import SlurmJobLost

    assert issubclass(WorkersPaused, RunStalled) and issubclass(SlurmJobLost, RunStalled)


def _slow_block(i: int) -> int:
    time.sleep(0.2)
    return i


def _set_status(name: str, dask_worker) -> None:
    """Run by ``client.run`` on the worker's event loop, where its status may change."""
    from distributed.core import Status

    dask_worker.status = Status[name]  # told to the scheduler, as a memory pause is


def test_a_short_pause_late_in_a_long_run_is_not_a_stall():
    """The stall is counted from the last finished block, not from the run's start:
    a worker paused (for memory) for less than the timeout, 5 s into a 10 s run
    whose timeout is 4 s, lets the run go on to its exact end."""
    from distributed import Client, LocalCluster

    from rollmed_dask.scheduling import Resolved, stream_blocks

    tasks = [dask.delayed(_slow_block)(i, dask_key_name=f"block-{i}") for i in range(40)]
    # no memory limit: no memory monitor, which would resume the worker at once
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, memory_limit=0,
                      dashboard_address=":0") as cluster, Client(cluster) as client:  # fmt: skip
        started = time.monotonic()
        paused = threading.Event()

        def pause_for_a_while():
            time.sleep(5)  # later than the timeout after the start
            with contextlib.suppress(Exception):  # the run already stopped: the test fails
                client.run(_set_status, "paused")
                paused.set()
                time.sleep(2.5)  # longer than a check's period (2 s), shorter than the timeout
                client.run(_set_status, "running")

        pauser = threading.Thread(target=pause_for_a_while, daemon=True)
        pauser.start()
        finished = []
        with dask.config.set({"rollmed-dask.lost-worker-timeout": 4}):
            stream_blocks(tasks, finished.append, Resolved(client=client))
        pauser.join()
    assert paused.is_set() and time.monotonic() - started > 7.5  # the pause was inside the run
    assert sorted(finished) == list(range(40))
