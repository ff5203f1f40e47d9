"""Folders of measurements: many inputs in one run, on real files, real schedulers
and real signals.

Every output must equal the numpy reference bit for bit; a rerun skips what is
up to date and redoes what an interruption left; a bad file is reported and the
others go on; nothing but the outputs is ever written.
"""

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import flip_bytes_in_chunk, read_images
from test_cli import assert_one_line_error, run_cli

from rollmed_dask import compute_background, compute_backgrounds, rolling_median_reference
from rollmed_dask.example import write_example

K = 10
GOOD = ["day1/a.rtdc", "day1/b.rtdc", "day2/c.rtdc", "day2/sub/d.rtdc", "x_bg.rtdc"]
BAD = {
    "bad/damaged.rtdc": "damaged",
    "bad/empty.rtdc": "no events",
    "bad/no_images.rtdc": "events/image",
}


def write_stack(path, n, shape=(16, 32), dtype=np.uint8, chunks=True, seed=0, **filters):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "ui" else None
    high = min(info.max, 4000) if info else 1000
    img = rng.integers(0, high, (n, *shape)).astype(dtype)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("events/image", data=img, chunks=chunks, **filters)
    return path


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Files of different sizes, chunkings and dtypes, a real measurement named
    like an output, and three bad ones."""
    root = tmp_path_factory.mktemp("tree") / "raw"
    write_stack(root / "day1/a.rtdc", 400, chunks=(50, 16, 32))
    write_stack(root / "day1/b.rtdc", 250, dtype=np.uint16, chunks=(100, 16, 32), seed=1,
                compression="gzip")  # fmt: skip
    write_stack(root / "day2/c.rtdc", 600, dtype=np.float32, chunks=None, seed=2)
    write_example(_mkdir(root / "day2/sub/d.rtdc"), n_events=300, seed=3)
    # a measurement whose name looks like an output: only content decides
    write_stack(root / "x_bg.rtdc", 200, dtype=np.int16, chunks=(40, 16, 32), seed=4)
    damaged = write_example(_mkdir(root / "bad/damaged.rtdc"), n_events=200, seed=5)
    flip_bytes_in_chunk(damaged, "events/image", 0)
    write_stack(root / "bad/empty.rtdc", 0)
    with h5py.File(root / "bad/no_images.rtdc", "w") as h5:
        h5["events/deform"] = np.zeros(10)
    return root


@pytest.fixture(scope="module")
def expected(tree):
    return {name: rolling_median_reference(read_images(tree / name), K) for name in GOOD}


def _mkdir(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def out_name(name, suffix=".rtdc"):
    stem, _, _ = name.rpartition(".")
    return f"{stem}_bg{suffix}"


def digest(folder):
    """Path -> sha256 of every file below ``folder``: what 'nothing else touched' means."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_outputs_exact(out, expected, suffix=".rtdc", names=GOOD):
    for name in names:
        np.testing.assert_array_equal(
            read_images(out / out_name(name, suffix), "events/image_bg"), expected[name]
        )


def by_input(results, tree):
    return {os.path.relpath(r["input"], tree): r for r in results}


def test_folder_api_mirrors_the_tree_reports_bad_files_and_reruns_as_skips(
    tree, expected, tmp_path
):
    before = digest(tree)
    out = tmp_path / "bg"
    results = compute_backgrounds(tree, out, K, recursive=True, progress=False)
    json.dumps(results)  # JSON-friendly
    got = by_input(results, tree)
    assert list(got) == sorted(GOOD + list(BAD)), "every .rtdc below, sorted, once"
    for name in GOOD:
        assert got[name]["status"] == "done", got[name]
        assert got[name]["output"] == str(out / out_name(name))
        assert got[name]["events"] == len(expected[name])
    for name, fragment in BAD.items():
        assert got[name]["status"] == "failed"
        assert fragment in got[name]["error"], got[name]["error"]
        assert "\n" not in got[name]["error"]
    assert_outputs_exact(out, expected)
    # the outputs and nothing else; the inputs untouched
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.rtdc")) == sorted(
        out_name(n) for n in GOOD
    )
    assert not [p for p in out.rglob(".*")], "no temporaries left"
    assert digest(tree) == before

    written = digest(out)
    again = by_input(compute_backgrounds(tree, out, K, recursive=True, progress=False), tree)
    assert {n: again[n]["status"] for n in GOOD} == dict.fromkeys(GOOD, "skipped")
    assert all(again[n]["note"] == "up to date" for n in GOOD)
    assert {n: again[n]["status"] for n in BAD} == dict.fromkeys(BAD, "failed")
    assert digest(out) == written


