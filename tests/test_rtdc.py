"""The .rtdc conventions (rollmed_dask.rtdc) and the example writer, against dcnum/dclab.

dcnum 0.31 and dclab are test dependencies only: every comparison here runs
dcnum's or dclab's own code on the same input and checks that our
re-implementation writes the same thing.

dcnum starts ``spawn`` worker processes, so the code that runs
``BackgroundRollMed`` must live in this module (never in stdin).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time

import h5py
import hdf5plugin  # noqa: F401  (zstd filter for reading the files directly)
import numpy as np
import pytest

from rollmed_dask import rtdc
from rollmed_dask.example import write_example

dclab = pytest.importorskip("dclab")
dcnum_writer = pytest.importorskip("dcnum.write")
dcnum_read = pytest.importorskip("dcnum.read")
dcnum_bg = pytest.importorskip("dcnum.feat.feat_background.bg_roll_median")
dcnum_ppid = pytest.importorskip("dcnum.meta.ppid")
dcnum_logic = pytest.importorskip("dcnum.logic")

N_EVENTS = 120
SHAPE = (80, 320)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def filters(ds: h5py.Dataset) -> list:
    """The HDF5 filter pipeline of a dataset as (id, flags, cd_values) tuples."""
    plist = ds.id.get_create_plist()
    return [plist.get_filter(i)[:3] for i in range(plist.get_nfilters())]


def layout(ds: h5py.Dataset) -> tuple:
    return ds.shape, ds.dtype, ds.chunks, ds.maxshape, filters(ds)


def attr_types(obj) -> dict:
    """Attribute values together with their stored HDF5 dtypes."""
    return {k: (obj.attrs[k], obj.attrs.get_id(k).dtype) for k in obj.attrs}


def basin_texts(path) -> dict:
    with h5py.File(path, "r") as h5:
        return {k: b"\n".join(h5["basins"][k][:].tolist()).decode() for k in h5.get("basins", {})}


def add_table_and_logs(path):
    """Give an example file what real files also have: a table, more logs."""
    with h5py.File(path, "a") as h5:
        table = np.zeros(5, dtype=[("time", "f8"), ("temperature", "f4")])
        table["time"] = np.arange(5)
        table["temperature"] = 23.5
        ds = h5.require_group("tables").create_dataset("cytoshot_monitor", data=table)
        ds.attrs["software"] = "CytoShot 1.2"
        # a variable-length string log, as some older tools write them
        h5["logs"].create_dataset(
            "M1_para.ini",
            data=["[General]", "Sample=x", "Medium=CellCarrierB"],
            dtype=h5py.string_dtype(),
        )
        # an empty log must be skipped
        h5["logs"].create_dataset("empty", shape=(0,), dtype="S10")


# --------------------------------------------------------------------------
# example.py
# --------------------------------------------------------------------------


def test_example_opens_in_dclab_and_is_valid(tmp_path):
    # 700 events: several generation batches (320 events each) and a partial chunk
    path = write_example(tmp_path / "ex.rtdc", n_events=700, image_shape=SHAPE, seed=3)
    assert path == tmp_path / "ex.rtdc"
    with h5py.File(path, "r") as h5:
        ds = h5["events/image"]
        assert ds.dtype == np.uint8
        assert ds.shape == (700, *SHAPE)
        assert ds.chunks == (40, *SHAPE)
        assert ds.maxshape == (None, *SHAPE)
        assert filters(ds) == [(32015, 1, (5,)), (h5py.h5z.FILTER_FLETCHER32, 0, ())]
        for key, value in rtdc.IMAGE_ATTRS.items():
            assert ds.attrs[key] == value
            assert ds.attrs.get_id(key).dtype.char == "S"
        images = ds[:]
        frame = h5["events/frame"][:]
        assert h5["events/frame"].dtype == np.uint64
        assert np.all(np.diff(frame) >= 1)
        assert h5.attrs["experiment:event count"] == 700
        assert h5["logs/rollmed-dask-example"].dtype.kind == "S"

    # realistic, not trivial: sensible grey levels, some cells, some empty frames
    assert 40 < images.mean() < 140
    assert images.min() < 30 and images.max() > 110
    with h5py.File(path, "r") as h5:
        deform = h5["events/deform"][:]
    assert 0.05 < np.mean(np.isnan(deform)) < 0.8
    assert np.all(deform[~np.isnan(deform)] >= 0)

    with dclab.new_dataset(path) as ds:
        assert {"image", "frame", "time", "index", "deform", "area_um"} <= set(ds.features)
        assert len(ds) == 700
        assert np.array_equal(ds["image"][5], images[5])
        assert np.array_equal(ds["image"][699], images[699])
        assert ds.config["imaging"]["roi size x"] == SHAPE[1]
        assert ds.config["imaging"]["roi size y"] == SHAPE[0]
        assert ds.config["setup"]["chip region"] == "channel"
        assert json.loads("\n".join(ds.logs["rollmed-dask-example"]))["n_events"] == 700

    # dclab's integrity check: no violations and no alerts
    viol, alerts, _ = dclab.rtdc_dataset.check.check_dataset(path)
    assert viol == []
    assert alerts == []


def test_example_deterministic(tmp_path):
    # no timing assert here (shared, noisy machines): the benchmark times the generator
    a = write_example(tmp_path / "a.rtdc", n_events=2000, seed=0)
    b = write_example(tmp_path / "b.rtdc", n_events=50, seed=0)
    c = write_example(tmp_path / "c.rtdc", n_events=50, seed=1)
    with h5py.File(a) as ha, h5py.File(b) as hb, h5py.File(c) as hc:
        # the same seed gives the same events, whatever n_events
        assert np.array_equal(ha["events/image"][:50], hb["events/image"][:])
        assert not np.array_equal(hb["events/image"][:], hc["events/image"][:])


def test_example_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_events"):
        write_example(tmp_path / "x.rtdc", n_events=0)
    with pytest.raises(ValueError, match="image_shape"):
        write_example(tmp_path / "x.rtdc", n_events=5, image_shape=(8, 320))


# --------------------------------------------------------------------------
# small conventions
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((80, 320), np.uint8),
        ((80, 250), np.uint8),
        ((80, 320), np.float32),
        ((1000, 1000), np.uint8),
        ((4, 4), np.uint8),
        ((), np.float64),
        ((), np.uint32),
        ((80, 320), np.uint16),
    ],
)
def test_default_chunk_events_matches_dcnum(shape, dtype):
    expected = dcnum_writer.HDF5Writer.get_best_nd_chunks(shape, feat_dtype=dtype)[0]
    assert rtdc.default_chunk_events(shape, dtype) == expected
    if len(shape) == 2 and np.dtype(dtype).itemsize == 1:
        # the README's formula ("Output format") for uint8
        assert expected == min(1000, max(10, 2**20 // (shape[0] * shape[1])))


def test_filter_kwargs_match_dcnum():
    assert rtdc.filter_kwargs() == dcnum_writer.set_default_filter_kwargs()
    assert rtdc.filter_kwargs(False) == dcnum_writer.set_default_filter_kwargs(compression=False)
    assert rtdc.filter_kwargs({"compression": "gzip"}) == {
        "compression": "gzip",
        "fletcher32": True,
    }
    with pytest.raises(ValueError, match="compression"):
        rtdc.filter_kwargs("zstd")


@pytest.mark.parametrize("k,b", [(100, 10000), (10, 50), (1, 1), (7, 123), (250, 2500)])
def test_bg_ppid_matches_dcnum(k, b):
    cls = dcnum_bg.BackgroundRollMed
    assert rtdc.bg_ppid(k, b) == cls.get_ppid_from_ppkw({"kernel_size": k, "batch_size": b})
    assert rtdc.bg_ppid_attrs(k, b) == {
        "dcnum ppid background": cls.get_ppid_from_ppkw({"kernel_size": k, "batch_size": b}),
        "dcnum ppid generation": dcnum_ppid.DCNUM_PPID_GENERATION,
    }
    # the abbreviations come from dcnum's unique-prefix rule
    assert dcnum_ppid.get_unique_prefix(["kernel_size", "batch_size"]) == ["k", "b"]


@pytest.mark.parametrize("bad", [1.5, "10", True, None])
def test_bg_ppid_rejects_non_integers(bad):
    with pytest.raises(TypeError, match="kernel_size"):
        rtdc.bg_ppid_attrs(bad, 10)


def test_bg_ppid_rejects_non_positive():
    with pytest.raises(ValueError, match="batch_size"):
        rtdc.bg_ppid_attrs(10, 0)


# --------------------------------------------------------------------------
# comparison with a real dcnum 0.31 BackgroundRollMed run
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dcnum_run(tmp_path_factory):
    """One dcnum BackgroundRollMed run on a small example (output in a subfolder)."""
    root = tmp_path_factory.mktemp("dcnum_run")
    path_in = write_example(root / "in.rtdc", n_events=N_EVENTS, image_shape=SHAPE, seed=5)
    add_table_and_logs(path_in)
    (root / "out").mkdir()
    path_dcnum = root / "out" / "dcnum.rtdc"
    with dcnum_bg.BackgroundRollMed(
        path_in, path_dcnum, kernel_size=10, batch_size=50, num_cpus=1
    ) as bg:
        bg.process()
    return path_in, path_dcnum


@pytest.fixture()
def ours(dcnum_run, tmp_path):
    """Our output for the same input, beside dcnum's, with dcnum's image_bg added."""
    path_in, path_dcnum = dcnum_run
    path_ours = path_dcnum.parent / f"ours-{tmp_path.name}.rtdc"
    with h5py.File(path_ours, "w", libver="latest") as h5:
        rtdc.prepare_output_file(h5, path_in)
        with h5py.File(path_dcnum, "r") as hd:
            bg_data = hd["events/image_bg"][:]
        ds = rtdc.create_image_dataset(h5["events"], "image_bg", N_EVENTS, SHAPE, np.uint8)
        ds[:] = bg_data
        ds.attrs.update(rtdc.bg_ppid_attrs(kernel_size=10, batch_size=50))
    yield path_ours
    path_ours.unlink()


def test_image_bg_dataset_and_attrs_match_dcnum(dcnum_run, ours):
    _, path_dcnum = dcnum_run
    with h5py.File(path_dcnum, "r") as hd, h5py.File(ours, "r") as ho:
        d, o = hd["events/image_bg"], ho["events/image_bg"]
        assert layout(o) == layout(d)
        assert attr_types(o).keys() == attr_types(d).keys()
        for key, (value, dtype) in attr_types(d).items():
            assert attr_types(o)[key][0] == value, key
            assert attr_types(o)[key][1] == dtype, key
        assert d.attrs["dcnum ppid background"] == "rollmed:k=10^b=50"
        assert d.attrs["dcnum ppid generation"] == "13"


def test_root_attrs_logs_tables_match_dcnum(dcnum_run, ours):
    _, path_dcnum = dcnum_run
    with h5py.File(path_dcnum, "r") as hd, h5py.File(ours, "r") as ho:
        assert attr_types(ho) == attr_types(hd)
        for topic in ["logs", "tables"]:
            assert sorted(ho[topic]) == sorted(hd[topic])
            for key in hd[topic]:
                d, o = hd[topic][key], ho[topic][key]
                assert layout(o) == layout(d), key
                assert np.array_equal(o[:], d[:]), key
                da, oa = dict(d.attrs), dict(o.attrs)
                # the only difference: who appended itself to "software"
                assert da.pop("software").replace("dcnum 0.31.0", "") == oa.pop(
                    "software"
                ).replace(rtdc.software_string(), "")
                assert oa == da
        assert "empty" not in ho["logs"]
        assert ho["logs/M1_para.ini"].dtype == np.dtype("S19")
        assert ho["tables/cytoshot_monitor"].attrs["software"].startswith("CytoShot 1.2 | ")


def test_basin_json_matches_dcnum(dcnum_run, ours):
    path_in, path_dcnum = dcnum_run
    ((key_d, text_d),) = basin_texts(path_dcnum).items()
    ((key_o, text_o),) = basin_texts(ours).items()
    bd, bo = json.loads(text_d), json.loads(text_o)
    # dcnum's BackgroundRollMed stores the input path exactly as it was given
    # (here absolute); we store the absolute and the relative path, as
    # dcnum's pipeline does for its basins.
    assert bd["paths"] == [str(path_in)]
    assert bo["paths"] == [str(path_in), os.path.join("..", "in.rtdc")]
    assert bd["description"] == "Created by dcnum 0.31.0"
    assert bo["description"] == f"Created by {rtdc.software_string()}"
    assert bo["identifier"] == bd["identifier"] is not None
    assert list(bo) == list(bd)
    bo.update(paths=bd["paths"], description=bd["description"])
    assert json.dumps(bo, indent=2) == text_d
    # dataset layout of the basin definition
    with h5py.File(path_dcnum, "r") as hd, h5py.File(ours, "r") as ho:
        # (one line more for the second path, hence not the same shape)
        assert layout(ho["basins"][key_o])[4] == layout(hd["basins"][key_d])[4]
        assert ho["basins"][key_o].dtype.kind == "S"
    assert (
        key_o
        == rtdc.basin_json(
            **{k: v for k, v in json.loads(text_o).items() if k not in ("format", "type")}
        )[0]
    )


def test_basin_byte_identical_to_create_with_basins(dcnum_run, tmp_path):
    """dcnum's create_with_basins with [absolute, relative] paths, as we write them."""
    path_in, path_dcnum = dcnum_run
    out_dir = path_dcnum.parent
    rel = os.path.relpath(path_in, out_dir)
    p_d = out_dir / f"cwb-{tmp_path.name}.rtdc"
    p_o = out_dir / f"ours2-{tmp_path.name}.rtdc"
    p_c = out_dir / f"ours3-{tmp_path.name}.rtdc"
    try:
        dcnum_writer.create_with_basins(p_d, basin_paths=[[str(path_in), rel]])
        with h5py.File(p_o, "w", libver="latest") as h5:
            rtdc.prepare_output_file(h5, path_in)
        with h5py.File(p_c, "w", libver="latest") as h5:
            rtdc.prepare_output_file(h5, path_in, copy_images=True)
        ((kd, td),) = basin_texts(p_d).items()
        ((ko, to),) = basin_texts(p_o).items()
        assert to == td.replace("Created by dcnum 0.31.0", f"Created by {rtdc.software_string()}")
        with h5py.File(p_d, "r") as hd, h5py.File(p_o, "r") as ho:
            assert layout(ho["basins"][ko]) == layout(hd["basins"][kd])
            assert attr_types(ho) == attr_types(hd)
            assert sorted(ho) == sorted(hd)
            assert sorted(hd["events"]) == []
            # what dcnum's pipeline reads from its input file itself (not through
            # basins): the frame features and the images, stored as in the input
            assert sorted(ho["events"]) == ["frame", "image", "time"]
            # by default the images are a virtual dataset onto the input's
            # (absolute path, then relative), with the input's attributes;
            # copy_images gives a copy with the input's layout
            with h5py.File(path_in, "r") as hi, h5py.File(p_c, "r") as hc:
                assert ho["events/image"].is_virtual and not hc["events/image"].is_virtual
                sources = [vs.file_name for vs in ho["events/image"].virtual_sources()]
                assert sources == [str(path_in.resolve()), rel]
                assert attr_types(ho["events/image"]) == attr_types(hi["events/image"])
                assert layout(hc["events/image"]) == layout(hi["events/image"])
                np.testing.assert_array_equal(ho["events/time"][:], hi["events/time"][:])
                for h5 in (ho, hc):
                    np.testing.assert_array_equal(h5["events/image"][5], hi["events/image"][5])
    finally:
        for p in (p_d, p_o, p_c):
            p.unlink(missing_ok=True)


