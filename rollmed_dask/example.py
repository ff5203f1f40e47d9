"""Synthetic but realistic RT-DC ``.rtdc`` files for tests, notebooks and benchmarks.

:func:`write_example` draws what an RT-DC camera sees: a static channel
(bright lumen between darker walls, a brightness gradient along the flow,
fixed dust and a faint fringe pattern), cells passing through it along x at
different speeds and sizes (dark rim, bright halo, inner texture; sometimes
no cell, sometimes two overlapping), a slight flicker of the illumination,
and Gaussian sensor noise (sigma 3.5 grey levels, a little above the 2.6
to 3.1 of real RT-DC files), stored as uint8 exactly the way dcnum/dclab store
``events/image``. The file carries the scalar features ``frame``, ``time``,
``index``, ``area_um`` and ``deform``, the metadata dclab's integrity check
asks for, and a small log, so ``dclab.new_dataset`` opens it without
complaint.

Images are generated and written in batches of whole HDF5 chunks, so memory
use does not grow with ``n_events``.

Examples
--------
.. code-block:: python

    from rollmed_dask.example import write_example
    path = write_example("example.rtdc", n_events=500)
    import dclab
    with dclab.new_dataset(path) as ds:
        ds["image"].shape
    # (500, 80, 320)
"""

from __future__ import annotations

import calendar
import json
import math
import pathlib
import time

import h5py
import numpy as np

from . import rtdc

__all__ = ["camera_frames", "write_example"]

#: Pixels generated per batch (~32 MiB of float32 work space).
_BATCH_PIXELS = 2**23

_DATE = "2024-11-25"
_TIME = "14:03:27"
_FRAME_RATE = 2000.0  # Hz
_PIXEL_SIZE = 0.34  # µm
# Temporal noise of the sensor, in grey levels: the .rtdc files in dcnum's
# published test data measure 2.6 to 3.1 (benchmarks/run.py --measure-noise
# FILE prints it for any file), and with 3.5 a kernel is timed on the harder
# side of real data (its median moves more often than on quiet frames).
_NOISE_SIGMA = 3.5
# New cells per camera frame; a cell takes about 12 frames to cross 320 px,
# so about 77 % of the frames show at least part of a cell.
_CELL_RATE = 0.1


def _static_background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """The channel as the camera sees it without cells (float32, grey levels)."""
    y = np.arange(h, dtype=np.float64)[:, None]
    x = np.arange(w, dtype=np.float64)[None, :]
    # Lumen between two walls; the edges are a few pixels soft, with a dark
    # line where the wall meets the lumen (as in brightfield RT-DC images).
    wall = max(2.0, 0.12 * h)
    y0, y1 = wall, h - 1 - wall
    lumen = 0.5 * (np.tanh((y - y0) / 1.5) - np.tanh((y - y1) / 1.5))
    img = 55.0 + 50.0 * lumen
    img = img - 22.0 * (np.exp(-(((y - y0) / 1.2) ** 2)) + np.exp(-(((y - y1) / 1.2) ** 2)))
    # Illumination: gradient along the flow and a mild vignette.
    xr = x / max(1, w - 1) - 0.5
    img = img + 12.0 * xr - 8.0 * (2 * xr) ** 2 - 4.0 * ((y - h / 2) / h) ** 2
    # Fixed pattern: faint diagonal fringes and per-column sensor offsets.
    img = img + 1.5 * np.sin(2 * np.pi * (0.045 * x + 0.11 * y))
    img = img + rng.normal(0.0, 0.8, size=(1, w))
    # Dust on the optics: a few dark, blurry specks at fixed places.
    for _ in range(max(3, (h * w) // 4000)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sigma = rng.uniform(0.8, 3.0)
        amp = rng.uniform(8.0, 30.0)
        img = img - amp * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))
    return img.astype(np.float32)


def _frame_numbers(n: int, seed: int) -> np.ndarray:
    """Camera frame of each event: mostly consecutive, now and then a gap.

    Each array is drawn from its own generator, so the first events are the
    same whatever ``n`` is.
    """
    skip = np.random.default_rng([seed, 1, 0]).random(n) < 0.05
    extra = np.random.default_rng([seed, 1, 1]).integers(1, 8, size=n)
    gaps = 1 + np.where(skip, extra, 0).astype(np.uint64)
    gaps[0] = 1
    return np.cumsum(gaps, dtype=np.uint64)


