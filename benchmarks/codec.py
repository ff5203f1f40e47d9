"""Encode time and size of ``image_bg`` per output compression: the table the default comes from.

    python benchmarks/codec.py [--events 2000] [--kernels 10 100 1000] [--rtdc FILE ...]

For each data set and K the background is computed (the compiled kernel, the
whole stack in memory), then encoded chunk by chunk exactly as the job's HDF5
writer does (``h5chunks.encode_block``: the filter, then fletcher32, chunks of
the output's length) for every compression spelling. Reported per spelling:
CPU ns per pixel-event of the encode (min of ``--repeat``) and the compression
ratio (raw bytes / stored bytes).

Data sets: the benchmark's camera-like frames (``rollmed_dask.example.camera_frames``,
80 x 320), ``--events + K`` frames; and each ``--rtdc`` file's ``events/image``
(real measurements: dcnum's test data, see benchmarks/README.md). Those hold
11 to 40 frames, so they are played back and forth (0 .. n-1, n-1 .. 0, ...)
up to the same length: real pixels, noise and cells, a background as stable as
the measurement's.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import h5py
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPELLINGS = ["none", "zstd-1", "zstd-2", "zstd-3", "zstd-5", "zstd-7", "zstd-9",
             "gzip-1", "gzip-4", "gzip-6", "gzip-9"]  # fmt: skip


def background(frames: np.ndarray, k: int) -> np.ndarray:
    from rollmed_dask.kernels import median_windows_compiled

    computed = median_windows_compiled(frames[:-1], k)
    return np.concatenate([computed, np.repeat(computed[-1:], k, axis=0)])


def played_back(frames: np.ndarray, n: int) -> np.ndarray:
    cycle = np.concatenate([frames, frames[::-1]])
    reps = -(-n // len(cycle))
    return np.concatenate([cycle] * reps)[:n]


def encode_table(bg: np.ndarray, repeat: int) -> dict:
    import hdf5plugin  # noqa: F401

    from rollmed_dask import h5chunks, rtdc
    from rollmed_dask.compression import hdf5_filter

    n, h, w = bg.shape
    chunk = rtdc.default_chunk_events((h, w), bg.dtype)
    rows = {}
    with h5py.File("codec.h5", "w", driver="core", backing_store=False) as f:
        for spelling in SPELLINGS:
            dset = f.create_dataset(spelling, shape=bg.shape, dtype=bg.dtype,
                                    chunks=(chunk, h, w),
                                    **rtdc.filter_kwargs(hdf5_filter(spelling)))  # fmt: skip
            codec = h5chunks.ChunkCodec.from_dataset(dset)
            if not codec.supported:
                raise SystemExit(f"{spelling}: h5chunks cannot encode it")
            times = []
            for _ in range(repeat):
                c0 = time.process_time()
                stored = sum(len(b) for b in h5chunks.encode_block(codec, bg).chunks)
                times.append(time.process_time() - c0)
            rows[spelling] = (min(times) / bg.size * 1e9, stored)
    # the ratio to the uncompressed chunks (padded to whole chunks, as stored)
    return {s: (t, rows["none"][1] / stored) for s, (t, stored) in rows.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=2000, help="backgrounds per data set and K")
    p.add_argument("--kernels", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--rtdc", nargs="*", default=[], help="real .rtdc files")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)

    from rollmed_dask.example import camera_frames

    load0 = os.getloadavg()[0]
    data = {}
    for k in a.kernels:
        n = a.events + k
        data[f"camera-like 80x320, K={k}"] = (camera_frames(n, (80, 320), seed=0), k)
        for path in a.rtdc:
            with h5py.File(path, "r") as h5:
                frames = h5["events/image"][:]
            label = f"{pathlib.Path(path).name} {frames.shape[1]}x{frames.shape[2]}, K={k}"
            data[label] = (played_back(frames, n), k)
    print("| data, K | " + " | ".join(SPELLINGS) + " |")
    print("|---|" + "---|" * len(SPELLINGS))
    for label, (frames, k) in data.items():
        rows = encode_table(background(frames, k)[: a.events], a.repeat)
        cells = [f"{t:.2f} ns, {r:.1f}x" for t, r in rows.values()]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nCPU ns per pixel-event of the encode (filter + fletcher32, min of {a.repeat}), "
          f"compression ratio (to the uncompressed chunks); {a.events} backgrounds each; "
          f"load average {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f} (2 cores)", file=sys.stdout)  # fmt: skip


if __name__ == "__main__":
    main()
