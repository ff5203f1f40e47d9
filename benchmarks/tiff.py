"""A microscopy stack as TIFF: ours, dask-image and the I/O floor, in one run.

The issue's case is 20,000 frames of 512 x 512 uint16 (10.5 GB), a camera's
multi-page BigTIFF, uncompressed:

    python benchmarks/tiff.py --events 20000 --kernel 100 --json tiff-20000.json

On a shared machine run it smaller (the per-pixel costs are what compare):

    python benchmarks/tiff.py --events 2000 --kernel 100 --json tiff-2000.json

Every contestant runs in a fresh process (imports excluded from "call", the
first call included) on the same frames, and writes Zarr with the output
compression of ``compute_background`` (zstd-5 with checksum):

- ``ours tiff->zarr``: ``compute_background(stack.tif, out.zarr, K)``;
- ``ours rtdc->zarr``: the same frames in an HDF5 file stored as dcnum stores
  images (zstd-5 chunks of whole frames), our ``.rtdc`` path, same sink;
- ``ours tiff->hdf5``: the plain HDF5 output of a TIFF input;
- ``dask-image``: ``dask_image.imread.imread`` + ``ndfilters.median_filter``
  (``scipy`` per block), the generic dask answer, on the first
  ``--dask-image-events`` frames only (it is ~300x slower per pixel): its
  per-pixel cost is what to compare;
- ``io floor``: read every frame with our reader (threads, blocks as ours)
  and write the known background with the same codec, nothing computed.

Per row: wall seconds of the call, CPU seconds of the process (user + sys,
all threads), ns of wall and of CPU per pixel-event, and the exact check
against the numpy reference on sampled rows (all rows for dask-image's
subset). The load average before and after each row is recorded: on a
machine others use, compare CPU per pixel, not wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHAPE = (512, 512)
# 256 MiB, the default, holds no block of 1 + 2K frames of 512 x 512 uint16 at K=100
BUDGET = "1GiB"
CASES = ("ours-tiff-zarr", "ours-rtdc-zarr", "ours-tiff-hdf5", "dask-image", "io-floor")


def frames(start: int, stop: int):
    """Frames start..stop-1 of a synthetic stack: a static pattern, noise, a moving spot."""
    import numpy as np

    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    static = (1000 + 300 * np.sin(xx / 40.0) * np.cos(yy / 55.0)).astype(np.float32)
    rng = np.random.default_rng(start)
    out = np.empty((stop - start, *SHAPE), np.uint16)
    for i, n in enumerate(range(start, stop)):
        frame = static + rng.normal(0, 30, SHAPE).astype(np.float32)
        cy, cx = (n * 7) % SHAPE[0], (n * 13) % SHAPE[1]
        frame[max(cy - 10, 0) : cy + 10, max(cx - 10, 0) : cx + 10] += 2000
        out[i] = np.clip(frame, 0, 65535)
    return out


def write_inputs(work: pathlib.Path, n: int) -> None:
    """stack.tif (BigTIFF, a page per frame, uncompressed) and stack.h5 (zstd-5 frames)."""
    import h5py
    import hdf5plugin
    import tifffile

    step = 200
    with (
        tifffile.TiffWriter(work / "stack.tif", bigtiff=True) as tif,
        h5py.File(work / "stack.h5", "w") as h5,
    ):
        dset = h5.create_dataset(
            "events/image", (n, *SHAPE), "uint16", chunks=(10, *SHAPE),
            **hdf5plugin.Zstd(clevel=5),
        )  # fmt: skip
        for start in range(0, n, step):
            block = frames(start, min(start + step, n))
            for frame in block:
                tif.write(frame, contiguous=True, photometric="minisblack")
            dset[start : start + len(block)] = block


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_case(case: str, work: pathlib.Path, k: int, subset: int) -> dict:
    """One contestant, in this (fresh) process."""
    import numpy as np

    if case == "dask-image":
        import dask.array as da
        import zarr
        from dask_image import imread, ndfilters

        from rollmed_dask.sinks import _zarr_compressors

    from rollmed_dask import compute_background

    out = work / f"out-{case}"
    shutil.rmtree(out.with_suffix(".zarr"), ignore_errors=True)
    out.with_suffix(".h5").unlink(missing_ok=True)
    opts = {"memory_budget": BUDGET}
    load0, cpu0, t0 = os.getloadavg()[0], _cpu(), time.perf_counter()
    events = None
    if case == "ours-tiff-zarr":
        compute_background(work / "stack.tif", out.with_suffix(".zarr"), k, progress=False, **opts)
    elif case == "ours-rtdc-zarr":
        compute_background(work / "stack.h5", out.with_suffix(".zarr"), k, progress=False, **opts)
    elif case == "ours-tiff-hdf5":
        compute_background(work / "stack.tif", out.with_suffix(".h5"), k, progress=False, **opts)
    elif case == "dask-image":
        x = imread.imread(str(work / "stack.tif"))[:subset]
        x = x.rechunk((max(2 * k, 200), *SHAPE))
        events = x.shape[0]
        med = ndfilters.median_filter(
            x[: events - 1], size=(k, 1, 1), origin=(-(k // 2), 0, 0), mode="nearest"
        )
        last = med[events - k - 1 : events - k]
        bg = da.concatenate([med[: events - k], da.repeat(last, k, axis=0)], axis=0)
        store = zarr.create_array(
            str(out.with_suffix(".zarr")), overwrite=True, shape=bg.shape, dtype=bg.dtype,
            chunks=(10, *SHAPE), compressors=_zarr_compressors("zstd"),
        )  # fmt: skip
        da.store(bg.rechunk((200, *SHAPE)), store, lock=False)
    elif case == "io-floor":
        _io_floor(work, out.with_suffix(".zarr"), k)
    call = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    n = events or _events(work)
    return {
        "case": case,
        "events": n,
        "call_s": round(call, 3),
        "cpu_s": round(cpu, 3),
        "wall_ns_per_pixel": round(call / (n * SHAPE[0] * SHAPE[1]) * 1e9, 3),
        "cpu_ns_per_pixel": round(cpu / (n * SHAPE[0] * SHAPE[1]) * 1e9, 3),
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "exact": _check(case, work, k, n, np),
    }


def _events(work) -> int:
    import tifffile

    with tifffile.TiffFile(work / "stack.tif") as tif:
        return len(tif.series[0])


def _io_floor(work, target, k) -> None:
    """Read every frame (our reader, our blocks, threads), write the known background."""
    import dask
    import zarr

    from rollmed_dask import rtdc
    from rollmed_dask.pipeline import plan_block_tasks
    from rollmed_dask.sinks import _zarr_compressors
    from rollmed_dask.sources import as_source

    src = as_source(work / "stack.tif")
    known = zarr.open_group(str(work / "out-ours-tiff-zarr.zarr"), mode="r")["events/image_bg"]
    chunk = rtdc.default_chunk_events(SHAPE, src.dtype)
    plan = plan_block_tasks(src, k, align_events=chunk, memory_budget=BUDGET)[0]
    out = zarr.create_array(
        str(target), overwrite=True, shape=src.shape, dtype=src.dtype, chunks=(chunk, *SHAPE),
        compressors=_zarr_compressors("zstd"),
    )  # fmt: skip

    def block(start, stop):
        src.array[start:stop]  # the pages ours reads (without the overlap)
        out[start:stop] = known[start:stop]

    bounds, start = [], 0
    for length in plan:
        bounds.append((start, start + length))
        start += length
    dask.compute(*[dask.delayed(block)(a, b) for a, b in bounds], scheduler="threads")


def _check(case, work, k, n, np) -> bool:
    """Against the numpy reference: rows around every 997th event (all for dask-image)."""
    import tifffile
    import zarr

    from rollmed_dask import rolling_median_reference

    if case == "io-floor":
        return True  # it writes our checked result
    path = work / f"out-{case}"
    if case == "ours-tiff-hdf5":
        import h5py

        h5 = h5py.File(path.with_suffix(".h5"), "r")
        got = h5["events/image_bg"]
    else:
        node = zarr.open(str(path.with_suffix(".zarr")), mode="r")
        got = node["events/image_bg"] if isinstance(node, zarr.Group) else node
    img = tifffile.TiffFile(work / "stack.tif").series[0]
    starts = [0] if case == "dask-image" else list(range(0, n - k - 20, 997)) + [n - k - 20]
    for s in starts:
        stop = n if case == "dask-image" else min(s + 20 + k, n)
        stack = np.stack([img[i].asarray() for i in range(s, stop)])
        ref = rolling_median_reference(stack, k)
        rows = slice(0, len(stack) if stop == n else 20)
        if not np.array_equal(got[s : s + rows.stop][rows], ref[rows]):
            return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=2000, help="frames (default 2000)")
    parser.add_argument("--kernel", type=int, default=100, help="K (default 100)")
    parser.add_argument("--dask-image-events", type=int, default=300,
                        help="frames dask-image computes (default 300)")  # fmt: skip
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated")
    parser.add_argument("--json", type=pathlib.Path, help="write the rows here")
    parser.add_argument("--work", type=pathlib.Path, help="folder for the files (kept)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one contestant, in a child
    args = parser.parse_args(argv)
    if args.case:
        row = run_case(args.case, args.work, args.kernel, args.dask_image_events)
        print(json.dumps(row))
        return 0

    from _env import machine_info

    work = args.work or pathlib.Path(tempfile.mkdtemp(prefix="rollmed-tiff-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "stack.tif").exists() or _events(work) != args.events:
        t0 = time.perf_counter()
        write_inputs(work, args.events)
        print(f"wrote the inputs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows = []
    try:
        for case in args.cases.split(","):
            cmd = [sys.executable, __file__, "--case", case, "--work", str(work),
                   "--kernel", str(args.kernel),
                   "--dask-image-events", str(args.dask_image_events)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                sys.exit(f"{case} failed:\n{proc.stderr}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{case} done", file=sys.stderr)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    rtdc = next((r for r in rows if r["case"] == "ours-rtdc-zarr"), None)
    print(f"\n{args.events} frames of 512 x 512 uint16, K={args.kernel}, {os.cpu_count()} cores")
    print(f"{'case':16s} {'events':>7s} {'call s':>8s} {'cpu s':>8s} {'wall ns/px':>10s} "
          f"{'cpu ns/px':>10s} {'vs rtdc':>8s} {'load':>10s} exact")  # fmt: skip
    for r in rows:
        ratio = r["cpu_ns_per_pixel"] / rtdc["cpu_ns_per_pixel"] if rtdc else float("nan")
        print(f"{r['case']:16s} {r['events']:7d} {r['call_s']:8.2f} {r['cpu_s']:8.2f} "
              f"{r['wall_ns_per_pixel']:10.2f} {r['cpu_ns_per_pixel']:10.2f} {ratio:7.2f}x "
              f"{r['load_before']:4.1f}-{r['load_after']:<4.1f} {r['exact']}")  # fmt: skip
    print("vs rtdc: CPU per pixel against ours on the same frames from HDF5 (zstd-5).")
    print(f"dask-image computed the first {args.dask_image_events} frames only.")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "events": args.events,
                    "kernel_size": args.kernel,
                    "image_shape": SHAPE,
                    "dtype": "uint16",
                    "machine": machine_info(),
                    "rows": rows,
                },
                indent=2,
            )  # fmt: skip
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
