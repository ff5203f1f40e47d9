"""Conventions of the ``.rtdc`` (RT-DC HDF5) format used by the output writer.

This module re-implements the few pieces of dcnum 0.31 / dclab that an
``image_bg`` writer needs, so that dcnum is not a runtime dependency:

- how image datasets are created (chunks, filters, HDF5 image attributes),
- the background pipeline identifier dcnum stores next to ``image_bg``,
- how a new output file inherits the input's metadata, logs and tables and
  gets a *file basin* pointing at the input (dcnum ``create_with_basins``),
- how logs are stored (fixed-length byte strings, dcnum ``store_log``),
- where the images of an input file really live (the file itself, a file
  basin, a mapped basin or an internal basin).

Everything here is small, synchronous and independent of dask and of the
median kernels. The test suite compares the output of these functions with
what dcnum 0.31 writes for the same input.

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

import datetime
import hashlib
import importlib.metadata
import json
import numbers
import os
import pathlib
import platform
import socket
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import h5py

# hdf5plugin registers the zstd filter with HDF5; without this import,
# reading the zstd-compressed logs/tables/images of an .rtdc file fails.
import hdf5plugin
import numpy as np

__all__ = [
    "DCNUM_PPID_GENERATION",
    "FRAME_FEATURES",
    "IMAGE_ATTRS",
    "PIPELINE_BACKGROUND_ATTRS",
    "PIPELINE_SEGMENTATION_ATTRS",
    "IgnoredBasinWarning",
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
    "measurement_identifier",
    "prepare_output_file",
    "run_log_lines",
    "run_log_name",
    "software_string",
    "store_file_basin",
    "write_log",
    "write_pipeline_attrs",
]

#: HDF5 image attributes dcnum and dclab put on every 2D-per-event dataset.
#: They must be fixed-length byte strings: dclab's integrity check flags
#: variable-length strings ("should be fixed-length ASCII string").
IMAGE_ATTRS = {
    "CLASS": np.bytes_("IMAGE"),
    "IMAGE_VERSION": np.bytes_("1.2"),
    "IMAGE_SUBCLASS": np.bytes_("IMAGE_GRAYSCALE"),
}

#: dcnum's pipeline generation (``dcnum.meta.ppid.DCNUM_PPID_GENERATION``
#: in dcnum 0.31). Our result is bit-identical to dcnum 0.31 for even kernel
#: sizes, so we claim the same generation.
DCNUM_PPID_GENERATION = "13"

#: dcnum's chunk budget: about 1 MiB per chunk, between 10 and 1000 events.
_CHUNK_BYTES = 1024**2
_CHUNK_MIN_EVENTS = 10
_CHUNK_MAX_EVENTS = 1000

#: Software name used in basin descriptions and log/table "software" attrs.
_TOOL = "rollmed-dask"


class IgnoredBasinWarning(UserWarning):
    """A basin of the input could not be carried over to the output file.

    dcnum issues its ``IgnoringBasinTypeWarning`` in the same situation
    (e.g. for "remote" basins, which dcnum's writer cannot store).
    """


# ---------------------------------------------------------------------------
# software / identifiers
# ---------------------------------------------------------------------------


def software_string() -> str:
    """Return ``"rollmed-dask <version>"``, or ``"rollmed-dask"`` without one.

    The version is read from ``rollmed_dask.__version__`` at call time (not at
    import time, so that this module can be imported by the package's own
    ``__init__``).

    Examples
    --------
    .. code-block:: python

        software_string()
        # 'rollmed-dask 0.1.0'
    """
    import rollmed_dask

    version = getattr(rollmed_dask, "__version__", None)
    return f"{_TOOL} {version}" if version else _TOOL


def _as_str(value):
    """Decode byte strings from HDF5 attributes (old files store bytes)."""
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8")
    return value


def measurement_identifier(h5: h5py.Group, *, decode: bool = True) -> str | None:
    """Return the measurement identifier of an open ``.rtdc`` file.

    Same rule as dcnum's ``get_measurement_identifier`` and dclab's
    ``RTDCBase.get_measurement_identifier``: the attribute
    ``experiment:run identifier`` if set, otherwise the UUID formed from
    the MD5 of ``"{experiment:time}_{experiment:date}_{setup:identifier}"``,
    otherwise ``None``.

    Byte-string attributes (older Shape-In files) are decoded first, as
    dclab does. With ``decode=False`` they are used as they are, as dcnum
    0.31 does: it hashes their ``b'...'`` representation, so for such files
    the two readers compute different identifiers.

    Examples
    --------
    .. code-block:: python

        with h5py.File("data.rtdc", "r") as h5:
            measurement_identifier(h5)
        # '3b1cbd47-6a2b-ad2c-0fcc-c3c5a9f7d2a8'
    """
    convert = _as_str if decode else (lambda value: value)
    mid = convert(h5.attrs.get("experiment:run identifier"))
    if not mid:
        m_time = convert(h5.attrs.get("experiment:time", None)) or None
        m_date = convert(h5.attrs.get("experiment:date", None)) or None
        m_sid = convert(h5.attrs.get("setup:identifier", None)) or None
        if None not in [m_time, m_date, m_sid]:
            hasher = hashlib.md5(f"{m_time}_{m_date}_{m_sid}".encode())
            mid = str(uuid.UUID(hex=hasher.hexdigest()))
        else:
            mid = None
    return mid


def basin_identifier(h5: h5py.Group) -> str | None:
    """The identifier a file basin pointing at ``h5`` should carry, or ``None``.

    dclab and dcnum both refuse a basin whose file has another identifier
    than the basin says, but compute it differently for byte-string metadata
    (see :func:`measurement_identifier`): no identifier satisfies both. Then
    we store none, which both accept, rather than one that makes one reader
    fail (dcnum raises ``BasinIdentifierMismatchError``). The file is still
    checked: dclab compares the referring file's identifier with the basin
    file's, and our output carries the input's metadata.

    Examples
    --------
    .. code-block:: python

        with h5py.File("shape_in_file_with_byte_metadata.rtdc", "r") as h5:
            basin_identifier(h5)
        # None
    """
    ident = measurement_identifier(h5)
    return ident if ident == measurement_identifier(h5, decode=False) else None


# ---------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------


def default_chunk_events(image_shape, dtype) -> int:
    """Number of events per HDF5 chunk, as dcnum's ``get_best_nd_chunks``.

    About 1 MiB per chunk, at least 10 and at most 1000 events:
    ``min(1000, max(10, floor(2**20 / (prod(image_shape) * itemsize))))``.

    Parameters
    ----------
    image_shape : tuple of int
        Shape of one event, e.g. ``(80, 320)``; ``()`` for scalar features.
    dtype : numpy dtype-like
        Data type of the stored feature.

    Examples
    --------
    >>> default_chunk_events((80, 320), "uint8")
    40
    >>> default_chunk_events((80, 320), "float32")
    10
    >>> default_chunk_events((), "float64")
    1000
    """
    event_bytes = int(np.prod(tuple(image_shape), dtype=np.int64)) * np.dtype(dtype).itemsize
    if event_bytes <= 0:
        raise ValueError(
            f"image_shape={tuple(image_shape)!r} has no pixels; pass the shape of one "
            f"event, e.g. (80, 320)"
        )
    return min(_CHUNK_MAX_EVENTS, max(_CHUNK_MIN_EVENTS, _CHUNK_BYTES // event_bytes))


def filter_kwargs(compression=True) -> dict:
    """HDF5 filter keyword arguments for ``create_dataset``, as dcnum uses them.

    Parameters
    ----------
    compression : bool or mapping
        ``True``: Zstandard level 5 (``hdf5plugin.Zstd(clevel=5)``), the
        default of dcnum and dclab. ``False``: no compression. A mapping
        (e.g. ``hdf5plugin.Blosc2(...)`` or ``{"compression": "gzip"}``) is
        used as given. Fletcher32 checksums are always switched on, as dcnum
        does, unless the mapping says otherwise.

    Examples
    --------
    >>> filter_kwargs()
    {'compression': 32015, 'compression_opts': (5,), 'fletcher32': True}
    >>> filter_kwargs(False)
    {'compression': None, 'compression_opts': None, 'fletcher32': True}
    """
    if isinstance(compression, Mapping):
        kwargs = dict(compression)
    elif compression is True:
        kwargs = dict(hdf5plugin.Zstd(clevel=5))
    elif compression is False or compression is None:
        kwargs = {"compression": None, "compression_opts": None}
    else:
        raise ValueError(
            f"compression={compression!r} is not understood; pass True (zstd level 5), "
            f"False, or a mapping such as hdf5plugin.Zstd(clevel=5)"
        )
    kwargs.setdefault("fletcher32", True)
    return kwargs


def create_image_dataset(
    group: h5py.Group,
    name: str,
    num_events: int,
    image_shape,
    dtype,
    *,
    chunk_events: int | None = None,
    compression=True,
) -> h5py.Dataset:
    """Create an image dataset exactly as dcnum's ``HDF5Writer`` does.

    Shape ``(num_events, H, W)``, maxshape ``(None, H, W)``, chunks
    ``(default_chunk_events(...), H, W)``, zstd-5 + fletcher32 and the
    :data:`IMAGE_ATTRS`. (dcnum starts at 0 events and grows the dataset; the
    final dataset is the same.)

    Parameters
    ----------
    group : h5py.Group
        Parent group, normally ``h5["events"]``.
    name : str
        Dataset name, e.g. ``"image_bg"``.
    num_events : int
        Number of events (first axis).
    image_shape : tuple of int
        ``(H, W)``.
    dtype : numpy dtype-like
        Stored dtype (dcnum always stores uint8).
    chunk_events : int, optional
        Events per chunk; default :func:`default_chunk_events`.
    compression : bool or mapping
        See :func:`filter_kwargs`.

    Examples
    --------
    .. code-block:: python

        with h5py.File("out.rtdc", "a") as h5:
            ds = create_image_dataset(h5.require_group("events"), "image_bg",
                                      2000, (80, 320), "uint8")
            ds.chunks
        # (40, 80, 320)
    """
    image_shape = tuple(int(s) for s in image_shape)
    if chunk_events is None:
        chunk_events = default_chunk_events(image_shape, dtype)
    dset = group.create_dataset(
        name,
        shape=(int(num_events), *image_shape),
        dtype=dtype,
        maxshape=(None, *image_shape),
        chunks=(int(chunk_events), *image_shape),
        **filter_kwargs(compression),
    )
    if len(image_shape) == 2:
        for key, value in IMAGE_ATTRS.items():
            dset.attrs.create(key, value)
    return dset


# ---------------------------------------------------------------------------
# pipeline identifier
# ---------------------------------------------------------------------------


def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an integer, e.g. {name}=100")
    if value < 1:
        raise ValueError(f"{name}={value} must be at least 1")
    return int(value)


def bg_ppid(kernel_size: int, batch_size: int) -> str:
    """dcnum's background pipeline identifier, ``"rollmed:k=K^b=B"``.

    dcnum builds it with ``kwargs_to_ppid``, abbreviating the keyword-only
    arguments of ``BackgroundRollMed.check_user_kwargs`` (``kernel_size``,
    ``batch_size``) to their shortest unique prefixes (``k``, ``b``).

    Examples
    --------
    >>> bg_ppid(100, 10000)
    'rollmed:k=100^b=10000'
    """
    k = _positive_int("kernel_size", kernel_size)
    b = _positive_int("batch_size", batch_size)
    return f"rollmed:k={k}^b={b}"


def bg_ppid_attrs(kernel_size: int, batch_size: int) -> dict[str, str]:
    """Attributes dcnum stores on ``events/image_bg`` after a background run.

    Both values are Python ``str`` (h5py stores them as variable-length
    UTF-8 strings, as dcnum does).

    Examples
    --------
    >>> bg_ppid_attrs(kernel_size=10, batch_size=50)
    {'dcnum ppid background': 'rollmed:k=10^b=50', 'dcnum ppid generation': '13'}
    """
    return {
        "dcnum ppid background": bg_ppid(kernel_size, batch_size),
        "dcnum ppid generation": DCNUM_PPID_GENERATION,
    }


#: The root attributes dcnum's pipeline (``DCNumJobRunner.run_pipeline``)
#: compares with its job's identifiers to decide whether ``events/image_bg``
#: can be used as it is: if all three are equal, it skips its background step.
PIPELINE_BACKGROUND_ATTRS = (
    "pipeline:dcnum generation",
    "pipeline:dcnum data",
    "pipeline:dcnum background",
)

#: Root attributes of a dcnum output that describe its segmentation. They were
#: made with another background, so we remove them wherever we write one:
#: without its segmenter id and hash dcnum never reuses a segmentation
#: (``redo_seg``). ``pipeline:dcnum yield`` and ``pipeline:dcnum mapping`` say
#: which events the file holds, which stays true, so they are kept.
PIPELINE_SEGMENTATION_ATTRS = (
    "pipeline:dcnum segmenter",
    "pipeline:dcnum feature",
    "pipeline:dcnum gate",
    "pipeline:dcnum hash",
)


def data_ppid(pixel_size) -> str:
    """dcnum's data pipeline identifier of a whole ``.rtdc`` file, ``"hdf:p=P^i=0"``.

    As ``dcnum.read.HDF5Data.get_ppid`` makes it for a file read without
    index mapping (we always process every event): the pixel size with 8
    decimals and trailing zeros stripped, ``i=0`` for "no index mapping".
    dcnum takes a missing pixel size as 0.

    Examples
    --------
    >>> data_ppid(0.34)
    'hdf:p=0.34^i=0'
    >>> data_ppid(0.2600000012)
    'hdf:p=0.26^i=0'
    >>> data_ppid(None)
    'hdf:p=0.^i=0'
    """
    pixel_size = 0 if pixel_size is None else float(_as_str(pixel_size))
    return f"hdf:p={pixel_size:.8f}".rstrip("0") + "^i=0"


def write_pipeline_attrs(h5: h5py.File, dataset: str = "events/image_bg") -> None:
    """Label the file's background for dcnum's pipeline, from ``dataset``'s attrs.

    Called once the background ``dataset`` is complete, in a new output file
    and in a file changed in place. Sets the root attributes
    :data:`PIPELINE_BACKGROUND_ATTRS` as dcnum's pipeline would for this file:
    generation and background from the dataset's ``dcnum ppid generation``
    and ``dcnum ppid background`` (:func:`bg_ppid_attrs`), data from the
    file's own pixel size (:func:`data_ppid`). Any there are replaced (a dcnum
    output carries those of its own run), and
    :data:`PIPELINE_SEGMENTATION_ATTRS` are removed: they described a
    segmentation made with the old background. dcnum reads the background
    from ``events/image_bg`` only, so for another ``dataset`` nothing changes.

    Examples
    --------
    .. code-block:: python

        with h5py.File("data.rtdc", "a") as h5:
            h5["events/image_bg"].attrs.update(bg_ppid_attrs(100, 10000))
            write_pipeline_attrs(h5)
            dict(h5.attrs)["pipeline:dcnum background"]
        # 'rollmed:k=100^b=10000'
    """
    if dataset.strip("/") != "events/image_bg":
        return
    bg_attrs = h5[dataset].attrs
    values = (
        bg_attrs["dcnum ppid generation"],
        data_ppid(h5.attrs.get("imaging:pixel size")),
        bg_attrs["dcnum ppid background"],
    )
    h5.attrs.update(zip(PIPELINE_BACKGROUND_ATTRS, values, strict=True))
    for key in PIPELINE_SEGMENTATION_ATTRS:
        if key in h5.attrs:
            del h5.attrs[key]


# ---------------------------------------------------------------------------
# basins
# ---------------------------------------------------------------------------


def basin_json(
    name: str,
    paths: Iterable,
    features: list[str] | None = None,
    description: str | None = None,
    identifier: str | None = None,
    mapping: str | None = None,
) -> tuple[str, str]:
    """Return ``(key, json_text)`` of an HDF5 file basin as dcnum writes it.

    The JSON has dcnum's key order (description, name, format, paths, type,
    identifier, features, mapping) and ``indent=2``; ``features`` is left out
    when empty and ``mapping`` (the name of a ``basinmap*`` feature) when
    ``None``. The key (the dataset name in ``basins/``) is the MD5 of the
    text.

    Examples
    --------
    >>> key, text = basin_json("in.rtdc", ["/data/in.rtdc"], ["image"], "demo")
    >>> print(text)
    {
      "description": "demo",
      "name": "in.rtdc",
      "format": "hdf5",
      "paths": [
        "/data/in.rtdc"
      ],
      "type": "file",
      "identifier": null,
      "features": [
        "image"
      ]
    }
    """
    bdat = {
        "description": description,
        "name": name,
        "format": "hdf5",
        "paths": [str(pp) for pp in paths],
        "type": "file",
        "identifier": identifier,
    }
    if features is not None and len(features):
        bdat["features"] = list(features)
    if mapping is not None:
        bdat["mapping"] = mapping
    # json.dumps escapes non-ASCII (ensure_ascii), so the text is pure ASCII
    # and fits a fixed-length byte-string dataset.
    text = json.dumps(bdat, indent=2)
    key = hashlib.md5(text.encode("utf-8", errors="ignore")).hexdigest()
    return key, text


def _store_feature(h5: h5py.File, feat: str, data: np.ndarray, compression=True):
    """Append a feature to ``events`` the way dcnum's ``store_feature_chunk`` does."""
    events = h5.require_group("events")
    data = np.asarray(data)
    item_shape = data.shape[1:]
    if feat not in events:
        dset = events.create_dataset(
            feat,
            shape=(0, *item_shape),
            dtype=data.dtype,
            maxshape=(None, *item_shape),
            chunks=(default_chunk_events(item_shape, data.dtype), *item_shape),
            **filter_kwargs(compression),
        )
        if len(item_shape) == 2:
            for key, value in IMAGE_ATTRS.items():
                dset.attrs.create(key, value)
    else:
        dset = events[feat]
    offset = dset.shape[0]
    dset.resize(offset + data.shape[0], axis=0)
    dset[offset:] = data


