"""The exact result: reference vs brute force, and the dask pipeline vs the reference.

Bit for bit, over stack lengths, kernel sizes (1, 2, odd, even, N-1), chunkings
(event chunks equal to K, just above K, not dividing N, one chunk, pixel tiles)
and dtypes, with a hypothesis property on top.
"""

import dask.array as da
import numpy as np
import pytest
from dask.array.utils import assert_eq
from hypothesis import given, settings
from hypothesis import strategies as st

from rollmed_dask import rolling_median, rolling_median_reference
from rollmed_dask.core import (
    check_kernel_size,
    median_windows_numpy,
    median_windows_scipy,
    select_engine,
)
from rollmed_dask.pipeline import (
    as_dask_array,
    plan_chunks,
    plan_event_chunks,
    rolling_median_dask,
)
from rollmed_dask.sources import as_source

DTYPES = ["uint8", "uint16", "int16", "float32", "float64"]
ENGINES = ["compiled", "scipy", "numpy"]


def brute_force(img, k):
    """The definition in the README, one event and one pixel at a time."""
    n = img.shape[0]
    out = np.empty_like(img)
    for j in range(n - k):
        for idx in np.ndindex(img.shape[1:]):
            out[(j, *idx)] = sorted(img[(slice(j, j + k), *idx)])[k // 2]
    out[n - k :] = out[n - k - 1]
    return out


def random_stack(rng, shape, dtype, high=7):
    """Few distinct values so that ties, the hard case for medians, are common."""
    values = rng.integers(0, high, size=shape)
    if np.dtype(dtype).kind == "i":
        values -= high // 2
    if np.dtype(dtype).kind == "f":
        return (values * 0.5).astype(dtype)
    return values.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k"), [(2, 1), (5, 1), (5, 2), (6, 3), (9, 4), (12, 11), (13, 6)])
def test_reference_matches_brute_force(n, k, dtype):
    img = random_stack(np.random.default_rng(n * 31 + k), (n, 2, 3), dtype)
    result = rolling_median_reference(img, k)
    assert result.dtype == img.dtype
    np.testing.assert_array_equal(result, brute_force(img, k))


def test_reference_never_reads_the_last_event():
    img = np.zeros((10, 1, 1), dtype=np.uint8)
    img[-1] = 255
    np.testing.assert_array_equal(rolling_median_reference(img, 1), 0)


def test_reference_even_kernel_is_upper_median():
    img = np.array([1, 9, 0, 0, 0], dtype=np.float32).reshape(5, 1, 1)
    # window [1, 9]: the upper median is 9, not the average 5
    assert rolling_median_reference(img, 2)[0, 0, 0] == 9


@pytest.mark.parametrize("kernel", [median_windows_numpy, median_windows_scipy])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_window_kernels_match_reference(kernel, dtype, k):
    img = random_stack(np.random.default_rng(k), (40, 3, 5), dtype)
    expected = rolling_median_reference(img, k)[: 40 - k]
    np.testing.assert_array_equal(kernel(img[:-1], k), expected)


CASES = [
    # n, k, event_chunk
    (2, 1, None),
    (3, 2, None),
    (17, 1, 1),
    (17, 2, 2),
    (17, 3, 3),
    (30, 4, 5),
    (31, 4, 4),
    (31, 7, 10),
    (50, 10, 10),
    (50, 10, 11),
    (50, 10, 13),
    (50, 10, 25),
    (50, 10, 49),
    (50, 49, None),
    (64, 9, 16),
    (101, 20, 30),
    (101, 20, 100),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("n", "k", "event_chunk"), CASES)
def test_pipeline_matches_reference(n, k, event_chunk, engine):
    img = random_stack(np.random.default_rng(n + k), (n, 3, 4), "uint8")
    result = rolling_median(img, k, engine=engine, event_chunk=event_chunk)
    assert result.chunks[0] == plan_event_chunks(
        n, k, 1, event_chunk=event_chunk, memory_budget=10**9
    )
    assert_eq(result, rolling_median_reference(img, k), scheduler="sync")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pipeline_dtypes(dtype, engine):
    img = random_stack(np.random.default_rng(3), (60, 4, 6), dtype, high=50)
    result = rolling_median(img, 8, engine=engine, event_chunk=12)
    assert result.dtype == img.dtype
    assert_eq(result, rolling_median_reference(img, 8), scheduler="threads")


@pytest.mark.parametrize("tile", [(1, 1), (2, 3), (4, 6), (3, 4)])
def test_pixel_tiles_follow_storage_chunks(tile):
    img = random_stack(np.random.default_rng(5), (70, 4, 6), "uint16", high=1000)
    source = as_source(img)
    storage = (10,) + tile
    chunks = plan_chunks(img.shape, img.dtype, 9, storage, event_chunk=20)
    assert chunks[1][0] == tile[0] and chunks[2][0] == tile[1]
    assert all(c % 10 == 0 for c in chunks[0][:-1])
    result = rolling_median_dask(as_dask_array(source, chunks), 9, "compiled")
    assert result.chunks == chunks
    assert_eq(result, rolling_median_reference(img, 9), scheduler="threads")


def test_dask_input_with_chunks_shorter_than_k_is_rechunked_exactly():
    img = random_stack(np.random.default_rng(6), (90, 3, 3), "float32")
    x = da.from_array(img, chunks=(4, 2, 2))
    result = rolling_median(x, 15)
    assert min(result.chunks[0]) >= 15
    assert_eq(result, rolling_median_reference(img, 15))


def test_chunks_shorter_than_k_are_refused_not_rechunked():
    img = np.zeros((40, 2, 2), dtype=np.uint8)
    x = da.from_array(img, chunks=(5, 2, 2))
    with pytest.raises(ValueError, match="at least kernel_size=10"):
        rolling_median_dask(x, 10)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(2, 90),
    data=st.data(),
    engine=st.sampled_from(ENGINES),
)
def test_irregular_dask_chunks_are_kept_and_exact(n, data, engine):
    """Any dask chunking: chunks of K or more stay, only shorter runs are joined."""
    k = data.draw(st.integers(1, n - 1), label="k")
    cuts = data.draw(st.sets(st.integers(1, n - 1)), label="cuts")
    events = tuple(np.diff([0, *sorted(cuts), n]).tolist())
    pixels = data.draw(st.sampled_from([(3, 4), (1, 4), (2, 2), ((1, 2), (3, 1))]), label="tile")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    img = random_stack(np.random.default_rng(seed), (n, 3, 4), "uint16", high=9)
    x = da.from_array(img, chunks=(events, *pixels))
    result = rolling_median(x, k, engine=engine)
    assert result.chunks[1:] == x.chunks[1:], "pixel chunks as they came"
    bounds = np.cumsum((0,) + events)
    merged = np.cumsum((0,) + result.chunks[0])
    assert set(merged) <= set(bounds), "input chunks are only ever joined, never cut"
    for start, stop in zip(merged[:-1], merged[1:], strict=True):
        inside = events[list(bounds).index(start) : list(bounds).index(stop)]
        assert len(inside) == 1 or min(inside) < k, "long chunks are joined only to short ones"
    if len(result.chunks[0]) > 1:
        assert min(result.chunks[0]) >= k
    np.testing.assert_array_equal(
        result.compute(scheduler="sync"), rolling_median_reference(img, k)
    )