def test_batch_equals_the_single_file_run(tree, tmp_path):
    name = "day2/sub/d.rtdc"
    [result] = compute_backgrounds([tree / name], tmp_path / "batch", K, progress=False)
    compute_background(tree / name, tmp_path / "single.rtdc", K, progress=False)
    batch = tmp_path / "batch" / out_name(os.path.basename(name))
    assert result["output"] == str(batch)
    np.testing.assert_array_equal(
        read_images(batch, "events/image_bg"),
        read_images(tmp_path / "single.rtdc", "events/image_bg"),
    )
    with h5py.File(batch) as a, h5py.File(tmp_path / "single.rtdc") as b:
        assert dict(a["events/image_bg"].attrs) == dict(b["events/image_bg"].attrs)
        assert sorted(a) == sorted(b)


def test_files_side_by_side_on_threads_are_exact(tree, expected, tmp_path):
    # four jobs at once in threads of one process: each must write its own blocks
    names = GOOD[:4]
    results = compute_backgrounds(
        [tree / n for n in names], tmp_path, K, progress=False, files_at_once=4, num_workers=4
    )
    assert [r["status"] for r in results] == ["done"] * 4
    # outputs mirror the inputs' tree below their common folder
    assert_outputs_exact(tmp_path, expected, names=names)


def test_processes_scheduler_shares_one_pool(tree, expected, tmp_path):
    names = GOOD[:4]
    before = set(multiprocessing.active_children())
    results = compute_backgrounds(
        [tree / n for n in names], tmp_path, K, progress=False, scheduler="processes"
    )
    assert [r["status"] for r in results] == ["done"] * 4
    assert set(multiprocessing.active_children()) <= before, "the pool's workers are gone"
    assert_outputs_exact(tmp_path, expected, names=names)


