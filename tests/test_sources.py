"""Inputs: read handles do not outlive the reads, a file replaced on disk is read
afresh, and lazy array-likes are read block by block, never whole.
"""

import os

import h5py
import numpy as np
import pytest
from conftest import flip_bytes_in_chunk

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


# --- Mutation survivors of sources.py (issue 23) ---


def test_a_failed_read_leaves_the_input_closed(tmp_path):
    """A notebook keeps the last error, and with it the frames of the read that
    failed: the input must be closed all the same, or the user could not replace
    it until the error is gone."""
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("events/image", data=stack(7), chunks=(10, 6, 8), fletcher32=True)
    flip_bytes_in_chunk(path, "events/image", 3)
    with pytest.raises(OSError, match="events 30 to 39") as failed:
        compute_background(path, tmp_path / "bg.rtdc", 10, progress=False, memory_budget="64KiB")
    assert failed.value.__traceback__ is not None  # the frames are alive
    fds = [os.path.join("/proc/self/fd", fd) for fd in os.listdir("/proc/self/fd")]
    assert str(path) not in {os.path.realpath(fd) for fd in fds}
    write_h5(path, stack(8))  # HDF5 refuses to truncate a file that is open


def test_hdf5_reader_indexes_as_numpy_does(tmp_path):
    """The reader is an array-like (dask, xarray, a user's own slicing): a key
    gives what numpy gives on the same events, a mapped basin's too (whose
    integer keys went to h5py, which gave the stored event, not the mapped one)."""
    images = stack(9, (40, 6, 8))
    reader = sources.HDF5Reader(write_h5(tmp_path / "in.h5", images), "events/image")
    assert (reader.shape, reader.ndim, reader.dtype, len(reader)) == ((40, 6, 8), 3, "u1", 40)
    keys = [np.s_[5], np.s_[-1, 2:5], np.s_[3:9, 2], np.s_[[1, 4, 30]], np.s_[3:17:2, 1:4]]
    for key in keys:
        np.testing.assert_array_equal(reader[key], images[key])
    mapping = [3, 3, 0, 39, 12]
    mapped = sources.HDF5Reader(reader.path, "events/image", mapping=mapping)
    assert (mapped.shape, mapped.ndim, len(mapped)) == ((5, 6, 8), 3, 5)
    keys = [np.s_[1], np.s_[-1, 2:5], np.s_[[4, 0, 0]], np.s_[[0, 3], :, 2], np.s_[[]]]
    keys += [np.s_[np.array([True, False, True, False, True])], np.s_[2, 1, 2]]
    for key in keys + [np.s_[1:4], np.s_[::-1, 2:5], np.s_[2:2], np.s_[4:1, 1:3, :2]]:
        expected = images[mapping][key]
        assert mapped[key].shape == expected.shape
        np.testing.assert_array_equal(mapped[key], expected)
    with pytest.raises(IndexError, match="is a mapped basin: index its events first"):
        mapped[..., 1]


def test_an_input_deleted_while_it_is_opened_is_said_to_be_missing(tmp_path, monkeypatch):
    """Deleted between the existence check and the open (another program moved
    it): not a damaged file, not an internal error."""
    path = write_h5(tmp_path / "in.h5", stack(10))
    is_hdf5 = sources._is_hdf5

    def is_hdf5_then_deleted(p):
        answer = is_hdf5(p)
        os.remove(p)
        return answer

    monkeypatch.setattr(sources, "_is_hdf5", is_hdf5_then_deleted)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.as_source(path)


def zarr_stack(path, images, dataset="events/image"):
    import zarr

    group = zarr.open_group(str(path), mode="w")
    group.create_array(dataset, data=images, chunks=(10,) + images.shape[1:])
    return group


def test_open_inputs_of_every_kind_are_read_whole_and_exact(tmp_path):
    """A Zarr group (its dataset), an h5py file or group, as a notebook holds them."""
    images = stack(11, (60, 6, 8))
    expected = rolling_median_reference(images, 10)
    group = zarr_stack(tmp_path / "in.zarr", images)
    np.testing.assert_array_equal(rolling_median(group, 10).compute(), expected)
    with h5py.File(write_h5(tmp_path / "in.h5", images), "r") as h5:
        np.testing.assert_array_equal(
            rolling_median(h5["events"], 10, dataset="image").compute(), expected
        )
    # frames collected in a list, as a script gathers them: read as one array
    np.testing.assert_array_equal(rolling_median(list(images), 10).compute(), expected)


