"""Run the numba kernels twice and print where numba cached them, as one JSON line.

The kernels are defined anew before the second run, as a new process would
define them, so the second run shows whether the cache written by the first
is loaded: ``{"cache_dir": ..., "first": [hits, misses], "second": [hits, misses]}``.

Usage: python tests/numba_cache_probe.py [--as-nobody]

With ``--as-nobody`` (started as root) the kernels run once as root, so that
every module numba needs is loaded while it can be read, and both measured
runs happen after dropping to the user ``nobody`` (whose home does not
exist), without ``ROLLMED_DASK_CACHE_DIR``.
"""

import importlib
import json
import os
import sys

import numba
import numpy as np

from rollmed_dask import kernels_numba, numba_cache

NOBODY = 65534


def run(module) -> list:
    """Run the kernels of ``module`` on a small uint8 stack; numba's cache hits and misses."""
    stack = np.arange(15 * 4 * 4, dtype=np.uint8).reshape(15, 4, 4)
    module.median_windows_numba(stack, 5)
    dispatchers = [
        v for v in vars(module).values() if isinstance(v, numba.core.dispatcher.Dispatcher)
    ]
    return [
        sum(sum(d.stats.cache_hits.values()) for d in dispatchers),
        sum(sum(d.stats.cache_misses.values()) for d in dispatchers),
    ]


def fresh_kernels():
    """The kernels defined anew, with the cache folder chosen anew."""
    numba_cache.cache_dir.cache_clear()
    return importlib.reload(kernels_numba)


if __name__ == "__main__":
    module = kernels_numba
    if sys.argv[1:] == ["--as-nobody"]:
        run(module)
        os.environ.pop("ROLLMED_DASK_CACHE_DIR", None)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        module = fresh_kernels()
    first = run(module)
    second = run(fresh_kernels())
    print(json.dumps({"cache_dir": numba_cache.cache_dir(), "first": first, "second": second}))
