"""Compiled window kernels: the fast engine behind ``engine="compiled"``.

:func:`median_windows_compiled` has exactly the contract of
:func:`rollmed_dask.core.median_windows_numpy`: for a stack of M frames it
returns the ``M - K + 1`` medians ``sorted(stack[i:i+K])[K // 2]`` per pixel,
bit for bit, for every integer and real floating dtype.

The work is done by the C extension :mod:`rollmed_dask._kernels`, compiled
when the package is installed (``pip install .``): importing it is a
``dlopen`` of a few tens of kilobytes, nothing is compiled at run time in any
process or worker, and every call releases the GIL for all its work, so dask
threads run blocks in parallel. This module turns any dtype into unsigned
*keys* and back, and handles the float windows whose bits are ambiguous.

How it is fast
--------------
Every kernel walks a *window* along the event axis: one value enters, one
leaves, and the median is updated incrementally instead of re-sorting the
window. Pixels are independent, so they are processed in blocks of
neighbouring pixels with the loop over events outside ("event-major"): the
reads of one frame row are contiguous, and the per-pixel state of a block
stays in the CPU caches. The state depends on how many distinct values the
block can hold, decided per block of 512 pixels from its min and max:

* value range < 256 (always for 8-bit data): a 256-bin running histogram per
  pixel, the current median bin and the count of values below it. A value
  entering or leaving moves that count by at most one, so the median bin moves
  at most to the next occupied bin per event, usually not at all: no scan of
  the 256 bins per event, and nearly flat in K.
* value range < 65536 (16-bit data, or wider integers with narrow data): the
  same with a three-level histogram (65536 bins, 4096 groups of 16, 256 groups
  of 256), so that empty stretches are skipped 16 or 256 bins at a time.
* wider ranges (32/64-bit integers, floats), K below 80 (32-bit) or 128
  (64-bit): a sorted window per pixel. The positions of the leaving and the
  entering value are found by counting (vectorised, branch-free), the values
  between them move by one place: O(K) per event, but cheap operations.
* wider ranges, larger K: rank compression. Each pixel's M values are radix
  sorted once and replaced by their dense ranks (< 65536 as long as
  M <= 65536), which go through the 65536-bin histogram: cost flat in K.

Keys sort like the values: unsigned integers are their own keys, signed ones
get their sign bit flipped, and float bits are mapped to numpy's order, NaNs
last (``_kernels.float_keys``). So only four key widths exist, whatever the
dtype, and the kernels never compare floats.

Floats: numpy's order sees -0.0 == +0.0 and all NaNs as equal, and inside
such a class the bits that ``np.sort``/``np.partition`` pick are not specified:
their SIMD versions are unstable, and with AVX-512 ``np.sort`` even rewrites
every NaN to one canonical NaN while ``np.partition`` keeps the bits. The key
order refines numpy's, so the selected *value* always equals the reference's.
The rare windows where the *bits* could differ (median is a zero and the
window holds both zeros; median is NaN and the window holds a NaN other than
the one the reference returns for all-``np.nan`` windows) are found by a
separate pass, run only if the stack holds such values, and recomputed by the
reference itself, :func:`rollmed_dask.core.median_windows_numpy`, on exactly
those windows.

The algorithms and their constants were first written and measured with numba
(until 0.1.0); the C port keeps them, and the bits.
"""

from __future__ import annotations

import operator

import numpy as np

from . import _kernels
from .core import median_windows_numpy

__all__ = ["median_windows_compiled"]

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _median_keys(keys: np.ndarray, k: int) -> np.ndarray:
    """Window medians of a C-contiguous (M, P) array of unsigned keys."""
    m_events, n_pix = keys.shape
    out = np.empty((m_events - k + 1, n_pix), dtype=keys.dtype)
    _kernels.median_keys(keys, out, m_events, n_pix, k, keys.dtype.itemsize)
    return out


# --------------------------------------------------------------------------
# Float keys and the windows whose bits numpy may choose differently
# --------------------------------------------------------------------------


_REFERENCE_NAN: dict = {}


def _reference_nan(dtype: np.dtype) -> int | None:
    """Bits of the NaN the reference returns for windows of ``np.nan``; None if unsure.

    numpy's SIMD sort replaces every NaN by a canonical NaN of its own (with
    AVX-512: 0x7fc00000 for float32, but 0x7c01, not ``np.nan``'s 0x7e00, for
    float16); scalar sorts and ``np.partition`` keep the bits. Windows whose
    NaNs all have these bits need no fallback. If window sizes disagree, None:
    then every NaN median is recomputed by the reference.
    """
    if dtype not in _REFERENCE_NAN:
        ut = _UINT[dtype.itemsize]
        found = {
            int(median_windows_numpy(np.full((n, 1), np.nan, dtype=dtype), n).view(ut)[0, 0])
            for n in (2, 3, 8, 16, 17, 64, 65, 128, 257, 1000)
        }
        _REFERENCE_NAN[dtype] = found.pop() if len(found) == 1 else None
    return _REFERENCE_NAN[dtype]