def bad_inputs_of_every_kind(tmp_path):
    """(input, error, message): a 2-D stack or a missing dataset, in every form
    an input takes; each message names the input as the user gave it."""
    import zarr

    flat = np.zeros((20, 16), dtype=np.uint8)
    zarr_path = tmp_path / "flat.zarr"
    group = zarr_stack(zarr_path, flat)
    h5_path = tmp_path / "flat.h5"
    with h5py.File(h5_path, "w") as h5:
        h5["events/image"] = flat
        h5["events/deform"] = np.zeros(20)
    h5 = h5py.File(h5_path, "r")
    ndim2 = r"has shape \(20, 16\) \(ndim=2\)"
    return h5, [
        (zarr_path, ValueError, rf"^Zarr array in '{zarr_path}' {ndim2}"),
        (group["events/image"], ValueError, f"^the Zarr array {ndim2}"),
        (sources.HDF5Reader(h5_path, "events/image"), ValueError, rf"^HDF5Reader\(.*\) {ndim2}"),
        (LazyStack(flat), ValueError, f"^the LazyStack {ndim2}"),
        (flat, ValueError, f"^the input array {ndim2}"),
        (h5["events/image"], ValueError, f"^dataset '/events/image' {ndim2}"),
        (h5, ValueError, f"^dataset '/events/image' {ndim2}"),
        (
            (zarr_path, "nope"),
            KeyError,
            "has no array 'nope'; it has: events/image; pass --dataset",
        ),
        ((group, "nope"), KeyError, "Zarr group has no array 'nope'; pass dataset=NAME"),
        ((h5, "nope"), KeyError, "has no dataset 'nope'; it has: events/deform, events/image"),
        (zarr.open_group(str(zarr_path), mode="r"), ValueError, f"^the Zarr array {ndim2}"),
    ]


def test_bad_inputs_of_every_kind_are_refused_with_their_name(tmp_path):
    h5, cases = bad_inputs_of_every_kind(tmp_path)
    with h5:
        for images, error, message in cases:
            images, dataset = images if isinstance(images, tuple) else (images, "events/image")
            with pytest.raises(error, match=message):
                rolling_median(images, 5, dataset=dataset)


def test_a_file_open_for_writing_is_refused(tmp_path):
    """Read-only is the lazy reader's contract: the user's writes would not be seen."""
    path = write_h5(tmp_path / "in.h5", stack(12))
    with h5py.File(path, "a") as h5:
        for images in (h5, h5["events/image"]):
            with pytest.raises(ValueError, match="is open for writing; open it read-only"):
                rolling_median(images, 5)


def test_zarr_on_disk_is_read_by_each_task_and_zarr_in_memory_through_map_overlap(tmp_path):
    """A store on disk pickles as its path: each task reads its own overlap and
    no overlap layer copies neighbours' rows. A store in memory would pickle
    its data into the tasks: it goes through map_overlap, as numpy does."""
    import zarr

    images = stack(13, (60, 6, 8))
    expected = rolling_median_reference(images, 10)
    group = zarr_stack(tmp_path / "in.zarr", images)
    in_memory = zarr.create_array(store=zarr.storage.MemoryStore(), data=images, chunks=(10, 6, 8))
    for images, stored in [(tmp_path / "in.zarr", True), (group["events/image"], True),
                           (in_memory, False)]:  # fmt: skip
        result = rolling_median(images, 10)
        layers = list(result.__dask_graph__().layers)
        assert any("overlap" in name for name in layers) != stored, layers
        np.testing.assert_array_equal(result.compute(), expected)


def test_blocks_are_whole_chunks_of_the_input(tmp_path):
    """Blocks join whole stored chunks of a file and whole chunks of a regular dask
    input (their last chunk no longer than the first), and keep its pixel tiles
    (whole frames for irregular ones): each chunk is then decompressed once, and
    dask rechunks by concatenation, never splitting a chunk. Speed and memory:
    the result is exact either way."""
    import dask.array as da

    images = stack(14, (300, 6, 8))
    expected = rolling_median_reference(images, 10)
    path = tmp_path / "in.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("events/image", data=images, chunks=(7, 6, 8))
    bg = rolling_median(path, 10, memory_budget="16KiB")
    assert len(bg.chunks[0]) > 2 and all(c % 7 == 0 for c in bg.chunks[0][:-1]), bg.chunks
    np.testing.assert_array_equal(bg.compute(), expected)
    for chunks, events, tiles in [
        ((50, 6, 8), (200, 100), ((6,), (8,))),  # blocks of lcm(50, 8)
        ((30, 3, 4), (120, 120, 60), ((3, 3), (4, 4))),  # lcm(30, 8), and the tiles
        ((50, 6, (3, 5)), None, ((6,), (8,))),  # tiles of 3 would split the 5: whole frames
    ]:
        bg = rolling_median(da.from_array(images, chunks=chunks), 10, align_events=8)
        assert bg.chunks[1:] == tiles and events in (None, bg.chunks[0]), bg.chunks
        np.testing.assert_array_equal(bg.compute(), expected)


def test_a_file_replaced_while_a_read_holds_it_open_is_read_anew(tmp_path):
    """Never stale in one process: a job that starts while another read still
    holds the old file open (a notebook, a batch) reads the file now on disk,
    not the shared handle of the file it replaced."""
    from rollmed_dask.example import write_example

    path = write_example(tmp_path / "input.rtdc", n_events=60, seed=1)
    new = write_example(tmp_path / "new.rtdc", n_events=60, seed=2)
    with sources.open_h5_readonly(str(path)) as held:  # the old file, still being read
        os.replace(new, path)
        compute_background(path, tmp_path / "bg.rtdc", 5, progress=False)
        assert held["events/image"].shape[0] == 60
    with h5py.File(path) as h5:
        expected = rolling_median_reference(h5["events/image"][:], 5)
    with h5py.File(tmp_path / "bg.rtdc") as h5:
        np.testing.assert_array_equal(h5["events/image_bg"][:], expected)
