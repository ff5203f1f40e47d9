"""The compiled window kernel is bit-identical to the numpy reference.

``median_windows_compiled`` picks one of four algorithms per block of pixels
from the block's value range and K (256-bin histogram, 65536-bin histogram,
sorted window, rank compression) and maps every dtype to unsigned keys, so the
data below are chosen to reach each path in every dtype: ties, narrow ranges
away from zero, 16-bit ranges, full ranges with the dtype's extremes, large K,
and for floats -0.0, NaNs with any sign and payload, and infinities. Outputs
are compared as raw bits, so signed zeros and NaN payloads must match too.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rollmed_dask import _kernels
from rollmed_dask.core import median_windows_numpy
from rollmed_dask.kernels import median_windows_compiled

DTYPES = ["uint8", "uint16", "int16", "int32", "int64", "uint32", "float32", "float64"]
ALL_DTYPES = [*DTYPES, "int8", "uint64", "float16"]
M = 23


def bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of ``a`` as unsigned integers of the same width and byte order."""
    a = np.ascontiguousarray(a)
    return a.view(a.dtype.str.replace("f", "u").replace("i", "u"))


def assert_identical(got: np.ndarray, expected: np.ndarray, msg: str = "") -> None:
    assert got.dtype == expected.dtype, msg
    assert got.shape == expected.shape, msg
    np.testing.assert_array_equal(bits(got), bits(expected), err_msg=msg)


def check_all_k(stack: np.ndarray, ks=(1, 2, 3, 4, 5, 10, None)) -> None:
    """Compare with the reference for every K in ``ks`` (None: K = M)."""
    for k in ks:
        k = stack.shape[0] if k is None else k
        expected = median_windows_numpy(stack, k)
        assert_identical(median_windows_compiled(stack, k), expected, f"K={k}")


def float_pool(dtype) -> np.ndarray:
    """Special values: signed zeros, NaNs of both signs and with payloads, extremes."""
    dtype = np.dtype(dtype)
    fi = np.finfo(dtype)
    values = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 2.5, fi.max, fi.min, fi.tiny,
         fi.smallest_subnormal, -fi.smallest_subnormal],
        dtype=dtype,
    )  # fmt: skip
    ut = np.dtype(f"u{dtype.itemsize}").type
    sign = 1 << (8 * dtype.itemsize - 1)
    nan = int(np.array(np.nan, dtype=dtype).view(ut))
    odd_nans = np.array([nan | sign, nan | 1, nan | sign | 3], dtype=ut).view(dtype)
    return np.concatenate([values, odd_nans])


