"""Run the rollmed-dask CLI as the unprivileged user ``nobody``.

Tests run as root in CI, and root may write anywhere, so a "no write
permission" case needs another user. ``nobody`` cannot read the interpreter's
installation under /root, so everything the CLI needs is imported first, as
root, and only then are the privileges dropped.

Usage: python tests/cli_as_nobody.py ARGS...   (must be started as root)
"""

import os
import sys

import dask.array  # noqa: F401
import h5py  # noqa: F401
import hdf5plugin  # noqa: F401
import zarr  # noqa: F401

from rollmed_dask import cli, job, sinks, sources  # noqa: F401

NOBODY = 65534
# ROLLMED_AS_NOBODY_WARM=1: run a small job of each format first, as root, so
# that a job that gets as far as computing finds every module already loaded
WARM_ENV = "ROLLMED_AS_NOBODY_WARM"


def warm_up() -> None:
    import tempfile

    from rollmed_dask import compute_background
    from rollmed_dask.example import write_example

    with tempfile.TemporaryDirectory() as folder:
        source = write_example(os.path.join(folder, "w.rtdc"), n_events=60)
        for name in ("w_bg.rtdc", "w_bg.zarr"):
            compute_background(source, os.path.join(folder, name), 5, progress=False)


if __name__ == "__main__":
    if os.environ.get(WARM_ENV):
        warm_up()
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    sys.exit(cli.main(sys.argv[1:]))
