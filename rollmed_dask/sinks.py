"""Outputs: HDF5 (``.rtdc`` layout) and Zarr, always written beside the target first.

Nothing here knows about medians. Sinks receive full-frame blocks whose first
event is a multiple of the output chunk length. A sink is used in four steps:

1. ``open()`` creates the temporary output next to the target;
2. ``prepare(block, start)`` runs on the workers (it must pickle): Zarr workers
   write their aligned chunks themselves, HDF5 workers compress theirs;
3. ``write(payload)`` runs in the calling process for each finished block:
   the single HDF5 writer stores the compressed chunks;
4. ``commit()`` finishes the file and moves it into place, or ``abort()``
   removes it. An existing target is untouched until ``commit``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np

from . import rtdc

PARTIAL_SUFFIX = ".partial"
HDF5_COMPRESSION = {
    "zstd": True,  # zstd level 5 through hdf5plugin, as dcnum writes
    "gzip": {"compression": "gzip", "compression_opts": 4},
    "none": False,
}
PROGRESS_DIR = ".rollmed-progress"


def partial_path(target: pathlib.Path) -> pathlib.Path:
    """The temporary name of ``target``: hidden, in the same folder, so the
    final move is a rename on the same file system."""
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def move_into_place(tmp: pathlib.Path, target: pathlib.Path) -> None:
    """Replace ``target`` by the complete ``tmp``; the old target survives any
    failure before the final rename."""
    if target.exists() and (tmp.is_dir() or target.is_dir()):
        # os.replace cannot swap a file and a directory, nor replace a non-empty
        # directory: park the old target beside it until the new one is in place
        old = target.with_name(f".{target.name}.old")
        _remove(old)
        os.replace(target, old)
        os.replace(tmp, target)
        _remove(old)
    else:
        os.replace(tmp, target)


def check_target(target: pathlib.Path, overwrite: bool) -> None:
    """Fail early, before any work, if the target cannot be written."""
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"output {str(target)!r} already exists; pass overwrite=True (CLI: --overwrite) "
            f"to replace it once the new result is complete, or choose another path"
        )
    parent = target.parent
    if not parent.is_dir():
        raise FileNotFoundError(
            f"the output folder {str(parent)!r} does not exist; create it first"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into the output folder {str(parent)!r}")


def _remove_at_exit(path: pathlib.Path) -> None:
    """Remove ``path`` again when the interpreter exits.

    After an interrupt, a worker thread may still be finishing its block and
    write a Zarr chunk into the temporary just removed. Python joins worker
    threads before it runs ``atexit`` handlers, so this removal comes last.
    """
    import atexit

    atexit.register(lambda: path.exists() and _remove(path))


class Sink:
    """The shared part of the sinks: target, temporary path, resume bookkeeping."""

    def __init__(self, target, dataset, shape, dtype, *, chunk_events, job_params, resume):
        self.target = pathlib.Path(target)
        self.tmp = partial_path(self.target)
        self.dataset = dataset
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.chunk_events = chunk_events
        self.job_params = job_params
        self.resume = resume

    def abort(self) -> None:
        """Remove the temporary output, unless it is kept to be resumed."""
        if not self.resume:
            _remove(self.tmp)
            _remove_at_exit(self.tmp)

    def done_starts(self) -> set[int]:
        """Event offsets of blocks a previous, interrupted run completed."""
        return set()


class HDF5Sink(Sink):
    """``events/image_bg`` in an ``.rtdc``-compatible HDF5 file (DESIGN section 4).

    Chunks are compressed by the workers (``prepare``) when the filter pipeline
    is one we can reproduce byte for byte (zstd, gzip, shuffle, fletcher32), and
    written with ``write_direct_chunk`` by the single writer in this process.
    """

    def __init__(
        self,
        target,
        dataset,
        shape,
        dtype,
        *,
        compression="zstd",
        input_path=None,
        in_place=False,
        **kwargs,
    ):
        super().__init__(target, dataset, shape, dtype, **kwargs)
        self.compression = compression
        self.input_path = input_path
        self.in_place = in_place
        self.h5 = None
        self.dset = None
        self.codec = None

    def open(self) -> None:
        import h5py
        import hdf5plugin  # noqa: F401

        from .h5chunks import ChunkCodec

        # An interrupted HDF5 file may be corrupt: it is never resumed, only replaced.
        _remove(self.tmp)
        self.h5 = h5py.File(self.tmp, "w", libver="latest")
        if self.input_path is not None and not self.in_place:
            rtdc.prepare_output_file(self.h5, self.input_path)
        self.dset = self.h5.create_dataset(
            self.dataset,
            shape=self.shape,
            dtype=self.dtype,
            maxshape=(None,) + self.shape[1:],
            chunks=(self.chunk_events,) + self.shape[1:],
            **rtdc.filter_kwargs(HDF5_COMPRESSION[self.compression]),
        )
        for key, value in rtdc.IMAGE_ATTRS.items():
            self.dset.attrs.create(key, value)
        codec = ChunkCodec.from_dataset(self.dset)
        self.codec = codec if codec.supported else None

    @property
    def prepare(self):
        from functools import partial

        if self.codec is None:
            return _pass_block
        return partial(_encode_block_task, self.codec)

    def write(self, payload) -> int:
        start, data = payload
        if isinstance(data, np.ndarray):
            self.dset[start : start + len(data)] = data
            return len(data)
        from .h5chunks import write_chunks

        write_chunks(self.dset, start, data)
        return data.shape[0]

    def commit(self, dataset_attrs: dict, log_lines: list[str]) -> None:
        log_name = rtdc.run_log_name()
        for key, value in dataset_attrs.items():
            self.dset.attrs[key] = value
        rtdc.write_pipeline_attrs(self.h5, self.dataset)  # dcnum then skips its background
        if self.in_place:
            self.h5.close()
            self.h5 = None
            install_dataset(self.tmp, self.target, self.dataset, log_name, log_lines)
            _remove(self.tmp)
            return
        rtdc.write_log(self.h5, log_name, log_lines)
        self.h5.close()
        self.h5 = None
        move_into_place(self.tmp, self.target)

    def abort(self) -> None:
        if self.h5 is not None:
            self.h5.close()
            self.h5 = None
        _remove(self.tmp)


def install_dataset(tmp_file, target_file, dataset: str, log_name: str, log_lines) -> None:
    """Copy the finished ``dataset`` of ``tmp_file`` into the existing HDF5 file
    ``target_file`` (in place), replacing an old one only once the copy is complete.

    The copy goes to a hidden sibling name first (HDF5 copies the compressed
    chunks as they are), then the old dataset is deleted and the new one renamed:
    every other object and attribute of the file stays as it was.
    """
    import posixpath

    import h5py

    from .sources import close_cached_files

    # our own read handle on the input would block opening it for writing
    close_cached_files(str(pathlib.Path(target_file).resolve()))
    group_name, name = posixpath.split(dataset.strip("/"))
    staging = f".{name}{PARTIAL_SUFFIX}"
    with h5py.File(tmp_file, "r") as src, h5py.File(target_file, "a") as dst:
        group = dst.require_group(group_name or "/")
        if staging in group:
            del group[staging]
        src.copy(src[dataset], group, name=staging)
        if name in group:
            del group[name]
        group.move(staging, name)
        rtdc.write_pipeline_attrs(dst, dataset)  # dcnum then skips its background
        rtdc.write_log(dst, _free_log_name(dst, log_name), log_lines)


def _free_log_name(h5, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... if runs in the same second logged before."""
    logs = h5.get("logs", {})
    candidate, n = name, 1
    while candidate in logs:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _pass_block(block, start):
    return start, np.ascontiguousarray(block)