def _median_2d_float(flat: np.ndarray, k: int) -> np.ndarray:
    ut = _UINT[flat.dtype.itemsize]
    nbits = 8 * flat.dtype.itemsize
    sign = ut(1 << (nbits - 1))
    mmask = ut((1 << np.finfo(flat.dtype).nmant) - 1)
    inf_bits = ut(int(np.array(np.inf, dtype=flat.dtype).view(ut)))
    nan_bits = _reference_nan(flat.dtype)
    # -0.0's bits are no NaN's: with them every NaN median counts as ambiguous.
    nan_bits = ut(nan_bits) if nan_bits is not None else sign

    width = flat.dtype.itemsize
    bits = flat.view(ut)
    keys = np.empty_like(bits)
    _kernels.float_keys(bits, keys, width, int(mmask), False)
    out = _median_keys(keys, k)
    _kernels.float_keys(out, out, width, int(mmask), True)

    neg0, pos0, odd_nan = _kernels.float_specials(bits, width, int(inf_bits), int(nan_bits))
    if (neg0 and pos0) or odd_nan:
        m_events, n_pix = bits.shape
        args = (bits, out, m_events, n_pix, k, width, int(inf_bits), int(nan_bits))
        found = np.empty(1024, dtype=np.intp)
        n = _kernels.ambiguous_windows(*args, found)
        if n > found.shape[0]:
            found = np.empty(n, dtype=np.intp)
            _kernels.ambiguous_windows(*args, found)
        if n:
            # Column j of `windows` holds the K values of ambiguous window j in
            # their order: the reference computes exactly what it computes for
            # that window in the whole stack, bits included.
            rows, cols = np.divmod(found[:n], flat.shape[1])
            windows = flat[rows + np.arange(k)[:, None], cols]
            out.view(flat.dtype)[rows, cols] = median_windows_numpy(windows, k)[0]
    return out.view(flat.dtype)


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def median_windows_compiled(stack: np.ndarray, kernel_size: int) -> np.ndarray:
    """Medians of all windows of ``kernel_size`` consecutive frames, compiled.

    Bit-identical to :func:`rollmed_dask.core.median_windows_numpy` and much
    faster, with little memory beyond the output: a key copy of the input for
    signed and float dtypes, and a C-contiguous copy if the input is not.

    Parameters
    ----------
    stack : numpy.ndarray, shape (M, ...)
        M frames of any shape (none, (H, W), a pixel tile, ...), any integer
        or float16/float32/float64 dtype, any memory layout or byte order.
    kernel_size : int
        K, frames per window, ``1 <= K <= M``.

    Returns
    -------
    numpy.ndarray, shape (M - K + 1, ...)
        ``out[i] = sorted(stack[i:i+K], axis=0)[K // 2]`` per pixel: the upper
        median for even K, never an average, with the dtype of ``stack``. For
        floats NaNs sort last as in ``np.sort``; where several bit patterns
        are equal candidates (-0.0/+0.0, NaN payloads) the bits are those the
        reference returns on this machine.

    Raises
    ------
    ValueError
        If K is not in ``1 .. M``, the stack has no event axis, or its dtype
        is not an integer or float16/32/64 type.

    Notes
    -----
    Per block of pixels the algorithm is chosen from the block's value range
    and K: a 256-bin running histogram, a three-level 65536-bin histogram, a
    sorted window per pixel, or rank compression; see the module docstring.
    The kernels are compiled at installation, release the GIL and run on the
    calling thread.

    Examples
    --------
    >>> import numpy as np
    >>> stack = np.array([5, 1, 4, 2, 3, 9], dtype=np.uint8)
    >>> median_windows_compiled(stack, 2)
    array([5, 4, 4, 3, 9], dtype=uint8)
    """
    stack = np.asarray(stack)
    if stack.ndim == 0:
        raise ValueError(
            "the stack has no event axis (0-d input); pass an array of shape (M, ...)"
        )
    dtype = stack.dtype
    if dtype.kind not in "uif" or (dtype.kind == "f" and dtype.itemsize not in (2, 4, 8)):
        raise ValueError(
            f"median_windows_compiled does not support dtype {dtype}; use integer or "
            f"float16/float32/float64 images, or engine='numpy'"
        )
    m_events = stack.shape[0]
    try:
        k = -1 if isinstance(kernel_size, bool) else operator.index(kernel_size)
    except TypeError:
        k = -1
    # Not the user's K rule (core.check_kernel_size has run): the kernel's own
    # contract, K within this block's M frames, guarding the compiled loops.
    if not 1 <= k <= m_events:
        raise ValueError(
            f"kernel_size={kernel_size!r} must be a whole number between 1 and the "
            f"number of frames ({m_events}) of this block"
        )
    out_shape = (m_events - k + 1, *stack.shape[1:])
    if k == 1:  # each window is one value, which numpy returns untouched
        return stack.copy()
    if stack.size == 0:
        return np.empty(out_shape, dtype=dtype)
    native = dtype.newbyteorder("=")
    flat = np.ascontiguousarray(stack, dtype=native).reshape(m_events, -1)
    ut = _UINT[dtype.itemsize]
    if dtype.kind == "u":
        out = _median_keys(flat, k)
    elif dtype.kind == "i":
        # Flipping the sign bit maps signed order onto unsigned order.
        sign = ut(1 << (8 * dtype.itemsize - 1))
        out = _median_keys(flat.view(ut) ^ sign, k)
        out ^= sign
        out = out.view(native)
    else:
        out = _median_2d_float(flat, k)
    return out.reshape(out_shape).astype(dtype, copy=False)