def test_measurement_identifier_matches_dcnum_and_dclab(dcnum_run):
    path_in, _ = dcnum_run
    with h5py.File(path_in, "r") as h5:
        ours = rtdc.measurement_identifier(h5)
        assert ours == dcnum_read.get_measurement_identifier(h5)
    with dclab.new_dataset(path_in) as ds:
        assert ours == ds.get_measurement_identifier()


def test_measurement_identifier_rules(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as h5:
        assert rtdc.measurement_identifier(h5) is None
        h5.attrs["experiment:date"] = "2024-01-01"
        h5.attrs["experiment:time"] = "10:00:00"
        assert rtdc.measurement_identifier(h5) is None
        h5.attrs["setup:identifier"] = np.bytes_("ZMDD-1")  # old files store bytes
        with dclab.new_dataset({"deform": np.ones(2)}) as ds:
            ds.config["experiment"].update({"date": "2024-01-01", "time": "10:00:00"})
            ds.config["setup"]["identifier"] = "ZMDD-1"
            assert rtdc.measurement_identifier(h5) == ds.get_measurement_identifier()
        h5.attrs["experiment:run identifier"] = "abc"
        assert rtdc.measurement_identifier(h5) == "abc"


def test_output_opens_in_dclab_with_image_and_image_bg(dcnum_run, ours):
    path_in, path_dcnum = dcnum_run
    with h5py.File(path_in, "r") as h5:
        images = h5["events/image"][:]
    with h5py.File(path_dcnum, "r") as h5:
        bg = h5["events/image_bg"][:]
    with dclab.new_dataset(ours) as ds:
        assert "deform" in ds.features_basin
        assert {"image", "image_bg", "frame"} <= set(ds.features_innate)
        assert {"image", "image_bg", "deform", "frame"} <= set(ds.features)
        assert np.array_equal(ds["image"][17], images[17])
        assert np.array_equal(ds["image_bg"][17], bg[17])
        assert len(ds) == N_EVENTS
    with dcnum_read.HDF5Data(ours) as hd:
        assert np.array_equal(hd.image[3], images[3])
        assert np.array_equal(hd.image_bg[3], bg[3])
    # our own resolver reads the images through the link, like any dataset
    assert rtdc.find_image_dataset(ours) == (ours.resolve(), "events/image", None, ())
    assert rtdc.find_image_dataset(ours, "events/image_bg") == (
        ours.resolve(),
        "events/image_bg",
        None,
        (),
    )


def test_prepare_output_file_errors(dcnum_run, tmp_path):
    path_in, _ = dcnum_run
    with h5py.File(tmp_path / "o.rtdc", "w") as h5:
        with pytest.raises(FileNotFoundError):
            rtdc.prepare_output_file(h5, tmp_path / "missing.rtdc")
    with h5py.File(path_in, "r") as h5:
        with pytest.raises(ValueError, match="is the input"):
            rtdc.prepare_output_file(h5, path_in)
    with h5py.File(tmp_path / "plain.h5", "w") as h5:
        h5["images"] = np.zeros((3, 4, 4), np.uint8)
    with h5py.File(tmp_path / "o2.rtdc", "w") as h5:
        with pytest.raises(ValueError, match="no 'events' group"):
            rtdc.prepare_output_file(h5, tmp_path / "plain.h5")


# --------------------------------------------------------------------------
# basins written by dcnum's and dclab's writers
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_input(tmp_path_factory):
    root = tmp_path_factory.mktemp("basins")
    return write_example(root / "raw.rtdc", n_events=60, image_shape=(32, 64), seed=2)


def copy_attrs(src, dst):
    with h5py.File(src, "r") as hs, h5py.File(dst, "a") as hd:
        hd.attrs.update(hs.attrs)


def test_store_file_basin_mapped_matches_dcnum(small_input, tmp_path):
    mapping = np.array([0, 5, 7, 7, 30, 59], dtype=np.int64)
    kw = dict(
        name="raw.rtdc",
        paths=[str(small_input), "raw.rtdc"],
        features=["image"],
        description="d",
        identifier="abc",
    )
    with h5py.File(tmp_path / "d.rtdc", "w", libver="latest") as h5:
        with dcnum_writer.HDF5Writer(h5) as hw:
            hw.store_basin(mapping=mapping, **kw)
            hw.store_basin(mapping=mapping[::-1].copy(), **kw)
    with h5py.File(tmp_path / "o.rtdc", "w", libver="latest") as h5:
        assert rtdc.store_file_basin(h5, mapping=mapping, **kw) in h5["basins"]
        rtdc.store_file_basin(h5, mapping=mapping[::-1].copy(), **kw)
        rtdc.store_file_basin(h5, mapping=mapping, **kw)  # identical: not stored twice
    assert basin_texts(tmp_path / "o.rtdc") == basin_texts(tmp_path / "d.rtdc")
    with h5py.File(tmp_path / "d.rtdc") as hd, h5py.File(tmp_path / "o.rtdc") as ho:
        assert sorted(ho["events"]) == sorted(hd["events"]) == ["basinmap0", "basinmap1"]
        for key in hd["events"]:
            assert layout(ho["events"][key]) == layout(hd["events"][key])
            assert np.array_equal(ho["events"][key][:], hd["events"][key][:])
        for key in hd["basins"]:
            assert layout(ho["basins"][key]) == layout(hd["basins"][key])


def test_write_log_matches_dcnum_and_dclab_reads_it(small_input, tmp_path):
    lines = ["{", '  "a": 1,', '  "path": "/data/x.rtdc"', "}"]
    with h5py.File(tmp_path / "d.rtdc", "w") as h5:
        dcnum_writer.HDF5Writer(h5).store_log("job", lines)
    with h5py.File(tmp_path / "o.rtdc", "w") as h5:
        rtdc.write_log(h5, "job", lines)
        with pytest.raises(ValueError, match="already exists"):
            rtdc.write_log(h5, "job", lines)
        rtdc.write_log(h5, "job", lines, override=True)
        with pytest.raises(ValueError, match="no lines"):
            rtdc.write_log(h5, "nothing", [])
    with h5py.File(tmp_path / "d.rtdc") as hd, h5py.File(tmp_path / "o.rtdc") as ho:
        assert layout(ho["logs/job"]) == layout(hd["logs/job"])
        assert np.array_equal(ho["logs/job"][:], hd["logs/job"][:])

    out = tmp_path / "copy.rtdc"
    shutil.copy(small_input, out)
    t0 = time.time()
    params = {
        "kernel_size": 100,
        "dataset": "events/image",
        "shape": (3, 4),
        "path": pathlib.Path("/x"),
        "k": np.int64(5),
    }
    log = rtdc.run_log_lines(
        params, input_path=small_input, output_path=out, time_start=t0 - 2, time_end=t0
    )
    name = rtdc.run_log_name(t0)
    with h5py.File(out, "a") as h5:
        rtdc.write_log(h5, name, log)
        rtdc.write_log(h5, "unicode", ["Temperatur 23 °C", "µm"])
    with dclab.new_dataset(out) as ds:
        assert ds.logs[name] == log
        assert ds.logs["unicode"] == ["Temperatur 23 °C", "µm"]
    info = json.loads("\n".join(log))
    assert info["tool"] == "rollmed-dask"
    assert info["software"] == rtdc.software_string()
    assert info["parameters"] == {
        "kernel_size": 100,
        "dataset": "events/image",
        "shape": [3, 4],
        "path": "/x",
        "k": 5,
    }
    assert info["input"] == {"path": str(small_input), "size": small_input.stat().st_size}
    assert info["time"]["duration s"] == 2.0
    assert info["host"]["libraries"]["numpy"] == np.__version__
    assert name.startswith("rollmed-dask-job-") and len(name) == len("rollmed-dask-job-") + 19


def test_find_image_dataset_in_file(small_input):
    loc = rtdc.find_image_dataset(small_input)
    assert loc == (small_input.resolve(), "events/image", None, ())
    with pytest.raises(FileNotFoundError):
        rtdc.find_image_dataset(small_input.parent / "nope.rtdc")


def test_find_image_dataset_file_basin_relative_path(small_input, tmp_path):
    # a basin whose first path does not exist and whose second is relative
    # to the referring file's folder (not the working directory)
    sub = tmp_path / "sub"
    sub.mkdir()
    raw = shutil.copy(small_input, sub / "raw.rtdc")
    ref = sub / "ref.rtdc"
    with h5py.File(small_input) as h5:
        ident = rtdc.measurement_identifier(h5)
    with h5py.File(ref, "w") as h5:
        rtdc.store_file_basin(
            h5, "raw", ["/does/not/exist.rtdc", "raw.rtdc"], features=["image"], identifier=ident
        )
    loc = rtdc.find_image_dataset(ref)
    assert loc.path == pathlib.Path(raw).resolve()
    assert loc.dataset == "events/image" and loc.mapping is None
    assert "raw" in loc.via[0]

    # wrong identifier: skipped, and the error says why
    bad = sub / "bad.rtdc"
    with h5py.File(bad, "w") as h5:
        h5.require_group("events")["deform"] = np.zeros(3)
        rtdc.store_file_basin(h5, "raw", ["raw.rtdc"], features=["image"], identifier="other")
    with pytest.raises(KeyError, match="expected 'other'") as exc:
        rtdc.find_image_dataset(bad)
    assert "events/deform" in str(exc.value)

    # a basin that does not list the feature is not followed
    with h5py.File(bad, "a") as h5:
        del h5["basins"]
        rtdc.store_file_basin(h5, "raw", ["raw.rtdc"], features=["deform"])
    with pytest.raises(KeyError, match="neither in"):
        rtdc.find_image_dataset(bad)
    # a basin without a feature list is followed
    with h5py.File(bad, "a") as h5:
        del h5["basins"]
        rtdc.store_file_basin(h5, "raw", ["raw.rtdc"])
    assert rtdc.find_image_dataset(bad).path == pathlib.Path(raw).resolve()


def test_find_image_dataset_missing_everywhere(tmp_path):
    p = tmp_path / "x.rtdc"
    with h5py.File(p, "w") as h5:
        h5.require_group("events")["deform"] = np.zeros(3)
        h5["foo"] = np.zeros(2)
    with pytest.raises(KeyError, match=r"'events/image'.*\['events/deform', 'foo'\]"):
        rtdc.find_image_dataset(p)
    with pytest.raises(KeyError, match="basins only provide"):
        rtdc.find_image_dataset(p, "data/images")


def test_find_image_dataset_cycle(tmp_path):
    a, b = tmp_path / "a.rtdc", tmp_path / "b.rtdc"
    for this, other in [(a, b), (b, a)]:
        with h5py.File(this, "w") as h5:
            h5.require_group("events")["deform"] = np.zeros(3)
            rtdc.store_file_basin(h5, other.name, [str(other)])
    with pytest.raises(KeyError, match="cycle"):
        rtdc.find_image_dataset(a)


def test_find_image_dataset_mapped_basin_dcnum_and_dclab(small_input, tmp_path):
    with h5py.File(small_input) as h5:
        images = h5["events/image"][:]
        deform = h5["events/deform"][:]
        attrs = dict(h5.attrs)
    mapping = np.array([2, 3, 10, 11, 40, 59], dtype=np.int64)

    # mapped basin written by dcnum (a file holding a subset of the events)
    p_dcnum = tmp_path / "subset_dcnum.rtdc"
    with dcnum_writer.HDF5Writer(p_dcnum, mode="w") as hw:
        hw.h5.attrs.update(attrs)
        hw.h5.attrs["experiment:event count"] = mapping.size
        hw.store_feature_chunk("deform", deform[mapping])
        with h5py.File(small_input) as h5:
            ident = dcnum_read.get_measurement_identifier(h5)
        hw.store_basin(
            name="raw",
            paths=[str(small_input)],
            features=["image"],
            mapping=mapping,
            identifier=ident,
        )

    # mapped basin written by dclab (it writes "mapping" and "perishable" keys)
    p_dclab = tmp_path / "subset_dclab.rtdc"
    with dclab.RTDCWriter(p_dclab, mode="reset") as hw:
        hw.store_metadata({"experiment": {"event count": mapping.size}})
        hw.store_feature("deform", deform[mapping])
        hw.store_basin(
            basin_name="raw",
            basin_type="file",
            basin_format="hdf5",
            basin_locs=[small_input],
            basin_feats=["image"],
            basin_map=mapping,
        )

    for path in [p_dcnum, p_dclab]:
        loc = rtdc.find_image_dataset(path)
        assert loc.path == small_input.resolve()
        assert loc.dataset == "events/image"
        assert np.array_equal(loc.mapping, mapping)
        assert loc.mapping.dtype == np.int64
        with h5py.File(loc.path) as h5:
            ours = h5[loc.dataset][:][loc.mapping]
        with dclab.new_dataset(path) as ds:
            assert np.array_equal(ds["image"][:], ours)
        assert np.array_equal(ours, images[mapping])

    # A new output from the dcnum subset file carries the mapped basin over
    # (basinmap0 re-stored) and points at the subset file for the rest.
    out = tmp_path / "out.rtdc"
    with h5py.File(out, "w", libver="latest") as h5:
        rtdc.prepare_output_file(h5, p_dcnum)
    p_cwb = tmp_path / "cwb.rtdc"
    dcnum_writer.create_with_basins(p_cwb, [[str(p_dcnum), p_dcnum.name]])
    with h5py.File(out) as ho, h5py.File(p_cwb) as hd:
        assert np.array_equal(ho["events/basinmap0"][:], mapping)
        assert layout(ho["events/basinmap0"]) == layout(hd["events/basinmap0"])
    assert sorted(basin_texts(out).values()) == sorted(
        t.replace("Created by dcnum 0.31.0", f"Created by {rtdc.software_string()}")
        for t in basin_texts(p_cwb).values()
    )
    loc = rtdc.find_image_dataset(out)
    assert loc.path == small_input.resolve() and np.array_equal(loc.mapping, mapping)
    with dclab.new_dataset(out) as ds:
        assert np.array_equal(ds["image"][:], images[mapping])
        assert np.array_equal(ds["deform"][:], deform[mapping], equal_nan=True)


def test_find_image_dataset_chained_mapping(small_input, tmp_path):
    """A mapped basin of a mapped basin: the mappings compose."""
    m1 = np.array([1, 4, 8, 9, 20, 33, 50], dtype=np.int64)  # mid -> raw
    m2 = np.array([0, 2, 6], dtype=np.int64)  # top -> mid
    mid, top = tmp_path / "mid.rtdc", tmp_path / "top.rtdc"
    with h5py.File(mid, "w") as h5:
        h5.require_group("events")["deform"] = np.zeros(m1.size)
        rtdc.store_file_basin(h5, "raw", [str(small_input)], features=["image"], mapping=m1)
    with h5py.File(top, "w") as h5:
        h5.require_group("events")["deform"] = np.zeros(m2.size)
        rtdc.store_file_basin(h5, "mid", ["mid.rtdc"], features=["image"], mapping=m2)
    loc = rtdc.find_image_dataset(top)
    assert loc.path == small_input.resolve()
    assert np.array_equal(loc.mapping, m1[m2])
    assert len(loc.via) == 2


def test_find_image_dataset_internal_basin(small_input, tmp_path):
    with h5py.File(small_input) as h5:
        images = h5["events/image"][:]
    p = tmp_path / "internal.rtdc"
    mapping = np.repeat(np.arange(3), 20)
    with dcnum_writer.HDF5Writer(p, mode="w") as hw:
        hw.store_feature_chunk("deform", np.zeros(60))
        hw.store_basin(name="sparse bg", internal_data={"image_bg": images[:3]}, mapping=mapping)
    loc = rtdc.find_image_dataset(p, "events/image_bg")
    assert loc.path == p.resolve()
    assert loc.dataset == "basin_events/image_bg"
    assert np.array_equal(loc.mapping, mapping)


def test_a_basin_without_a_name_is_named_by_its_key(tmp_path):
    """What was tried is listed in the error; a basin with no ``name`` (dcnum
    always writes one, other tools may not) goes by its key in ``basins/``."""
    p = tmp_path / "nameless.rtdc"
    line = json.dumps({"format": "hdf5", "type": "file", "mapping": "basinmap0",
                       "paths": ["elsewhere.rtdc"], "features": ["image"]})  # fmt: skip
    with h5py.File(p, "w") as h5:
        h5["events/deform"] = np.zeros(5)
        h5["basins/b7c1e2"] = np.array([line.encode()])
    with pytest.raises(KeyError, match="basin 'b7c1e2' lacks its mapping 'basinmap0'"):
        rtdc.find_image_dataset(p)


def test_copy_file_basins_drops_remote_basins_with_warning(small_input, tmp_path):
    src = tmp_path / "src.rtdc"
    shutil.copy(small_input, src)
    with dclab.RTDCWriter(src) as hw:
        hw.store_basin(
            basin_name="remote",
            basin_type="remote",
            basin_format="http",
            basin_locs=["https://example.org/data.rtdc"],
            verify=False,
        )
        # dclab writes "mapping": "same" for unmapped basins; dcnum 0.31's
        # copy_basins fails on that, we read it as "not mapped"
        hw.store_basin(
            basin_name="file",
            basin_type="file",
            basin_format="hdf5",
            basin_locs=[small_input],
            basin_feats=["image"],
            verify=False,
        )
    with h5py.File(tmp_path / "out.rtdc", "w") as h5:
        with pytest.warns(rtdc.IgnoredBasinWarning, match="remote"):
            rtdc.prepare_output_file(h5, src)
    names = sorted(json.loads(t)["name"] for t in basin_texts(tmp_path / "out.rtdc").values())
    assert names == ["file", "src.rtdc"]


# --------------------------------------------------------------------------
# dcnum's pipeline identifiers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("pixel_size", [0.34, 0.2600000012, 1.0, 0.0, 0.123456789])
def test_data_ppid_matches_dcnum(pixel_size):
    expected = dcnum_read.HDF5Data.get_ppid_from_ppkw(
        {"pixel_size": pixel_size, "index_mapping": None}
    )
    assert rtdc.data_ppid(pixel_size) == expected


def test_pipeline_attrs_equal_a_dcnum_jobs_and_replace_stale_ones(small_input, tmp_path):
    """Written after a background in place: the three ids equal those of dcnum's job
    for that file and K, B; the ids of an older segmentation are gone."""
    path = pathlib.Path(shutil.copy(small_input, tmp_path / "in.rtdc"))
    stale = {
        "pipeline:dcnum background": "sparsemed:k=200^s=1^t=0^f=0.8^o=1",
        "pipeline:dcnum segmenter": "thresh:t=-6:cle=1^f=1^clo=2",
        "pipeline:dcnum feature": "legacy:b=1^h=1^v=1",
        "pipeline:dcnum gate": "norm:o=0^s=10",
        "pipeline:dcnum hash": "abc",
        "pipeline:dcnum yield": 60,
    }
    with h5py.File(path, "a") as h5:
        h5.attrs.update(stale)
    from rollmed_dask import compute_background

    compute_background(path, path, 10, in_place=True, batch_size=50, progress=False)
    job = dcnum_logic.DCNumPipelineJob(
        path_in=path,
        path_out=tmp_path / "unused.rtdc",
        background_code="rollmed",
        background_kwargs={"kernel_size": 10, "batch_size": 50},
    )
    _, _, ids = job.get_ppid(ret_hash=True, ret_dict=True)
    with h5py.File(path, "r") as h5:
        assert h5.attrs["pipeline:dcnum generation"] == ids["gen_id"]
        assert h5.attrs["pipeline:dcnum data"] == ids["dat_id"] == "hdf:p=0.34^i=0"
        assert h5.attrs["pipeline:dcnum background"] == ids["bg_id"] == "rollmed:k=10^b=50"
        for key in rtdc.PIPELINE_SEGMENTATION_ATTRS:
            assert key not in h5.attrs
        assert h5.attrs["pipeline:dcnum yield"] == 60  # which events the file holds


def test_no_pipeline_attrs_for_another_dataset(small_input, tmp_path):
    from rollmed_dask import compute_background

    out = tmp_path / "bg.rtdc"
    compute_background(small_input, out, 10, output_dataset="events/other", progress=False)
    with h5py.File(out, "r") as h5:
        assert not [key for key in h5.attrs if key.startswith("pipeline:")]


def test_basin_identifier_omitted_where_dcnum_and_dclab_disagree(small_input, tmp_path):
    path = pathlib.Path(shutil.copy(small_input, tmp_path / "bytes.rtdc"))
    with h5py.File(path, "r") as h5:
        assert rtdc.basin_identifier(h5) == rtdc.measurement_identifier(h5) is not None
    with h5py.File(path, "a") as h5:
        for key, value in list(h5.attrs.items()):
            if isinstance(value, str):
                h5.attrs[key] = np.bytes_(value.encode())
    with h5py.File(path, "r") as h5:
        assert dcnum_read.get_measurement_identifier(h5) != rtdc.measurement_identifier(h5)
        assert rtdc.measurement_identifier(h5, decode=False) == (
            dcnum_read.get_measurement_identifier(h5)
        )
        assert rtdc.basin_identifier(h5) is None
    from rollmed_dask import compute_background

    out = tmp_path / "bg.rtdc"
    compute_background(path, out, 10, progress=False)
    with dcnum_read.HDF5Data(out) as hd:  # through the basin: dcnum refused it before
        deform = np.asarray(hd["deform"][:])
    with h5py.File(small_input, "r") as h5:
        np.testing.assert_array_equal(deform, h5["events/deform"][:])
    with dclab.new_dataset(out) as ds:
        assert {"image", "image_bg", "deform"} <= set(ds.features)


# --- the rtdc helpers' refusals and rarer inputs (mutation survivors, issue 23) ---


def test_a_file_with_ten_basin_maps_takes_no_other_mapping(tmp_path):
    from rollmed_dask.rtdc.basins import _require_basinmap

    with h5py.File(tmp_path / "full.rtdc", "w") as h5:
        for i in range(10):
            h5[f"events/basinmap{i}"] = np.arange(5) + i
        assert _require_basinmap(h5, np.arange(5) + 3) == "basinmap3"  # the same one is reused
        with pytest.raises(ValueError, match="already uses basinmap0 ... basinmap9"):
            _require_basinmap(h5, np.zeros(5, dtype=int))


def test_prepare_output_file_refuses_a_read_only_output(small_input, tmp_path):
    out = tmp_path / "out.rtdc"
    h5py.File(out, "w").close()
    with h5py.File(out, "r") as h5, pytest.raises(ValueError, match="is open read-only"):
        rtdc.prepare_output_file(h5, small_input)


def test_the_input_basin_lists_the_inputs_internal_basin_features(small_input, tmp_path):
    with h5py.File(small_input) as h5:
        images = h5["events/image"][:3]
    source = tmp_path / "internal.rtdc"
    with dcnum_writer.HDF5Writer(source, mode="w") as hw:
        hw.store_feature_chunk("deform", np.zeros(60))
        hw.store_basin(name="sparse bg", internal_data={"image_bg": images},
                       mapping=np.repeat(np.arange(3), 20))  # fmt: skip
    with h5py.File(tmp_path / "out.rtdc", "w") as h5:
        rtdc.prepare_output_file(h5, source)
        bdicts = rtdc.basins._read_basin_dicts(h5)
    (to_input,) = [b for b in bdicts if b.get("type") == "file"]
    assert to_input["features"] == ["deform", "image_bg"]


def test_images_the_chunk_copy_cannot_take_are_copied_by_hdf5(small_input, tmp_path):
    """Contiguous images (no chunks to copy raw) go through h5py's copy."""
    with h5py.File(small_input) as h5:
        images = h5["events/image"][:]
    source = tmp_path / "contiguous.rtdc"
    shutil.copy(small_input, source)
    with h5py.File(source, "a") as h5:
        del h5["events/image"]
        h5["events/image"] = images
    with h5py.File(tmp_path / "out.rtdc", "w") as h5:
        assert rtdc.add_pipeline_inputs(h5, source, copy_images=True) is None
        np.testing.assert_array_equal(h5["events/image"][:], images)
    with h5py.File(source, "a"):  # the input was closed again: it opens for writing
        pass
    with h5py.File(tmp_path / "taken.rtdc", "w") as h5:  # a failed copy closes it too
        h5["events/image"] = np.zeros(3)
        with pytest.raises(RuntimeError, match="already exists"):
            rtdc.add_pipeline_inputs(h5, source, copy_images=True)
    with h5py.File(source, "a"):
        pass


def test_an_internal_basin_without_the_feature_is_listed_in_the_error(tmp_path):
    p = tmp_path / "internal.rtdc"
    with dcnum_writer.HDF5Writer(p, mode="w") as hw:
        hw.store_feature_chunk("deform", np.zeros(6))
        hw.store_basin(name="sparse", internal_data={"deform": np.zeros(2)},
                       mapping=np.repeat(np.arange(2), 3))  # fmt: skip
    with h5py.File(p, "a") as h5:  # a basin that claims images it does not hold
        (info,) = rtdc.basins._read_basin_dicts(h5)
        key = info.pop("key")
        del h5["basins"][key]
        info["features"] = ["deform", "image"]
        h5["basins"][key] = np.array([json.dumps(info).encode()])
    with pytest.raises(KeyError, match="internal basin 'sparse' lacks 'basin_events/image'"):
        rtdc.find_image_dataset(p)


def test_an_image_shape_without_pixels_is_refused():
    with pytest.raises(ValueError, match=r"image_shape=\(0, 320\) has no pixels"):
        rtdc.default_chunk_events((0, 320), "uint8")


def test_a_library_that_is_not_installed_is_logged_as_none(monkeypatch):
    monkeypatch.setattr(rtdc.logs, "_LIBRARIES", ("numpy", "no-such-library-here"))
    info = json.loads("\n".join(rtdc.run_log_lines({})))
    assert info["host"]["libraries"]["no-such-library-here"] is None
    assert info["host"]["libraries"]["numpy"] == np.__version__
    # no start, input or output given: none is made up
    assert info["time"]["start"] is None and "input" not in info and "output" not in info
    info = json.loads("\n".join(rtdc.run_log_lines({}, output_path="out.rtdc")))
    assert info["output"] == {"path": str(pathlib.Path("out.rtdc").absolute())}
    assert list(info) == sorted(info) and list(info["host"]) == sorted(info["host"])  # as said


def test_prepare_output_file_names_a_missing_input(tmp_path):
    with h5py.File(tmp_path / "out.rtdc", "w") as h5:
        with pytest.raises(FileNotFoundError, match="input file '.*nope.rtdc' does not exist"):
            rtdc.prepare_output_file(h5, tmp_path / "nope.rtdc")


def test_an_output_of_an_input_without_features_still_has_events(tmp_path):
    """As dcnum's HDF5Writer, which always creates the group dcnum's readers need."""
    source = tmp_path / "bare.rtdc"
    with h5py.File(source, "w") as h5:
        h5.create_group("events")
    with h5py.File(tmp_path / "out.rtdc", "w") as h5:
        rtdc.prepare_output_file(h5, source)
        assert isinstance(h5.get("events"), h5py.Group)


def test_copying_the_images_leaves_no_file_open(small_input, tmp_path):
    def open_files():
        return sorted(os.listdir("/proc/self/fd"))

    with h5py.File(tmp_path / "out.rtdc", "w") as h5:
        before = open_files()
        rtdc.add_pipeline_inputs(h5, small_input, copy_images=True)
        assert open_files() == before
        with h5py.File(small_input) as src:
            np.testing.assert_array_equal(h5["events/image"][:], src["events/image"][:])


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [([], None), ([4], slice(4, 5, 1)), ([3, 4, 5, 6], slice(3, 7, 1)),
     ([2, 5, 8], slice(2, 9, 3)), ([5, 5, 5], None), ([1, 2, 4], None), ([4, 3], None)],
)  # fmt: skip
def test_a_mapping_is_a_slice_only_when_its_steps_are_regular(mapping, expected):
    from rollmed_dask.rtdc.basins import _regular_stride

    assert _regular_stride(np.array(mapping, dtype=np.int64)) == expected