def test_outputs_inside_the_tree_are_never_inputs(tree, expected, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(tree, raw)
    shutil.rmtree(raw / "bad")
    first = compute_backgrounds(raw, raw / "bg", K, recursive=True, progress=False)
    assert sorted(os.path.relpath(r["input"], raw) for r in first) == sorted(GOOD)
    # the outputs below raw/bg carry our log: they are left out, not processed
    again = compute_backgrounds(raw, raw / "bg", K, recursive=True, progress=False)
    assert sorted(os.path.relpath(r["input"], raw) for r in again) == sorted(GOOD)
    assert {r["status"] for r in again} == {"skipped"}
    assert_outputs_exact(raw / "bg", expected)


def test_cli_folder_prints_lines_table_report_and_exit_1(tree, expected, tmp_path):
    out, report = tmp_path / "out", tmp_path / "report.json"
    result = run_cli("-r", tree, out, "-k", K, "--report", report)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    for name in GOOD:
        assert f"done     {tree / name} -> {out / out_name(name)}" in result.stderr
    for name in BAD:
        assert f"failed   {tree / name}" in result.stderr
    assert re.search(r"^done +5 files", result.stderr, re.M)
    assert re.search(r"^failed +3 files", result.stderr, re.M)
    data = json.loads(report.read_text())
    assert data["totals"]["done"] == 5 and data["totals"]["failed"] == 3
    assert data["totals"]["events"] == sum(len(e) for e in expected.values())
    assert_outputs_exact(out, expected)

    # rerun: all up to date; the bad ones still fail
    again = run_cli("-r", tree, out, "-k", K, "--report", report, "-q")
    assert again.returncode == 1 and again.stderr == ""
    assert json.loads(report.read_text())["totals"]["skipped"] == 5

    # only the good ones: exit 0
    good = run_cli(*[tree / n for n in GOOD], out, "-k", K, "-q")
    assert good.returncode == 0, good.stderr


def test_other_parameters_are_refused_unless_overwrite(tree, tmp_path):
    inputs = [tree / "day1/a.rtdc", tree / "day1/b.rtdc"]
    assert run_cli(*inputs, tmp_path, "-k", K, "-q").returncode == 0
    written = digest(tmp_path)
    refused = run_cli(*inputs, tmp_path, "-k", K + 2)
    assert refused.returncode == 1
    assert f"was made with kernel_size={K}, this run has {K + 2}" in refused.stderr
    assert "--overwrite" in refused.stderr
    assert digest(tmp_path) == written
    replaced = run_cli(*inputs, tmp_path, "-k", K + 2, "--overwrite", "-q")
    assert replaced.returncode == 0
    np.testing.assert_array_equal(
        read_images(tmp_path / "a_bg.rtdc", "events/image_bg"),
        rolling_median_reference(read_images(inputs[0]), K + 2),
    )


def test_in_place_on_a_folder(tree, expected, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(tree / "day1", raw / "day1")
    shutil.copytree(tree / "day2", raw / "day2")
    images = {n: read_images(raw / n) for n in GOOD[:4]}
    result = run_cli("-r", "--in-place", raw, "-k", K, "-q")
    assert result.returncode == 0, result.stderr
    for name in GOOD[:4]:
        np.testing.assert_array_equal(read_images(raw / name), images[name])
        np.testing.assert_array_equal(read_images(raw / name, "events/image_bg"), expected[name])
    assert sorted(str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file()) == sorted(
        GOOD[:4]
    )
    written = digest(raw)
    again = run_cli("-r", "--in-place", raw, "-k", K, "--report", tmp_path / "r.json", "-q")
    assert again.returncode == 0
    assert json.loads((tmp_path / "r.json").read_text())["totals"]["skipped"] == 4
    assert digest(raw) == written


def test_zarr_folder_and_one_input_into_an_existing_folder(tree, expected, tmp_path):
    result = run_cli(tree / "day1", tmp_path, "-r", "-k", K, "--format", "zarr", "-q")
    assert result.returncode == 0, result.stderr
    for name in ("a.rtdc", "b.rtdc"):
        np.testing.assert_array_equal(
            read_images(tmp_path / out_name(name, ".zarr"), "events/image_bg"),
            expected[f"day1/{name}"],
        )
    again = run_cli(tree / "day1", tmp_path, "-r", "-k", K, "--format", "zarr")
    assert again.returncode == 0 and re.search(r"^skipped +2 files", again.stderr, re.M)
    # one INPUT and an existing folder: the output goes into the folder
    single = run_cli(tree / "day2/c.rtdc", tmp_path, "-k", K, "-q")
    assert single.returncode == 0, single.stderr
    np.testing.assert_array_equal(
        read_images(tmp_path / "c_bg.rtdc", "events/image_bg"), expected["day2/c.rtdc"]
    )


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["{tree}", "{tmp}/o"], ["is a folder", "-r"]),
        (["-r", "{tree}"], ["output folder"]),
        (["-r", "{tree}", "{tree}/day1/a.rtdc"], ["is a file", "output folder"]),
        (["{tree}/day1/a.rtdc", "{tree}/nope.rtdc", "{tmp}/o"], ["does not exist"]),
        (["--in-place", "{tree}/day1/a.rtdc", "{tree}/day1/b.rtdc", "{tmp}/o"], ["needs -r"]),
        (["-r", "{tree}/day1", "{tmp}/o", "--report", "{tmp}/no/r.json"], ["--report"]),
    ],
)
def test_usage_errors_exit_2_and_write_nothing(args, fragments, tree, tmp_path):
    args = [a.format(tree=tree, tmp=tmp_path) for a in args]
    assert_one_line_error(run_cli(*args, "-k", K), *fragments)
    assert list(tmp_path.iterdir()) == []


