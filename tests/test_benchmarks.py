"""Smoke test of the benchmark suite: ``benchmarks/run.py --quick`` end to end.

It runs every contestant (dcnum, scipy, dask-image, ours on threads and on
processes, the I/O floor, the kernel and the graph cases) at N=300, K=20 in a
subprocess, then checks the JSON it writes: the machine, the rows, and that
every output was verified bit-exact against the benchmark's oracle.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from rollmed_dask.example import camera_frames, write_example

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import _camera  # noqa: E402

WITH_OUTPUT = {"io-floor-threads", "io-floor-processes", "ours-threads", "ours-processes",
               "dcnum", "scipy", "dask-image"}  # fmt: skip
# events/image_bg as dcnum writes it: chunks of 40 frames, zstd level 5, fletcher32
DCNUM_LAYOUT = {"chunks": [40, 80, 320], "filters": [[32015, [5]], [3, []]]}
# ours and the I/O floor (the same codec as ours): our default, zstd level 1
OUR_LAYOUT = {"chunks": [40, 80, 320], "filters": [[32015, [1]], [3, []]]}
OURS = {"io-floor-threads", "io-floor-processes", "ours-threads", "ours-processes"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--data-dir", str(tmp / "data"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.timeout(300)
def test_quick_benchmark_json_and_exactness(quick_run):
    doc, stdout = quick_run
    assert doc["schema_version"] == 1
    machine = doc["machine"]
    for key in ("platform", "cpu_model", "cpu_count_logical", "memory_total_gb",
                "load_average_at_start", "load_average_at_end"):  # fmt: skip
        assert key in machine, key
    for lib in ("python", "numpy", "dask", "numba", "h5py", "dcnum"):
        assert machine["versions"][lib], lib
    assert doc["config"]["sizes"] == [300] and doc["config"]["kernels"] == [20]

    rows = doc["rows"]
    cases = {r["case"] for r in rows}
    assert cases >= WITH_OUTPUT | {"kernel", "graph"}
    for r in rows:
        where = f"{r['case']} N={r.get('events')} K={r.get('kernel')}"
        assert r["status"] == "ok", (where, r.get("error"), r.get("reason"))
        # a ratio for a wrong result is worthless: every row was checked, and in
        # --quick every check is the full one (the oracle on every row/pixel)
        assert r["exact"] is True, (where, r.get("check"), r.get("first_bad_event"))
        assert r["check"], where
        assert r["call_s"] > 0 and r["peak_rss_tree_mb"] > 0, where
        if r["case"] in WITH_OUTPUT:
            assert r["events"] == 300, where
            assert r["process_s"] >= r["call_s"], where
            assert r["import_s"] > 0 and r["ns_per_pixel_event"] > 0, where
            wanted = OUR_LAYOUT if r["case"] in OURS else DCNUM_LAYOUT
            assert {k: r["layout"][k] for k in wanted} == wanted, where
            assert r["x_io_floor"] > 0, where
            if not r["case"].startswith("io-floor"):
                assert r["kernel"] == 20 and r["speedup_vs_dcnum"] > 0, where

    kernels = [r for r in rows if r["case"] == "kernel"]
    assert {r["scheduler"] for r in kernels} == {"1 thread(s)", "2 thread(s)"}
    graph = next(r for r in rows if r["case"] == "graph")["graph"]
    assert graph["events"] == 10**6 and graph["build_s"] > 0 and graph["tasks"] > 0

    # camera-like input, the kernel against noise, the first call's set-up
    assert 3.0 <= doc["input_noise"]["noise_sigma"] <= 4.2
    assert doc["input_noise"]["share_of_frames_with_objects"] > 0.5
    kn = doc["kernel_noise"]
    assert kn["status"] == "ok" and kn["extra"]["exact_every_7th_pixel"] is True
    assert len(kn["extra"]["rows"]) == 4  # sigma 1, 4 x no cells, cells at K=20
    assert all(r["ns_per_pixel_event"] > 0 for r in kn["extra"]["rows"])
    for mode in ("plain", "parts", "float32", "float64", "uint16", "int16"):
        fc = doc["first_call"][mode]
        assert fc["status"] == "ok", fc.get("error")
        assert len(fc["extra"]["calls"]) == 3
        assert fc["extra"]["kernels_compiled"] == 0, "the kernels are compiled at installation"
    # the compiled kernels (import and first call), dask, h5py and the rest
    assert len(doc["first_call"]["parts"]["extra"]["parts"]) == 3
    stages = doc["io_stages"]
    assert stages["status"] == "ok", stages.get("error")
    assert len(stages["extra"]["ns_per_pixel_event"]) == 6
    assert all(v > 0 for v in stages["extra"]["ns_per_pixel_event"].values())
    assert "The kernel on camera frames" in stdout and "First compute_background" in stdout
    assert "Stages of a file job" in stdout

    assert [t["target"] for t in doc["targets"]]
    assert all({"target", "measured", "met"} <= set(t) for t in doc["targets"])
    assert "| case | N | K |" in stdout and "Targets" in stdout


def test_camera_frames_are_the_example_images(tmp_path):
    import h5py
    import hdf5plugin  # noqa: F401

    path = write_example(tmp_path / "ex.rtdc", n_events=90, image_shape=(24, 64), seed=3)
    with h5py.File(path, "r") as h5:
        np.testing.assert_array_equal(h5["events/image"][:], camera_frames(90, (24, 64), seed=3))


@pytest.mark.parametrize("sigma", [1.0, 3.5, 8.0])
def test_noise_is_measured_as_generated(sigma):
    true = (sigma**2 + 1 / 12) ** 0.5  # uint8 rounding adds 1/12
    quiet = _camera.noise_of_frames(camera_frames(200, (40, 160), noise_sigma=sigma, cell_rate=0))
    assert abs(quiet["noise_sigma"] - true) < 0.03 * true + 0.05, quiet
    assert quiet["share_of_frames_with_objects"] == 0
    busy = _camera.noise_of_frames(camera_frames(200, (40, 160), noise_sigma=sigma))
    assert abs(busy["noise_sigma"] - true) < 0.06 * true + 0.1, busy
    if sigma <= 4:  # darker than 6 sigma: cells stand out from this noise
        assert busy["share_of_frames_with_objects"] > 0.5, busy


def test_the_example_is_camera_like(tmp_path):
    path = write_example(tmp_path / "ex.rtdc", n_events=400)
    proc = subprocess.run([sys.executable, str(RUN), "--measure-noise", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.splitlines()[-1])
    assert 3.0 <= res["noise_sigma"] <= 4.0  # real cameras: 2.6 to 3.1 (dcnum's data) and up
    assert res["share_of_frames_with_objects"] >= 0.6  # cells cross most frames
    assert res["pattern_std"] > 5  # a fixed channel pattern
    assert "temporal noise sigma" in proc.stdout.splitlines()[0]


def test_measure_noise_of_a_missing_file_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(RUN), "--measure-noise", str(tmp_path / "no.rtdc")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "is not a file" in proc.stderr and "Traceback" not in proc.stderr
