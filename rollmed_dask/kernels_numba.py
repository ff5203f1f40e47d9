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
neighbouring pixels with the loop over events outside ("event-major"): the
reads of one frame row are contiguous, and the per-pixel state of a block
stays in the CPU caches. The state depends on how many distinct values the
block can hold, decided per block from its min and max:

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

All kernels work on unsigned *keys* that sort like the values: unsigned
integers are their own keys, signed ones get their sign bit flipped, and
float bits are mapped to numpy's order, NaNs last (see
:func:`_float_to_keys`). So only four key widths are compiled, whatever the
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

Numba compiles an algorithm for a key width when a call first needs it (never
at import; the choice per block is made in Python so that nothing else is
compiled) and caches the machine code on disk (``cache=True``, in the folder
:mod:`rollmed_dask.numba_cache` chooses), so a second process starts quickly.
A compile prints one line on stderr (it takes 1 to 13 s per dtype);
:func:`compile_kernels` does them all ahead of time, and so does the first
job of an installation (:func:`prepare`, about 20 s of CPU once), so that a
later first call of any common dtype only loads. A fresh process still pays
numba's own start, about 0.6 s of CPU (importing numba, 0.15-0.3 s, and
setting up its CPU target, 0.3-0.45 s: numba's registries of implementations,
one of which imports scipy.linalg, 0.12-0.17 s, to see whether a BLAS is
there); loading a cached kernel takes 5 to 20 ms. A job starts that on a
thread of its own as soon as it knows its dtype
(:mod:`rollmed_dask.kernel_warmup`). The kernels release the GIL
(``nogil=True``) and are single-threaded: dask threads run them on separate
blocks in parallel.
"""

from __future__ import annotations

import operator
import os
import sys
import threading
import time

import numba
import numpy as np
from numba.core import event

from . import numba_cache
from .core import median_windows_numpy

# before the first @numba.njit: numba picks a function's cache folder when decorating it
numba_cache.install()

__all__ = ["compile_kernels", "median_windows_numba", "prepare"]

# Pixels per block of the 256-bin histogram: 512 x 256 uint16 counts = 256 KiB,
# in L2 while each frame row of the block is one contiguous read. 128..1024
# measured within a few percent of each other.
_BLOCK_HIST8 = 512
# Pixels per block of the 65536-bin histogram: 128 KiB of counts each, but only
# the bins near the data are touched; more pixels per block overlap more work.
_BLOCK_HIST16 = 8
# Pixels per block of the sorted windows (K keys each).
_BLOCK_SORTED = 16
# From which K wide keys (by key bytes) take rank compression instead of
# sorted windows; measured crossover on float data, 2000 frames.
_RANKED_MIN_K = {4: 80, 8: 128}

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


# --------------------------------------------------------------------------
# 256-bin running histogram
# --------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def _block_hist256(src, k, p0, nb, umn, out, hist, med, below):
    """Medians of pixels ``p0 .. p0+nb-1`` whose keys lie in ``umn .. umn+255``.

    ``hist`` has shape (>= nb, 256) and is zeroed here. ``med[b]`` is the bin
    holding rank ``K // 2`` of pixel b, ``below[b]`` the count of window values
    in lower bins. Bins are typed uint8, so numba indexes without its
    negative-index fix-up.
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
            # Bin m keeps rank r unless c moved past it. Both sides are tested
            # in one rarely taken branch: a mispredicted branch per event
            # would cost about as much as the whole update.
            # On camera frames (rollmed_dask.example.camera_frames, 1 thread,
            # CPU time, one run, loaded 2-core EPYC) this branch is what noise
            # costs: the median moves at 2.6 / 5.1 / 10.1 % of events for
            # noise sigma 2 / 4 / 8 at K = 100 (4.1 / 4.3 / 5.1 ns per
            # pixel-event), at 23 / 34 / 43 % by 1.1 / 1.5 / 2.3 bins at K = 10
            # (6.5 / 8.6 / 11.6 ns). A branch-free one-bin step before this
            # test measured 0.83-0.90x at K = 10 but 1.2-1.4x at K >= 100;
            # switched on only below K = 16 it gave 0.88-0.93x at K <= 10 and
            # K = 100 within the noise (1.00-1.12x), so it was left out: K = 100
            # is the common case and loses up to 12 % at high noise.
            # benchmarks/run.py prints this table (kernel-noise).
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
    """Medians of pixels ``p0 .. p0+nb-1`` whose keys lie in ``umn .. umn+65535``.

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
def _sift_down(w, base, root, n):
    while True:
        child = 2 * root + 1
        if child >= n:
            return
        if child + 1 < n and w[base + child] < w[base + child + 1]:
            child += 1
        if w[base + root] >= w[base + child]:
            return
        w[base + root], w[base + child] = w[base + child], w[base + root]
        root = child


@numba.njit(nogil=True, cache=True)
def _heapsort(w, base, n):
    """Sort ``w[base : base+n]`` in place.

    Used once per pixel and block to start a window. A dozen lines instead of
    ``ndarray.sort()``, whose quicksort more than doubled the compile time.
    """
    for root in range(n // 2 - 1, -1, -1):
        _sift_down(w, base, root, n)
    for end in range(n - 1, 0, -1):
        w[base], w[base + end] = w[base + end], w[base]
        _sift_down(w, base, 0, end)


@numba.njit(nogil=True, cache=True, inline="always")
def _slide(w, base, k, vo, vi):
    """Replace one ``vo`` by ``vi`` in the sorted ``w[base : base+k]``.

    Both positions are found by counting the keys below ``vo`` and ``vi`` over
    the whole window rather than by binary search: the count loop has no
    data-dependent branches and vectorises, and measured 2x faster than an
    interleaved branch-free binary search at K = 100 (equal at K = 500). The
    keys in between then move by one place, a contiguous copy.
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
def _block_sorted(src, k, p0, nb, out, win):
    """Medians of pixels ``p0 .. p0+nb-1`` by a sorted window of K keys each."""
    m_events = src.shape[0]
    r = k // 2
    for b in range(nb):
        base = b * k
        for i in range(k):
            win[base + i] = src[i, p0 + b]
        _heapsort(win, base, k)
        out[0, p0 + b] = win[base + r]
    for i in range(k, m_events):
        row_in = src[i, p0 : p0 + nb]
        row_out = src[i - k, p0 : p0 + nb]
        orow = out[i - k + 1, p0 : p0 + nb]
        for b in range(nb):
            base = b * k
            _slide(win, base, k, row_out[b], row_in[b])
            orow[b] = win[base + r]


