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

if __name__ == "__main__":
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    sys.exit(cli.main(sys.argv[1:]))
