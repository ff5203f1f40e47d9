"""``rollmed-dask``: the command line, a thin layer over ``compute_background``.

Every user mistake ends in one line on stderr and exit status 2, never a
traceback; Ctrl-C ends with status 130 and leaves existing files as they were.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from .cluster import SlurmError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

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
  rollmed-dask data.rtdc data_bg.rtdc -k 100     new .rtdc with events/image_bg
  rollmed-dask data.rtdc data.rtdc --in-place    add events/image_bg to data.rtdc
  rollmed-dask data.rtdc bg.zarr --resume        Zarr output that can be resumed
  rollmed-dask data.rtdc bg.rtdc -b rollmed -kb kernel_size=250 -kb batch_size=5000
                                                 ChipStream's spelling of the same job
  rollmed-dask data.rtdc bg.rtdc --workers 4     on a local cluster of 4 processes
  rollmed-dask data.rtdc bg.rtdc --slurm --cores 8 --memory 16GB --jobs 4
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render ``--help`` in the docs)."""
    p = argparse.ArgumentParser(
        prog="rollmed-dask",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input", nargs="?", type=pathlib.Path, help="input .rtdc/HDF5 file or Zarr store"
    )
    p.add_argument(
        "output",
        nargs="?",
        type=pathlib.Path,
        help="output file: .rtdc/.h5 (HDF5) or .zarr (Zarr)",
    )
    p.add_argument(
        "--example",
        metavar="DIR",
        type=pathlib.Path,
        help="write a synthetic sample .rtdc into DIR and process it; no data of yours needed",
    )
    p.add_argument(
        "--example-events",
        type=int,
        default=3000,
        metavar="N",
        help="events in the --example sample (default: %(default)s)",
    )

    g = p.add_argument_group("the background")
    g.add_argument(
        "-k",
        "--kernel-size",
        "--kernel_size",
        dest="kernel_size",
        type=int,
        default=100,
        metavar="K",
        help="events per window, 1 <= K < N (default: %(default)s)",
    )
    g.add_argument(
        "--batch-size",
        "--batch_size",
        dest="batch_size",
        type=int,
        default=10000,
        metavar="B",
        help="recorded in the dcnum pipeline id rollmed:k=K^b=B; does not "
        "change the result (default: %(default)s)",
    )
    g.add_argument(
        "-b",
        "--background-method",
        default="rollmed",
        metavar="METHOD",
        help="ChipStream/dcnum spelling: 'rollmed', or a dcnum pipeline id such as "
        "'rollmed:k=100^b=10000' (sets -k and --batch-size)",
    )
    g.add_argument(
        "-kb",
        dest="background_kwargs",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ChipStream spelling of the method's arguments: -kb kernel_size=100 "
        "-kb batch_size=10000 (repeatable)",
    )
    g.add_argument(
        "--engine",
        choices=("auto", "numba", "scipy", "numpy"),
        default="auto",
        help="per-block kernel, all bit-identical (default: %(default)s)",
    )

    g = p.add_argument_group("input and output")
    g.add_argument(
        "--dataset", default="events/image", help="input dataset (default: %(default)s)"
    )
    g.add_argument(
        "--output-dataset", default="events/image_bg", help="output dataset (default: %(default)s)"
    )
    g.add_argument(
        "--format",
        choices=("hdf5", "zarr"),
        help="output format (default: from the suffix, .zarr is Zarr)",
    )
    g.add_argument(
        "--compression",
        choices=("zstd", "gzip", "none"),
        default="zstd",
        help="output compression; zstd level 5 is what dcnum writes (default: %(default)s)",
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

    g = p.add_argument_group("memory")
    g.add_argument(
        "--memory-budget",
        default="256MiB",
        metavar="BYTES",
        help="memory one task may use, e.g. 128MiB, 1GB (default: %(default)s)",
    )
    g.add_argument(
        "--event-chunk",
        type=int,
        metavar="L",
        help="events per block instead of the budget's choice (at least K)",
    )

    g = p.add_argument_group("where it runs (default: threads on this machine)")
    g.add_argument(
        "--scheduler",
        metavar="NAME|ADDRESS",
        help="threads, processes, synchronous, or a distributed scheduler address tcp://host:port",
    )
    g.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="start a local distributed cluster of N worker processes",
    )
    g.add_argument(
        "--slurm",
        action="store_true",
        help="start workers as SLURM jobs with dask-jobqueue ([hpc] extra)",
    )
    g.add_argument("--queue", help="SLURM partition (default: your dask-jobqueue config)")
    g.add_argument("--cores", type=int, default=1, help="cores per SLURM job (default: 1)")
    g.add_argument("--memory", default="4GB", help="memory per SLURM job (default: 4GB)")
    g.add_argument(
        "--walltime", default="01:00:00", help="walltime per SLURM job (default: 01:00:00)"
    )
    g.add_argument("--jobs", type=int, default=1, help="SLURM jobs to start (default: 1)")
    g.add_argument(
        "--job-extra",
        action="append",
        default=[],
        metavar="DIRECTIVE",
        help="extra #SBATCH directive, e.g. --job-extra=--account=abc (repeatable)",
    )
    g.add_argument(
        "--scheduler-host",
        metavar="HOST",
        help="address the SLURM workers use to reach the scheduler",
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
    """Fold ``-b rollmed[:k=K^b=B]`` and ``-kb KEY=VALUE`` into the plain options."""
    method, _, ppid_kwargs = args.background_method.partition(":")
    if method != "rollmed":
        raise UsageError(
            f"background method {method!r} is not computed here; rollmed-dask computes "
            f"'rollmed' (the rolling median); use dcnum or ChipStream for {method!r}"
        )
    pairs = [p for p in ppid_kwargs.split("^") if p] + list(args.background_kwargs)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key.strip() not in _BACKGROUND_KWARGS:
            raise UsageError(
                f"background argument {pair!r} is not understood; use kernel_size=K or "
                f"batch_size=B (or k=K, b=B)"
            )
        try:
            setattr(args, _BACKGROUND_KWARGS[key.strip()], int(value))
        except ValueError:
            raise UsageError(f"background argument {pair!r} needs an integer value") from None


def _check_args(args, parser) -> None:
    _apply_dcnum_spelling(args)
    if args.example is not None:
        return
    if args.input is None or args.output is None:
        parser.error("INPUT and OUTPUT are required (or use --example DIR)")
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


def _start_cluster(args):
    """A Client for --workers / --slurm, or None; the caller closes it."""
    from . import cluster

    if args.workers is not None:
        return cluster.start_local_cluster(args.workers)
    if args.slurm:
        return cluster.start_slurm_cluster(
            queue=args.queue,
            cores=args.cores,
            memory=args.memory,
            walltime=args.walltime,
            jobs=args.jobs,
            job_extra=args.job_extra,
            scheduler_host=args.scheduler_host,
        )
    return None


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
    client = _start_cluster(args)
    try:
        if client is not None and not args.quiet:
            print(f"dashboard: {client.dashboard_link}", file=sys.stderr)
        summary = compute_background(
            args.input,
            args.output,
            args.kernel_size,
            dataset=args.dataset,
            output_dataset=args.output_dataset,
            format=args.format,
            compression=args.compression,
            engine=args.engine,
            scheduler=client if client is not None else args.scheduler,
            progress=not args.quiet,
            overwrite=args.overwrite,
            resume=args.resume,
            in_place=args.in_place,
            memory_budget=args.memory_budget,
            event_chunk=args.event_chunk,
            batch_size=args.batch_size,
        )
    finally:
        if client is not None:
            from .cluster import close_client

            close_client(client)
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


def main(argv=None) -> int:
    """Entry point of ``rollmed-dask`` and ``python -m rollmed_dask``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_args(args, parser)
        return _run(args)
    except KeyboardInterrupt as exc:
        print(f"rollmed-dask: interrupted; {_kept(exc)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        print(f"rollmed-dask: error: {_cli_message(exc)}", file=sys.stderr)
        return EXIT_USAGE


def _kept(exc) -> str:
    partial = getattr(exc, "partial_kept", None)
    if partial is None:
        return "existing files were left as they were"
    return f"the partial Zarr output {partial!r} was kept: rerun with --resume to continue it"


def _cli_message(exc) -> str:
    """The error's message; one that names an API option names the CLI flag instead."""
    template = getattr(exc, "template", None)
    if template is not None:
        return template.replace("{option}", "--" + exc.option.replace("_", "-"))
    return exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)


if __name__ == "__main__":
    sys.exit(main())