# --------------------------------------------------------------------------
# Rank compression: wide keys through the 65536-bin histogram
# --------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def _dense_ranks(ka, kb, ia, ib, cnt, ranks, b, uniq):
    """Rank the keys ``ka`` of one pixel: ``ranks[i, b]`` = dense rank of ``ka[i]``.

    ``uniq[b, rank]`` receives the key of each rank. LSD radix sort by bytes
    with the indices carried along (``kb``, ``ia``, ``ib`` are scratch; ``ka``
    is overwritten); a byte shared by all keys (such as the exponent byte of
    similar floats) costs one counting pass and no scatter.
    """
    m = ka.shape[0]
    for t in range(m):
        ia[t] = t
    for byte in range(ka.itemsize):
        shift = np.uint64(8 * byte)
        cnt[:] = 0
        for t in range(m):
            cnt[np.uint8(np.uint64(ka[t]) >> shift)] += 1
        if cnt.max() == m:
            continue
        total = 0
        for d in range(256):
            c = cnt[d]
            cnt[d] = total
            total += c
        for t in range(m):
            d = np.uint8(np.uint64(ka[t]) >> shift)
            pos = cnt[d]
            cnt[d] = pos + 1
            kb[pos] = ka[t]
            ib[pos] = ia[t]
        ka, kb = kb, ka
        ia, ib = ib, ia
    r = 0
    uniq[b, 0] = ka[0]
    for t in range(m):
        if ka[t] != uniq[b, r]:
            r += 1
            uniq[b, r] = ka[t]
        ranks[ia[t], b] = r


