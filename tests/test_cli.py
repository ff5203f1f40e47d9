"""The command line through real subprocesses: the job, the example, every user error.

A user mistake must end in exactly one line on stderr, exit status 2, no
traceback, and nothing written.
"""

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import read_images, write_bad_stacks

from rollmed_dask import rolling_median_reference
from rollmed_dask.cli import build_parser


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "rollmed_dask", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rollmed-dask: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_explains_the_tool():
    result = run_cli("--help")
    assert result.returncode == 0
    for words in [
        "rolling-median",
        "--kernel-size",
        "--in-place",
        "--resume",
        "--workers",
        "--slurm",
        "--memory-budget",
        "--example",
        "sorted(img[j:j+K])[K//2]",
        "-b rollmed:k=250^b=5000",
        "exit status: 0 done, 1 the run failed",
        "2 a mistake",
        "130 interrupted (Ctrl-C), 143 terminated (SIGTERM",
    ]:
        assert words in result.stdout
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help"


def test_console_script_is_installed():
    script = shutil.which("rollmed-dask", path=os.path.dirname(sys.executable))
    assert script is not None, "pip install must provide the rollmed-dask command"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: rollmed-dask" in result.stdout


def test_job_with_progress_and_summary(small_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    result = run_cli(small_rtdc, out, "-k", "20", "--memory-budget", "8MiB")
    assert result.returncode == 0, result.stderr
    assert "ev/s" in result.stderr, "a progress bar with a rate"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"wrote hdf5 {out}:events/image_bg (300 x 80 x 320 uint8, K=20")
    expected = rolling_median_reference(read_images(small_rtdc), 20)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)


