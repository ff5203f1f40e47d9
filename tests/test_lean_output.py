"""A new ``.rtdc`` output links the input's images instead of copying them.

``events/image`` is an HDF5 virtual dataset onto the file that really holds the
images, with its source recorded as an absolute and a relative path: the
images are found when the output moves alone and when raw data and output move
together; with the raw file gone the dataset has 0 events (what dclab and dcnum
then say is tested here and written in the README). Where a virtual dataset
cannot serve (an irregular mapped basin), there is no ``events/image`` and the
basin alone shows the images. ``copy_images=True`` gives a self-contained
file. A plain HDF5 stack gets a plain HDF5 output. dcnum's and chipstream's
pipelines on these outputs are in ``test_dcnum_pipeline.py``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import warnings

import h5py
import hdf5plugin  # noqa: F401  (zstd filter)
import numpy as np
import pytest

from rollmed_dask import compute_background, compute_backgrounds, rolling_median_reference, rtdc
from rollmed_dask.cli import main
from rollmed_dask.example import write_example

N_EVENTS = 60
K = 10


@pytest.fixture
def layout(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """``project/raw/raw.rtdc`` and its lean output ``project/bg/bg.rtdc``."""
    (tmp_path / "project" / "raw").mkdir(parents=True)
    (tmp_path / "project" / "bg").mkdir()
    raw = write_example(tmp_path / "project/raw/raw.rtdc", n_events=N_EVENTS, seed=3)
    out = tmp_path / "project/bg/bg.rtdc"
    compute_background(raw, out, K, progress=False)
    return raw, out


def images(path) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        return h5["events/image"][:]


def test_output_links_the_images_with_their_attributes(layout):
    raw, out = layout
    with h5py.File(out, "r") as h5, h5py.File(raw, "r") as hr:
        image = h5["events/image"]
        assert image.is_virtual
        assert [vs.file_name for vs in image.virtual_sources()] == [
            str(raw.resolve()),
            "../raw/raw.rtdc",
        ]
        assert {k: image.attrs[k] for k in image.attrs} == dict(hr["events/image"].attrs)
        np.testing.assert_array_equal(image[:], hr["events/image"][:])
        # about the size of the background: the images are not stored
        rest = out.stat().st_size - h5["events/image_bg"].id.get_storage_size()
        assert rest < hr["events/image"].id.get_storage_size() / 4


def test_images_found_when_output_moves_alone_or_with_the_raw_folder(layout, tmp_path):
    raw, out = layout
    expected = images(raw)
    # raw and output folders move together: the relative source
    moved = shutil.move(tmp_path / "project", tmp_path / "elsewhere")
    np.testing.assert_array_equal(images(pathlib.Path(moved) / "bg/bg.rtdc"), expected)
    shutil.move(moved, tmp_path / "project")
    # the output moves alone: the absolute source
    alone = pathlib.Path(shutil.move(out, tmp_path / "bg.rtdc"))
    np.testing.assert_array_equal(images(alone), expected)


def test_raw_file_gone_what_h5py_dclab_and_dcnum_say(layout, tmp_path):
    """README: with the raw file gone, ``image`` has 0 events; dcnum warns that
    it has zero length, dclab fails to read an image."""
    dclab = pytest.importorskip("dclab")
    dcnum_read = pytest.importorskip("dcnum.read")
    raw, out = layout
    shutil.move(raw, tmp_path / "somewhere-else.rtdc")
    with h5py.File(out, "r") as h5:
        assert h5["events/image"].shape == (0, 80, 320)
        assert h5["events/image_bg"].shape[0] == N_EVENTS
    with pytest.warns(UserWarning, match="has zero length"):
        with dcnum_read.HDF5Data(out) as hd:
            assert len(hd.image) == 0
    with dclab.new_dataset(out) as ds:
        with pytest.raises(IndexError):
            ds["image"][0]


def test_images_only_in_a_basin_link_the_real_file(tmp_path):
    raw = write_example(tmp_path / "raw.rtdc", n_events=N_EVENTS, seed=3)
    only = tmp_path / "only_basin.rtdc"
    with h5py.File(raw, "r") as hr, h5py.File(only, "w") as h5:
        h5.attrs.update(hr.attrs)
        h5.require_group("events")
        features = sorted(hr["events"])
        rtdc.store_file_basin(
            h5, raw.name, [str(raw)], features=features, identifier=rtdc.measurement_identifier(hr)
        )
    out = tmp_path / "out" / "bg.rtdc"
    out.parent.mkdir()
    compute_background(only, out, K, progress=False)
    with h5py.File(out, "r") as h5:
        sources = [vs.file_name for vs in h5["events/image"].virtual_sources()]
    assert sources == [str(raw.resolve()), "../raw.rtdc"]
    np.testing.assert_array_equal(images(out), images(raw))


def mapped_input(raw, path, mapping) -> pathlib.Path:
    """An .rtdc holding ``raw``'s events ``mapping`` through a mapped file basin."""
    with h5py.File(raw, "r") as hr, h5py.File(path, "w") as h5:
        h5.attrs.update(hr.attrs)
        h5.attrs["experiment:event count"] = len(mapping)
        features = sorted(hr["events"])
        rtdc.store_file_basin(h5, raw.name, [str(raw)], features=features, mapping=mapping)
    return pathlib.Path(path)