def _cell_tracks(last_frame: float, h: int, w: int, seed: int, rate: float) -> dict:
    """Cells entering the channel as a Poisson process over all frames.

    Cells are drawn in blocks of fixed size, each block from its own
    generator, so the cells of the first frames do not depend on how many
    frames there are.
    """
    scale = h / 80.0
    wall = max(2.0, 0.12 * h)
    block = 256
    blocks = []
    t_last = -40.0  # start early, so that cells are already in the first frame
    bi = 0
    while t_last <= last_frame:
        rng = np.random.default_rng([seed, 2, bi])
        enter = t_last + np.cumsum(rng.exponential(1.0 / rate if rate > 0 else np.inf, size=block))
        a = rng.uniform(6.0, 13.0, block) * scale  # semi-axis along the flow
        b = a * rng.uniform(0.72, 1.0, block)  # deformed cells are elongated in x
        cy_max = np.maximum((h - 2 * wall) / 2 - b - 1, 0)
        cy = h / 2 + np.clip(rng.normal(0.0, 3.0 * scale, block), -cy_max, cy_max)
        speed = rng.uniform(12.0, 45.0, block) * (w / 320.0)  # px per frame
        blocks.append(
            {
                "enter": enter,
                "a": a,
                "b": b,
                "cy": cy,
                "speed": speed,
                "rim": rng.uniform(30.0, 55.0, block),
                "halo": rng.uniform(6.0, 14.0, block),
                "body": rng.uniform(-14.0, -4.0, block),
                "tex_amp": rng.uniform(3.0, 8.0, block),
                "tex_k": rng.uniform(0.5, 1.3, (block, 2)),
                "tex_phase": rng.uniform(0.0, 2 * np.pi, (block, 2)),
            }
        )
        t_last = float(enter[-1])
        bi += 1
    tracks = {key: np.concatenate([bl[key] for bl in blocks]) for key in blocks[0]}
    keep = tracks["enter"] <= last_frame
    tracks = {key: val[keep] for key, val in tracks.items()}
    tracks["margin"] = tracks["a"] + 6.0  # halo included
    tracks["exit"] = tracks["enter"] + (w + 2 * tracks["margin"]) / tracks["speed"]
    return tracks


