"""Run ONE benchmark case in this (fresh) process; ``run.py`` starts it.

    python benchmarks/_cases.py CASE --result RESULT.json [--input IN] [--output OUT]
                                [--kernel K] [--workers W] [...]

Each case imports what it needs first (timed as ``import_s``), then times the
call alone with ``perf_counter`` (``call_s``: the first call, so JIT compiles
and worker-pool starts are included, imports are not), and writes a JSON
result. The parent measures the whole-process wall time and the peak RSS of
the process tree. Nothing here checks results against the truth (``run.py``
does that afterwards, on the output files), except the ``kernel`` and
``graph`` cases, which have no output file.

Cases: dcnum, scipy, dask-image, ours, io-floor, kernel, kernel-noise, first-call,
io-stages, graph.
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
MiB = 2**20


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def _vmhwm_mb() -> float | None:
    """Peak resident set of this process alone (VmHWM)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _image_dataset_kwargs(n_events: int, image_shape):
    """Output dataset exactly as dcnum writes ``events/image_bg``: chunks of ~1 MiB
    (40 x 80 x 320 for uint8), zstd level 5 via hdf5plugin, fletcher32."""
    import hdf5plugin

    h, w = image_shape
    chunk = min(1000, max(10, 2**20 // (h * w)))
    return dict(
        shape=(n_events, h, w),
        dtype="uint8",
        maxshape=(None, h, w),
        chunks=(min(chunk, n_events), h, w),
        fletcher32=True,
        **hdf5plugin.Zstd(clevel=5),
    )


# --------------------------------------------------------------------------
# cases writing an output file
# --------------------------------------------------------------------------


def case_dcnum(a):
    from dcnum.feat.feat_background.bg_roll_median import BackgroundRollMed

    import_done = time.perf_counter()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    # the worker pool starts in __init__: it is part of the call
    with BackgroundRollMed(
        pathlib.Path(a.input), pathlib.Path(a.output), kernel_size=a.kernel,
        batch_size=a.batch_size, compress=True, num_cpus=a.workers,
    ) as bg:  # fmt: skip
        bg.process()
    call = time.perf_counter() - t0
    return import_done, rss0, call, {"batch_size": a.batch_size, "num_cpus": a.workers}


def _tail_fill(computed, n_events, kernel):
    """Rows 0..N-K-1 computed, the last K rows repeat row N-K-1 (README, "What it computes")."""
    import numpy as np

    return np.concatenate([computed[: n_events - kernel], np.repeat(
        computed[n_events - kernel - 1 : n_events - kernel], kernel, axis=0)])  # fmt: skip


def case_scipy(a):
    import h5py
    import hdf5plugin  # noqa: F401
    import numpy as np
    from scipy import ndimage

    import_done = time.perf_counter()
    rss0 = _rss_mb()
    k = a.kernel
    t0 = time.perf_counter()
    with h5py.File(a.input, "r") as h5:
        img = h5["events/image"][:]
    n = img.shape[0]
    # the scipy one-liner with dcnum's result (README, "What it computes")
    med = ndimage.median_filter(img[: n - 1], size=(k, 1, 1), origin=(-(k // 2), 0, 0),
                                mode="nearest")  # fmt: skip
    del img
    bg = _tail_fill(med, n, k)
    del med
    with h5py.File(a.output, "w", libver="latest") as h5:
        h5.create_dataset("events/image_bg", data=bg,
                          **_image_dataset_kwargs(n, bg.shape[1:]))  # fmt: skip
    call = time.perf_counter() - t0
    assert bg.dtype == np.uint8
    return import_done, rss0, call, {"threads": 1}


def case_dask_image(a):
    import dask
    import dask.array as da
    import h5py
    import hdf5plugin  # noqa: F401
    import numpy as np
    from dask_image import ndfilters

    import_done = time.perf_counter()
    rss0 = _rss_mb()
    k = a.kernel
    t0 = time.perf_counter()
    with h5py.File(a.input, "r") as h5in, h5py.File(a.output, "w", libver="latest") as h5out:
        dset = h5in["events/image"]
        n, h, w = dset.shape
        x = da.from_array(dset, chunks=(a.event_chunk, h, w), lock=True)
        med = ndfilters.median_filter(x[: n - 1], size=(k, 1, 1), origin=(-(k // 2), 0, 0),
                                      mode="nearest")  # fmt: skip
        last = med[n - k - 1 : n - k]
        bg = da.concatenate([med[: n - k], da.repeat(last, k, axis=0)], axis=0)
        out = h5out.create_dataset("events/image_bg", **_image_dataset_kwargs(n, (h, w)))
        chunk = out.chunks[0]
        bg = bg.rechunk((max(chunk, a.event_chunk // chunk * chunk), h, w))
        with dask.config.set(scheduler="threads", num_workers=a.workers):
            da.store(bg, out, lock=True)
    call = time.perf_counter() - t0
    assert bg.dtype == np.uint8
    return import_done, rss0, call, {"event_chunk": a.event_chunk, "scheduler": "threads",
                                     "num_workers": a.workers}  # fmt: skip


def case_ours(a):
    from rollmed_dask import compute_background

    import_done = time.perf_counter()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    summary = compute_background(
        a.input, a.output, a.kernel, scheduler=a.scheduler, engine=a.engine,
        progress=False, num_workers=a.workers,
    )  # fmt: skip
    call = time.perf_counter() - t0
    extra = {"engine": summary.engine, "blocks": summary.blocks, "scheduler": summary.scheduler,
             "num_workers": a.workers, "summary_seconds": round(summary.seconds, 4)}  # fmt: skip
    return import_done, rss0, call, extra


def case_io_floor(a):
    """Read the input and write the known result with the output's compression, no compute.

    The same reader (``HDF5Reader`` via ``as_source``), the same block plan as
    ``compute_background`` at this K (minus the overlap), the same sink
    (``HDF5Sink``: blocks encoded on the workers, one writer) and the same
    scheduler; only ``map_overlap`` and the kernel are gone. Each task reads
    its input block and returns the block of the already computed (and
    checked) background from ``--background`` instead of computing it, so the
    bytes compressed and written are the real output's: a smooth background
    compresses ~5x faster than the noisy input, and writing the input back
    would make the floor far too high. Reading the background costs a little
    (one decode of highly compressible chunks); the floor is a slight
    overestimate for it. Like ``compute_background``'s, the output is a new
    lean ``.rtdc`` file (``HDF5Sink`` with the input path,
    :func:`rollmed_dask.rtdc.prepare_output_file`: ``events/image`` a virtual
    dataset onto the input's images), so both sides write the same datasets.
    """
    import dask
    import dask.array as da

    from rollmed_dask import rtdc
    from rollmed_dask.pipeline import as_dask_array, plan_chunks
    from rollmed_dask.scheduling import resolve_scheduler, stream_blocks
    from rollmed_dask.sinks import HDF5Sink
    from rollmed_dask.sources import HDF5Reader, Source, as_source

    import_done = time.perf_counter()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    started = time.time()
    src = as_source(a.input, "events/image")
    n, h, w = src.shape
    chunk_events = rtdc.default_chunk_events((h, w), src.dtype)
    chunks = plan_chunks(src.shape, src.dtype, a.kernel, src.storage_chunks,
                         align_events=chunk_events)  # fmt: skip
    x = as_dask_array(src, chunks)
    known = HDF5Reader(a.background, "events/image_bg")
    y = as_dask_array(Source(known, known.chunks, path=pathlib.Path(known.path)), chunks)
    out = da.map_blocks(_second, x, y, dtype=x.dtype, name="io-floor")
    out = out.rechunk({1: h, 2: w})
    starts = [sum(out.chunks[0][:i]) for i in range(len(out.chunks[0]))]
    params = {"io-floor": True, "events": n, "kernel_size": a.kernel}
    sink = HDF5Sink(a.output, "events/image_bg", src.shape, src.dtype,
                    input_path=src.path, chunk_events=chunk_events, job_params=params,
                    resume=False)  # fmt: skip
    resolved = resolve_scheduler(a.scheduler)
    try:
        sink.open()
        prepare = dask.delayed(sink.prepare, pure=True)
        blocks = out.to_delayed(optimize_graph=True).ravel()
        tasks = [prepare(b, s, dask_key_name=f"io-floor-{out.name}-{s}")
                 for b, s in zip(blocks, starts, strict=True)]  # fmt: skip
        stream_blocks(tasks, sink.write, resolved, a.workers)
        log = rtdc.run_log_lines(params, input_path=src.path, output_path=a.output,
                                 time_start=started)  # fmt: skip
        sink.commit(rtdc.bg_ppid_attrs(a.kernel, 10000), log)
    except BaseException:
        sink.abort()
        raise
    finally:
        resolved.close()
    call = time.perf_counter() - t0
    # what reading the known background alone costs (one thread), for the record
    t1 = time.perf_counter()
    for s in range(0, n, chunks[0][0]):
        known[s : s + chunks[0][0]]
    background_read = time.perf_counter() - t1
    return import_done, rss0, call, {"blocks": len(starts), "block_events": out.chunks[0][0],
                                     "scheduler": resolved.description,
                                     "num_workers": a.workers,
                                     "background_read_s": background_read}  # fmt: skip


def _second(block, known):
    """The I/O floor's 'kernel': the input block was read; return the known result."""
    return known


# --------------------------------------------------------------------------
# cases without an output file
# --------------------------------------------------------------------------


def case_kernel(a):
    """ns per output pixel-event of the compiled window kernel on in-memory blocks.

    Blocks of L + K - 1 frames of the real input (L: the event chunk the
    pipeline plans at this K), 1 thread runs them in turn, T threads run them
    from a thread pool. The first call is timed on its own and not in the rates.
    """
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    import h5py
    import hdf5plugin  # noqa: F401
    import numpy as np

    from rollmed_dask.core import get_window_kernel
    from rollmed_dask.pipeline import plan_chunks

    kernel = get_window_kernel("compiled")  # imports the compiled kernels
    import_done = time.perf_counter()
    rss0 = _rss_mb()
    with h5py.File(a.input, "r") as h5:
        dset = h5["events/image"]
        n, h, w = dset.shape
        img = dset[: min(n, a.events)]
    m = img.shape[0]
    rows = []
    call_total = 0.0
    for k in a.kernels:
        plan_len = plan_chunks((10**6, h, w), img.dtype, k, (40, h, w), align_events=40)[0][0]
        n_blocks = a.blocks
        length = min(plan_len, (m - k + 1) // n_blocks)
        if length < 1:
            rows.append({"kernel": k, "error": f"{m} frames are too few for K={k}"})
            continue
        blocks = [np.ascontiguousarray(img[i * length : i * length + length + k - 1])
                  for i in range(n_blocks)]  # fmt: skip
        pixel_events = n_blocks * length * h * w
        t0 = time.perf_counter()
        outs = [kernel(blocks[0], k)]
        first = time.perf_counter() - t0
        row = {"kernel": k, "block_events": length, "blocks": n_blocks,
               "pixel_events": pixel_events, "first_call_s": first}  # fmt: skip
        for threads in a.threads:
            times = []
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                if threads == 1:
                    outs = [kernel(b, k) for b in blocks]
                else:
                    with ThreadPoolExecutor(threads) as pool:
                        outs = list(pool.map(lambda b, k=k: kernel(b, k), blocks))
                times.append(time.perf_counter() - t0)
            row[f"threads_{threads}"] = {
                "ns_per_pixel_event_min": min(times) / pixel_events * 1e9,
                "ns_per_pixel_event_median": statistics.median(times) / pixel_events * 1e9,
                "seconds": times,
            }
            call_total += sum(times)
        row.update(_check_kernel(blocks, outs, k, a.check_seconds))
        rows.append(row)
    return import_done, rss0, call_total, {"rows": rows, "frames_in_memory": m}


def _check_kernel(blocks, outs, k, budget_s):
    """Compare the kernel's outputs with the benchmark oracle (all pixels if the
    estimated cost fits ``budget_s``, else every s-th pixel)."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    import _oracle

    pixels = blocks[0][0].size
    cost = sum(len(o) for o in outs) * pixels * _oracle.ns_per_pixel_event(k) * 1e-9
    stride = max(1, int(np.ceil(cost / max(budget_s, 1e-3))))
    ok = True
    for block, out in zip(blocks, outs, strict=True):
        flat_in = block.reshape(len(block), -1)[:, ::stride]
        flat_out = out.reshape(len(out), -1)[:, ::stride]
        ok &= bool(np.array_equal(_oracle.median_windows(flat_in, k, threads=2), flat_out))
    check = "oracle, all pixels" if stride == 1 else f"oracle, every {stride}th pixel"
    return {"exact": ok if (stride == 1 or not ok) else None, "sample_exact": ok,
            "check": check}  # fmt: skip


def case_kernel_noise(a):
    """The kernel against noise sigma, K and the share of frames with cells
    (``_camera.kernel_noise``): 1 thread, in-memory camera frames."""
    sys.path.insert(0, str(HERE))
    import _camera

    from rollmed_dask.kernels import median_windows_compiled  # noqa: F401

    import_done = time.perf_counter()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    res = _camera.kernel_noise(a.sigmas, a.kernels, a.cell_rates, a.frames_after_k,
                               (a.height, 320), a.repeat)  # fmt: skip
    return import_done, rss0, time.perf_counter() - t0, res


def case_first_call(a):
    """Set-up of the first ``compute_background`` call over the steady state.

    Three calls on the same input in this fresh process, wall and CPU time of
    each. With ``--parts`` the set-up the first call would do is done first,
    piece by piece, and timed: importing and calling the compiled kernels of
    the input's dtype, importing dask, h5py/hdf5plugin/numcodecs; the first
    call then shows what is left. With ``--dtype`` the input is a new HDF5
    file of the input's first ``--dtype-events`` frames converted to that
    dtype (floats scaled to 0..1, 16-bit and wider integers times 16; zstd,
    fletcher32, 1 MiB chunks), as a user with such data runs it after
    installing.
    """
    import numpy as np

    import rollmed_dask
    from rollmed_dask import compute_background

    import_done = time.perf_counter()
    rss0 = _rss_mb()
    load0 = os.getloadavg()[0]
    parts = {}

    def part(name, fn):
        w, c = time.perf_counter(), time.process_time()
        fn()
        parts[name] = {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c}

    source = a.input
    if a.dtype:
        import h5py
        import hdf5plugin

        dt = np.dtype(a.dtype)
        with h5py.File(a.input, "r") as h5:
            frames = h5["events/image"][: a.dtype_events]
        if dt.kind == "f":
            frames = (frames / 255).astype(dt)
        else:
            frames = (frames.astype(np.int64) * (16 if dt.itemsize >= 2 else 1)).astype(dt)
        # a file like the input, as a user's camera would write it: the job reads it
        # as it reads the input (an in-memory stack would take the dask.array path)
        source = pathlib.Path(a.output).with_suffix(f".{dt.name}.h5")
        with h5py.File(source, "w") as h5:
            h5.create_dataset("events/image", data=frames, fletcher32=True,
                              chunks=(max(1, 2**20 // frames[0].nbytes), *frames.shape[1:]),
                              **hdf5plugin.Zstd(clevel=5))  # fmt: skip
        events = len(frames)
        del frames
    if a.dtype:
        dtype = np.dtype(a.dtype)
    else:
        import h5py

        with h5py.File(a.input, "r") as h5:
            dtype = h5["events/image"].dtype
    if a.parts:

        def kernel_load():
            from rollmed_dask.kernels import median_windows_compiled

            median_windows_compiled(np.zeros((3, 2), dtype=dtype), 2)

        part("import and first call of the compiled kernels", kernel_load)
        part("import dask (delayed, threaded)", lambda: __import__("dask.threaded"))
        part("import h5py, hdf5plugin, numcodecs, h5chunks",
             lambda: __import__("rollmed_dask.h5chunks"))  # fmt: skip
    calls = []
    out = pathlib.Path(a.output)
    for _ in range(3):
        w, c = time.perf_counter(), time.process_time()
        compute_background(source, out, a.kernel, progress=False, overwrite=True,
                           num_workers=a.workers)  # fmt: skip
        calls.append({"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c})
    out.unlink()
    if a.dtype:
        source.unlink()
    compiled = 0  # the kernels are compiled at installation, never in a process
    first = calls[0]
    steady = {key: min(c[key] for c in calls[1:]) for key in ("wall_s", "cpu_s")}
    extra = {"calls": calls, "parts": parts, "version": rollmed_dask.__version__,
             "dtype": dtype.name, "events": events if a.dtype else None,
             "kernels_compiled": compiled, "load_avg": [load0, os.getloadavg()[0]],
             "setup_wall_s": first["wall_s"] - steady["wall_s"],
             "setup_cpu_s": first["cpu_s"] - steady["cpu_s"]}  # fmt: skip
    return import_done, rss0, first["wall_s"], extra


def case_io_stages(a):
    """CPU time of each stage of a file job, one thread, per output pixel-event.

    Blocks of the length the pipeline plans at K, in turn: our reader (raw
    chunks, zstd decode, fletcher32 check; K - 1 frames of overlap per block),
    the kernel, our encoder (zstd + fletcher32 into HDF5's bytes), the writer
    (``write_direct_chunk``); and the floor the issue defines: the same output
    frames read and written by plain h5py with the same filters. Every stage
    is CPU work: on a machine whose cores are all busy, overlapping the stages
    cannot bring a job below their sum divided by the cores.
    """
    import h5py
    import hdf5plugin  # noqa: F401
    import numpy as np

    from rollmed_dask import h5chunks, rtdc
    from rollmed_dask.kernels import median_windows_compiled
    from rollmed_dask.pipeline import plan_chunks

    import_done = time.perf_counter()
    rss0 = _rss_mb()
    k = a.kernel
    fin = h5py.File(a.input, "r")
    src = fin["events/image"]
    n, h, w = src.shape
    length = plan_chunks((10**6, h, w), src.dtype, k, (40, h, w), align_events=40)[0][0]
    chunk = src.chunks[0]  # the writer takes whole chunks
    # planned blocks, as many as fit (at least one, shorter on a small input)
    length = max(chunk, min(length, (n - k + 1) // chunk * chunk))
    starts = list(range(0, n - k + 1 - length + 1, length))[: a.blocks]
    median_windows_compiled(np.zeros((3, 2), dtype=src.dtype), 2)  # load, not timed
    stages: dict = {}

    def add(name, c0):
        stages[name] = stages.get(name, 0.0) + time.process_time() - c0

    t0 = time.perf_counter()
    with h5py.File(a.output, "w") as fout:
        ours = rtdc.create_image_dataset(fout.require_group("events"), "image_bg", n, (h, w),
                                         src.dtype)  # fmt: skip
        plain = rtdc.create_image_dataset(fout.require_group("plain"), "image_bg", n, (h, w),
                                          src.dtype)  # fmt: skip
        icodec = h5chunks.ChunkCodec.from_dataset(src)
        ocodec = h5chunks.ChunkCodec.from_dataset(ours)
        for s in starts:
            e = s + length
            c = time.process_time()
            blk = h5chunks.read_block(src, s, e + k - 1, codec=icodec)
            add("read: raw chunks, zstd decode, fletcher32 check (+ overlap)", c)
            c = time.process_time()
            bg = median_windows_compiled(blk, k)
            add("kernel", c)
            c = time.process_time()
            enc = h5chunks.encode_block(ocodec, bg)
            add("encode: zstd + fletcher32 into HDF5 bytes", c)
            c = time.process_time()
            h5chunks.write_chunks(ours, s, enc)
            add("write: write_direct_chunk", c)
            c = time.process_time()
            src[s:e]
            add("floor: h5py reads the output's frames of the input", c)
            c = time.process_time()
            plain[s:e] = bg
            add("floor: h5py writes them with the same filters", c)
    fin.close()
    pathlib.Path(a.output).unlink()
    pixel_events = len(starts) * length * h * w
    per_pe = {name: v / pixel_events * 1e9 for name, v in stages.items()}
    extra = {"kernel": k, "block_events": length, "blocks": len(starts),
             "ns_per_pixel_event": per_pe}  # fmt: skip
    return import_done, rss0, time.perf_counter() - t0, extra


def case_graph(a):
    """Seconds to build the graph for N = ``--graph-events`` frames.

    1. ``rolling_median`` of ``da.zeros((N, 80, 320), chunks=(40, 80, 320))``:
       the lazy array (the target), then materialising its task graph;
    2. the set-up ``compute_background`` does before computing, on an HDF5
       file of N frames (unallocated chunks, made before timing): open, plan,
       one Delayed per block.
    A middle block and the last block of the zeros graph are computed and
    checked (a median of zeros is zero).
    """
    import dask
    import dask.array as da
    import h5py
    import hdf5plugin
    import numpy as np

    from rollmed_dask import rolling_median, rtdc
    from rollmed_dask.pipeline import block_tasks, plan_block_tasks
    from rollmed_dask.sources import as_source

    import_done = time.perf_counter()
    rss0 = _rss_mb()
    n, k = a.graph_events, a.kernel
    shape = (n, 80, 320)
    res = {"events": n, "kernel": k}
    t0 = time.perf_counter()
    x = da.zeros(shape, chunks=(40, 80, 320), dtype=np.uint8)
    bg = rolling_median(x, k)
    res["build_s"] = time.perf_counter() - t0
    res["dask_chunks_in"] = int(x.numblocks[0])
    res["dask_chunks_out"] = int(bg.numblocks[0])
    t0 = time.perf_counter()
    graph = dict(bg.__dask_graph__())
    res["materialize_s"] = time.perf_counter() - t0
    res["tasks"] = len(graph)
    del graph
    t0 = time.perf_counter()
    lo = bg.chunks[0][0] * (bg.numblocks[0] // 2)
    mid, tail = dask.compute(bg[lo : lo + 40], bg[n - k - 1 :], scheduler="threads")
    res["sample_compute_s"] = time.perf_counter() - t0
    ok = not mid.any() and not tail.any() and tail.shape == (k + 1, 80, 320)

    path = pathlib.Path(a.output)
    with h5py.File(path, "w", libver="latest") as h5:
        h5.create_dataset("events/image", shape=shape, dtype="uint8", maxshape=(None, 80, 320),
                          chunks=(40, 80, 320), fletcher32=True,
                          **hdf5plugin.Zstd(clevel=5))  # fmt: skip
    t0 = time.perf_counter()
    src = as_source(path, "events/image")
    chunk_events = rtdc.default_chunk_events(shape[1:], src.dtype)
    chunks = plan_block_tasks(src, k, align_events=chunk_events)
    blocks = block_tasks(src, k, "compiled", chunks, _second)
    res["ooc_setup_s"] = time.perf_counter() - t0
    res["ooc_blocks"] = len(blocks)
    path.unlink()
    call = res["build_s"]
    return (
        import_done,
        rss0,
        call,
        {"graph": res, "exact": ok, "check": "zero input: a middle block and the tail"},
    )


CASES = {
    "dcnum": case_dcnum,
    "scipy": case_scipy,
    "dask-image": case_dask_image,
    "ours": case_ours,
    "io-floor": case_io_floor,
    "kernel": case_kernel,
    "kernel-noise": case_kernel_noise,
    "first-call": case_first_call,
    "io-stages": case_io_stages,
    "graph": case_graph,
}


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def _floats(text):
    return [float(v) for v in text.split(",") if v]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("--result", required=True, help="JSON file to write the result to")
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--kernel", type=int, default=100)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--scheduler", default="threads")
    p.add_argument("--engine", default="auto")
    p.add_argument("--background", help="io-floor: a checked output holding the result")
    p.add_argument("--batch-size", type=int, default=10000, help="dcnum")
    p.add_argument("--event-chunk", type=int, default=2000, help="dask-image")
    p.add_argument("--events", type=int, default=10**5, help="kernel: frames in memory")
    p.add_argument("--kernels", type=_ints, default=[20, 100, 500], help="kernel")
    p.add_argument("--threads", type=_ints, default=[1, 2], help="kernel")
    p.add_argument("--blocks", type=int, default=4, help="kernel")
    p.add_argument("--repeat", type=int, default=3, help="kernel")
    p.add_argument("--check-seconds", type=float, default=10.0, help="kernel")
    p.add_argument("--graph-events", type=int, default=10**7, help="graph")
    p.add_argument("--sigmas", type=_floats, default=[1, 2, 4, 8], help="kernel-noise")
    p.add_argument("--cell-rates", type=_floats, default=[0, 0.1], help="kernel-noise")
    p.add_argument("--frames-after-k", type=int, default=1000, help="kernel-noise")
    p.add_argument("--height", type=int, default=80, help="kernel-noise: frame height")
    p.add_argument("--parts", action="store_true", help="first-call: time the set-up parts")
    p.add_argument("--dtype", help="first-call: the input's frames converted to this dtype")
    p.add_argument("--dtype-events", type=int, default=2000, help="first-call with --dtype")
    a = p.parse_args(argv)
    result = {"case": a.case, "pid": os.getpid()}
    try:
        import_done, rss0, call, extra = CASES[a.case](a)
        result.update(status="ok", import_s=import_done - T_PROCESS, call_s=call,
                      rss_before_call_mb=rss0, extra=extra)  # fmt: skip
    except BaseException as exc:  # reported, not hidden: the parent prints it
        import traceback

        result.update(status="error", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc())  # fmt: skip
    # ru_maxrss is not used: Linux carries it over exec from the forked parent,
    # so a child of a big parent reports the parent's size. VmHWM is per process.
    result["peak_rss_main_process_mb"] = _vmhwm_mb()
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    child_usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_s"] = (self_usage.ru_utime + self_usage.ru_stime + child_usage.ru_utime
                       + child_usage.ru_stime)  # fmt: skip
    pathlib.Path(a.result).write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