@pytest.mark.parametrize(
    "mapping, linked",
    [(np.arange(5, 55, 2), True), (np.array([0, 1, 2, 7, 9, 20, 21, 22, 40, 41, 50, 59]), False)],
    ids=["stride", "irregular"],
)
def test_mapped_basin_linked_when_regular_else_left_to_the_basin(mapping, linked, tmp_path):
    raw = write_example(tmp_path / "raw.rtdc", n_events=N_EVENTS, seed=3)
    source = mapped_input(raw, tmp_path / "mapped.rtdc", mapping)
    out = tmp_path / "bg.rtdc"
    compute_background(source, out, 4, progress=False)
    expected = images(raw)[mapping]
    with h5py.File(out, "r") as h5:
        assert ("image" in h5["events"]) == linked
        if linked:
            np.testing.assert_array_equal(h5["events/image"][:], expected)
        np.testing.assert_array_equal(
            h5["events/image_bg"][:], rolling_median_reference(expected, 4)
        )
        np.testing.assert_array_equal(h5["events/frame"][:], _frames(raw)[mapping])
    # either way, the images are there for readers that follow basins
    loc = rtdc.find_image_dataset(out)
    with h5py.File(loc.path, "r") as h5:
        shown = h5[loc.dataset][:]
    np.testing.assert_array_equal(shown if loc.mapping is None else shown[loc.mapping], expected)


def _frames(path) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        return h5["events/frame"][:]


def test_input_with_virtual_images_linked_or_copied(tmp_path):
    raw = write_example(tmp_path / "raw.rtdc", n_events=N_EVENTS, seed=3)
    virtual = tmp_path / "virtual.rtdc"
    shutil.copy(raw, virtual)
    with h5py.File(virtual, "a", libver="latest") as h5:
        shape = h5["events/image"].shape
        del h5["events/image"]
        vlayout = h5py.VirtualLayout(shape=shape, dtype=np.uint8)
        vlayout[:] = h5py.VirtualSource(str(raw), "events/image", shape=shape)
        h5["events"].create_virtual_dataset("image", vlayout, fillvalue=0)
        h5["events/image"].attrs["note"] = "kept"
    lean, copied = tmp_path / "lean.rtdc", tmp_path / "copied.rtdc"
    compute_background(virtual, lean, K, progress=False)
    compute_background(virtual, copied, K, copy_images=True, progress=False)
    with h5py.File(lean, "r") as h5l, h5py.File(copied, "r") as h5c:
        assert h5l["events/image"].is_virtual  # onto the input's virtual dataset
        assert not h5c["events/image"].is_virtual  # the images themselves
        assert h5c["events/image"].attrs["note"] == "kept"  # and their attributes
        for h5 in (h5l, h5c):
            np.testing.assert_array_equal(h5["events/image"][:], images(raw))


def test_copy_images_gives_a_self_contained_file(layout, tmp_path):
    raw, _ = layout
    out = tmp_path / "copied.rtdc"
    assert main([str(raw), str(out), "-k", str(K), "--copy-images", "-q"]) == 0
    moved = tmp_path / "gone.rtdc"
    shutil.move(raw, moved)
    with h5py.File(out, "r") as h5:
        assert not h5["events/image"].is_virtual
        np.testing.assert_array_equal(h5["events/image"][:], images(moved))