def _require_basinmap(h5: h5py.File, mapping: np.ndarray) -> str:
    """Reuse an identical ``basinmapN`` feature or store a new one (as dcnum)."""
    events = h5.require_group("events")
    for ii in range(10):  # dcnum and dclab allow basinmap0 ... basinmap9
        cand = f"basinmap{ii}"
        if cand in events:
            if events[cand].shape == mapping.shape and np.all(events[cand][:] == mapping):
                return cand
            continue
        _store_feature(h5, cand, mapping)
        return cand
    raise ValueError(
        f"{h5.filename} already uses basinmap0 ... basinmap9; no mapped basin can be added"
    )


def store_file_basin(
    h5: h5py.File,
    name: str,
    paths: Iterable,
    features: list[str] | None = None,
    description: str | None = None,
    identifier: str | None = None,
    mapping: np.ndarray | None = None,
    compression=True,
) -> str:
    """Write an HDF5 file basin like dcnum's ``HDF5Writer.store_basin``.

    The JSON text (see :func:`basin_json`) is stored line by line as a
    fixed-length byte-string dataset ``basins/<md5 of the text>`` with
    ``chunks=True`` and zstd + fletcher32. A basin whose key exists already
    is not written again. With ``mapping`` (an integer array, entry ``i`` is
    the index in the basin of event ``i`` of this file) the array is stored
    as the first free or identical ``events/basinmapN`` feature.

    Returns
    -------
    key : str
        Name of the dataset in ``basins/``.

    Examples
    --------
    .. code-block:: python

        with h5py.File("out.rtdc", "a") as h5:
            store_file_basin(h5, "in.rtdc", ["/data/in.rtdc", "in.rtdc"],
                             features=["deform", "image"])
        # '0c2f...'
    """
    mapping_name = None
    if mapping is not None:
        mapping_name = _require_basinmap(h5, np.asarray(mapping))
    key, text = basin_json(
        name=name,
        paths=paths,
        features=features,
        description=description,
        identifier=identifier,
        mapping=mapping_name,
    )
    basins = h5.require_group("basins")
    if key not in basins:
        lines = [line.encode("ascii") for line in text.split("\n")]
        basins.create_dataset(
            name=key,
            data=np.array(lines, dtype=f"S{max(len(ln) for ln in lines)}"),
            chunks=True,
            **filter_kwargs(compression),
        )
    return key


