"""``compute_background`` and ``BackgroundRollMed`` from file to file, with dcnum as oracle.

Real HDF5 and Zarr files on disk, real dask schedulers, dcnum 0.31 itself.
"""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import dask.array as da
import h5py
import numpy as np
import pytest
from conftest import interrupt_at_write, read_images
from dcnum.feat.feat_background.bg_roll_median import BackgroundRollMed as DcnumRollMed

from rollmed_dask import (
    BackgroundRollMed,
    batch,
    compute_background,
    rolling_median_reference,
    rtdc,
)
from rollmed_dask.sinks import ZarrSink, partial_path

DTYPES = ["uint8", "uint16", "int16", "float32", "float64"]


def run_dcnum(input_path, output_path, kernel_size, batch_size):
    with DcnumRollMed(
        input_path, output_path, kernel_size=kernel_size, batch_size=batch_size, num_cpus=1
    ) as job:
        job.process()


def dataset_layout(path, name="events/image_bg"):
    """Everything about a written dataset except its values."""
    with h5py.File(path, "r") as h5:
        dset = h5[name]
        plist = dset.id.get_create_plist()
        filters = [plist.get_filter(i)[:3] for i in range(plist.get_nfilters())]
        attrs = {key: (value, type(value).__name__) for key, value in dset.attrs.items()}
        return {
            "shape": dset.shape,
            "dtype": dset.dtype,
            "maxshape": dset.maxshape,
            "chunks": dset.chunks,
            "filters": filters,
            "attrs": attrs,
        }


@pytest.fixture(scope="module")
def dcnum_result(small_rtdc, tmp_path_factory):
    """dcnum 0.31's output for the shared example, K=10, batch 50."""
    out = tmp_path_factory.mktemp("dcnum") / "dcnum_bg.rtdc"
    run_dcnum(small_rtdc, out, 10, 50)
    return out


def test_compute_background_equals_dcnum_bit_for_bit(small_rtdc, dcnum_result, tmp_path):
    out = tmp_path / "ours.rtdc"
    # zstd-5: dcnum's default codec, so that the whole layout can be compared
    summary = compute_background(small_rtdc, out, 10, batch_size=50, progress=False,
                                 memory_budget="16MiB", compression="zstd-5")  # fmt: skip
    assert summary.blocks > 1, "the test must cross block borders"
    np.testing.assert_array_equal(
        read_images(out, "events/image_bg"), read_images(dcnum_result, "events/image_bg")
    )
    assert dataset_layout(out) == dataset_layout(dcnum_result)


def test_drop_in_class_writes_the_file_dcnum_writes(small_rtdc, dcnum_result, tmp_path):
    out = tmp_path / "ours.rtdc"
    with BackgroundRollMed(small_rtdc, out, kernel_size=10, batch_size=50, num_cpus=2) as job:
        job.process()
    assert job.get_progress() == 1.0
    assert job.get_ppid() == "rollmed:k=10^b=50"
    np.testing.assert_array_equal(
        read_images(out, "events/image_bg"), read_images(dcnum_result, "events/image_bg")
    )
    assert dataset_layout(out) == dataset_layout(dcnum_result)
    with h5py.File(out, "r") as ours, h5py.File(dcnum_result, "r") as theirs:
        # besides the input's metadata, the ids that let dcnum's pipeline skip its
        # background (dcnum's own BackgroundRollMed does not write them)
        ids = {k: ours.attrs[k] for k in ours.attrs if k.startswith("pipeline:dcnum")}
        assert set(ids) == set(rtdc.PIPELINE_BACKGROUND_ATTRS)
        assert {k: v for k, v in ours.attrs.items() if k not in ids} == dict(theirs.attrs)
        assert len(ours["basins"]) == len(theirs["basins"]) == 1


@pytest.mark.parametrize(("kernel_size", "batch_size"), [(2, 40), (6, 100), (50, 70), (100, 150)])
def test_dcnum_oracle_over_kernel_and_batch_sizes(kernel_size, batch_size, small_rtdc, tmp_path):
    theirs, ours = tmp_path / "dcnum.rtdc", tmp_path / "ours.rtdc"
    run_dcnum(small_rtdc, theirs, kernel_size, batch_size)
    compute_background(
        small_rtdc,
        ours,
        kernel_size,
        batch_size=batch_size,
        progress=False,
        event_chunk=kernel_size + 1,
    )
    np.testing.assert_array_equal(
        read_images(ours, "events/image_bg"), read_images(theirs, "events/image_bg")
    )


