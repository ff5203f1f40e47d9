"""Encode and decode HDF5 chunks outside h5py, so that codecs run in parallel.

h5py serialises every call in a process behind one global lock, so reading a
compressed dataset with ``dset[...]`` (or writing one) decompresses (or
compresses) one chunk at a time, whatever the number of dask threads. This
module moves the filter pipeline out of that lock:

- reading: :func:`read_block` fetches the stored bytes of each chunk with
  ``dset.id.read_direct_chunk`` (a short call under the lock) and decodes
  them with :meth:`ChunkCodec.decode` (numcodecs/zlib/numpy, which release the
  GIL), so several threads decode at once;
- writing: :func:`encode_block` turns a block of events into the exact bytes
  HDF5 would store, on any worker, and :func:`write_chunks` hands the
  finished bytes to ``dset.id.write_direct_chunk`` from a single writer.

The bytes are the ones HDF5 + hdf5plugin would have written themselves
(shuffle, deflate, hdf5plugin's Zstandard filter, fletcher32 in any order),
so the files read back with plain h5py + hdf5plugin, checksum included.
Anything else (lzf, blosc, szip, scale-offset, bitshuffle, ...) makes
:attr:`ChunkCodec.supported` false and :func:`read_block` falls back to
``dset[...]``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import struct
import threading
import zlib

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd filter for h5py, in every worker)
import numpy as np
from numcodecs import zstd

__all__ = [
    "FILTER_DEFLATE",
    "FILTER_FLETCHER32",
    "FILTER_SHUFFLE",
    "FILTER_ZSTD",
    "ChunkChecksumError",
    "ChunkCodec",
    "ChunkCopy",
    "ChunkError",
    "EncodedBlock",
    "can_copy_chunks",
    "create_empty_like",
    "encode_block",
    "fletcher32",
    "read_block",
    "write_chunks",
]

#: HDF5 filter identifiers this module implements.
FILTER_DEFLATE = 1
FILTER_SHUFFLE = 2
FILTER_FLETCHER32 = 3
#: hdf5plugin's Zstandard filter (registered id 32015), ``cd_values = (clevel,)``.
FILTER_ZSTD = 32015

_FILTER_NAMES = {
    FILTER_DEFLATE: "deflate",
    FILTER_SHUFFLE: "shuffle",
    FILTER_FLETCHER32: "fletcher32",
    FILTER_ZSTD: "zstd",
}
_OTHER_FILTER_NAMES = {
    4: "szip",
    5: "nbit",
    6: "scaleoffset",
    307: "bzip2",
    32000: "lzf",
    32001: "blosc",
    32004: "lz4",
    32008: "bitshuffle",
    32013: "zfp",
    32026: "blosc2",
}
# Bounds the zstd plugin clamps its level to and its default when no
# cd_values are given. hdf5plugin 4.4 clamps levels below 1 (0 and negative)
# to 1, measured; newer plugin sources clamp to ZSTD_minCLevel() instead, but
# hdf5plugin.Zstd() only accepts 1..22, where both agree.
_ZSTD_MIN_LEVEL = 1
_ZSTD_MAX_LEVEL = 22
_ZSTD_DEFAULT_LEVEL = 3
_ZSTD_MAGIC = 0xFD2FB528
# numpy kinds whose in-memory bytes are exactly HDF5's file bytes.
_SUPPORTED_KINDS = "iuf"


class ChunkError(OSError):
    """A stored HDF5 chunk could not be decoded (corrupt or inconsistent).

    Attributes
    ----------
    chunk_offset : tuple of int or None
        Offset of the chunk in the dataset, when known (set by
        :func:`read_block`).
    events : tuple of int or None
        ``(first, stop)`` events of the dataset held by that chunk.
    dataset : str or None
        Dataset name and file, for the message.
    """

    def __init__(self, message, *, chunk_offset=None, events=None, dataset=None):
        super().__init__(message)
        self.chunk_offset = chunk_offset
        self.events = events
        self.dataset = dataset


class ChunkChecksumError(ChunkError):
    """The fletcher32 checksum stored with a chunk does not match its bytes."""


# --------------------------------------------------------------------------
# fletcher32, exactly as HDF5's H5_checksum_fletcher32
# --------------------------------------------------------------------------
# numcodecs (a dependency) ships Fletcher32 and Shuffle, and they give the
# same bytes as these (tests/test_h5chunks.py compares them), but they are
# kept out of the hot path, measured with numcodecs 0.16.6 on a 1 MiB chunk
# (40 x 80 x 320 uint8), min of 7 x 50 calls, process time, same run:
# - Fletcher32.encode 0.334 ms vs fletcher32() 0.184 ms (1.8x): it copies
#   the chunk to append 4 bytes, and on reading we only need the sum;
#   it also raises IndexError on an empty buffer;
# - Shuffle (itemsize 2) 0.465 ms vs _shuffle() 0.293 ms (1.6x), and it
#   refuses a buffer that is not a whole number of items, which HDF5 passes
#   through with the leftover bytes at the end.
# zstd-5 compresses a 1 MiB chunk of a rolling-median output in about 3.7 ms
# (same session), so numcodecs' Fletcher32 alone would add about 4 % to the
# CPU-bound writing of every output chunk.

# Words per row of the matrix the checksum is computed on; with <= 2**16
# words per row a row sum fits a uint32 accumulator.
_FLETCHER_ROW = 2048


def fletcher32(data) -> int:
    """HDF5's fletcher32 checksum of a byte buffer (``H5_checksum_fletcher32``).

    HDF5 sums the buffer as *big-endian* 16-bit words (an odd last byte counts
    as the high byte of a final word), with end-around-carry reduction modulo
    65535, and returns ``(sum2 << 16) | sum1``. Its fletcher32 filter appends
    this value to the chunk as a *little-endian* uint32.

    Vectorised with numpy (so it releases the GIL): because ``65536 = 1 (mod
    65535)``, a word read little-endian is ``256**-1`` times the big-endian
    one modulo 65535, so the sums are taken on the native ``<u2`` view and
    multiplied by 256 at the end. The weighted sum ``sum2 = sum((n - i) w_i)``
    is split into row sums and column sums of a ``(m, 2048)`` view.
    End-around-carry arithmetic never yields 0 for a non-zero sum, so a
    residue of 0 is reported as 0xFFFF unless every byte is zero.

    Parameters
    ----------
    data : bytes-like
        The buffer to sum (any object supporting the buffer protocol).

    Returns
    -------
    int
        The 32-bit checksum.
    """
    a = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    a = a.reshape(-1).view(np.uint8)
    odd = a.size & 1
    words = a[: a.size - odd].view("<u2")
    n = words.size
    row = _FLETCHER_ROW
    head, m = n % row, n // row
    # word i of `words` has weight (n - i) + odd in sum2 (the odd last byte is
    # word n with weight 1)
    hw = words[:head].astype(np.uint64)
    hweights = (np.arange(n, n - head, -1, dtype=np.uint64) + odd) % 65535
    s1 = int(hw.sum())
    s2 = int((hw * hweights).sum())
    if m:
        body = words[head:].reshape(m, row)
        acc = np.uint32 if m <= 65536 else np.uint64
        rows = body.sum(axis=1, dtype=acc).astype(np.uint64) % 65535
        cols = body.sum(axis=0, dtype=acc).astype(np.uint64) % 65535
        # word (k, j) of the body has weight (m - k) * row - j (+ odd)
        kweights = (np.arange(m, 0, -1, dtype=np.uint64) * row + odd) % 65535
        s1 += int(rows.sum())
        s2 += int((rows * kweights).sum()) - int((cols * np.arange(row, dtype=np.uint64)).sum())
    if odd:
        s1 += int(a[-1])
        s2 += int(a[-1])
    # little-endian words -> big-endian words
    s1 = (s1 % 65535) * 256 % 65535
    s2 = (s2 % 65535) * 256 % 65535
    if (s1 == 0 or s2 == 0) and a.any():
        s1, s2 = s1 or 0xFFFF, s2 or 0xFFFF
    return (s2 << 16) | s1


def _byteswap_halves(value: int) -> int:
    """HDF5 < 1.6.3 stored fletcher32 with the bytes of each half swapped."""
    return ((value & 0x00FF00FF) << 8) | ((value >> 8) & 0x00FF00FF)


# --------------------------------------------------------------------------
# byte shuffle, exactly as H5Z_filter_shuffle
# --------------------------------------------------------------------------


def _shuffle(data, itemsize: int, reverse: bool, out=None):
    """HDF5's byte shuffle (or its inverse) of a buffer; leftover bytes stay at the end."""
    a = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    a = a.reshape(-1).view(np.uint8)
    count = a.size // itemsize
    if itemsize <= 1 or count <= 1:
        # HDF5 leaves 1-byte types and "fractional" buffers untouched
        return a
    if out is None:
        out = np.empty_like(a)
    whole = count * itemsize
    if reverse:
        out[:whole].reshape(count, itemsize)[...] = a[:whole].reshape(itemsize, count).T
    else:
        out[:whole].reshape(itemsize, count)[...] = a[:whole].reshape(count, itemsize).T
    out[whole:] = a[whole:]
    return out