def _read_basin_dicts(h5: h5py.File) -> list[dict]:
    """All basin definitions of an open file (JSON lines in ``basins/``)."""
    basins = []
    for bkey in h5.get("basins", {}):
        lines = h5["basins"][bkey][:].tolist()
        text = "\n".join(_as_str(line) for line in lines)
        bdict = json.loads(text)
        bdict["key"] = bkey
        basins.append(bdict)
    return basins


def copy_file_basins(h5_src: h5py.File, h5_dst: h5py.File) -> None:
    """Carry the input's file basins over, as dcnum's ``copy_basins``.

    Same as ``dcnum.write.copy_basins(h5_src, h5_dst, internal_basins=False)``:
    file basins are re-stored with their name, description, paths, features,
    identifier and (re-stored) ``basinmap`` mapping; internal basins are
    skipped (the basin that :func:`prepare_output_file` creates lists their
    features, so they stay reachable through the input file); other basin
    types (e.g. "remote") are dropped with an :class:`IgnoredBasinWarning`.
    Unlike dcnum 0.31, a dclab-style ``"mapping": "same"`` is read as "not
    mapped" instead of failing.

    Relative paths are copied as they are, like dcnum does, so they only
    work if the output is in the input's folder; dcnum-written basins also
    carry the absolute path.
    """
    for bdict in _read_basin_dicts(h5_src):
        btype = bdict.get("type")
        if btype == "internal":
            continue
        if btype != "file":
            warnings.warn(
                f"Not copying basin '{bdict.get('name')}' of type '{btype}' from "
                f"{h5_src.filename}: only file basins are carried over",
                IgnoredBasinWarning,
                stacklevel=2,
            )
            continue
        map_name = bdict.get("mapping")
        mapping = None
        if map_name is not None and map_name != "same":
            mapping = h5_src["events"][map_name][:]
        store_file_basin(
            h5_dst,
            name=bdict["name"],
            description=bdict.get("description"),
            paths=bdict["paths"],
            features=bdict.get("features"),
            mapping=mapping,
            identifier=bdict.get("identifier"),
        )


