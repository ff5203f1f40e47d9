"""compute_background on real distributed clusters: LocalCluster worker processes,
a Client passed in, a scheduler address, the active default Client, a worker
killed in the middle of a run, and SLURM jobs through dask-jobqueue.

Every mode must give the same bits as the numpy reference, in HDF5 and Zarr.
"""

import os
import signal
import threading
import time

import dask.array as da
import numpy as np
import pytest
from conftest import read_images

from rollmed_dask import compute_background, rolling_median_reference
from rollmed_dask.cluster import close_client, start_local_cluster, start_slurm_cluster
from rollmed_dask.sinks import partial_path

pytestmark = [
    pytest.mark.cluster,
    # distributed may warn about slow shutdowns of the worker processes it kills
    pytest.mark.filterwarnings("ignore::UserWarning:distributed"),
]


@pytest.fixture(scope="module")
def client():
    client = start_local_cluster(2)
    yield client
    close_client(client)


@pytest.fixture(scope="module")
def expected(small_rtdc):
    return rolling_median_reference(read_images(small_rtdc), 25)


@pytest.mark.parametrize("suffix", [".rtdc", ".zarr"])
def test_client_passed_in(client, suffix, small_rtdc, expected, tmp_path):
    out = tmp_path / f"bg{suffix}"
    summary = compute_background(
        small_rtdc, out, 25, scheduler=client, progress=False, memory_budget="8MiB"
    )
    assert "distributed" in summary.scheduler and summary.blocks > 2
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    worker_pids = set(client.run(os.getpid).values())
    assert os.getpid() not in worker_pids, "the work ran in worker processes"


def test_scheduler_address(client, small_rtdc, expected, tmp_path):
    out = tmp_path / "bg.rtdc"
    address = client.scheduler.address

    def connected():  # the clients the scheduler knows
        return client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.clients))

    before = connected()
    summary = compute_background(small_rtdc, out, 25, scheduler=address, progress=False)
    assert address in summary.scheduler
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    # the job's own Client is closed when it returns (a notebook would keep it)
    deadline = time.monotonic() + 10
    while connected() != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert connected() == before


def test_active_client_is_the_default(client, small_rtdc, expected, tmp_path):
    with client.as_current():
        summary = compute_background(small_rtdc, tmp_path / "bg.zarr", 25, progress=False)
    assert "distributed" in summary.scheduler
    np.testing.assert_array_equal(read_images(tmp_path / "bg.zarr", "events/image_bg"), expected)


def test_functions_defined_by_the_caller_travel_to_workers(client, tmp_path):
    # like a function defined in a notebook cell: not importable by the workers
    def brighten(block):
        return block + 1

    img = np.random.default_rng(0).integers(0, 200, (300, 16, 16), dtype=np.uint8)
    source = da.from_array(img, chunks=(50, 16, 16)).map_blocks(brighten, dtype=img.dtype)
    compute_background(source, tmp_path / "bg.h5", 9, scheduler=client, progress=False)
    np.testing.assert_array_equal(
        read_images(tmp_path / "bg.h5", "events/image_bg"), rolling_median_reference(img + 1, 9)
    )


def slow_block(block):
    time.sleep(0.3)
    return block


@pytest.mark.timeout(300)
@pytest.mark.parametrize("suffix", [".rtdc", ".zarr"])
def test_worker_killed_mid_run_still_gives_the_exact_result(suffix, tmp_path):
    img = np.random.default_rng(1).integers(0, 255, (1200, 32, 32), dtype=np.uint8)
    source = da.from_array(img, chunks=(40, 32, 32)).map_blocks(slow_block, dtype=img.dtype)
    out = tmp_path / f"bg{suffix}"
    client = start_local_cluster(2)
    try:
        victim = max(client.run(os.getpid).values())
        killer = threading.Timer(2.0, os.kill, (victim, signal.SIGKILL))
        killer.start()
        compute_background(
            source, out, 15, scheduler=client, progress=False, overwrite=True, event_chunk=40
        )
        killer.join()
        assert victim not in client.run(os.getpid).values(), "a worker really died"
    finally:
        close_client(client)
    np.testing.assert_array_equal(
        read_images(out, "events/image_bg"), rolling_median_reference(img, 15)
    )
    assert not partial_path(out).exists()


@pytest.mark.slurm
@pytest.mark.timeout(400)
def test_slurm_jobs_give_identical_bits(slurm, small_rtdc, expected, tmp_path):
    client = start_slurm_cluster(
        cores=1,
        memory="1GB",
        walltime="00:10:00",
        jobs=2,
        scheduler_host="127.0.0.1",
        log_directory=str(tmp_path / "logs"),
        timeout=180,
    )
    try:
        job_ids = set(client.run(lambda: os.environ.get("SLURM_JOB_ID")).values())
        assert None not in job_ids, "every worker runs inside a SLURM job"
        for suffix in [".rtdc", ".zarr"]:
            out = tmp_path / f"bg{suffix}"
            compute_background(
                small_rtdc, out, 25, scheduler=client, progress=False, memory_budget="8MiB"
            )
            np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    finally:
        close_client(client)


def test_a_written_block_leaves_the_cluster_memory(client):
    """Out of core on a cluster too: once a block is written, its result is released
    on the workers, not kept there until the run ends."""
    import dask

    from rollmed_dask.scheduling import resolve_scheduler, stream_blocks

    def block(i):
        time.sleep(0.2)
        return f"released-block-{i}", np.full(2**20, i, np.uint8)

    tasks = [dask.delayed(block)(i, dask_key_name=f"released-block-{i}") for i in range(6)]

    def held():  # block results the scheduler still keeps in memory
        return client.run_on_scheduler(lambda dask_scheduler: {
            k for k, ts in dask_scheduler.tasks.items()
            if str(k).startswith("released-block") and ts.state == "memory"
        })  # fmt: skip

    written, still_held = [], []

    def on_result(result):
        deadline = time.monotonic() + 10
        while held() & set(written) and time.monotonic() < deadline:
            time.sleep(0.05)  # a release is a message to the scheduler: it takes a moment
        still_held.append(sorted(held() & set(written)))
        written.append(result[0])

    stream_blocks(tasks, on_result, resolve_scheduler(client))
    assert len(written) == 6 and still_held == [[]] * 6, still_held


def test_a_cluster_started_by_a_function_is_closed_with_the_job(small_rtdc, expected, tmp_path):
    """``scheduler=`` a function that starts a cluster (what --workers N passes): the
    job owns that cluster and closes it when it returns."""
    started = []

    def start():
        started.append(start_local_cluster(1, threads_per_worker=1))
        return started[0]

    out = tmp_path / "bg.rtdc"
    summary = compute_background(small_rtdc, out, 25, scheduler=start, progress=False)
    assert "distributed" in summary.scheduler
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    (client,) = started
    assert client.status == "closed" and client.cluster.status.name == "closed"
