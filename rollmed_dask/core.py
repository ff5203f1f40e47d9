"""The exact result and the per-block kernels: numpy and scipy, no dask, no I/O.

The contract (README, "What it computes"), for a stack ``img`` of N events and a kernel
size K with 1 <= K < N::

    bg[j] = sorted(img[j : j+K])[K // 2]     for 0 <= j < N - K   (per pixel)
    bg[j] = bg[N - K - 1]                    for N - K <= j < N

Every engine implements the same *window kernel*: given M consecutive frames
it returns the ``M - K + 1`` medians of the windows that fit entirely inside
them ("valid" windows). The dask pipeline feeds each block its overlap, so the
kernel never needs to know where in the stack it is.
"""

from __future__ import annotations

import numbers

import numpy as np

ENGINES = ("auto", "compiled", "numba", "scipy", "numpy")

#: Engine names kept for what they used to select: "numba" was the compiled
#: engine until its kernels became a C extension built at installation.
ENGINE_ALIASES = {"numba": "compiled"}


class NotAWholeNumber(TypeError, ValueError):
    """A count given as something other than a whole number.

    Both a wrong type and a wrong value: ``except TypeError`` (what
    :func:`rollmed_dask.rtdc.bg_ppid` has always raised) and ``except
    ValueError`` (what every other check raises) both catch it.
    """


def check_count(name: str, value, example: int = 100) -> int:
    """Validate a count of at least 1 (``batch_size``, ...), return it as int.

    Raises
    ------
    NotAWholeNumber
        For a bool, a float or a string: with the value and what to pass instead.
    ValueError
        For a count below 1.

    Examples
    --------
    >>> check_count("batch_size", 10000)
    10000
    >>> check_count("batch_size", 0)
    Traceback (most recent call last):
    ...
    ValueError: batch_size=0 must be at least 1; pass a positive batch_size
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise NotAWholeNumber(
            f"{name}={value!r} must be a whole number; pass an integer such as {name}={example}"
        )
    if value < 1:
        raise ValueError(f"{name}={value} must be at least 1; pass a positive {name}")
    return int(value)


def check_kernel_size(kernel_size, num_events: int | None = None) -> int:
    """Validate ``kernel_size``, K, and return it as int: the one place K is checked.

    K is a whole number with ``1 <= K < N``. Without ``num_events``, before the
    stack is known (a pipeline id, the arguments of ``BackgroundRollMed``),
    only ``K >= 1`` is checked.

    Raises
    ------
    ValueError
        With the offending values and what to pass instead
        (:class:`NotAWholeNumber`, also a TypeError, for a non-integer).
    """
    if num_events is not None and num_events < 2:
        # K < N leaves no K for N=1: say what the stack lacks, not "K of at most 0"
        raise ValueError(
            f"the image stack has {'no events' if num_events == 0 else '1 event'} "
            f"(N={num_events}); a rolling median needs at least 2 events: check the "
            f"input dataset"
        )
    kernel_size = check_count("kernel_size", kernel_size)
    if num_events is not None and kernel_size >= num_events:
        raise ValueError(
            f"kernel_size={kernel_size} must be smaller than the number of events "
            f"({num_events}); pass a kernel_size of at most {num_events - 1}"
        )
    return kernel_size


def check_dtype(dtype) -> np.dtype:
    """Accept integer and real floating dtypes, reject everything else clearly."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "uif":
        raise ValueError(
            f"images of dtype {dtype} are not supported; the rolling median needs "
            f"integer or real floating-point images (uint8, uint16, int16, float32, ...)"
        )
    return dtype