def copy_metadata(h5_src: h5py.File, h5_dst: h5py.File) -> None:
    """Copy root attributes, ``logs`` and ``tables``, as dcnum's ``copy_metadata``.

    Nothing already in ``h5_dst`` is overwritten. Empty log/table datasets
    are skipped. Variable-length strings become fixed-length byte strings
    (compression and fletcher32 do not work on variable-length data). The
    copies are zstd-5 + fletcher32 compressed, keep their attributes, and get
    a ``software`` attribute extended by ``" | rollmed-dask <version>"``
    (dcnum appends ``"dcnum <version>"``).

    Examples
    --------
    .. code-block:: python

        with h5py.File("in.rtdc") as hi, h5py.File("out.rtdc", "a") as ho:
            copy_metadata(hi, ho)
    """
    for key, value in h5_src.attrs.items():
        if key not in h5_dst.attrs:
            h5_dst.attrs[key] = value
    software = software_string()
    for topic in ["logs", "tables"]:
        if topic not in h5_src:
            continue
        for key in h5_src[topic]:
            h5_dst.require_group(topic)
            if key in h5_dst[topic]:
                continue
            src = h5_src[topic][key]
            data = src[:]
            if not data.size:
                continue
            if data.dtype == np.dtype("O"):
                # Encode to UTF-8 before measuring, so that non-ASCII text
                # fits (dcnum measures characters and fails on non-ASCII).
                lines = [ln.encode("utf-8") if isinstance(ln, str) else bytes(ln) for ln in data]
                data = np.asarray(lines, dtype=f"S{max(1, max(len(ln) for ln in lines))}")
            dst = h5_dst[topic].create_dataset(name=key, data=data, **filter_kwargs())
            dst.attrs.update(src.attrs)
            soft = [_as_str(dst.attrs.get("software")), software]
            dst.attrs["software"] = " | ".join(s for s in soft if s is not None)