def test_help_states_the_folder_rules():
    result = run_cli("--help")
    for words in ["--recursive", "--report", "OUTPUT is a folder when", "<name>_bg.rtdc"]:
        assert words in result.stdout


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """Eight files that take a while together, for the interrupt tests."""
    root = tmp_path_factory.mktemp("many")
    for i in range(8):
        write_example(root / f"m{i:02d}.rtdc", n_events=400, seed=10 + i)
    return root


def _interrupt(many, out, sig):
    """Start a batch, send ``sig`` once the first file is done, wait for the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollmed_dask", "-r", many, out, "-k", str(K), "--scheduler",
         "threads"],
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "done " in line:  # after the bar's carriage returns
            time.sleep(0.2)
            proc.send_signal(sig)
            break
    lines += proc.stderr.readlines()
    return proc.wait(timeout=120), "".join(lines)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_batch_keeps_finished_files_and_a_rerun_completes(sig, many, tmp_path):
    expected = {}
    for path in sorted(many.iterdir()):  # the single-file run, itself tested against numpy
        compute_background(path, tmp_path / "single.rtdc", K, progress=False, overwrite=True)
        expected[path.name] = read_images(tmp_path / "single.rtdc", "events/image_bg")
    before = digest(many)
    out = tmp_path / "out"
    status, stderr = _interrupt(many, out, sig)
    assert status == (130 if sig == signal.SIGINT else -signal.SIGKILL), stderr
    finished = sorted(p.name for p in out.glob("*.rtdc"))
    assert 0 < len(finished) < len(expected), stderr
    for name in finished:  # what is there is complete and exact
        np.testing.assert_array_equal(
            read_images(out / name, "events/image_bg"), expected[name.replace("_bg", "")]
        )
    if sig == signal.SIGINT:
        assert "interrupted" in stderr and "Traceback" not in stderr
        assert not list(out.glob(".*")), "an interrupt removes its temporaries"
    written = {k: v for k, v in digest(out).items() if not k.startswith(".")}

    rerun = run_cli("-r", many, out, "-k", K, "--report", tmp_path / "r.json", "-q")
    assert rerun.returncode == 0, rerun.stderr
    totals = json.loads((tmp_path / "r.json").read_text())["totals"]
    assert totals["skipped"] == len(finished)
    assert totals["done"] == len(expected) - len(finished)
    for name, bg in expected.items():
        np.testing.assert_array_equal(read_images(out / out_name(name), "events/image_bg"), bg)
    assert {k: v for k, v in digest(out).items() if k in written} == written
    assert not list(out.glob(".*")), "the rerun left no temporaries"
    assert digest(many) == before


@pytest.mark.cluster
@pytest.mark.filterwarnings("ignore::UserWarning:distributed")
def test_local_cluster_serves_the_whole_batch(tree, expected, tmp_path):
    from distributed import Client, LocalCluster

    names = GOOD[:4] + ["bad/empty.rtdc"]
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster,
        Client(cluster) as client,
    ):
        results = compute_backgrounds(
            [tree / n for n in names], tmp_path, K, scheduler=client, progress=False
        )
    assert [r["status"] for r in results] == ["done"] * 4 + ["failed"]
    assert_outputs_exact(tmp_path, expected, names=GOOD[:4])


@pytest.mark.cluster
@pytest.mark.filterwarnings("ignore::UserWarning:distributed")
def test_cli_workers_one_cluster_for_the_batch(tree, expected, tmp_path):
    result = run_cli("-r", tree / "day1", tmp_path, "-k", K, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("dashboard:") == 1
    for name in ("a.rtdc", "b.rtdc"):
        np.testing.assert_array_equal(
            read_images(tmp_path / out_name(name), "events/image_bg"), expected[f"day1/{name}"]
        )