def _draw_cell(img: np.ndarray, tr: dict, i: int, cx: float) -> None:
    """Add cell ``i`` centred at ``cx`` to one frame ``img`` (in place)."""
    h, w = img.shape
    a, b, cy, m = tr["a"][i], tr["b"][i], tr["cy"][i], tr["margin"][i]
    x0, x1 = max(0, int(cx - m)), min(w, int(cx + m) + 2)
    y0, y1 = max(0, int(cy - b - 6)), min(h, int(cy + b + 6) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    rho = np.sqrt((xx / a) ** 2 + (yy / b) ** 2)
    dist = (rho - 1.0) * math.sqrt(a * b)  # ~ signed distance to the membrane [px]
    inside = 1.0 / (1.0 + np.exp(dist / 0.7))
    kx, ky = tr["tex_k"][i]
    px, py = tr["tex_phase"][i]
    texture = np.sin(kx * xx + px) * np.cos(ky * yy + py)
    patch = (
        -tr["rim"][i] * np.exp(-((dist / 1.1) ** 2))
        + tr["halo"][i] * np.exp(-(((dist - 2.2) / 1.3) ** 2))
        + inside * (tr["body"][i] + 6.0 * np.clip(1.0 - rho**2, 0, 1) + tr["tex_amp"][i] * texture)
    )
    img[y0:y1, x0:x1] += patch


def _ellipse_features(a: float, b: float) -> tuple[float, float]:
    """(area in µm², deformation) of an ellipse with semi-axes a, b in pixels."""
    area = math.pi * a * b
    # Ramanujan's perimeter; deform = 1 - circularity = 1 - 2 sqrt(pi A) / P
    hh = ((a - b) / (a + b)) ** 2
    perimeter = math.pi * (a + b) * (1 + 3 * hh / (10 + math.sqrt(4 - 3 * hh)))
    return area * _PIXEL_SIZE**2, 1.0 - 2.0 * math.sqrt(math.pi * area) / perimeter


def _metadata(n_events: int, h: int, w: int, seed: int) -> dict:
    """Root attributes of a real RT-DC measurement, typed as dclab defines them."""
    timestamp = calendar.timegm(time.strptime(f"{_DATE} {_TIME}", "%Y-%m-%d %H:%M:%S"))
    return {
        "experiment:date": _DATE,
        "experiment:event count": int(n_events),
        "experiment:run index": 1,
        "experiment:sample": "synthetic cells (rollmed-dask example)",
        "experiment:time": _TIME,
        "experiment:timestamp": float(timestamp),
        "imaging:flash device": "LED",
        "imaging:flash duration": 2.0,
        "imaging:frame rate": _FRAME_RATE,
        "imaging:pixel size": _PIXEL_SIZE,
        "imaging:roi position x": 629,
        "imaging:roi position y": 512,
        "imaging:roi size x": int(w),
        "imaging:roi size y": int(h),
        "online_contour:bg empty": True,
        "online_contour:bin area min": 10,
        "online_contour:bin kernel": 5,
        "online_contour:bin threshold": -6,
        "online_contour:image blur": 0,
        "online_contour:no absdiff": True,
        "setup:channel width": 20.0,
        "setup:chip region": "channel",
        "setup:flow rate": 0.16,
        "setup:flow rate sample": 0.04,
        "setup:flow rate sheath": 0.12,
        "setup:identifier": f"RMDX-example-seed{seed}",
        "setup:medium": "CellCarrierB",
        "setup:module composition": "AcCellerator",
        "setup:software version": f"{rtdc.software_string()} (synthetic example)",
    }


def _scalar_dataset(events: h5py.Group, name: str, data: np.ndarray) -> None:
    """A scalar feature as dcnum stores it (chunks of ~1 MiB, zstd-5, fletcher32)."""
    events.create_dataset(
        name,
        data=data,
        maxshape=(None,),
        chunks=(rtdc.default_chunk_events((), data.dtype),),
        **rtdc.filter_kwargs(),
    )


def _scene(n_events: int, h: int, w: int, seed: int, sigma: float, cell_rate: float) -> dict:
    """Everything but the per-frame noise: channel, frame numbers, cells, flicker."""
    frames = _frame_numbers(n_events, seed)
    return {
        "background": _static_background(h, w, np.random.default_rng([seed, 0])),
        "frames": frames,
        "tracks": _cell_tracks(float(frames[-1]), h, w, seed, cell_rate),
        "flicker": 1.0 + 0.004 * np.random.default_rng([seed, 3]).standard_normal(n_events),
        "sigma": sigma,
    }


def _render(buf, start, scene, seed, bi, area_um, deform) -> None:
    """Frames ``start .. start+len(buf)`` of ``scene`` into ``buf`` (float32), rounded.

    ``area_um``/``deform`` receive the features of the cell nearest the centre.
    """
    stop = start + len(buf)
    w = buf.shape[2]
    tracks = scene["tracks"]
    rng = np.random.default_rng([seed, 4, bi])
    rng.standard_normal(dtype=np.float32, out=buf)
    buf *= np.float32(scene["sigma"])
    buf += scene["background"][None] * scene["flicker"][start:stop, None, None].astype(np.float32)
    fr = scene["frames"][start:stop].astype(np.float64)
    nearest = np.full(stop - start, np.inf)
    visible = np.nonzero((tracks["enter"] <= fr[-1]) & (tracks["exit"] >= fr[0]))[0]
    for i in visible:
        k0 = np.searchsorted(fr, tracks["enter"][i], side="left")
        k1 = np.searchsorted(fr, tracks["exit"][i], side="right")
        for k in range(k0, k1):
            cx = -tracks["margin"][i] + tracks["speed"][i] * (fr[k] - tracks["enter"][i])
            _draw_cell(buf[k], tracks, i, cx)
            off = abs(cx - w / 2)
            if off < nearest[k] and 0 <= cx < w:
                nearest[k] = off
                area_um[start + k], deform[start + k] = _ellipse_features(
                    tracks["a"][i], tracks["b"][i]
                )
    np.clip(buf, 0, 255, out=buf)
    # Round half up, then cast (clip first: casting out-of-range floats to
    # uint8 is undefined).
    buf += np.float32(0.5)


def camera_frames(
    n_events: int,
    image_shape=(80, 320),
    seed: int = 0,
    noise_sigma: float = _NOISE_SIGMA,
    cell_rate: float = _CELL_RATE,
) -> np.ndarray:
    """The frames :func:`write_example` writes, in memory, with noise and cells to choose.

    For measuring a kernel against the noise level and the share of frames
    with cells. With the defaults the frames equal ``events/image`` of
    ``write_example(path, n_events, image_shape, seed)``.

    Parameters
    ----------
    n_events : int
        Number of frames.
    image_shape : tuple of int
        ``(H, W)``, at least ``(16, 16)``.
    seed : int
        Seed of the random generators.
    noise_sigma : float
        Temporal noise of the sensor in grey levels.
    cell_rate : float
        New cells per frame; 0 gives frames without cells.

    Returns
    -------
    numpy.ndarray
        ``(n_events, H, W)`` uint8.

    Examples
    --------
    >>> camera_frames(3, (16, 32), noise_sigma=1.0).shape
    (3, 16, 32)
    """
    h, w = (int(v) for v in image_shape)
    scene = _scene(n_events, h, w, seed, noise_sigma, cell_rate)
    out = np.empty((n_events, h, w), dtype=np.uint8)
    chunk = rtdc.default_chunk_events((h, w), np.uint8)
    batch = chunk * max(1, _BATCH_PIXELS // (h * w) // chunk)
    work = np.empty((batch, h, w), dtype=np.float32)
    features = np.empty(n_events), np.empty(n_events)
    for bi, start in enumerate(range(0, n_events, batch)):
        buf = work[: min(n_events, start + batch) - start]
        _render(buf, start, scene, seed, bi, *features)
        out[start : start + len(buf)] = buf.astype(np.uint8)
    return out


def write_example(
    path, n_events: int = 2000, image_shape=(80, 320), seed: int = 0
) -> pathlib.Path:
    """Write a synthetic RT-DC measurement to ``path`` (overwritten if it exists).

    Parameters
    ----------
    path : str or pathlib.Path
        Output ``.rtdc`` file.
    n_events : int
        Number of events (frames); at least 1.
    image_shape : tuple of int
        ``(H, W)`` of each image, at least ``(16, 16)``; the flow is along x
        (the second axis).
    seed : int
        Seed of the random generator; the same arguments give the same file.

    Returns
    -------
    pathlib.Path
        The path written.

    Notes
    -----
    ``events/image`` is uint8 with chunks ``(default_chunk_events, H, W)``
    (40 events for 80x320), maxshape ``(None, H, W)``, zstd level 5 and
    fletcher32, and the HDF5 image attributes, as dcnum writes it. Scalar
    features: ``frame`` (uint64), ``time`` (s), ``index`` (1..N, uint32), and
    ``area_um``/``deform`` of the cell nearest the image centre (NaN for
    frames without a cell). About 1.3 s per 2000 events of 80x320 (one core).

    Examples
    --------
    .. code-block:: python

        p = write_example("example.rtdc", n_events=200, seed=1)
        with h5py.File(p) as h5:
            h5["events/image"].chunks
        # (40, 80, 320)
    """
    if isinstance(n_events, bool) or not isinstance(n_events, (int, np.integer)) or n_events < 1:
        raise ValueError(f"n_events={n_events!r} must be a positive integer")
    h, w = (int(s) for s in image_shape)
    if h < 16 or w < 16:
        raise ValueError(f"image_shape={tuple(image_shape)!r} must be at least (16, 16)")
    n_events = int(n_events)
    path = pathlib.Path(path)

    scene = _scene(n_events, h, w, seed, _NOISE_SIGMA, _CELL_RATE)
    frames, tracks = scene["frames"], scene["tracks"]

    chunk = rtdc.default_chunk_events((h, w), np.uint8)
    batch = chunk * max(1, _BATCH_PIXELS // (h * w) // chunk)
    area_um = np.full(n_events, np.nan)
    deform = np.full(n_events, np.nan)

    with h5py.File(path, "w", libver="latest") as h5:
        h5.attrs.update(_metadata(n_events, h, w, seed))
        events = h5.require_group("events")
        images = rtdc.create_image_dataset(events, "image", n_events, (h, w), np.uint8)
        work = np.empty((batch, h, w), dtype=np.float32)
        for bi, start in enumerate(range(0, n_events, batch)):
            stop = min(n_events, start + batch)
            buf = work[: stop - start]
            _render(buf, start, scene, seed, bi, area_um, deform)
            images[start:stop] = buf.astype(np.uint8)

        _scalar_dataset(events, "frame", frames)
        _scalar_dataset(events, "time", (frames - frames[0]).astype(np.float64) / _FRAME_RATE)
        _scalar_dataset(events, "index", np.arange(1, n_events + 1, dtype=np.uint32))
        _scalar_dataset(events, "area_um", area_um)
        _scalar_dataset(events, "deform", deform)

        log = {
            "generator": "rollmed_dask.example.write_example",
            "software": rtdc.software_string(),
            "n_events": n_events,
            "image_shape": [h, w],
            "seed": int(seed),
            "cells": int(tracks["enter"].size),
            "noise sigma": scene["sigma"],
            "cell rate per frame": _CELL_RATE,
        }
        rtdc.write_log(h5, "rollmed-dask-example", json.dumps(log, indent=2).split("\n"))
    return path