@numba.njit(nogil=True, cache=True)
def _block_ranked(src, k, p0, nb, out, fine, mid, coarse, med, below, rk):
    """Medians of pixels ``p0 .. p0+nb-1`` via their ranks: wide keys, large K.

    Each pixel's M keys are replaced by their dense ranks (< M <= 65536), the
    65536-bin histogram finds the median ranks, and a table maps them back.
    The cost is a radix sort per pixel plus the histogram, independent of K,
    where the sorted window costs O(K) per event. ``rk`` holds the scratch
    arrays (see ``_Scratch.rk``).
    """
    cols, kb, ia, ib, cnt, ranks, uniq, out_r = rk
    m_events = src.shape[0]
    for i in range(m_events):  # transpose: each pixel's keys contiguous
        row = src[i, p0 : p0 + nb]
        for b in range(nb):
            cols[b, i] = row[b]
    for b in range(nb):
        _dense_ranks(cols[b], kb, ia, ib, cnt, ranks, b, uniq)
    _block_hist16(ranks, k, 0, nb, np.uint64(0), out_r, fine, mid, coarse, med, below)
    for o in range(m_events - k + 1):
        orow = out[o, p0 : p0 + nb]
        rrow = out_r[o]
        for b in range(nb):
            orow[b] = uniq[b, rrow[b]]


# --------------------------------------------------------------------------
# Drivers: numba loops over the blocks of one algorithm; Python picks per block
# --------------------------------------------------------------------------
# The choice per block of 512 pixels is made in Python, so that numba compiles
# only the algorithms a dtype's data actually reach (compiling all four for one
# key width took 8-10 s); the few calls per frame cost nothing measurable.


@numba.njit(nogil=True, cache=True)
def _block_span(src, p0, nb):
    """Smallest key of pixels ``p0 .. p0+nb-1`` and the span up to the largest."""
    mn = src[0, p0]
    mx = src[0, p0]
    for i in range(src.shape[0]):
        row = src[i, p0 : p0 + nb]
        for b in range(nb):
            mn = min(mn, row[b])
            mx = max(mx, row[b])
    return np.uint64(mn), np.uint64(mx) - np.uint64(mn)


@numba.njit(nogil=True, cache=True)
def _run_hist256(src, k, p0, nb, umn, out, hist, med, below):
    for q0 in range(p0, p0 + nb, _BLOCK_HIST8):
        nq = min(_BLOCK_HIST8, p0 + nb - q0)
        _block_hist256(src, k, q0, nq, umn, out, hist, med, below)


@numba.njit(nogil=True, cache=True)
def _run_hist16(src, k, p0, nb, umn, out, fine, mid, coarse, med, below):
    for q0 in range(p0, p0 + nb, _BLOCK_HIST16):
        nq = min(_BLOCK_HIST16, p0 + nb - q0)
        _block_hist16(src, k, q0, nq, umn, out, fine, mid, coarse, med, below)


@numba.njit(nogil=True, cache=True)
def _run_sorted(src, k, p0, nb, out, win):
    for q0 in range(p0, p0 + nb, _BLOCK_SORTED):
        nq = min(_BLOCK_SORTED, p0 + nb - q0)
        _block_sorted(src, k, q0, nq, out, win)


@numba.njit(nogil=True, cache=True)
def _run_ranked(src, k, p0, nb, out, fine, mid, coarse, med, below, rk):
    for q0 in range(p0, p0 + nb, _BLOCK_HIST16):
        nq = min(_BLOCK_HIST16, p0 + nb - q0)
        _block_ranked(src, k, q0, nq, out, fine, mid, coarse, med, below, rk)


