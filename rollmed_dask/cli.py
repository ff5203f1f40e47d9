"""``rollmed-dask``: the command line, a thin layer over ``compute_background``.

Every user mistake ends in one line on stderr and exit status 2, never a
traceback. Ctrl-C (SIGINT) ends with status 130 and SIGTERM (``scancel`` of a
batch job running the CLI, its walltime) with 143, on every scheduler, a folder
run included: temporary files are removed (a ``--resume`` Zarr partial kept),
SLURM jobs cancelled, and one line says what is where, as found on disk. A run
that failed (its workers lost, paused for memory, a SLURM job that ended before
its worker joined) ends with status 1.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import signal
import sys
import threading

from . import batch
from .cluster import RunStalled, SlurmError, SlurmSubmitError
from .compression import COMPRESSIONS, DEFAULT_COMPRESSION
from .core import ENGINES
from .job import FORMATS
from .pipeline import DEFAULT_MEMORY_BUDGET, MiB

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM

DESCRIPTION = """\
Compute the exact rolling-median background of an image stack, out of core with
dask, and write it to HDF5 (.rtdc) or Zarr.

  bg[j] = sorted(img[j:j+K])[K//2]   per pixel, for j < N-K;
  the last K events repeat bg[N-K-1]   (identical to dcnum's BackgroundRollMed)

The output goes to a hidden temporary beside OUTPUT and is moved into place only
when complete: an interrupted run never touches an existing file."""

EPILOG = """\
examples:
  rollmed-dask --example demo                    make a sample .rtdc in demo/ and process it
  rollmed-dask --example demo --example-events 20000 -k 500
                                                 a bigger sample, a longer window
  rollmed-dask data.rtdc data_bg.rtdc -k 100     new .rtdc with events/image_bg
  rollmed-dask data.rtdc data.rtdc --in-place    add events/image_bg to data.rtdc
  rollmed-dask data.rtdc bg.zarr --resume        Zarr output that can be resumed
  rollmed-dask -r raw/ bg/ -k 100                every .rtdc below raw/ -> bg/.../<name>_bg.rtdc
  rollmed-dask data.rtdc bg.rtdc --copy-images   a self-contained output (a copy of the images)
  rollmed-dask data.rtdc bg.rtdc -b rollmed -kb kernel_size=250 -kb batch_size=5000
                                                 ChipStream's spelling of -k 250 --batch-size 5000
  rollmed-dask data.rtdc bg.rtdc -b rollmed:k=250^b=5000
                                                 the same as a dcnum pipeline id
  rollmed-dask data.rtdc bg.rtdc --memory-budget 1GiB
                                                 longer blocks, more memory
  rollmed-dask data.rtdc bg.rtdc --scheduler processes
                                                 processes instead of threads
  rollmed-dask data.rtdc bg.rtdc --workers 4     on a local cluster of 4 processes
  rollmed-dask data.rtdc bg.rtdc --slurm --cores 8 --memory 16GB --jobs 4
                                                 on SLURM: 4 jobs of 8 cores

exit status: 0 done, 1 the run failed (a file of a folder run, lost or paused
workers, a SLURM job that ended), 2 a mistake (one line on stderr says what to
change), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, e.g. a walltime);
the last line says what was kept.

"""


DEFAULT_KERNEL_SIZE = 100
DEFAULT_BATCH_SIZE = 10000
DEFAULT_EXAMPLE_EVENTS = 3000


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line on stderr (not the whole usage), exit status 2,
    with a suggestion for a misspelt flag; an abbreviation of two spellings of one
    option (``--kernel`` for ``--kernel-size``/``--kernel_size``) is not ambiguous."""

    def error(self, message):
        hint = self._suggestion(message)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}{hint} (see {self.prog} --help)\n")

    def _suggestion(self, message: str) -> str:
        """``"; did you mean --overwrite?"`` for the unknown flags named in ``message``."""
        import difflib

        if not message.startswith("unrecognized arguments:"):
            return ""
        # one spelling per option, the first (--kernel-size, not --kernel_size)
        known = [
            next(o for o in action.option_strings if o.startswith("--"))
            for action in self._actions
            if any(o.startswith("--") for o in action.option_strings)
        ]
        hints = []
        for word in message.split(":", 1)[1].split():
            flag = word.split("=", 1)[0]
            if flag.startswith("--"):
                hints += difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        return f"; did you mean {' / '.join(dict.fromkeys(hints))}?" if hints else ""

    def _get_option_tuples(self, option_string):
        # one match per option: its spellings are the same option
        unique = {}
        for match in super()._get_option_tuples(option_string):
            unique.setdefault(id(match[0]), match)
        return list(unique.values())


