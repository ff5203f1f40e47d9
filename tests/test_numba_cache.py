"""numba caches our kernels in a user cache folder, never inside the installed package.

Files that numba writes into the package are not in pip's record, so pip never
removes them: after the README's ``pip install .`` and a run, the editable
reinstall of ``pip install -e ".[test]"`` left ``rollmed_dask/__pycache__`` in
site-packages, an empty namespace package that hid the real one. And a
read-only installation must cache too. Each test runs real subprocesses on a
copy of the package.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import rollmed_dask

PACKAGE = Path(rollmed_dask.__file__).parent
ROOT = PACKAGE.parent
PROBE = Path(__file__).with_name("numba_cache_probe.py")


def copy_package(folder: Path) -> Path:
    """The package's sources, without compiled files, in ``folder/rollmed_dask``."""
    return Path(
        shutil.copytree(
            PACKAGE, folder / "rollmed_dask", ignore=shutil.ignore_patterns("__pycache__")
        )
    )


def files_under(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def clean_env(**values) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "NUMBA_CACHE_DIR")}
    env.update(values)
    return env


def run_probe(*args, env, cwd) -> dict:
    result = subprocess.run(
        [sys.executable, PROBE, *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_cached_in(folder: Path, probe: dict):
    """The probe's kernels were cached in one subfolder of ``folder`` and loaded from it."""
    assert Path(probe["cache_dir"]) == folder
    (subfolder,) = folder.iterdir()
    assert subfolder.name.startswith("rollmed_dask_")
    assert list(subfolder.glob("kernels_numba.*.nbi")) and list(subfolder.glob("*.nbc"))
    hits, misses = probe["second"]
    assert hits > 0 and misses == 0, "the second definition loads every kernel from the cache"


def test_cache_goes_to_the_cache_dir_not_into_the_package(tmp_path):
    package = copy_package(tmp_path / "site")
    before = files_under(package)
    cache = tmp_path / "cache"
    env = clean_env(
        PYTHONPATH=str(package.parent), ROLLMED_DASK_CACHE_DIR=str(cache),
        PYTHONDONTWRITEBYTECODE="1",  # so that only numba could write into the package
    )  # fmt: skip
    probe = run_probe(env=env, cwd=tmp_path)
    assert files_under(package) == before, "nothing written into the package"
    assert_cached_in(cache, probe)


def test_xdg_cache_home_is_the_default(tmp_path):
    package = copy_package(tmp_path / "site")
    env = clean_env(
        PYTHONPATH=str(package.parent), XDG_CACHE_HOME=str(tmp_path / "xdg"),
        PYTHONDONTWRITEBYTECODE="1",
    )  # fmt: skip
    env.pop("ROLLMED_DASK_CACHE_DIR", None)
    probe = run_probe(env=env, cwd=tmp_path)
    assert_cached_in(tmp_path / "xdg" / "rollmed-dask" / "numba", probe)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to 'nobody' needs root")
def test_read_only_installation_without_a_home(tmp_path):
    # as root every folder is writable; nobody needs a folder it may enter
    base = Path(tempfile.mkdtemp(prefix="rollmed-ro-"))
    try:
        base.chmod(0o755)
        package = copy_package(base / "site")
        for path in [package, *package.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        before = files_under(package)
        tmp = base / "tmp"
        tmp.mkdir(mode=0o1777)
        tmp.chmod(0o1777)
        env = clean_env(
            PYTHONPATH=str(package.parent), HOME="/nonexistent", TMPDIR=str(tmp),
            ROLLMED_DASK_CACHE_DIR=str(tmp_path / "root-cache"),  # root's warm-up only
            PYTHONDONTWRITEBYTECODE="1",
        )  # fmt: skip
        probe = run_probe("--as-nobody", env=env, cwd=base)
        assert files_under(package) == before
        private = tmp / "rollmed-dask-numba-65534"
        assert_cached_in(private, probe)
        assert private.stat().st_uid == 65534 and private.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to 'nobody' needs root")
def test_a_temp_folder_of_another_user_is_not_used(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="rollmed-ro-"))
    try:
        base.chmod(0o755)
        package = copy_package(base / "site")
        tmp = base / "tmp"
        tmp.mkdir()
        tmp.chmod(0o1777)
        planted = tmp / "rollmed-dask-numba-65534"
        planted.mkdir(mode=0o777)  # made by root, open to all: it could hold anyone's code
        planted.chmod(0o777)
        env = clean_env(
            PYTHONPATH=str(package.parent), HOME="/nonexistent", TMPDIR=str(tmp),
            ROLLMED_DASK_CACHE_DIR=str(tmp_path / "root-cache"), PYTHONDONTWRITEBYTECODE="1",
        )  # fmt: skip
        probe = run_probe("--as-nobody", env=env, cwd=base)
        assert list(planted.iterdir()) == []
        used = Path(probe["cache_dir"])
        assert used.parent == tmp and used.name.startswith("rollmed-dask-numba-")
        assert used.stat().st_uid == 65534 and used.stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(base)


def test_pip_install_then_example_leaves_only_files_pip_recorded(tmp_path):
    """The README's command 1 (``pip install . && rollmed-dask --example ...``) on a copy.

    Every file in the installed package must be in pip's RECORD, or no later
    pip command removes it.
    """
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    copy_package(source)
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target,
         source],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    env = clean_env(PYTHONPATH=str(target), ROLLMED_DASK_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as a user runs it
    example = subprocess.run(
        [sys.executable, "-m", "rollmed_dask", "--example", tmp_path / "example-output",
         "--example-events", "300", "-k", "20", "-q"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert example.returncode == 0, example.stderr
    assert (tmp_path / "example-output" / "example_bg.rtdc").exists()
    (record,) = target.glob("rollmed_dask-*.dist-info/RECORD")
    recorded = {line.split(",")[0] for line in record.read_text().splitlines()}
    installed = {str(p.relative_to(target)) for p in (target / "rollmed_dask").rglob("*")}
    installed = {p for p in installed if not (target / p).is_dir()}
    assert installed - recorded == set(), "files pip does not know of, and never removes"
    assert list((tmp_path / "cache").rglob("*.nbi")), "the kernels were cached"
