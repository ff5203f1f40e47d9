"""Two failed runs in one process: first without resume, then with resume.

Used by test_safety.py: the resumable partial of the second run must survive
the interpreter's exit.
"""

import sys

import dask.array as da
import numpy as np

from rollmed_dask import compute_background


def _fail(block):
    raise RuntimeError("this block fails on purpose")


def failing_stack():
    images = da.zeros((200, 8, 8), dtype=np.uint8, chunks=(50, 8, 8))
    return images.map_blocks(_fail, dtype=np.uint8)


if __name__ == "__main__":
    out = sys.argv[1]
    for resume in (False, True):
        try:
            compute_background(failing_stack(), out, 5, resume=resume, progress=False)
        except RuntimeError:
            pass
