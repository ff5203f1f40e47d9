"""Inputs: turn a path, an HDF5/Zarr dataset, a numpy or a dask array into one ``Source``.

Nothing here knows about medians. The one rule that matters for dask: no h5py
object ever enters a task graph. HDF5 data is read through ``HDF5Reader``, which
pickles as (path, dataset name) and opens the file lazily, once per process.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import threading
import uuid
from dataclasses import dataclass

import numpy as np

from .core import check_dtype

# h5py is imported where files are opened, and with it hdf5plugin: without the
# plugin, workers cannot decompress the zstd chunks of real .rtdc files.


def _h5py():
    import h5py
    import hdf5plugin  # noqa: F401  (registers the zstd filter with HDF5)

    return h5py


# Open read handles, shared by the reads in progress in this process and closed
# when the last of them ends: an idle handle would keep the file locked by HDF5
# (no one, in this process or another, could open it for writing) and would
# read a file replaced on disk as it was. Opening costs about 1 ms, a block's
# read tens to hundreds.
_open_files: dict[tuple, list] = {}
_open_files_lock = threading.Lock()


def file_state(path: str) -> tuple:
    """What changes when a file is rewritten or replaced: device, inode, size,
    mtime and ctime (which no user can set back). File times are coarse (a
    few ms), so two rewrites in quick succession may keep all of them: what
    must never mix two versions of a file is scoped to one reader instead
    (``HDF5Reader.scope``)."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


@contextlib.contextmanager
def shared_handle(path: str, opener, close=lambda handle: handle.close()):
    """``opener(path)``'s handle for the duration of a ``with`` block, shared by
    the reads of ``path`` in progress in this process; the last one to end
    closes it, and a file changed on disk gets a new handle."""
    key = (path, opener, file_state(path))
    with _open_files_lock:
        entry = _open_files.get(key)
        if entry is None:
            entry = _open_files[key] = [opener(path), 0]
        entry[1] += 1
    try:
        yield entry[0]
    finally:
        with _open_files_lock:
            entry[1] -= 1
            if entry[1] == 0:
                del _open_files[key]
                close(entry[0])


def _open_h5(path: str):
    return _h5py().File(path, "r")


@contextlib.contextmanager
def open_h5_readonly(path: str):
    """A read-only h5py.File of ``path`` for the duration of a ``with`` block.

    Reads in progress at the same time share one handle; the last one to end
    closes it. A file changed on disk gets a new handle. Opened with h5py's
    default flags, so it coexists with a handle the user holds on the file
    (HDF5 refuses a second open with other locking flags).

    Examples
    --------
    >>> import h5py, numpy as np, tempfile, pathlib
    >>> path = str(pathlib.Path(tempfile.mkdtemp()) / "x.h5")
    >>> with h5py.File(path, "w") as h5:
    ...     h5["x"] = np.arange(3)
    >>> with open_h5_readonly(path) as h5:
    ...     h5["x"][:]
    array([0, 1, 2])
    >>> bool(h5.id.valid)  # closed: the user may now rewrite the file
    False
    """
    with shared_handle(path, _open_h5) as h5:
        yield h5


class HDF5Reader:
    """A picklable, lazily opened view of one HDF5 dataset.

    It behaves like a read-only array (``shape``, ``dtype``, ``ndim``,
    ``__getitem__``) so that ``dask.array.from_array`` can wrap it, and it pickles
    as its path and dataset name so it works with threads, processes and
    ``distributed`` workers alike.
    """

    def __init__(self, path, dataset: str, mapping=None, scope=None):
        self.path = os.fspath(pathlib.Path(path).resolve())
        self.dataset = dataset
        self.mapping = None if mapping is None else np.asarray(mapping, dtype=np.int64)
        # What is cached about the file's layout (the chunk addresses) belongs
        # to this reader, and so to one job or one graph, in every process it
        # is sent to: a file rewritten between two calls is read afresh, even
        # when its size and times did not change.
        self.scope = scope or uuid.uuid4().hex
        with open_h5_readonly(self.path) as h5:
            dset = h5[self.dataset]
            self.shape = tuple(dset.shape)
            self.dtype = dset.dtype
            # storage chunks say nothing about the order of mapped events
            self.chunks = dset.chunks if self.mapping is None else None
        if self.mapping is not None:
            self.shape = (len(self.mapping),) + self.shape[1:]
        self.ndim = len(self.shape)

    def _read(self, start: int, stop: int, tile: tuple) -> np.ndarray:
        """Events [start, stop) of the stored dataset, decoded outside h5py's lock."""
        from .h5chunks import ChunkCodec, read_block

        with open_h5_readonly(self.path) as h5:
            dset = h5[self.dataset]
            if getattr(self, "_codec", None) is None:
                self._codec = ChunkCodec.from_dataset(dset)
            return read_block(dset, start, stop, tile, codec=self._codec, scope=self.scope)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        events, tile = key[0], key[1:]
        if not (isinstance(events, slice) and all(isinstance(t, slice) for t in tile)):
            if self.mapping is not None:  # h5py's own would index the stored events
                return self._mapped_items(events, tile)
            with open_h5_readonly(self.path) as h5:  # anything but plain slices: h5py's own
                return h5[self.dataset][key]
        if self.mapping is None:
            start, stop, step = events.indices(self.shape[0])
            return self._read(start, stop, tile)[::step]
        # a mapped basin: event i is dataset[mapping[i]]; read the covering
        # range once and pick the events from it
        index = self.mapping[events]
        if index.size == 0:
            return np.empty((0,) + self.shape[1:], dtype=self.dtype)[(slice(None),) + tile]
        low = int(index.min())
        return self._read(low, int(index.max()) + 1, tile)[index - low]

    def _mapped_items(self, events, tile) -> np.ndarray:
        """A mapped basin's events picked by an integer, a list or a mask (numpy's
        rules on the basin's events): the covering range read once."""
        if any(k is Ellipsis or k is None for k in (events, *tile)):
            raise IndexError(f"{self!r} is a mapped basin: index its events first, no ... or None")
        index = self.mapping[events]
        low = int(index.min()) if index.size else 0
        high = int(index.max()) + 1 if index.size else 0
        return self._read(low, high, ())[(index - low,) + tile]

    def __len__(self):
        return self.shape[0]

    def __reduce__(self):
        return (type(self), (self.path, self.dataset, self.mapping, self.scope))

    def __dask_tokenize__(self):
        # the file's state, not only its path: a file rewritten on disk must
        # not share graph keys (and so cached results) with its old contents
        from dask.base import tokenize

        return (
            "HDF5Reader",
            self.path,
            file_state(self.path),
            self.dataset,
            tokenize(self.mapping),
        )

    def __repr__(self):
        return f"HDF5Reader({self.path!r}, {self.dataset!r}, shape={self.shape}, {self.dtype})"


@dataclass(frozen=True)
class Source:
    """An image stack ready for the pipeline.

    Attributes
    ----------
    array
        Something sliceable along all three axes: numpy, zarr, ``HDF5Reader`` or
        a dask array.
    storage_chunks
        The chunk shape the data is stored in, or None (in memory).
    path
        The file the data comes from, if any.
    """

    array: object
    storage_chunks: tuple | None
    path: pathlib.Path | None = None
    dataset: str | None = None
    pickles_small: bool = False
    """True when ``array`` reads from storage on demand and pickles as a reference
    to it (a path and a dataset name): every task can carry it and read its own
    rows. False for data in memory, and for a mapped basin (its reader pickles
    an index as long as the stack), although both may be read from a file."""

    @property
    def shape(self) -> tuple:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)


def _dataset_names(h5) -> list[str]:
    """The name of every dataset in an open file, for the error that lists them."""
    names = []
    h5.visititems(lambda name, obj: names.append(name) if hasattr(obj, "shape") else None)
    return names


def _check_stack(shape, dtype, what: str) -> None:
    if len(shape) != 3:
        raise ValueError(
            f"{what} has shape {tuple(shape)} (ndim={len(shape)}); the rolling median "
            f"needs an image stack of shape (events, height, width): pass a 3-D array"
        )
    if 0 in tuple(shape)[1:]:
        # numpy would fail deep in a kernel and dask return an empty result: one rule for all
        raise ValueError(
            f"{what} has shape {tuple(shape)}: its frames have no pixels; the rolling "
            f"median needs frames of at least 1 x 1 pixel: check the input dataset"
        )
    check_dtype(dtype)


def _is_hdf5(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def open_path(path, dataset: str) -> Source:
    """Open an HDF5 (``.rtdc``) file or a Zarr store on disk, or a TIFF stack
    (a file, a folder or glob of frames: :mod:`rollmed_dask.tiff`)."""
    from . import tiff

    if tiff.claims(path):
        return tiff.open_tiff(path, dataset)
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {str(path)!r} does not exist: check the path")
    if path.is_dir():
        return _open_zarr_path(path, dataset)
    if not _is_hdf5(path):
        raise ValueError(
            f"input {str(path)!r} is not an HDF5 file (.rtdc/.h5), a TIFF nor a Zarr store: "
            f"pass an HDF5 or TIFF file, a Zarr directory or a folder of TIFF frames"
        )
    from .rtdc import find_image_dataset

    try:
        location = find_image_dataset(path, dataset)
    except FileNotFoundError:
        raise
    except BlockingIOError:
        raise OSError(
            f"input {str(path)!r} is locked by another program that has it open for "
            f"writing (HDF5 file locking); close it there and run again"
        ) from None
    except OSError as exc:
        raise ValueError(
            f"cannot read {str(path)!r} as HDF5 ({exc}); the file may be truncated or "
            f"damaged: copy it again from the original"
        ) from None
    reader = HDF5Reader(location.path, location.dataset, location.mapping)
    _check_stack(reader.shape, reader.dtype, f"dataset {dataset!r} in {str(path)!r}")
    return Source(
        reader,
        reader.chunks,
        path=path,
        dataset=dataset,
        pickles_small=_reader_pickles_small(reader),
    )


def _open_zarr_path(path: pathlib.Path, dataset: str) -> Source:
    import zarr

    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a store"
        raise ValueError(
            f"input {str(path)!r} is a directory but not a Zarr store ({exc}); "
            f"pass an HDF5 file or a Zarr store"
        ) from None
    if isinstance(node, zarr.Group):
        if dataset not in node:
            names = [name for name, _ in node.arrays()] + [
                f"{g}/{a}" for g, grp in node.groups() for a, _ in grp.arrays()
            ]
            raise KeyError(
                f"Zarr store {str(path)!r} has no array {dataset!r}; it has: "
                f"{', '.join(sorted(names)) or 'no arrays'}; pass --dataset NAME"
            )
        node = node[dataset]
    _check_stack(node.shape, node.dtype, f"Zarr array in {str(path)!r}")
    return Source(node, tuple(node.chunks), path=path, dataset=dataset, pickles_small=True)


def as_source(images, dataset: str = "events/image") -> Source:
    """Wrap any supported input as a ``Source``.

    Accepts a path (HDF5/``.rtdc`` or Zarr), an open ``h5py.Dataset`` or
    ``h5py.File``, a Zarr array or group, a numpy array or a dask array.
    """
    if isinstance(images, Source):
        return images
    if isinstance(images, (str, os.PathLike)):
        return open_path(images, dataset)
    module = type(images).__module__
    if module.startswith("h5py"):
        return _from_h5py_object(images, dataset)
    if module.startswith("zarr"):
        import zarr

        if isinstance(images, zarr.Group):
            return _open_zarr_group(images, dataset)
        _check_stack(images.shape, images.dtype, "the Zarr array")
        return Source(images, tuple(images.chunks), pickles_small=_zarr_pickles_small(images))
    if module.startswith("dask"):
        _check_stack(images.shape, images.dtype, "the dask array")
        return Source(images, _regular_chunks(images.chunks))
    if isinstance(images, HDF5Reader):
        _check_stack(images.shape, images.dtype, repr(images))
        return Source(
            images,
            images.chunks,
            path=pathlib.Path(images.path),
            pickles_small=_reader_pickles_small(images),
        )
    if _is_lazy_array(images):
        # xarray and the like: read block by block, never loaded whole
        _check_stack(images.shape, images.dtype, f"the {type(images).__name__}")
        return Source(images, None)
    array = np.asarray(images)
    _check_stack(array.shape, array.dtype, "the input array")
    return Source(array, None)


def _is_lazy_array(obj) -> bool:
    return not isinstance(obj, np.ndarray) and all(
        hasattr(obj, name) for name in ("shape", "dtype", "__getitem__")
    )


def data_token(array) -> str:
    """A token of the data ``array`` holds, for graph names (dask's ``tokenize``).

    Numpy arrays are hashed by content, dask arrays by name, HDF5 files by path,
    dataset and file state (:meth:`HDF5Reader.__dask_tokenize__`). A Zarr array in
    a local store is identified by its path, metadata and the state of its
    metadata file: rewriting it (``overwrite=True``) changes the token, writing
    chunks in place does not (stat-ing every chunk would cost more than a
    graph). Any other Zarr array is left to dask (one in memory gets a token of
    its own on every call). A lazy array-like gets a token of its own on every
    call: hashing it may load it whole (xarray's ``tokenize`` reads the values
    of a lazily loaded array).

    Examples
    --------
    >>> import numpy as np
    >>> data_token(np.zeros(3)) == data_token(np.zeros(3)) != data_token(np.ones(3))
    True
    """
    from dask.base import tokenize

    module = type(array).__module__
    if module.startswith("zarr"):
        from zarr.storage import LocalStore

        if isinstance(array.store, LocalStore):
            folder = pathlib.Path(array.store.root, array.path).resolve()
            meta = folder / ("zarr.json" if (folder / "zarr.json").exists() else ".zarray")
            return tokenize("zarr", str(folder), repr(array.metadata), file_state(str(meta)))
        return tokenize(array)
    if isinstance(array, np.ndarray | HDF5Reader) or module.startswith(("dask", "rollmed_dask")):
        return tokenize(array)
    return uuid.uuid4().hex


def _open_zarr_group(group, dataset: str) -> Source:
    if dataset not in group:
        raise KeyError(f"Zarr group has no array {dataset!r}; pass dataset=NAME")
    return as_source(group[dataset])


def _from_h5py_object(obj, dataset: str) -> Source:
    h5py = _h5py()
    if isinstance(obj, h5py.File | h5py.Group):
        if dataset not in obj:
            raise KeyError(
                f"HDF5 file {obj.file.filename!r} has no dataset {dataset!r}; it has: "
                f"{', '.join(_dataset_names(obj.file)) or 'no datasets'}"
            )
        obj = obj[dataset]
    # An open dataset is re-opened by path so no h5py handle enters the graph.
    if obj.file.mode != "r":
        raise ValueError(
            f"{obj.file.filename!r} is open for writing; open it read-only "
            f"(h5py.File(path, 'r')) or pass its path"
        )
    reader = HDF5Reader(obj.file.filename, obj.name)
    _check_stack(reader.shape, reader.dtype, f"dataset {obj.name!r}")
    return Source(
        reader,
        reader.chunks,
        path=pathlib.Path(reader.path),
        dataset=obj.name,
        pickles_small=_reader_pickles_small(reader),
    )


def _reader_pickles_small(reader: HDF5Reader) -> bool:
    # a mapped reader pickles its index array, which may be large
    return reader.mapping is None


def _zarr_pickles_small(array) -> bool:
    from zarr.storage import MemoryStore

    return not isinstance(array.store, MemoryStore)


def _regular_chunks(chunks) -> tuple | None:
    """A dask array's chunk shape if all but the last chunk of each axis agree:
    the planner then merges whole chunks, which dask rechunks fastest."""
    if all(len(set(c[:-1])) <= 1 and c[-1] <= c[0] for c in chunks):
        return tuple(c[0] for c in chunks)
    return None
