"""Shared fixtures: small real .rtdc files, and readers for what the tool wrote."""

import pathlib
import shutil

import h5py
import numpy as np
import pytest

from rollmed_dask.example import write_example


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("examples")


@pytest.fixture(scope="session")
def small_rtdc(example_dir) -> pathlib.Path:
    """300 events of 80x320 uint8, stored as dcnum stores them (zstd-5, fletcher32)."""
    return write_example(example_dir / "small.rtdc", n_events=300, seed=1)


@pytest.fixture
def rtdc_copy(small_rtdc, tmp_path) -> pathlib.Path:
    """A private copy of ``small_rtdc`` that a test may modify."""
    return pathlib.Path(shutil.copy(small_rtdc, tmp_path / "input.rtdc"))


def read_images(path, dataset="events/image") -> np.ndarray:
    """The whole dataset of an HDF5 file or a Zarr store, as numpy."""
    path = pathlib.Path(path)
    if path.is_dir():
        import zarr

        return zarr.open_group(str(path), mode="r")[dataset][:]
    with h5py.File(path, "r") as h5:
        return h5[dataset][:]
