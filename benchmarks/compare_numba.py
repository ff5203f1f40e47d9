"""The compiled kernels against the numba kernels they replaced, per dtype, paired.

    python benchmarks/compare_numba.py [--frames 400] [--kernels 10 100] [--repeat 3]

The numba kernels are taken from the last commit that had them
(``git show 3f1e2f2:rollmed_dask/kernels_numba.py``, with its ``numba_cache.py``
and ``core.py``) into a temporary package; numba must be installed
(``pip install numba``, or the ``bench`` extra). Both kernels run in this
process, one thread, on the same camera frames (``rollmed_dask.example.camera_frames``,
80 x 320, converted per dtype as benchmarks/run.py's first-call case does:
floats divided by 255, integers of 16 bits and more times 16), alternating,
``--repeat`` times each; the minimum CPU time of each is kept (numba's compile
is done before and not timed). Prints a Markdown table and the load average.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
NUMBA_COMMIT = "3f1e2f2"
DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
          "float16", "float32", "float64"]  # fmt: skip


def load_numba_kernel(folder: pathlib.Path):
    pkg = folder / "numba_kernels_old"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("kernels_numba.py", "numba_cache.py", "core.py"):
        text = subprocess.run(["git", "show", f"{NUMBA_COMMIT}:rollmed_dask/{name}"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        (pkg / name).write_text(text)
    os.environ.setdefault("ROLLMED_DASK_CACHE_DIR", str(folder / "cache"))
    sys.path.insert(0, str(folder))
    from numba_kernels_old.kernels_numba import median_windows_numba

    return median_windows_numba


def frames_of(dtype: np.dtype, frames: np.ndarray) -> np.ndarray:
    if dtype.kind == "f":
        return (frames / 255).astype(dtype)
    return (frames.astype(np.int64) * (16 if dtype.itemsize >= 2 else 1)).astype(dtype)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=400, help="medians per call (after K)")
    p.add_argument("--kernels", type=int, nargs="+", default=[10, 100])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", default=DTYPES)
    a = p.parse_args(argv)

    from rollmed_dask.example import camera_frames
    from rollmed_dask.kernels import median_windows_compiled

    with tempfile.TemporaryDirectory() as tmp:
        numba_kernel = load_numba_kernel(pathlib.Path(tmp))
        base = camera_frames(max(a.kernels) + a.frames, (80, 320), seed=0)
        load0 = os.getloadavg()[0]
        print("| dtype | K | numba ns/px-event | compiled ns/px-event | compiled / numba |")
        print("|---|---|---|---|---|")
        for name in a.dtypes:
            dtype = np.dtype(name)
            stack = frames_of(dtype, base)
            for k in a.kernels:
                block = stack[: k + a.frames]
                ours = median_windows_compiled(block, k).view(np.uint8)
                if not np.array_equal(numba_kernel(block, k).view(np.uint8), ours):
                    raise SystemExit(f"{name} K={k}: the two kernels differ")
                t = {"numba": [], "compiled": []}
                for _ in range(a.repeat):
                    for label, fn in (
                        ("numba", numba_kernel),
                        ("compiled", median_windows_compiled),
                    ):
                        c0 = time.process_time()
                        fn(block, k)
                        t[label].append(time.process_time() - c0)
                per = a.frames * 80 * 320 / 1e9
                tn, tc = min(t["numba"]) / per, min(t["compiled"]) / per
                print(f"| {name} | {k} | {tn:.2f} | {tc:.2f} | {tc / tn:.2f} |", flush=True)
        print(f"\nload average {load0:.1f} -> {os.getloadavg()[0]:.1f} (2 cores), "
              f"{a.frames} medians of 80 x 320 per call, min of {a.repeat}, CPU time")  # fmt: skip


if __name__ == "__main__":
    main()
