"""rollmed-dask: the exact rolling-median background of huge image stacks, out of core.

>>> import rollmed_dask
>>> sorted(rollmed_dask.__all__)
['BackgroundRollMed', 'BackgroundSummary', 'compute_background', 'compute_backgrounds', 'rolling_median', 'rolling_median_reference']

Importing the package is light: the compiled kernels, distributed and
dask-jobqueue are imported only where they are used.
"""  # noqa: E501

from .batch import compute_backgrounds
from .compat import BackgroundRollMed
from .core import rolling_median_reference
from .job import BackgroundSummary, compute_background
from .pipeline import rolling_median

__version__ = "0.1.0"

__all__ = [
    "BackgroundRollMed",
    "BackgroundSummary",
    "compute_background",
    "compute_backgrounds",
    "rolling_median",
    "rolling_median_reference",
]