def test_dask_chunks_long_enough_are_not_rechunked():
    img = random_stack(np.random.default_rng(8), (100, 4, 6), "uint8")
    x = da.from_array(img, chunks=((30, 12, 41, 17), (1, 3), (6,)))
    result = rolling_median(x, 12)
    assert result.chunks == x.chunks
    assert not any("rechunk" in name for name in result.__dask_graph__().layers)
    np.testing.assert_array_equal(result.compute(), rolling_median_reference(img, 12))
    with pytest.raises(ValueError, match="event_chunk=5 is shorter than kernel_size=10"):
        rolling_median(img, 10, event_chunk=5)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 80),
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    engine=st.sampled_from(ENGINES),
)
def test_any_chunking_gives_the_reference(n, data, dtype, engine):
    k = data.draw(st.integers(1, n - 1), label="k")
    event_chunk = data.draw(st.one_of(st.none(), st.integers(k, max(k, n))), label="chunk")
    tile = data.draw(st.tuples(st.integers(1, 3), st.integers(1, 4)), label="tile")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    img = random_stack(np.random.default_rng(seed), (n, 3, 4), dtype)
    chunks = plan_chunks(img.shape, img.dtype, k, (1,) + tile, event_chunk=event_chunk)
    result = rolling_median_dask(as_dask_array(as_source(img), chunks), k, engine)
    np.testing.assert_array_equal(
        result.compute(scheduler="sync"), rolling_median_reference(img, k)
    )


@pytest.fixture(scope="module")
def zarr_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zarr-sources")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 80),
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    engine=st.sampled_from(ENGINES),
)
def test_sources_on_disk_read_their_own_overlap_exactly(zarr_dir, n, data, dtype, engine):
    """Stored sources take the other graph: one task a block, reading its own overlap."""
    import zarr

    k = data.draw(st.integers(1, n - 1), label="k")
    event_chunk = data.draw(st.one_of(st.none(), st.integers(k, max(k, n))), label="chunk")
    store_chunks = data.draw(st.tuples(st.integers(1, 9), st.integers(1, 3), st.integers(1, 4)))
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    img = random_stack(np.random.default_rng(seed), (n, 3, 4), dtype)
    array = zarr.create_array(
        store=str(zarr_dir / f"s{seed}.zarr"), data=img, chunks=store_chunks, overwrite=True
    )
    source = as_source(array)
    assert source.pickles_small
    result = rolling_median(source, k, engine=engine, event_chunk=event_chunk)
    assert not any("overlap" in name for name in result.__dask_graph__().layers)
    np.testing.assert_array_equal(
        result.compute(scheduler="sync"), rolling_median_reference(img, k)
    )


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 10**7),
    k=st.integers(1, 5000),
    unit=st.integers(1, 1000),
    budget=st.integers(1, 2**31),
)
def test_planner_invariants(n, k, unit, budget):
    chunks = plan_event_chunks(n, k, 25600, unit=unit, memory_budget=budget)
    assert sum(chunks) == n
    assert len(set(chunks[:-1])) <= 1, "all but the last chunk have one length"
    if len(chunks) > 1:
        assert chunks[0] % unit == 0
        assert min(chunks) >= k, "dask would silently rechunk a chunk shorter than K"