def prepare_output_file(h5out: h5py.File, input_path) -> None:
    """Make a new output file an ``.rtdc`` file that refers to its input.

    Does what dcnum's ``create_with_basins`` does for a background run:

    1. copy the input's root attributes, ``logs`` and ``tables``
       (:func:`copy_metadata`),
    2. carry over the input's own file basins (:func:`copy_file_basins`),
    3. store a file basin pointing at the input (if it holds features
       itself, not only through its basins): name = the input's file
       name, paths = [absolute path, path relative to the output's folder]
       (the pair dcnum's pipeline writes), features = all features of the
       input's ``events`` and ``basin_events`` groups except ``basinmap*``,
       identifier = :func:`basin_identifier` of the input, description =
       ``"Created by rollmed-dask <version>"``;

    and what dcnum's pipeline needs to take the file as its input
    (:func:`add_pipeline_inputs`): the input's frame features
    (``frame``, ``time``...) and its images in ``events``.

    After the writer adds ``events/image_bg``, ``dclab.new_dataset(output)``
    shows the input's features through the basin, and ``image`` and
    ``image_bg`` from the file itself.

    Parameters
    ----------
    h5out : h5py.File
        The new output file, opened for writing.
    input_path : str or pathlib.Path
        The input ``.rtdc`` file.

    Raises
    ------
    FileNotFoundError
        If the input does not exist.
    ValueError
        If the output is the input, the output is read-only, or the input
        has no ``events`` group (a plain HDF5 file: no basin can point at it).

    Examples
    --------
    .. code-block:: python

        with h5py.File("out.rtdc", "w", libver="latest") as h5:
            prepare_output_file(h5, "in.rtdc")
            sorted(h5)
        # ['basins', 'events', 'logs']
    """
    pin = pathlib.Path(input_path)
    if not pin.exists():
        raise FileNotFoundError(f"input file {str(pin)!r} does not exist")
    pin = pin.resolve()
    pout = pathlib.Path(h5out.filename).resolve()
    if pin == pout:
        raise ValueError(
            f"the output file is the input file ({pin}); prepare_output_file is for a new, "
            f"separate output file"
        )
    if h5out.mode != "r+":
        raise ValueError(f"{pout} is open read-only; open the output with mode 'w' or 'a'")

    paths = [str(pin)]
    try:
        paths.append(os.path.relpath(pin, pout.parent))
    except ValueError:
        # No relative path exists (e.g. another drive on Windows).
        pass

    with h5py.File(pin, "r") as h5in:
        if "events" not in h5in:
            raise ValueError(
                f"{pin} has no 'events' group, so it is not an .rtdc file and no basin can "
                f"point at it; write plain HDF5 output without prepare_output_file"
            )
        copy_metadata(h5in, h5out)
        copy_file_basins(h5in, h5out)
        features = list(h5in["events"].keys())
        if "basin_events" in h5in:
            features += list(h5in["basin_events"].keys())
        features = sorted(f for f in features if not f.startswith("basinmap"))
        identifier = basin_identifier(h5in)

    h5out.require_group("events")  # dcnum's HDF5Writer always creates it
    if features:
        # An input whose features all live in its file basins (carried over
        # above) needs no basin of its own: one without a feature list means
        # "all features" to dclab, but makes dcnum 0.31's copy_basins fail.
        store_file_basin(
            h5out,
            name=pin.name,
            paths=paths,
            features=features,
            description=f"Created by {software_string()}",
            identifier=identifier,
        )
    add_pipeline_inputs(h5out, pin)