def test_quiet_zarr_with_dcnum_spelling(small_rtdc, tmp_path):
    out = tmp_path / "bg.zarr"
    result = run_cli(small_rtdc, out, "--kernel_size", "12", "--batch_size", "500", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    expected = rolling_median_reference(read_images(small_rtdc), 12)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    import zarr

    attrs = zarr.open_group(str(out), mode="r")["events/image_bg"].attrs
    assert attrs["dcnum ppid background"] == "rollmed:k=12^b=500"


@pytest.mark.parametrize(
    "spelling",
    [
        ["-b", "rollmed", "-kb", "kernel_size=14", "-kb", "batch_size=700"],
        ["-b", "rollmed:k=14^b=700"],
        ["--kernel-size", "14", "--batch-size", "700"],
    ],
)
def test_chipstream_and_dcnum_spellings(spelling, small_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    result = run_cli(small_rtdc, out, *spelling, "-q")
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as h5:
        assert h5["events/image_bg"].attrs["dcnum ppid background"] == "rollmed:k=14^b=700"
        np.testing.assert_array_equal(
            h5["events/image_bg"][:], rolling_median_reference(read_images(small_rtdc), 14)
        )


def test_in_place(rtdc_copy):
    result = run_cli(rtdc_copy, rtdc_copy, "-k", "10", "--in-place", "-q")
    assert result.returncode == 0, result.stderr
    expected = rolling_median_reference(read_images(rtdc_copy), 10)
    np.testing.assert_array_equal(read_images(rtdc_copy, "events/image_bg"), expected)


def test_example_runs_without_user_data(tmp_path):
    result = run_cli("--example", tmp_path / "demo", "--example-events", "400", "-k", "50")
    assert result.returncode == 0, result.stderr
    sample, background = tmp_path / "demo" / "example.rtdc", tmp_path / "demo" / "example_bg.rtdc"
    expected = rolling_median_reference(read_images(sample), 50)
    np.testing.assert_array_equal(read_images(background, "events/image_bg"), expected)
    assert "wrote the sample" in result.stderr


@pytest.fixture
def stacks(tmp_path):
    """Small HDF5 files with the ways a stack can be wrong."""
    return write_bad_stacks(tmp_path / "cases.h5")


ERROR_CASES = {
    "missing input": (["{tmp}/nope.rtdc", "{tmp}/out.rtdc"], ["does not exist"]),
    "directory input": (["{tmp}", "{tmp}/out.rtdc"], ["not a Zarr store"]),
    "not hdf5": (["{tmp}/text.rtdc", "{tmp}/out.rtdc"], ["is not an HDF5 file"]),
    "missing dataset": (
        ["{cases}", "{tmp}/out.rtdc", "--dataset", "events/nope"],
        ["'events/nope' is neither in", "existing datasets: ['events/image']"],
    ),
    "ndim 2": (["{cases}", "{tmp}/out.rtdc", "--dataset", "flat/image"], ["ndim=2"]),
    "ndim 4": (["{cases}", "{tmp}/out.rtdc", "--dataset", "deep/image"], ["ndim=4"]),
    "no events": (["{cases}", "{tmp}/out.rtdc", "--dataset", "empty/image"], ["no events"]),
    "bool": (["{cases}", "{tmp}/out.rtdc", "--dataset", "bool/image"], ["dtype bool"]),
    "complex": (["{cases}", "{tmp}/out.rtdc", "--dataset", "complex/image"], ["dtype complex64"]),
    "k zero": (["{cases}", "{tmp}/out.rtdc", "-k", "0"], ["-k 0 must be at least 1"]),
    "k negative": (["{cases}", "{tmp}/out.rtdc", "-k", "-4"], ["-k -4"]),
    "k too large": (
        ["{cases}", "{tmp}/out.rtdc", "-k", "20"],
        ["-k 20 must be smaller than the number of events (20)", "at most 19"],
    ),
    "output exists": (
        ["{cases}", "{tmp}/exists.rtdc", "-k", "3"],
        ["already exists", "--overwrite"],
    ),
    "no output folder": (
        ["{cases}", "{tmp}/missing/out.rtdc", "-k", "3"],
        ["output folder", "does not exist"],
    ),
    "output is input": (["{cases}", "{cases}", "-k", "3"], ["is the input file", "--in-place"]),
    "event chunk below k": (
        ["{cases}", "{tmp}/out.rtdc", "-k", "5", "--event-chunk", "2"],
        ["--event-chunk 2 is shorter than -k 5"],
    ),
    "bad budget": (
        ["{cases}", "{tmp}/out.rtdc", "-k", "3", "--memory-budget", "lots"],
        ["argument --memory-budget: 'lots' is not a size", "256MiB"],
    ),
    "negative budget": (
        ["{cases}", "{tmp}/out.rtdc", "--memory-budget", "-5MB"],
        ["argument --memory-budget: '-5MB' is not a size", "positive"],
    ),
    "budget below one row": (
        ["{cases}", "{tmp}/out.rtdc", "-k", "3", "--memory-budget", "10"],
        ["memory budget of 10 bytes cannot hold one event", "(448 bytes)", "at least 1MiB"],
    ),
    "k not a number": (
        ["{cases}", "{tmp}/out.rtdc", "-k", "abc"],
        ["'abc' is not a whole number"],
    ),
    "k not whole": (["{cases}", "{tmp}/out.rtdc", "-k", "2.5"], ["'2.5' is not a whole number"]),
    "k twice": (
        ["{cases}", "{tmp}/out.rtdc", "-k", "5", "-kb", "kernel_size=7"],
        ["-k 5 and -kb kernel_size=7 give two different kernel sizes"],
    ),
    "k in the ppid and -k": (
        ["{cases}", "{tmp}/out.rtdc", "-b", "rollmed:k=4^b=9", "-k", "5"],
        ["-k 5 and -b rollmed:k=4^b=9 give two different kernel sizes"],
    ),
    "batch size twice": (
        ["{cases}", "{tmp}/out.rtdc", "--batch-size", "5", "-kb", "b=7"],
        ["--batch-size 5 and -kb b=7 give two different batch sizes"],
    ),
    "example with paths": (
        ["--example", "{tmp}/demo", "{cases}", "{tmp}/out.rtdc"],
        ["--example", "would not be used", "drop them"],
    ),
    "example events without example": (
        ["{cases}", "{tmp}/out.rtdc", "--example-events", "50"],
        ["add --example DIR"],
    ),
    "unknown option": (
        ["{cases}", "{tmp}/out.rtdc", "--kernal", "5"],
        ["--kernal", "did you mean --kernel-size?"],
    ),
    "unknown compression level": (
        ["{cases}", "{tmp}/out.rtdc", "--compression", "zstd-10"],
        ["argument --compression", "'zstd-10'", "zstd-9"],
    ),
    "no paths": ([], ["INPUT and OUTPUT are required"]),
    "other method": (
        ["{cases}", "{tmp}/out.rtdc", "-b", "sparsemed"],
        ["'sparsemed' is not computed here"],
    ),
    "bad -kb": (["{cases}", "{tmp}/out.rtdc", "-kb", "size=3"], ["'size=3' is not understood"]),
    "two schedulers": (
        ["{cases}", "{tmp}/out.rtdc", "--workers", "2", "--scheduler", "threads"],
        ["choose one of"],
    ),
    "unreachable scheduler": (
        ["{cases}", "{tmp}/out.rtdc", "-k", "3", "--scheduler", "tcp://127.0.0.1:9"],
        ["cannot reach a dask scheduler"],
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_are_one_line_exit_2_and_write_nothing(case, stacks, tmp_path):
    args, fragments = ERROR_CASES[case]
    (tmp_path / "text.rtdc").write_text("not hdf5")
    (tmp_path / "exists.rtdc").write_bytes(b"keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.format(tmp=tmp_path, cases=stacks) for a in args]
    result = run_cli(*args, timeout=120)
    assert_one_line_error(result, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing written"
    assert (tmp_path / "exists.rtdc").read_bytes() == b"keep me"


def test_the_same_value_in_two_spellings_is_fine(small_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    result = run_cli(small_rtdc, out, "-k", "14", "-kb", "kernel_size=14", "-b", "rollmed:k=14")
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as h5:
        assert h5["events/image_bg"].attrs["dcnum ppid background"] == "rollmed:k=14^b=10000"
