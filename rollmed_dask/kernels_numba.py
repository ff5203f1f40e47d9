"""Compiled window kernels (numba): the fast engine behind ``engine="numba"``.

:func:`median_windows_numba` has exactly the contract of
:func:`rollmed_dask.core.median_windows_numpy`: for a stack of M frames it
returns the ``M - K + 1`` medians ``sorted(stack[i:i+K])[K // 2]`` per pixel,
bit for bit, for every integer and real floating dtype.

How it is fast
--------------
Every kernel walks a *window* along the event axis: one value enters, one
leaves, and the median is updated incrementally instead of re-sorting the
window. Pixels are independent, so they are processed in blocks of
neighbouring pixels, looping over events in the outer loop ("event-major"):
the reads of one frame row are contiguous, and the per-pixel state of a block
stays in the CPU caches. Which state is kept depends on how many distinct
values a block of pixels can hold, decided per block from its min and max:

* value range < 256 (always for uint8/int8): a 256-bin running histogram per
  pixel plus the current median bin and the count of values below it. An
  entering or leaving value moves that count by one, so the median bin moves
  by a few (usually zero) bins per event: O(1) amortised, no scan.
* value range < 65536 (uint16/int16, or wider integers with narrow data): the
  same with a three-level histogram (65536 fine bins, 4096 groups of 16,
  256 groups of 256), so empty stretches are skipped 16 or 256 bins at a time.
* anything else (wide integer ranges, all floats): a sorted window per pixel,
  updated by binary search and a shift of the values between the leaving and
  the entering position (O(K) moves, but short, contiguous ones).

Floats are sorted as unsigned integer *keys* with the order of ``np.sort``:
-0.0 before +0.0 and every NaN after +inf. That order refines numpy's (which
sees -0.0 == +0.0 and all NaNs as equal), so the chosen element is always in
the same equivalence class as numpy's. Inside such a class numpy's choice is
not specified: its SIMD sort is unstable, and on this CPU (AVX-512) it even
rewrites every NaN to the canonical quiet NaN. So the kernel flags the rare
windows where the bits could differ (median is a zero and the window holds
both -0.0 and +0.0; median is NaN and not every NaN of the window is the
canonical ``np.nan``) and those windows alone are recomputed with ``np.sort``,
which makes the result identical to the numpy reference on every machine.

Numba compiles on the first call per dtype (never at import) and caches the
machine code on disk (``cache=True``), so a second process starts quickly.
All kernels release the GIL (``nogil=True``) and are single-threaded: dask
threads run them on separate blocks in parallel.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["median_windows_numba"]

# Pixels per block of the 256-bin histogram kernel: 512 pixels x 256 bins x
# uint16 counts = 256 KiB, which stays in L2 while a whole frame row of the
# block is a contiguous read. Measured best among 64..2048 on the target CPU.
_BLOCK_HIST8 = 512
# Pixels per block of the 65536-bin kernel: each pixel owns 128 KiB of fine
# counts, so only a few fit in L2 at once.
_BLOCK_HIST16 = 4
# Pixels per block of the sorted-window kernel (K values per pixel).
_BLOCK_SORTED = 16

# Dtypes numpy sorts by value with no ties between different bit patterns.
_INT_KINDS = "ui"
_FLOAT_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


# --------------------------------------------------------------------------
# 256-bin running histogram
# --------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def _block_hist256(src, k, p0, nb, umn, out, hist, med, below):
    """Medians of pixels ``p0 .. p0+nb-1`` whose values lie in ``umn .. umn+255``.

    ``hist`` has shape (>= nb, 256) and is zeroed here. Bins are ``value - umn``
    computed in uint64, which wraps correctly for signed and unsigned dtypes,
    and typed uint8, so numba indexes without negative-index checks.
    """
    m_events = src.shape[0]
    r = k // 2
    hist[:nb, :] = 0
    for i in range(k):
        row = src[i, p0 : p0 + nb]
        for b in range(nb):
            hist[b, np.uint8(np.uint64(row[b]) - umn)] += 1
    orow = out[0, p0 : p0 + nb]
    for b in range(nb):
        c = 0
        m = 0
        while c + hist[b, m] <= r:
            c += hist[b, m]
            m += 1
        med[b] = m
        below[b] = c
        orow[b] = umn + np.uint64(m)
    for i in range(k, m_events):
        row_in = src[i, p0 : p0 + nb]
        row_out = src[i - k, p0 : p0 + nb]
        orow = out[i - k + 1, p0 : p0 + nb]
        for b in range(nb):
            vo = np.uint8(np.uint64(row_out[b]) - umn)
            vi = np.uint8(np.uint64(row_in[b]) - umn)
            m = med[b]
            # c counts the values below bin m: one value leaves, one enters.
            c = below[b] + np.intp(vi < m) - np.intp(vo < m)
            hist[b, vo] -= 1
            hist[b, vi] += 1
            # Bin m still holds rank r unless c moved past it: test both
            # sides with one (rarely taken) branch, as a mispredicted branch
            # per event would cost more than the whole update.
            if (c > r) | (c + hist[b, m] <= r):
                if c > r:
                    while c > r:
                        m -= 1
                        c -= hist[b, m]
                else:
                    while c + hist[b, m] <= r:
                        c += hist[b, m]
                        m += 1
                med[b] = m
            below[b] = c
            orow[b] = umn + np.uint64(m)


# --------------------------------------------------------------------------
# 65536-bin running histogram, three levels
# --------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True, inline="always")
def _h16_add(fine, mid, coarse, b, v, d):
    fine[b, v] += d
    mid[b, v >> np.uint16(4)] += d
    coarse[b, v >> np.uint16(8)] += d


@numba.njit(nogil=True, cache=True, inline="always")
def _h16_up(fine, mid, coarse, b, m, c, r):
    """Move bin ``m`` up until it holds rank ``r`` (``c`` = count below ``m``)."""
    while c + fine[b, m] <= r:
        c += fine[b, m]
        m += 1
        if (m & 15) == 0:
            # Aligned: skip whole groups of 256 or 16 bins that lie below rank r.
            while True:
                if (m & 255) == 0:
                    t = coarse[b, m >> 8]
                    if c + t <= r:
                        c += t
                        m += 256
                        continue
                t = mid[b, m >> 4]
                if c + t <= r:
                    c += t
                    m += 16
                    continue
                break
    return m, c


@numba.njit(nogil=True, cache=True, inline="always")
def _h16_down(fine, mid, coarse, b, m, c, r):
    """Move bin ``m`` down until it holds rank ``r`` (``c`` = count below ``m``)."""
    while c > r:
        if (m & 255) == 0:
            t = coarse[b, (m >> 8) - 1]
            if c - t > r:
                c -= t
                m -= 256
                continue
        if (m & 15) == 0:
            t = mid[b, (m >> 4) - 1]
            if c - t > r:
                c -= t
                m -= 16
                continue
        m -= 1
        c -= fine[b, m]
    return m, c


@numba.njit(nogil=True, cache=True)
def _block_hist16(src, k, p0, nb, umn, out, fine, mid, coarse, med, below):
    """Medians of pixels ``p0 .. p0+nb-1`` whose values lie in ``umn .. umn+65535``.

    ``fine`` (shape (>= nb, 65536)) must be all zero on entry and is left all
    zero: clearing 128 KiB per pixel would cost more than the medians, so the
    last window's values are subtracted again instead. ``mid`` (groups of 16
    bins) and ``coarse`` (groups of 256) are zeroed here.
    """
    m_events = src.shape[0]
    r = k // 2
    mid[:nb, :] = 0
    coarse[:nb, :] = 0
    for i in range(k):
        row = src[i, p0 : p0 + nb]
        for b in range(nb):
            _h16_add(fine, mid, coarse, b, np.uint16(np.uint64(row[b]) - umn), 1)
    orow = out[0, p0 : p0 + nb]
    for b in range(nb):
        m, c = _h16_up(fine, mid, coarse, b, 0, 0, r)
        med[b] = m
        below[b] = c
        orow[b] = umn + np.uint64(m)
    for i in range(k, m_events):
        row_in = src[i, p0 : p0 + nb]
        row_out = src[i - k, p0 : p0 + nb]
        orow = out[i - k + 1, p0 : p0 + nb]
        for b in range(nb):
            vo = np.uint16(np.uint64(row_out[b]) - umn)
            vi = np.uint16(np.uint64(row_in[b]) - umn)
            m = med[b]
            c = below[b] + np.intp(vi < m) - np.intp(vo < m)
            _h16_add(fine, mid, coarse, b, vo, -1)
            _h16_add(fine, mid, coarse, b, vi, 1)
            if (c > r) | (c + fine[b, m] <= r):
                if c > r:
                    m, c = _h16_down(fine, mid, coarse, b, m, c, r)
                else:
                    m, c = _h16_up(fine, mid, coarse, b, m, c, r)
                med[b] = m
            below[b] = c
            orow[b] = umn + np.uint64(m)
    for i in range(m_events - k, m_events):
        row = src[i, p0 : p0 + nb]
        for b in range(nb):
            fine[b, np.uint16(np.uint64(row[b]) - umn)] -= 1


# --------------------------------------------------------------------------
# Sorted window
# --------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True, inline="always")
def _lower_bound(w, lo, hi, x):
    """First index in ``lo .. hi`` with ``w[index] >= x`` (``hi`` if none)."""
    n = hi - lo
    while n > 0:
        half = n >> 1
        if w[lo + half] < x:
            lo += half + 1
            n -= half + 1
        else:
            n = half
    return lo


@numba.njit(nogil=True, cache=True, inline="always")
def _slide(w, base, k, vo, vi):
    """Replace one ``vo`` by ``vi`` in the sorted ``w[base : base+k]``.

    Both positions are found by counting the values below ``vo`` and ``vi``
    over the whole window rather than by binary search: the count loop has no
    data-dependent branches and vectorises, and measured faster than a
    (branchless) binary search for K up to 500. The values in between then
    move by one place, a contiguous copy.
    """
    if vi == vo:
        return
    one = np.uint64(1)
    # int32 accumulators let LLVM count in 32-bit vector lanes.
    j = np.int32(0)
    q = np.int32(0)
    for t in range(np.uint64(base), np.uint64(base + k)):
        x = w[t]
        j = np.int32(j + np.int32(x < vo))
        q = np.int32(q + np.int32(x < vi))
    j = np.uint64(base + j)  # w[j] == vo: it is in the window
    q = np.uint64(base + q)
    if q > j:
        for t in range(j, q - one):
            w[t] = w[t + one]
        w[q - one] = vi
    else:
        for t in range(j - q):
            d = j - t
            w[d] = w[d - one]
        w[q] = vi


@numba.njit(nogil=True, cache=True)
def _block_sorted_int(src, k, p0, nb, out, win):
    """Medians of pixels ``p0 .. p0+nb-1`` of an integer stack by sorted windows."""
    m_events = src.shape[0]
    r = k // 2
    for b in range(nb):
        base = b * k
        for i in range(k):
            win[base + i] = src[i, p0 + b]
        win[base : base + k].sort()
        out[0, p0 + b] = win[base + r]
    for i in range(k, m_events):
        row_in = src[i, p0 : p0 + nb]
        row_out = src[i - k, p0 : p0 + nb]
        orow = out[i - k + 1, p0 : p0 + nb]
        for b in range(nb):
            base = b * k
            _slide(win, base, k, row_out[b], row_in[b])
            orow[b] = win[base + r]


@numba.njit(nogil=True, cache=True)
def _median_int(src, k, out, scan, dmin, hist8, fine, mid, coarse, med, below, win):
    """Window medians of a C-contiguous integer stack ``src`` of shape (M, P).

    Chooses a kernel per block of pixels from the block's value range; with
    ``scan=False`` (8-bit dtypes) the range is known to fit 256 bins from
    ``dmin`` and is not measured.
    """
    n_pix = src.shape[1]
    m_events = src.shape[0]
    for p0 in range(0, n_pix, _BLOCK_HIST8):
        nb = min(_BLOCK_HIST8, n_pix - p0)
        mn = dmin
        mx = dmin
        if scan:
            mn = src[0, p0]
            mx = src[0, p0]
            for i in range(m_events):
                for b in range(nb):
                    v = src[i, p0 + b]
                    mn = min(mn, v)
                    mx = max(mx, v)
        umn = np.uint64(mn)
        span = np.uint64(mx) - umn
        if span < np.uint64(256):
            _block_hist256(src, k, p0, nb, umn, out, hist8, med, below)
        elif span < np.uint64(65536):
            for q0 in range(p0, p0 + nb, _BLOCK_HIST16):
                nq = min(_BLOCK_HIST16, p0 + nb - q0)
                _block_hist16(src, k, q0, nq, umn, out, fine, mid, coarse, med, below)
        else:
            for q0 in range(p0, p0 + nb, _BLOCK_SORTED):
                nq = min(_BLOCK_SORTED, p0 + nb - q0)
                _block_sorted_int(src, k, q0, nq, out, win)


# --------------------------------------------------------------------------
# Floats: sorted windows of order-preserving integer keys
# --------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True, inline="always")
def _to_key(u, sign, mmask, full):
    """Map float bits ``u`` to an unsigned key that sorts like ``np.sort``.

    The IEEE trick (flip all bits of negatives, set the sign bit of the
    others) orders -NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN;
    subtracting the mantissa mask (wrapping) rotates the negative NaNs from
    the bottom to the top, after +NaN, so that every NaN sorts last. The map is
    a bijection, so keys convert back to the exact input bits.

    Numba computes in uint64 whatever the width; ``full`` (all ones in the
    key's width) truncates the result, so that it compares correctly with the
    keys stored in the window.
    """
    if u & sign:
        kk = ~u
    else:
        kk = u | sign
    return (kk - mmask) & full


@numba.njit(nogil=True, cache=True, inline="always")
def _from_key(key, sign, mmask):
    kk = key + mmask
    if kk & sign:
        return kk ^ sign
    return ~kk


@numba.njit(nogil=True, cache=True)
def _median_float(bits, k, out, sign, mmask, full, kneg0, kpos0, kinf, knan, win, amb):
    """Window medians of a C-contiguous float stack viewed as unsigned ``bits``.

    Writes the median bits to ``out`` and records in ``amb`` (flat indices
    ``o * P + p``, as many as fit) the windows whose bit pattern numpy could
    choose differently; returns how many there are.

    ``kneg0``/``kpos0`` are the keys of -0.0/+0.0, ``kinf`` the key of +inf
    (every larger key is a NaN) and ``knan`` the key of the canonical NaN.
    """
    m_events = bits.shape[0]
    n_pix = bits.shape[1]
    r = k // 2
    n_amb = 0
    cap = amb.shape[0]
    kv = np.empty(2, dtype=win.dtype)  # scratch in the key dtype, see below
    for p0 in range(0, n_pix, _BLOCK_SORTED):
        nb = min(_BLOCK_SORTED, n_pix - p0)
        for b in range(nb):
            base = b * k
            for t in range(k):
                win[base + t] = _to_key(bits[t, p0 + b], sign, mmask, full)
            win[base : base + k].sort()
        for i in range(k - 1, m_events):
            o = i - k + 1
            row_in = bits[i, p0 : p0 + nb]
            row_out = bits[max(i - k, 0), p0 : p0 + nb]
            orow = out[o, p0 : p0 + nb]
            for b in range(nb):
                base = b * k
                if i >= k:
                    # Keys come back as uint64; storing them in the scratch
                    # narrows them to the key width, so that _slide compares
                    # (and vectorises) in that width.
                    kv[0] = _to_key(row_out[b], sign, mmask, full)
                    kv[1] = _to_key(row_in[b], sign, mmask, full)
                    _slide(win, base, k, kv[0], kv[1])
                key = win[base + r]
                orow[b] = _from_key(key, sign, mmask)
                # Zero and NaN are the only classes of equal values with
                # different bits; the check costs two compares unless hit.
                ambiguous = False
                if key == kneg0:
                    j = _lower_bound(win, base + r, base + k, kpos0)
                    ambiguous = j < base + k and win[j] == kpos0
                elif key == kpos0:
                    j = _lower_bound(win, base, base + r, kneg0)
                    ambiguous = j < base + r and win[j] == kneg0
                elif key > kinf:
                    first = _lower_bound(win, base, base + r, kinf + np.uint64(1))
                    ambiguous = win[first] != knan or win[base + k - 1] != knan
                if ambiguous:
                    if n_amb < cap:
                        amb[n_amb] = o * n_pix + p0 + b
                    n_amb += 1
    return n_amb


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def _float_constants(dtype: np.dtype):
    """Sign bit, mantissa mask, all-ones and the special keys of a float dtype."""
    ut = _FLOAT_UINT[dtype.itemsize]
    nbits = 8 * dtype.itemsize
    finfo = np.finfo(dtype)
    sign = ut(1 << (nbits - 1))
    mmask = ut((1 << finfo.nmant) - 1)

    def key(value) -> np.unsignedinteger:
        u = int(np.array(value, dtype=dtype).view(ut))
        kk = (~u if u & int(sign) else u | int(sign)) & ((1 << nbits) - 1)
        return ut((kk - int(mmask)) % (1 << nbits))

    full = np.uint64((1 << nbits) - 1)
    return ut, sign, mmask, full, key(-0.0), key(0.0), key(np.inf), key(_sorted_nan(dtype))


_SORTED_NAN: dict = {}


def _sorted_nan(dtype: np.dtype):
    """The NaN that ``np.sort`` returns for windows of ``np.nan``, or +inf if unsure.

    numpy's SIMD sorts replace every NaN by one canonical NaN of their own
    (on AVX-512: 0x7fc00000 for float32 but 0x7c01, not ``np.nan``, for
    float16); scalar sorts keep the bits. Windows whose NaNs all equal this
    value need no fallback. If different sizes disagree, +inf is returned:
    it never equals a NaN key, so every NaN median is recomputed by numpy.
    """
    dtype = np.dtype(dtype)
    if dtype not in _SORTED_NAN:
        ut = _FLOAT_UINT[dtype.itemsize]
        found = {
            int(np.sort(np.full(n, np.nan, dtype=dtype)).view(ut)[0])
            for n in (2, 3, 8, 16, 17, 64, 65, 128, 257, 1000)
        }
        value = np.array(found.pop(), dtype=ut).view(dtype) if len(found) == 1 else np.inf
        _SORTED_NAN[dtype] = value
    return _SORTED_NAN[dtype]


def _median_2d_float(flat: np.ndarray, k: int) -> np.ndarray:
    ut, sign, mmask, full, kneg0, kpos0, kinf, knan = _float_constants(flat.dtype)
    consts = (sign, mmask, full, kneg0, kpos0, kinf, knan)
    bits = flat.view(ut)
    out = np.empty((flat.shape[0] - k + 1, flat.shape[1]), dtype=flat.dtype)
    win = np.empty(_BLOCK_SORTED * k, dtype=ut)
    amb = np.empty(1024, dtype=np.int64)
    n_amb = _median_float(bits, k, out.view(ut), *consts, win, amb)
    if n_amb > amb.shape[0]:  # rare: rerun with room for every flagged window
        amb = np.empty(n_amb, dtype=np.int64)
        _median_float(bits, k, out.view(ut), *consts, win, amb)
    if n_amb:
        # np.sort of the same K values in the same order is the reference's
        # own computation, so its choice among -0.0/+0.0 or NaN payloads is
        # reproduced exactly.
        rows, cols = np.divmod(amb[:n_amb], flat.shape[1])
        windows = flat[rows[:, None] + np.arange(k), cols[:, None]]
        out[rows, cols] = np.sort(windows, axis=-1)[:, k // 2]
    return out


def _median_2d_int(flat: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((flat.shape[0] - k + 1, flat.shape[1]), dtype=flat.dtype)
    count_t = np.uint16 if k < 2**16 else np.uint32
    narrow = flat.dtype.itemsize == 1
    dmin = np.iinfo(flat.dtype).min
    hist8 = np.empty((_BLOCK_HIST8, 256), dtype=count_t)
    med = np.empty(_BLOCK_HIST8, dtype=np.intp)
    below = np.empty(_BLOCK_HIST8, dtype=np.intp)
    n16 = 0 if narrow else _BLOCK_HIST16
    fine = np.zeros((n16, 65536), dtype=count_t)  # calloc: pages untouched if unused
    mid = np.empty((n16, 4096), dtype=np.int64)
    coarse = np.empty((n16, 256), dtype=np.int64)
    win = np.empty(0 if narrow else _BLOCK_SORTED * k, dtype=flat.dtype)
    _median_int(
        flat, k, out, not narrow, flat.dtype.type(dmin),
        hist8, fine, mid, coarse, med, below, win,
    )  # fmt: skip
    return out


def median_windows_numba(stack: np.ndarray, kernel_size: int) -> np.ndarray:
    """Medians of all windows of ``kernel_size`` consecutive frames, compiled.

    Bit-identical to :func:`rollmed_dask.core.median_windows_numpy`, much
    faster and with memory for the output only (plus a C-contiguous copy of
    the input if it is not C-contiguous).

    Parameters
    ----------
    stack : numpy.ndarray, shape (M, ...)
        M frames of any shape (none, (H, W), a pixel tile, ...), any integer
        or real floating dtype, any memory layout.
    kernel_size : int
        K, frames per window, ``1 <= K <= M``.

    Returns
    -------
    numpy.ndarray, shape (M - K + 1, ...)
        ``out[i] = sorted(stack[i:i+K], axis=0)[K // 2]`` per pixel: the upper
        median for even K, never an average, same dtype as ``stack``. For
        floats NaNs sort last, as in ``np.sort``, and where a window's median
        could be -0.0 or +0.0, or NaNs with different bits, the bits are those
        ``np.sort`` returns on this machine.

    Raises
    ------
    ValueError
        If K is not in ``1 .. M``, the stack has no event axis, or the dtype is
        not an integer or real floating type.

    Notes
    -----
    The algorithm is chosen per block of pixels from its value range: a
    256-bin running histogram (any 8-bit data, or narrow data of any integer
    dtype), a three-level 65536-bin histogram (16-bit ranges), or a sorted
    window per pixel (wider integers and all floats). See the module
    docstring. The first call for a dtype compiles (or loads from numba's disk
    cache); the kernels release the GIL and run on the calling thread.

    Examples
    --------
    >>> import numpy as np
    >>> stack = np.array([5, 1, 4, 2, 3, 9], dtype=np.uint8)
    >>> median_windows_numba(stack, 2)
    array([5, 4, 4, 3, 9], dtype=uint8)
    """
    stack = np.asarray(stack)
    if stack.ndim == 0:
        raise ValueError("the stack has no event axis (0-d input); pass an array of shape (M, ...)")
    dtype = stack.dtype
    if dtype.kind not in "uif" or (dtype.kind == "f" and dtype.itemsize not in _FLOAT_UINT):
        raise ValueError(
            f"median_windows_numba does not support dtype {dtype}; use integer or "
            f"float16/float32/float64 images, or engine='numpy'"
        )
    m_events = stack.shape[0]
    k = int(kernel_size)
    if not 1 <= k <= m_events:
        raise ValueError(
            f"kernel_size={kernel_size} must be between 1 and the number of frames "
            f"({m_events}) of this block"
        )
    tail = stack.shape[1:]
    out_shape = (m_events - k + 1, *tail)
    if k == 1:  # every window is one value: np.sort returns it untouched
        return stack.copy()
    if stack.size == 0:
        return np.empty(out_shape, dtype=dtype)
    native = dtype.newbyteorder("=")
    # One compiled specialisation per dtype: C-contiguous, native byte order.
    flat = np.ascontiguousarray(stack, dtype=native).reshape(m_events, -1)
    if dtype.kind == "f":
        out = _median_2d_float(flat, k)
    else:
        out = _median_2d_int(flat, k)
    return out.reshape(out_shape).astype(dtype, copy=False)
