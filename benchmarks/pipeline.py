"""ChipStream's whole pipeline, alone and after our background, measured in one run.

A ChipStream user runs ``chipstream-cli -b rollmed -kb kernel_size=K`` (dcnum's
pipeline: rollmed background, default segmentation and features). With
rollmed-dask first, the user runs two commands, and dcnum skips its background:

    rollmed-dask raw.rtdc bg.rtdc -k K              (or raw.rtdc raw.rtdc --in-place)
    chipstream-cli -b rollmed -kb kernel_size=K bg.rtdc

Each command runs as a subprocess and is timed as a whole (imports, worker
start, everything a user waits for). The job log dcnum stores in its result says
whether it computed the background. The disk column is what the user keeps:
the raw file, our output and chipstream's result (a new output links the raw
images; with --copy-images it holds a copy). The load average is printed too:
on a shared machine it decides the times. Prints a table and writes JSON.

    python benchmarks/pipeline.py --events 20000 --kernel 100 --json pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import h5py


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return seconds


def dcnum_background_step(path) -> bool:
    """Whether dcnum computed the background itself, from its own job log."""
    with h5py.File(path, "r") as h5:
        (name,) = [n for n in h5["logs"] if n.startswith("dcnum-job")]
        log = json.loads("\n".join(line.decode() for line in h5["logs"][name][:]))
    return log["tasks"]["background"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20000, help="frames (default 20000)")
    parser.add_argument("--kernel", type=int, default=100, help="K, even (default 100)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="chipstream --num-cpus")
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    args = parser.parse_args(argv)

    from rollmed_dask.example import write_example

    bindir = pathlib.Path(sys.executable).parent
    chipstream = [str(bindir / "chipstream-cli"), "-b", "rollmed", "-kb"]
    chipstream += [f"kernel_size={args.kernel}", "--num-cpus", str(args.cpus)]
    ours = [str(bindir / "rollmed-dask"), "-k", str(args.kernel)]

    work = pathlib.Path(tempfile.mkdtemp(prefix="rollmed-pipeline-"))
    load_before = os.getloadavg()[0]
    try:
        raw = write_example(work / "raw.rtdc", n_events=args.events)
        in_place = pathlib.Path(shutil.copy(raw, work / "in_place.rtdc"))
        rows = []

        t = run([*chipstream, str(raw), str(work / "alone_dcn.rtdc")])
        rows.append(
            (
                "chipstream-cli alone",
                None,
                t,
                dcnum_background_step(work / "alone_dcn.rtdc"),
                disk(raw, work / "alone_dcn.rtdc"),
            )
        )

        for name, flags, out in [
            ("rollmed-dask new file, then chipstream-cli", [], "bg.rtdc"),
            ("rollmed-dask --copy-images, then chipstream-cli", ["--copy-images"], "bg_copy.rtdc"),
        ]:
            t_bg = run([*ours, *flags, str(raw), str(work / out)])
            result = work / f"{pathlib.Path(out).stem}_dcn.rtdc"
            t = run([*chipstream, str(work / out), str(result)])
            rows.append(
                (name, t_bg, t, dcnum_background_step(result), disk(raw, work / out, result))
            )

        t_bg = run([*ours, str(in_place), str(in_place), "--in-place"])
        t = run([*chipstream, str(in_place), str(work / "in_place_dcn.rtdc")])
        rows.append(
            (
                "rollmed-dask --in-place, then chipstream-cli",
                t_bg,
                t,
                dcnum_background_step(work / "in_place_dcn.rtdc"),
                disk(in_place, work / "in_place_dcn.rtdc"),
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load = (load_before, os.getloadavg()[0])

    alone, alone_disk = rows[0][2], rows[0][4]
    print(
        f"\nN={args.events} frames of 80 x 320, K={args.kernel}, chipstream --num-cpus "
        f"{args.cpus}, load average {load[0]:.1f} before, {load[1]:.1f} after"
    )
    print(
        f"{'':48s} {'rollmed-dask':>12s} {'chipstream':>11s} {'total':>8s} "
        f"{'speed-up':>8s} {'disk':>9s} {'/ alone':>7s}  dcnum background step"
    )
    results = []
    for name, t_bg, t_cs, bg_step, nbytes in rows:
        total = (t_bg or 0) + t_cs
        ours_s = f"{t_bg:10.1f} s" if t_bg is not None else f"{'':12s}"
        print(
            f"{name:48s} {ours_s} {t_cs:9.1f} s {total:6.1f} s {alone / total:7.2f}x "
            f"{nbytes / 1e6:6.1f} MB {nbytes / alone_disk:6.2f}x  "
            f"{'ran' if bg_step else 'skipped'}"
        )
        results.append(
            {
                "name": name,
                "rollmed_dask_s": t_bg,
                "chipstream_s": t_cs,
                "total_s": total,
                "disk_bytes": nbytes,
                "dcnum_background_step": bg_step,
            }
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "events": args.events,
                    "kernel_size": args.kernel,
                    "cpus": args.cpus,
                    "load_average": load,
                    "rows": results,
                },
                indent=2,
            )
        )
    return 0


def disk(*paths) -> int:
    """Bytes the files take on disk together (raw, ours, chipstream's result)."""
    return sum(pathlib.Path(p).stat().st_blocks * 512 for p in paths)


if __name__ == "__main__":
    sys.exit(main())