def test_images_behind_an_irregular_mapping_are_not_linked(small_input, tmp_path):
    loc = rtdc.basins.ImageLocation(small_input, "events/image", np.array([0, 1, 3]), ())
    with h5py.File(tmp_path / "out.rtdc", "w") as h5:
        h5.create_group("events")
        assert rtdc.link_images(h5, loc) is False
        assert "image" not in h5["events"]
        assert rtdc.link_images(h5, loc._replace(mapping=np.array([0, 2, 4]))) is True
        assert h5["events/image"].shape[0] == 3


def _store_basins(path, basins: dict) -> None:
    """``basins/<key>``: one JSON line each, as dcnum stores them."""
    with h5py.File(path, "a") as h5:
        h5.require_group("events")
        for key, info in basins.items():
            h5[f"basins/{key}"] = np.array([json.dumps(info).encode()])


def test_every_basin_tried_is_named_with_why_it_gave_no_images(tmp_path):
    here = tmp_path / "here.rtdc"
    bare = tmp_path / "bare.rtdc"
    _store_basins(bare, {})
    file = {"type": "file", "format": "hdf5", "features": ["image"]}
    _store_basins(here, {
        "k1": {"name": "on s3", "type": "file", "format": "s3", "paths": ["x"]},
        "k2": {**file, "name": "gone", "paths": ["missing.rtdc"]},
        "k3": {**file, "name": "itself", "paths": ["here.rtdc"]},
        "k4": {**file, "name": "bare", "paths": ["bare.rtdc"]},
    })  # fmt: skip
    with pytest.raises(KeyError) as caught:
        rtdc.find_image_dataset(here)
    message = caught.value.args[0]
    for words in [
        "basin 'on s3' of type 'file'/format 's3' cannot be read locally",
        f"basin 'gone' path '{tmp_path / 'missing.rtdc'}' does not exist",
        f"basin 'itself' refers back to {here} (cycle)",
        f"basin 'bare' at {bare}: dataset 'events/image' is neither in {bare}",
    ]:
        assert words in message, words
    with pytest.raises(FileNotFoundError, match="file '.*nope.rtdc' does not exist"):
        rtdc.find_image_dataset(tmp_path / "nope.rtdc")


