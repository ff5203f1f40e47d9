"""The notebooks in ``notebooks/``: executed top to bottom in a fresh kernel, as a user would.

Each notebook runs with nbclient in a new ``python3`` kernel that uses this
interpreter (``sys.executable``, also inside a virtual environment), with its
working directory and ``TMPDIR`` in a pytest temporary directory, so nothing is
written into the repository. The tests check that every cell ran without error,
that each notebook drew its figures (``image/png`` outputs), and that the
notebooks in the repository are stored without outputs.

``03-hpc-slurm.ipynb`` submits SLURM jobs to the one-node SLURM of
``scripts/local-slurm.sh``: without a usable SLURM it is skipped, or fails when
``CI`` is set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import rollmed_dask

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))

#: Figures (``image/png`` outputs) each notebook draws at least.
EXPECTED_FIGURES = {
    "01-quickstart.ipynb": 2,
    "02-local-cluster.ipynb": 1,
    "03-hpc-slurm.ipynb": 0,
    "04-from-dcnum.ipynb": 1,
    "05-tiff-stack.ipynb": 1,
}
#: Text each notebook must print: the proof that it really did the job.
EXPECTED_TEXT = {
    "01-quickstart.ipynb": ["identical to the reference: True", "wrote hdf5 "],
    "02-local-cluster.ipynb": [
        "wrote zarr ",
        "Zarr written by the workers is bit-identical to rolling_median_reference: True",
        "client: closed",
    ],
    "03-hpc-slurm.ipynb": [
        "runs in SLURM job",
        "computed on SLURM, bit-identical to rolling_median_reference: True",
        "client: closed",
    ],
    "04-from-dcnum.ipynb": ["bit-identical: True"],
    "05-tiff-stack.ipynb": [
        "bit-identical to rolling_median_reference: True",
        "the same background: True",
        "frame_7.tif is missing",
    ],
}
NEEDS_SLURM = {"03-hpc-slurm.ipynb"}
CELL_TIMEOUT = 240  # seconds per cell
NOTEBOOK_TIMEOUT = 360  # seconds per notebook, kernel start included

START_HINT = "run `sudo bash scripts/local-slurm.sh start`"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _slurm_problem() -> str | None:
    """None if the local SLURM node accepts jobs, else why not (as tests/test_cluster.py)."""
    for tool in ("sbatch", "sinfo"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"],
            capture_output=True, text=True, timeout=15, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s"
    states = proc.stdout.split()
    if proc.returncode != 0 or not states:
        return f"sinfo failed: {(proc.stderr or proc.stdout).strip()}"
    if states[0] not in ("idle", "mixed"):
        return f"the node is {states[0]}, not idle"
    return None


@pytest.fixture
def slurm_node():
    problem = _slurm_problem()
    if problem is not None:
        message = f"no usable local SLURM ({problem}); {START_HINT}"
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A clean environment for the kernel: our interpreter, temporary dirs, inline figures.

    A ``python3`` kernelspec pointing at ``sys.executable`` goes first on
    ``JUPYTER_PATH``, so neither a user's own ``python3`` kernelspec nor a
    ``python`` on the PATH from another environment is used.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (rollmed-dask tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # no user startup files
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws PNGs
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))  # the notebooks' tempfile directories
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return {"cwd": cwd, "tmpdir": tmpdir}


def _outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            yield from cell.outputs


def _count_figures(nb) -> int:
    return sum("image/png" in out.get("data", {}) for out in _outputs(nb))


def _text(nb) -> str:
    parts = []
    for out in _outputs(nb):
        if out.output_type == "stream":
            parts.append(out.text)
        elif "text/plain" in out.get("data", {}):
            parts.append(out.data["text/plain"])
    return "\n".join(parts)


#: Appended to the executed copy (never to the file): which Python and rollmed_dask ran.
PROBE = (
    "import json as _json, sys as _sys, rollmed_dask as _rd\n"
    "print('ROLLMED-PROBE ' + _json.dumps({'python': _sys.executable, 'package': _rd.__file__}))"
)


def _params():
    for path in NOTEBOOK_PATHS:
        marks = [pytest.mark.notebooks, pytest.mark.timeout(NOTEBOOK_TIMEOUT)]
        if path.name in NEEDS_SLURM:
            marks.append(pytest.mark.slurm)
        yield pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.notebooks
def test_notebooks_are_there():
    assert NOTEBOOK_PATHS, f"no notebooks in {NOTEBOOKS}"
    assert {p.name for p in NOTEBOOK_PATHS} >= set(EXPECTED_FIGURES)


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=[p.stem for p in NOTEBOOK_PATHS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} have outputs or execution counts; store notebooks "
        "without outputs (notebooks/README.md says how to clear them)"
    )
    assert "widgets" not in nb.metadata, f"{path.name}: stored widget state"


@pytest.mark.parametrize("path", list(_params()))
def test_notebook_runs(path, kernel_env, request):
    if path.name in NEEDS_SLURM:
        request.getfixturevalue("slurm_node")
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(kernel_env["cwd"])}},
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback
    seconds = time.perf_counter() - t0
    request.node.user_properties.append(("seconds", round(seconds, 1)))
    print(f"{path.name}: {seconds:.1f} s")

    text = _text(nb)
    # the kernel ran this interpreter and this checkout of the package
    probe = json.loads(text.split("ROLLMED-PROBE ", 1)[1].splitlines()[0])
    assert Path(probe["python"]) == Path(sys.executable)
    assert Path(probe["package"]).resolve() == Path(rollmed_dask.__file__).resolve()

    figures = _count_figures(nb)
    assert figures >= EXPECTED_FIGURES.get(path.name, 0), (
        f"{path.name} drew {figures} figure(s), expected at least "
        f"{EXPECTED_FIGURES.get(path.name, 0)}"
    )
    for expected in EXPECTED_TEXT.get(path.name, []):
        assert expected in text, f"{path.name} did not print {expected!r}"
    if path.name in NEEDS_SLURM:
        assert "skipped" not in text, f"{path.name} skipped its SLURM part"
    assert "Traceback (most recent call last)" not in text, f"{path.name} printed a traceback"

    # nothing written into the repository; the notebook removed its data files
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before
    left = [
        str(p.relative_to(kernel_env["tmpdir"].parent))
        for base in (kernel_env["tmpdir"], kernel_env["cwd"])
        for pattern in ("*.rtdc", "*.zarr")
        for p in base.rglob(pattern)
    ]
    assert not left, f"{path.name} left data files behind: {left}"
