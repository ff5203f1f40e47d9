"""TIFF inputs (multi-page, BigTIFF, OME-TIFF, folders and globs of frames) and
the outputs their users open: OME-Zarr, plain HDF5.

Every file here is a real TIFF written by tifffile; the results are compared
bit for bit with the numpy reference.
"""

import os
import pickle
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from conftest import read_images

from rollmed_dask import compute_background, compute_backgrounds, rolling_median
from rollmed_dask import tiff as tiffmod
from rollmed_dask.cli import main
from rollmed_dask.core import rolling_median_reference

DTYPES = ["uint8", "uint16", "int16", "int32", "uint32", "float32"]
N, H, W, K = 60, 8, 12, 7


def make_stack(dtype, n=N, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(0, 1000, (n, H, W)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, (n, H, W), dtype=dtype, endpoint=True)


def wide(img: np.ndarray) -> np.ndarray:
    """128 x 132 frames: output chunks of 31 uint16 events, so a job has several blocks."""
    return np.repeat(np.repeat(img, 16, axis=1), 11, axis=2)


def write_layout(layout: str, img: np.ndarray, folder):
    """Write ``img`` as a TIFF input of the given layout; return (input, dataset)."""
    if layout == "multipage":
        tifffile.imwrite(folder / "stack.tif", img)
        return folder / "stack.tif", "events/image"
    if layout == "bigtiff-zlib":
        tifffile.imwrite(folder / "stack.tif", img, bigtiff=True, compression="zlib")
        return folder / "stack.tif", "events/image"
    if layout == "ome-tc":
        # the events on T, two channels: the background of channel 1
        other = np.zeros_like(img)
        tifffile.imwrite(
            folder / "stack.ome.tif",
            np.stack([other, img], axis=1),
            ome=True,
            metadata={"axes": "TCYX"},
            compression="zstd",
        )
        return folder / "stack.ome.tif", "axis=T,C=1"
    frames = folder / "frames"
    frames.mkdir()
    for i, frame in enumerate(img):
        tifffile.imwrite(frames / f"frame_{i + 1}.tif", frame)  # not zero-padded
    if layout == "frames-folder":
        return frames, "events/image"
    return str(frames / "frame_*.tif"), "events/image"  # glob


LAYOUTS = ["multipage", "bigtiff-zlib", "ome-tc", "frames-folder", "frames-glob"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rolling_median_of_tiff_is_exact(layout, dtype, tmp_path):
    img = make_stack(dtype)
    path, dataset = write_layout(layout, img, tmp_path)
    # blocks of 16 events: every block border, the tail and natural order count
    bg = rolling_median(path, K, dataset=dataset, event_chunk=16)
    assert bg.dtype == img.dtype and bg.numblocks[0] > 2
    np.testing.assert_array_equal(bg.compute(), rolling_median_reference(img, K))


def count_calls(monkeypatch, name):
    """Record the pages (or frame files) the readers decode in this process."""
    calls = []
    original = getattr(tiffmod, name)

    def counted(*args):
        calls.append(args[1] if name == "_read_page" else os.path.basename(args[0]))
        return original(*args)

    monkeypatch.setattr(tiffmod, name, counted)
    return calls


@pytest.mark.parametrize("layout", ["ome-tc", "frames-glob"])
def test_a_block_reads_only_its_own_frames(layout, tmp_path, monkeypatch):
    img = make_stack("uint16")
    path, dataset = write_layout(layout, img, tmp_path)
    bg = rolling_median(path, K, dataset=dataset, event_chunk=20)
    name = "_read_page" if layout == "ome-tc" else "_read_frame_file"
    calls = count_calls(monkeypatch, name)
    block = bg.blocks[1].compute(scheduler="synchronous")  # events 20..39
    np.testing.assert_array_equal(block, rolling_median_reference(img, K)[20:40])
    if layout == "ome-tc":  # page of (t, c=1) is 2 t + 1: only channel 1, only its window
        expected = [2 * t + 1 for t in range(20, 40 + K - 1)]
    else:
        expected = [f"frame_{i + 1}.tif" for i in range(20, 40 + K - 1)]
    assert calls == expected


def test_readers_pickle_as_references(tmp_path):
    img = make_stack("uint16", n=200)
    path, dataset = write_layout("ome-tc", img, tmp_path)
    reader = tiffmod.open_tiff(path, dataset).array
    frames, _ = write_layout("frames-folder", img, tmp_path)
    for r in (reader, tiffmod.open_tiff(frames).array):
        data = pickle.dumps(r)
        assert len(data) < 200 * 20 + 500, len(data)  # names at most, never pixels
        np.testing.assert_array_equal(pickle.loads(data)[5:9], img[5:9])


def run_module(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "rollmed_dask", *map(str, args), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def test_cli_ome_tiff_to_ome_zarr_on_processes_resumes_after_a_kill(tmp_path):
    img = make_stack("uint16", n=120)
    path, _ = write_layout("ome-tc", img, tmp_path)
    out = tmp_path / "bg.zarr"
    args = [path, out, "-k", K, "--axis", "T", "--dataset", "C=1", "--event-chunk", "40"]
    killed = run_module(*args, "--resume", env={"ROLLMED_DASK_TEST_KILL_AT": "zarr-marker"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    done = run_module(*args, "--resume", "--scheduler", "processes")
    assert done.returncode == 0, done.stderr
    expected = rolling_median_reference(img, K)
    np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)


def test_zarr_output_is_ome_zarr(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image

    img = make_stack("uint16")
    path, _ = write_layout("frames-folder", img, tmp_path)
    out = tmp_path / "bg.zarr"
    compute_background(path, out, K, progress=False)
    expected = rolling_median_reference(img, K)
    # the spec's validator (pydantic models of NGFF 0.5) accepts the metadata
    image = Image.from_zarr(zarr.open_group(str(out / "events"), mode="r"))
    assert [a.name for a in image.ome_attributes.multiscales[0].axes] == ["t", "y", "x"]
    # and the ome-zarr reader (napari-ome-zarr's) opens the image
    nodes = list(Reader(parse_url(str(out / "events")))())
    np.testing.assert_array_equal(np.asarray(nodes[0].data[0]), expected)


def test_hdf5_output_of_a_tiff_is_plain(tmp_path):
    img = make_stack("int16")
    path, _ = write_layout("multipage", img, tmp_path)
    out = tmp_path / "bg.h5"
    compute_background(path, out, K, progress=False)
    with h5py.File(out, "r") as h5:
        np.testing.assert_array_equal(h5["events/image_bg"][:], rolling_median_reference(img, K))
        assert sorted(h5) == ["events", "logs"] and sorted(h5["events"]) == ["image_bg"]
        assert not [k for k in h5.attrs if k.startswith("pipeline:")], dict(h5.attrs)
        assert "basins" not in h5


def test_batch_takes_tiff_stacks_with_a_pattern(tmp_path):
    (tmp_path / "raw").mkdir()
    stacks = {"a": make_stack("uint8", seed=1), "b": make_stack("uint8", seed=2)}
    tifffile.imwrite(tmp_path / "raw" / "a.tif", stacks["a"])
    tifffile.imwrite(tmp_path / "raw" / "b.ome.tif", stacks["b"], ome=True)
    (tmp_path / "raw" / "notes.rtdc").write_text("not taken")
    kwargs = dict(recursive=True, pattern="*.tif", format="zarr", progress=False)
    results = compute_backgrounds(tmp_path / "raw", tmp_path / "bg", K, **kwargs)
    assert [r["status"] for r in results] == ["done", "done"], results
    for name, img in stacks.items():
        np.testing.assert_array_equal(
            read_images(tmp_path / "bg" / f"{name}_bg.zarr", "events/image_bg"),
            rolling_median_reference(img, K),
        )
    again = compute_backgrounds(tmp_path / "raw", tmp_path / "bg", K, **kwargs)
    assert [r["status"] for r in again] == ["skipped", "skipped"]


def write_error_cases(d):
    """One input for each way a TIFF input can be wrong."""
    frame = np.zeros((8, 8), np.uint8)
    (d / "gap").mkdir()
    for i in (1, 2, 4, 5):
        tifffile.imwrite(d / "gap" / f"f_{i:03d}.tif", frame)
    (d / "shapes").mkdir()
    for i in range(6):
        tifffile.imwrite(d / "shapes" / f"f_{i}.tif", np.zeros((8, 9 if i == 4 else 8), np.uint8))
    img = make_stack("uint8")
    tifffile.imwrite(d / "damaged.tif", img, compression="zlib")
    with tifffile.TiffFile(d / "damaged.tif") as tif:
        page = tif.pages[30]
        offset, size = page.dataoffsets[0], page.databytecounts[0]
    with open(d / "damaged.tif", "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)
    tifffile.imwrite(d / "whole.tif", img)
    (d / "truncated.tif").write_bytes((d / "whole.tif").read_bytes()[:3000])
    tifffile.imwrite(d / "rgb.tif", np.zeros((10, 8, 8, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(d / "single.tif", frame)
    tifffile.imwrite(d / "tzc.ome.tif", np.zeros((10, 2, 3, 8, 8), np.uint8), ome=True,
                     metadata={"axes": "TZCYX"})  # fmt: skip


TIFF_ERRORS = {
    "missing frame": (["gap"], "frame f_003.tif is missing"),
    "frames of two shapes": (["shapes", "-k", "2"], "f_4.tif has shape (8, 9)"),
    "damaged page": (["damaged.tif", "-k", "3"], "cannot read page 30"),
    "truncated file": (["truncated.tif"], "truncated or damaged"),
    "colour frames": (["rgb.tif"], "colour"),
    "one image": (["single.tif"], "single 2-D image"),
    "axes not said": (["tzc.ome.tif"], "say which one holds the events, such as axis=T"),
    "plane not chosen": (["tzc.ome.tif", "--axis", "T", "--dataset", "Z=1"], "choose one"),
    "no such axis": (["tzc.ome.tif", "--axis", "Q"], "has no axis 'Q'"),
    "no such series": (["tzc.ome.tif", "--series", "3"], "not series=3"),
    "nothing matches": (["nothing/*.tif"], "no TIFF file (.tif, .tiff) matches"),
}


@pytest.mark.parametrize("case", list(TIFF_ERRORS))
def test_tiff_mistakes_are_one_line_exit_2(case, tmp_path, capsys):
    write_error_cases(tmp_path)
    args, fragment = TIFF_ERRORS[case]
    before = sorted(tmp_path.iterdir())
    code = main([str(tmp_path / args[0]), str(tmp_path / "out.zarr"), *args[1:], "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rollmed-dask: error: "), err
    assert fragment in lines[0], lines[0]
    assert sorted(tmp_path.iterdir()) == before, "nothing written"


def test_a_tiff_output_is_never_the_input(tmp_path, capsys):
    img = make_stack("uint8")
    tifffile.imwrite(tmp_path / "stack.tif", img)
    before = (tmp_path / "stack.tif").read_bytes()
    stack = str(tmp_path / "stack.tif")
    code = main([stack, stack, "-k", "5", "--overwrite", "-q"])
    assert code == 2 and "is the input file" in capsys.readouterr().err
    assert (tmp_path / "stack.tif").read_bytes() == before


def test_tiff_output_is_an_ome_tiff_that_tifffile_reads(tmp_path):
    img = wide(make_stack("uint16", n=200))
    tifffile.imwrite(tmp_path / "in.tif", img)
    out = tmp_path / "bg.ome.tif"
    summary = compute_background(tmp_path / "in.tif", out, K, progress=False)
    assert summary.format == "tiff" and summary.blocks > 1
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and tif.series[0].axes == "TYX"
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        np.testing.assert_array_equal(tif.asarray(), rolling_median_reference(img, K))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.ome.tif", "in.tif"]


def test_tiff_sink_writes_blocks_that_come_out_of_order_from_disk(tmp_path):
    from rollmed_dask.tiff_sink import TiffSink

    img = make_stack("float32", n=100)
    target = tmp_path / "bg.tif"
    target.write_bytes(b"old output")
    sink = TiffSink(target, "x", img.shape, img.dtype, chunk_events=10, job_params={},
                    resume=False)  # fmt: skip
    sink.open()
    starts = [90, 30, 60, 0, 80, 10, 20, 50, 40, 70]
    for i, start in enumerate(starts):
        sink.write(sink.prepare(img[start : start + 10], start))
        if i == 2:  # three blocks before their turn wait on disk, not in memory
            assert sorted(p.name for p in sink.spill.iterdir()) == ["30.npy", "60.npy", "90.npy"]
        assert target.read_bytes() == b"old output"
    sink.commit({}, [])
    np.testing.assert_array_equal(tifffile.imread(target), img)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.tif"]


def test_tiff_sink_abort_leaves_the_old_output(tmp_path):
    from rollmed_dask.tiff_sink import TiffSink

    img = make_stack("uint8", n=50)
    target = tmp_path / "bg.tif"
    target.write_bytes(b"old output")
    sink = TiffSink(target, "x", img.shape, img.dtype, chunk_events=10, job_params={},
                    resume=False)  # fmt: skip
    sink.open()
    sink.write(sink.prepare(img[:10], 0))
    sink.write(sink.prepare(img[30:40], 30))
    sink.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bg.tif"]
    assert target.read_bytes() == b"old output"


@pytest.mark.cluster
@pytest.mark.filterwarnings("ignore::UserWarning:distributed")
def test_tiff_inputs_on_distributed_workers(tmp_path):
    from rollmed_dask.cluster import close_client, start_local_cluster

    img = wide(make_stack("uint16", n=120))  # 31-event output chunks: several blocks
    stack, dataset = write_layout("ome-tc", img, tmp_path)
    frames, _ = write_layout("frames-glob", img, tmp_path)
    client = start_local_cluster(2)
    try:
        for source, selection in [(stack, dataset), (frames, "events/image")]:
            out = tmp_path / f"bg-{len(selection)}.zarr"
            summary = compute_background(
                source, out, K, dataset=selection, scheduler=client, progress=False,
                event_chunk=30,
            )  # fmt: skip
            assert "distributed" in summary.scheduler and summary.blocks > 2
            expected = rolling_median_reference(img, K)
            np.testing.assert_array_equal(read_images(out, "events/image_bg"), expected)
    finally:
        close_client(client)


def test_cli_takes_a_folder_of_frames_as_one_stack_and_tiff_stacks_with_pattern(tmp_path):
    img = make_stack("uint8")
    frames, _ = write_layout("frames-folder", img, tmp_path)
    assert main([str(frames), str(tmp_path / "bg.zarr"), "-k", str(K), "-q"]) == 0
    expected = rolling_median_reference(img, K)
    np.testing.assert_array_equal(read_images(tmp_path / "bg.zarr", "events/image_bg"), expected)
    (tmp_path / "raw" / "day1").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "raw" / "day1" / "a.ome.tif", img, ome=True)
    args = ["-r", str(tmp_path / "raw"), str(tmp_path / "out"), "--pattern", "*.tif"]
    assert main([*args, "-k", str(K), "--format", "zarr", "-q"]) == 0
    got = read_images(tmp_path / "out" / "day1" / "a_bg.zarr", "events/image_bg")
    np.testing.assert_array_equal(got, expected)