def _zstd_content_size(data) -> int | None:
    """Decompressed size recorded in a zstd frame header, None when absent."""
    head = bytes(memoryview(data)[:18])
    if len(head) < 6 or struct.unpack_from("<I", head)[0] != _ZSTD_MAGIC:
        return None
    fhd = head[4]
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(head) < pos + size:
        return None
    value = int.from_bytes(head[pos : pos + size], "little")
    return value + 256 if size == 2 else value


# --------------------------------------------------------------------------
# the codec
# --------------------------------------------------------------------------


class ChunkCodec:
    """The filter pipeline of one chunked HDF5 dataset, applied in Python.

    Plain attributes only, so it pickles cheaply into dask tasks. Build it
    with :meth:`from_dataset`; check :attr:`supported` before using
    :meth:`encode`/:meth:`decode` (both raise ``ValueError`` otherwise).

    Parameters
    ----------
    filters : sequence of (int, tuple of int)
        ``(filter_id, cd_values)`` in pipeline order, i.e. the order HDF5
        applies them when writing (``H5Pget_filter`` index order).
    chunks : tuple of int
        The dataset's chunk shape.
    dtype : numpy dtype
        The dataset's dtype (its byte order is the file's).
    fillvalue : scalar, optional
        The dataset's fill value, used to pad edge chunks as HDF5 does.
    name : str, optional
        Used in error messages.

    Attributes
    ----------
    supported : bool
        Whether every filter and the dtype are implemented here.
    reason : str or None
        Why not, when ``supported`` is false.
    """

    def __init__(self, filters, chunks, dtype, fillvalue=0, name=None):
        self.filters = tuple((int(fid), tuple(int(v) for v in cd)) for fid, cd in filters)
        self.chunks = tuple(int(c) for c in chunks) if chunks is not None else None
        self.dtype = np.dtype(dtype)
        self.fillvalue = self.dtype.type(0 if fillvalue is None else fillvalue)
        self.name = name
        self.reason = self._unsupported_reason()
        self.supported = self.reason is None

    def _unsupported_reason(self):
        if self.chunks is None:
            return "the dataset is not chunked (contiguous, compact or virtual layout)"
        if self.dtype.kind not in _SUPPORTED_KINDS:  # structured dtypes are kind "V"
            return f"dtype {self.dtype} is not a plain integer or float type"
        for fid, cd in self.filters:
            if fid not in _FILTER_NAMES:
                name = _OTHER_FILTER_NAMES.get(fid, "unknown")
                return f"HDF5 filter {fid} ({name}) is not implemented by rollmed_dask.h5chunks"
            if fid == FILTER_DEFLATE and (len(cd) != 1 or cd[0] > 9):
                return f"invalid deflate cd_values {cd}"
            if fid == FILTER_SHUFFLE and len(cd) > 0 and cd[0] == 0:
                return f"invalid shuffle cd_values {cd}"
        return None

    @classmethod
    def from_dataset(cls, dset) -> ChunkCodec:
        """Describe the filter pipeline of an h5py dataset.

        Parameters
        ----------
        dset : h5py.Dataset

        Returns
        -------
        ChunkCodec
            With ``supported`` false (and a ``reason``) for contiguous
            datasets, unsupported filters or dtypes.
        """
        plist = dset.id.get_create_plist()
        filters = []
        for i in range(plist.get_nfilters()):
            fid, _flags, cd_values, _name = plist.get_filter(i)
            filters.append((fid, cd_values))
        chunks = dset.chunks if plist.get_layout() == h5py.h5d.CHUNKED else None
        try:
            fillvalue = dset.fillvalue
        except (TypeError, ValueError):  # exotic dtypes; they are unsupported anyway
            fillvalue = 0
        try:
            dtype = dset.dtype
            codec = cls(filters, chunks, dtype, fillvalue, name=_describe(dset))
        except (TypeError, ValueError) as exc:
            # no chunks: unsupported already; the reason says why
            codec = cls(filters, None, np.uint8, 0, name=_describe(dset))
            codec.reason = f"cannot describe dtype: {exc}"
        return codec

    def __repr__(self):
        names = ",".join(
            f"{_FILTER_NAMES.get(fid, fid)}{list(cd) if cd else ''}" for fid, cd in self.filters
        )
        state = "supported" if self.supported else f"unsupported: {self.reason}"
        return (
            f"ChunkCodec(filters=[{names}], chunks={self.chunks}, dtype={self.dtype}, "
            f"fillvalue={self.fillvalue!r}, {state})"
        )

    def __eq__(self, other):
        if not isinstance(other, ChunkCodec):
            return NotImplemented
        return (self.filters, self.chunks, self.dtype, self.fillvalue.tobytes()) == (
            other.filters,
            other.chunks,
            other.dtype,
            other.fillvalue.tobytes(),
        )

    __hash__ = None

    @property
    def chunk_nbytes(self) -> int:
        """Size in bytes of one decoded (full) chunk."""
        return math.prod(self.chunks) * self.dtype.itemsize

    def _check_supported(self):
        if not self.supported:
            raise ValueError(
                f"cannot encode/decode chunks of {self.name or 'this dataset'} in Python: "
                f"{self.reason}; read and write it through h5py instead"
            )

    def _shuffle_size(self, cd):
        return cd[0] if cd else self.dtype.itemsize

    # ---------------------------------------------------------------- encode
    def encode(self, array) -> bytes:
        """Encode one chunk to the exact bytes HDF5 stores (``filter_mask=0``).

        Parameters
        ----------
        array : array_like
            The chunk's data; its shape may be smaller than :attr:`chunks`
            along any axis (an edge chunk), the rest is padded with
            :attr:`fillvalue` as HDF5 does. Its dtype must equal the
            dataset's up to byte order.

        Returns
        -------
        bytes
            To be written with ``dset.id.write_direct_chunk(offset, data,
            filter_mask=0)``.
        """
        self._check_supported()
        arr = np.asarray(array)
        if arr.ndim != len(self.chunks) or any(
            s > c for s, c in zip(arr.shape, self.chunks, strict=True)
        ):
            raise ValueError(
                f"a chunk of shape {arr.shape} does not fit the chunk shape {self.chunks} "
                f"of {self.name or 'the dataset'}"
            )
        if not np.can_cast(arr.dtype, self.dtype, casting="equiv"):
            raise TypeError(
                f"cannot store {arr.dtype} data in {self.name or 'a dataset'} of dtype "
                f"{self.dtype} without changing values; convert it first"
            )
        if arr.shape == self.chunks:
            data = np.ascontiguousarray(arr, dtype=self.dtype)
        else:
            data = np.full(self.chunks, self.fillvalue, dtype=self.dtype)
            data[tuple(slice(0, s) for s in arr.shape)] = arr
        buf = data.reshape(-1).view(np.uint8)
        for fid, cd in self.filters:
            if fid == FILTER_SHUFFLE:
                buf = _shuffle(buf, self._shuffle_size(cd), reverse=False)
            elif fid == FILTER_DEFLATE:
                # zlib.compress == compress2() that H5Z_filter_deflate calls
                buf = zlib.compress(buf, cd[0])
            elif fid == FILTER_ZSTD:
                buf = zstd.compress(buf, _zstd_level(cd))
            elif fid == FILTER_FLETCHER32:
                buf = b"".join((buf, struct.pack("<I", fletcher32(buf))))
        return buf if isinstance(buf, bytes) else buf.tobytes()

    # ---------------------------------------------------------------- decode
    def decode(self, raw, filter_mask: int = 0, out=None) -> np.ndarray:
        """Decode the stored bytes of one chunk, verifying fletcher32.

        Parameters
        ----------
        raw : bytes-like
            As returned by ``dset.id.read_direct_chunk(offset)[1]``.
        filter_mask : int
            As returned by ``read_direct_chunk``: bit ``i`` set means filter
            ``i`` of the pipeline was skipped for this chunk.
        out : numpy.ndarray, optional
            C-contiguous array of the chunk shape and dtype to decode into
            (saves a copy).

        Returns
        -------
        numpy.ndarray
            The full (padded) chunk, shape :attr:`chunks`, writable.

        Raises
        ------
        ChunkChecksumError
            The stored fletcher32 checksum does not match.
        ChunkError
            The bytes do not decompress to exactly one chunk.
        """
        self._check_supported()
        if out is not None and (
            out.shape != self.chunks or out.dtype != self.dtype or not out.flags.c_contiguous
        ):
            raise ValueError(
                f"out must be a C-contiguous {self.dtype} array of shape {self.chunks}, "
                f"got {out.dtype} {out.shape}"
            )
        dest = None if out is None else out.reshape(-1).view(np.uint8)
        buf = self._decode_bytes(raw, int(filter_mask), dest)
        if out is None:
            if isinstance(buf, np.ndarray) and buf.base is None:
                # a fresh buffer from the last filter (shuffle): use it as is
                out = buf.view(self.dtype).reshape(self.chunks)
            else:
                # a view of `raw` or read-only bytes from a decompressor
                out = np.frombuffer(buf, dtype=self.dtype).reshape(self.chunks).copy()
        elif buf is not dest:
            dest[...] = np.frombuffer(buf, dtype=np.uint8)
        return out

    def _decode_bytes(self, raw, filter_mask, dest):
        """Undo the pipeline; returns a buffer of exactly :attr:`chunk_nbytes` bytes."""
        nbytes = self.chunk_nbytes
        active = [f for i, f in enumerate(self.filters) if not filter_mask & (1 << i)]
        buf = memoryview(raw).cast("B")
        for step, (fid, cd) in enumerate(reversed(active)):
            # only the last step may write into the caller's buffer
            target = dest if step == len(active) - 1 else None
            if fid == FILTER_FLETCHER32:
                buf = _verify_fletcher32(buf)
            elif fid == FILTER_DEFLATE:
                try:
                    buf = zlib.decompress(buf)
                except zlib.error as exc:
                    raise ChunkError(f"deflate (zlib) decompression failed: {exc}") from exc
            elif fid == FILTER_ZSTD:
                buf = _zstd_decompress(buf, nbytes, target)
            elif fid == FILTER_SHUFFLE:
                if len(buf) != nbytes:
                    break  # reported below, with the size
                buf = _shuffle(buf, self._shuffle_size(cd), reverse=True, out=target)
        if len(buf) != nbytes:
            raise ChunkError(
                f"chunk decodes to {len(buf)} bytes, expected {nbytes} "
                f"({self.chunks} x {self.dtype})"
            )
        return buf


