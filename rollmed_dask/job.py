"""The whole out-of-core job, file to file: source -> graph -> sink, with progress.

Everything a user can get wrong is checked before any work starts, and the
output is only moved into place when complete.
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import identity, rtdc
from .compression import DEFAULT_COMPRESSION, check_compression
from .core import check_kernel_size, select_engine
from .pipeline import DEFAULT_MEMORY_BUDGET, block_tasks, parse_bytes, plan_block_tasks
from .scheduling import resolve_scheduler, stream_blocks
from .sinks import (
    HDF5Sink,
    TargetLock,
    ZarrSink,
    check_not_symlink,
    check_output_folder,
    check_target,
    disk_full_error,
    option_error,
    partial_path,
    pause_point,
    recover_backup,
    remove_stale_temporaries,
    zarr_job_params,
)
from .sources import Source, as_source
from .tiff import is_tiff_source

FORMATS = ("hdf5", "zarr", "tiff")


@dataclass
class BackgroundSummary:
    """What ``compute_background`` did: small, printable, JSON-friendly."""

    target: str
    format: str
    dataset: str
    events: int
    image_shape: tuple
    dtype: str
    kernel_size: int
    engine: str
    blocks: int
    blocks_resumed: int
    seconds: float
    scheduler: str
    events_resumed: int = 0
    complete_already: bool = False

    @property
    def events_per_second(self) -> float:
        """Events computed by this run per second (resumed blocks do not count)."""
        computed = self.events - self.events_resumed
        return computed / self.seconds if self.seconds else float("inf")

    def one_line(self) -> str:
        """The line the CLI prints at the end."""
        height, width = self.image_shape
        if self.complete_already:
            return (
                f"nothing to do: {self.target}:{self.dataset} is complete ({self.events} x "
                f"{height} x {width} {self.dtype}, K={self.kernel_size})"
            )
        resumed = f", {self.blocks_resumed} resumed" if self.blocks_resumed else ""
        return (
            f"wrote {self.format} {self.target}:{self.dataset} ({self.events} x {height} x "
            f"{width} {self.dtype}, K={self.kernel_size}, engine={self.engine}) in "
            f"{self.seconds:.1f} s, {self.events_per_second:,.0f} events/s"
            f" ({self.blocks} blocks{resumed}, {self.scheduler})"
        )


def output_format(target: pathlib.Path, format: str | None) -> str:
    """``format`` if given, else ``zarr`` for a ``.zarr`` target, ``tiff`` for a
    ``.tif``/``.tiff`` one, else ``hdf5``."""
    if format is None:
        suffix = target.suffix.lower()
        return {".zarr": "zarr", ".tif": "tiff", ".tiff": "tiff"}.get(suffix, "hdf5")
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not known; pass one of {', '.join(FORMATS)}")
    return format


def check_resume_format(resume: bool, fmt: str, in_place: bool) -> None:
    """Refuse ``resume`` where it would be ignored: only a Zarr output keeps
    its finished blocks (an HDF5 file is one file, written whole)."""
    if resume and (fmt != "zarr" or in_place):
        raise option_error(
            ValueError,
            "resume works with Zarr output only (an .rtdc/HDF5 output is always written "
            "whole); drop {option}, or write a .zarr output",
            "resume",
        )


def _same_file(a: pathlib.Path | None, b: pathlib.Path) -> bool:
    return a is not None and b.exists() and a.exists() and os.path.samefile(a, b)


def compute_background(
    source,
    target,
    kernel_size: int = 100,
    *,
    dataset: str = "events/image",
    output_dataset: str = "events/image_bg",
    format: str | None = None,
    compression: str = DEFAULT_COMPRESSION,
    engine: str = "auto",
    scheduler=None,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    in_place: bool = False,
    copy_images: bool = False,
    memory_budget=DEFAULT_MEMORY_BUDGET,
    event_chunk: int | None = None,
    batch_size: int = 10000,
    num_workers: int | None = None,
) -> BackgroundSummary:
    """Compute the rolling-median background of a stack and write it to a file.

    Out of core: no task holds more than one block (``memory_budget``), and
    finished blocks are written as they arrive. The result goes to a hidden
    temporary next to ``target`` and is moved into place only when complete,
    so a failed or interrupted run never touches an existing ``target``. The
    run holds a lock on ``target``: a second run on it fails at once.

    Parameters
    ----------
    source : path, h5py/zarr dataset, numpy or dask array
        The image stack, shape (N, H, W), any integer or float dtype.
    target : path
        The output file: HDF5 (``.rtdc``, ``.h5``) or a Zarr store (``.zarr``).
        A new HDF5 file from an ``.rtdc`` input carries its metadata and a
        basin (README, "Output format"); from a plain HDF5 input (no
        ``events`` group) it holds the background and our run log only.
    kernel_size : int
        K, events per window, ``1 <= K < N``.
    dataset, output_dataset : str
        Input dataset in ``source`` and output dataset in ``target``.
    format : {"hdf5", "zarr", "tiff"}, optional
        Output format; by default from the suffix of ``target``.
    compression : str
        Output compression: "zstd-1" (default) .. "zstd-9", "gzip-1" .. "gzip-9",
        "none", as dcnum spells them; "zstd" is zstd-5 (dcnum's default) and
        "gzip" gzip-4. The default was chosen by measurement (README, "Output
        format"). fletcher32 checksums are always written to HDF5.
    engine : {"auto", "compiled", "scipy", "numpy"}
        The per-block kernel; all give identical bits ("numba", the compiled
        kernels' old name, selects "compiled").
    scheduler : None, str or distributed.Client
        None (an active Client, else threads), "threads", "processes",
        "synchronous", a Client or a scheduler address "tcp://host:port".
    progress : bool
        Show a progress bar on stderr.
    overwrite : bool
        Replace an existing ``target`` (only once the new one is complete). Only
        a file or a Zarr store written by rollmed-dask is ever replaced: any
        other folder, a symbolic link, or a target holding the input is refused.
    in_place : bool
        Add ``output_dataset`` to the existing HDF5 file ``target`` (which may
        be the input file itself, as dcnum does) instead of creating a new
        file. The file is never opened for writing: a copy beside it gets the
        new dataset and a log entry, and replaces it by a rename when complete;
        everything else is copied as it was. An existing dataset is replaced
        only with ``overwrite``. ``target`` must hold the input's events.
    copy_images : bool
        A new ``.rtdc`` file gets ``events/image`` for dcnum's pipeline: by
        default an HDF5 virtual dataset onto the input's images (about the
        size of the background alone; it needs the input where it is, or
        moved together with the output). With ``copy_images``, a copy of
        them: a self-contained file as large as the input, which passes
        ``dclab-verify-dataset``. See README, "Output format".
    resume : bool
        Zarr only: keep the partial output if the run fails, and continue a
        partial output left by an earlier ``resume=True`` run.
    memory_budget : int or str
        Memory one task may use, e.g. "256MiB"; decides the block length.
    event_chunk : int, optional
        Force the block length in events (at least K).
    batch_size : int
        Recorded in the dcnum pipeline id (``rollmed:k=K^b=B``) so dcnum
        accepts the result as its own; it does not change the result.
    num_workers : int, optional
        Threads or processes of a local scheduler (default: one per core).

    Returns
    -------
    BackgroundSummary

    Raises
    ------
    FileNotFoundError, KeyError, ValueError, FileExistsError, PermissionError
        For a bad input or output, with the values and the fix.
    OSError
        For a full disk, a file locked by another program, or a target another
        run is writing (:class:`rollmed_dask.sinks.TargetBusyError`).

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib, h5py
    >>> from rollmed_dask import compute_background
    >>> img = np.random.default_rng(0).integers(0, 255, (300, 16, 32), dtype=np.uint8)
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "bg.rtdc"
    >>> summary = compute_background(img, out, kernel_size=20, progress=False)
    >>> summary.events, summary.kernel_size
    (300, 20)
    >>> with h5py.File(out) as h5:
    ...     h5["events/image_bg"].shape
    (300, 16, 32)
    """
    t0 = time.perf_counter()
    target = pathlib.Path(target)
    fmt = output_format(target, format)
    check_compression(compression)
    parse_bytes(memory_budget)
    check_resume_format(resume, fmt, in_place)
    if in_place:
        # before the input is read: it may be this very file, locked by another program
        _check_in_place_target(target, fmt, output_dataset, overwrite)
    src: Source = as_source(source, dataset)
    k = check_kernel_size(kernel_size, src.shape[0])
    engine = select_engine(engine, src.dtype)
    if in_place:
        _check_in_place_matches(target, output_dataset, src.shape)
    elif _same_file(src.path, target):
        raise option_error(
            ValueError,
            f"the output {str(target)!r} is the input file; write to another file, or "
            f"add the background to the input file itself with {{option}}",
            "in_place",
        )
    else:
        check_not_symlink(target)
        check_output_folder(target)
    # one run per target: a second one is refused while this one writes
    with TargetLock(target):
        restored = recover_backup(target)
        if restored and progress:
            print(f"rollmed-dask: {restored}", file=sys.stderr)
        resumable = resume and fmt == "zarr"
        remove_stale_temporaries(target, keep_resumable=resumable)
        resuming = resumable and partial_path(target).exists()
        if not in_place:
            if resumable and not resuming and not overwrite:
                complete, why = _complete_state(target, src, k, compression, output_dataset)
                if complete:
                    return _complete_summary(src, target, fmt, output_dataset, k, engine, t0)
                if why is not None:
                    raise option_error(
                        FileExistsError,
                        f"the existing output {str(target)!r} {why}; pass {{option}} to "
                        f"replace it once the new result is complete",
                        "overwrite",
                    )
            check_target(target, overwrite or resuming, src.path)
        # the blocks, the workers' memory and a partial to resume are checked
        # as the run will see them, before a starter may submit SLURM jobs
        _check_plan(src, target, fmt, k, scheduler, memory_budget, event_chunk,
                    compression, output_dataset, resuming)  # fmt: skip
        # only now: a scheduler may be a starter that submits SLURM jobs, and no
        # job is submitted for a run that the checks above refuse
        resolved = resolve_scheduler(scheduler)
        try:
            summary = _run_job(
                src,
                target,
                fmt,
                k,
                engine,
                resolved,
                output_dataset=output_dataset,
                compression=compression,
                in_place=in_place,
                copy_images=copy_images,
                resume=resume,
                progress=progress,
                batch_size=batch_size,
                num_workers=num_workers,
                memory_budget=fit_budget_to_workers(memory_budget, resolved),
                event_chunk=event_chunk,
                t0=t0,
            )
            _signal_point("moved")
            return summary
        finally:
            resolved.close()


def _signal_point(name: str) -> None:
    """Test hook: send this process the signal ``ROLLMED_DASK_TEST_SIGNAL_AT``
    names here (``moved:TERM``: SIGTERM once the output is in place)."""
    point, _, sig = os.environ.get("ROLLMED_DASK_TEST_SIGNAL_AT", "").partition(":")
    if point == name:
        import signal

        os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'INT'}"))


# What a dask worker process uses besides its blocks (python, numpy, dask,
# numba and the kernels: 260 MiB measured in a paused LocalCluster worker)
WORKER_BASE_MEMORY = 256 * 2**20
# dask pauses a worker whose process uses this share of its memory limit
_WORKER_PAUSE = 0.8


def _check_plan(src, target, fmt, k, scheduler, memory_budget, event_chunk,
                compression, output_dataset, resuming) -> None:  # fmt: skip
    """Refuse now what the run would refuse once its workers started: a budget or
    block length that plans no block, workers too small for a block (declared
    by a cluster starter as ``worker_memory``: bytes and threads per worker
    process), a partial output made with other parameters."""
    budget = parse_bytes(memory_budget)
    declared = getattr(scheduler, "worker_memory", None)
    row_bytes = int(np.prod(src.shape[1:])) * src.dtype.itemsize
    if declared is not None:
        limit, threads = declared
        spelled = getattr(scheduler, "worker_memory_spelled", None)
        budget = min(budget, _check_worker_memory(limit, threads, k, row_bytes, spelled,
                                                  n_events=src.shape[0]))  # fmt: skip
    chunk_events = rtdc.default_chunk_events(src.shape[1:], src.dtype)
    chunks = plan_block_tasks(
        src, k, memory_budget=budget, event_chunk=event_chunk, align_events=chunk_events
    )
    if resuming:
        params = {**_result_params(src, k, compression), "block_events": chunks[0][0]}
        sink = ZarrSink(target, output_dataset, src.shape, src.dtype, chunk_events=chunk_events,
                        job_params=params, resume=True, compression=compression)  # fmt: skip
        sink._check_resumable()


def _check_worker_memory(limit, threads, k, row_bytes, spelled=None, *, n_events) -> int:
    """The budget a worker of ``limit`` bytes and ``threads`` threads allows a block,
    or a ValueError saying how much memory the workers need. A block holds at
    least 1 + 2K events, or the whole stack when it has fewer (as the budget's
    own check counts them: ``pipeline.check_budget_holds_a_row``)."""
    from dask.utils import format_bytes

    from .pipeline import _ROW_COPIES, MiB

    rows = min(1 + 2 * k, n_events)
    minimum = _ROW_COPIES * row_bytes * rows
    threads = max(int(threads), 1)
    need = (WORKER_BASE_MEMORY + threads * minimum / _WORKER_MEMORY_SHARE) / _WORKER_PAUSE
    if limit and limit < need:
        spelled = spelled or f"a memory limit of {format_bytes(limit)}"
        raise ValueError(
            f"{spelled} gives each dask worker process {format_bytes(limit)} for {threads} "
            f"thread(s), but it needs about {format_bytes(WORKER_BASE_MEMORY)} for itself "
            f"and {format_bytes(minimum)} per thread for a block with K={k} (4 times that "
            f"planned, and dask pauses a worker at 80 %): give each worker process at least "
            f"{math.ceil(need / MiB)}MiB (--memory), or fewer threads per worker"
        )
    return int(limit / threads * _WORKER_MEMORY_SHARE) if limit else 2**62


def _result_params(src, k, compression) -> dict:
    """What decides the stored result (the block length does not)."""
    n_events, height, width = src.shape
    return {
        "input": str(src.path) if src.path else type(src.array).__name__,
        "dataset": src.dataset,
        "events": n_events,
        "image_shape": [height, width],
        "dtype": str(src.dtype),
        "kernel_size": k,
        "compression": compression,
    }


def _complete_state(target: pathlib.Path, src, k, compression, output_dataset):
    """Is ``target`` a complete Zarr output of ours of this very job (nothing to
    resume)? ``(True, None)``; ``(False, None)`` when it is not a complete output
    of ours; ``(False, why)`` when it is one made otherwise: another parameter
    (named, with both values) or other data (:func:`rollmed_dask.identity.same_data`).
    """
    stored = zarr_job_params(target)
    if not isinstance(stored, dict):
        return False, None
    why = identity.differing_param(stored, _result_params(src, k, compression))
    if why is not None:
        return False, f"was made with {why}"
    found = identity.read_record(stored.get(identity.ATTR))
    if found is None:
        return False, "records no identity of its input data (an older output)"
    if src.path is None:
        same, why = found["digest"] == _upfront_identity(src, found["chunk_events"]), None
    else:
        same, why = identity.same_data(found, src.path, lambda: src.array)
    return (True, None) if same else (False, why or "was made from other data")


def _upfront_identity(src, chunk_events: int) -> str | None:
    """The identity of an input that no block task hashes (in memory, a mapped
    basin), read and hashed before the job; None for a dask array, whose
    graph would run twice."""
    if type(src.array).__module__.startswith("dask"):
        return None
    return identity.compute_identity(src.array, chunk_events)


def _summary(src, target, fmt, output_dataset, k, engine, t0, **run) -> BackgroundSummary:
    """The summary of a job on ``src``; ``run`` says what this run did."""
    n_events, height, width = src.shape
    return BackgroundSummary(
        target=str(target),
        format=fmt,
        dataset=output_dataset,
        events=n_events,
        image_shape=(height, width),
        dtype=str(src.dtype),
        kernel_size=k,
        engine=engine,
        seconds=time.perf_counter() - t0,
        **run,
    )


def _complete_summary(src, target, fmt, output_dataset, k, engine, t0) -> BackgroundSummary:
    return _summary(
        src,
        target,
        fmt,
        output_dataset,
        k,
        engine,
        t0,
        blocks=0,
        blocks_resumed=0,
        scheduler="none",
        events_resumed=src.shape[0],
        complete_already=True,
    )


def _run_job(
    src,
    target,
    fmt,
    k,
    engine,
    resolved,
    *,
    output_dataset,
    compression,
    in_place,
    copy_images,
    resume,
    progress,
    batch_size,
    num_workers,
    memory_budget,
    event_chunk,
    t0,
):
    """Graph, sink, streaming and commit of a validated job."""
    started = time.time()
    started_ns = identity.now_ns()
    files = identity.source_files(src)
    state = identity.files_state(files) if files else None
    n_events, height, width = src.shape
    chunk_events = rtdc.default_chunk_events((height, width), src.dtype)
    chunks = plan_block_tasks(
        src, k, memory_budget=memory_budget, event_chunk=event_chunk, align_events=chunk_events
    )
    # stored sources hash their rows in the block tasks; others before the job
    upfront = None if src.pickles_small else _upfront_identity(src, chunk_events)
    params = {**_result_params(src, k, compression), "block_events": chunks[0][0]}
    common = dict(
        chunk_events=chunk_events, job_params=dict(params), resume=resume, compression=compression
    )
    if fmt == "zarr":
        sink = ZarrSink(target, output_dataset, src.shape, src.dtype, **common)
    elif fmt == "tiff":
        from .tiff_sink import TiffSink

        sink = TiffSink(target, output_dataset, src.shape, src.dtype, **common)
    else:
        input_path = src.path if _is_hdf5_input(src) else None
        sink = HDF5Sink(
            target,
            output_dataset,
            src.shape,
            src.dtype,
            input_path=input_path,
            in_place=in_place,
            copy_images=copy_images,
            plain=is_tiff_source(src),
            **common,
        )
    # a partial trusts its input's stat as an output does (quiet since the start)
    input_data = {
        "files": identity.trusted_state(state, state, started_ns),
        "identity": upfront,
        "chunk_events": chunk_events,
    }
    try:
        sink.open(input_data)
        blocks = block_tasks(src, k, engine, chunks, sink.prepare, chunk_events)
        if getattr(sink, "complete", False):  # a partial killed just before its move
            _install_complete_partial(src, sink, k, compression, output_dataset)
            return _summary(
                src, target, fmt, output_dataset, k, engine, t0, blocks=len(blocks),
                blocks_resumed=len(blocks), scheduler=resolved.description,
                events_resumed=n_events,
            )  # fmt: skip
        digests = sink.done_digests()
        if src.pickles_small:  # a block done without its digests is computed again
            digests = {start: d for start, d in digests.items() if d is not None}
        done = set(digests)
        if done:
            _check_resumed(src, sink, blocks, digests, input_data, k)
        tasks = [block.task for block in blocks if block.start not in done]
        resumed_events = sum(block.stop - block.start for block in blocks if block.start in done)
        with _progress_bar(n_events, resumed_events, progress) as bar:

            def on_result(result):
                payload, block_digests = result
                bar.update(sink.write(payload))
                digests[payload[0]] = block_digests

            stream_blocks(tasks, on_result, resolved, num_workers)
        if src.pickles_small:
            chunk_digests = [d for start in sorted(digests) for d in digests[start][0]]
            upfront = identity.combine(chunk_digests, src.dtype, src.shape, chunk_events)
        trusted = _state_after_job(src, files, state, started_ns)
        params.update(
            engine=engine,
            scheduler=resolved.description,
            memory_budget=memory_budget,
            blocks_resumed=len(done),
        )
        # what the output was made from: in its run log, and a Zarr store's root
        # attributes (the image_bg attributes stay exactly dcnum's)
        params[identity.ATTR] = identity.record(upfront, chunk_events, trusted)
        sink.job_params[identity.ATTR] = params[identity.ATTR]
        log = rtdc.run_log_lines(
            params, input_path=src.path, output_path=target, time_start=started
        )
        sink.commit(rtdc.bg_ppid_attrs(k, batch_size), log)
    except BaseException as exc:
        pause_point("job-aborting")  # test hook: a signal while a job stops
        sink.abort()
        if resume and sink.tmp.exists():
            exc.partial_kept = str(sink.tmp)  # resumable: the CLI says how to continue
        full = disk_full_error(exc, target)
        if full is not None:
            raise full from None
        raise
    return _summary(
        src,
        target,
        fmt,
        output_dataset,
        k,
        engine,
        t0,
        blocks=len(blocks),
        blocks_resumed=len(done),
        scheduler=resolved.description,
        events_resumed=resumed_events,
    )


def _install_complete_partial(src, sink, k, compression, output_dataset) -> None:
    """Move a partial that was committed but not moved into place, once its
    record says it was made from this input's data."""
    complete, why = _complete_state(sink.tmp, src, k, compression, output_dataset)
    if not complete:
        raise option_error(
            ValueError,
            f"the partial output {str(sink.tmp)!r} {why or 'was made from other data'}; "
            f"rerun without {{option}} to start over",
            "resume",
        )
    sink.install()


def _state_after_job(src, files, state, started_ns):
    """The input's stat to record (None: untrusted), refusing an input that
    changed while the job read it: its background would mix two inputs."""
    if not files:
        return None
    after = identity.files_state(files)
    if after != state:
        raise ValueError(
            f"the input {str(src.path)!r} changed while it was read (another program "
            f"wrote it); nothing was written: run again once it is complete"
        )
    return identity.trusted_state(state, after, started_ns)


def _check_resumed(src, sink, blocks, digests, input_data, k) -> None:
    """A partial is continued only if its blocks were made from this input's data.

    Unchanged stat since the partial was started: the same data. Otherwise
    the rows every done block read (its own and its overlap) are read again
    and hashed, and must give the digests recorded with the block.
    """
    previous = sink.previous_input or {}
    problem = f"the partial output {str(sink.tmp)!r} was made from other data"
    if not src.pickles_small:  # identity known before the job, or None (a dask array)
        if previous.get("identity") != input_data["identity"]:
            raise option_error(
                ValueError, f"{problem}; rerun without {{option}} to start over", "resume"
            )
        return
    if src.path is not None and identity.unchanged_since(previous.get("files"), src.path):
        return
    from .pipeline import RollingMedianView

    view = RollingMedianView(src.array, k, "numpy")
    for block in blocks:
        if block.start not in digests:
            continue
        got = _read_digests(view, block.start, block.stop, input_data["chunk_events"])
        if got != digests[block.start]:
            raise option_error(
                ValueError,
                f"{problem} (the input changed since, at events {block.start}-{block.stop}); "
                f"rerun without {{option}} to start over",
                "resume",
            )


def _read_digests(view, start, stop, chunk_events):
    """The digests a block task records, from the input rows alone (no median)."""
    from .identity import block_digests

    n, k = view.shape[0], view.kernel_size
    first_tail = n - k
    j0 = min(start, first_tail - 1)
    end = max(min(stop, first_tail) - 1 + k, stop)
    chunks, context = block_digests(np.asarray(view.source[j0:end]), j0, start, stop, chunk_events)
    return chunks, context


# Of a worker's memory limit per thread, the share one block task may plan on:
# dask holds a block's neighbours and the finished output besides the task itself.
_WORKER_MEMORY_SHARE = 0.25


def fit_budget_to_workers(memory_budget, resolved) -> int:
    """The memory budget, lowered to what the smallest distributed worker allows.

    A worker whose memory limit is exceeded is killed by its nanny; planning
    blocks to a quarter of the limit per thread keeps it well clear.
    """
    budget = parse_bytes(memory_budget)
    if resolved.client is None:
        return budget
    workers = resolved.client.scheduler_info(n_workers=-1)["workers"].values()
    limits = [w["memory_limit"] / max(w["nthreads"], 1) for w in workers if w["memory_limit"]]
    if limits:
        budget = min(budget, int(min(limits) * _WORKER_MEMORY_SHARE))
    return budget


def _check_in_place_target(target: pathlib.Path, fmt: str, dataset: str, overwrite: bool):
    import h5py

    if fmt != "hdf5":
        raise option_error(
            ValueError,
            "in_place works with HDF5 files only; drop {option} for Zarr output",
            "in_place",
        )
    check_not_symlink(target)
    if not target.is_file():
        raise option_error(
            FileNotFoundError,
            f"in_place needs an existing HDF5 file, but {str(target)!r} does not exist; "
            f"drop {{option}} to create a new file",
            "in_place",
        )
    try:
        with h5py.File(target, "r") as h5:
            exists = dataset in h5
    except BlockingIOError:
        raise OSError(
            f"{str(target)!r} is locked by another program that has it open for writing "
            f"(HDF5 file locking); close it there and run again"
        ) from None
    except OSError:
        raise ValueError(
            f"{str(target)!r} is not a readable HDF5 file; in_place needs an HDF5 (.rtdc) file"
        ) from None
    if not os.access(target, os.W_OK):
        raise PermissionError(f"cannot write to {str(target)!r} (no write permission)")
    # the new file is built beside the old one and renamed over it
    check_output_folder(target)
    if exists and not overwrite:
        raise option_error(
            FileExistsError,
            f"{str(target)!r} already has {dataset!r}; pass {{option}} to replace it once "
            f"the new one is complete",
            "overwrite",
        )


def _check_in_place_matches(target: pathlib.Path, dataset: str, shape: tuple) -> None:
    """In place into another file: its events must be the input's events."""
    import posixpath

    import h5py

    group_name, name = posixpath.split(dataset.strip("/"))
    with h5py.File(target, "r") as h5:
        group = h5.get(group_name or "/")
        items = group.items() if isinstance(group, h5py.Group) else []
        for other, obj in items:
            if other == name or not isinstance(obj, h5py.Dataset) or obj.ndim == 0:
                continue
            if obj.shape[0] != shape[0] or (
                other == "image" and obj.shape[1:] != tuple(shape[1:])
            ):
                raise ValueError(
                    f"{str(target)!r} holds {obj.shape[0]} events of shape {obj.shape[1:]} "
                    f"in {obj.name!r}, but the input has {shape[0]} of {tuple(shape[1:])}: "
                    f"its background does not belong in this file; write a new file instead"
                )


def _is_hdf5_input(src: Source) -> bool:
    return src.path is not None and src.path.is_file() and not is_tiff_source(src)


class _progress_bar:
    """tqdm on stderr in events, with events/s and ETA; a no-op when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.initial, self.enabled = total, initial, enabled
        self.bar = None

    def __enter__(self):
        if self.enabled:
            import warnings

            from tqdm import TqdmExperimentalWarning

            # tqdm.auto's choice (a widget in Jupyter, text elsewhere) without the
            # asyncio it also imports: 30 ms of CPU at every CLI start (measured)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TqdmExperimentalWarning)
                from tqdm.autonotebook import tqdm

            desc = "rolling median"
            self.bar = tqdm(
                total=self.total,
                initial=self.initial,
                unit="ev",
                unit_scale=True,
                desc=desc,
                dynamic_ncols=True,
            )
            if self.initial:
                self.bar.write(f"resuming: {self.initial} events already written", file=sys.stderr)
        return self

    def update(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
