"""The README's commands: CI runs its two commands in order, and its notebook command runs.

The commands are read from the README itself, so a change there that CI or the
extras do not follow fails here.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands(block: str) -> list:
    """The command lines of a shell block: no comments, no blank lines."""
    lines = (line.strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def bash_blocks(text: str) -> list:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_ci_runs_the_readme_commands_in_order_in_one_environment():
    readme = commands(bash_blocks(README)[0])
    assert readme == [
        "pip install . && rollmed-dask --example example-output",
        'pip install -e ".[test]" && python -m pytest',
    ]
    ci = commands((ROOT / ".ci" / "run").read_text())
    start = ci.index(readme[0])
    assert ci[start : start + len(readme)] == readme, "word for word, in this order"
    assert ci[-len(readme) :] == readme, "nothing after them"
    assert sum("-m venv" in line for line in ci) == 1, "one fresh environment for both"


NOTEBOOK_COMMANDS = commands(bash_blocks(section("Notebooks"))[0])


def test_the_notebooks_extra_installs_the_readme_notebook_commands():
    # editable, as the test step's install: a plain install would replace it
    assert NOTEBOOK_COMMANDS[0] == 'pip install -e ".[notebooks]"'
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["notebooks"]
    provided = {re.match(r"[A-Za-z0-9_.-]+", req).group().lower() for req in extra}
    # the package that brings each `jupyter SUBCOMMAND` the README uses
    needs = {"nbconvert": "nbconvert", "lab": "jupyterlab"}
    for line in NOTEBOOK_COMMANDS[1:]:
        subcommand = shlex.split(line)[1]
        assert needs[subcommand] in provided, f"[notebooks] must install what {line!r} needs"


@pytest.mark.notebooks
@pytest.mark.timeout(300)
def test_readme_nbconvert_command_runs_the_quickstart(tmp_path):
    (line,) = [c for c in NOTEBOOK_COMMANDS if c.startswith("jupyter nbconvert")]
    argv = shlex.split(line)
    notebook = Path(next(a for a in argv if a.endswith(".ipynb")))
    # a copy of the notebooks folder, so that the output lands in tmp_path
    (tmp_path / notebook.parent).mkdir(parents=True)
    shutil.copy(ROOT / notebook, tmp_path / notebook)
    jupyter = Path(sys.executable).with_name("jupyter")  # this environment's, as activated
    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython"), "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        [jupyter, *argv[1:]],
        cwd=tmp_path, capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL,
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (executed,) = (tmp_path / argv[argv.index("--output-dir") + 1]).glob("*.ipynb")
    nb = nbformat.read(executed, as_version=4)
    text = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert "identical to the reference: True" in text
