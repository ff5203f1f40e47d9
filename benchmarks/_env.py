"""Environment capture: the machine, the library versions and the commit a run measured."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform
import socket
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent

_PACKAGES = ("numpy", "scipy", "dask", "distributed", "numba", "h5py", "hdf5plugin",
             "numcodecs", "zarr", "dcnum", "dask-image", "psutil", "rollmed-dask")  # fmt: skip


def machine_info() -> dict:
    import psutil

    model = None
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": model,
        "cpu_count_logical": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_gb": round(psutil.virtual_memory().total / 2**30, 2),
        "memory_available_gb_at_start": round(psutil.virtual_memory().available / 2**30, 2),
        "load_average_at_start": list(os.getloadavg()),
        "versions": versions,
        "git": _git_state(),
    }


def _git_state() -> dict | None:
    """Commit and whether the work tree differs from it (read-only git calls)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head or None, "modified_tracked_files": bool(dirty)}
