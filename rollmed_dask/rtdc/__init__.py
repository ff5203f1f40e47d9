"""Conventions of the ``.rtdc`` (RT-DC HDF5) format used by the output writer.

This package re-implements the few pieces of dcnum 0.31 / dclab that an
``image_bg`` writer needs, so that dcnum is not a runtime dependency:

- how image datasets are created (chunks, filters, HDF5 image attributes),
- the background pipeline identifier dcnum stores next to ``image_bg``,
- how a new output file inherits the input's metadata, logs and tables and
  gets a *file basin* pointing at the input (dcnum ``create_with_basins``),
- how logs are stored (fixed-length byte strings, dcnum ``store_log``),
- where the images of an input file really live (the file itself, a file
  basin, a mapped basin or an internal basin).

Three modules, all public names importable from ``rollmed_dask.rtdc``:
``format`` (datasets, filters, pipeline identifiers; one function creates every
per-event dataset), ``basins`` (metadata, basins, identifiers, where the images
are) and ``logs``. Everything here is small, synchronous and independent of
dask and of the median kernels. The test suite compares the output of these
functions with what dcnum 0.31 writes for the same input.

Examples
--------
.. code-block:: python

    import h5py, rollmed_dask.example as ex, rollmed_dask.rtdc as rtdc
    src = ex.write_example("in.rtdc", n_events=100)
    with h5py.File("out.rtdc", "w", libver="latest") as h5:
        rtdc.prepare_output_file(h5, src)
        ds = rtdc.create_image_dataset(h5["events"], "image_bg", 100, (80, 320),
                                       "uint8")
        ds.attrs.update(rtdc.bg_ppid_attrs(kernel_size=10, batch_size=50))
"""

from __future__ import annotations

from .basins import (
    FRAME_FEATURES,
    IgnoredBasinWarning,
    ImageCopy,
    ImageLocation,
    add_pipeline_inputs,
    basin_identifier,
    basin_json,
    copy_file_basins,
    copy_metadata,
    find_image_dataset,
    is_rtdc_file,
    link_images,
    measurement_identifier,
    prepare_output_file,
    store_file_basin,
)
from .format import (
    DCNUM_PPID_GENERATION,
    IMAGE_ATTRS,
    PIPELINE_BACKGROUND_ATTRS,
    PIPELINE_SEGMENTATION_ATTRS,
    bg_ppid,
    bg_ppid_attrs,
    create_image_dataset,
    data_ppid,
    default_chunk_events,
    filter_kwargs,
    software_string,
    write_pipeline_attrs,
)
from .logs import (
    run_log_lines,
    run_log_name,
    write_log,
)

__all__ = [
    "DCNUM_PPID_GENERATION",
    "FRAME_FEATURES",
    "IMAGE_ATTRS",
    "PIPELINE_BACKGROUND_ATTRS",
    "PIPELINE_SEGMENTATION_ATTRS",
    "IgnoredBasinWarning",
    "ImageCopy",
    "ImageLocation",
    "add_pipeline_inputs",
    "basin_identifier",
    "basin_json",
    "bg_ppid",
    "bg_ppid_attrs",
    "copy_file_basins",
    "copy_metadata",
    "create_image_dataset",
    "data_ppid",
    "default_chunk_events",
    "filter_kwargs",
    "find_image_dataset",
    "is_rtdc_file",
    "link_images",
    "measurement_identifier",
    "prepare_output_file",
    "run_log_lines",
    "run_log_name",
    "software_string",
    "store_file_basin",
    "write_log",
    "write_pipeline_attrs",
]
