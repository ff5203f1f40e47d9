"""Shared fixtures: small real .rtdc files, readers for what the tool wrote, and the
local SLURM.

The SLURM tests need the one-node SLURM of ``scripts/local-slurm.sh``. When it
is not up, the ``slurm`` fixture starts it if ``CI`` is set (or
``ROLLMED_START_SLURM=1``) and we are root; if SLURM still cannot be reached the
tests fail under CI and are skipped elsewhere, saying how to start it.
"""

import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from rollmed_dask.example import write_example

# The mutation harness (tests/mutation/) is a tool run by hand, not tests: it
# imports coverage, from the `mutation` extra, which the test extra leaves out.
collect_ignore = ["mutation"]


def pytest_configure(config):
    """The tests' Ctrl-C and SIGTERM reach the processes they start, however pytest
    was started. A child inherits ignored signals, and pytest run under ``nohup``
    or with ``&`` from a script has SIGINT ignored: Python then never raises
    KeyboardInterrupt, and a CLI the test interrupts would finish and exit 0
    (seen under the mutation harness). Handled signals are reset by ``exec``."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pytest_unconfigure(config):
    """No process a test started outlives the run. Python joins its non-daemon
    ``multiprocessing`` children at exit: one left hung by a failed test (dcnum's
    pipeline workers did) would keep pytest from ever exiting after its summary,
    and CI would end only at its time limit. They are ended here and named."""
    import psutil

    left = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = " ".join(process.cmdline())
            if "multiprocessing.resource_tracker" in command:
                continue  # it ends at exit, and cleans up what the others leaked
            print(f"\nconftest: ending a process a test left running: {command}")
            process.kill()
            left.append(process)
    psutil.wait_procs(left, timeout=10)


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("examples")


@pytest.fixture(scope="session")
def small_rtdc(example_dir) -> pathlib.Path:
    """300 events of 80x320 uint8, stored as dcnum stores them (zstd-5, fletcher32)."""
    return write_example(example_dir / "small.rtdc", n_events=300, seed=1)


@pytest.fixture
def rtdc_copy(small_rtdc, tmp_path) -> pathlib.Path:
    """A private copy of ``small_rtdc`` that a test may modify."""
    return pathlib.Path(shutil.copy(small_rtdc, tmp_path / "input.rtdc"))


def write_bad_stacks(path) -> pathlib.Path:
    """An HDF5 file with one dataset for each way an image stack can be wrong."""
    with h5py.File(path, "w") as h5:
        h5["events/image"] = np.zeros((20, 4, 4), dtype=np.uint8)
        h5["flat/image"] = np.zeros((20, 16), dtype=np.uint8)
        h5["deep/image"] = np.zeros((20, 4, 4, 3), dtype=np.uint8)
        h5["empty/image"] = np.zeros((0, 4, 4), dtype=np.uint8)
        h5["bool/image"] = np.zeros((20, 4, 4), dtype=bool)
        h5["complex/image"] = np.zeros((20, 4, 4), dtype=np.complex64)
    return pathlib.Path(path)


def flip_bytes_in_chunk(path, dataset, chunk_index) -> tuple:
    """Damage one stored chunk on disk, as a failing disk or a bad copy would;
    return the chunk's offset."""
    with h5py.File(path, "r") as h5:
        info = h5[dataset].id.get_chunk_info(chunk_index)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        data = bytearray(f.read(3))
        f.seek(info.byte_offset + info.size // 2)
        f.write(bytes(b ^ 0x5A for b in data))
    return info.chunk_offset


def interrupt_at_write(monkeypatch, n: int, source, target, kernel_size, **kwargs) -> list:
    """A resumable Zarr run (``compute_background(..., resume=True)``) that
    Ctrl-C stops at its ``n``-th block write, as a user does; returns the
    starts of the blocks it came to write, the stopped one last."""
    from rollmed_dask import compute_background
    from rollmed_dask.sinks import ZarrSink

    written, original = [], ZarrSink.write

    def stop_at_the_nth(self, payload):
        written.append(payload[0])
        if len(written) == n:
            raise KeyboardInterrupt
        return original(self, payload)

    with monkeypatch.context() as m:
        m.setattr(ZarrSink, "write", stop_at_the_nth)
        with pytest.raises(KeyboardInterrupt):
            compute_background(source, target, kernel_size, resume=True, **kwargs)
    return written


def read_images(path, dataset="events/image") -> np.ndarray:
    """The whole dataset of an HDF5 file or a Zarr store, as numpy."""
    path = pathlib.Path(path)
    if path.is_dir():
        import zarr

        return zarr.open_group(str(path), mode="r")[dataset][:]
    with h5py.File(path, "r") as h5:
        return h5[dataset][:]


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "local-slurm.sh"
START_HINT = "run `sudo bash scripts/local-slurm.sh start`"
USABLE = ("idle", "mixed")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _node():
    """``(state, memory_mb, cpus)`` of the first node, or ``(None, why, None)``."""
    if shutil.which("sinfo") is None:
        return None, "sinfo is not installed", None
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T|%m|%c"],
            capture_output=True,
            text=True,
            timeout=15,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None, "sinfo did not answer within 15 s", None
    line = proc.stdout.strip().splitlines()[:1]
    if proc.returncode != 0 or not line:
        return None, f"sinfo failed: {(proc.stderr or proc.stdout).strip()}", None
    state, mem, cpus = line[0].split("|")
    return state, int(mem), int(cpus)


def _start_slurm() -> str:
    """Run scripts/local-slurm.sh start; return its output (for messages)."""
    cmd = ["bash", str(SCRIPT), "start"]
    if os.geteuid() != 0:
        cmd = ["sudo", "-n", *cmd]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(cmd)} did not finish: {exc}"
    return f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="session")
def slurm():
    """The local SLURM node as ``{"memory_mb": ..., "cpus": ...}``; starts it in CI."""
    state, mem, cpus = _node()
    attempt = ""
    if state not in USABLE and (_in_ci() or os.environ.get("ROLLMED_START_SLURM") == "1"):
        attempt = "\n" + _start_slurm()
        state, mem, cpus = _node()
    if state not in USABLE:
        why = mem if state is None else f"the node is {state}, not idle"
        message = f"no usable local SLURM ({why}); {START_HINT}{attempt}"
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return {"memory_mb": mem, "cpus": cpus}


#: Tests with these markers take long (a cluster, SLURM jobs, a whole
#: notebook), and so do tests on these fixtures (long runs to interrupt, or
#: many files): all are also "slow", so that ``python -m pytest -m "not slow"``
#: is the quick subset the README names.
_SLOW_MARKERS = ("cluster", "slurm", "notebooks")
_SLOW_FIXTURES = {"long_rtdc", "many"}


def pytest_collection_modifyitems(items):
    for item in items:
        slow_marker = any(item.get_closest_marker(name) for name in _SLOW_MARKERS)
        if slow_marker or _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