class _Scratch:
    """Work arrays of the kernels for one call, allocated when first needed."""

    def __init__(self, m_events: int, k: int, key_t):
        self.m_events, self.k, self.key_t = m_events, k, key_t
        count_t = np.uint16 if k < 2**16 else np.uint32  # counts reach K
        self.count_t = count_t
        self.hist8 = np.empty((_BLOCK_HIST8, 256), dtype=count_t)
        self.med = np.empty(_BLOCK_HIST8, dtype=np.intp)
        self.below = np.empty(_BLOCK_HIST8, dtype=np.intp)
        self._h16 = self._win = self._rk = None

    @property
    def h16(self) -> tuple:
        if self._h16 is None:
            self._h16 = (
                # calloc: only the pages of bins that data fall in get touched
                np.zeros((_BLOCK_HIST16, 65536), dtype=self.count_t),
                np.empty((_BLOCK_HIST16, 4096), dtype=np.intp),
                np.empty((_BLOCK_HIST16, 256), dtype=np.intp),
            )
        return self._h16

    @property
    def win(self) -> np.ndarray:
        if self._win is None:
            self._win = np.empty(_BLOCK_SORTED * self.k, dtype=self.key_t)
        return self._win

    @property
    def rk(self) -> tuple:
        """Scratch of :func:`_block_ranked`."""
        if self._rk is None:
            m, b, key_t = self.m_events, _BLOCK_HIST16, self.key_t
            self._rk = (
                np.empty((b, m), dtype=key_t),  # cols: keys of each pixel, then sorted
                np.empty(m, dtype=key_t),  # kb: radix ping-pong keys
                np.empty(m, dtype=np.intp),  # ia, ib: event indices carried along
                np.empty(m, dtype=np.intp),
                np.empty(256, dtype=np.intp),  # cnt: digit counts
                np.empty((m, b), dtype=np.uint16),  # ranks, event-major like the keys
                np.empty((b, m), dtype=key_t),  # uniq: key of each rank
                np.empty((m - self.k + 1, b), dtype=np.uint16),  # out_r: median ranks
            )
        return self._rk


def _median_keys(keys: np.ndarray, k: int) -> np.ndarray:
    """Window medians of a C-contiguous (M, P) array of unsigned keys."""
    m_events, n_pix = keys.shape
    out = np.empty((m_events - k + 1, n_pix), dtype=keys.dtype)
    sc = _Scratch(m_events, k, keys.dtype)
    if keys.dtype.itemsize == 1:
        _run_hist256(keys, k, 0, n_pix, np.uint64(0), out, sc.hist8, sc.med, sc.below)
        return out
    # Sorted windows cost O(K) per event, rank compression a radix sort per
    # pixel (a pass per key byte): from about these K on, ranks are faster.
    ranked = m_events <= 65536 and k >= _RANKED_MIN_K.get(keys.dtype.itemsize, 0)
    for p0 in range(0, n_pix, _BLOCK_HIST8):
        nb = min(_BLOCK_HIST8, n_pix - p0)
        umn, span = _block_span(keys, p0, nb)
        umn = np.uint64(umn)  # numba returns a Python int: would be typed int64
        if span < 256:
            _run_hist256(keys, k, p0, nb, umn, out, sc.hist8, sc.med, sc.below)
        elif span < 65536:
            _run_hist16(keys, k, p0, nb, umn, out, *sc.h16, sc.med, sc.below)
        elif ranked:
            _run_ranked(keys, k, p0, nb, out, *sc.h16, sc.med, sc.below, sc.rk)
        else:
            _run_sorted(keys, k, p0, nb, out, sc.win)
    return out


# --------------------------------------------------------------------------
# Float keys and the windows whose bits numpy may choose differently
# --------------------------------------------------------------------------


@numba.njit(nogil=True, cache=True)
def _float_to_keys(bits, sign, mmask, keys):
    """Map float bits (1-D, unsigned view) to keys in ``np.sort``'s order.

    The IEEE trick (flip all bits of negatives, set the sign bit of the
    others) orders -NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN.
    Subtracting the mantissa mask (wrapping) then rotates the negative NaNs
    from the bottom to the top, after +NaN, so that every NaN sorts last. The
    map is a bijection, so keys convert back to the exact input bits. Numba
    computes in uint64; storing into ``keys`` truncates to the key width.
    """
    for t in range(bits.shape[0]):
        u = bits[t]
        kk = ~u if u & sign else u | sign
        keys[t] = kk - mmask


@numba.njit(nogil=True, cache=True)
def _keys_to_float(keys, sign, mmask, bits):
    """Inverse of :func:`_float_to_keys`; ``bits`` may be ``keys`` itself."""
    for t in range(keys.shape[0]):
        kk = keys[t] + mmask
        bits[t] = kk ^ sign if kk & sign else ~kk


