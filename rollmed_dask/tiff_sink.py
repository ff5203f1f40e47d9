"""A compressed OME-TIFF output, for users whose tools read only TIFF.

One page per event, axes ``TYX``, deflate-compressed (any ``compression``
but "none": deflate level 6, which every TIFF reader reads, Fiji's included;
"none": uncompressed), BigTIFF when the stack passes 2 GiB. Written beside the target
and moved into place only when complete, as the other sinks are.

A TIFF is written front to back, but blocks finish in any order: a block that
comes before its turn waits on disk (a ``.npy`` file in a hidden folder beside
the temporary) until the blocks before it are written, so memory stays at a
few blocks whatever the order. tifffile writes the pages in a thread that
takes them, in order, from a short queue.
"""

from __future__ import annotations

import os
import pathlib
import queue
import shutil
import threading

import numpy as np

from .compression import DEFAULT_COMPRESSION, level
from .sinks import Sink, _pass_block, _remove_temporary, move_into_place

_END = object()


class TiffSink(Sink):
    """``Sink`` writing an OME-TIFF (see the module docstring)."""

    def __init__(
        self, target, dataset, shape, dtype, *, compression=DEFAULT_COMPRESSION, **kwargs
    ):
        super().__init__(target, dataset, shape, dtype, **kwargs)
        self.compression = compression
        self.spill = self.tmp.with_name(self.tmp.name + ".blocks")
        self.next_start = 0
        self.waiting: dict[int, pathlib.Path] = {}  # start -> spilled block
        self.pages = queue.Queue(maxsize=2)  # blocks in order, for the writer thread
        self.thread = None
        self.error = None

    def open(self, input_data=None) -> None:
        import tifffile

        self.spill.mkdir()
        nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.tif = tifffile.TiffWriter(self.tmp, bigtiff=nbytes > 2**31 - 2**25, ome=True)
        self.thread = threading.Thread(target=self._run, name="rollmed-tiff-writer", daemon=True)
        self.thread.start()

    def _frames(self):
        while True:
            block = self.pages.get()
            if block is _END:
                return
            yield from block

    def _run(self) -> None:
        deflate = level(self.compression)[0] != "none"
        try:
            self.tif.write(
                self._frames(),
                shape=self.shape,
                dtype=self.dtype,
                compression="zlib" if deflate else None,  # zlib: deflate
                compressionargs={"level": 6} if deflate else None,
                photometric="minisblack",
                metadata={"axes": "TYX"},
            )
        except BaseException as exc:  # raised in the job's thread by _check
            self.error = exc
            while self.pages.get() is not _END:  # let the job's puts return
                pass

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _put(self, block) -> None:
        while True:
            self._check()
            try:
                self.pages.put(block, timeout=0.5)
                return
            except queue.Full:
                continue

    @property
    def prepare(self):
        return _pass_block

    def write(self, payload) -> int:
        start, block = payload
        if start != self.next_start:
            path = self.spill / f"{start}.npy"
            np.save(path, block)
            self.waiting[start] = path
            return len(block)
        self._put(block)
        self.next_start += len(block)
        while self.next_start in self.waiting:  # the blocks that waited for this one
            path = self.waiting.pop(self.next_start)
            block = np.load(path)
            path.unlink()
            self._put(block)
            self.next_start += len(block)
        return len(payload[1])

    def commit(self, dataset_attrs: dict, log_lines: list[str]) -> None:
        if self.next_start != self.shape[0] or self.waiting:
            raise RuntimeError(f"TIFF output incomplete: {self.next_start} of {self.shape[0]}")
        self._put(_END)
        self.thread.join()
        self._check()
        self.tif.close()
        shutil.rmtree(self.spill)
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data on disk before the rename that publishes it
        finally:
            os.close(fd)
        move_into_place(self.tmp, self.target)

    def abort(self) -> None:
        # tifffile's write waits in _frames: end it by ending its iterator
        while self.thread is not None and self.thread.is_alive():
            try:
                self.pages.put(_END, timeout=0.1)
            except queue.Full:
                pass
            self.thread.join(timeout=0.1)
        try:
            self.tif.close()
        except Exception:
            pass  # a file that cannot be finished is removed all the same
        shutil.rmtree(self.spill, ignore_errors=True)
        _remove_temporary(self.tmp)
