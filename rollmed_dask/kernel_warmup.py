"""Load a job's numba kernels on a thread of their own, while the job opens its files.

A fresh process pays numba's own start before its first kernel call: importing
numba and setting up its CPU target (its registries of implementations; one
of them imports ``scipy.linalg`` to find a BLAS), about 0.5 s of CPU, plus
5 to 30 ms per kernel loaded from numba's disk cache. A file job knows its
input's dtype long before it needs a kernel: it still has to check the
target, create the output, plan and submit its blocks, and read the first
ones. :func:`start` begins the load then, on a thread, so that the first
block task finds the kernels ready instead of loading them itself.

Nothing here can change a result or hide an error. The thread only imports
:mod:`rollmed_dask.kernels_numba` and runs its kernels on tiny stacks
(:func:`rollmed_dask.kernels_numba.prepare`); if that fails, the failure is
dropped here and the first block task imports and calls the kernels itself,
as without this module, and raises the same error. Python's import lock and
numba's compiler lock make a task that arrives while the thread still loads
wait for it rather than load twice. The thread is not a daemon: a process
that ends early (a refused job) waits for the load instead of tearing down
numba under it.

This module does not import numba, so that importing the package stays light.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["start"]

#: The local schedulers whose tasks run in this process: only they use the kernels loaded here.
IN_PROCESS = ("threads", "synchronous")

_lock = threading.Lock()
_threads: dict = {}  # dtype.str -> the thread that loads its kernels


def start(engine: str, dtype, scheduler=None) -> threading.Thread | None:
    """Start loading the kernels of ``dtype`` images in the background (once per dtype).

    Parameters
    ----------
    engine : str
        The job's resolved engine; nothing is loaded unless it is ``"numba"``.
    dtype : numpy dtype
        The input's dtype.
    scheduler : rollmed_dask.scheduling.Resolved, optional
        The job's scheduler. Kernels load only for local threads or the
        synchronous scheduler: other schedulers run the tasks in other
        processes, which load their own.

    Returns
    -------
    threading.Thread or None
        The loading thread (the same for every call with this dtype), or None
        if nothing is loaded.
    """
    if engine != "numba":
        return None
    if scheduler is not None and getattr(scheduler, "local", None) not in IN_PROCESS:
        return None
    key = np.dtype(dtype).str
    with _lock:
        thread = _threads.get(key)
        if thread is None:
            thread = threading.Thread(
                target=_load, args=(dtype,), name=f"rollmed-dask-kernels-{key}"
            )
            _threads[key] = thread
            thread.start()
    return thread


def _load(dtype) -> None:
    try:
        from . import kernels_numba

        kernels_numba.prepare(dtype)
    except Exception:  # noqa: BLE001 - the first block task raises it again, as before
        pass
