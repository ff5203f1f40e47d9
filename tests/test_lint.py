"""The style checks run with the tests, so the README's one test command covers them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args):
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_ruff_check():
    result = ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_assert_for_validation_in_the_package():
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in (ROOT / "rollmed_dask").glob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if line.lstrip().startswith("assert ")
    ]
    assert offenders == [], "user input gets a clear exception, not an assert"
