"""An independent exact oracle for the benchmark's output checks.

The library's own reference (``rollmed_dask.core.rolling_median_reference``)
sorts every window: ~2-16 us per pixel-event, so it checks a 20000-frame
output in hours. This oracle keeps one sorted window per pixel and moves the
entering value into place while the leaving one is removed (insertion by
shifting; no histogram, no shared code with ``rollmed_dask``). It is
checked against ``rolling_median_reference`` on every run before it is
trusted (``self_check``).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _sorted_windows(flat, k, out, p0, p1):
    """out[j, p] = sorted(flat[j:j+k, p])[k // 2] for pixels p0 <= p < p1."""
    m = flat.shape[0]
    r = k // 2
    nb = 64
    win = np.empty((nb, k), dtype=flat.dtype)
    for q0 in range(p0, p1, nb):
        n = min(nb, p1 - q0)
        for b in range(n):
            win[b, :] = np.sort(flat[0:k, q0 + b])
            out[0, q0 + b] = win[b, r]
        for i in range(k, m):
            for b in range(n):
                vo = flat[i - k, q0 + b]
                vi = flat[i, q0 + b]
                # a position holding vo (binary search, leftmost)
                lo = 0
                hi = k
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if win[b, mid] < vo:
                        lo = mid + 1
                    else:
                        hi = mid
                j = lo
                if vi > vo:
                    while j + 1 < k and win[b, j + 1] < vi:
                        win[b, j] = win[b, j + 1]
                        j += 1
                elif vi < vo:
                    while j > 0 and win[b, j - 1] > vi:
                        win[b, j] = win[b, j - 1]
                        j -= 1
                win[b, j] = vi
                out[i - k + 1, q0 + b] = win[b, r]


def median_windows(stack: np.ndarray, k: int, threads: int = 1) -> np.ndarray:
    """The ``M - k + 1`` window medians of ``stack`` (M, ...), like ``median_windows_numpy``."""
    from concurrent.futures import ThreadPoolExecutor

    stack = np.ascontiguousarray(stack)
    m = stack.shape[0]
    flat = stack.reshape(m, -1)
    out = np.empty((m - k + 1, flat.shape[1]), dtype=stack.dtype)
    npx = flat.shape[1]
    edges = np.linspace(0, npx, threads + 1).astype(int)
    if threads == 1:
        _sorted_windows(flat, k, out, 0, npx)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(
                pool.map(
                    lambda i: _sorted_windows(flat, k, out, edges[i], edges[i + 1]), range(threads)
                )
            )
    return out.reshape((m - k + 1,) + stack.shape[1:])


def ns_per_pixel_event(k: int) -> float:
    """Rough cost of ``median_windows`` on one thread of the development machine
    (measured on the example data: ~32, ~70, ~260 ns at K = 20, 100, 500)."""
    return 25.0 + 0.5 * k


def self_check() -> None:
    """Raise if the oracle disagrees with ``rolling_median_reference`` anywhere."""
    from rollmed_dask.core import rolling_median_reference

    rng = np.random.default_rng(1234)
    cases = [
        rng.integers(0, 256, (90, 3, 7), dtype=np.uint8),
        rng.integers(100, 104, (90, 5, 5), dtype=np.uint8),  # many ties
        np.repeat(rng.integers(0, 256, (1, 4, 4), dtype=np.uint8), 60, axis=0),
    ]
    for img in cases:
        for k in (1, 2, 3, 10, 21, 40, 59):
            want = rolling_median_reference(img, k)[: img.shape[0] - k]
            got = median_windows(img[:-1], k)
            if got.shape != want.shape or not np.array_equal(got, want):
                raise AssertionError(f"benchmark oracle is wrong for K={k}, shape {img.shape}")
