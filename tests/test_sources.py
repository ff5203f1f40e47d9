"""Inputs: read handles do not outlive the reads, a file replaced on disk is read
afresh, and lazy array-likes are read block by block, never whole.
"""

import h5py
import numpy as np
import pytest

from rollmed_dask import compute_background, rolling_median, rolling_median_reference, sources


def stack(seed, shape=(150, 6, 8)):
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def write_h5(path, images):
    with h5py.File(path, "w") as h5:
        h5.create_dataset("events/image", data=images, chunks=(10,) + images.shape[1:])
    return path


def test_input_can_be_rewritten_after_compute_background(tmp_path):
    """A notebook user computes, then rewrites the input in the same process."""
    path = write_h5(tmp_path / "in.h5", stack(0))
    compute_background(path, tmp_path / "bg.rtdc", 10, progress=False, memory_budget="64KiB")
    with h5py.File(path, "a") as h5:
        h5.attrs["edited"] = 1
    write_h5(path, stack(1))  # mode "w": truncates the file in place


def test_input_replaced_on_disk_is_read_afresh(tmp_path):
    path = write_h5(tmp_path / "in.h5", stack(2))
    bg = rolling_median(path, 10, memory_budget="64KiB")
    np.testing.assert_array_equal(bg.compute(), rolling_median_reference(stack(2), 10))
    write_h5(path, stack(3))  # same path, shape and dtype, other data
    np.testing.assert_array_equal(
        rolling_median(path, 10).compute(), rolling_median_reference(stack(3), 10)
    )
    np.testing.assert_array_equal(bg.compute(), rolling_median_reference(stack(3), 10))


def test_no_handle_is_left_open(tmp_path):
    paths = [write_h5(tmp_path / f"in{i}.h5", stack(i)) for i in range(5)]
    for path in paths:
        rolling_median(path, 10, memory_budget="64KiB").compute(scheduler="threads")
    assert sources._open_files == {}
    assert h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE) == 0


@pytest.mark.cluster
@pytest.mark.filterwarnings("ignore::UserWarning:distributed")
def test_worker_processes_do_not_keep_the_input_locked(tmp_path):
    """HDF5 locks a file open for reading against writers in any process."""
    from distributed import Client, LocalCluster

    path = write_h5(tmp_path / "in.h5", stack(4))
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        bg = rolling_median(path, 10, memory_budget="64KiB")
        np.testing.assert_array_equal(
            client.compute(bg).result(), rolling_median_reference(stack(4), 10)
        )
        write_h5(path, stack(5))  # the worker is alive: its handle would lock the file
        bg = rolling_median(path, 10, memory_budget="64KiB")
        np.testing.assert_array_equal(
            client.compute(bg).result(), rolling_median_reference(stack(5), 10)
        )


class LazyStack:
    """An array-like that loads on indexing, as xarray does; records every read."""

    def __init__(self, data):
        self._data = data
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self._data[key]

    def __array__(self, dtype=None, copy=None):
        self.reads.append("whole")
        return np.asarray(self._data, dtype=dtype)

    def __dask_tokenize__(self):  # xarray's reads the values of a lazily loaded array
        self.reads.append("whole")
        return self._data.tobytes()


def test_lazy_array_like_is_read_block_by_block(tmp_path):
    images = stack(6, (400, 6, 8))
    lazy = LazyStack(images)
    bg = rolling_median(lazy, 10, memory_budget="64KiB")
    assert lazy.reads == []
    np.testing.assert_array_equal(bg.compute(), rolling_median_reference(images, 10))
    lengths = [key[0].stop - key[0].start for key in lazy.reads]
    assert len(lengths) == len(bg.chunks[0]) > 1 and max(lengths) == max(bg.chunks[0])
    # the job reads it through the same path: no __array__, which loads it whole
    compute_background(lazy, tmp_path / "bg.rtdc", 10, progress=False)
    with h5py.File(tmp_path / "bg.rtdc") as h5:
        np.testing.assert_array_equal(
            h5["events/image_bg"][:], rolling_median_reference(images, 10)
        )
    assert "whole" not in lazy.reads
