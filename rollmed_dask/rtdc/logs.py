"""Logs in ``.rtdc`` files: stored as dcnum's ``store_log`` does, and our run log."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import socket
import time

import h5py
import numpy as np

from .format import _TOOL, _as_str, filter_kwargs, software_string

# ---------------------------------------------------------------------------
# logs
# ---------------------------------------------------------------------------


def write_log(h5: h5py.Group, name: str, lines, *, override: bool = False) -> h5py.Dataset:
    """Store a log as ``logs/<name>``, the way dcnum's ``store_log`` does.

    Lines are UTF-8 encoded into a fixed-length byte-string dataset
    ``S<longest line>``, ``chunks=True``, zstd-5 + fletcher32 (variable-length
    strings cannot be compressed or checksummed). dclab reads it back with
    ``ds.logs[name]``.

    Parameters
    ----------
    h5 : h5py.File or h5py.Group
        File (or root group) to write to.
    name : str
        Log name, e.g. from :func:`run_log_name`.
    lines : list of str, or str
        The log lines; a single string is split at line breaks.
    override : bool
        Replace an existing log of that name instead of raising.

    Examples
    --------
    .. code-block:: python

        with h5py.File("out.rtdc", "a") as h5:
            write_log(h5, "rollmed-dask-job-2024-01-01-12.00.00", ["{", "}"])
    """
    if isinstance(lines, (str, bytes)):
        lines = _as_str(lines).splitlines()
    encoded = [ln.encode("utf-8") if isinstance(ln, str) else bytes(ln) for ln in lines]
    if not encoded:
        raise ValueError(f"log {name!r} has no lines; pass at least one line")
    logs = h5.require_group("logs")
    if name in logs:
        if not override:
            raise ValueError(f"log {name!r} already exists in {h5.file.filename}")
        del logs[name]
    width = max(1, max(len(ln) for ln in encoded))
    return logs.create_dataset(
        name=name,
        data=np.array(encoded, dtype=f"S{width}"),
        chunks=True,
        **filter_kwargs(),
    )


def run_log_name(when: float | None = None, prefix: str = "rollmed-dask-job") -> str:
    """Log name in dcnum's style, ``"<prefix>-YYYY-MM-DD-HH.MM.SS"`` (UTC).

    Examples
    --------
    >>> run_log_name(0)
    'rollmed-dask-job-1970-01-01-00.00.00'
    """
    return f"{prefix}-{time.strftime('%Y-%m-%d-%H.%M.%S', time.gmtime(when))}"


def _json_default(obj):
    """Make numpy scalars/arrays, paths, dtypes and datetimes JSON-serialisable."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (datetime.datetime, datetime.date)):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return str(obj)


def _iso_time(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        dt = value if value.tzinfo else value.astimezone()
    else:
        dt = datetime.datetime.fromtimestamp(float(value)).astimezone()
    return dt.isoformat(timespec="seconds")


_LIBRARIES = ("numpy", "h5py", "hdf5plugin", "dask", "distributed", "scipy", "zarr")


def run_log_lines(
    params: dict,
    *,
    input_path=None,
    output_path=None,
    time_start=None,
    time_end=None,
) -> list[str]:
    """Lines of a JSON log describing a run (for :func:`write_log`).

    The log holds the tool and its version, ``params`` as given, the input
    path (absolute) and size in bytes, the output path, start and end time
    (ISO 8601 with time zone; ``time_end`` defaults to now) and the duration,
    and the host (name, platform, CPU count, Python and library versions).
    Keys are sorted; values that JSON cannot encode are stored as strings.

    Parameters
    ----------
    params : dict
        Parameters of the run, e.g. ``{"kernel_size": 100, "dataset": "events/image"}``.
    input_path, output_path : str or pathlib.Path, optional
        Input and output files.
    time_start, time_end : float or datetime.datetime, optional
        Unix time (``time.time()``) or datetime of the start and the end.

    Examples
    --------
    >>> lines = run_log_lines({"kernel_size": 100}, time_start=0, time_end=60)
    >>> lines[0]
    '{'
    >>> json.loads("\\n".join(lines))["parameters"]
    {'kernel_size': 100}
    """
    if time_end is None:
        time_end = time.time()
    info: dict = {
        "tool": _TOOL,
        "software": software_string(),
        "parameters": dict(params),
        "time": {"start": _iso_time(time_start), "end": _iso_time(time_end)},
        "host": {
            "name": socket.gethostname(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu count": os.cpu_count(),
            "python": platform.python_version(),
            "libraries": {},
        },
    }
    if time_start is not None:
        t0 = time_start.timestamp() if isinstance(time_start, datetime.datetime) else time_start
        t1 = time_end.timestamp() if isinstance(time_end, datetime.datetime) else time_end
        info["time"]["duration s"] = round(float(t1) - float(t0), 3)
    for lib in _LIBRARIES:
        # importlib.metadata reads the installed version without importing
        # the (possibly heavy) library itself.
        try:
            info["host"]["libraries"][lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            info["host"]["libraries"][lib] = None
    if input_path is not None:
        pin = pathlib.Path(input_path).absolute()
        size = pin.stat().st_size if pin.exists() else None
        info["input"] = {"path": str(pin), "size": size}
    if output_path is not None:
        info["output"] = {"path": str(pathlib.Path(output_path).absolute())}
    return json.dumps(info, indent=2, sort_keys=True, default=_json_default).split("\n")