def make_data(dtype, kind: str, shape, seed: int = 0) -> np.ndarray:
    """Test data of one ``kind``, chosen to exercise one kernel path (or several)."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        if kind == "special":
            return rng.choice(float_pool(dtype), size=shape)
        if kind == "ties":
            return rng.integers(-2, 3, size=shape).astype(dtype)
        if kind == "constant":
            return np.full(shape, -0.0, dtype=dtype)
        # "narrow", "mid", "wide": plain floats of growing spread
        scale = {"narrow": 1.0, "mid": 100.0, "wide": 1e4}[kind]
        return (rng.standard_normal(shape) * scale).astype(dtype)
    info = np.iinfo(dtype)
    if kind == "special":  # the extremes and their neighbours
        pool = np.array([info.min, info.min + 1, info.max - 1, info.max, 0, 1], dtype=dtype)
        return rng.choice(pool, size=shape)
    if kind == "ties":
        lo = 0 if info.min == 0 else -2
        return rng.integers(lo, lo + 5, size=shape).astype(dtype)
    if kind == "constant":
        return np.full(shape, info.max, dtype=dtype)
    # "narrow": span < 256 away from 0, "mid": span < 65536, "wide": full range
    span = {"narrow": 255, "mid": 40_000, "wide": None}[kind]
    if span is None or span >= int(info.max) - int(info.min):
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    lo = int(info.max) - span
    return rng.integers(lo, info.max, size=shape, dtype=dtype, endpoint=True)


KINDS = ["ties", "narrow", "mid", "wide", "special", "constant"]
SHAPES = {
    "1d": (M,),
    "1x1": (M, 1, 1),
    "5x7": (M, 5, 7),
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_matches_reference(dtype, kind, shape):
    check_all_k(make_data(dtype, kind, SHAPES[shape]))


@pytest.mark.parametrize("kind", ["ties", "wide", "special"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_non_contiguous_views(dtype, kind):
    big = make_data(dtype, kind, (2 * M, 9, 13), seed=1)
    views = {
        "pixel tile": big[:M, 2:7, 3:10],
        "event stride": big[::2],
        "reversed": big[::-1, ::-1],
        "fortran": np.asfortranarray(big[:M]),
        "column": big[:M, :, 4],
    }
    for name, view in views.items():
        for k in (1, 2, 5, view.shape[0]):
            assert_identical(
                median_windows_compiled(view, k), median_windows_numpy(view, k), f"{name} K={k}"
            )


@pytest.mark.parametrize("dtype", [">u2", ">i4", ">f4", ">f8", "<f8"])
def test_byte_order_is_kept(dtype):
    stack = make_data(np.dtype(dtype).newbyteorder("="), "special", (M, 3)).astype(dtype)
    check_all_k(stack, ks=(1, 2, 7))


@pytest.mark.parametrize("dtype", ["uint16", "int32", "uint32", "int64", "uint64", "float32"])
def test_blocks_with_different_paths(dtype):
    """Pixel blocks of 512 choose their kernel each; partial blocks at the end."""
    info = np.iinfo(dtype) if np.dtype(dtype).kind != "f" else None
    rng = np.random.default_rng(3)
    stack = make_data(dtype, "wide", (M, 1301), seed=2)
    stack[:, :512] = make_data(dtype, "narrow", (M, 512), seed=4)
    if info is not None:
        stack[:, 512:1024] = rng.integers(
            info.max - 1000, info.max, (M, 512), dtype=dtype, endpoint=True
        )
    check_all_k(stack, ks=(2, 5, M))


@pytest.mark.parametrize("span", [255, 256, 65535, 65536])
@pytest.mark.parametrize("dtype", ["uint16", "int16", "int32", "uint32", "int64", "uint64"])
def test_range_boundaries(dtype, span):
    """Spans at the switch between the 256-bin, 65536-bin and sorted kernels."""
    info = np.iinfo(dtype)
    span = min(span, int(info.max) - int(info.min))
    rng = np.random.default_rng(span)
    # unsigned: next to the maximum; signed: across zero
    lo = int(info.max) - span if info.min == 0 else max(int(info.min), -(span // 2) - 1)
    stack = rng.integers(lo, lo + span, size=(M, 40), dtype=dtype, endpoint=True)
    stack[0, :] = lo
    stack[1, :] = lo + span  # every block sees exactly this span
    check_all_k(stack, ks=(2, 3, 10, M))


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32", "float64"])
def test_kernel_larger_than_count_width(dtype):
    """K >= 65536 needs 32-bit histogram counts."""
    k = 65_537
    kind = "ties" if dtype in ("uint8", "float64") else "mid"  # 256 / 65536 bins / sorted
    stack = make_data(dtype, kind, (k + 4, 2), seed=5)
    stack[: k // 2 + 3, 0] = stack.max()  # the median sits at a count boundary
    assert_identical(median_windows_compiled(stack, k), median_windows_numpy(stack, k))


@pytest.mark.parametrize("kind", ["wide", "ties", "special"])
@pytest.mark.parametrize("dtype", ["uint32", "int32", "int64", "uint64", "float32", "float64"])
def test_large_kernels(dtype, kind):
    """Large K on wide keys: sorted windows, or rank compression from K = 80/128."""
    stack = make_data(dtype, kind, (300, 3, 7), seed=6)
    stack[:, 0, 0] = make_data(dtype, "wide", 300, seed=7)  # keep every block wide
    check_all_k(stack, ks=(64, 79, 80, 100, 127, 128, 151, 300))


def test_too_many_frames_for_ranks():
    """With more than 65536 frames, ranks would not fit 16 bits: sorted windows."""
    stack = make_data("uint32", "wide", (65_600, 2), seed=8)
    k = 130
    rows = slice(65_600 - k - 40, None)  # the reference only where it is cheap
    expected = median_windows_numpy(stack[rows], k)
    assert_identical(median_windows_compiled(stack, k)[-expected.shape[0] :], expected)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_many_ambiguous_float_windows(dtype):
    """More than 1024 windows whose median bits numpy picks among equals."""
    rng = np.random.default_rng(7)
    zeros = rng.choice(np.array([0.0, -0.0], dtype=dtype), size=(60, 50))
    pool = float_pool(dtype)
    nans = rng.choice(pool[np.isnan(pool)], size=(60, 50))
    for stack in (zeros, nans, np.where(rng.random((60, 50)) < 0.5, zeros, nans)):
        check_all_k(stack, ks=(2, 3, 8, 60))


def test_empty_pixels_and_single_window():
    stack = np.zeros((M, 0, 4), dtype=np.uint8)
    assert median_windows_compiled(stack, 3).shape == (M - 2, 0, 4)
    stack = make_data("int16", "ties", (M, 2, 2))
    assert median_windows_compiled(stack, M).shape == (1, 2, 2)


def test_output_is_new_array():
    stack = make_data("uint8", "ties", (M, 3))
    for k in (1, 3):
        out = median_windows_compiled(stack, k)
        assert not np.shares_memory(out, stack)


@pytest.mark.parametrize("k", [0, -1, M + 1, True, 2.0, "3", None])
def test_bad_kernel_size(k):
    with pytest.raises(ValueError, match="kernel_size"):
        median_windows_compiled(np.zeros((M, 2), dtype=np.uint8), k)


@pytest.mark.parametrize("dtype", [bool, complex, np.longdouble, object, "M8[s]", "U3"])
def test_bad_dtype(dtype):
    if np.dtype(dtype).kind == "f" and np.dtype(dtype).itemsize == 8:
        pytest.skip("longdouble is float64 on this platform")
    with pytest.raises(ValueError, match="dtype"):
        median_windows_compiled(np.zeros((M, 2), dtype=dtype), 3)


def test_zero_dimensional():
    with pytest.raises(ValueError, match="event axis"):
        median_windows_compiled(np.array(3, dtype=np.uint8), 1)


def test_threads_share_the_kernels():
    """Two threads at once (as dask runs them) get their own, exact results."""
    stacks = [make_data(dt, "mid", (200, 700), seed=s) for s, dt in enumerate(DTYPES)]
    results = {}

    def run(i):
        results[i] = median_windows_compiled(stacks[i], 31)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(stacks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, stack in enumerate(stacks):
        assert_identical(results[i], median_windows_numpy(stack, 31), DTYPES[i])


def test_kernels_release_the_gil():
    """This thread sees a kernel call's output half written while the call runs.

    The call writes its output pixel block by pixel block; a half-written
    output can only be seen from another thread while the call is inside C.
    With the GIL held for the whole call, this thread only runs before or after
    a call and sees the output all unwritten or all written. The other thread
    makes up to 20 calls (about 1 s each), so that a busy machine that does not
    schedule this thread during one call still gives it its chance.
    """
    rng = np.random.default_rng(9)
    stack = rng.integers(0, 40_000, size=(400, 20_000), dtype=np.uint16)
    current = {"out": None}
    seen_half_written = threading.Event()

    def run():
        for _ in range(20):
            out = np.full((400 - 99, 20_000), 65535, dtype=np.uint16)  # no median is 65535
            current["out"] = out
            _kernels.median_keys(stack, out, 400, 20_000, 100, 2)
            if seen_half_written.is_set():
                return

    t = threading.Thread(target=run)
    t.start()
    while t.is_alive() and not seen_half_written.is_set():
        out = current["out"]
        if out is not None:
            unwritten = out[-1] == 65535  # the last row, block by block
            if unwritten.any() and not unwritten.all():
                seen_half_written.set()
    t.join()
    assert seen_half_written.is_set()


def test_import_loads_no_jit_and_compiles_nothing():
    code = (
        "import sys, numpy as np\n"
        "import rollmed_dask.kernels as kn\n"
        "kn.median_windows_compiled(np.arange(60, dtype=np.float32).reshape(20, 3), 5)\n"
        "assert not {'numba', 'llvmlite', 'scipy'} & set(sys.modules), sorted(sys.modules)\n"
        "assert kn._kernels.__file__.endswith(('.so', '.pyd')), kn._kernels.__file__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# Bit patterns to draw from, per dtype: small ranges so that ties are common,
# next to the dtype's extremes, and the float specials.
def _pool(dtype: str) -> list:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        pool = np.concatenate([float_pool(dt), np.arange(-3, 4, dtype=dt)])
        return sorted(set(bits(pool).tolist()))
    info = np.iinfo(dt)
    around = [info.min, info.min + 1, -3, -2, -1, 0, 1, 2, 3, 300, info.max - 1, info.max]
    return sorted({int(v) for v in around if info.min <= v <= info.max})


@st.composite
def stacks(draw, dtypes=ALL_DTYPES, frames=(1, 40)):
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    m = draw(st.integers(*frames))
    tail = draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
    pool = _pool(dtype.name)
    # a handful of distinct values per stack: ties everywhere
    chosen = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=5, unique=True))
    ut = np.dtype(f"u{dtype.itemsize}") if dtype.kind != "i" else dtype
    raw = draw(hnp.arrays(ut, (m, *tail), elements=st.sampled_from(chosen)))
    stack = raw.view(dtype) if dtype.kind == "f" else raw.astype(dtype)
    k = draw(st.integers(max(1, min(m, frames[0] - 40)), m))
    return stack, k


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks())
def test_property_matches_reference(case):
    stack, k = case
    assert_identical(median_windows_compiled(stack, k), median_windows_numpy(stack, k))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stacks(dtypes=["int32", "uint32", "int64", "uint64", "float32", "float64"], frames=(80, 200))
)
def test_property_large_kernels(case):
    """Large K on wide dtypes, with ties: the rank-compression path."""
    stack, k = case
    assert_identical(median_windows_compiled(stack, k), median_windows_numpy(stack, k))