def rolling_median_reference(img, kernel_size: int) -> np.ndarray:
    """The exact result, in plain numpy: the oracle every engine is tested against.

    Parameters
    ----------
    img : array_like, shape (N, ...)
        The image stack; the first axis enumerates events.
    kernel_size : int
        K, the number of events in each window, ``1 <= K < N``.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``img``.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.array([5, 1, 4, 2, 3, 9], dtype=np.uint8).reshape(6, 1, 1)
    >>> rolling_median_reference(img, 2).ravel()
    array([5, 4, 4, 3, 3, 3], dtype=uint8)
    """
    img = np.asarray(img)
    n = img.shape[0]
    k = check_kernel_size(kernel_size, n)
    windows = np.lib.stride_tricks.sliding_window_view(img[: n - 1], k, axis=0)
    computed = _kth_of_windows(windows, k // 2)  # rows 0 .. N-K-1
    tail = np.repeat(computed[-1:], k, axis=0)
    return np.concatenate([computed, tail])


def _kth_of_windows(windows: np.ndarray, kth: int) -> np.ndarray:
    """Element ``kth`` of each sorted window (last axis), a few rows at a time.

    ``np.partition`` puts exactly the element ``np.sort`` would put at ``kth``;
    going through the rows in slices keeps the copy it makes small.
    """
    out = np.empty(windows.shape[:-1], dtype=windows.dtype)
    rows = max(1, 2**24 // max(1, windows[:1].size))
    for start in range(0, len(windows), rows):
        part = np.partition(windows[start : start + rows], kth, axis=-1)
        out[start : start + rows] = part[..., kth]
    return out


def median_windows_numpy(stack: np.ndarray, kernel_size: int) -> np.ndarray:
    """Window kernel in plain numpy: exact for any dtype, slow."""
    windows = np.lib.stride_tricks.sliding_window_view(stack, kernel_size, axis=0)
    return _kth_of_windows(windows, kernel_size // 2)


def median_windows_scipy(stack: np.ndarray, kernel_size: int) -> np.ndarray:
    """Window kernel with ``scipy.ndimage.median_filter``, made exact.

    ``origin=-(K // 2)`` makes output row i the median of rows i .. i+K-1; scipy's
    median of an even size is its element ``K // 2`` of the sorted window, the
    upper median, as the contract wants. Rows past ``M - K`` touch the padding
    and are dropped.

    scipy selects in float64, so only dtypes that float64 holds exactly are
    accepted (see :func:`check_engine_dtype`); float16, which scipy refuses,
    goes through float32, which holds every float16. scipy's comparisons see
    NaN as neither smaller nor larger than anything, so NaNs enter as +inf,
    which sorts where ``np.partition`` puts NaN, last. The value selected is
    then the reference's except in windows whose median is +inf (it may be a
    NaN) or a zero (-0.0 and +0.0 compare equal, and the bits chosen depend on
    the algorithm): those windows, and only those, are recomputed by the
    reference itself.
    """
    from scipy import ndimage

    check_engine_dtype("scipy", stack.dtype)
    k = kernel_size
    is_float16 = stack.dtype.kind == "f" and stack.dtype.itemsize == 2
    work = stack.astype(np.float32) if is_float16 else stack
    has_nan = False
    if work.dtype.kind == "f":
        nan = np.isnan(work)
        has_nan = bool(nan.any())
        if has_nan:
            work = np.where(nan, np.inf, work)
    size = (k,) + (1,) * (stack.ndim - 1)
    origin = (-(k // 2),) + (0,) * (stack.ndim - 1)
    filtered = ndimage.median_filter(work, size=size, origin=origin, mode="nearest")
    out = filtered[: stack.shape[0] - k + 1].astype(stack.dtype)
    if stack.dtype.kind == "f":
        _recompute_ambiguous(stack, out, k, has_nan)
    return out


# Windows recomputed by the reference per batch: bounds the gathered copy.
_RECOMPUTE_BATCH = 2**22


def _recompute_ambiguous(stack: np.ndarray, out: np.ndarray, k: int, has_nan: bool) -> None:
    """Recompute, with the reference, the windows whose median bits scipy cannot know.

    Candidates are medians of +inf when the stack holds a NaN, and zeros when it
    holds both -0.0 and +0.0. Each candidate window is gathered as one column
    of K values in their order, so the reference computes exactly what it
    computes for that window in the whole stack, bits included.
    """
    zero = stack == 0
    signed = np.signbit(stack)
    candidates = np.zeros(out.shape, dtype=bool)
    if has_nan:
        candidates |= np.isposinf(out)
    if (zero & signed).any() and (zero & ~signed).any():
        candidates |= out == 0
    flat = stack.reshape(stack.shape[0], -1)
    found = np.flatnonzero(candidates.reshape(len(out), -1))
    fixed = out.reshape(len(out), -1)
    step = max(1, _RECOMPUTE_BATCH // k)
    for first in range(0, len(found), step):
        rows, cols = np.divmod(found[first : first + step], flat.shape[1])
        windows = flat[rows + np.arange(k)[:, None], cols]
        fixed[rows, cols] = median_windows_numpy(windows, k)[0]


def compiled_supports(dtype) -> bool:
    """Whether the compiled kernels handle this dtype (not longdouble)."""
    dtype = np.dtype(dtype)
    return dtype.kind in "ui" or (dtype.kind == "f" and dtype.itemsize in (2, 4, 8))


def scipy_supports(dtype) -> bool:
    """Whether scipy's median filter is exact for this dtype.

    scipy.ndimage selects in float64: integers of up to 32 bits and floats of up
    to 64 bits are exact, 64-bit integers above 2**53 are rounded, longdouble
    is refused.
    """
    dtype = np.dtype(dtype)
    return dtype.itemsize <= 4 if dtype.kind in "ui" else dtype.kind == "f" and dtype.itemsize <= 8


def check_engine_dtype(engine: str, dtype) -> None:
    """Refuse a dtype an engine cannot compute exactly, saying what to use instead."""
    dtype = np.dtype(dtype)
    if engine == "scipy" and not scipy_supports(dtype):
        why = (
            "scipy.ndimage selects in float64, which rounds integers above 2**53"
            if dtype.kind in "ui"
            else "scipy.ndimage does not support it"
        )
        others = "'compiled' or 'numpy'" if compiled_supports(dtype) else "'numpy'"
        raise ValueError(
            f"engine='scipy' is not exact for dtype {dtype} ({why}); "
            f"pass engine='auto' (or {others})"
        )
    if ENGINE_ALIASES.get(engine, engine) == "compiled" and not compiled_supports(dtype):
        raise ValueError(
            f"engine={engine!r} has no kernel for dtype {dtype}; pass engine='auto' (or 'numpy')"
        )


def select_engine(engine: str, dtype) -> str:
    """Resolve ``engine="auto"``, reject unknown names and dtypes an engine cannot
    compute exactly.

    "auto" is the compiled kernels wherever they have one, else the numpy
    reference itself (longdouble). "numba", the compiled engine's name before
    its kernels were built ahead of time, selects the compiled engine.

    Examples
    --------
    >>> select_engine("auto", "uint8"), select_engine("auto", "longdouble")
    ('compiled', 'numpy')
    >>> select_engine("numba", "uint16")
    'compiled'
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not known; pass one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "compiled" if compiled_supports(dtype) else "numpy"
    check_engine_dtype(engine, dtype)  # the message names the engine as the user wrote it
    return ENGINE_ALIASES.get(engine, engine)


def get_window_kernel(engine: str):
    """The window kernel function of a resolved engine name."""
    engine = ENGINE_ALIASES.get(engine, engine)
    if engine == "compiled":
        from .kernels import median_windows_compiled

        return median_windows_compiled
    if engine == "scipy":
        return median_windows_scipy
    if engine == "numpy":
        return median_windows_numpy
    raise ValueError(f"engine={engine!r} is not known; pass one of {', '.join(ENGINES)}")
