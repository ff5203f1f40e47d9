"""Many inputs in one run: a folder of measurements, start-up paid once, safe to rerun.

Every file is one ``compute_background`` call, all in this process on one
scheduler, so imports, the compiled kernels and a cluster are paid for
once. Small files run side by side (a few at once, each on a share of the
threads), so the per-file work that is not parallel (opening, metadata,
committing) overlaps another file's median.

A rerun is a resume: an output that is complete, made with the same
parameters (its ``dcnum ppid background`` and our run log) and from the same
data (the identity of the input's frames it records, see
:mod:`rollmed_dask.identity`) is skipped; one made otherwise is refused
unless ``overwrite``, which always computes again. Outputs only appear when
complete (``compute_background`` writes to a temporary first), so an
interrupted batch leaves finished files and nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import threading
import time
from dataclasses import asdict, dataclass

from .compression import DEFAULT_COMPRESSION
from .pipeline import DEFAULT_MEMORY_BUDGET
from .scheduling import STOP_CHECKS
from .tiff import is_frame_folder

OUTPUT_SUFFIX = "_bg"
RUN_LOG_PREFIX = "rollmed-dask-job"
# Files computed at once: enough to overlap one file's serial work with
# another's median; more only splits the threads finer.
MAX_FILES_AT_ONCE = 4

FOLDER_RULES = """\
INPUT may be several files, or folders with -r (every *.rtdc below them,
sorted; hidden files and outputs written by rollmed-dask are left out).
OUTPUT is a folder when there are several INPUTs, with -r, when it ends in /,
or when it is an existing folder whose name does not end in .zarr; it is
created if missing.
Outputs mirror the inputs' tree below their common folder, as <name>_bg.rtdc
(<name>_bg.zarr with --format zarr). With -r --in-place there is no OUTPUT:
every INPUT gets events/image_bg itself. A rerun skips outputs that are up to
date (same parameters, made from the same frames: checked by the identity of
the input data each output records), refuses those made otherwise unless
--overwrite (which always computes again), and
redoes what an interruption left unfinished (Zarr with --resume: resumed).
Exit status: 0 all done or up to date, 1 some files failed, 2 usage error."""


@dataclass
class FileResult:
    """What happened to one input; ``asdict`` of it is JSON-friendly."""

    input: str
    output: str
    status: str  # "done", "skipped", "failed", "interrupted" or "not started"
    events: int | None = None
    seconds: float = 0.0
    error: str | None = None
    note: str | None = None

    def line(self) -> str:
        """The line printed when the file is finished."""
        head = f"{self.status:<8} {self.input} -> {self.output}"
        if self.status == "done":
            rate = self.events / self.seconds if self.seconds else float("inf")
            return f"{head} ({self.events} events, {self.seconds:.1f} s, {rate:,.0f} events/s)"
        if self.error:
            return f"{head}: {self.error}"
        return f"{head}: {self.note}" if self.note else head


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C (or another signal that raises, such as the CLI's SIGTERM) during a
    batch; ``results`` holds what was finished by then, ``cause`` the signal's
    exception."""

    def __init__(self, results: list[dict], cause: BaseException | None = None):
        super().__init__("batch interrupted")
        self.results = results
        self.cause = cause


def _is_signal(exc: BaseException) -> bool:
    """Ctrl-C, or the CLI's SIGTERM: exceptions that are no ``Exception``."""
    return not isinstance(exc, Exception)


# ---------------------------------------------------------------------------
# which files, and where their outputs go
# ---------------------------------------------------------------------------


def is_zarr_store(path: pathlib.Path) -> bool:
    """A directory that is a Zarr store (by name or by its metadata files)."""
    return path.suffix.lower() == ".zarr" or any(
        (path / name).exists() for name in ("zarr.json", ".zgroup", ".zarray")
    )