def _zstd_level(cd) -> int:
    """The level hdf5plugin's zstd filter compresses with, given its cd_values."""
    if not cd:
        return _ZSTD_DEFAULT_LEVEL
    # cd_values are unsigned; the plugin casts the first one to a C int
    level = cd[0] - (1 << 32) if cd[0] >= (1 << 31) else cd[0]
    return min(max(level, _ZSTD_MIN_LEVEL), _ZSTD_MAX_LEVEL)


def _zstd_decompress(buf, nbytes, target):
    """Decompress one zstd frame; straight into ``target`` when the header says it fits."""
    try:
        if target is not None and _zstd_content_size(buf) == nbytes:
            return zstd.decompress(buf, dest=target)
        return zstd.decompress(buf)
    except (RuntimeError, ValueError) as exc:
        raise ChunkError(f"zstd decompression failed: {exc}") from exc


def _verify_fletcher32(buf):
    """Check and strip the 4-byte checksum HDF5's fletcher32 filter appends."""
    if len(buf) < 4:
        raise ChunkChecksumError(f"chunk of {len(buf)} bytes is too short to hold a fletcher32")
    data = buf[:-4]
    stored = struct.unpack("<I", buf[-4:])[0]
    computed = fletcher32(data)
    # HDF5 also accepts the byte-swapped value written by HDF5 < 1.6.3
    if stored != computed and stored != _byteswap_halves(computed):
        raise ChunkChecksumError(
            f"fletcher32 checksum mismatch (stored 0x{stored:08x}, computed 0x{computed:08x}): "
            f"the stored chunk is corrupt"
        )
    return data


def _describe(dset) -> str:
    try:
        return f"{dset.name} in {dset.file.filename}"
    except (AttributeError, ValueError, RuntimeError):
        return str(getattr(dset, "name", "dataset"))


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------


def _normalize_region(shape, start, stop, tile):
    """Slices (step 1) of the requested region, validated against ``shape``."""
    if not 0 <= start <= stop <= shape[0]:
        raise ValueError(
            f"event range [{start}, {stop}) is outside the dataset's {shape[0]} events; "
            f"pass 0 <= start <= stop <= {shape[0]}"
        )
    tile = () if tile is None else tuple(tile)
    if len(tile) > len(shape) - 1:
        raise ValueError(f"tile {tile} has more axes than the frames of shape {shape[1:]}")
    region = [(start, stop)]
    for axis, size in enumerate(shape[1:]):
        sl = tile[axis] if axis < len(tile) else slice(None)
        if not isinstance(sl, slice):
            raise TypeError(f"tile entries must be slices, got {sl!r}")
        lo, hi, step = sl.indices(size)
        if step != 1:
            raise ValueError(f"tile slices must have step 1, got {sl!r}")
        region.append((lo, max(lo, hi)))
    return region


def _chunk_offsets(region, chunks):
    """Chunk offsets (C order) of the chunks intersecting ``region``."""
    ranges = [
        range((lo // c) * c, hi, c) if hi > lo else range(0)
        for (lo, hi), c in zip(region, chunks, strict=True)
    ]
    return itertools.product(*ranges)


def read_block(dset, start, stop, tile=None, *, codec=None, out=None, scope=None) -> np.ndarray:
    """Read events ``[start, stop)`` (optionally a pixel tile) of an HDF5 dataset.

    The stored chunks covering the region are fetched with
    ``read_direct_chunk`` (under h5py's lock, but short) and decoded outside
    it, so concurrent calls from several threads decode in parallel.
    Unallocated chunks read as the fill value. Datasets this module cannot
    decode (contiguous, lzf, blosc, ...) are read with ``dset[...]``.

    Parameters
    ----------
    dset : h5py.Dataset
        Events along axis 0.
    start, stop : int
        Event range.
    tile : tuple of slice, optional
        Slices (step 1) for the following axes, e.g. ``(slice(y0, y1),
        slice(x0, x1))``; missing axes are read whole.
    codec : ChunkCodec, optional
        ``ChunkCodec.from_dataset(dset)``, pass it to avoid rebuilding it on
        every call.
    out : numpy.ndarray, optional
        Destination of the region's shape and the dataset's dtype.
    scope : str, optional
        Reuse the chunk addresses found for this file only within this scope
        (a reader, so one job; see :class:`RawChunks`).

    Returns
    -------
    numpy.ndarray
        The region.

    Raises
    ------
    ChunkChecksumError, ChunkError
        A stored chunk is corrupt; the message names the chunk offset and
        its event range.
    """
    start, stop = int(start), int(stop)
    region = _normalize_region(dset.shape, start, stop, tile)
    shape = tuple(hi - lo for lo, hi in region)
    if out is None:
        out = np.empty(shape, dtype=dset.dtype)
    elif out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, the region has shape {shape}")
    if codec is None:
        codec = ChunkCodec.from_dataset(dset)
    if not codec.supported:
        if out.size:
            selection = tuple(slice(lo, hi) for lo, hi in region)
            if out.flags.c_contiguous:
                dset.read_direct(out, source_sel=selection)
            else:
                out[...] = dset[selection]
        return out
    if out.size == 0:
        return out
    direct = out.dtype == codec.dtype
    with RawChunks.of(dset, scope) as raw_chunks:
        _read_chunks(dset, region, codec, out, direct, raw_chunks)
    return out


def _read_chunks(dset, region, codec, out, direct, raw_chunks) -> None:
    chunks = codec.chunks
    for offset in _chunk_offsets(region, chunks):
        # intersection of chunk and region, in chunk and in output coordinates
        inner = tuple(
            slice(max(lo, o) - o, min(hi, o + c) - o)
            for (lo, hi), o, c in zip(region, offset, chunks, strict=True)
        )
        outer = tuple(
            slice(max(lo, o) - lo, min(hi, o + c) - lo)
            for (lo, hi), o, c in zip(region, offset, chunks, strict=True)
        )
        target = None
        if direct:
            view = out[outer]
            # decode straight into `out` when the chunk fills a contiguous part of it
            if view.shape == chunks and view.flags.c_contiguous:
                target = view
        try:
            raw = raw_chunks.read(offset) if raw_chunks is not None else None
            if raw is None:
                raw = dset.id.read_direct_chunk(offset)
        except (RuntimeError, OSError, KeyError):
            if _chunk_allocated(dset, offset):
                raise
            out[outer] = codec.fillvalue
            continue
        try:
            decoded = codec.decode(raw[1], raw[0], out=target)
        except ChunkError as exc:
            raise _with_context(exc, codec, offset, dset.shape[0]) from exc
        if target is None:
            out[outer] = decoded[inner]


def _stored_chunk_infos(dset) -> list:
    """``StoreInfo`` (chunk_offset, filter_mask, byte_offset, size) of every stored chunk."""
    infos = []
    try:
        dset.id.chunk_iter(infos.append)  # one pass over the chunk index: ~2 us a chunk
    except (AttributeError, NotImplementedError):  # HDF5 < 1.12.3: one lookup per chunk
        infos = [dset.id.get_chunk_info(i) for i in range(dset.id.get_num_chunks())]
    return infos


def _address_holds_chunk(fd: int, dset, info) -> bool:
    """Whether the bytes at a stored chunk's reported file address are what h5py reads.

    HDF5 reports addresses relative to its base address, which a user block
    shifts; the chunk itself, read through h5py, decides whether reading at
    the address with ``os.pread`` is safe.
    """
    data = os.pread(fd, info.size, info.byte_offset)
    return data == dset.id.read_direct_chunk(info.chunk_offset)[1]


class RawChunks:
    """The stored bytes of a dataset's chunks, read with ``os.pread`` outside h5py's lock.

    ``read_direct_chunk`` holds h5py's lock and the GIL while it finds a chunk
    and copies it into a new bytes object: 0.45 ms for a 690 kB chunk of the
    camera-like benchmark file, most of it page faults of the new buffer.
    Reading the same bytes from their file address into one buffer reused for
    a block's chunks took 0.09 ms (measured in one run, warm page cache), and
    other threads run meanwhile: the workers' reads and the writer's chunks no
    longer wait for each other, and a cold file is read from disk in
    parallel. The addresses come from one pass over the chunk index per
    file state (``chunk_iter``, 10 ms for 5000 chunks), kept for later blocks.

    Used for datasets whose chunks span whole frames (one address per event
    chunk) in a plain file (h5py's default ``sec2`` driver); the first stored
    chunk is checked against ``read_direct_chunk``. Anything else reads
    through h5py (:meth:`of` yields None).
    """

    # (scope, path, dataset, file state) -> (addresses, sizes, masks) or None.
    # The scope (one reader: one job or graph) matters: file times are coarse,
    # so a file rewritten in place twice within a few ms keeps its size, mtime
    # and ctime, and an old table would read other bytes at the old addresses
    # (wrong pixels, or a false checksum error).
    _tables: dict = {}
    _lock = threading.Lock()
    _KEEP = 8

    def __init__(self, fd: int, table, chunk_events: int):
        self.fd = fd
        self.addresses, self.sizes, self.masks = table
        self.chunk_events = chunk_events
        self.buf = bytearray(int(self.sizes.max()) if self.sizes.size else 0)

    @classmethod
    @contextlib.contextmanager
    def of(cls, dset, scope=None):
        """A reader of ``dset``'s chunks for one block (or None), in a ``with`` block.

        The chunk addresses are reused for later blocks of the same ``scope``
        and file state; without a scope, for the same file state alone.
        """
        table = cls._table(dset, scope)
        if table is None:
            yield None
            return
        fd = os.open(dset.file.filename, os.O_RDONLY)
        try:
            yield cls(fd, table, dset.chunks[0])
        finally:
            os.close(fd)

    @classmethod
    def _table(cls, dset, scope=None):
        if not hasattr(os, "preadv") or dset.chunks is None:
            return None
        if tuple(dset.chunks[1:]) != tuple(dset.shape[1:]) or dset.file.driver != "sec2":
            return None
        path = dset.file.filename
        from .sources import file_state

        key = (scope, path, dset.name, file_state(path))
        with cls._lock:
            if key in cls._tables:
                return cls._tables[key]
            table = cls._tables[key] = cls._build(dset, path)
            while len(cls._tables) > cls._KEEP:
                del cls._tables[next(iter(cls._tables))]
        return table

    @staticmethod
    def _build(dset, path):
        chunk_events = dset.chunks[0]
        count = -(-dset.shape[0] // chunk_events)
        addresses = np.full(count, -1, dtype=np.int64)
        sizes = np.zeros(count, dtype=np.int64)
        masks = np.zeros(count, dtype=np.int64)
        first = None
        for info in _stored_chunk_infos(dset):
            i = info.chunk_offset[0] // chunk_events
            addresses[i], sizes[i], masks[i] = info.byte_offset, info.size, info.filter_mask
            first = info if first is None else first
        if first is not None:
            fd = os.open(path, os.O_RDONLY)
            try:
                if not _address_holds_chunk(fd, dset, first):
                    return None  # addresses we cannot read directly: through h5py
            finally:
                os.close(fd)
        return addresses, sizes, masks

    def read(self, offset):
        """``(filter_mask, bytes)`` of the chunk at ``offset``, valid until the next read.

        Raises KeyError for a chunk that is not stored (the fill value).
        """
        i = offset[0] // self.chunk_events
        address = int(self.addresses[i])
        if address < 0:
            raise KeyError(f"no chunk stored at {tuple(offset)}")
        size = int(self.sizes[i])
        view = memoryview(self.buf)[:size]
        got = os.preadv(self.fd, [view], address)
        if got != size:
            raise ChunkError(f"the chunk is cut short ({got} of {size} bytes): file truncated")
        return int(self.masks[i]), view


def _chunk_allocated(dset, offset) -> bool:
    info = dset.id.get_chunk_info_by_coord(offset)
    return info.byte_offset is not None


def _with_context(exc, codec, offset, num_events):
    first = offset[0]
    last = min(first + codec.chunks[0], num_events)
    message = (
        f"{codec.name or 'dataset'}: stored chunk at offset {tuple(offset)} "
        f"(events {first} to {last - 1}) cannot be read: {exc}"
    )
    return type(exc)(message, chunk_offset=tuple(offset), events=(first, last), dataset=codec.name)


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


class EncodedBlock:
    """The encoded chunks of one block, ready for :func:`write_chunks`.

    Plain attributes (a shape and a list of bytes), so it is cheap to send
    from a worker to the writer.

    Attributes
    ----------
    shape : tuple of int
        Shape of the block that was encoded.
    chunk_shape : tuple of int
        The chunk shape it was encoded for.
    chunks : list of bytes
        Encoded chunks, in C order of the block's chunk grid.
    """

    def __init__(self, shape, chunk_shape, chunks):
        self.shape = tuple(shape)
        self.chunk_shape = tuple(chunk_shape)
        self.chunks = list(chunks)

    @property
    def nbytes(self) -> int:
        """Total size of the encoded chunks."""
        return sum(len(c) for c in self.chunks)

    def __len__(self):
        return len(self.chunks)

    def __repr__(self):
        return (
            f"EncodedBlock(shape={self.shape}, chunk_shape={self.chunk_shape}, "
            f"{len(self.chunks)} chunks, {self.nbytes} bytes)"
        )


def encode_block(codec: ChunkCodec, block) -> EncodedBlock:
    """Split a block into chunks and encode each of them.

    Parameters
    ----------
    codec : ChunkCodec
        Of the target dataset.
    block : array_like
        The data of a chunk-aligned region (events along axis 0). Along each
        axis it must span whole chunks, except at the end of the dataset
        (:func:`write_chunks` checks this), e.g. full frames of
        ``k * chunks[0]`` events, or fewer events for the last block.

    Returns
    -------
    EncodedBlock
    """
    codec._check_supported()
    block = np.asarray(block)
    if block.ndim != len(codec.chunks):
        raise ValueError(
            f"block has {block.ndim} axes, the dataset's chunks {codec.chunks} have "
            f"{len(codec.chunks)}"
        )
    encoded = [
        codec.encode(
            block[tuple(slice(o, o + c) for o, c in zip(offset, codec.chunks, strict=True))]
        )
        for offset in _chunk_offsets([(0, s) for s in block.shape], codec.chunks)
    ]
    return EncodedBlock(block.shape, codec.chunks, encoded)


def write_chunks(dset, start, block: EncodedBlock) -> None:
    """Write encoded chunks into an HDF5 dataset with ``write_direct_chunk``.

    Call it from a single writer; the dataset must already have its final
    shape (create or ``resize`` it first).

    Parameters
    ----------
    dset : h5py.Dataset
        Opened writable, with the filter pipeline the block was encoded for.
    start : int or tuple of int
        Offset of the block: an event index (the block spans whole frames
        from pixel 0) or one offset per axis; each a multiple of the chunk
        shape.
    block : EncodedBlock
        From :func:`encode_block`.
    """
    chunks = dset.chunks
    if chunks is None:
        raise ValueError(f"{_describe(dset)} is not chunked; write it with dset[...] = data")
    if tuple(chunks) != block.chunk_shape:
        raise ValueError(
            f"the block was encoded for chunks {block.chunk_shape}, "
            f"{_describe(dset)} has chunks {tuple(chunks)}"
        )
    origin = (int(start),) + (0,) * (len(chunks) - 1) if np.ndim(start) == 0 else start
    origin = tuple(int(o) for o in origin)
    if len(origin) != len(chunks):
        raise ValueError(f"start {start} must give one offset per axis of {dset.shape}")
    for axis, (o, s, c, n) in enumerate(zip(origin, block.shape, chunks, dset.shape, strict=True)):
        if o % c:
            raise ValueError(
                f"start {origin} is not aligned with the chunks {tuple(chunks)} (axis {axis})"
            )
        if o + s > n:
            raise ValueError(
                f"a block of shape {block.shape} at {origin} does not fit {_describe(dset)} "
                f"of shape {dset.shape}: create or resize the dataset to its final shape first"
            )
        if (o + s) % c and o + s != n:
            # the padding of a partial chunk would overwrite data of the next block
            raise ValueError(
                f"a block of shape {block.shape} at {origin} ends inside a chunk on axis "
                f"{axis} and not at the dataset's end ({n}); blocks must span whole chunks"
            )
    offsets = list(
        _chunk_offsets([(o, o + s) for o, s in zip(origin, block.shape, strict=True)], chunks)
    )
    if len(offsets) != len(block.chunks):
        raise ValueError(
            f"the block holds {len(block.chunks)} chunks, its shape {block.shape} needs "
            f"{len(offsets)}"
        )
    for offset, data in zip(offsets, block.chunks, strict=True):
        dset.id.write_direct_chunk(offset, data, filter_mask=0)


# --------------------------------------------------------------------------
# copying a dataset chunk by chunk
# --------------------------------------------------------------------------


def can_copy_chunks(dset) -> bool:
    """Whether :class:`ChunkCopy` can copy ``dset``: chunked, stored in its own file.

    Contiguous, compact, virtual and external datasets have no stored chunks
    to move; copy those with ``h5py.Group.copy``.
    """
    plist = dset.id.get_create_plist()
    return (
        plist.get_layout() == h5py.h5d.CHUNKED
        and plist.get_external_count() == 0
        and not dset.is_virtual
    )


def create_empty_like(group, name: str, src):
    """Create ``group[name]`` exactly like ``src`` (of any file), without its data.

    The same datatype, shape and maximum shape, creation properties (chunks,
    filter pipeline with its flags and parameters, fill value, allocation
    time) and attributes with their stored types, as ``h5py.Group.copy``
    gives; :class:`ChunkCopy` then moves the stored chunks. Attributes of
    fixed-size types are copied as raw bytes with their file type, so a
    string keeps its padding and character set; variable-length ones go
    through h5py.

    Returns
    -------
    h5py.Dataset
    """
    tid = src.id.get_type().copy()  # transient: a committed type of another file cannot be used
    dsid = h5py.h5d.create(
        group.id, name.encode(), tid, src.id.get_space(), dcpl=src.id.get_create_plist()
    )
    dst = h5py.Dataset(dsid)
    copy_attributes(src, dst)
    return dst


def copy_attributes(src, dst) -> None:
    """Copy every attribute of ``src`` onto ``dst`` with its stored type (see
    :func:`create_empty_like`)."""
    for key in src.attrs:
        _copy_attribute(src, dst, key)


def _copy_attribute(src, dst, key: str) -> None:
    aid = src.attrs.get_id(key)
    tid = aid.get_type()
    raw = not (
        tid.detect_class(h5py.h5t.VLEN)
        or tid.detect_class(h5py.h5t.REFERENCE)
        or (tid.get_class() == h5py.h5t.STRING and tid.is_variable_str())
        or not key.isascii()
    )
    if not raw:
        dst.attrs.create(key, src.attrs[key], dtype=aid.dtype)
        return
    new = h5py.h5a.create(dst.id, key.encode(), tid, aid.get_space())
    try:
        if aid.shape is not None:  # None: a null dataspace (h5py.Empty), nothing to write
            buf = np.empty(aid.shape, dtype=np.dtype(f"V{tid.get_size()}"))
            aid.read(buf, mtype=tid)
            new.write(buf, mtype=tid)
    finally:
        new.close()


class ChunkCopy:
    """Copy the stored chunks of one dataset into an empty twin, one at a time.

    ``h5py.Group.copy`` moves a whole dataset in one call that holds h5py's
    lock throughout (seconds for GBs of images), so nothing else in the
    process can read or write HDF5 meanwhile. Here each chunk is one short
    ``write_direct_chunk``: the stored bytes stay as they are (no decompression,
    the checksum travels with them), and the chunks can be copied between
    other work or by a thread beside it (:meth:`run`).

    The bytes are read with ``os.pread`` at the chunk's file address, outside
    h5py's lock and the GIL, so a cold input is read from disk while the
    other threads go on. The address is checked against
    ``read_direct_chunk`` on the first chunk; a file where they differ (or
    not a plain file) is read through h5py instead.

    Parameters
    ----------
    src : h5py.Dataset
        A chunked dataset (:func:`can_copy_chunks`), open for reading.
    dst : h5py.Dataset
        Its empty twin (:func:`create_empty_like`).
    """

    def __init__(self, src, dst):
        self.src, self.dst = src, dst
        # in file order: the disk reads sequentially
        self.chunks = sorted(_stored_chunk_infos(src), key=lambda info: info.byte_offset)
        self.done = 0
        self.nbytes = sum(info.size for info in self.chunks)
        self.fd = self._open_raw()

    def _open_raw(self):
        """A file descriptor to read the chunks from, or None to read through h5py."""
        if not self.chunks or self.src.file.driver != "sec2":
            return None
        fd = os.open(self.src.file.filename, os.O_RDONLY)
        if _address_holds_chunk(fd, self.src, self.chunks[0]):
            return fd
        os.close(fd)
        return None

    def step(self) -> int:
        """Copy the next chunk; returns its size in bytes (0 when all are copied)."""
        if self.done >= len(self.chunks):
            return 0
        offset, mask, address, size = self.chunks[self.done]  # a StoreInfo
        if self.fd is not None:
            data = os.pread(self.fd, size, address)
            if len(data) != size:
                raise ChunkError(
                    f"{_describe(self.src)}: the chunk at offset {tuple(offset)} is cut short "
                    f"({len(data)} of {size} bytes): the file was truncated"
                )
        else:
            mask, data = self.src.id.read_direct_chunk(offset)
        self.dst.id.write_direct_chunk(offset, data, filter_mask=mask)
        self.done += 1
        return size

    def run(self, stop=None, on_chunk=None) -> None:
        """Copy the remaining chunks; stop early when ``stop`` (an Event) is set.

        ``on_chunk(nbytes)`` is called after each chunk.
        """
        while self.done < len(self.chunks) and (stop is None or not stop.is_set()):
            size = self.step()
            if on_chunk is not None:
                on_chunk(size)

    def close(self) -> None:
        """Release the raw file descriptor (the datasets belong to the caller)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
