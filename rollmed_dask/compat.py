"""``BackgroundRollMed``: dcnum's signature and file, our engine.

A dcnum user changes one import::

    from dcnum.feat.feat_background.bg_roll_median import BackgroundRollMed
    from rollmed_dask import BackgroundRollMed        # same arguments, same file

Differences, all deliberate: any kernel size 1 <= K < N (dcnum asserts an even
one); the input dtype is kept (dcnum casts to uint8); bad input raises a
``ValueError``/``KeyError``/``FileNotFoundError`` saying what to change (dcnum
asserts, or deletes an old ``image_bg`` and then fails); and an existing
``image_bg`` is replaced only once the new one is complete.
"""

from __future__ import annotations

import os
import pathlib

from . import rtdc
from .core import check_count, check_kernel_size
from .sources import as_source


class BackgroundRollMed:
    """Rolling-median background, a drop-in for dcnum's ``BackgroundRollMed``.

    Parameters
    ----------
    input_data : path or array-like
        An ``.rtdc``/HDF5 file with ``events/image``, or an image stack (N, H, W).
    output_path : path
        The output ``.rtdc`` file. If it is the input file, ``events/image_bg``
        is added to it; if it is another existing HDF5 file, it is added there;
        otherwise a new ``.rtdc`` file is made with the input's metadata and a
        basin pointing at the input.
    kernel_size : int
        Events per window, ``1 <= kernel_size < N``.
    batch_size : int
        Kept for dcnum compatibility and recorded in the pipeline id; the
        result does not depend on it. Memory is governed by the block planner.
    compress : bool
        zstd level 5 (as dcnum) or no compression.
    num_cpus : int, optional
        Worker threads; all cores by default.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> img = np.random.default_rng(0).integers(0, 255, (200, 8, 16), dtype=np.uint8)
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "bg.rtdc"
    >>> with BackgroundRollMed(img, out, kernel_size=10, batch_size=50) as bic:
    ...     bic.process()
    >>> bic.get_progress()
    1.0
    """

    def __init__(
        self,
        input_data,
        output_path,
        kernel_size=100,
        batch_size=10000,
        compress=True,
        num_cpus=None,
    ):
        self.check_user_kwargs(kernel_size=kernel_size, batch_size=batch_size)
        if isinstance(input_data, str | os.PathLike):
            input_data = pathlib.Path(input_data)
        self.input_data = input_data
        self.output_path = pathlib.Path(output_path)
        self.source = as_source(input_data)
        self.image_count = self.source.shape[0]
        self.image_shape = self.source.shape[1:]
        self.kernel_size = check_kernel_size(kernel_size, self.image_count)
        self.batch_size = int(batch_size)
        self.compress = bool(compress)
        self.num_cpus = num_cpus
        self.kwargs = {"kernel_size": self.kernel_size, "batch_size": self.batch_size}
        self.summary = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return False

    @staticmethod
    def check_user_kwargs(*, kernel_size: int = 100, batch_size: int = 10000) -> None:
        """Check the background keyword arguments, as dcnum's method of that name.

        Raises
        ------
        ValueError
            For a non-integer or non-positive ``kernel_size`` or ``batch_size``.
        """
        check_kernel_size(kernel_size)  # and against N once the input is open
        check_count("batch_size", batch_size, example=10000)

    def get_ppid(self) -> str:
        """The dcnum pipeline id of this background, e.g. ``rollmed:k=100^b=10000``."""
        return rtdc.bg_ppid_attrs(self.kernel_size, self.batch_size)["dcnum ppid background"]

    def get_progress(self) -> float:
        """Fraction of the events done: 0 before ``process()``, 1 after."""
        return 1.0 if self.summary is not None else 0.0

    def process(self) -> None:
        """Compute the background and write ``events/image_bg`` to ``output_path``."""
        from .job import compute_background

        add_to_existing = self.output_path.exists()
        self.summary = compute_background(
            self.source,
            self.output_path,
            self.kernel_size,
            compression="zstd" if self.compress else "none",
            scheduler="threads",
            num_workers=self.num_cpus,
            progress=False,
            overwrite=True,
            in_place=add_to_existing,
            batch_size=self.batch_size,
        )
