"""How camera-like the data are: the noise of an ``.rtdc`` file, and the kernel
against the noise level, K and the share of frames with cells.

``measure_noise`` is what ``run.py --measure-noise FILE`` prints, so a user
can compare their own files with the benchmark's input.
"""

from __future__ import annotations

import math
import time

# Differences beyond 2.5 sigma are clipped, iteratively, so that cells do not
# count as noise; the standard deviation of a normal distribution clipped at
# +-c sigma is _CLIPPED_STD sigma. On camera_frames with cells in 78 % of the
# frames this measured sigma 3.59 for a true 3.51 (1.04 and 1.16 at sigma 1
# without and with cells; 8.02 and 8.13 at sigma 8).
_CLIP = 2.5
_CLIPPED_STD = math.sqrt(
    1
    - 2
    * _CLIP
    * math.exp(-(_CLIP**2) / 2)
    / math.sqrt(2 * math.pi)
    / math.erf(_CLIP / math.sqrt(2))
)


def noise_of_frames(frames) -> dict:
    """Temporal noise, fixed-pattern contrast and share of frames with objects.

    ``frames`` is an ``(M, H, W)`` array, M >= 3. The temporal noise sigma is
    estimated from differences of consecutive frames (the fixed pattern cancels),
    divided by sqrt(2), with iterative 2.5-sigma clipping so that the pixels a
    passing cell changes do not count. A frame "has an object" where at least
    0.1 % of its pixels (and 20) are darker than the per-pixel median of all
    frames by more than max(6 sigma, 10) grey levels.
    """
    import numpy as np

    x = np.asarray(frames, dtype=np.float32)
    m = x.shape[0]
    if m < 3:
        raise ValueError(f"{m} frames are too few to measure the noise; give at least 3")
    d = np.diff(x, axis=0).reshape(-1)
    sd = float(d.std())
    for _ in range(20):
        new = float(d[np.abs(d) <= _CLIP * sd].std()) / _CLIPPED_STD
        if abs(new - sd) < 1e-4 * sd:
            break
        sd = new
    sigma = sd / np.sqrt(2.0)
    median = np.median(x, axis=0)
    dark = (median[None] - x) > max(6.0 * sigma, 10.0)
    pixels = median.size
    with_objects = dark.reshape(m, -1).sum(axis=1) >= max(20, 0.001 * pixels)
    return {
        "frames": int(m),
        "image_shape": list(x.shape[1:]),
        "noise_sigma": round(float(sigma), 3),
        "share_of_frames_with_objects": round(float(with_objects.mean()), 3),
        "pattern_std": round(float(median.std()), 2),
        "mean": round(float(median.mean()), 2),
    }


def measure_noise(path, dataset: str = "events/image", max_frames: int = 2000) -> dict:
    """:func:`noise_of_frames` of up to ``max_frames`` frames from the middle of a file."""
    import os

    import h5py
    import hdf5plugin  # noqa: F401

    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file; pass the path of an .rtdc file")
    with h5py.File(path, "r") as h5:
        if dataset not in h5:
            raise ValueError(f"{path} has no dataset {dataset!r}; pass --noise-dataset NAME")
        dset = h5[dataset]
        n = dset.shape[0]
        start = max(0, (n - max_frames) // 2)
        frames = dset[start : start + max_frames]
        dtype = str(dset.dtype)
    res = noise_of_frames(frames)
    res.update(path=str(path), dataset=dataset, events=int(n), first_frame=int(start), dtype=dtype)
    return res


def noise_text(res: dict) -> str:
    return (
        f"{res['path']}:{res['dataset']} ({res['events']} x "
        f"{' x '.join(map(str, res['image_shape']))} {res['dtype']}; frames "
        f"{res['first_frame']}..{res['first_frame'] + res['frames'] - 1}): temporal noise "
        f"sigma {res['noise_sigma']:.2f} grey levels, objects in "
        f"{100 * res['share_of_frames_with_objects']:.0f} % of frames, fixed pattern "
        f"std {res['pattern_std']:.1f} around {res['mean']:.0f}"
    )


def kernel_noise(sigmas, kernels, cell_rates, frames_after_k: int, image_shape, repeat: int):
    """ns per output pixel-event of the compiled kernel, 1 thread, on camera frames.

    For every noise sigma and cell rate one stack of ``max(K) + frames_after_k``
    frames is drawn (``rollmed_dask.example.camera_frames``); each K runs on its
    first ``K + frames_after_k`` frames, so every K computes the same number of
    medians. Interleaved: each repetition runs every configuration once, and
    the minimum of the repetitions is kept (process CPU time, which a loaded
    machine disturbs less than wall time). Each output is checked against the
    benchmark's oracle (``_oracle.py``, exact, independent of the package) on
    every 7th pixel; the numpy reference would take minutes at K = 1000.
    """
    import _oracle
    import numpy as np

    from rollmed_dask.example import camera_frames
    from rollmed_dask.kernels import median_windows_compiled

    stacks = {}
    for sigma in sigmas:
        for rate in cell_rates:
            frames = camera_frames(max(kernels) + frames_after_k, image_shape, seed=0,
                                   noise_sigma=sigma, cell_rate=rate)  # fmt: skip
            share = noise_of_frames(frames)["share_of_frames_with_objects"]
            stacks[sigma, rate] = (frames, share)
    median_windows_compiled(stacks[sigmas[0], cell_rates[0]][0][:3], 2)  # load the kernel
    times: dict = {}
    exact = True
    for rep in range(repeat):
        for (sigma, rate), (frames, _share) in stacks.items():
            for k in kernels:
                block = frames[: k + frames_after_k]
                t0 = time.process_time()
                out = median_windows_compiled(block, k)
                times.setdefault((sigma, rate, k), []).append(time.process_time() - t0)
                if rep == 0:
                    flat = block.reshape(len(block), -1)[:, ::7]
                    ref = _oracle.median_windows(flat, k)
                    exact &= bool(np.array_equal(out.reshape(len(out), -1)[:, ::7], ref))
    pixels = image_shape[0] * image_shape[1]
    rows = []
    for (sigma, rate, k), ts in times.items():
        rows.append({
            "noise_sigma": sigma, "cell_rate": rate,
            "share_of_frames_with_objects": stacks[sigma, rate][1], "kernel": k,
            "ns_per_pixel_event": min(ts) / (frames_after_k + 1) / pixels * 1e9,
        })  # fmt: skip
    return {"rows": rows, "exact_every_7th_pixel": exact, "frames_after_k": frames_after_k,
            "image_shape": list(image_shape), "repeat": repeat}  # fmt: skip


def kernel_noise_text(res: dict) -> str:
    """One line per (sigma, share), one column per K."""
    rows = res["rows"]
    kernels = sorted({r["kernel"] for r in rows})
    keys = sorted({(r["noise_sigma"], r["share_of_frames_with_objects"]) for r in rows})
    cell = {(r["noise_sigma"], r["share_of_frames_with_objects"], r["kernel"]):
            r["ns_per_pixel_event"] for r in rows}  # fmt: skip
    head = ["noise sigma", "frames with cells", *(f"K={k}" for k in kernels)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for sigma, share in keys:
        vals = [f"{cell[sigma, share, k]:.2f}" for k in kernels]
        lines.append(f"| {sigma:g} | {100 * share:.0f} % | " + " | ".join(vals) + " |")
    return "\n".join(lines)