def test_in_place_like_dcnum(rtdc_copy, tmp_path):
    reference = tmp_path / "reference.rtdc"
    reference.write_bytes(rtdc_copy.read_bytes())
    run_dcnum(reference, reference, 10, 50)
    with BackgroundRollMed(rtdc_copy, rtdc_copy, kernel_size=10, batch_size=50) as job:
        job.process()
    np.testing.assert_array_equal(
        read_images(rtdc_copy, "events/image_bg"), read_images(reference, "events/image_bg")
    )
    assert dataset_layout(rtdc_copy) == dataset_layout(reference)


def checksums(path, skip=(), skip_attrs=()):
    """A digest of every dataset and attribute in an HDF5 file, by name."""
    digests = {}
    with h5py.File(path, "r") as h5:
        root = [(k, repr(v)) for k, v in h5.attrs.items() if k not in skip_attrs]
        digests["/"] = repr(sorted(root))

        def visit(name, obj):
            if any(name.startswith(s) for s in skip):
                return
            attrs = repr(sorted((k, repr(v)) for k, v in obj.attrs.items()))
            data = obj[()].tobytes() if isinstance(obj, h5py.Dataset) else b""
            digests[name] = hashlib.sha256(data + attrs.encode()).hexdigest()

        h5.visititems(visit)
    return digests


def test_in_place_keeps_everything_else(rtdc_copy):
    before = checksums(rtdc_copy)
    compute_background(rtdc_copy, rtdc_copy, 10, in_place=True, progress=False)
    # besides the background and our log, only dcnum's pipeline ids are new
    skip_attrs = rtdc.PIPELINE_BACKGROUND_ATTRS
    after = checksums(rtdc_copy, ("events/image_bg", "logs/rollmed-dask-job"), skip_attrs)
    assert after == before, "every other dataset and attribute is unchanged"
    with h5py.File(rtdc_copy, "r") as h5:
        assert set(skip_attrs) <= set(h5.attrs)
    with h5py.File(rtdc_copy, "r") as h5:
        assert [n for n in h5["events"] if n.startswith(".")] == [], "no staging leftovers"
        logs = [n for n in h5["logs"] if n.startswith("rollmed-dask-job")]
        assert len(logs) == 1
    expected = rolling_median_reference(read_images(rtdc_copy), 10)
    np.testing.assert_array_equal(read_images(rtdc_copy, "events/image_bg"), expected)


def test_in_place_replaces_an_existing_background_only_with_overwrite(rtdc_copy):
    compute_background(rtdc_copy, rtdc_copy, 10, in_place=True, progress=False)
    first = read_images(rtdc_copy, "events/image_bg")
    with pytest.raises(FileExistsError, match="already has 'events/image_bg'.*overwrite"):
        compute_background(rtdc_copy, rtdc_copy, 20, in_place=True, progress=False)
    np.testing.assert_array_equal(read_images(rtdc_copy, "events/image_bg"), first)
    compute_background(rtdc_copy, rtdc_copy, 20, in_place=True, overwrite=True, progress=False)
    expected = rolling_median_reference(read_images(rtdc_copy), 20)
    np.testing.assert_array_equal(read_images(rtdc_copy, "events/image_bg"), expected)


