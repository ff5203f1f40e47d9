"""Basins, metadata and where the images of an ``.rtdc`` file really live.

How a new output inherits the input's metadata, logs and tables and gets a
*file basin* pointing at the input (dcnum ``create_with_basins``), what dcnum's
pipeline needs in the output itself, measurement identifiers, and the search
for the images through file, mapped and internal basins.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import uuid
import warnings
from collections.abc import Iterable
from typing import NamedTuple

import h5py
import numpy as np

from .format import (
    _as_str,
    _store_feature,
    create_image_dataset,
    filter_kwargs,
    software_string,
)


class IgnoredBasinWarning(UserWarning):
    """A basin of the input could not be carried over to the output file.

    dcnum issues its ``IgnoringBasinTypeWarning`` in the same situation
    (e.g. for "remote" basins, which dcnum's writer cannot store).
    """


# ---------------------------------------------------------------------------
# identifiers
# ---------------------------------------------------------------------------


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


def prepare_output_file(
    h5out: h5py.File, input_path, *, copy_images: bool = False, defer_images: bool = False
):
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
    (``frame``, ``time``...) and its images in ``events``, as a virtual
    dataset onto the input's (or, with ``copy_images``, a copy).

    After the writer adds ``events/image_bg``, ``dclab.new_dataset(output)``
    shows the input's features through the basin, and ``image`` and
    ``image_bg`` from the file itself.

    Parameters
    ----------
    h5out : h5py.File
        The new output file, opened for writing.
    input_path : str or pathlib.Path
        The input ``.rtdc`` file.
    copy_images : bool
        Copy the images instead of linking them (see :func:`add_pipeline_inputs`).
    defer_images : bool
        With ``copy_images``, leave the copy to the caller.

    Returns
    -------
    ImageCopy or None
        With ``copy_images`` and ``defer_images``, the image copy still to
        run; otherwise None.

    Raises
    ------
    FileNotFoundError
        If the input does not exist.
    ValueError
        If the output is the input, the output is read-only, or the input
        has no ``events`` group (a plain HDF5 file, see :func:`is_rtdc_file`:
        no basin can point at it).

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
    return add_pipeline_inputs(h5out, pin, copy_images=copy_images, defer_images=defer_images)


def is_rtdc_file(path) -> bool:
    """Whether the HDF5 file ``path`` is an ``.rtdc`` file (it has an ``events`` group).

    A plain HDF5 stack (frames in a top-level dataset such as ``images``) is
    not: its output gets the background dataset and our run log only, no
    metadata, basin or dcnum pipeline attributes.
    """
    with h5py.File(path, "r") as h5:
        return isinstance(h5.get("events"), h5py.Group)


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


def add_pipeline_inputs(
    h5out: h5py.File, input_path, *, copy_images: bool = False, defer_images: bool = False
):
    """Give a new output what dcnum's pipeline reads from its input file itself.

    dcnum 0.31's pipeline (``DCNumJobRunner.task_enforce_basin_strategy``)
    passes ``image`` and the :data:`FRAME_FEATURES` on to its result only from
    datasets in its input file's own ``events`` group, never through the
    input's basins: run on a file whose features are all in a basin, its
    result lacks ``image``, ``frame`` and ``time``. So the output gets

    - a copy of each frame feature the input has (in its own ``events``
      group or through its basins, mapped as the basin says), a few bytes
      per event;
    - ``events/image``: by default an HDF5 virtual dataset onto the file that
      really holds the images (:func:`link_images`: no bytes copied, dcnum
      counts it as the file's own); with ``copy_images`` a copy, whose
      compressed chunks are copied as they are (no decompression,
      :class:`ImageCopy`): a self-contained file, as large as the input.
      Images in a mapped basin whose mapping is not a regular stride cannot
      be served by a virtual dataset nor copied chunk by chunk: the output
      then has no ``events/image`` (dclab still shows the images through the
      basin), and, as for dcnum run on that input itself, the pipeline's
      result has no ``image``.

    Parameters
    ----------
    h5out : h5py.File
        The new output, open for writing.
    input_path : str or pathlib.Path
        The input ``.rtdc`` file.
    copy_images : bool
        Copy the images instead of linking them.
    defer_images : bool
        With ``copy_images``: do not copy the images' chunks yet: create
        ``events/image`` with the input's layout and return an
        :class:`ImageCopy` that copies them (the caller runs and closes it;
        the output is incomplete until then). Images that cannot be copied
        chunk by chunk (contiguous or virtual storage) are copied at once all
        the same.

    Returns
    -------
    ImageCopy or None
        With ``copy_images`` and ``defer_images``, the copy still to run;
        otherwise None.

    Examples
    --------
    .. code-block:: python

        with h5py.File("out.rtdc", "a") as h5:
            add_pipeline_inputs(h5, "in.rtdc")
            sorted(h5["events"]), h5["events/image"].is_virtual
        # (['frame', 'image', 'time'], True)
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
        return None
    if not copy_images:
        link_images(h5out, loc)
        return None
    if loc.mapping is not None:
        return None
    h5 = h5py.File(loc.path, "r")
    try:
        src = h5[loc.dataset]
        from ..h5chunks import can_copy_chunks, create_empty_like

        if src.is_virtual:
            _copy_virtual(src, h5out["events"])
            h5.close()
            return None
        if not can_copy_chunks(src):
            h5.copy(src, h5out["events"], "image")
            h5.close()
            return None
        copy = ImageCopy(h5, src, create_empty_like(h5out["events"], "image", src))
    except BaseException:
        h5.close()
        raise
    if defer_images:
        return copy
    try:
        copy.run()
    finally:
        copy.close()
    return None


def _copy_virtual(src: h5py.Dataset, events: h5py.Group) -> None:
    """Store the data a virtual dataset shows as a real one (``h5py.Group.copy``
    would copy the mapping, not the images), in dcnum's layout, with its attributes."""
    from ..h5chunks import copy_attributes

    dst = create_image_dataset(events, "image", src.shape[0], src.shape[1:], src.dtype)
    copy_attributes(src, dst)
    step = dst.chunks[0]
    for start in range(0, src.shape[0], step):
        dst[start : start + step] = src[start : start + step]


def _regular_stride(mapping: np.ndarray) -> slice | None:
    """``mapping`` as a slice (start, stop, step >= 1), or None if it is not one."""
    if len(mapping) == 0:
        return None
    start = int(mapping[0])
    step = int(mapping[1] - mapping[0]) if len(mapping) > 1 else 1
    if step < 1 or not np.array_equal(mapping, start + step * np.arange(len(mapping))):
        return None
    return slice(start, start + step * (len(mapping) - 1) + 1, step)


def link_images(h5out: h5py.File, loc: ImageLocation) -> bool:
    """Make ``events/image`` an HDF5 virtual dataset onto the images at ``loc``.

    The dataset has the source's shape (or the mapped length), dtype and
    attributes, fill value 0, and costs no image bytes. Its source file is
    recorded twice, like a file basin's paths: first the absolute path, then
    the path relative to the output's folder. HDF5 skips a source file it
    cannot find and, where both are found, reads the last: so the images are
    found when the output moves alone (the absolute path), and when the raw
    data and the output move together (the relative path, resolved against
    the output's folder, which HDF5 prefers). Both found means two reads of
    each image; decompression is cheap next to dcnum's segmentation.

    If neither is found (the raw file was moved elsewhere or deleted),
    ``events/image`` has 0 events (HDF5 sizes an unlimited mapping by the
    sources it finds), so readers see a length mismatch instead of images;
    for a mapped basin (a fixed-size mapping) it reads as zeros, the fill value.

    Parameters
    ----------
    h5out : h5py.File
        The new output, open for writing (its final folder: relative paths
        are relative to it).
    loc : ImageLocation
        Where the images really are (:func:`find_image_dataset`). A mapped
        basin is served if its mapping is a regular stride (e.g. a slice of
        the raw file's events); otherwise nothing is linked.

    Returns
    -------
    bool
        Whether ``events/image`` was created.

    Examples
    --------
    .. code-block:: python

        with h5py.File("out.rtdc", "a", libver="latest") as h5:
            link_images(h5, find_image_dataset("in.rtdc"))
            [vs.file_name for vs in h5["events/image"].virtual_sources()]
        # ['/data/in.rtdc', 'in.rtdc']
    """
    from ..h5chunks import copy_attributes

    select = slice(None)
    if loc.mapping is not None:
        select = _regular_stride(loc.mapping)
        if select is None:
            return False
    paths = [str(loc.path)]
    try:
        paths.append(os.path.relpath(loc.path, pathlib.Path(h5out.filename).resolve().parent))
    except ValueError:
        pass  # no relative path exists (e.g. another drive on Windows)
    with h5py.File(loc.path, "r") as h5:
        src = h5[loc.dataset]
        n_events = len(range(*select.indices(src.shape[0])))
        frame = src.shape[1:]
        # Unmapped, the mapping is unlimited along the events: the dataset is as
        # long as the source files HDF5 finds, 0 events if none (a loud length
        # mismatch for dclab and dcnum, instead of silent fill values).
        unlimited = loc.mapping is None
        layout = h5py.VirtualLayout(
            shape=(n_events, *frame),
            dtype=src.dtype,
            maxshape=(None if unlimited else n_events, *frame),
        )
        for path in paths:
            if unlimited:
                vsource = h5py.VirtualSource(
                    path, loc.dataset, shape=src.shape, maxshape=(None, *frame)
                )
                layout[: h5py.h5s.UNLIMITED] = vsource[: h5py.h5s.UNLIMITED]
            else:
                layout[:] = h5py.VirtualSource(path, loc.dataset, shape=src.shape)[select]
        dst = h5out.require_group("events").create_virtual_dataset("image", layout, fillvalue=0)
        copy_attributes(src, dst)
    return True


class ImageCopy:
    """The input's images, still to be copied into a new output chunk by chunk.

    Returned by :func:`add_pipeline_inputs` (``copy_images=True,
    defer_images=True``): the
    output's ``events/image`` exists with the input's layout and attributes
    but no data yet. :meth:`run` copies the stored chunks as they are (no
    decompression), each in one short HDF5 call, so that the copy can go on in
    a thread while the background is computed (``h5py.Group.copy`` would hold
    h5py's lock for the whole copy, seconds for a large file). The output is
    complete only once :meth:`run` has returned; :meth:`close` releases the
    input either way.
    """

    def __init__(self, h5in: h5py.File, src: h5py.Dataset, dst: h5py.Dataset):
        from ..h5chunks import ChunkCopy

        self.h5in = h5in  # held open (and closed) here: src lives in it
        self.chunks = ChunkCopy(src, dst)

    def run(self, stop=None, on_chunk=None) -> None:
        """Copy the chunks not copied yet; see :meth:`rollmed_dask.h5chunks.ChunkCopy.run`."""
        self.chunks.run(stop, on_chunk)

    def close(self) -> None:
        try:
            self.chunks.close()
        finally:
            self.h5in.close()


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
