"""From the shell to the first block, and to exit: the CLI on one file, as a user runs it.

    python benchmarks/startup.py [--events 3000] [-k 100] [--repeat 3]

Starts ``rollmed-dask IN OUT -k K --scheduler threads --overwrite`` (the
console script of this environment) on ``rollmed_dask.example.write_example``'s
file and reads its stderr as it comes: the first block is done when the
progress bar first shows events written. Reported per run: wall time to the
first block and to exit, the process's CPU time (user + system of the child),
and the load average. Also ``python -c "import rollmed_dask.cli"`` alone.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_once(cmd) -> dict:
    c0 = child_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    first = None
    seen = b""
    while True:
        piece = os.read(proc.stderr.fileno(), 4096)
        if not piece:
            break
        seen += piece
        # tqdm: "rolling median:  4%|...| 120/3.00k": events written > 0
        if first is None and re.search(rb"\| *[1-9][0-9.]*k?/", seen):
            first = time.perf_counter() - t0
    proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(seen.decode(errors="replace")[-2000:])
    return {"first_block_s": first, "exit_s": wall, "cpu_s": child_cpu() - c0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=3000)
    p.add_argument("-k", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)

    from rollmed_dask.example import write_example

    script = shutil.which("rollmed-dask", path=os.path.dirname(sys.executable))
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "in.rtdc"
        write_example(src, a.events)
        cmd = [script, str(src), str(pathlib.Path(tmp) / "bg.rtdc"), "-k", str(a.k),
               "--scheduler", "threads", "--overwrite"]  # fmt: skip
        load0 = os.getloadavg()[0]
        imports = []
        for _ in range(a.repeat):
            c0, t0 = child_cpu(), time.perf_counter()
            subprocess.run([sys.executable, "-c", "import rollmed_dask.cli"], check=True)
            imports.append((time.perf_counter() - t0, child_cpu() - c0))
        runs = [run_once(cmd) for _ in range(a.repeat)]
    print(f"rollmed-dask on one file: N={a.events}, 80 x 320 uint8, K={a.k}, threads; "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f} (2 cores)")  # fmt: skip
    print("| run | shell to first block, wall s | shell to exit, wall s | process CPU s |")
    print("|---|---|---|---|")
    for i, r in enumerate(runs, 1):
        print(f"| {i} | {r['first_block_s']:.2f} | {r['exit_s']:.2f} | {r['cpu_s']:.2f} |")
    w, c = min(imports)
    print(f"\n`python -c 'import rollmed_dask.cli'`: {w:.2f} s wall, {c:.2f} s CPU (best of "
          f"{a.repeat})")  # fmt: skip


if __name__ == "__main__":
    main()