def test_an_internal_basin_is_read_from_the_group_it_names(tmp_path):
    p = tmp_path / "grouped.rtdc"
    images = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5)
    with h5py.File(p, "w") as h5:
        h5["other_events/image"] = images
    _store_basins(p, {"k": {"name": "own", "type": "internal", "format": "h5dataset",
                            "paths": ["other_events"], "features": ["image"]}})  # fmt: skip
    loc = rtdc.find_image_dataset(p)
    assert (loc.dataset, loc.mapping) == ("other_events/image", None)


def test_basins_are_tried_in_dclabs_order():
    from rollmed_dask.rtdc.basins import _basin_priority

    order = [
        {"type": "internal", "format": "h5dataset"},
        {"type": "file", "format": "hdf5"},
        {"type": "file", "format": "hdf5", "mapping": "basinmap0"},
        {"type": "file", "format": "s3"},
        {"type": "remote", "format": "http"},
    ]
    assert sorted(reversed(order), key=_basin_priority) == order


@pytest.mark.parametrize(("count", "last"), [(40, "d39"), (41, "... (1 more)")])
def test_the_datasets_named_in_an_error_are_cut_after_forty(tmp_path, count, last):
    from rollmed_dask.rtdc.basins import _list_datasets

    with h5py.File(tmp_path / "many.h5", "w") as h5:
        for i in range(count):
            h5[f"d{i:02d}"] = 0
        names = _list_datasets(h5)
    assert len(names) == count and names[-1] == last