def test_in_place_into_a_file_with_fluorescence_traces(rtdc_copy):
    """A measurement with traces has a group among its features (events/trace) and
    may hold a scalar; the events check skips both, and the background it
    replaces, which may have another length (one made from part of the events)."""
    with h5py.File(rtdc_copy, "r+") as h5:
        n = h5["events/image"].shape[0]
        h5["events/trace/fl1_raw"] = np.zeros((n, 20), np.int16)
        h5["events/note"] = 1
        h5["events/image_bg"] = np.zeros((n // 2, 80, 320), np.uint8)
    compute_background(rtdc_copy, rtdc_copy, 10, in_place=True, overwrite=True, progress=False)
    expected = rolling_median_reference(read_images(rtdc_copy), 10)
    np.testing.assert_array_equal(read_images(rtdc_copy, "events/image_bg"), expected)
    with h5py.File(rtdc_copy, "r") as h5:
        assert h5["events/trace/fl1_raw"].shape == (n, 20) and h5["events/note"][()] == 1


def deny_writing(monkeypatch, path):
    """Take write permission on ``path`` away; root may write anyway, so for root
    ``os.access`` answers for it as it would for a user."""
    path.chmod(0o555 if path.is_dir() else 0o444)
    if os.geteuid() == 0:
        real_access = os.access

        def access(where, mode, **kwargs):
            if mode & os.W_OK and os.fspath(where) == os.fspath(path):
                return False
            return real_access(where, mode, **kwargs)

        monkeypatch.setattr(os, "access", access)


def test_in_place_into_a_read_only_file_is_refused_before_any_work(rtdc_copy, monkeypatch):
    before = rtdc_copy.read_bytes()
    deny_writing(monkeypatch, rtdc_copy)
    with pytest.raises(PermissionError, match=r"cannot write to .*input\.rtdc'? \(no write"):
        compute_background(rtdc_copy, rtdc_copy, 10, in_place=True, progress=False)
    assert rtdc_copy.read_bytes() == before
    assert [p.name for p in rtdc_copy.parent.iterdir()] == [rtdc_copy.name]


def test_in_place_in_a_read_only_folder_is_refused_before_any_work(
    small_rtdc, tmp_path, monkeypatch
):
    """The new file is built beside the old one: the folder must be writable."""
    folder = tmp_path / "shared"
    folder.mkdir()
    raw = pathlib.Path(shutil.copy(small_rtdc, folder / "raw.rtdc"))
    before = raw.read_bytes()
    deny_writing(monkeypatch, folder)
    try:
        with pytest.raises(PermissionError, match="cannot write into the output folder"):
            compute_background(raw, raw, 10, in_place=True, progress=False)
    finally:
        folder.chmod(0o755)
    assert raw.read_bytes() == before and [p.name for p in folder.iterdir()] == ["raw.rtdc"]


def test_in_place_into_a_symbolic_link_is_refused(rtdc_copy):
    """Replacing the link would leave the file it points to as it was."""
    link = rtdc_copy.with_name("link.rtdc")
    link.symlink_to(rtdc_copy.name)
    before = rtdc_copy.read_bytes()
    with pytest.raises(ValueError, match="is a symbolic link to 'input.rtdc'"):
        compute_background(link, link, 10, in_place=True, progress=False)
    assert link.is_symlink() and rtdc_copy.read_bytes() == before


def test_new_rtdc_file_carries_metadata_basin_and_log(small_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    compute_background(small_rtdc, out, 10, progress=False)
    with h5py.File(out, "r") as h5, h5py.File(small_rtdc, "r") as h5in:
        ours = {k: v for k, v in h5.attrs.items() if not k.startswith("pipeline:dcnum")}
        assert ours == dict(h5in.attrs)
        # a copy of the images, which dcnum's pipeline reads from its input file itself
        np.testing.assert_array_equal(h5["events/image"][:], h5in["events/image"][:])
        (basin,) = h5["basins"].values()
        basin = json.loads("\n".join(line.decode() for line in basin[:]))
        assert basin["type"] == "file" and str(small_rtdc.resolve()) in basin["paths"]
        (log,) = [h5["logs"][n] for n in h5["logs"] if n.startswith("rollmed-dask-job")]
        log = json.loads("\n".join(line.decode() for line in log[:]))
        assert log["parameters"]["kernel_size"] == 10
        assert log["input"]["path"] == str(small_rtdc.resolve())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_every_dtype_round_trips(dtype, suffix, tmp_path):
    rng = np.random.default_rng(7)
    img = (rng.normal(100, 30, (230, 12, 20))).astype(dtype)
    out = tmp_path / f"bg{suffix}"
    summary = compute_background(img, out, 17, progress=False, event_chunk=40)
    assert summary.format == ("zarr" if suffix == ".zarr" else "hdf5")
    result = read_images(out, "events/image_bg")
    assert result.dtype == img.dtype
    np.testing.assert_array_equal(result, rolling_median_reference(img, 17))


@pytest.mark.parametrize("scheduler", ["threads", "processes", "synchronous"])
@pytest.mark.parametrize("suffix", [".rtdc", ".zarr"])
def test_local_schedulers_give_identical_bits(scheduler, suffix, small_rtdc, tmp_path):
    out = tmp_path / f"bg{suffix}"
    compute_background(
        small_rtdc, out, 30, scheduler=scheduler, progress=False, memory_budget="8MiB"
    )
    expected = rolling_median_reference(read_images(small_rtdc), 30)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)


# What an HDF5-to-HDF5 job on threads never needs: every CLI run would pay for them
# (0.2-0.5 s each, measured; numba 0.5 s of CPU before its kernels were compiled ahead).
NOT_FOR_HDF5_ON_THREADS = ("dask.array", "distributed", "scipy", "numba", "llvmlite", "zarr")


def test_file_job_imports_neither_dask_array_nor_distributed(small_rtdc, tmp_path):
    code = (
        "import sys\n"
        "from rollmed_dask import compute_background\n"
        f"compute_background({str(small_rtdc)!r}, {str(tmp_path / 'bg.rtdc')!r}, 30, "
        "scheduler='threads', progress=False)\n"
        f"print(sorted(m for m in {NOT_FOR_HDF5_ON_THREADS!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "[]"
    expected = rolling_median_reference(read_images(small_rtdc), 30)
    np.testing.assert_array_equal(read_images(tmp_path / "bg.rtdc", "events/image_bg"), expected)


def test_cli_hdf5_run_on_threads_imports_only_what_it_needs(small_rtdc, tmp_path):
    """The command as a user types it; -X importtime lists every module it imported."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rollmed_dask", str(small_rtdc),
         str(tmp_path / "bg.rtdc"), "-k", "30", "--scheduler", "threads"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in run.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "rollmed_dask.kernels" in imported  # the listing is complete enough to trust
    assert not imported & set(NOT_FOR_HDF5_ON_THREADS), sorted(imported)


# spelling -> (HDF5 filter id, its first cd_value: the level); dcnum's spellings and ours
COMPRESSION_FILTERS = {
    "zstd-1": (32015, 1), "zstd-9": (32015, 9), "zstd": (32015, 5),
    "gzip-1": (1, 1), "gzip-9": (1, 9), "gzip": (1, 4), "none": None,
}  # fmt: skip


@pytest.mark.parametrize("compression", list(COMPRESSION_FILTERS))
def test_other_compressions(compression, tmp_path):
    img = np.random.default_rng(2).integers(0, 255, (120, 8, 8), dtype=np.uint8)
    out = tmp_path / "bg.h5"
    compute_background(img, out, 9, compression=compression, progress=False)
    with h5py.File(out, "r") as h5:
        dset = h5["events/image_bg"]
        plist = dset.id.get_create_plist()
        filters = [plist.get_filter(i)[::2] for i in range(plist.get_nfilters())]
        filters = [(fid, cd[0]) for fid, cd in filters if fid != h5py.h5z.FILTER_FLETCHER32]
        wanted = COMPRESSION_FILTERS[compression]
        assert filters == ([] if wanted is None else [wanted])
        assert dset.fletcher32
        np.testing.assert_array_equal(dset[:], rolling_median_reference(img, 9))


def test_default_compression_is_zstd_1(tmp_path):
    img = np.random.default_rng(2).integers(0, 255, (60, 8, 8), dtype=np.uint8)
    compute_background(img, tmp_path / "bg.h5", 9, progress=False)
    compute_background(img, tmp_path / "bg.zarr", 9, progress=False)
    with h5py.File(tmp_path / "bg.h5", "r") as h5:
        assert h5["events/image_bg"]._filters["32015"] == (1,)
    import zarr

    (codec,) = zarr.open_array(str(tmp_path / "bg.zarr"), path="events/image_bg").compressors
    assert (type(codec).__name__, codec.level) == ("ZstdCodec", 1)


@pytest.mark.parametrize("compression", ["zstd-0", "zstd-10", "gzip-0", "lz4", "ZSTD-1", None])
def test_unknown_compression_is_refused_before_any_work(compression, tmp_path):
    with pytest.raises(ValueError, match="pass zstd-1 .. zstd-9, gzip-1 .. gzip-9"):
        compute_background(np.zeros((20, 2, 2), np.uint8), tmp_path / "bg.h5", 3,
                           compression=compression, progress=False)  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_pixel_tiled_input_file(tmp_path):
    img = np.random.default_rng(4).integers(0, 9, (200, 24, 40), dtype=np.uint8)
    source = tmp_path / "tiled.h5"
    with h5py.File(source, "w") as h5:
        h5.create_dataset("events/image", data=img, chunks=(20, 8, 16), compression="gzip")
    out = tmp_path / "bg.h5"
    compute_background(source, out, 25, progress=False)
    np.testing.assert_array_equal(
        read_images(out, "events/image_bg"), rolling_median_reference(img, 25)
    )


def test_open_h5py_and_zarr_inputs(small_rtdc, tmp_path):
    import zarr

    expected = rolling_median_reference(read_images(small_rtdc), 12)
    with h5py.File(small_rtdc, "r") as h5:
        compute_background(h5["events/image"], tmp_path / "a.h5", 12, progress=False)
        compute_background(h5, tmp_path / "b.h5", 12, progress=False)
    store = zarr.open_group(str(tmp_path / "in.zarr"), mode="w")
    store.create_array("events/image", data=read_images(small_rtdc), chunks=(50, 80, 320))
    compute_background(tmp_path / "in.zarr", tmp_path / "c.h5", 12, progress=False)
    compute_background(store["events/image"], tmp_path / "d.zarr", 12, progress=False)
    for name in ["a.h5", "b.h5", "c.h5", "d.zarr"]:
        np.testing.assert_array_equal(read_images(tmp_path / name, "events/image_bg"), expected)


def test_existing_output_is_kept_without_overwrite_and_replaced_with_it(tmp_path):
    img = np.random.default_rng(5).integers(0, 255, (100, 6, 6), dtype=np.uint8)
    out = tmp_path / "bg.h5"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists.*overwrite"):
        compute_background(img, out, 5, progress=False)
    assert out.read_bytes() == b"precious"
    compute_background(img, out, 5, progress=False, overwrite=True)
    np.testing.assert_array_equal(
        read_images(out, "events/image_bg"), rolling_median_reference(img, 5)
    )
    assert not partial_path(out).exists()


class Boom(RuntimeError):
    pass


def explode_in_block(block, block_id=None, bad=3):
    if block_id[0] == bad:
        raise Boom("simulated failure in the middle of the run")
    return block


def test_failed_run_leaves_the_old_output_and_no_temporary(tmp_path):
    img = np.random.default_rng(6).integers(0, 255, (400, 6, 6), dtype=np.uint8)
    out = tmp_path / "bg.h5"
    compute_background(img, out, 5, progress=False)
    before = out.read_bytes()
    failing = da.from_array(img, chunks=(40, 6, 6)).map_blocks(explode_in_block, dtype=img.dtype)
    with pytest.raises(Boom):
        compute_background(failing, out, 5, progress=False, overwrite=True, event_chunk=40)
    assert out.read_bytes() == before
    assert not partial_path(out).exists()


def test_zarr_resume_recomputes_only_the_missing_blocks(tmp_path):
    # frames of 32 KiB: the output chunk is 32 events, so there are many blocks
    img = np.random.default_rng(8).integers(0, 255, (400, 128, 256), dtype=np.uint8)
    out = tmp_path / "bg.zarr"
    failing = da.from_array(img, chunks=(40, 128, 256)).map_blocks(
        explode_in_block, dtype=img.dtype
    )
    with pytest.raises(Boom):
        compute_background(
            failing, out, 5, progress=False, resume=True, event_chunk=40, scheduler="synchronous"
        )
    assert not out.exists()
    assert partial_path(out).is_dir(), "resume=True keeps the partial output"
    good = da.from_array(img, chunks=(40, 128, 256))
    summary = compute_background(good, out, 5, progress=False, resume=True, event_chunk=40)
    assert 0 < summary.blocks_resumed < summary.blocks
    np.testing.assert_array_equal(
        read_images(out, "events/image_bg"), rolling_median_reference(img, 5)
    )
    assert not partial_path(out).exists()
    assert not (out / ".rollmed-progress").exists()


def test_resume_refuses_a_partial_output_of_another_job(tmp_path):
    img = np.random.default_rng(8).integers(0, 255, (400, 6, 6), dtype=np.uint8)
    out = tmp_path / "bg.zarr"
    failing = da.from_array(img, chunks=(40, 6, 6)).map_blocks(explode_in_block, dtype=img.dtype)
    with pytest.raises(Boom):
        compute_background(failing, out, 5, progress=False, resume=True, event_chunk=40)
    with pytest.raises(ValueError, match="made with kernel_size=5, this run has 7"):
        compute_background(img, out, 7, progress=False, resume=True, event_chunk=40)


def test_a_failed_run_names_the_partial_output_it_kept(tmp_path, monkeypatch):
    """The CLI tells how to continue from ``partial_kept``: set when a resumable
    partial is there, and only then."""
    img = np.random.default_rng(8).integers(0, 255, (400, 6, 6), dtype=np.uint8)
    failing = da.from_array(img, chunks=(40, 6, 6)).map_blocks(explode_in_block, dtype=img.dtype)
    kept, dropped, unmade = (tmp_path / f"{name}.zarr" for name in ("kept", "dropped", "unmade"))
    with pytest.raises(Boom) as info:
        compute_background(failing, kept, 5, progress=False, resume=True, event_chunk=40)
    assert info.value.partial_kept == str(partial_path(kept)) and partial_path(kept).is_dir()
    with pytest.raises(Boom) as info:
        compute_background(failing, dropped, 5, progress=False, event_chunk=40)
    assert not hasattr(info.value, "partial_kept") and not partial_path(dropped).exists()

    def cannot_create(self, input_data=None):  # a store that could not be made
        raise PermissionError(13, "Permission denied", str(self.tmp))

    monkeypatch.setattr(ZarrSink, "open", cannot_create)
    with pytest.raises(PermissionError) as info:
        compute_background(img, unmade, 5, progress=False, resume=True, event_chunk=40)
    assert not hasattr(info.value, "partial_kept") and not partial_path(unmade).exists()


def test_the_progress_bar_counts_events_and_says_what_was_resumed(tmp_path, capsys, monkeypatch):
    img = np.random.default_rng(8).integers(0, 255, (1200, 80, 80), dtype=np.uint8)
    out = tmp_path / "bg.zarr"
    compute_background(img, tmp_path / "fresh.zarr", 5, progress=True, event_chunk=40)
    fresh = capsys.readouterr().err
    assert "rolling median: 100%" in fresh and "1.20k/1.20k" in fresh  # events, scaled
    assert "resuming" not in fresh
    interrupt_at_write(monkeypatch, 5, img, out, 5, progress=False, event_chunk=40)
    summary = compute_background(img, out, 5, progress=True, resume=True, event_chunk=40)
    resumed = capsys.readouterr().err
    assert 400 <= summary.events_resumed < 1200
    assert f"resuming: {summary.events_resumed} events already written" in resumed
    assert "rolling median: 100%" in resumed and "1.20k/1.20k" in resumed


def test_the_progress_bar_in_jupyter_shows_no_warning(tmp_path, monkeypatch):
    """In a Jupyter kernel tqdm.autonotebook picks the widget and warns that the
    choice is experimental: the job silences that (pytest makes a warning an error).
    The kernel is faked as tqdm recognises one; the bar is a real ipywidgets one."""
    import types

    import IPython
    import tqdm
    import tqdm.autonotebook

    class ZMQInteractiveShell:  # what tqdm reads: the shell's class name
        pass

    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))
    monkeypatch.setattr(IPython, "get_ipython", ZMQInteractiveShell)
    monkeypatch.delitem(sys.modules, "tqdm.autonotebook")  # imported again, in notebook mode
    monkeypatch.setattr(tqdm, "autonotebook", tqdm.autonotebook)
    img = np.random.default_rng(8).integers(0, 255, (300, 8, 8), dtype=np.uint8)
    compute_background(img, tmp_path / "bg.zarr", 5, progress=True)
    assert sys.modules["tqdm.autonotebook"].tqdm.__module__ == "tqdm.notebook"


def test_worker_memory_check_counts_the_frames_a_block_can_hold():
    """A stack shorter than 1 + 2K is one block of N events: the workers' memory is
    checked against that, as the budget's own check counts it (K = 50, N = 60:
    60 events, not 101)."""
    from rollmed_dask.job import WORKER_BASE_MEMORY, _check_worker_memory

    row_bytes = 80 * 320
    k, n_events = 50, 60
    # what 60 events need (4 copies, a quarter of the limit, paused at 80 %), with
    # a margin; 101 events would need more than this limit
    need_60 = (WORKER_BASE_MEMORY + 4 * row_bytes * 60 / 0.25) / 0.8
    need_101 = (WORKER_BASE_MEMORY + 4 * row_bytes * 101 / 0.25) / 0.8
    limit = int(need_60 * 1.01)
    assert limit < need_101
    assert _check_worker_memory(limit, 1, k, row_bytes, n_events=n_events) > 0
    with pytest.raises(ValueError, match="give each worker process at least"):
        _check_worker_memory(limit, 1, k, row_bytes, n_events=1000)


def test_the_worker_memory_the_refusal_asks_for_is_enough():
    """512x512 uint8 frames, K = 2: 256 MiB for the worker process and 4 copies of a
    5-frame block at a quarter of the limit, paused at 80 %: exactly 345 MiB. The
    refusal asks for that, and a worker with exactly that is accepted. It names
    the memory as the caller spelled it, or in bytes."""
    from rollmed_dask.job import _check_worker_memory

    mib, row_bytes, k = 2**20, 512 * 512, 2
    with pytest.raises(ValueError, match="give each worker process at least 345MiB") as info:
        _check_worker_memory(345 * mib - 1, 1, k, row_bytes, n_events=1000)
    assert str(info.value).startswith("a memory limit of 345.00 MiB gives each dask worker")
    assert _check_worker_memory(345 * mib, 1, k, row_bytes, n_events=1000) == 345 * mib // 4
    spelled = "--memory 300MiB with 1 worker process(es) of 1 thread(s)"
    with pytest.raises(ValueError) as info:
        _check_worker_memory(300 * mib, 1, k, row_bytes, spelled, n_events=1000)
    assert str(info.value).startswith(f"{spelled} gives each dask worker process 300.00 MiB")


def test_a_partial_of_another_job_is_refused_before_the_scheduler_starts(tmp_path):
    """``scheduler=`` a function that starts a cluster (SLURM jobs with --workers):
    a partial made with other parameters is refused before it is called."""
    img = np.random.default_rng(8).integers(0, 255, (400, 6, 6), dtype=np.uint8)
    out = tmp_path / "bg.zarr"
    failing = da.from_array(img, chunks=(40, 6, 6)).map_blocks(explode_in_block, dtype=img.dtype)
    with pytest.raises(Boom):
        compute_background(failing, out, 5, progress=False, resume=True, event_chunk=40)
    started = []

    def start():  # would submit jobs; a check that comes after it is too late
        started.append("cluster")

    with pytest.raises(ValueError, match="made with kernel_size=5, this run has 7"):
        compute_background(
            img, out, 7, scheduler=start, progress=False, resume=True, event_chunk=40
        )
    assert started == [], "no cluster was started"
    assert partial_path(out).exists(), "the partial is kept"


def test_the_summary_and_the_run_log_say_what_this_job_did(tmp_path):
    """Kept fast on purpose: the mutation harness runs the fastest tests of each
    file for a line that every job runs (summary.seconds, events resumed, the log)."""
    img = np.random.default_rng(4).integers(0, 255, (60, 8, 8), dtype=np.uint8)
    out = tmp_path / "bg.h5"
    before = time.perf_counter()
    summary = compute_background(img, out, 5, progress=False)
    assert 0 < summary.seconds <= time.perf_counter() - before
    assert summary.events_resumed == 0
    assert summary.events_per_second == pytest.approx(60 / summary.seconds)
    (log,) = batch._read_run_logs(out)
    parameters = log["parameters"]
    assert (parameters["engine"], parameters["scheduler"]) == (summary.engine, summary.scheduler)
    assert parameters["blocks_resumed"] == 0 and parameters["memory_budget"] > 0


@pytest.mark.parametrize(
    "scheduler, words",
    [
        ("thread", "scheduler='thread' is not known; pass 'threads', 'processes'"),
        ("distributed", "scheduler='distributed' but no distributed Client is active"),
        (42, "scheduler=42 is not a scheduler; pass 'threads', 'processes'"),
        # a dask collection has .compute, yet is no Client (its type is named otherwise)
        (da.zeros(3), "is not a scheduler; pass 'threads'"),
        (lambda: "not a client", "returned 'not a client'; a function passed as the scheduler"),
        (lambda: da.zeros(3), "; a function passed as the scheduler must start a cluster"),
    ],
    ids=["misspelled", "no-client", "number", "dask-array", "function", "function-array"],
)
def test_a_wrong_scheduler_is_one_clear_error(scheduler, words, small_rtdc, tmp_path):
    out = tmp_path / "bg.rtdc"
    with pytest.raises(ValueError) as info:
        compute_background(small_rtdc, out, 5, scheduler=scheduler, progress=False)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []
