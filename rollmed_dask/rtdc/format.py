"""The ``.rtdc`` format as dcnum 0.31 writes it: per-event datasets and pipeline ids.

One function creates every per-event dataset (:func:`create_image_dataset`:
chunks, filters, HDF5 image attributes); the pipeline identifiers say which
background ``events/image_bg`` holds, for dcnum's pipeline to take it as its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import h5py

# hdf5plugin registers the zstd filter with HDF5; without this import,
# reading the zstd-compressed logs/tables/images of an .rtdc file fails.
import hdf5plugin
import numpy as np

from ..core import check_count, check_kernel_size

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


# ---------------------------------------------------------------------------
# software
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
    """Create a per-event dataset (images, or scalars with ``image_shape=()``)
    exactly as dcnum's ``HDF5Writer`` does.

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


def _store_feature(h5: h5py.File, feat: str, data: np.ndarray, compression=True):
    """Append a feature to ``events`` the way dcnum's ``store_feature_chunk`` does."""
    events = h5.require_group("events")
    data = np.asarray(data)
    if feat in events:
        dset = events[feat]
    else:
        dset = create_image_dataset(
            events, feat, 0, data.shape[1:], data.dtype, compression=compression
        )
    offset = dset.shape[0]
    dset.resize(offset + data.shape[0], axis=0)
    dset[offset:] = data


# ---------------------------------------------------------------------------
# pipeline identifier
# ---------------------------------------------------------------------------


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
    k = check_kernel_size(kernel_size)
    b = check_count("batch_size", batch_size, example=10000)
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