def _read_run_logs(path: pathlib.Path) -> list[dict]:
    """Our run logs stored in an HDF5 file or a Zarr store, oldest first."""
    texts = []
    if path.is_dir():
        import zarr

        try:
            logs = zarr.open_group(store=str(path), mode="r").attrs.get("rollmed-dask log", {})
        except Exception:  # not a store, or damaged: then it is not our output
            return []
        texts = ["\n".join(logs[name]) for name in sorted(logs)]
    else:
        import h5py
        import hdf5plugin  # noqa: F401  (logs are zstd-compressed)

        try:
            with h5py.File(path, "r") as h5:
                logs = h5.get("logs", {})
                texts = [
                    b"\n".join(logs[name][:]).decode("utf-8", "replace")
                    for name in sorted(logs)
                    if name.startswith(RUN_LOG_PREFIX)
                ]
        except (OSError, KeyError, ValueError):
            return []
    infos = []
    for text in texts:
        try:
            infos.append(json.loads(text))
        except ValueError:
            continue
    return infos


def _log_paths(info: dict) -> tuple[str | None, str | None]:
    return info.get("input", {}).get("path"), info.get("output", {}).get("path")


def is_our_output(path) -> bool:
    """True for a file that rollmed-dask wrote as a new output.

    Decided by content, not by name: its run log names this file as the
    output of a run whose input was another file. (An output also carries
    its input's logs, and a file we added ``image_bg`` to in place carries a
    log whose input is itself: neither makes it an output.)

    Examples
    --------
    >>> import tempfile, pathlib, numpy as np
    >>> from rollmed_dask import compute_background
    >>> from rollmed_dask.example import write_example
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> src = write_example(d / "m.rtdc", n_events=60)
    >>> _ = compute_background(src, d / "m_bg.rtdc", kernel_size=10, progress=False)
    >>> is_our_output(d / "m.rtdc"), is_our_output(d / "m_bg.rtdc")
    (False, True)
    """
    path = pathlib.Path(path)
    for info in _read_run_logs(path):
        source, output = _log_paths(info)
        if output and source and pathlib.Path(output).name == path.name and source != output:
            return True
    return False


