"""dcnum's whole pipeline, and ``chipstream-cli``, take our background as their own.

For each kind of input we accept (string and byte-string metadata, images in a
file basin, another chunking, virtual images) and for a new output file (lean:
the images a virtual dataset; or with a copy of them) and the input changed in
place, dcnum 0.31's ``DCNumJobRunner`` with a rollmed background of the same
K and B, and ``chipstream-cli -b rollmed -kb kernel_size=K``, in both basin
strategies ("tap" and "drain"), must skip their background step (their own job
log says so) and give a result whose ``image_bg`` and every feature, ``image``,
``frame`` and ``time`` included, equal a plain dcnum run on the raw input.

These run the real programs on small stacks, each in a process of its own
(see ``run_pipeline``). dcnum is given absolute paths (a relative input path
with a folder part fails in dcnum 0.31). Results are read with dcnum's
reader, through their basins, as dcnum's users read them.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import warnings

import h5py
import hdf5plugin  # noqa: F401  (zstd filter)
import numpy as np
import pytest

from rollmed_dask import compute_background, rtdc
from rollmed_dask.example import write_example

dcnum_read = pytest.importorskip("dcnum.read")
# A hang of dcnum's pipeline is retried once and shown (``run_pipeline``), not an error.
pytestmark = pytest.mark.filterwarnings("always:dcnum's pipeline hung:UserWarning")

N_EVENTS = 120
K = 20
BATCH = 10000  # dcnum's and chipstream's default batch_size
DCNUM_JOB = pathlib.Path(__file__).with_name("dcnum_pipeline_job.py")
HANG_S = 180  # a run here takes 3 to 10 s


def run_dcnum(path_in, path_out, strategy="tap") -> dict:
    """dcnum's pipeline (rollmed K, B; default segmentation and features); its job log.

    ``strategy`` "tap" (chipstream-cli's default) links the input's features
    into the result through a basin, "drain" (``--drain-basins``) copies them.
    """
    args = [str(path_in), str(path_out), strategy, str(K), str(BATCH)]
    return run_pipeline([sys.executable, str(DCNUM_JOB), *args], path_out)


def run_chipstream(path_in, path_out, *extra) -> dict:
    chipstream_cli = pathlib.Path(sys.executable).with_name("chipstream-cli")
    command = [str(chipstream_cli), "-b", "rollmed", "-kb", f"kernel_size={K}"]
    command += ["--num-cpus", "1", *extra]
    command += [str(pathlib.Path(path_in).resolve()), str(pathlib.Path(path_out).resolve())]
    return run_pipeline(command, path_out)


def run_pipeline(command, path_out) -> dict:
    """Run dcnum's pipeline (``command``) to its end; the job log of its result.

    The pipeline runs in a process group of its own, so that a hung run is
    killed with its workers: a worker left behind would keep pytest from
    exiting (Python joins such children at exit), and CI would never end.
    dcnum 0.31 hung once in 28 CI runs (600 s inside its runner's
    ``task_segment_extract``, run then in pytest's process), on an input the
    other runs read right; 300 runs of that pipeline here never hung. A hang
    is shown as a warning with the processes' stacks, and run once more; a
    second hang, an error or a wrong result fails the test.
    """
    for attempt in (1, 2):
        stacks = run_in_own_group(command)
        if stacks is None:
            return job_log(path_out)
        message = f"dcnum's pipeline hung (attempt {attempt}); its stacks:\n{stacks}"
        warnings.warn(message, stacklevel=2)
        pathlib.Path(path_out).unlink(missing_ok=True)
    pytest.fail(f"dcnum's pipeline hung twice: {command}; its stacks:\n{stacks}")


def run_in_own_group(command) -> str | None:
    """None when ``command`` ended; its output when it hung. SIGUSR1 makes the
    processes of ``dcnum_pipeline_job.py`` print their stacks; it ends chipstream-cli."""
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            output, _ = proc.communicate(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGUSR1)
            time.sleep(2)
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.communicate()[0]
    assert proc.returncode == 0, output
    return None


def job_log(path) -> dict:
    """The JSON job log dcnum stores in its output (``logs/dcnum-job-*``)."""
    with h5py.File(path, "r") as h5:
        (name,) = [n for n in h5["logs"] if n.startswith("dcnum-job")]
        return json.loads("\n".join(line.decode() for line in h5["logs"][name][:]))


def all_features(path) -> dict:
    """Every feature of a dcnum output as numpy, through its basins, as dcnum reads it."""
    with dcnum_read.HDF5Data(path) as hd:
        out = {}
        for feat in hd.keys():
            if feat.startswith("basinmap"):
                continue
            data = hd[feat]
            if feat in ("image", "image_bg", "mask"):
                out[feat] = np.stack([data[i] for i in range(len(hd))])
            else:
                out[feat] = np.asarray(data[:])
        return out


def assert_same_result(ours, plain):
    a, b = all_features(ours), all_features(plain)
    assert sorted(a) == sorted(b)
    assert {"image", "image_bg", "mask", "frame", "time", "deform"} <= set(b)
    for feat in b:
        np.testing.assert_array_equal(a[feat], b[feat], err_msg=feat)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> pathlib.Path:
    return write_example(tmp_path_factory.mktemp("raw") / "raw.rtdc", n_events=N_EVENTS, seed=4)


@pytest.fixture(scope="module")
def plain(raw, tmp_path_factory) -> pathlib.Path:
    """dcnum alone on the raw input: it computes the background itself."""
    out = tmp_path_factory.mktemp("plain") / "plain.rtdc"
    assert run_dcnum(raw, out)["tasks"] == {"background": True, "segmentation": True}
    return out


def with_byte_metadata(src, path) -> pathlib.Path:
    """``src`` with its string metadata and a log stored as byte strings, as older
    Shape-In files (e.g. dcnum's test file file_with_variable_length_logs.rtdc)."""
    shutil.copy(src, path)
    with h5py.File(path, "a") as h5:
        for key, value in list(h5.attrs.items()):
            if isinstance(value, str):
                h5.attrs[key] = np.bytes_(value.encode())
        h5["logs"].create_dataset(
            "M1_para.ini", data=["[General]", "a=1"], dtype=h5py.string_dtype()
        )
    return pathlib.Path(path)


def with_basin(src, path) -> pathlib.Path:
    """An .rtdc whose events all live in a file basin pointing at ``src``."""
    with h5py.File(src, "r") as h5in, h5py.File(path, "w") as h5:
        h5.attrs.update(h5in.attrs)
        features = sorted(h5in["events"])
        identifier = rtdc.measurement_identifier(h5in)
        h5.require_group("events")
    with h5py.File(path, "a") as h5:
        rtdc.store_file_basin(h5, src.name, [str(src)], features=features, identifier=identifier)
    return pathlib.Path(path)


def rechunked(src, path, chunk) -> pathlib.Path:
    """``src`` with its images stored in ``chunk``-event gzip chunks."""
    shutil.copy(src, path)
    with h5py.File(path, "a") as h5:
        images = h5["events/image"][:]
        attrs = dict(h5["events/image"].attrs)
        del h5["events/image"]
        ds = h5["events"].create_dataset(
            "image", data=images, chunks=(chunk, *images.shape[1:]), compression="gzip"
        )
        ds.attrs.update(attrs)
    return pathlib.Path(path)


def with_virtual_images(src, path) -> pathlib.Path:
    """``src`` with its images replaced by a virtual dataset onto ``src``'s, as
    dcnum's ``concatenated_hdf5_data`` makes its inputs."""
    shutil.copy(src, path)
    with h5py.File(path, "a", libver="latest") as h5:
        shape, dtype = h5["events/image"].shape, h5["events/image"].dtype
        attrs = dict(h5["events/image"].attrs)
        del h5["events/image"]
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[:] = h5py.VirtualSource(str(src), "events/image", shape=shape)
        h5["events"].create_virtual_dataset("image", layout, fillvalue=0).attrs.update(attrs)
    return pathlib.Path(path)


INPUTS = {
    "strings": lambda raw, d: raw,
    "bytes": lambda raw, d: with_byte_metadata(raw, d / "bytes.rtdc"),
    "basin": lambda raw, d: with_basin(raw, d / "basin.rtdc"),
    "chunks": lambda raw, d: rechunked(raw, d / "chunks.rtdc", 7),
    "virtual": lambda raw, d: with_virtual_images(raw, d / "virtual.rtdc"),
}


def assert_lean(ours, raw):
    """Our output links the raw images (a virtual dataset), a fraction of their size."""
    with h5py.File(ours, "r") as h5:
        assert h5["events/image"].is_virtual
        assert {"frame", "time", "image_bg"} <= set(h5["events"])
    assert ours.stat().st_size < raw.stat().st_size / 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(INPUTS))
def test_dcnum_pipeline_skips_background_of_new_output(kind, raw, plain, tmp_path):
    source = INPUTS[kind](raw, tmp_path)
    ours = tmp_path / "out" / "bg.rtdc"
    ours.parent.mkdir()
    compute_background(source, ours, K, batch_size=BATCH, event_chunk=60, progress=False)
    assert_lean(ours, raw)
    with dcnum_read.HDF5Data(ours) as hd:  # dcnum opens it, image and image_bg
        assert hd.image is not None and hd.image_bg is not None
        assert hd.get_ppid() == rtdc.data_ppid(hd.pixel_size)
    log = run_dcnum(ours, tmp_path / "dcn.rtdc")
    assert log["tasks"] == {"background": False, "segmentation": True}
    assert_same_result(tmp_path / "dcn.rtdc", plain)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["strings", "virtual"])
def test_dcnum_pipeline_drains_lean_output(kind, raw, plain, tmp_path):
    """dcnum's "drain" copies image, frame and time from our lean output into its
    result: the images are read through the virtual dataset (or, when every
    frame gives one event, the virtual dataset itself is copied; its absolute
    source path still finds the raw file from the result's other folder)."""
    source = INPUTS[kind](raw, tmp_path)
    ours = tmp_path / "out" / "bg.rtdc"
    ours.parent.mkdir()
    compute_background(source, ours, K, batch_size=BATCH, progress=False)
    result = tmp_path / "dcn" / "drained.rtdc"
    result.parent.mkdir()
    log = run_dcnum(ours, result, strategy="drain")
    assert log["tasks"] == {"background": False, "segmentation": True}
    with h5py.File(result, "r") as h5:
        assert {"image", "frame", "time", "image_bg"} <= set(h5["events"])  # in the file
    assert_same_result(result, plain)


@pytest.mark.slow
def test_dcnum_pipeline_on_copied_images(raw, plain, tmp_path):
    """copy_images=True: today's self-contained output, the same result."""
    ours = tmp_path / "bg.rtdc"
    compute_background(raw, ours, K, batch_size=BATCH, copy_images=True, progress=False)
    with h5py.File(ours, "r") as h5:
        assert not h5["events/image"].is_virtual
    log = run_dcnum(ours, tmp_path / "dcn.rtdc")
    assert log["tasks"] == {"background": False, "segmentation": True}
    assert_same_result(tmp_path / "dcn.rtdc", plain)


@pytest.mark.slow
def test_dcnum_pipeline_skips_background_at_another_compression(raw, plain, tmp_path):
    """The default is zstd-1; another codec and level (dcnum's gzip-N spelling) works as well."""
    ours = tmp_path / "bg.rtdc"
    compute_background(raw, ours, K, compression="gzip-1", progress=False)
    with h5py.File(ours, "r") as h5:
        assert h5["events/image_bg"].compression_opts == 1
    log = run_dcnum(ours, tmp_path / "dcn.rtdc")
    assert log["tasks"] == {"background": False, "segmentation": True}
    assert_same_result(tmp_path / "dcn.rtdc", plain)


@pytest.mark.slow
def test_dcnum_pipeline_skips_background_in_place(raw, plain, tmp_path):
    source = with_byte_metadata(raw, tmp_path / "in.rtdc")
    compute_background(source, source, K, in_place=True, progress=False)
    log = run_dcnum(source, tmp_path / "dcn.rtdc")
    assert log["tasks"] == {"background": False, "segmentation": True}
    assert_same_result(tmp_path / "dcn.rtdc", plain)


@pytest.mark.slow
def test_chipstream_cli_skips_background(raw, plain, tmp_path):
    """The two commands a ChipStream user runs, on a new output and in place."""
    ours = tmp_path / "bg.rtdc"
    compute_background(raw, ours, K, progress=False)
    in_place = pathlib.Path(shutil.copy(raw, tmp_path / "in.rtdc"))
    compute_background(in_place, in_place, K, in_place=True, progress=False)
    assert_lean(ours, raw)
    runs = [(ours, ()), (ours, ("--drain-basins",)), (in_place, ())]
    for source, extra in runs:
        out = tmp_path / f"{source.stem}{''.join(extra)}_dcn.rtdc"
        log = run_chipstream(source, out, *extra)
        assert log["tasks"] == {"background": False, "segmentation": True}
        assert_same_result(out, plain)


def test_a_hung_pipeline_is_killed_with_its_children(tmp_path, monkeypatch):
    """A run that never ends is stopped after HANG_S with every process it started:
    a child left behind would keep pytest from exiting."""
    monkeypatch.setattr(sys.modules[__name__], "HANG_S", 3)
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "hangs.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    output = run_in_own_group([sys.executable, str(script)])
    assert output is not None and "started" in output
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while pathlib.Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # killed; reaped by init
    assert not pathlib.Path(f"/proc/{child}").exists()
    assert run_in_own_group([sys.executable, "-c", "print('quick')"]) is None