@numba.njit(nogil=True, cache=True)
def _float_specials(bits, sign, inf_bits, nan_bits):
    """Whether the stack holds -0.0, +0.0, and NaNs other than ``nan_bits``."""
    neg0 = False
    pos0 = False
    odd_nan = False
    for t in range(bits.shape[0]):
        u = bits[t]
        neg0 |= u == sign
        pos0 |= u == 0
        odd_nan |= ((u & ~sign) > inf_bits) & (u != nan_bits)
    return neg0, pos0, odd_nan


@numba.njit(nogil=True, cache=True)
def _ambiguous_windows(bits, k, out, sign, inf_bits, nan_bits, found):
    """Flat indices ``o * P + p`` of the windows whose median bits are not unique.

    A window is ambiguous if its median is a zero and it holds both -0.0 and
    +0.0, or its median is NaN and it holds a NaN other than ``nan_bits`` (the
    NaN the reference returns). Running counts per pixel, one pass. Writes as
    many indices as ``found`` holds and returns how many there are.
    """
    m_events, n_pix = bits.shape
    n_neg0 = np.zeros(n_pix, dtype=np.intp)
    n_pos0 = np.zeros(n_pix, dtype=np.intp)
    n_odd = np.zeros(n_pix, dtype=np.intp)
    n_found = 0
    for i in range(m_events):
        row = bits[i]
        for p in range(n_pix):
            u = row[p]
            n_neg0[p] += u == sign
            n_pos0[p] += u == 0
            n_odd[p] += ((u & ~sign) > inf_bits) & (u != nan_bits)
        if i >= k:
            row = bits[i - k]
            for p in range(n_pix):
                u = row[p]
                n_neg0[p] -= u == sign
                n_pos0[p] -= u == 0
                n_odd[p] -= ((u & ~sign) > inf_bits) & (u != nan_bits)
        if i >= k - 1:
            o = i - k + 1
            orow = out[o]
            for p in range(n_pix):
                u = orow[p]
                if (u & ~sign) == 0:
                    hit = n_neg0[p] > 0 and n_pos0[p] > 0
                elif (u & ~sign) > inf_bits:
                    hit = n_odd[p] > 0
                else:
                    hit = False
                if hit:
                    if n_found < found.shape[0]:
                        found[n_found] = o * n_pix + p
                    n_found += 1
    return n_found


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

    bits = flat.view(ut)
    keys = np.empty_like(bits)
    _float_to_keys(bits.reshape(-1), sign, mmask, keys.reshape(-1))
    out = _median_keys(keys, k)
    _keys_to_float(out.reshape(-1), sign, mmask, out.reshape(-1))

    neg0, pos0, odd_nan = _float_specials(bits.reshape(-1), sign, inf_bits, nan_bits)
    if (neg0 and pos0) or odd_nan:
        found = np.empty(1024, dtype=np.intp)
        n = _ambiguous_windows(bits, k, out, sign, inf_bits, nan_bits, found)
        if n > found.shape[0]:
            found = np.empty(n, dtype=np.intp)
            _ambiguous_windows(bits, k, out, sign, inf_bits, nan_bits, found)
        if n:
            # Column j of `windows` holds the K values of ambiguous window j in
            # their order: the reference computes exactly what it computes for
            # that window in the whole stack, bits included.
            rows, cols = np.divmod(found[:n], flat.shape[1])
            windows = flat[rows + np.arange(k)[:, None], cols]
            out.view(flat.dtype)[rows, cols] = median_windows_numpy(windows, k)[0]
    return out.view(flat.dtype)


# --------------------------------------------------------------------------
# Compiling: a line when it happens, and all of it at once on request
# --------------------------------------------------------------------------


