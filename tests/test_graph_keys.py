"""Graph names are tokenized from the inputs and parameters, as dask's own are.

Two results that differ must never share a key: not in one ``dask.compute``,
not when composed, not across clients of one ``distributed`` scheduler, and not
for a file before and after it is rewritten on disk.
"""

import os

import dask
import h5py
import numpy as np
import pytest
import zarr
from distributed.diagnostics.plugin import SchedulerPlugin

from rollmed_dask import compute_background, rolling_median, rolling_median_reference
from rollmed_dask.sources import HDF5Reader, data_token


def stack(seed, shape=(120, 4, 5)):
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def write_h5(path, images):
    with h5py.File(path, "w") as h5:
        h5.create_dataset("events/image", data=images, chunks=(10,) + images.shape[1:])
    return path


def test_two_results_in_one_compute_are_each_their_own():
    a, b = stack(0), stack(1)
    ra, rb = dask.compute(rolling_median(a, 10), rolling_median(b, 10))
    np.testing.assert_array_equal(ra, rolling_median_reference(a, 10))
    np.testing.assert_array_equal(rb, rolling_median_reference(b, 10))


def test_sum_of_two_kernel_sizes_is_exact():
    x = stack(2)
    total = rolling_median(x, 10).astype(np.int32) + rolling_median(x, 20)
    expected = rolling_median_reference(x, 10).astype(np.int32) + rolling_median_reference(x, 20)
    np.testing.assert_array_equal(total.compute(), expected)


def test_median_of_a_median_is_exact():
    x = stack(3)
    nested = rolling_median(rolling_median(x, 10), 20)
    expected = rolling_median_reference(rolling_median_reference(x, 10), 20)
    np.testing.assert_array_equal(nested.compute(), expected)


def test_names_differ_by_engine_and_kernel_size_and_repeat_for_equal_inputs():
    x = stack(4)
    names = {rolling_median(x, k, engine=e).name for k in (5, 6) for e in ("compiled", "numpy")}
    assert len(names) == 4
    assert rolling_median(x, 5).name == rolling_median(x.copy(), 5).name


def test_two_files_in_one_compute(tmp_path):
    a, b = stack(5), stack(6)
    bg = [rolling_median(write_h5(tmp_path / f"{n}.h5", s), 10) for n, s in (("a", a), ("b", b))]
    ra, rb = dask.compute(*bg)
    np.testing.assert_array_equal(ra, rolling_median_reference(a, 10))
    np.testing.assert_array_equal(rb, rolling_median_reference(b, 10))


def test_hdf5_file_rewritten_on_disk_gets_a_new_token(tmp_path):
    path = write_h5(tmp_path / "x.h5", stack(7))
    before = (data_token(HDF5Reader(path, "events/image")), rolling_median(path, 10).name)
    assert data_token(HDF5Reader(path, "events/image")) == before[0], "deterministic"
    os.utime(path, ns=(1, 1))  # file times may be coarser than this test's pace
    write_h5(path, stack(8))  # same path, shape and dtype: only the state tells
    after = (data_token(HDF5Reader(path, "events/image")), rolling_median(path, 10).name)
    assert before[0] != after[0] and before[1] != after[1]


def test_zarr_array_rewritten_on_disk_gets_a_new_token(tmp_path):
    path = str(tmp_path / "x.zarr")
    array = zarr.create_array(store=path, data=stack(9), chunks=(10, 4, 5))
    before = rolling_median(array, 10).name
    assert rolling_median(zarr.open_array(path, mode="r"), 10).name == before, "deterministic"
    os.utime(os.path.join(path, "zarr.json"), ns=(1, 1))  # file times may be coarse
    array = zarr.create_array(store=path, data=stack(10), chunks=(10, 4, 5), overwrite=True)
    assert rolling_median(array, 10).name != before
    np.testing.assert_array_equal(
        rolling_median(array, 10).compute(), rolling_median_reference(stack(10), 10)
    )


class KeyRecorder(SchedulerPlugin):
    """A scheduler plugin: the keys of every graph each client submits."""

    name = "rollmed-key-recorder"

    def __init__(self):
        self.graphs = []

    def update_graph(self, scheduler, *, client, keys, tasks, **kwargs):
        self.graphs.append((client, set(keys), set(tasks)))


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        yield cluster


@pytest.mark.cluster
def test_two_clients_on_one_scheduler_never_share_keys(cluster, tmp_path):
    """Two users, one scheduler: one holds a result while both run jobs."""
    from distributed import Client

    recorder = KeyRecorder()
    cluster.scheduler.add_plugin(recorder)
    a, b = stack(11, (200, 8, 16)), stack(12, (200, 8, 16))
    address = cluster.scheduler_address
    try:
        with Client(address) as first, Client(address) as second:
            held = first.persist(rolling_median(a, 10))
            compute_background(a, tmp_path / "a.zarr", 10, scheduler=first, progress=False)
            compute_background(b, tmp_path / "b.rtdc", 10, scheduler=second, progress=False)
            compute_background(b, tmp_path / "b.zarr", 10, scheduler=second, progress=False)
            np.testing.assert_array_equal(
                first.compute(held).result(), rolling_median_reference(a, 10)
            )
            ids = (first.id, second.id)
    finally:
        cluster.scheduler.remove_plugin(name=recorder.name)
    tasks = {id_: set().union(*(t for c, _, t in recorder.graphs if c == id_)) for id_ in ids}
    assert not tasks[ids[0]] & tasks[ids[1]], "the clients shared keys"
    hdf5_job, zarr_job = (keys for client, keys, _ in recorder.graphs[-3:-1])
    assert not hdf5_job & zarr_job, "two jobs on one input shared the keys of their output"
    with h5py.File(tmp_path / "b.rtdc") as h5:
        np.testing.assert_array_equal(h5["events/image_bg"][:], rolling_median_reference(b, 10))
    for name, images in (("a", a), ("b", b)):
        stored = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r")["events/image_bg"]
        np.testing.assert_array_equal(stored[:], rolling_median_reference(images, 10))