def test_mixed_readers_in_one_process_with_the_readme_line(layout):
    """dclab (locking=False) and h5py/dcnum (default locking) on our output and
    its raw file in one process: the README's line makes it work."""
    pytest.importorskip("dclab")
    pytest.importorskip("dcnum")
    raw, out = layout
    script = textwrap.dedent(
        f"""
        import os; os.environ["HDF5_USE_FILE_LOCKING"] = "FALSE"  # the README's line
        import dclab, dcnum.read, h5py, hdf5plugin
        ds = dclab.new_dataset({str(out)!r})  # kept open, as in a notebook
        ds["image"][3]
        dcnum.read.HDF5Data({str(out)!r}).image[3]
        dcnum.read.HDF5Data({str(raw)!r}).image[3]
        h5py.File({str(raw)!r}, "r")["events/image"][3]
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# --------------------------------------------------------------------------
# a plain HDF5 stack (no events group) to HDF5
# --------------------------------------------------------------------------


@pytest.fixture
def plain_stack(tmp_path) -> tuple[pathlib.Path, np.ndarray]:
    frames = np.random.default_rng(5).random((40, 6, 8), dtype=np.float32)
    path = tmp_path / "in" / "f32.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as h5:
        h5["images"] = frames
    return path, rolling_median_reference(frames, 6)


def assert_plain_output(path, expected):
    with h5py.File(path, "r") as h5:
        assert sorted(h5) == ["events", "logs"]  # no basins, no metadata
        assert not any(key.startswith("pipeline:") for key in h5.attrs)
        assert sorted(h5.attrs) == []
        ds = h5["events/image_bg"]
        np.testing.assert_array_equal(ds[:], expected)
        assert ds.attrs["CLASS"] == b"IMAGE"
        assert ds.attrs["dcnum ppid background"] == "rollmed:k=6^b=10000"


def test_plain_hdf5_stack_api_cli_and_folder(plain_stack, tmp_path):
    path, expected = plain_stack
    compute_background(path, tmp_path / "api.h5", 6, dataset="images", progress=False)
    assert_plain_output(tmp_path / "api.h5", expected)
    assert main([str(path), str(tmp_path / "cli.h5"), "-k", "6", "--dataset", "images", "-q"]) == 0
    assert_plain_output(tmp_path / "cli.h5", expected)
    (result,) = compute_backgrounds(
        [path], tmp_path / "folder", 6, dataset="images", progress=False
    )
    assert result["status"] == "done", result["error"]
    assert_plain_output(result["output"], expected)


# --------------------------------------------------------------------------
# command-line papercuts
# --------------------------------------------------------------------------


def test_help_shows_a_folder_example_and_copy_images(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "rollmed-dask -r raw/ bg/" in out
    assert "--copy-images" in out


def test_abbreviation_of_one_option_with_two_spellings_is_not_ambiguous(small_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    assert main([str(small_rtdc), str(out), "--kernel", "5", "-q"]) == 0
    with h5py.File(out, "r") as h5:
        assert h5["events/image_bg"].attrs["dcnum ppid background"].startswith("rollmed:k=5^")


def test_misspelt_flag_gets_a_suggestion(small_rtdc, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(small_rtdc), str(tmp_path / "bg.rtdc"), "--overwirte"])
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "unrecognized arguments: --overwirte; did you mean --overwrite?" in line


def test_batch_summary_says_1_file(small_rtdc, tmp_path, capsys):
    (tmp_path / "bg").mkdir()  # an existing folder: the batch form, one file
    assert main([str(small_rtdc), str(tmp_path / "bg"), "-k", "5"]) == 0
    err = capsys.readouterr().err
    assert "done         1 file " in err and "1 files" not in err


def test_dcnum_drain_copy_of_the_virtual_images_still_finds_them(layout, tmp_path):
    """dcnum's "drain" with every frame giving one event copies ``image`` with
    ``copy_features(mapping=None)``, an HDF5 object copy that keeps the virtual
    dataset as it is: in its result's other folder, the absolute source finds
    the raw file (the relative one does not)."""
    dcnum_write = pytest.importorskip("dcnum.write")
    raw, out = layout
    result = tmp_path / "elsewhere" / "deeper" / "result.rtdc"
    result.parent.mkdir(parents=True)
    with h5py.File(out, "r") as h5_src, h5py.File(result, "w", libver="latest") as h5_dst:
        dcnum_write.copy_features(h5_src=h5_src, h5_dst=h5_dst, features=["image"])
    with h5py.File(result, "r") as h5:
        assert h5["events/image"].is_virtual
        np.testing.assert_array_equal(h5["events/image"][:], images(raw))


def test_dclab_verify_dataset_flags_the_link_not_the_copy(layout, tmp_path):
    """README: --copy-images for outputs that must pass dclab-verify-dataset."""
    check = pytest.importorskip("dclab.rtdc_dataset.check")
    raw, lean = layout
    copied = tmp_path / "copied.rtdc"
    compute_background(raw, copied, K, copy_images=True, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dclab's notes on our basins are not the point
        assert check.check_dataset(copied)[0] == []
        assert check.check_dataset(lean)[0] == [
            "The HDF5 file contains at least one external link: '/events/image'"
        ]