class _CompileNotice(event.Listener):
    """Prints one line when a kernel of this module compiles (a numba cache miss).

    numba fires ``numba:compile`` only when it compiles, not when it loads a
    kernel from its disk cache (5 to 20 ms), so the line appears exactly when
    a user waits 1 to 13 s per dtype: once per installation. On the thread of
    :func:`prepare` that compiles every common dtype, one line says so
    instead, and no line follows for any of them.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.serving = threading.local()  # dtype of the call on this thread; installing
        self.told: set = set()

    def on_start(self, ev):
        disp = ev.data["dispatcher"]
        if getattr(disp, "py_func", None) is None or disp.py_func.__module__ != __name__:
            return
        dtype = getattr(self.serving, "dtype", None)
        installing = getattr(self.serving, "installing", False)
        with self.lock:
            if dtype in self.told or (installing and "installation" in self.told):
                return
            self.told.add(dtype)
            if installing:
                self.told.update(["installation", *map(np.dtype, COMMON_DTYPES)])
        if installing:
            line = (f"compiling the numba kernels once for this installation (about "
                    f"{_COMPILE_ALL_CPU_S} s of CPU; later runs load them from "
                    f"{numba_cache.installation_dir(__file__)})")  # fmt: skip
        else:
            what = f"{dtype} data" if dtype is not None else "this data"
            line = (f"compiling the numba kernels for {what}: once per installation, "
                    f"1 to 20 s (later runs load them from numba's cache)")  # fmt: skip
        print(f"rollmed-dask: {line}", file=sys.stderr, flush=True)

    def on_end(self, ev):
        pass


_NOTICE = _CompileNotice()
event.register("numba:compile", _NOTICE)


#: What the first job of an installation compiles, so that the first call of any
#: of these in a later process only loads the kernels (all integer dtypes share
#: their kernels with these: int8 with uint8, int32 with uint32, ...).
COMMON_DTYPES = ("uint8", "uint16", "int16", "uint32", "float32", "float64")
# compile_kernels(COMMON_DTYPES) on a fresh cache: 20.3 s of CPU, 30.7 s wall at load
# 2.6 on the 2-core EPYC (numba 0.68): uint8 1.4, uint16 3.5, uint32 13.0 (sorted
# windows and ranks of 32-bit keys), float32 1.6, float64 10.6 s wall.
_COMPILE_ALL_CPU_S = 20


def _stacks_reaching_every_kernel(dtype: np.dtype):
    """(stack, K) pairs of ``dtype`` that reach every algorithm its key width has.

    Built from bit patterns, so that float keys lie as close together as the
    histograms need: consecutive floats are consecutive keys.
    """
    width = dtype.itemsize
    ut = _UINT[width]
    ramp = np.arange(12 * 4, dtype=ut).reshape(12, 4)
    base = ut(np.array(1, dtype=dtype).view(ut))  # the bits of 1 (1.0 for floats)
    yield (base + ramp % ut(3)).view(dtype), 3  # span < 256
    if width >= 2:
        yield (base + ramp * ut(600)).view(dtype), 3  # span < 65536
    if width >= 4:
        wide = (base + ramp * ut(10**6)).view(dtype)
        yield wide, 3  # sorted windows
        yield np.tile(wide, (_RANKED_MIN_K[width] // 12 + 1, 1)), _RANKED_MIN_K[width]
    if dtype.kind == "f":
        zeros = np.zeros((12, 4), dtype=dtype)
        zeros[::2] = -0.0  # both zeros in a window: the pass that finds ambiguous medians
        yield zeros, 3


def compile_kernels(dtypes=COMMON_DTYPES, *, file=None) -> dict:
    """Compile (or load from numba's cache) every kernel these dtypes can reach.

    The first call of :func:`median_windows_numba` for a key width compiles
    what that call needs, 1 to 3 s of CPU per algorithm, with a line on
    stderr; the first job of an installation runs this for the default dtypes
    (:func:`prepare`), and so may a job script before the real work: later
    first calls only load the kernels from numba's cache. All the default
    dtypes took 20 s of CPU (31 s wall on a loaded 2-core machine); once they
    are all done, the installation's cache folder is marked ready.

    Parameters
    ----------
    dtypes : iterable of dtype-likes
        Image dtypes to prepare: integers and float16/32/64.
    file : text stream, optional
        Where a line per dtype goes (default: stderr); ``False`` for none.

    Returns
    -------
    dict
        Seconds spent per dtype (near 0 for dtypes already compiled).

    Examples
    --------
    >>> spent = compile_kernels(["uint8"], file=False)
    >>> list(spent)
    ['uint8']
    """
    stream = sys.stderr if file is None else file
    spent = {}
    for dt in dtypes:
        dtype = np.dtype(dt)
        t0 = time.perf_counter()
        for stack, k in _stacks_reaching_every_kernel(dtype):
            median_windows_numba(stack, k)
        spent[dtype.name] = time.perf_counter() - t0
        if stream:
            print(f"rollmed-dask: numba kernels for {dtype.name} ready "
                  f"({spent[dtype.name]:.1f} s)", file=stream, flush=True)  # fmt: skip
    if set(COMMON_DTYPES) <= set(spent):
        _mark_ready()
    return spent


def _ready_marker() -> str | None:
    """File whose existence says every kernel of :data:`COMMON_DTYPES` is cached; None if
    the cache does not outlive this process.

    Named after what numba's cache index depends on (numba and Python versions,
    this file's modification time and size), so that an upgrade or an edit
    compiles everything again once.
    """
    if not numba_cache.is_kept():
        return None
    st = os.stat(__file__)
    name = (f"ready-numba{numba.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
            f"-{int(st.st_mtime)}-{st.st_size}")  # fmt: skip
    return os.path.join(numba_cache.installation_dir(__file__), name)


def _mark_ready() -> None:
    marker = _ready_marker()
    if marker is not None:
        try:
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            open(marker, "a").close()
        except OSError:  # next time compile again: slower, never wrong
            pass


def prepare(dtype) -> None:
    """Get every kernel a stack of ``dtype`` can reach into memory, compiling if needed.

    :mod:`rollmed_dask.kernel_warmup` runs this on a thread of its own at the
    start of a job, so that the job's first block finds its kernels loaded.
    If this dtype's kernels had to be compiled and the installation's cache
    has no mark that everything is compiled (a new installation, or numba or
    this file changed), the kernels of all :data:`COMMON_DTYPES` are compiled
    too, announced by one line on stderr: about 20 s of CPU once, after which
    the first call of any of them in a new process loads in a fraction of a
    second instead of compiling for 1 to 13 s. A process that found this
    dtype cached leaves the rest to the process that compiled it, so that
    two jobs started together do not both compile everything. If the cache
    does not outlive the process (no writable cache folder), only this
    dtype's kernels are compiled.

    Parameters
    ----------
    dtype : dtype-like
        The images' dtype.
    """
    with _PREPARE_LOCK:  # two dtypes' threads: one compiles everything, the other then loads
        _prepare(np.dtype(dtype))


_PREPARE_LOCK = threading.Lock()


def _compiles_so_far() -> int:
    """Kernels this process compiled (numba cache misses), all dispatchers of this module."""
    return sum(
        sum(d.stats.cache_misses.values()) for d in globals().values() if hasattr(d, "stats")
    )


def _prepare(dtype: np.dtype) -> None:
    marker = _ready_marker()
    installing = marker is not None and not os.path.exists(marker)
    _NOTICE.serving.installing = installing
    try:
        for stack, k in _stacks_reaching_every_kernel(dtype):
            median_windows_numba(stack, k)
        # any compile of this process counts, not only this thread's: the job's first
        # block may have compiled its dtype's kernels before this thread got to them
        if installing and _compiles_so_far() > 0:
            others = [d for d in COMMON_DTYPES if np.dtype(d) != dtype]
            compile_kernels([dtype, *others], file=False)  # marks the installation ready
    finally:
        _NOTICE.serving.installing = False


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def median_windows_numba(stack: np.ndarray, kernel_size: int) -> np.ndarray:
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
    The first call that reaches an algorithm for a key width (8, 16, 32, 64
    bit) compiles it, or loads it from numba's disk cache. The kernels release
    the GIL and run on the calling thread.

    Examples
    --------
    >>> import numpy as np
    >>> stack = np.array([5, 1, 4, 2, 3, 9], dtype=np.uint8)
    >>> median_windows_numba(stack, 2)
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
            f"median_windows_numba does not support dtype {dtype}; use integer or "
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
    _NOTICE.serving.dtype = dtype
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
