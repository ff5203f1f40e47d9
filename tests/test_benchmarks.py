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

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"

WITH_OUTPUT = {"io-floor-threads", "io-floor-processes", "ours-threads", "ours-processes",
               "dcnum", "scipy", "dask-image"}  # fmt: skip
# events/image_bg as dcnum writes it: chunks of 40 frames, zstd level 5, fletcher32
DCNUM_LAYOUT = {"chunks": [40, 80, 320], "filters": [[32015, [5]], [3, []]]}


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
            assert {k: r["layout"][k] for k in DCNUM_LAYOUT} == DCNUM_LAYOUT, where
            assert r["x_io_floor"] > 0, where
            if not r["case"].startswith("io-floor"):
                assert r["kernel"] == 20 and r["speedup_vs_dcnum"] > 0, where

    kernels = [r for r in rows if r["case"] == "kernel"]
    assert {r["scheduler"] for r in kernels} == {"1 thread(s)", "2 thread(s)"}
    graph = next(r for r in rows if r["case"] == "graph")["graph"]
    assert graph["events"] == 10**6 and graph["build_s"] > 0 and graph["tasks"] > 0

    assert [t["target"] for t in doc["targets"]]
    assert all({"target", "measured", "met"} <= set(t) for t in doc["targets"])
    assert "| case | N | K |" in stdout and "Targets" in stdout
