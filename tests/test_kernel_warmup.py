"""A job loads its numba kernels on a thread while it sets up; the first job compiles them all.

Each test that depends on what a fresh process does runs one: the kernels,
numba and the cache folder are per process.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rollmed_dask import kernel_warmup
from rollmed_dask.scheduling import Resolved


def run_python(code: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result


def test_importing_the_package_and_the_warmup_imports_no_numba():
    out = run_python(
        "import sys, rollmed_dask, rollmed_dask.kernel_warmup\n"
        "print(sorted(m for m in ('numba', 'numpy') if m in sys.modules))\n"
    )
    assert out.stdout.strip() == "['numpy']"


def test_only_numba_jobs_in_this_process_load_kernels():
    assert kernel_warmup.start("numpy", np.uint8, Resolved(local="threads")) is None
    assert kernel_warmup.start("scipy", np.uint8) is None
    # tasks in other processes: loading here would only cost this process CPU
    assert kernel_warmup.start("numba", np.uint8, Resolved(local="processes")) is None
    thread = kernel_warmup.start("numba", np.uint8, Resolved(local="threads"))
    assert thread is not None and not thread.daemon
    assert kernel_warmup.start("numba", np.dtype("uint8"), Resolved(local="synchronous")) is thread
    thread.join(timeout=300)
    assert not thread.is_alive()


def test_a_failed_load_surfaces_as_the_same_error_from_the_job(tmp_path):
    # numba missing: the thread fails quietly, the job raises what `import numba` raises
    code = (
        "import sys\n"
        "sys.modules['numba'] = None\n"
        "import numpy as np\n"
        "from rollmed_dask import compute_background\n"
        "try:\n"
        "    import numba\n"
        "except ImportError as exc:\n"
        "    expected = f'{type(exc).__name__}: {exc}'\n"
        "try:\n"
        f"    compute_background(np.zeros((30, 4, 4), np.uint8), {str(tmp_path / 'bg.rtdc')!r},\n"
        "                       5, engine='numba', scheduler='threads', progress=False)\n"
        "except ImportError as exc:\n"
        "    got = f'{type(exc).__name__}: {exc}'\n"
        "print(got == expected, got)\n"
    )
    out = run_python(code)
    assert out.stdout.startswith("True "), out.stdout
    assert out.stderr == "", "the thread neither prints nor raises"
    assert not (tmp_path / "bg.rtdc").exists()


@pytest.mark.slow
def test_the_first_job_compiles_the_common_dtypes_once(tmp_path):
    env = dict(os.environ, ROLLMED_DASK_CACHE_DIR=str(tmp_path / "cache"))
    job = (
        "import numpy as np\n"
        "from rollmed_dask import compute_background\n"
        "for i, dt in enumerate(DTYPES):\n"
        "    x = np.arange(40 * 4 * 4).reshape(40, 4, 4).astype(dt)\n"
        f"    compute_background(x, {str(tmp_path)!r} + f'/bg{{i}}.h5', 5, progress=False,\n"
        "                       scheduler='threads', overwrite=True)\n"
        "import rollmed_dask.kernels_numba as kn\n"
        "ds = [v for v in vars(kn).values() if hasattr(v, 'stats')]\n"
        "import json\n"
        "print(json.dumps(sum(sum(d.stats.cache_misses.values()) for d in ds)))\n"
    )
    first = run_python(job.replace("DTYPES", "['uint8']"), env=env, timeout=600)
    lines = first.stderr.splitlines()
    installing = [line for line in lines if "once for this installation" in line]
    assert len(installing) == 1, lines
    # the job's first block may compile its own dtype before the warm-up thread gets
    # there: then that compile has its own line, and no other line is allowed
    others = [line for line in lines if line not in installing]
    assert all("compiling the numba kernels for uint8 data" in line for line in others), lines
    assert len(others) <= 1, lines
    assert list((tmp_path / "cache").glob("rollmed_dask_*/ready-*"))
    # a later process: every common dtype is loaded from the cache, nothing compiles
    later = run_python(job.replace("DTYPES", "['float32', 'float64', 'uint16', 'int16']"), env=env)
    assert later.stderr == ""
    assert json.loads(later.stdout) == 0


def test_a_job_whose_kernels_are_cached_leaves_compiling_the_rest_to_others(tmp_path):
    # another process compiled uint8 and compiles (or compiled) the rest: a uint8 job
    # started meanwhile loads its kernels and compiles nothing, silently
    env = dict(os.environ, ROLLMED_DASK_CACHE_DIR=str(tmp_path / "cache"))
    run_python(
        "import numpy as np\n"
        "from rollmed_dask.kernels_numba import median_windows_numba\n"
        "median_windows_numba(np.arange(60, dtype=np.uint8).reshape(20, 3), 5)\n",
        env=env,
    )
    job = run_python(
        "import numpy as np, rollmed_dask.kernels_numba as kn\n"
        "from rollmed_dask import compute_background\n"
        "x = np.arange(40 * 4 * 4).reshape(40, 4, 4).astype(np.uint8)\n"
        f"compute_background(x, {str(tmp_path / 'bg.h5')!r}, 5, progress=False,\n"
        "                   scheduler='threads')\n"
        "print(kn._compiles_so_far())\n",
        env=env,
    )
    assert job.stderr == "" and job.stdout.strip() == "0"
    assert not list((tmp_path / "cache").glob("rollmed_dask_*/ready-*"))


@pytest.mark.slow
def test_the_installation_is_made_ready_when_the_jobs_block_compiled_first(tmp_path):
    # the other order of the race in a first job: the job's first block compiles the
    # dtype's kernels before the warm-up thread gets to them; the thread must still
    # compile the common dtypes and mark the installation ready
    env = dict(os.environ, ROLLMED_DASK_CACHE_DIR=str(tmp_path / "cache"))
    run_python(
        "import numpy as np, rollmed_dask.kernels_numba as kn\n"
        "kn.median_windows_numba(np.arange(60, dtype=np.uint8).reshape(20, 3), 5)\n"
        "kn.prepare(np.uint8)\n",
        env=env,
        timeout=600,
    )
    assert list((tmp_path / "cache").glob("rollmed_dask_*/ready-*"))
