"""Every .rtdc we write, opened with dclab itself: ``image`` (through the basin),
``image_bg``, the input's metadata and our log; and inputs whose images live in
a file basin or a mapped basin.
"""

import dclab
import h5py
import numpy as np
from conftest import read_images
from dcnum.read import HDF5Data

from rollmed_dask import BackgroundRollMed, compute_background, rolling_median_reference
from rollmed_dask.rtdc import measurement_identifier, store_file_basin


def check_with_dclab(path, source, kernel_size):
    """dclab sees image and image_bg with the right values, the metadata and our log."""
    images = read_images(source)
    with dclab.new_dataset(path) as ds, dclab.new_dataset(source) as ds_in:
        assert "image" in ds.features and "image_bg" in ds.features
        assert len(ds) == len(images)
        for i in (0, len(ds) // 2, len(ds) - 1):
            np.testing.assert_array_equal(ds["image"][i], images[i])
        expected = rolling_median_reference(images, kernel_size)
        np.testing.assert_array_equal(ds["image_bg"][:], expected)
        for section in ("experiment", "imaging", "setup"):
            assert dict(ds.config[section]) == dict(ds_in.config[section])
        ours = [name for name in ds.logs if name.startswith("rollmed-dask-job")]
        assert len(ours) == 1
        assert any('"kernel_size": ' + str(kernel_size) in line for line in ds.logs[ours[0]])


def test_new_file_from_compute_background(small_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    compute_background(small_rtdc, out, 12, progress=False)
    check_with_dclab(out, small_rtdc, 12)


def test_new_file_at_the_slowest_zstd_level(small_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    compute_background(small_rtdc, out, 12, compression="zstd-9", progress=False)
    with h5py.File(out, "r") as h5:
        assert h5["events/image_bg"]._filters["32015"] == (9,)
    check_with_dclab(out, small_rtdc, 12)


def test_new_file_from_the_drop_in_class(small_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    with BackgroundRollMed(small_rtdc, out, kernel_size=16) as job:
        job.process()
    check_with_dclab(out, small_rtdc, 16)


def test_in_place(rtdc_copy, tmp_path):
    original = tmp_path / "original.rtdc"
    original.write_bytes(rtdc_copy.read_bytes())
    compute_background(rtdc_copy, rtdc_copy, 10, in_place=True, progress=False)
    with dclab.new_dataset(rtdc_copy) as ds:
        assert "image_bg" in ds.features_innate
    check_with_dclab(rtdc_copy, original, 10)


def basin_only_file(path, source, mapping=None):
    """An .rtdc file that holds no images itself, only a basin pointing at ``source``."""
    with h5py.File(source, "r") as h5in, h5py.File(path, "w") as h5:
        h5.attrs.update(h5in.attrs)
        features = sorted(h5in["events"])
        identifier = measurement_identifier(h5in)
        n = len(h5in["events/image"]) if mapping is None else len(mapping)
        h5["events/index"] = np.arange(1, n + 1, dtype=np.uint32)
        h5.attrs["experiment:event count"] = n
    with h5py.File(path, "a") as h5:
        store_file_basin(
            h5,
            source.name,
            [str(source.resolve())],
            features=features,
            identifier=identifier,
            mapping=mapping,
        )
    return path


def test_input_through_a_file_basin(small_rtdc, tmp_path):
    source = basin_only_file(tmp_path / "basin.rtdc", small_rtdc)
    with h5py.File(source, "r") as h5:
        assert "image" not in h5["events"]
    out = tmp_path / "bg.rtdc"
    compute_background(source, out, 20, progress=False)
    expected = rolling_median_reference(read_images(small_rtdc), 20)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    opens_in_dcnum(out, read_images(small_rtdc), expected)


def test_input_through_a_mapped_basin(small_rtdc, tmp_path):
    mapping = np.arange(3, 300, 2)  # every other event, as a gated subset would be
    source = basin_only_file(tmp_path / "mapped.rtdc", small_rtdc, mapping=mapping)
    # read before dclab opens the file: HDF5 refuses to open a file twice in one
    # process with other locking flags (dclab passes locking=False)
    frame = read_images(small_rtdc)[mapping[5]]
    with dclab.new_dataset(source) as ds:
        np.testing.assert_array_equal(ds["image"][5], frame)
    out = tmp_path / "bg.rtdc"
    compute_background(source, out, 9, progress=False, event_chunk=40)
    expected = rolling_median_reference(read_images(small_rtdc)[mapping], 9)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    opens_in_dcnum(out, read_images(small_rtdc)[mapping], expected)
    # read before dclab holds the input open (see above)
    frame, frames = read_images(small_rtdc)[mapping[7]], ds_frame(small_rtdc)[mapping]
    with dclab.new_dataset(out) as ds:
        np.testing.assert_array_equal(ds["image"][7], frame)
        np.testing.assert_array_equal(ds["frame"][:], frames)


def ds_frame(path):
    with h5py.File(path, "r") as h5:
        return h5["events/frame"][:]


def opens_in_dcnum(path, images, background):
    """dcnum's reader sees image and image_bg of ``path`` with these values."""
    with HDF5Data(path) as hd:
        assert len(hd) == len(images)
        for i in (0, len(hd) // 2, len(hd) - 1):
            np.testing.assert_array_equal(hd.image[i], images[i])
            np.testing.assert_array_equal(hd.image_bg[i], background[i])
