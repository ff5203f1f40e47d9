"""``python -m rollmed_dask``: the same as the ``rollmed-dask`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