#: dcnum's frame features (``dcnum.read.const.PROTECTED_FEATURES``): scalars
#: that describe a whole frame, which its pipeline passes on to its output.
FRAME_FEATURES = (
    "bg_off",
    "flow_rate",
    "frame",
    "g_force",
    "pressure",
    "temp",
    "temp_amb",
    "time",
    *(f"userdef{ii}" for ii in range(10)),
)


def add_pipeline_inputs(h5out: h5py.File, input_path) -> None:
    """Give a new output what dcnum's pipeline reads from its input file itself.

    dcnum 0.31's pipeline (``DCNumJobRunner.task_enforce_basin_strategy``)
    passes ``image`` and the :data:`FRAME_FEATURES` on to its result only from
    datasets in its input file's own ``events`` group, never through the
    input's basins: run on a file whose features are all in a basin, its
    result lacks ``image``, ``frame`` and ``time``. So the output gets

    - a copy of each frame feature the input has (in its own ``events``
      group or through its basins, mapped as the basin says), a few bytes
      per event;
    - a copy of ``events/image``: HDF5 copies the compressed chunks as they
      are (no decompression), so it costs disk space, not compute. A link
      would cost neither, but HDF5 refuses to follow an external link (or a
      virtual dataset) into a file the same process holds open with other
      file-locking flags, and dclab opens files with ``locking=False`` while
      h5py, dcnum and our reader use the default: dclab then fails on a file
      this process just computed. To save the space, add the background to
      the input itself (``in_place=True``). Images in a mapped basin (a
      subset of another file) are not copied; there, as for dcnum run on that
      input itself, the pipeline's result has no ``image``.

    Examples
    --------
    .. code-block:: python

        with h5py.File("out.rtdc", "a") as h5:
            add_pipeline_inputs(h5, "in.rtdc")
            sorted(h5["events"])
        # ['frame', 'image', 'time']
    """
    for feat in FRAME_FEATURES:
        try:
            loc = find_image_dataset(input_path, f"events/{feat}")
        except KeyError:
            continue
        with h5py.File(loc.path, "r") as h5:
            data = h5[loc.dataset][:]
        _store_feature(h5out, feat, data if loc.mapping is None else data[loc.mapping])
    try:
        loc = find_image_dataset(input_path, "events/image")
    except KeyError:
        return
    if loc.mapping is None:
        with h5py.File(loc.path, "r") as h5:
            h5.copy(h5[loc.dataset], h5out["events"], "image")


# ---------------------------------------------------------------------------
# logs
# ---------------------------------------------------------------------------


def write_log(h5: h5py.Group, name: str, lines, *, override: bool = False) -> h5py.Dataset:
    """Store a log as ``logs/<name>``, the way dcnum's ``store_log`` does.

    Lines are UTF-8 encoded into a fixed-length byte-string dataset
    ``S<longest line>``, ``chunks=True``, zstd-5 + fletcher32 (variable-length
    strings cannot be compressed or checksummed). dclab reads it back with
    ``ds.logs[name]``.

    Parameters
    ----------
    h5 : h5py.File or h5py.Group
        File (or root group) to write to.
    name : str
        Log name, e.g. from :func:`run_log_name`.
    lines : list of str, or str
        The log lines; a single string is split at line breaks.
    override : bool
        Replace an existing log of that name instead of raising.

    Examples
    --------
    .. code-block:: python

        with h5py.File("out.rtdc", "a") as h5:
            write_log(h5, "rollmed-dask-job-2024-01-01-12.00.00", ["{", "}"])
    """
    if isinstance(lines, (str, bytes)):
        lines = _as_str(lines).splitlines()
    encoded = [ln.encode("utf-8") if isinstance(ln, str) else bytes(ln) for ln in lines]
    if not encoded:
        raise ValueError(f"log {name!r} has no lines; pass at least one line")
    logs = h5.require_group("logs")
    if name in logs:
        if not override:
            raise ValueError(f"log {name!r} already exists in {h5.file.filename}")
        del logs[name]
    width = max(1, max(len(ln) for ln in encoded))
    return logs.create_dataset(
        name=name,
        data=np.array(encoded, dtype=f"S{width}"),
        chunks=True,
        **filter_kwargs(),
    )