def _whole_number(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None


def _size(value: str) -> str:
    """A memory size such as 256MiB, checked here and passed on as written."""
    from .pipeline import parse_bytes

    try:
        parse_bytes(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a size; give a positive number of bytes or a size such as "
            f"256MiB or 1GB"
        ) from None
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render ``--help`` in the docs)."""
    p = _Parser(
        prog="rollmed-dask",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # "-5MB" is a (bad) value, not an unknown option: let it reach the check of its option
    p._negative_number_matcher = re.compile(r"^-\.?\d")
    p.add_argument(
        "paths",
        nargs="*",
        action=batch.InputsAndOutput,  # makes them paths, and keeps a trailing slash's meaning
        metavar="PATH",
        help="INPUT... OUTPUT: the input .rtdc/HDF5 file, Zarr store or TIFF stack (a "
        "multi-page TIFF, or a folder or quoted glob of TIFF frames) (or several, or "
        "folders with -r: see 'many inputs'), then the output file, .rtdc/.h5 (HDF5) or "
        ".zarr (Zarr), or folder",
    )
    p.add_argument(
        "--example",
        metavar="DIR",
        type=pathlib.Path,
        help="write a synthetic sample DIR/example.rtdc and its background "
        "DIR/example_bg.rtdc (replaced if there); no data of yours needed, so no "
        "INPUT or OUTPUT",
    )
    p.add_argument(
        "--example-events",
        type=_whole_number,
        metavar="N",
        help=f"events in the --example sample (default: {DEFAULT_EXAMPLE_EVENTS})",
    )

    g = p.add_argument_group("the background")
    g.add_argument(
        "-k",
        "--kernel-size",
        "--kernel_size",
        dest="kernel_size",
        type=_whole_number,
        metavar="K",
        help=f"events per window, 1 <= K < N (default: {DEFAULT_KERNEL_SIZE})",
    )
    g.add_argument(
        "--batch-size",
        "--batch_size",
        dest="batch_size",
        type=_whole_number,
        metavar="B",
        help="recorded in the dcnum pipeline id rollmed:k=K^b=B; does not "
        f"change the result (default: {DEFAULT_BATCH_SIZE})",
    )
    g.add_argument(
        "-b",
        "--background-method",
        default="rollmed",
        metavar="METHOD",
        help="ChipStream/dcnum spelling: 'rollmed', or a dcnum pipeline id such as "
        "'rollmed:k=100^b=10000' (sets K and B; give each value only once)",
    )
    g.add_argument(
        "-kb",
        dest="background_kwargs",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ChipStream spelling of the method's arguments: -kb kernel_size=100 "
        "-kb batch_size=10000 (repeatable; k=, b= also work)",
    )
    g.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="per-block kernel, all bit-identical; numba: the old name of compiled "
        "(default: %(default)s)",
    )

    g = p.add_argument_group("input and output")
    g.add_argument(
        "--dataset", default="events/image", help="input dataset (default: %(default)s)"
    )
    g.add_argument(
        "--output-dataset", default="events/image_bg", help="output dataset (default: %(default)s)"
    )
    g.add_argument(
        "--series",
        type=_whole_number,
        metavar="N",
        help="TIFF input: the series (image) of the file to read (default: the first)",
    )
    g.add_argument(
        "--axis",
        metavar="NAME",
        help="TIFF input: the axis that holds the events, such as T of an OME-TIFF with "
        "T, Z and C (default: the one axis longer than 1); pick a plane of each other "
        "axis with --dataset, such as --dataset C=1",
    )
    g.add_argument(
        "--format",
        choices=FORMATS,
        help="output format (default: from the suffix, .zarr is Zarr, .tif/.tiff an OME-TIFF)",
    )
    g.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default=DEFAULT_COMPRESSION,
        metavar="NAME",
        help="output compression, as dcnum spells it: zstd-1 .. zstd-9, gzip-1 .. gzip-9, "
        "none; zstd is zstd-5 (dcnum's default), gzip is gzip-4 (default: %(default)s, "
        "as small and 3x faster than zstd-5 on backgrounds)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUTPUT once the new one is complete (a file, or a "
        "Zarr output of rollmed-dask: other folders are never replaced)",
    )
    g.add_argument(
        "--in-place",
        action="store_true",
        help="add the background to the existing HDF5 file OUTPUT (which may be "
        "INPUT itself): a copy beside it gets the background and replaces it when complete",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="Zarr: keep a partial output if the run stops, and continue it on "
        "the next --resume run",
    )
    g.add_argument(
        "--copy-images",
        action="store_true",
        help="a new .rtdc gets a copy of the input's images (self-contained, as large "
        "as the input) instead of a virtual dataset onto them (the input must stay "
        "where it is, or move together with the output)",
    )

    g = p.add_argument_group("many inputs", batch.FOLDER_RULES)
    g.add_argument(
        "-r",
        "--recursive",
        action="store_true",
        help="a folder INPUT stands for every .rtdc file below it",
    )
    g.add_argument(
        "--pattern",
        default="*.rtdc",
        metavar="GLOB",
        help="with -r, the files a folder stands for, such as '*.tif' for TIFF stacks "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--report",
        metavar="FILE",
        type=pathlib.Path,
        help="write the summary of every file as JSON to FILE",
    )

    g = p.add_argument_group("memory")
    g.add_argument(
        "--memory-budget",
        default=f"{DEFAULT_MEMORY_BUDGET // MiB}MiB",
        type=_size,
        metavar="BYTES",
        help="memory one task may use, e.g. 128MiB, 1GB; it sets the block length, and "
        "must hold 4 copies of 2K+1 frames (at most N): 20MiB for K=100 on 80x320 uint8 "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--event-chunk",
        type=_whole_number,
        metavar="L",
        help="events per block instead of the budget's choice, at least K, "
        "e.g. --event-chunk 2000",
    )

    g = p.add_argument_group("where it runs (default: threads on this machine)")
    g.add_argument(
        "--scheduler",
        metavar="NAME|ADDRESS",
        help="threads, processes, synchronous, or a distributed scheduler address tcp://host:port",
    )
    g.add_argument(
        "--workers",
        type=_whole_number,
        metavar="N",
        help="start a local distributed cluster of N worker processes",
    )
    g.add_argument(
        "--slurm",
        action="store_true",
        help="start workers as SLURM jobs with dask-jobqueue ([hpc] extra)",
    )
    g.add_argument(
        "--lost-worker-timeout",
        type=float,
        metavar="SECONDS",
        help="distributed runs (--workers, --scheduler ADDRESS, --slurm): stop when no "
        "block finishes for this long while the workers are paused for memory, lost or "
        "unreachable; at once when SLURM says their jobs ended (default: 60)",
    )
    g = p.add_argument_group(
        "SLURM jobs (--slurm)",
        # line breaks of our own: the formatter keeps descriptions as written
        "Options not given here come from your dask-jobqueue configuration,\n"
        "jobqueue.slurm in ~/.config/dask/jobqueue.yaml (or in the folder DASK_CONFIG\n"
        "names); cores and memory must be set in one of the two.",
    )
    g.add_argument("--queue", help="SLURM partition (default: config, else SLURM's default)")
    g.add_argument("--cores", type=int, help="cores per job (default: config)")
    g.add_argument("--memory", help="memory per job, e.g. 8GB (default: config)")
    g.add_argument(
        "--walltime",
        metavar="HH:MM:SS",
        help="time limit per job (default: config; dask-jobqueue ships 00:30:00)",
    )
    g.add_argument("--processes", type=int, help="dask worker processes per job (default: config)")
    g.add_argument("--jobs", type=int, help="SLURM jobs to start (default: 1)")
    g.add_argument(
        "--job-extra",
        action="append",
        default=[],
        metavar="DIRECTIVE",
        help="extra #SBATCH directive, e.g. --job-extra=--account=abc (repeatable; "
        "added to the config's job-extra-directives)",
    )
    g.add_argument(
        "--scheduler-host",
        metavar="HOST",
        help="address the SLURM workers use to reach the scheduler (default: config)",
    )
    g.add_argument(
        "--log-dir",
        type=pathlib.Path,
        metavar="DIR",
        help="folder for the jobs' logs (default: config, else a temporary folder "
        "that is removed unless the run fails)",
    )
    g.add_argument(
        "--worker-wait",
        type=float,
        metavar="SECONDS",
        help="how long to wait for the first worker while its job pends in the queue, "
        "with a line each minute (default: 3600)",
    )

    g = p.add_argument_group("output on the terminal")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    return p


class UsageError(ValueError):
    """A command-line mistake that argparse cannot see."""


# dcnum abbreviates the keyword arguments in its pipeline ids
_BACKGROUND_KWARGS = {
    "kernel_size": "kernel_size",
    "k": "kernel_size",
    "batch_size": "batch_size",
    "b": "batch_size",
}


def _apply_dcnum_spelling(args) -> None:
    """Fold ``-b rollmed[:k=K^b=B]`` and ``-kb KEY=VALUE`` into ``-k`` and ``--batch-size``.

    Each value may be given in any spelling, but only once: two spellings with
    different values (``-k 50 -kb kernel_size=250``) are an error naming both.
    """
    method, _, ppid_kwargs = args.background_method.partition(":")
    if method != "rollmed":
        raise UsageError(
            f"background method {method!r} is not computed here; rollmed-dask computes "
            f"'rollmed' (the rolling median); use dcnum or ChipStream for {method!r}"
        )
    # for each value, every (spelling, value) the command line gives
    given = {"kernel_size": [], "batch_size": []}
    if args.kernel_size is not None:
        given["kernel_size"].append((f"-k {args.kernel_size}", args.kernel_size))
    if args.batch_size is not None:
        given["batch_size"].append((f"--batch-size {args.batch_size}", args.batch_size))
    spelled = [(p, f"-b {args.background_method}") for p in ppid_kwargs.split("^") if p]
    spelled += [(p, f"-kb {p}") for p in args.background_kwargs]
    for pair, spelling in spelled:
        key, sep, value = pair.partition("=")
        if not sep or key.strip() not in _BACKGROUND_KWARGS:
            raise UsageError(
                f"background argument {pair!r} is not understood; use kernel_size=K or "
                f"batch_size=B (or k=K, b=B)"
            )
        try:
            number = int(value)
        except ValueError:
            raise UsageError(f"background argument {pair!r} needs an integer value") from None
        given[_BACKGROUND_KWARGS[key.strip()]].append((spelling, number))
    defaults = {"kernel_size": DEFAULT_KERNEL_SIZE, "batch_size": DEFAULT_BATCH_SIZE}
    for name, values in given.items():
        first_spelling, first = values[0] if values else (None, defaults[name])
        for spelling, value in values[1:]:
            if value != first:
                raise UsageError(
                    f"{first_spelling} and {spelling} give two different "
                    f"{name.replace('_', ' ')}s; give it once"
                )
        setattr(args, name, first)


def _check_args(args, parser) -> None:
    _apply_dcnum_spelling(args)
    if args.example is not None:
        paths = [str(p) for p in (args.input, args.output) if p is not None]
        if paths:
            raise UsageError(
                f"--example {args.example} makes its own input and output in "
                f"{str(args.example)!r}, so {', '.join(map(repr, paths))} would not be used: "
                f"drop {'them' if len(paths) > 1 else 'it'}, or drop --example to process "
                f"your own file"
            )
    elif args.input is None or (args.output is None and not args.recursive):
        parser.error("INPUT and OUTPUT are required, or --example DIR")
    elif args.example_events is not None:
        raise UsageError(
            "--example-events sets the size of the --example sample; add --example DIR"
        )
    if args.example_events is None:
        args.example_events = DEFAULT_EXAMPLE_EVENTS
    chosen = [
        name
        for name, on in (
            ("--scheduler", args.scheduler),
            ("--workers", args.workers),
            ("--slurm", args.slurm),
        )
        if on
    ]
    if len(chosen) > 1:
        raise UsageError(f"choose one of {' / '.join(chosen)}, not several")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers {args.workers} must be at least 1")


# option of the CLI -> keyword of start_slurm_cluster; passed only when given, so
# that the user's dask-jobqueue configuration decides the rest
_SLURM_OPTIONS = {
    "queue": "queue",
    "cores": "cores",
    "memory": "memory",
    "walltime": "walltime",
    "processes": "processes",
    "jobs": "jobs",
    "job_extra": "job_extra",
    "scheduler_host": "scheduler_host",
    "log_dir": "log_directory",
    "worker_wait": "timeout",
}


def _start_cluster(args):
    """None, or for --workers / --slurm a function that starts the cluster and
    returns its Client.

    ``compute_background`` calls the function only once the input, the output
    and its options have passed its checks, so a run that cannot succeed
    submits no SLURM job; it closes the cluster (cancelling the jobs) at the end.
    """
    from . import cluster

    options = [o for o in _SLURM_OPTIONS if getattr(args, o) not in (None, [])]
    given = {_SLURM_OPTIONS[o]: getattr(args, o) for o in options}
    if given and not args.slurm:
        flags = ", ".join("--" + o.replace("_", "-") for o in options)
        raise UsageError(f"{flags}: SLURM options; add --slurm, or drop them")
    for keyword in ("cores", "processes", "jobs"):
        if keyword in given and given[keyword] < 1:
            raise UsageError(f"--{keyword} {given[keyword]} must be at least 1")
    for flag, value in (("--lost-worker-timeout", args.lost_worker_timeout),
                        ("--worker-wait", args.worker_wait)):  # fmt: skip
        if value is not None and not value > 0:
            raise UsageError(f"{flag} {value:g} must be > 0")
    if args.lost_worker_timeout is not None:
        if not (args.slurm or args.workers or "://" in (args.scheduler or "")):
            raise UsageError(
                "--lost-worker-timeout is for distributed runs: add --workers N, "
                "--scheduler ADDRESS or --slurm, or drop it"
            )
        import dask

        # every distributed route reads it (cluster.run_watch); SLURM's own too
        dask.config.set({"rollmed-dask.lost-worker-timeout": args.lost_worker_timeout})
        if args.slurm:
            given["lost_worker_timeout"] = args.lost_worker_timeout
    if "log_directory" in given:
        if given["log_directory"].exists() and not given["log_directory"].is_dir():
            raise UsageError(
                f"--log-dir {given['log_directory']} is a file, not a folder; name a folder "
                "for the jobs' logs (it is created if missing)"
            )
        given["log_directory"] = str(given["log_directory"])

    if args.workers is not None:
        workers, why = cluster.local_worker_bound(args.workers, args.memory_budget)
        if why:
            print(f"rollmed-dask: --workers {args.workers} lowered to {workers}: {why}",
                  file=sys.stderr)  # fmt: skip

        def start():
            return cluster.start_local_cluster(workers)

        worker_memory = cluster.local_worker_memory(workers)
        spelled = f"--workers {workers}"
    elif args.slurm:

        def start():
            if not args.quiet:
                given.setdefault("on_wait", lambda line: print(f"rollmed-dask: {line}",
                                                               file=sys.stderr))  # fmt: skip
            return cluster.start_slurm_cluster(**given)

        worker_memory, spelled = cluster.slurm_worker_memory(given)
    else:
        return None

    def start_and_show():
        client = start()
        if not args.quiet:
            print(f"dashboard: {client.dashboard_link}", file=sys.stderr)
        return client

    # read by the job's checks, before the cluster starts (job._check_plan)
    start_and_show.worker_memory = worker_memory
    start_and_show.worker_memory_spelled = spelled
    return start_and_show


def job_options(args, scheduler) -> dict:
    """The keyword arguments of one file's job, as the command line gives them:
    the same for ``compute_background`` and for every file of a batch."""
    return dict(
        kernel_size=args.kernel_size,
        dataset=_dataset(args),
        output_dataset=args.output_dataset,
        format=args.format,
        compression=args.compression,
        engine=args.engine,
        scheduler=scheduler,
        progress=not args.quiet,
        overwrite=args.overwrite,
        resume=args.resume,
        in_place=args.in_place,
        copy_images=args.copy_images,
        memory_budget=args.memory_budget,
        event_chunk=args.event_chunk,
        batch_size=args.batch_size,
    )


def _dataset(args) -> str:
    """``--dataset``, with a TIFF input's ``--series`` and ``--axis`` folded in
    (``series=1,axis=T,C=0``: see :mod:`rollmed_dask.tiff`)."""
    if args.series is None and args.axis is None:
        return args.dataset
    from .tiff import DEFAULT_DATASET

    parts = [] if args.dataset == DEFAULT_DATASET else [args.dataset]
    parts += [] if args.series is None else [f"series={args.series}"]
    parts += [] if args.axis is None else [f"axis={args.axis}"]
    return ",".join(parts)


def _run(args) -> int:
    from .job import compute_background

    if args.example is not None:
        from .example import write_example

        args.example.mkdir(parents=True, exist_ok=True)
        args.input = write_example(args.example / "example.rtdc", n_events=args.example_events)
        args.output = args.example / "example_bg.rtdc"
        args.overwrite = True
        if not args.quiet:
            print(f"wrote the sample {args.input}", file=sys.stderr)
    options = job_options(args, scheduler=_start_cluster(args) or args.scheduler)
    if batch.is_batch(args):
        return batch.run_cli(args, options)
    summary = compute_background(args.input, args.output, **options)
    if not args.quiet:
        print(summary.one_line(), file=sys.stderr)
    return 0


# What a user can cause; anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ValueError,
    KeyError,
    OSError,
    ImportError,
    TimeoutError,
    NotImplementedError,
    SlurmError,
)


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that the cleanup of an
    interrupted run happens (the default action would end the process at once,
    leaving a partial output behind). A BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` on the way swallows it."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _disk_state(path):
    """What is at ``path`` now (its inode and times), or None: a move into place
    puts another inode there."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def _what_was_kept(args, before, exc: BaseException) -> str:
    """What an interrupted or failed run left, in a few words, as the disk shows
    it now (a signal may come after the new output was moved into place)."""
    from .sinks import backup_path, partial_path

    results = getattr(exc, "batch_results", None)
    if results is not None:
        return batch.what_was_kept(results, args)
    # the job marks the exception when it kept a resumable partial output
    partial = getattr(exc, "partial_kept", None)
    if partial is not None:
        return (
            f"the partial output {partial} is kept: run the same command again, "
            f"with --resume, to continue"
        )
    if args.output is None:
        return "no output was written"
    if args.resume and partial_path(args.output).exists():
        return (
            f"the partial output {partial_path(args.output)} is kept: run the same "
            f"command again, with --resume, to continue"
        )
    now = _disk_state(args.output)
    if now is None:
        old = backup_path(args.output)
        if before is not None and old.exists():
            return f"{args.output} is missing; its old output is {old}, put back by the next run"
        return f"no output was written to {args.output}"
    if now == before:
        return f"{args.output} was left as it was"
    return f"{args.output} holds the new, complete output (it was moved into place)"


