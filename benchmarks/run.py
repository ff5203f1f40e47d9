"""Benchmark rollmed-dask against dcnum, scipy and dask-image; one command.

    python benchmarks/run.py                      # the full suite (~30-40 min)
    python benchmarks/run.py --quick              # tiny smoke run (< 1 min)
    python benchmarks/run.py --sizes 2000 --kernels 100   # a medium sanity run

Every contestant runs in a fresh process (``benchmarks/_cases.py``) on the
same synthetic ``.rtdc`` input (``rollmed_dask.example.write_example``: uint8
80 x 320, zstd-5 + fletcher32, chunks (40, 80, 320) as dcnum writes them) and
writes an output file with the compression dcnum writes. Measured per case:
the call alone (imports excluded, first call included), the whole process,
and the peak RSS of the process tree (summed over the process and all its
descendants, sampled every 50 ms). Afterwards every output is checked against
the truth (see README.md) and the row records ``exact``. A table is printed
and all rows go to a JSON file with the machine they ran on.

This file is the runner (command line, inputs, one fresh process per case,
the suite); the other jobs live in modules of their own: ``_env.py``
(machine, versions, commit), ``_verify.py`` (outputs against the oracle),
``_report.py`` (ratios, targets, the table), ``_cases.py`` (what each case
process runs) and ``_oracle.py`` (the independent reference).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _camera import kernel_noise_text, measure_noise, noise_text  # noqa: E402
from _env import machine_info  # noqa: E402
from _report import (  # noqa: E402
    IO_FLOORS,
    first_call_text,
    io_stages_text,
    ratios,
    table,
    targets,
    targets_text,
)
from _verify import (  # noqa: E402
    EXPECTED_LAYOUT,
    IMAGE_SHAPE,
    MiB,
    datasets_equal,
    layout,
    open_file,
    output_layout,
    verify_full,
    verify_sampled,
)

SCHEMA_VERSION = 1
OURS = ("ours-threads", "ours-processes", "ours-scipy-engine")
BASELINES = ("dcnum", "scipy", "dask-image")
KERNEL_MAX_EVENTS = 20000
# first-call: files of these dtypes too (the input's frames converted), each in a fresh process
FIRST_CALL_DTYPES = ("float32", "float64", "uint16", "int16")
ALL_CONTESTANTS = ("kernel", "kernel-noise", "first-call", "io-stages", "graph", *IO_FLOORS,
                   "ours-threads", "ours-processes", "ours-scipy-engine",
                   *BASELINES)  # fmt: skip
DEFAULT_CONTESTANTS = tuple(c for c in ALL_CONTESTANTS if c != "ours-scipy-engine")


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(names) - set(ALL_CONTESTANTS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown contestant(s) {', '.join(unknown)}; choose from {', '.join(ALL_CONTESTANTS)}"
        )
    return names


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults; a default of None is described in the help text itself."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark rollmed-dask against dcnum, scipy and dask-image.",
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run: N=300, K=20, every contestant, graph at N=10^6",
    )
    p.add_argument(
        "--sizes",
        type=_ints,
        default=None,
        help="numbers of events N, comma separated (default 20000,200000)",
    )
    p.add_argument(
        "--kernels",
        type=_ints,
        default=None,
        help="kernel sizes K, comma separated (default 20,100,500)",
    )
    p.add_argument(
        "--contestants",
        type=_names,
        default=None,
        help=f"subset of {','.join(ALL_CONTESTANTS)} (default: all but ours-scipy-engine)",
    )
    p.add_argument(
        "--skip-dcnum-above",
        type=int,
        default=None,
        help="run dcnum only for N up to this (default: the smallest N)",
    )
    p.add_argument(
        "--dcnum-kernels",
        type=_ints,
        default=None,
        help="K values dcnum runs at (default 20,100: dcnum at K=500 and "
        "N=20000 would take ~25 min)",
    )
    p.add_argument(
        "--skip-baselines-above",
        type=int,
        default=None,
        help="run scipy, dask-image and ours-scipy-engine only for N up to "
        "this (default: the smallest N)",
    )
    p.add_argument(
        "--baseline-kernels",
        type=_ints,
        default=None,
        help="K values scipy, dask-image, ours-scipy-engine run at (default 100)",
    )
    p.add_argument(
        "--graph-events",
        type=int,
        default=None,
        help="N of the graph-building case (default 10^7)",
    )
    p.add_argument("--graph-kernel", type=int, default=100, help="K of the graph-building case")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count(),
        help="threads/processes of every parallel contestant",
    )
    p.add_argument(
        "--oracle-budget",
        type=float,
        default=200.0,
        help="seconds the exact check of one (N, K) may take by the estimate; "
        "above, outputs are compared with each other in full and with "
        "the oracle at sampled rows (the smallest N is always checked "
        "in full)",
    )
    p.add_argument(
        "--data-dir",
        type=pathlib.Path,
        default=HERE / "data",
        help="inputs (reused when present with the same N) and outputs",
    )
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=HERE / "results" / "latest.json",
        help="where the JSON of the run goes",
    )
    p.add_argument(
        "--case-timeout",
        type=float,
        default=3600.0,
        help="seconds before a case is killed and recorded as failed",
    )
    p.add_argument(
        "--max-rss-gb",
        type=float,
        default=12.0,
        help="kill a case whose process tree uses more memory than this (a shared machine)",
    )
    p.add_argument(
        "--measure-noise",
        type=pathlib.Path,
        default=None,
        metavar="FILE",
        help="only print the temporal noise, fixed pattern and share of frames with "
        "objects of FILE (an .rtdc), to compare with the benchmark's input, and exit",
    )
    p.add_argument(
        "--noise-dataset",
        default="events/image",
        help="the image dataset --measure-noise reads",
    )
    p.add_argument(
        "--keep-outputs",
        action="store_true",
        help="keep output files (default: deleted once checked)",
    )
    a = p.parse_args(argv)
    q = a.quick
    a.sizes = a.sizes or ([300] if q else [20000, 200000])
    a.kernels = a.kernels or ([20] if q else [20, 100, 500])
    a.contestants = a.contestants or list(DEFAULT_CONTESTANTS)
    a.sizes = sorted(set(a.sizes))
    smallest = a.sizes[0]
    if a.skip_dcnum_above is None:
        a.skip_dcnum_above = smallest
    if a.skip_baselines_above is None:
        a.skip_baselines_above = smallest
    a.dcnum_kernels = a.dcnum_kernels or (a.kernels if q else [20, 100])
    a.baseline_kernels = a.baseline_kernels or (a.kernels if q else [100])
    a.graph_events = a.graph_events or (10**6 if q else 10**7)
    a.kernel_repeat = 1 if q else 3
    a.kernel_check_seconds = 2.0 if q else 10.0
    # kernel-noise: the kernel against noise, K and cells; --quick on tiny frames
    a.noise_sigmas = "1,4" if q else "1,2,4,8"
    a.noise_cell_rates = "0,0.1"  # 0 % and about 77 % of frames with cells
    a.noise_kernels = ",".join(map(str, a.kernels)) if q else "10,100,1000"
    a.noise_frames_after_k = 100 if q else 1000
    a.noise_height = 16 if q else IMAGE_SHAPE[0]
    if a.measure_noise is not None:
        return a
    for k in a.kernels:
        if k >= smallest:
            p.error(f"K={k} must be smaller than the smallest N={smallest}")
    return a


# --------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------


def input_ok(path: pathlib.Path, n: int) -> bool:
    import h5py
    import hdf5plugin  # noqa: F401

    try:
        with h5py.File(path, "r") as h5:
            lay = layout(h5["events/image"])
    except (OSError, KeyError):
        return False
    return (lay["shape"] == [n, *IMAGE_SHAPE] and lay["dtype"] == "uint8"
            and lay["chunks"] == EXPECTED_LAYOUT["chunks"]
            and lay["filters"] == EXPECTED_LAYOUT["filters"])  # fmt: skip


def ensure_input(data_dir: pathlib.Path, n: int) -> pathlib.Path:
    from rollmed_dask.example import write_example

    path = data_dir / f"example-n{n}-seed0.rtdc"
    if path.exists() and input_ok(path, n):
        log(f"input: reusing {path}")
        return path
    tmp = path.with_name(f".{path.name}.partial")
    log(f"input: writing {path} (N={n}) ...")
    t0 = time.perf_counter()
    write_example(tmp, n_events=n, image_shape=IMAGE_SHAPE, seed=0)
    os.replace(tmp, path)
    log(f"input: written in {time.perf_counter() - t0:.1f} s")
    if not input_ok(path, n):
        raise RuntimeError(f"{path} does not have the dcnum layout {EXPECTED_LAYOUT}")
    return path


# --------------------------------------------------------------------------
# running one case
# --------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _tree_rss(proc) -> tuple[int, int]:
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total, len(procs)


def _kill_tree(popen) -> None:
    """Kill the case process and its descendants (all started by us), by pid."""
    import psutil

    try:
        children = psutil.Process(popen.pid).children(recursive=True)
    except psutil.Error:
        children = []
    popen.kill()
    for c in children:
        try:
            c.kill()
        except psutil.Error:
            pass


def run_case(
    case: str, argv: list[str], work: pathlib.Path, label: str, timeout: float, max_rss_gb: float
) -> dict:
    """Run ``_cases.py case argv`` in a fresh process; timings, peak tree RSS, result."""
    import psutil

    result_path = work / f"{label}.result.json"
    log_path = work / f"{label}.log"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "_cases.py"), case, *map(str, argv),
           "--result", str(result_path)]  # fmt: skip
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    load0 = os.getloadavg()[0]
    peak, peak_procs, killed = 0, 0, None
    with open(log_path, "w") as logf:
        t0 = time.perf_counter()
        popen = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        proc = psutil.Process(popen.pid)
        while popen.poll() is None:
            rss, nprocs = _tree_rss(proc)
            peak = max(peak, rss)
            peak_procs = max(peak_procs, nprocs)
            if time.perf_counter() - t0 > timeout:
                killed = f"killed after {timeout:.0f} s (--case-timeout)"
            elif rss > max_rss_gb * 2**30:
                killed = (f"killed at {rss / 2**30:.1f} GB RSS of the process tree "
                          f"(--max-rss-gb {max_rss_gb:g})")  # fmt: skip
            if killed:
                _kill_tree(popen)
                popen.wait()
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
    row = {"process_s": wall, "peak_rss_tree_mb": peak / MiB, "peak_processes": peak_procs,
           "load_average_before": load0, "load_average_after": os.getloadavg()[0],
           "log": str(log_path)}  # fmt: skip
    if result_path.exists():
        row.update(json.loads(result_path.read_text()))
    else:
        row.update(status="error", error=f"exit code {popen.returncode}, no result")
    if killed:
        row.update(status="error", error=killed)
    if row["status"] != "ok":
        tail = log_path.read_text(errors="replace")[-3000:]
        log(f"  {label} FAILED: {row.get('error')}\n{row.get('traceback', '') or tail}")
    return row


def _plan_event_chunk(k: int) -> int:
    from rollmed_dask.pipeline import plan_chunks

    return plan_chunks((10**9, *IMAGE_SHAPE), "uint8", k, (40, *IMAGE_SHAPE),
                       align_events=40)[0][0]  # fmt: skip


class Suite:
    def __init__(self, a):
        self.a = a
        self.rows: list[dict] = []
        self.rates: dict[tuple[str, int], tuple[int, float]] = {}  # (case, K) -> (N, ns/px-ev)
        self.work = a.data_dir / "work"
        self.extras: dict = {}  # results with tables of their own
        self.work.mkdir(parents=True, exist_ok=True)

    def want(self, name: str) -> bool:
        return name in self.a.contestants

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        return row

    def skipped(self, name, n, k, reason, scheduler=None):
        rate = self.rates.get((name, k))
        if rate is not None:
            est = rate[1] * n * IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * 1e-9
            reason += (f"; estimated {est:.0f} s from its {rate[1]:.0f} ns/pixel-event "
                       f"at N={rate[0]}")  # fmt: skip
        log(f"skip {name} N={n} K={k}: {reason}")
        return self.add({"case": name, "events": n, "kernel": k, "scheduler": scheduler,
                         "status": "skipped", "reason": reason, "exact": None})  # fmt: skip

    def run(self, name, case, argv, n, k, scheduler=None, label=None):
        label = label or f"{name}-n{n}-k{k}"
        log(f"run {label} ...")
        row = run_case(case, argv, self.work, label, self.a.case_timeout, self.a.max_rss_gb)
        row.update(case=name, events=n, kernel=k, scheduler=scheduler)
        row.setdefault("exact", None)
        if row["status"] == "ok":
            row["ns_per_pixel_event"] = row["call_s"] / (n * IMAGE_SHAPE[0] * IMAGE_SHAPE[1]) * 1e9
            self.rates[(name, k)] = (n, row["ns_per_pixel_event"])
            log(f"  {label}: call {row['call_s']:.2f} s, process {row['process_s']:.2f} s, "
                f"peak tree RSS {row['peak_rss_tree_mb']:.0f} MB")  # fmt: skip
        return self.add(row)

    # ---- cases without an output file

    def kernel_rows(self, input_path, n):
        a = self.a
        label = f"kernel-n{n}"
        log(f"run {label} ...")
        threads = f"1,{a.workers}" if a.workers > 1 else "1"
        argv = ["--input", input_path, "--kernels", ",".join(map(str, a.kernels)),
                "--threads", threads, "--repeat", a.kernel_repeat,
                "--check-seconds", a.kernel_check_seconds]  # fmt: skip
        row = run_case("kernel", argv, self.work, label, a.case_timeout, a.max_rss_gb)
        if row["status"] != "ok":
            row.update(case="kernel", events=n, kernel=None, exact=None)
            return self.add(row)
        for kr in row["extra"]["rows"]:
            for key, val in kr.items():
                if not key.startswith("threads_"):
                    continue
                threads = int(key.split("_")[1])
                self.add({
                    "case": "kernel", "events": kr["blocks"] * kr["block_events"],
                    "kernel": kr["kernel"], "scheduler": f"{threads} thread(s)", "status": "ok",
                    "call_s": min(val["seconds"]),
                    "ns_per_pixel_event": val["ns_per_pixel_event_min"],
                    "ns_per_pixel_event_median": val["ns_per_pixel_event_median"],
                    "first_call_s": kr["first_call_s"], "block_events": kr["block_events"],
                    "blocks": kr["blocks"], "exact": kr["exact"], "check": kr["check"],
                    "sample_exact": kr["sample_exact"], "process_s": row["process_s"],
                    "peak_rss_tree_mb": row["peak_rss_tree_mb"], "import_s": row["import_s"],
                    "log": row["log"],
                })  # fmt: skip
        log(f"  {label}: done in {row['process_s']:.1f} s")

    def kernel_noise(self):
        """The kernel against noise sigma, K and cells: a table of its own."""
        a = self.a
        log("run kernel-noise ...")
        argv = ["--sigmas", a.noise_sigmas, "--cell-rates", a.noise_cell_rates,
                "--kernels", a.noise_kernels, "--frames-after-k", a.noise_frames_after_k,
                "--height", a.noise_height, "--repeat", a.kernel_repeat]  # fmt: skip
        row = run_case("kernel-noise", argv, self.work, "kernel-noise", a.case_timeout,
                       a.max_rss_gb)  # fmt: skip
        self.extras["kernel_noise"] = row
        if row["status"] == "ok":
            log(f"  kernel-noise: done in {row['process_s']:.1f} s")

    def first_call(self, input_path, n):
        """First ``compute_background`` call over the steady one: as a user runs it, with
        its set-up done piece by piece beforehand, and on files of other dtypes, each in
        a fresh process after installation (every kernel compiled and cached first)."""
        a = self.a
        k = 100 if 100 in a.kernels else a.kernels[0]
        res = {"events": n, "kernel": k}
        modes = [("plain", []), ("parts", ["--parts"])]
        modes += [(dt, ["--dtype", dt]) for dt in FIRST_CALL_DTYPES]
        for mode, extra in modes:
            label = f"first-call-{mode}"
            log(f"run {label} N={n} K={k} ...")
            out = self.out_path(label, n, k)
            argv = ["--input", input_path, "--output", out, "--kernel", k,
                    "--workers", a.workers, *extra]  # fmt: skip
            res[mode] = run_case("first-call", argv, self.work, label, a.case_timeout,
                                 a.max_rss_gb)  # fmt: skip
            self._cleanup(out)
        self.extras["first_call"] = res

    def io_stages(self, input_path, n):
        """CPU per stage of a file job, against plain h5py's read + write."""
        a = self.a
        k = 100 if 100 in a.kernels else a.kernels[0]
        log(f"run io-stages N={n} K={k} ...")
        out = self.out_path("io-stages", n, k)
        argv = ["--input", input_path, "--output", out, "--kernel", k, "--blocks", 8]
        row = run_case("io-stages", argv, self.work, "io-stages", a.case_timeout, a.max_rss_gb)
        self._cleanup(out)
        self.extras["io_stages"] = row

    def graph_row(self):
        a = self.a
        out = self.work / "graph-input.rtdc"
        row = self.run("graph", "graph", ["--output", out, "--kernel", a.graph_kernel,
                                          "--graph-events", a.graph_events],
                       a.graph_events, a.graph_kernel, label="graph")  # fmt: skip
        row.pop("ns_per_pixel_event", None)
        if row["status"] == "ok":
            g = row["extra"]["graph"]
            row.update(exact=row["extra"]["exact"], check=row["extra"]["check"],
                       graph=g)  # fmt: skip

    # ---- cases writing files

    def out_path(self, name, n, k):
        path = self.work / f"{name}-n{n}-k{k}.rtdc"
        path.unlink(missing_ok=True)
        return path

    def size(self, input_path, n):
        a = self.a
        for k in a.kernels:
            chunk = _plan_event_chunk(k)
            outputs: dict[str, pathlib.Path] = {}
            rows: dict[str, dict] = {}
            jobs = []
            for sched in ("threads", "processes"):
                if self.want(f"ours-{sched}"):
                    jobs.append((f"ours-{sched}", "ours", ["--scheduler", sched], sched))
            if self.want("ours-scipy-engine"):
                if n <= a.skip_baselines_above and k in a.baseline_kernels:
                    jobs.append(("ours-scipy-engine", "ours",
                                 ["--scheduler", "processes", "--engine", "scipy"],
                                 "processes"))  # fmt: skip
                else:
                    self.skipped("ours-scipy-engine", n, k, self._baseline_reason(n, k),
                                 "processes")  # fmt: skip
            if self.want("dcnum"):
                if n <= a.skip_dcnum_above and k in a.dcnum_kernels:
                    batch = max(k + 1, min(10000, n))
                    jobs.append(("dcnum", "dcnum", ["--batch-size", batch], "processes"))
                elif n > a.skip_dcnum_above:
                    self.skipped(
                        "dcnum",
                        n,
                        k,
                        f"dcnum runs only for N <= {a.skip_dcnum_above} "
                        f"(--skip-dcnum-above), to keep the run short",
                        "processes",
                    )
                else:
                    self.skipped(
                        "dcnum",
                        n,
                        k,
                        f"K={k} is not in --dcnum-kernels "
                        f"{a.dcnum_kernels}, to keep the run short",
                        "processes",
                    )
            for name, sched in (("scipy", "1 thread"), ("dask-image", "threads")):
                if not self.want(name):
                    continue
                if n <= a.skip_baselines_above and k in a.baseline_kernels:
                    extra = ["--event-chunk", chunk] if name == "dask-image" else []
                    jobs.append((name, name, extra, sched))
                else:
                    self.skipped(name, n, k, self._baseline_reason(n, k), sched)
            for name, case, extra, sched in jobs:
                out = self.out_path(name, n, k)
                row = self.run(name, case, ["--input", input_path, "--output", out,
                                            "--kernel", k, "--workers", a.workers, *extra],
                               n, k, scheduler=sched)  # fmt: skip
                if row["status"] == "ok":
                    row["layout"] = output_layout(out)
                    outputs[name] = out
                    rows[name] = row
                else:
                    self._cleanup(out)
            self.verify(input_path, n, k, outputs, rows)
            self.io_floor(input_path, n, k, outputs, rows)
            for out in outputs.values():
                self._cleanup(out)

    def io_floor(self, input_path, n, k, outputs, rows):
        """The I/O floor at (N, K): read the input, write the known result, no compute."""
        a = self.a
        names = [f"io-floor-{s}" for s in ("threads", "processes") if self.want(f"io-floor-{s}")]
        if not names:
            return
        good = [name for name in outputs if rows[name]["exact"] is True] or [
            name for name in outputs if rows[name].get("sample_exact")
        ]
        if not good:
            for name in names:
                self.skipped(
                    name,
                    n,
                    k,
                    "no checked output to take the result from (run "
                    "ours-threads or another contestant as well)",
                    name.split("-")[-1],
                )
            return
        known = outputs[good[0]]
        for name in names:
            sched = name.split("-")[-1]
            out = self.out_path(name, n, k)
            row = self.run(name, "io-floor", ["--input", input_path, "--output", out,
                                              "--background", known, "--kernel", k,
                                              "--scheduler", sched, "--workers", a.workers],
                           n, k, scheduler=sched)  # fmt: skip
            if row["status"] == "ok":
                row["layout"] = output_layout(out)
                with open_file(known) as fk, open_file(out) as fo:
                    same, bad = datasets_equal(fk["events/image_bg"], fo["events/image_bg"])
                # as exact as the output it copies: True, or None if that one was sampled
                exact = rows[good[0]]["exact"] if same else False
                row.update(exact=exact,
                           sample_exact=same and bool(rows[good[0]].get("sample_exact", True)),
                           first_bad_event=bad, background_from=good[0],
                           check=f"output identical to the checked {good[0]} output"
                           if same else f"output DIFFERS from {good[0]}")  # fmt: skip
            self._cleanup(out)

    def _baseline_reason(self, n, k):
        a = self.a
        if n > a.skip_baselines_above:
            return (
                f"runs only for N <= {a.skip_baselines_above} (--skip-baselines-above): "
                f"~1 us per pixel-event"
            )
        return f"K={k} is not in --baseline-kernels {a.baseline_kernels}: ~1 us per pixel-event"

    def verify(self, input_path, n, k, outputs, rows):
        if not outputs:
            return
        import _oracle

        a = self.a
        px = n * IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
        est = px * _oracle.ns_per_pixel_event(k) * 1e-9 / max(1, min(a.workers, 2) * 0.7)
        full = n == a.sizes[0] or est <= a.oracle_budget
        how = "oracle on every row" if full else "sampled oracle + outputs compared in full"
        log(f"check N={n} K={k}: {how} (estimated oracle {est:.0f} s) ...")
        t0 = time.perf_counter()
        if full:
            res = verify_full(input_path, outputs, n, k, threads=a.workers)
        else:
            res = verify_sampled(input_path, outputs, n, k)
        dt = time.perf_counter() - t0
        for name, r in res.items():
            rows[name].update(r)
            rows[name]["check_s"] = round(dt, 2)
            if rows[name]["exact"] is False:
                log(f"  {name} N={n} K={k}: WRONG RESULT ({r})")
        log(f"  checked in {dt:.1f} s")

    def _cleanup(self, path):
        # the output and the hidden partial one a killed run may leave behind
        partial = path.with_name(f".{path.name}.partial")
        for p in (path, partial) if not self.a.keep_outputs else (partial,):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.measure_noise is not None:
        try:
            res = measure_noise(a.measure_noise, a.noise_dataset)
        except (OSError, ValueError) as exc:
            print(f"run.py: error: --measure-noise {a.measure_noise}: {exc}", file=sys.stderr)
            return 2
        print(noise_text(res))
        print(json.dumps(res))
        return 0
    t_start = time.perf_counter()
    a.data_dir.mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    log(
        f"machine: {info['cpu_model']}, {info['cpu_count_logical']} CPUs, "
        f"{info['memory_total_gb']} GB, load {info['load_average_at_start']}"
    )
    import _oracle

    t0 = time.perf_counter()
    _oracle.self_check()
    log(f"oracle agrees with rolling_median_reference ({time.perf_counter() - t0:.1f} s)")
    inputs = {n: ensure_input(a.data_dir, n) for n in a.sizes}
    suite = Suite(a)
    input_noise = measure_noise(inputs[min(a.sizes)])
    log(f"input noise: {noise_text(input_noise)}")
    if suite.want("kernel-noise"):
        suite.kernel_noise()
    if suite.want("first-call"):
        suite.first_call(inputs[min(a.sizes)], min(a.sizes))
    if suite.want("io-stages"):
        n_stages = max((n for n in a.sizes if n <= KERNEL_MAX_EVENTS), default=min(a.sizes))
        suite.io_stages(inputs[n_stages], n_stages)
    if suite.want("kernel"):
        # blocks as long as the pipeline plans them need a large enough input;
        # the stack is held in memory, so at most N=20000 (512 MB)
        n_kernel = max((n for n in a.sizes if n <= KERNEL_MAX_EVENTS), default=min(a.sizes))
        suite.kernel_rows(inputs[n_kernel], n_kernel)
    if suite.want("graph"):
        suite.graph_row()
    for n in a.sizes:
        suite.size(inputs[n], n)
    ratios(suite.rows)
    judged = targets(suite.rows, a.workers, suite.extras)
    info["load_average_at_end"] = list(os.getloadavg())
    total = time.perf_counter() - t_start
    config = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(a).items()}
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv] if argv is None else ["run.py", *argv],
        "machine": info,
        "config": config,
        "image_shape": list(IMAGE_SHAPE),
        "inputs": {str(n): str(p) for n, p in inputs.items()},
        "total_s": total,
        "input_noise": input_noise,
        "rows": suite.rows,
        **suite.extras,
        "targets": judged,
    }
    a.out.write_text(json.dumps(doc, indent=1, default=str))
    text = table(suite.rows)
    print(
        f"\nrollmed-dask benchmark, {info['cpu_model']}, {info['cpu_count_logical']} CPUs, "
        f"{info['memory_total_gb']} GB RAM, {info['platform']}, Python "
        f"{info['versions']['python']}; load average {info['load_average_at_start'][0]:.2f} "
        f"at start, {info['load_average_at_end'][0]:.2f} at end; {total:.0f} s in all\n"
    )
    print(text)
    print("\nx dcnum: dcnum's call time / this call time at the same N and K (higher is faster).")
    print(
        "x io-floor: this call time / the faster io-floor call at the same N and K "
        "(1.0 = I/O bound)."
    )
    print(f"\nInput: {noise_text(input_noise)}")
    kn = suite.extras.get("kernel_noise")
    if kn is not None and kn["status"] == "ok":
        ex = kn["extra"]
        h, w = ex["image_shape"]
        print(
            f"\nThe kernel on camera frames (ns per output pixel-event, 1 thread, CPU time, "
            f"min of {ex['repeat']}; {ex['frames_after_k'] + 1} medians per pixel of {h} x {w}; "
            f"exact on every 7th pixel: {ex['exact_every_7th_pixel']}):"
        )
        print(kernel_noise_text(ex))
    fc = suite.extras.get("first_call")
    if fc is not None:
        print(f"\n{first_call_text(fc)}")
    st = suite.extras.get("io_stages")
    if st is not None:
        print(f"\n{io_stages_text(st)}")
    print("\nTargets (reported, never asserted):")
    print(targets_text(judged))
    print(f"\nJSON: {a.out}")
    bad = [r for r in suite.rows if r["status"] == "error" or r.get("exact") is False]
    if kn is not None and (kn["status"] != "ok" or not kn["extra"]["exact_every_7th_pixel"]):
        bad.append(kn)
    if fc is not None and any(fc[m]["status"] != "ok" for m in ("plain", "parts")):
        bad.append(fc)
    if st is not None and st["status"] != "ok":
        bad.append(st)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
