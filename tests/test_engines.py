"""Every engine gives the reference's bits for every dtype it accepts, and refuses
the others with one clear line.

The reference (``np.partition``) sorts NaN last and keeps the bits of the value
it selects, so the matrix holds NaNs (with payloads and signs), infinities,
both zeros, and integers above 2**53, where float64 arithmetic would round.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollmed_dask import rolling_median, rolling_median_reference
from rollmed_dask.core import get_window_kernel, select_engine

UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _nan(dtype, bits):
    return np.array([bits], dtype=UINT[np.dtype(dtype).itemsize]).view(dtype)[0]


def value_pool(dtype) -> np.ndarray:
    """Few distinct values per dtype, with the hard cases of its kind."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        pool = [-np.inf, -1.5, -0.0, 0.0, 0.5, 2.0, np.inf, np.nan, -np.nan]
        values = np.array(pool, dtype=dtype)
        if dtype.itemsize in UINT:  # NaNs with payloads, which only bits tell apart
            quiet = {2: 0x7E01, 4: 0x7FC00001, 8: 0x7FF8000000000001}[dtype.itemsize]
            values = np.append(values, [_nan(dtype, quiet), _nan(dtype, quiet + 1)])
        return values
    info = np.iinfo(dtype)
    if dtype.itemsize == 8:  # neighbours above 2**53 that float64 cannot tell apart
        big = 2**62 if dtype.kind == "i" else 2**64 - 8
        return np.array([info.min, 0, 2**53 + 1, big, big + 1, big + 2, info.max], dtype=dtype)
    return np.array([info.min, info.min + 1, 0, 1, info.max - 1, info.max], dtype=dtype)


def random_stack(seed, shape, dtype):
    pool = value_pool(dtype)
    return pool[np.random.default_rng(seed).integers(0, len(pool), size=shape)]


def assert_same_bits(result, expected):
    assert result.dtype == expected.dtype
    if expected.dtype.kind == "f" and expected.dtype.itemsize in UINT:
        ut = UINT[expected.dtype.itemsize]
        np.testing.assert_array_equal(result.view(ut), expected.view(ut))
    else:  # longdouble carries padding bytes: compare values, NaNs and signs
        np.testing.assert_array_equal(result, expected)
        np.testing.assert_array_equal(np.signbit(result), np.signbit(expected))


DTYPES = [
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
    "float16",
    "float32",
    "float64",
    "longdouble",
]
ENGINES = ["auto", "compiled", "numba", "scipy", "numpy"]
# what an engine cannot compute exactly, and the error that says so
REFUSED = {
    ("scipy", "uint64"): "rounds integers above 2\\*\\*53",
    ("scipy", "int64"): "rounds integers above 2\\*\\*53",
    ("scipy", "longdouble"): "does not support",
    ("compiled", "longdouble"): "has no kernel",
    ("numba", "longdouble"): "has no kernel",
}


def refusal(engine, dtype):
    return REFUSED.get((engine, np.dtype(dtype).name if dtype != "longdouble" else dtype))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_dtype_matrix(engine, dtype):
    img = random_stack(DTYPES.index(dtype), (90, 3, 7), dtype)
    message = refusal(engine, dtype)
    if message:
        with pytest.raises(ValueError, match=message) as refused:
            rolling_median(img, 10, engine=engine)
        assert f"engine='{engine}'" in str(refused.value)
        assert str(np.dtype(dtype)) in str(refused.value)
        assert "pass engine='auto'" in str(refused.value)
        return
    for k in (1, 2, 7, 10):
        result = rolling_median(img, k, engine=engine, event_chunk=25).compute()
        assert_same_bits(result, rolling_median_reference(img, k))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("engine", ["compiled", "scipy"])
def test_one_nan_leaves_the_other_medians_alone(engine, dtype):
    img = np.arange(40 * 6, dtype=dtype).reshape(40, 2, 3) % 23
    img[5, 0, 0] = np.nan
    result = rolling_median(img, 8, engine=engine).compute()
    assert_same_bits(result, rolling_median_reference(img, 8))


def test_scipy_engine_is_exact_above_2_53():
    img = (np.arange(30, dtype=np.int64) % 7 + 2**60).reshape(30, 1, 1)
    with pytest.raises(ValueError, match="pass engine='auto'"):
        rolling_median(img, 5, engine="scipy")
    assert_same_bits(rolling_median(img, 5).compute(), rolling_median_reference(img, 5))


def test_auto_takes_the_numpy_reference_for_longdouble():
    assert select_engine("auto", np.longdouble) == "numpy"
    assert select_engine("auto", np.float16) == "compiled"


def test_numba_is_the_old_name_of_the_compiled_engine():
    assert select_engine("numba", np.uint8) == "compiled"
    assert get_window_kernel("numba") is get_window_kernel("compiled")


@settings(max_examples=80, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    engine=st.sampled_from(["compiled", "scipy", "numpy"]),
    m=st.integers(1, 40),
    data=st.data(),
)
def test_window_kernels_give_the_reference_bits(dtype, engine, m, data):
    """The kernels alone, on stacks drawn from the hard values of each dtype."""
    if refusal(engine, dtype):
        return
    k = data.draw(st.integers(1, m), label="k")
    pixels = data.draw(st.integers(1, 9), label="pixels")
    img = random_stack(data.draw(st.integers(0, 2**32 - 1), label="seed"), (m + 1, pixels), dtype)
    expected = rolling_median_reference(img[:, :, None], k)[: m + 1 - k, :, 0]
    assert_same_bits(get_window_kernel(engine)(img[:m], k), expected)