def _hidden(path: pathlib.Path, root: pathlib.Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def find_inputs(paths, recursive: bool = False, pattern: str = "*.rtdc") -> list[tuple]:
    """The input files, each with the folder it was found from.

    A folder needs ``recursive``; below it every file matching ``pattern``
    (``*.rtdc``; ``*.tif`` for TIFF stacks) counts, sorted, except hidden files
    (our temporaries) and outputs of rollmed-dask.
    """
    found, seen = [], set()
    for given in paths:
        path = pathlib.Path(given).absolute()
        if not path.exists():
            raise FileNotFoundError(f"input {str(given)!r} does not exist: check the path")
        if path.is_dir() and not is_zarr_store(path):
            if not recursive:
                raise ValueError(
                    f"input {str(given)!r} is a folder, not a Zarr store; pass -r "
                    f"(recursive=True) to process every {pattern} file below it"
                )
            root = path
            candidates = sorted(
                p for p in path.rglob(pattern) if p.is_file() and not _hidden(p, path)
            )
        else:
            root, candidates = path.parent, [path]
        outputs = 0
        for candidate in candidates:
            key = os.path.realpath(candidate)
            if key in seen:
                continue
            seen.add(key)
            if is_our_output(candidate):
                outputs += 1
            else:
                found.append((candidate, root))
        if root is path and not candidates:
            # a typo or the wrong folder: a run that does nothing must say so
            raise FileNotFoundError(f"no .rtdc files found below {str(given)!r}: check the folder")
        if root is path and outputs == len(candidates):
            # e.g. "-r --in-place raw/ bg/": with --in-place every path is an input
            raise ValueError(
                f"{str(given)!r} holds only outputs of rollmed-dask, no measurement; "
                f"give the folders of the measurements (with --in-place every path is an "
                f"input, there is no OUTPUT)"
            )
    return found


def output_path(source: pathlib.Path, root: pathlib.Path, out_dir, fmt: str) -> pathlib.Path:
    """``out_dir / <source's folder below root> / <stem>_bg.rtdc`` (``.zarr`` for Zarr).

    Examples
    --------
    >>> output_path(pathlib.Path("/d/day1/a.rtdc"), pathlib.Path("/d"), "/o", "hdf5").as_posix()
    '/o/day1/a_bg.rtdc'
    """
    suffix = {"zarr": ".zarr", "tiff": ".ome.tif"}.get(fmt, ".rtdc")
    relative = source.parent.relative_to(root)
    stem = source.stem.removesuffix(".ome")  # a.ome.tif -> a_bg.zarr
    return pathlib.Path(out_dir) / relative / f"{stem}{OUTPUT_SUFFIX}{suffix}"


# ---------------------------------------------------------------------------
# is an output up to date?
# ---------------------------------------------------------------------------


def _events(source: pathlib.Path, dataset: str) -> int | None:
    """Events of an input, cheaply; None when it cannot be read (the job says why)."""
    try:
        from .tiff import claims, open_tiff

        if claims(source):
            return open_tiff(source, dataset).shape[0]
        if source.is_dir():
            import zarr

            node = zarr.open(store=str(source), mode="r")
            return int((node[dataset] if isinstance(node, zarr.Group) else node).shape[0])
        import h5py

        from .rtdc import find_image_dataset

        location = find_image_dataset(source, dataset)
        if location.mapping is not None:
            return len(location.mapping)
        with h5py.File(location.path, "r") as h5:
            return int(h5[location.dataset].shape[0])
    except Exception:  # any unreadable input is reported when its job runs
        return None


def _output_dataset_attrs(target: pathlib.Path, dataset: str):
    """(shape, attrs) of the background in ``target``, or None if it has none."""
    if target.is_dir():
        import zarr

        root = zarr.open_group(store=str(target), mode="r")
        if dataset not in root:
            return None
        array = root[dataset]
        return tuple(array.shape), dict(array.attrs)
    import h5py
    import hdf5plugin  # noqa: F401

    with h5py.File(target, "r") as h5:
        if dataset not in h5:
            return None
        ds = h5[dataset]
        return ds.shape, {
            k: v.decode() if isinstance(v, bytes) else v for k, v in ds.attrs.items()
        }


def output_state(job: _Job, opts: dict) -> tuple[str, str | None]:
    """``("missing", None)``, ``("current", None)`` or ``("different", why)``.

    Current only when the output was made with this run's parameters (K and
    batch size in its ``dcnum ppid background``, the event count, the dataset
    and compression in its run log) *and* from the data the input holds now:
    the identity recorded in the output (:mod:`rollmed_dask.identity`) is
    checked by the input's stat when that is unchanged (microseconds), else
    by reading and hashing the input (a moved or copied folder, a file
    touched or rewritten). ``why`` names what differs, with both values.
    """
    target, in_place = job.output, opts["in_place"]
    if not in_place and not (target.exists() or target.is_symlink()):
        return "missing", None
    from .rtdc import bg_ppid

    want = bg_ppid(opts["kernel_size"], opts["batch_size"])
    try:
        found = _output_dataset_attrs(target, opts["output_dataset"])
    except Exception as exc:  # a damaged or foreign output: never replaced silently
        if in_place:  # the input itself: its job says what is wrong with it
            return "missing", None
        return "different", f"is not a readable HDF5 file or Zarr store ({type(exc).__name__})"
    if found is None:
        if in_place:
            return "missing", None
        return "different", f"has no {opts['output_dataset']!r}"
    shape, attrs = found
    made = attrs.get("dcnum ppid background")
    if made != want:
        return "different", f"was made with {_ppid_difference(made, opts)}"
    if job.events is not None and shape[0] != job.events:
        return "different", f"has {shape[0]} events, the input {job.events}"
    for info in reversed(_read_run_logs(target)):
        source, output = _log_paths(info)
        if output is None or pathlib.Path(output).name != target.name:
            continue
        params = info.get("parameters", {})
        for key in ("dataset", "compression"):
            if params.get(key) != opts[key]:
                return (
                    "different",
                    f"was made with {key}={params.get(key)!r}, this run has {opts[key]!r}",
                )
        return _data_state(job, opts, params)
    return "different", "was not written by rollmed-dask"


def _ppid_difference(made, opts) -> str:
    """``"kernel_size=50, this run has 100"`` from a dcnum pipeline id ``rollmed:k=50^b=B``."""
    fields = dict(
        part.split("=", 1) for part in str(made).partition(":")[2].split("^") if "=" in part
    )
    if not str(made).startswith("rollmed:") or not fields:
        return f"{made or 'unknown parameters'}, not kernel_size={opts['kernel_size']}"
    for key, name in (("k", "kernel_size"), ("b", "batch_size")):
        if fields.get(key) != str(opts[name]):
            return f"{name}={fields.get(key)}, this run has {opts[name]}"
    return f"{made}, this run {opts}"


def _data_state(job: _Job, opts: dict, params: dict) -> tuple[str, str | None]:
    from . import identity

    stored = identity.read_record(params.get(identity.ATTR))
    if stored is None:
        return "different", "records no identity of its input data (an older output)"

    def open_array():
        from .sources import as_source

        return as_source(job.input, opts["dataset"]).array

    try:
        same, why = identity.same_data(stored, job.input, open_array)
    except Exception:  # an unreadable input: its job says what is wrong, before any output
        return "missing", None
    return ("current", None) if same else ("different", why)


# ---------------------------------------------------------------------------
# running the jobs
# ---------------------------------------------------------------------------


@dataclass
class _Job:
    input: pathlib.Path
    output: pathlib.Path
    events: int | None


class _Stop:
    """Ends the jobs of a batch once ``set``: a dask callback, active for the
    batch, raises ``KeyboardInterrupt`` in the batch's threads at their next
    task, so each job aborts and removes its temporary output."""

    def __init__(self):
        self.event = threading.Event()
        self.threads: set[int] = set()
        self.callback = None

    def __enter__(self):
        from dask.callbacks import Callback

        stop = self

        class _Raise(Callback):
            def _check(self):
                if stop.event.is_set() and threading.get_ident() in stop.threads:
                    raise KeyboardInterrupt

            def _pretask(self, key, dsk, state):
                self._check()

            def _posttask(self, key, result, dsk, state, worker_id):
                self._check()

        self.callback = _Raise()
        self.callback.register()
        # a distributed scheduler runs no dask callbacks: its loop asks this
        STOP_CHECKS.add(self.callback._check)
        return self

    def __exit__(self, *exc):
        from dask.callbacks import Callback

        STOP_CHECKS.discard(self.callback._check)
        # discard: a local scheduler starting in another thread may have taken
        # the global callbacks away for the time it runs
        Callback.active.discard(self.callback._callback)
        return False


def _error_line(exc: BaseException) -> str:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    template = getattr(exc, "template", None)
    if template is not None:  # both spellings, as the batch's own lines give them
        option = exc.option
        message = template.replace("{option}", f"--{option.replace('_', '-')} ({option}=True)")
    return str(message).splitlines()[0] if str(message) else type(exc).__name__


# options of compute_backgrounds that are not compute_background's, or that
# each file gets in its own way (one shared scheduler, no per-file progress bar)
_BATCH_ONLY = ("recursive", "pattern", "scheduler", "progress")


def _run_one(job: _Job, opts: dict, scheduler, num_workers, stop) -> FileResult:
    from .job import compute_background
    from .sinks import TargetBusyError

    stop.threads.add(threading.get_ident())
    t0 = time.perf_counter()
    result = FileResult(str(job.input), str(job.output), "failed", job.events)
    try:
        if stop.event.is_set():
            result.status = "not started"
            return result
        # the batch's own options stay here; every other one is the file job's
        keywords = {k: v for k, v in opts.items() if k not in _BATCH_ONLY}
        summary = compute_background(
            job.input,
            job.output,
            **keywords,
            scheduler=scheduler,
            progress=False,
            num_workers=num_workers,
        )
        result.status, result.events = "done", summary.events
    except KeyboardInterrupt:
        result.status = "interrupted"
    except TargetBusyError:  # another run (a second batch on this folder) writes it
        result.status, result.note = "skipped", "another run is writing it"
    except FileExistsError as exc:
        # another run may have finished it since this batch looked: not a failure
        if output_state(job, opts)[0] == "current":
            result.status, result.note = "skipped", "up to date"
        else:
            result.error = _error_line(exc)
    except Exception as exc:  # one bad file must not stop the batch
        result.error = _error_line(exc)
        if not isinstance(exc, (ValueError, KeyError, OSError, NotImplementedError)):
            result.error = f"{type(exc).__name__}: {result.error}"
    finally:
        result.seconds = round(time.perf_counter() - t0, 3)
        stop.threads.discard(threading.get_ident())
    return result


class _Shared:
    """One scheduler for the whole batch, and each file's share of it."""

    def __init__(self, scheduler, num_workers, files_at_once, n_jobs):
        from .scheduling import resolve_scheduler

        self.resolved = resolve_scheduler(scheduler)
        self.pool = None
        if self.resolved.client is not None:
            self.scheduler = self.resolved.client
            slots = sum(self.resolved.client.nthreads().values()) or 1
        else:
            self.scheduler = self.resolved.local
            slots = num_workers or os.cpu_count() or 1
        if self.resolved.local == "synchronous":
            files_at_once = 1
        self.files_at_once = max(1, min(files_at_once or MAX_FILES_AT_ONCE, slots, n_jobs))
        # each file gets its share of the threads: together no more blocks in
        # flight, each within the memory budget, than one file alone would have
        self.num_workers = max(1, slots // self.files_at_once)
        if self.resolved.local == "processes":
            self.pool = _process_pool(slots)

    def configured(self):
        """dask's processes scheduler takes its pool from the config."""
        import contextlib

        import dask

        return dask.config.set(pool=self.pool) if self.pool else contextlib.nullcontext()

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.resolved.close()


def _process_pool(n: int):
    """One pool of worker processes serves every file (dask's own would be
    started, and its workers spawned, once per file)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))


class _BatchProgress:
    """One bar over the batch in events (rate, ETA) with files done, and one
    line per finished file; the lines alone when there is no bar."""

    def __init__(self, total_events: int, n_files: int, enabled: bool, lines: bool):
        self.bar = None
        self.lines = lines
        self.n_files, self.files_done = n_files, 0
        if enabled and n_files:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_events, unit="ev", unit_scale=True, desc="files 0/" + str(n_files)
            )

    def finished(self, result: FileResult) -> None:
        self.files_done += 1
        if self.bar is not None:
            self.bar.set_description(f"files {self.files_done}/{self.n_files}", refresh=False)
            self.bar.update(result.events or 0)
        self.write(result.line())

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        elif self.lines:
            print(line, file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def compute_backgrounds(
    inputs,
    out_dir=None,
    kernel_size: int = 100,
    *,
    recursive: bool = False,
    pattern: str = "*.rtdc",
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
    files_at_once: int | None = None,
) -> list[dict]:
    """Compute the rolling-median background of many files in one run.

    Every input becomes one :func:`compute_background` job on one scheduler
    for the batch (imports, compiled kernels and a cluster are paid once);
    small files run a few at a time side by side, each on a share of the
    threads and within the memory budget. A file that fails is reported and
    the others go on.

    Parameters
    ----------
    inputs : path or list of paths
        ``.rtdc``/HDF5 files (or Zarr stores), or folders with ``recursive``.
    out_dir : path, optional
        Folder for the outputs, created if missing; the outputs mirror the
        inputs' tree below their common folder, as ``<name>_bg.rtdc`` (or
        ``.zarr`` with ``format="zarr"``). Not used with ``in_place``.
    kernel_size : int
        K, events per window.
    recursive : bool
        A folder in ``inputs`` stands for every ``*.rtdc`` below it (sorted;
        hidden files and outputs of rollmed-dask left out).
    pattern : str
        The files a folder stands for with ``recursive``: ``"*.tif"`` takes
        TIFF stacks (one stack per file) instead of ``.rtdc`` files.
    overwrite : bool
        Compute every output again and replace it, including those made with
        other parameters or data (or not by rollmed-dask) and those that are
        up to date.
    resume : bool
        Zarr: continue partial outputs an interrupted run left.
    in_place : bool
        Add the background to each input file itself.
    progress : bool
        One bar over the batch (files, events, events/s, ETA) on stderr, or
        in a notebook, and one line per finished file.
    files_at_once : int, optional
        Files computed side by side (default: up to 4, at most one per thread).
    dataset, output_dataset, format, compression, engine, scheduler, copy_images, \
memory_budget, event_chunk, batch_size, num_workers
        As for :func:`compute_background`; ``memory_budget`` bounds the batch
        as it bounds one file.

    Returns
    -------
    list of dict
        One per input, in input order: ``input``, ``output``, ``status``
        ("done", "skipped" when up to date, "failed"), ``events``,
        ``seconds``, ``error`` (one line) and ``note``.

    Raises
    ------
    FileNotFoundError, ValueError
        For a missing input, a folder without ``recursive``, a missing
        ``out_dir`` or two inputs with one output, before any work.
    BatchInterrupted
        On Ctrl-C (a ``KeyboardInterrupt``), once the running files are
        stopped; ``.results`` says which were done.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from rollmed_dask import compute_backgrounds
    >>> from rollmed_dask.example import write_example
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("day1/a.rtdc", "day1/b.rtdc", "day2/c.rtdc"):
    ...     (d / "raw" / name).parent.mkdir(parents=True, exist_ok=True)
    ...     _ = write_example(d / "raw" / name, n_events=120)
    >>> results = compute_backgrounds(d / "raw", d / "bg", 20, recursive=True, progress=False)
    >>> [(r["status"], pathlib.Path(r["output"]).relative_to(d).as_posix()) for r in results]
    [('done', 'bg/day1/a_bg.rtdc'), ('done', 'bg/day1/b_bg.rtdc'), ('done', 'bg/day2/c_bg.rtdc')]
    >>> again = compute_backgrounds(d / "raw", d / "bg", 20, recursive=True, progress=False)
    >>> [r["status"] for r in again]
    ['skipped', 'skipped', 'skipped']
    """
    return _compute_backgrounds(**locals(), lines=progress)


def _compute_backgrounds(*, inputs, out_dir, files_at_once, num_workers, lines, **opts):
    from .job import output_format

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found = find_inputs(inputs, opts["recursive"], opts["pattern"])
    jobs = _plan_jobs(found, out_dir, opts, output_format)
    results: list[FileResult | None] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        state, why = output_state(job, opts)
        if state == "current" and not opts["overwrite"]:
            results[i] = FileResult(
                str(job.input), str(job.output), "skipped", job.events, note="up to date"
            )
        elif state == "different" and not opts["overwrite"]:
            results[i] = FileResult(
                str(job.input),
                str(job.output),
                "failed",
                job.events,
                error=f"the existing output {why}; pass --overwrite (overwrite=True) "
                f"to replace it",
            )
        else:
            todo.append(i)
    total = sum(jobs[i].events or 0 for i in todo)
    bar = _BatchProgress(total, len(todo), opts["progress"], lines)
    for result in results:
        if result is not None and result.status == "failed":
            bar.write(result.line())
    try:
        if todo:
            _run_jobs(jobs, todo, results, opts, num_workers, files_at_once, bar)
    except BaseException as exc:
        if not _is_signal(exc):
            raise
        for i in todo:
            if results[i] is None:
                job = jobs[i]
                results[i] = FileResult(str(job.input), str(job.output), "not started", job.events)
        raise BatchInterrupted([asdict(r) for r in results], exc) from None
    finally:
        bar.close()
    return [asdict(r) for r in results]


def _plan_jobs(found, out_dir, opts, output_format) -> list[_Job]:
    if opts["in_place"]:
        fmt = "hdf5"
        if out_dir is not None:
            raise ValueError("in_place writes into each input; drop the output folder")
    else:
        if out_dir is None:
            raise ValueError("pass an output folder, or in_place=True (CLI: --in-place)")
        out_dir = pathlib.Path(out_dir).absolute()
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(
                f"the output {str(out_dir)!r} is a file, but many inputs need an output folder"
            )
        fmt = output_format(pathlib.Path("x.rtdc"), opts["format"])
    from .job import check_resume_format

    check_resume_format(opts["resume"], fmt, opts["in_place"])
    roots = [root for _, root in found]
    common = pathlib.Path(os.path.commonpath(roots)) if roots else None
    jobs, targets = [], {}
    inputs = {os.path.realpath(source) for source, _ in found}
    for source, _ in found:
        if opts["in_place"]:
            target = source
        else:
            target = output_path(source, common, out_dir, fmt)
            key = os.path.realpath(target)
            if key in targets:
                raise ValueError(
                    f"{targets[key]} and {source} would both be written to {target}; "
                    f"rename one, or process them in two runs"
                )
            if key in inputs:
                raise ValueError(
                    f"the output of {source} would be the input {target}; choose another "
                    f"output folder"
                )
            targets[key] = source
        jobs.append(_Job(source, target, _events(source, opts["dataset"])))
    if not opts["in_place"]:
        for job in jobs:
            job.output.parent.mkdir(parents=True, exist_ok=True)
    return jobs


def _run_jobs(jobs, todo, results, opts, num_workers, files_at_once, bar) -> None:
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    shared = _Shared(opts["scheduler"], num_workers, files_at_once, len(todo))
    queue = list(reversed(todo))
    try:
        with (
            _Stop() as stop,
            shared.configured(),
            ThreadPoolExecutor(shared.files_at_once) as pool,
        ):
            running = {}
            try:
                while queue or running:
                    while queue and len(running) < shared.files_at_once:
                        i = queue.pop()
                        running[
                            pool.submit(
                                _run_one,
                                jobs[i],
                                opts,
                                shared.scheduler,
                                shared.num_workers,
                                stop,
                            )
                        ] = i
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        results[running.pop(future)] = result = future.result()
                        bar.finished(result)
            except BaseException as exc:
                if not _is_signal(exc):
                    raise
                # the running files stop at their next task and remove their
                # temporaries; the finished ones stay as they are
                stop.event.set()
                _wait_for_running(running, results, bar)
                raise
    finally:
        shared.close()


def _wait_for_running(running: dict, results: list, bar) -> None:
    """Collect the files still running once they have stopped. A second or
    third Ctrl-C (or SIGTERM) meanwhile only waits on: leaving now would leave
    their temporaries and locks behind, and a file finished meanwhile unlisted."""
    while running:
        future = next(iter(running))
        try:
            result = future.result()
        except BaseException as again:
            if not _is_signal(again):
                raise
            print(
                f"rollmed-dask: stopping: waiting for {len(running)} running file(s) to "
                "remove their temporaries",
                file=sys.stderr,
            )
            continue
        results[running.pop(future)] = result
        bar.finished(result)


# ---------------------------------------------------------------------------
# summary and command line
# ---------------------------------------------------------------------------

STATUSES = ("done", "skipped", "failed", "interrupted", "not started")


def totals(results: list[dict], seconds: float) -> dict:
    """Files per status, and the events and rate of the files done in ``seconds``."""
    counts = {status: sum(r["status"] == status for r in results) for status in STATUSES}
    events = sum(r["events"] or 0 for r in results if r["status"] == "done")
    return {
        **counts,
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_second": round(events / seconds, 1) if seconds else None,
    }


def summary_table(results: list[dict], seconds: float) -> str:
    """The table the CLI prints at the end of a batch.

    Examples
    --------
    >>> row = {"status": "done", "events": 5000}
    >>> print(summary_table([row, {"status": "skipped", "events": 300}], 2.0))
    done         1 file      5,000 events
    skipped      1 file
    failed       0 files
    batch        2 files in 2.0 s, 2,500 events/s
    """
    t = totals(results, seconds)
    lines = [f"{'done':<11}{_files(t['done'])} {t['events']:>9,} events"]
    for status in STATUSES[1:]:
        if t[status] or status in ("skipped", "failed"):
            lines.append(f"{status:<11}{_files(t[status])}".rstrip())
    rate = f"{t['events_per_second']:,.0f}" if t["events_per_second"] is not None else "-"
    batch = _files(len(results)).rstrip()
    lines.append(f"{'batch':<11}{batch} in {seconds:.1f} s, {rate} events/s")
    return "\n".join(lines)


def is_report(path: pathlib.Path) -> bool:
    """True for a JSON report that :func:`write_report` wrote."""
    try:
        with open(path, "rb") as f:
            report = json.loads(f.read(64 * 2**20))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and set(report) == {"files", "totals"}


def check_report_path(report: pathlib.Path, inputs, overwrite: bool) -> None:
    """Before any work: ``--report FILE`` never replaces an input of the batch,
    nor, without --overwrite, an existing file that is not a report of ours."""
    if not report.absolute().parent.is_dir():
        raise FileNotFoundError(
            f"the folder of --report {str(report)!r} does not exist; create it first"
        )
    if not (report.exists() or report.is_symlink()):
        return
    if report.is_dir():
        raise IsADirectoryError(f"--report {str(report)!r} is a folder; give a file name")
    real = pathlib.Path(os.path.realpath(report))
    for given in inputs:
        folder = pathlib.Path(os.path.realpath(given))
        if real == folder or (real.suffix == ".rtdc" and folder in real.parents):
            raise ValueError(
                f"--report {str(report)!r} is an input of this run; give another file name"
            )
    if not overwrite and not is_report(report):
        raise FileExistsError(
            f"--report {str(report)!r} exists and is not a report of rollmed-dask; give "
            f"another file name, or pass --overwrite to replace it"
        )


def _files(n: int) -> str:
    """``"  1 file "`` or ``" 12 files"``: the count and the word, one width."""
    return f"{n:>3} file " if n == 1 else f"{n:>3} files"


def write_report(path, results: list[dict], seconds: float) -> None:
    """``--report FILE``: every file's summary and the totals, as JSON.

    Written beside the file and renamed over it: an interrupted write leaves
    the old report, never half a new one.
    """
    import secrets

    path = pathlib.Path(path)
    report = {"files": results, "totals": totals(results, seconds)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class InputsAndOutput(argparse.Action):
    """argparse action for ``INPUT... OUTPUT``: keeps every path in ``paths``
    and sets ``input``/``output`` (first and last) for the single-file form."""

    def __call__(self, parser, namespace, values, option_string=None):
        # a trailing slash says "a folder" (OUTPUT/ with OUTPUT missing), and
        # pathlib.Path drops it: read it from the strings as typed
        namespace.output_is_folder = len(values) > 1 and str(values[-1]).endswith(("/", os.sep))
        values = [pathlib.Path(value) for value in values]
        namespace.paths = values
        namespace.input = values[0] if values else None
        namespace.output = values[-1] if len(values) > 1 else None


def is_batch(args) -> bool:
    """Whether the command line asks for the many-inputs form (see FOLDER_RULES)."""
    paths = getattr(args, "paths", [])
    if args.recursive or len(paths) > 2:
        return True
    if len(paths) != 2:
        return False
    source, target = paths
    # a folder of TIFF frames is one stack, not many inputs
    folder_in = source.is_dir() and not is_zarr_store(source) and not is_frame_folder(source)
    folder_out = (
        not args.in_place
        and (target.is_dir() or getattr(args, "output_is_folder", False))
        and not is_zarr_store(target)
    )
    return folder_in or folder_out


def run_cli(args, options: dict) -> int:
    """``rollmed-dask INPUT... OUTPUT`` with several inputs or folders; ``options``
    are the job's keyword arguments (``cli.job_options``)."""
    paths = list(args.paths)
    if args.in_place and not args.recursive:
        raise ValueError(
            "--in-place with several inputs needs -r: rollmed-dask -r --in-place PATH... "
            "(every PATH is an input; there is no OUTPUT)"
        )
    if args.in_place:
        inputs, out_dir = paths, None
    else:
        if len(paths) < 2:
            raise ValueError(
                "name the output folder after the inputs (rollmed-dask -r IN... OUTDIR), "
                "or add the background to each input with --in-place"
            )
        inputs, out_dir = paths[:-1], paths[-1]
    if args.report is not None:
        check_report_path(args.report, inputs, args.overwrite)
    t0 = time.perf_counter()
    try:
        results = _compute_backgrounds(
            inputs=inputs,
            out_dir=out_dir,
            files_at_once=None,
            num_workers=None,
            lines=not args.quiet,
            recursive=args.recursive,
            pattern=args.pattern,
            **options,
        )
    except BatchInterrupted as stopped:
        from .cluster import _signals_deferred

        # the report is written whatever signal comes now
        with _signals_deferred(deliver=False):
            _finish(args, stopped.results, time.perf_counter() - t0)
        cause = stopped.cause if stopped.cause is not None else KeyboardInterrupt()
        cause.batch_results = stopped.results  # the CLI's line says what was kept
        raise cause from None
    _finish(args, results, time.perf_counter() - t0)
    return 1 if any(r["status"] == "failed" for r in results) else 0


def what_was_kept(results: list[dict], args) -> str:
    """The CLI's last line after a stopped folder run: what is where now."""
    count = {status: sum(r["status"] == status for r in results) for status in STATUSES}
    where = "in place" if args.in_place else f"in {args.paths[-1]}"
    said = [f"{count['done']} finished file(s) kept {where}"]
    if count["skipped"]:
        said.append(f"{count['skipped']} up to date left as they were")
    stopped = count["interrupted"] + count["not started"]
    if stopped:
        how = "their partial outputs kept for --resume" if args.resume else "nothing of them left"
        said.append(
            f"{stopped} interrupted or not started ({how}): run the same command again to do them"
        )
    return "; ".join(said)


def _finish(args, results, seconds) -> None:
    if not args.quiet:
        print(summary_table(results, seconds), file=sys.stderr)
    if args.report is not None:
        write_report(args.report, results, seconds)