def run_log_name(when: float | None = None, prefix: str = "rollmed-dask-job") -> str:
    """Log name in dcnum's style, ``"<prefix>-YYYY-MM-DD-HH.MM.SS"`` (UTC).

    Examples
    --------
    >>> run_log_name(0)
    'rollmed-dask-job-1970-01-01-00.00.00'
    """
    return f"{prefix}-{time.strftime('%Y-%m-%d-%H.%M.%S', time.gmtime(when))}"


def _json_default(obj):
    """Make numpy scalars/arrays, paths, dtypes and datetimes JSON-serialisable."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (datetime.datetime, datetime.date)):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    return str(obj)


def _iso_time(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        dt = value if value.tzinfo else value.astimezone()
    else:
        dt = datetime.datetime.fromtimestamp(float(value)).astimezone()
    return dt.isoformat(timespec="seconds")


_LIBRARIES = ("numpy", "h5py", "hdf5plugin", "dask", "distributed", "numba", "scipy", "zarr")


def run_log_lines(
    params: dict,
    *,
    input_path=None,
    output_path=None,
    time_start=None,
    time_end=None,
) -> list[str]:
    """Lines of a JSON log describing a run (for :func:`write_log`).

    The log holds the tool and its version, ``params`` as given, the input
    path (absolute) and size in bytes, the output path, start and end time
    (ISO 8601 with time zone; ``time_end`` defaults to now) and the duration,
    and the host (name, platform, CPU count, Python and library versions).
    Keys are sorted; values that JSON cannot encode are stored as strings.

    Parameters
    ----------
    params : dict
        Parameters of the run, e.g. ``{"kernel_size": 100, "dataset": "events/image"}``.
    input_path, output_path : str or pathlib.Path, optional
        Input and output files.
    time_start, time_end : float or datetime.datetime, optional
        Unix time (``time.time()``) or datetime of the start and the end.

    Examples
    --------
    >>> lines = run_log_lines({"kernel_size": 100}, time_start=0, time_end=60)
    >>> lines[0]
    '{'
    >>> json.loads("\\n".join(lines))["parameters"]
    {'kernel_size': 100}
    """
    if time_end is None:
        time_end = time.time()
    info: dict = {
        "tool": _TOOL,
        "software": software_string(),
        "parameters": dict(params),
        "time": {"start": _iso_time(time_start), "end": _iso_time(time_end)},
        "host": {
            "name": socket.gethostname(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu count": os.cpu_count(),
            "python": platform.python_version(),
            "libraries": {},
        },
    }
    if time_start is not None:
        t0 = time_start.timestamp() if isinstance(time_start, datetime.datetime) else time_start
        t1 = time_end.timestamp() if isinstance(time_end, datetime.datetime) else time_end
        info["time"]["duration s"] = round(float(t1) - float(t0), 3)
    for lib in _LIBRARIES:
        # importlib.metadata reads the installed version without importing
        # the (possibly heavy) library itself.
        try:
            info["host"]["libraries"][lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            info["host"]["libraries"][lib] = None
    if input_path is not None:
        pin = pathlib.Path(input_path).absolute()
        size = pin.stat().st_size if pin.exists() else None
        info["input"] = {"path": str(pin), "size": size}
    if output_path is not None:
        info["output"] = {"path": str(pathlib.Path(output_path).absolute())}
    return json.dumps(info, indent=2, sort_keys=True, default=_json_default).split("\n")


# ---------------------------------------------------------------------------
# where are the images?
# ---------------------------------------------------------------------------


class ImageLocation(NamedTuple):
    """Where the images of a dataset really are.

    Attributes
    ----------
    path : pathlib.Path
        Absolute path of the HDF5 file that holds the data.
    dataset : str
        Name of the dataset in that file, e.g. ``"events/image"``.
    mapping : numpy.ndarray or None
        ``None`` if event ``i`` of the requested file is ``dataset[i]``;
        otherwise an int64 array with event ``i`` = ``dataset[mapping[i]]``
        (a mapped basin, e.g. a file holding a subset of the input's events).
    via : tuple of str
        The basins followed, outermost first (``()`` if the data are in the
        file itself).
    """

    path: pathlib.Path
    dataset: str
    mapping: np.ndarray | None = None
    via: tuple = ()


def _basin_priority(bdict: dict) -> str:
    """dclab's ``basin_priority_sorted_key``: internal < file < remote; unmapped first."""
    srt_type = {"internal": "a", "file": "b", "remote": "c"}.get(bdict.get("type", "_"), "z")
    srt_format = {"h5dataset": "a", "hdf5": "b", "http": "c", "s3": "d", "dcor": "e"}.get(
        bdict.get("format", "_"), "z"
    )
    mapping = bdict.get("mapping") or "same"
    return srt_type + srt_format + ("a" if mapping == "same" else mapping)


def _compose(outer: np.ndarray | None, inner: np.ndarray | None) -> np.ndarray | None:
    """Mapping of a chain: event i -> outer[i] in the basin -> inner[outer[i]] further down."""
    if outer is None:
        return inner
    if inner is None:
        return outer
    return inner[outer]


def _list_datasets(h5: h5py.File, limit: int = 40) -> list[str]:
    """Top-level datasets and the members of ``events``/``basin_events``, briefly."""
    names = []
    for key, obj in h5.items():
        if isinstance(obj, h5py.Dataset):
            names.append(key)
        elif key in ("events", "basin_events"):
            for sub, sobj in obj.items():
                names.append(f"{key}/{sub}" + ("/" if isinstance(sobj, h5py.Group) else ""))
    if len(names) > limit:
        names = names[:limit] + [f"... ({len(names) - limit} more)"]
    return names


def _resolve(path: pathlib.Path, dataset: str, seen: tuple, notes: list) -> ImageLocation:
    with h5py.File(path, "r") as h5:
        obj = h5.get(dataset)
        if isinstance(obj, h5py.Dataset):
            return ImageLocation(path, dataset, None, ())
        existing = _list_datasets(h5)
        if not dataset.startswith("events/") or dataset.count("/") != 1:
            raise KeyError(
                f"dataset {dataset!r} is not in {path} (basins only provide 'events/<feature>'); "
                f"existing datasets: {existing}"
            )
        feat = dataset.split("/", 1)[1]
        bdicts = sorted(_read_basin_dicts(h5), key=_basin_priority)
        for bdict in bdicts:
            bname = bdict.get("name") or bdict["key"]
            features = bdict.get("features")
            if features is not None and feat not in features:
                continue
            map_name = bdict.get("mapping")
            mapping = None
            if map_name is not None and map_name != "same":
                if map_name not in h5.get("events", {}):
                    notes.append(f"{path}: basin {bname!r} lacks its mapping {map_name!r}")
                    continue
                mapping = h5["events"][map_name][:].astype(np.int64)
            btype = bdict.get("type")
            if btype == "internal":
                group = (bdict.get("paths") or ["basin_events"])[0]
                inner = f"{group}/{feat}"
                if isinstance(h5.get(inner), h5py.Dataset):
                    return ImageLocation(path, inner, mapping, (f"internal basin {bname!r}",))
                notes.append(f"{path}: internal basin {bname!r} lacks {inner!r}")
                continue
            if btype != "file" or bdict.get("format") != "hdf5":
                notes.append(
                    f"{path}: basin {bname!r} of type {btype!r}/format "
                    f"{bdict.get('format')!r} cannot be read locally"
                )
                continue
            expected_id = bdict.get("identifier")
            for pp in bdict.get("paths", []):
                cand = pathlib.Path(pp)
                if not cand.is_absolute():
                    # Relative basin paths are relative to the referring
                    # file's folder (dcnum), never to the working directory.
                    cand = path.parent / cand
                if not cand.exists():
                    notes.append(f"{path}: basin {bname!r} path {str(cand)!r} does not exist")
                    continue
                cand = cand.resolve()
                if cand in seen:
                    notes.append(f"{path}: basin {bname!r} refers back to {cand} (cycle)")
                    continue
                if expected_id:
                    with h5py.File(cand, "r") as h5b:
                        actual_id = measurement_identifier(h5b)
                    if actual_id != expected_id:
                        notes.append(
                            f"{path}: basin {bname!r} at {cand} has identifier "
                            f"{actual_id!r}, expected {expected_id!r}"
                        )
                        continue
                try:
                    loc = _resolve(cand, dataset, (*seen, cand), notes)
                except KeyError as exc:
                    notes.append(f"{path}: basin {bname!r} at {cand}: {exc.args[0]}")
                    continue
                return ImageLocation(
                    loc.path,
                    loc.dataset,
                    _compose(mapping, loc.mapping),
                    (f"file basin {bname!r} -> {cand}", *loc.via),
                )
    tried = f"basins tried: {'; '.join(notes)}" if notes else "the file defines no basin for it"
    raise KeyError(
        f"dataset {dataset!r} is neither in {path} nor in any usable basin; "
        f"existing datasets: {existing}; {tried}"
    )


def find_image_dataset(path, dataset: str = "events/image") -> ImageLocation:
    """Find the file and dataset that really hold ``dataset`` of an ``.rtdc`` file.

    Search order, as dcnum and dclab read basins: the file itself, then its
    basins sorted by dclab's priority (internal, then file basins; unmapped
    before mapped). A *file basin* (``type="file"``, ``format="hdf5"``) is
    followed if it lists the feature (or lists no features at all); its
    ``paths`` are tried in order, relative ones relative to the referring
    file's folder, and a path whose measurement identifier differs from the
    basin's ``identifier`` is skipped. Basins of basins are followed (cycles
    are detected) and their mappings composed. A *mapped* basin (``"mapping":
    "basinmapN"``) yields ``mapping = events/basinmapN``: event ``i`` of
    ``path`` is ``dataset[mapping[i]]`` in the returned file.

    Parameters
    ----------
    path : str or pathlib.Path
        The ``.rtdc`` (HDF5) file.
    dataset : str
        Dataset to look for; only ``"events/<feature>"`` is searched in basins.

    Returns
    -------
    ImageLocation
        ``(path, dataset, mapping, via)``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    KeyError
        If neither the file nor a usable basin holds the data; the message
        lists the datasets that exist and why each basin was not usable.

    Examples
    --------
    .. code-block:: python

        loc = find_image_dataset("background_only.rtdc")
        loc.path.name, loc.dataset, loc.mapping
        # ('raw.rtdc', 'events/image', None)
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"file {str(path)!r} does not exist")
    path = path.resolve()
    dataset = dataset.strip("/")
    return _resolve(path, dataset, (path,), [])
