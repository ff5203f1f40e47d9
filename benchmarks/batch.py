"""Folders of measurements: our batch command against a shell loop of our
single-file command and against dcnum file by file (issue 14).

    python benchmarks/batch.py [--sets 20x5000,200x500] [--kernel 100]
                               [--dcnum-files 2] [--data DIR] [--json FILE]

For each set of F files x N frames (80 x 320 uint8, stored as dcnum stores
them, camera-like noise of about 3 grey levels) it runs, one after the other
in fresh processes on the same machine:

- ``batch``: ``rollmed-dask -r DIR OUT -k K -q`` (one process for the folder);
- ``rerun``: the same command again on the finished folder (all up to date);
- ``loop``: ``for f in DIR/*.rtdc; do rollmed-dask $f OUT/..._bg.rtdc; done``;
- ``dcnum``: dcnum 0.31 ``BackgroundRollMed(...).process()`` file by file in
  one process, on the first ``--dcnum-files`` files only (about 1 us per
  pixel-event: the whole set would take hours), scaled to the set;
- ``one file``: ``rollmed-dask`` on one file holding all the set's frames one
  after the other, for the "a folder of small files is as fast as one big
  file" target.

The first set's files are drawn (``write_example`` plus noise); later sets are
cut from them, so every set holds the same pixels.

Wall time and the peak resident memory of the process tree (sampled every
0.05 s) are measured from outside. The batch outputs are compared bit for bit
with the loop's (every file) and with dcnum's (its subset). It prints a table
and writes JSON; it never asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
IMAGE_SHAPE = (80, 320)
EXTRA_NOISE = 2.2  # grey levels on top of write_example's 2.0: about 3 in all


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_measurement(path: pathlib.Path, n: int, seed: int) -> None:
    """A measurement as dcnum stores it, with camera-like noise (~3 grey levels)."""
    import h5py
    import numpy as np

    from rollmed_dask.example import write_example

    tmp = path.with_name(f".{path.name}.partial")
    write_example(tmp, n_events=n, image_shape=IMAGE_SHAPE, seed=seed)
    rng = np.random.default_rng(seed + 10_000)
    with h5py.File(tmp, "r+") as h5:
        ds = h5["events/image"]
        step = ds.chunks[0] * 25
        for start in range(0, n, step):
            block = ds[start : start + step].astype(np.float32)
            block += rng.normal(0, EXTRA_NOISE, block.shape).astype(np.float32)
            ds[start : start + step] = np.clip(np.rint(block), 0, 255).astype(np.uint8)
    os.replace(tmp, path)


def measured_noise(path: pathlib.Path) -> float:
    """Temporal noise: std of frame-to-frame differences of a still pixel / sqrt(2)."""
    import h5py
    import numpy as np

    with h5py.File(path) as h5:
        frames = h5["events/image"][:200].astype(np.float32)
    # the median over pixels of the per-pixel std of differences is robust to cells
    diffs = np.diff(frames, axis=0)
    return float(np.median(diffs.std(axis=0)) / np.sqrt(2))


def _events_kwargs(ds, n: int) -> dict:
    """Images as dcnum stores them (chunks of whole frames, zstd 5, fletcher32);
    scalar features plain."""
    if ds.ndim != 3:
        return {}
    import hdf5plugin

    chunks = (min(ds.chunks[0], n), *ds.shape[1:])
    return dict(chunks=chunks, maxshape=(None, *ds.shape[1:]), fletcher32=True,
                **hdf5plugin.Zstd(clevel=5))  # fmt: skip


def write_slice(src: pathlib.Path, dst: pathlib.Path, start: int, n: int) -> None:
    """Events [start, start+n) of a measurement as a measurement of its own
    (metadata, logs and every feature), much faster than drawing new frames."""
    import h5py
    import hdf5plugin  # noqa: F401

    tmp = dst.with_name(f".{dst.name}.partial")
    with h5py.File(src) as h5in, h5py.File(tmp, "w") as h5out:
        h5out.attrs.update(h5in.attrs)
        h5out.attrs["experiment:event count"] = n
        for name in h5in:
            if name != "events":
                h5in.copy(h5in[name], h5out, name=name)
        for name, ds in h5in["events"].items():
            out = h5out.create_dataset(f"events/{name}", data=ds[start : start + n],
                                       **_events_kwargs(ds, n))  # fmt: skip
            out.attrs.update(ds.attrs)
    os.replace(tmp, dst)


def write_concatenation(paths, dst: pathlib.Path) -> None:
    """The frames of ``paths`` one after the other in one file."""
    import h5py
    import hdf5plugin  # noqa: F401

    total = 0
    for p in paths:
        with h5py.File(p) as h5:
            total += h5["events/image"].shape[0]
    tmp = dst.with_name(f".{dst.name}.partial")
    with h5py.File(paths[0]) as first, h5py.File(tmp, "w") as h5out:
        h5out.attrs.update(first.attrs)
        h5out.attrs["experiment:event count"] = total
        ds0 = first["events/image"]
        out = h5out.create_dataset("events/image", shape=(total, *ds0.shape[1:]),
                                   dtype=ds0.dtype, **_events_kwargs(ds0, total))  # fmt: skip
        out.attrs.update(ds0.attrs)
        offset = 0
        for p in paths:
            with h5py.File(p) as h5:
                ds = h5["events/image"]
                for i in range(0, ds.shape[0], 1000):
                    block = ds[i : i + 1000]
                    out[offset : offset + len(block)] = block
                    offset += len(block)
    os.replace(tmp, dst)


def ensure_set(data: pathlib.Path, files: int, n: int, base: list | None) -> list:
    """F measurements of N frames: drawn, or cut from the ``base`` set's files."""
    folder = data / f"set-{files}x{n}"
    paths = [folder / f"day{i % 3}" / f"m{i:03d}.rtdc" for i in range(files)]
    per_base = None if base is None else _frames(base[0]) // n
    for i, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            continue
        if base is None:
            write_measurement(path, n, seed=i)
        else:
            write_slice(base[i // per_base], path, (i % per_base) * n, n)
    return paths


def _frames(path) -> int:
    import h5py

    with h5py.File(path) as h5:
        return h5["events/image"].shape[0]


def ensure_one(data: pathlib.Path, paths) -> pathlib.Path:
    total = sum(_frames(p) for p in paths)
    path = data / f"one-{total}.rtdc"
    if not path.exists():
        log(f"writing one file of the set's {total} frames ...")
        write_concatenation(paths, path)
    return path


def timed(cmd, *, shell=False) -> dict:
    """Wall time and peak RSS of the process tree of ``cmd``."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=shell, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    top = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [top, *top.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    if proc.returncode not in (0,):
        raise RuntimeError(f"{cmd} failed ({proc.returncode}): {err[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak / 2**20, 1)}


def rollmed_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "rollmed_dask", *map(str, args)]


def dcnum_files(paths, out: pathlib.Path, k: int) -> None:
    """Run in a fresh process: dcnum on each file in turn, per-file times to stdout."""
    from dcnum.feat.feat_background.bg_roll_median import BackgroundRollMed

    times = []
    for path in paths:
        t0 = time.perf_counter()
        target = out / (pathlib.Path(path).stem + "_bg.rtdc")
        with BackgroundRollMed(pathlib.Path(path), target, kernel_size=k,
                               batch_size=10000, compress=True) as bg:  # fmt: skip
            bg.process()
        times.append(time.perf_counter() - t0)
    (out / "times.json").write_text(json.dumps(times))


def same_background(a: pathlib.Path, b: pathlib.Path) -> bool:
    import h5py
    import hdf5plugin  # noqa: F401
    import numpy as np

    with h5py.File(a) as ha, h5py.File(b) as hb:
        return bool(np.array_equal(ha["events/image_bg"][:], hb["events/image_bg"][:]))


def run_set(data, work, files, n, k, n_dcnum, base) -> dict:
    inputs = sorted(ensure_set(data, files, n, base))
    folder = data / f"set-{files}x{n}"
    pixels = files * n * IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    row = {"files": files, "events": n, "kernel": k, "pixel_events": pixels,
           "noise_grey_levels": round(measured_noise(inputs[0]), 2)}  # fmt: skip
    out = work / f"batch-{files}x{n}"
    log(f"{files} x {n}: batch")
    row["batch"] = timed(rollmed_cmd("-r", folder, out, "-k", k, "-q"))
    log(f"{files} x {n}: rerun")
    row["rerun"] = timed(rollmed_cmd("-r", folder, out, "-k", k, "-q"))
    loop_out = work / f"loop-{files}x{n}"
    loop_out.mkdir()
    script = "; ".join(
        shlex.join(rollmed_cmd(p, loop_out / f"{p.stem}_bg.rtdc", "-k", k, "-q")) for p in inputs
    )
    log(f"{files} x {n}: loop of single-file commands")
    row["loop"] = timed(["bash", "-c", f"set -e; {script}"])
    # every output of the batch is the loop's, bit for bit
    row["batch_equals_loop"] = all(
        same_background(out / p.relative_to(folder).parent / f"{p.stem}_bg.rtdc",
                        loop_out / f"{p.stem}_bg.rtdc")
        for p in inputs
    )  # fmt: skip
    if n_dcnum:
        subset = inputs[:n_dcnum]
        dc_out = work / f"dcnum-{files}x{n}"
        dc_out.mkdir()
        log(f"{files} x {n}: dcnum on {len(subset)} of {files} files")
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import batch; "
                f"batch.dcnum_files({[str(p) for p in subset]!r}, "
                f"batch.pathlib.Path({str(dc_out)!r}), {k})")  # fmt: skip
        measured = timed([sys.executable, "-c", code])
        per_file = json.loads((dc_out / "times.json").read_text())
        row["dcnum"] = {
            **measured,
            "files_run": len(subset),
            "per_file_s": [round(t, 2) for t in per_file],
            # the calls alone (imports and interpreter start left out): dcnum's best case
            "seconds_scaled_to_set": round(sum(per_file) / len(per_file) * files, 1),
        }
        row["batch_equals_dcnum"] = all(
            same_background(out / p.relative_to(folder).parent / f"{p.stem}_bg.rtdc",
                            dc_out / f"{p.stem}_bg.rtdc")
            for p in subset
        )  # fmt: skip
    one = ensure_one(data, inputs)
    log(f"{files} x {n}: one file of {files * n} frames")
    row["one_file"] = timed(rollmed_cmd(one, work / f"one-{files}x{n}.rtdc", "-k", k, "-q"))
    return row


def ratios(row) -> dict:
    b = row["batch"]["seconds"]
    r = {
        "loop_over_batch": round(row["loop"]["seconds"] / b, 2),
        "batch_throughput_vs_one_file": round(row["one_file"]["seconds"] / b, 2),
    }
    if "dcnum" in row:
        r["dcnum_over_batch"] = round(row["dcnum"]["seconds_scaled_to_set"] / b, 1)
    return r


def table(rows) -> str:
    head = (f"{'set':>10} {'batch s':>8} {'rerun s':>8} {'loop s':>8} {'dcnum s*':>9} "
            f"{'one file s':>10} {'peak MB':>8} {'loop/batch':>10} {'dcnum/batch':>11} "
            f"{'batch/one':>9}")  # fmt: skip
    lines = [head]
    for row in rows:
        r = ratios(row)
        dc = row.get("dcnum", {}).get("seconds_scaled_to_set", float("nan"))
        lines.append(
            f"{row['files']:>4}x{row['events']:<5} {row['batch']['seconds']:>8.1f} "
            f"{row['rerun']['seconds']:>8.1f} {row['loop']['seconds']:>8.1f} {dc:>9.0f} "
            f"{row['one_file']['seconds']:>10.1f} {row['batch']['peak_rss_mb']:>8.0f} "
            f"{r['loop_over_batch']:>10.1f} {r.get('dcnum_over_batch', float('nan')):>11.0f} "
            f"{r['batch_throughput_vs_one_file']:>9.2f}"
        )
    lines.append("* dcnum run on a subset of each set and scaled to the set (see JSON)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sets", default="20x5000,200x500", help="FILESxFRAMES,... (default: %(default)s)"
    )
    p.add_argument("--kernel", type=int, default=100)
    p.add_argument("--dcnum-files", type=int, default=2, help="files dcnum runs per set")
    p.add_argument("--data", type=pathlib.Path, default=HERE / "data" / "batch")
    p.add_argument("--json", type=pathlib.Path, default=HERE / "results" / "batch.json")
    a = p.parse_args(argv)
    import tempfile

    rows, base = [], None
    with tempfile.TemporaryDirectory(dir=a.data.parent if a.data.exists() else None) as tmp:
        for spec in a.sets.split(","):
            files, n = map(int, spec.lower().split("x"))
            work = pathlib.Path(tmp) / spec
            work.mkdir()
            rows.append(run_set(a.data, work, files, n, a.kernel, a.dcnum_files, base))
            # later sets are cut from the first one's measurements: the same
            # pixels, and no hour of drawing frames on a loaded machine
            base = base or sorted(ensure_set(a.data, files, n, None))
            print(table(rows[-1:]), flush=True)
    for row in rows:
        row["ratios"] = ratios(row)
    result = {
        "command": "python benchmarks/batch.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_at_end": os.getloadavg(),
        },  # fmt: skip
        "sets": rows,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