@pytest.mark.parametrize("cores", [2, 3, 8])
@given(n=st.integers(1, 10**6), k=st.integers(1, 500), unit=st.sampled_from([1, 40, 64]))
@settings(max_examples=50, deadline=None)
def test_planner_ends_in_whole_rounds_within_the_same_rules(cores, n, k, unit):
    from unittest import mock

    plain = plan_event_chunks(n, k, 25600, unit=unit, min_blocks=1)
    with mock.patch("os.cpu_count", return_value=cores):
        chunks = plan_event_chunks(n, k, 25600, unit=unit, min_blocks=2 * cores)
    assert sum(chunks) == n
    assert len(set(chunks[:-1])) <= 1, "all but the last chunk have one length"
    assert chunks[0] <= plain[0], "never over the memory budget"
    if len(chunks) > 1:
        assert chunks[0] % unit == 0
        assert min(chunks) >= k


def test_planner_gives_two_cores_whole_rounds(monkeypatch):
    """9 blocks (8 x 2400 + 800) would leave one core idle through the last one."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert plan_event_chunks(20000, 100, 25600, unit=40, min_blocks=4) == (2000,) * 10


def test_planner_respects_memory_budget():
    chunks = plan_event_chunks(10**6, 100, 25600, unit=40, memory_budget="256MiB")
    assert 4 * 25600 * (chunks[0] + 2 * 100) <= 256 * 2**20
    assert chunks[0] % 40 == 0


def test_graph_for_ten_million_events_is_small():
    x = da.zeros((10**7, 80, 320), dtype=np.uint8, chunks=(40, 80, 320))
    result = rolling_median(x, 100)
    # event chunks are whole multiples of the input's 40-frame chunks
    assert result.chunks[0] == plan_event_chunks(10**7, 100, 25600, unit=40, min_blocks=4)
    # a handful of tasks per block, never one per frame
    assert len(result.__dask_graph__()) < 10 * result.numblocks[0] + 10**7 / 40 * 2


@pytest.mark.parametrize(
    ("k", "n", "message"),
    [
        (0, 10, "kernel_size=0 must be at least 1"),
        (-3, 10, "kernel_size=-3 must be at least 1"),
        (10, 10, r"kernel_size=10 must be smaller than the number of events \(10\)"),
        (2.5, 10, "kernel_size=2.5 must be a whole number"),
        (True, 10, "kernel_size=True must be a whole number"),
        ("5", 10, "kernel_size='5' must be a whole number"),
        (3, 0, "no events"),
    ],
)
def test_bad_kernel_size(k, n, message):
    with pytest.raises(ValueError, match=message):
        check_kernel_size(k, n)


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((10, 4), "uint8", r"ndim=2.*\(events, height, width\)"),
        ((10, 4, 4, 3), "uint8", "ndim=4"),
        ((10, 4, 4), "bool", "dtype bool are not supported"),
        ((10, 4, 4), "complex64", "dtype complex64 are not supported"),
    ],
)
def test_bad_stacks(shape, dtype, message):
    with pytest.raises(ValueError, match=message):
        rolling_median(np.zeros(shape, dtype=dtype), 3)


def test_unknown_engine():
    with pytest.raises(ValueError, match="engine='fast' is not known"):
        select_engine("fast", np.uint8)


@pytest.mark.parametrize(
    ("n", "k", "unit", "min_blocks", "expected", "rule"),
    [
        # blocks of 280 would end sooner if reading the overlap were free
        (1569, 20, 40, 4, (360, 360, 360, 360, 129), "a block costs its events plus K"),
        # counting a 1-event tail as its own block makes 22 look better than 21
        (85, 5, 1, 4, (21, 21, 21, 22), "a tail shorter than K joins the last block"),
        # (30, 11) would split 41 events into blocks shorter than 4K = 40
        (41, 10, 1, 2, (41,), "never blocks shorter than 4K"),
        # a tail shorter than K left out of the cost makes (23, 27) look as good
        (50, 5, 1, 2, (25, 25), "the tail's events count"),
        # the shortest length tried (3/4 of 40, in units of 10) is the best here
        (173, 5, 10, 4, (30, 30, 30, 30, 30, 23), "3/4 of the length is tried too"),
    ],
)
def test_whole_rounds_keeps_the_planners_rules(monkeypatch, n, k, unit, min_blocks, expected,
                                               rule):  # fmt: skip
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert plan_event_chunks(n, k, 25600, unit=unit, min_blocks=min_blocks) == expected, rule
