"""``pipeline.block_tasks``: the one way a job's graph is made, for every kind of source.

Each task computes the exact background rows of its block and hands them, with
the block's start, to ``finish``; the blocks tile the stack in order, whatever
the chunking (non-uniform dask chunks included), and graph keys are tokenized.
"""

import gc
import threading
import weakref

import dask
import dask.array as da
import h5py
import numpy as np
import pytest
import zarr

from rollmed_dask import rolling_median_reference
from rollmed_dask.pipeline import block_tasks, plan_block_tasks, plan_source_chunks
from rollmed_dask.sources import as_source

N, K = 230, 12


def stack(seed=0, shape=(N, 6, 10)):
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def keep(rows, start):
    """A finish that keeps the rows and the start the task was given."""
    return start, np.array(rows)


def other_keep(rows, start):
    return start, np.array(rows)


def write_h5(path, images, chunk=10):
    with h5py.File(path, "w") as h5:
        h5.create_dataset("events/image", data=images, chunks=(chunk,) + images.shape[1:])
    return path


def sources(tmp_path, images):
    """The same stack as every kind of source the pipeline takes."""
    store = zarr.create_array(store=str(tmp_path / "x.zarr"), data=images, chunks=(10, 3, 5))
    return {
        "numpy": images,
        "hdf5": write_h5(tmp_path / "x.h5", images),
        "zarr": store,
        "dask": da.from_array(images, chunks=(40, 3, 5)),
    }


def check_blocks(blocks, images, k):
    """Blocks tile [0, N) in order; each computes finish(rows, its own start)."""
    assert blocks[0].start == 0 and blocks[-1].stop == len(images)
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:], strict=False))
    results = dask.compute(*(b.task for b in blocks), scheduler="threads")
    expected = rolling_median_reference(images, k)
    for block, (start, rows) in zip(blocks, results, strict=True):
        assert start == block.start
        np.testing.assert_array_equal(rows, expected[block.start : block.stop])


@pytest.mark.parametrize("kind", ["numpy", "hdf5", "zarr", "dask"])
def test_every_source_gives_exact_blocks_of_whole_frames(kind, tmp_path):
    images = stack(1)
    src = as_source(sources(tmp_path, images)[kind])
    chunks = plan_block_tasks(src, K, event_chunk=30, align_events=10)
    blocks = block_tasks(src, K, "numpy", chunks, keep)
    assert len(blocks) == len(chunks[0]) > 1
    check_blocks(blocks, images, K)


def test_stored_source_tasks_are_one_per_block_and_need_no_dask_array(tmp_path):
    src = as_source(write_h5(tmp_path / "x.h5", stack(2)))
    assert src.pickles_small
    chunks = plan_block_tasks(src, K, event_chunk=40, align_events=10)
    blocks = block_tasks(src, K, "numpy", chunks, keep)
    assert all(type(b.task).__module__ == "dask.delayed" for b in blocks)
    # one layer: the view and one task per block, none reading another's rows
    graph = dict(blocks[0].task.__dask_graph__())
    assert len(graph) == len(blocks) + 1


def test_non_uniform_dask_chunks_learn_their_start_from_dask():
    images = stack(3)
    x = da.from_array(images, chunks=((50, 13, 70, 24, 73), 6, 10))
    src = as_source(x)
    chunks = plan_source_chunks(src, K)
    assert chunks[0] == (50, 13, 70, 24, 73), "dask chunks of K or more are kept"
    blocks = block_tasks(src, K, "numpy", chunks, keep)
    assert [b.start for b in blocks] == [0, 50, 63, 133, 157]
    check_blocks(blocks, images, K)


def test_keys_are_tokenized_by_input_and_finish(tmp_path):
    images = stack(4)
    path = write_h5(tmp_path / "x.h5", images)
    chunks = plan_block_tasks(as_source(images), K, event_chunk=30, align_events=10)

    def keys(images, finish=keep, k=K):
        return {b.task.key for b in block_tasks(as_source(images), k, "numpy", chunks, finish)}

    for same, other in ((images, stack(5)), (path, write_h5(tmp_path / "y.h5", stack(5)))):
        assert keys(same) == keys(same.copy() if isinstance(same, np.ndarray) else same)
        assert not keys(same) & keys(same, other_keep), "two sinks on one input"
        assert not keys(same) & keys(same, keep, K + 1)
        assert not keys(same) & keys(other)


def test_stored_blocks_must_be_whole_frames(tmp_path):
    src = as_source(write_h5(tmp_path / "x.h5", stack(6)))
    tiled = plan_source_chunks(src, K, event_chunk=40)[:1] + ((3, 3), (5, 5))
    with pytest.raises(ValueError, match="whole frames.*plan_block_tasks"):
        block_tasks(src, K, "numpy", tiled, keep)


def _blocks(count, nbytes=2**20, seconds=0.0):
    def block(i):
        import os
        import time

        time.sleep(seconds)
        where = (os.getpid(), threading.get_ident())
        return {"i": i, "where": where, "rows": np.full(nbytes, i, np.uint8)}

    return [dask.delayed(block)(i, dask_key_name=f"block-{i}") for i in range(count)]


@pytest.mark.parametrize("scheduler", ["threads", "synchronous"])
def test_a_written_block_is_not_kept_until_the_end(scheduler):
    """Out of core: once ``on_result`` has a block, the local scheduler holds it no
    more (dask keeps a compute's results until it returns, all N of them)."""
    from rollmed_dask.scheduling import resolve_scheduler, stream_blocks

    alive = []

    def on_result(result):
        gc.collect()
        alive.append(sum(ref() is not None for ref in refs))
        refs.append(weakref.ref(result["rows"]))

    refs = []
    stream_blocks(_blocks(8), on_result, resolve_scheduler(scheduler), num_workers=1)
    assert len(alive) == 8 and max(alive) == 0, alive


@pytest.mark.parametrize(
    "scheduler, workers", [("threads", 2), ("processes", 1), ("processes", 2)]
)
def test_local_schedulers_use_the_workers_asked_for(scheduler, workers):
    from rollmed_dask.scheduling import resolve_scheduler, stream_blocks

    where = set()
    stream_blocks(_blocks(4, nbytes=1, seconds=0.5),
                  lambda result: where.add(result["where"]),
                  resolve_scheduler(scheduler), num_workers=workers)  # fmt: skip
    assert len(where) == workers, where