def main(argv=None) -> int:
    """Entry point of ``rollmed-dask`` and ``python -m rollmed_dask``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    before = _disk_state(args.output)
    # the program itself (not a caller's main([...])): once the run has stopped
    # for a signal, another Ctrl-C only cut short the exit (status -2, no line)
    ending = argv is None and in_main_thread
    try:
        _check_args(args, parser)
        return _run(args)
    except KeyboardInterrupt as exc:
        if ending:
            _ignore_signals()
        print(f"rollmed-dask: interrupted; {_what_was_kept(args, before, exc)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as exc:
        if ending:
            _ignore_signals()
        print(f"rollmed-dask: terminated; {_what_was_kept(args, before, exc)}", file=sys.stderr)
        return EXIT_TERMINATED
    except (RunStalled, SlurmError) as exc:
        # a failed run, not a mistake; sbatch refusing what was asked is one
        kept = _what_was_kept(args, before, exc)
        print(f"rollmed-dask: error: {_cli_message(exc)}; {kept}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, SlurmSubmitError) else EXIT_FAILED
    except USER_ERRORS as exc:
        print(f"rollmed-dask: error: {_cli_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if in_main_thread and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
            signal.signal(signal.SIGTERM, previous)


def _ignore_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


# Python spellings in messages from the library, and the CLI's flags for them
_FLAGS = {
    "event_chunk": "--event-chunk",
    "kernel_size": "-k",
    "memory_budget": "--memory-budget",
    "scheduler_host": "--scheduler-host",
}


def _cli_message(exc) -> str:
    """The error's message on one line; one that names an API option names the
    CLI flag instead (``event_chunk=50`` -> ``--event-chunk 50``)."""
    template = getattr(exc, "template", None)
    if template is not None:
        message = template.replace("{option}", "--" + exc.option.replace("_", "-"))
    else:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, UsageError):  # the CLI's own words, spelled as the user typed them
        return " ".join(str(message).split())
    names = "|".join(_FLAGS)
    message = re.sub(rf"\b({names})=", lambda m: _FLAGS[m[1]] + " ", str(message))
    message = re.sub(rf"\b({names})\b", lambda m: _FLAGS[m[1]], message)
    return " ".join(message.split())


if __name__ == "__main__":
    sys.exit(main())