def _encode_block_task(codec, block, start):
    from .h5chunks import encode_block

    return start, encode_block(codec, block)


class ZarrSink(Sink):
    """A Zarr v3 store with group ``events`` and array ``image_bg`` (by default).

    Workers write their own chunks: dask blocks start on chunk boundaries, so no
    two tasks touch one chunk and no lock is needed. Each finished block leaves a
    marker in ``.rollmed-progress/`` inside the temporary store, which is what
    ``resume`` trusts; the markers are removed before the store is moved into
    place.
    """

    def __init__(self, target, dataset, shape, dtype, *, compression="zstd", **kwargs):
        super().__init__(target, dataset, shape, dtype, **kwargs)
        self.compression = compression

    def _params_file(self) -> pathlib.Path:
        return self.tmp / PROGRESS_DIR / "job.json"

    def open(self) -> None:
        import zarr

        if self.resume and self.tmp.exists():
            self._check_resumable()
            return
        _remove(self.tmp)
        root = zarr.open_group(store=str(self.tmp), mode="w")
        root.create_array(
            self.dataset,
            shape=self.shape,
            dtype=self.dtype,
            chunks=(self.chunk_events,) + self.shape[1:],
            compressors=_zarr_compressors(self.compression),
            fill_value=0,
        )
        (self.tmp / PROGRESS_DIR).mkdir()
        self._params_file().write_text(json.dumps(self.job_params, sort_keys=True))

    def _check_resumable(self) -> None:
        try:
            previous = json.loads(self._params_file().read_text())
        except (OSError, ValueError):
            previous = None
        if previous != json.loads(json.dumps(self.job_params, sort_keys=True)):
            raise ValueError(
                f"the partial output {str(self.tmp)!r} was made by a run with other "
                f"parameters ({previous}); remove it, or rerun without resume to start over"
            )

    def done_starts(self) -> set[int]:
        progress = self.tmp / PROGRESS_DIR
        if not (self.resume and progress.is_dir()):
            return set()
        return {int(p.name) for p in progress.iterdir() if p.name.isdigit()}

    @property
    def prepare(self):
        from functools import partial

        return partial(_zarr_write_block, str(self.tmp), self.dataset)

    def write(self, payload) -> int:
        return payload[1]

    def commit(self, dataset_attrs: dict, log_lines: list[str]) -> None:
        import zarr

        root = zarr.open_group(store=str(self.tmp), mode="r+")
        array = root[self.dataset]
        array.attrs.update(
            {**{k: _plain(v) for k, v in rtdc.IMAGE_ATTRS.items()}, **dataset_attrs}
        )
        root.attrs.update({"rollmed-dask log": {rtdc.run_log_name(): log_lines}})
        _remove(self.tmp / PROGRESS_DIR)
        move_into_place(self.tmp, self.target)


def _plain(value):
    return value.decode() if isinstance(value, bytes | np.bytes_) else value


def _zarr_compressors(compression):
    from zarr.codecs import GzipCodec, ZstdCodec

    if compression in (None, "none", False):
        return None
    if compression == "gzip":
        return [GzipCodec(level=4)]
    # checksum=True: a damaged chunk fails loudly instead of returning wrong pixels
    return [ZstdCodec(level=5, checksum=True)]


def _zarr_write_block(store_path: str, dataset: str, block, start: int):
    import zarr

    array = zarr.open_array(store=store_path, path=dataset, mode="r+")
    array[start : start + len(block)] = block
    # One marker per block start, written only after the block's data.
    marker = pathlib.Path(store_path) / PROGRESS_DIR / str(start)
    marker.touch()
    return start, len(block)
