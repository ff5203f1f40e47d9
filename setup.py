"""Builds the compiled kernels, rollmed_dask/_kernels.c; everything else is in pyproject.toml.

One C file, built through setuptools' standard PEP 517 backend: no numpy headers
(buffers arrive through the buffer protocol), no Cython, no build tool beyond a C
compiler, and an editable install is built once by pip, never at import.
"""

import sys

from setuptools import Extension, setup

# -O3: the count loop of the sorted windows vectorises (gcc's -O2 cost model does not).
flags = [] if sys.platform == "win32" else ["-O3"]

setup(ext_modules=[Extension("rollmed_dask._kernels", ["rollmed_dask/_kernels.c"],
                             extra_compile_args=flags)])  # fmt: skip
