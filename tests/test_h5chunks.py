"""Chunk-level HDF5 I/O outside h5py: exact bytes, checksums, fallbacks.

Every file written here through ``write_direct_chunk`` is read back with plain
h5py + hdf5plugin (which verifies fletcher32), and the encoded bytes are
compared with what HDF5 itself stores for the same data and filters.
"""

from __future__ import annotations

import pickle
import struct
import threading

import h5py
import hdf5plugin
import numpy as np
import pytest
from conftest import flip_bytes_in_chunk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollmed_dask import h5chunks as hc

FILTERS = {
    "none": {},
    "fletcher32": {"fletcher32": True},
    # what dcnum writes
    "zstd5+fletcher32": {**hdf5plugin.Zstd(clevel=5), "fletcher32": True},
    "gzip+shuffle+fletcher32": {"compression": "gzip", "shuffle": True, "fletcher32": True},
    "zstd5": {**hdf5plugin.Zstd(clevel=5)},
}
DTYPES = ["uint8", "uint16", "int16", "float32", "float64"]


def h5_fletcher32_reference(data: bytes) -> int:
    """Line-by-line port of HDF5's H5_checksum_fletcher32 (H5checksum.c)."""
    length = len(data) // 2
    sum1 = sum2 = 0
    pos = 0
    while length:
        tlen = min(length, 360)
        length -= tlen
        for _ in range(tlen):
            sum1 = (sum1 + ((data[pos] << 8) | data[pos + 1])) & 0xFFFFFFFF
            pos += 2
            sum2 = (sum2 + sum1) & 0xFFFFFFFF
        sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
        sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    if len(data) % 2:
        sum1 = (sum1 + (data[pos] << 8)) & 0xFFFFFFFF
        sum2 = (sum2 + sum1) & 0xFFFFFFFF
        sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
        sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    sum1 = (sum1 & 0xFFFF) + (sum1 >> 16)
    sum2 = (sum2 & 0xFFFF) + (sum2 >> 16)
    return (sum2 << 16) | sum1


def image_like(n, h, w, dtype="uint8", seed=0):
    """Noisy images with structure (channel profile, fixed pattern, blobs)."""
    rng = np.random.default_rng(seed)
    y = np.arange(h)[:, None]
    x = np.arange(w)[None, :]
    bg = 110 + 25 * np.exp(-(((y - h / 2) / (0.35 * h)) ** 2)) + 4 * np.sin(x / 17.0)
    bg = bg + rng.normal(0, 3, (h, w))
    frames = bg + rng.normal(0, 2.5, (n, h, w))
    cx = rng.uniform(0, w, n)[:, None, None]
    cy = rng.uniform(0.3 * h, 0.7 * h, n)[:, None, None]
    frames -= 40 * ((((x - cx) / 12) ** 2 + ((y - cy) / 9) ** 2) < 1)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (frames / 7.0).astype(dtype)
    if dtype.kind == "i":
        frames -= 128  # negative values too
    return np.rint(frames).astype(dtype)


def stored_chunks(dset):
    """{offset: (filter_mask, bytes)} of every allocated chunk."""
    out = {}
    for i in range(dset.id.get_num_chunks()):
        offset = dset.id.get_chunk_info(i).chunk_offset
        out[offset] = dset.id.read_direct_chunk(offset)
    return out


# ---------------------------------------------------------------- fletcher32


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 719, 720, 721, 1441, 4095, 4096, 4097, 8193])
@pytest.mark.parametrize("fill", [None, 0x00, 0xFF])
def test_fletcher32_matches_hdf5_code(size, fill):
    rng = np.random.default_rng(size)
    if fill is None:
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    else:
        data = bytes([fill]) * size  # all-0xFF: sums == 0 (mod 65535), reported as 0xFFFF
    assert hc.fletcher32(data) == h5_fletcher32_reference(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=6000))
def test_fletcher32_matches_hdf5_code_hypothesis(data):
    assert hc.fletcher32(data) == h5_fletcher32_reference(data)


def test_fletcher32_matches_checksums_hdf5_stored(tmp_path):
    # odd number of bytes per chunk (3*5*7), an all-zero and an all-0xFF chunk
    data = np.random.default_rng(1).integers(0, 256, (12, 5, 7), dtype=np.uint8)
    data[3:6] = 0
    data[6:9] = 255
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dset = f.create_dataset("x", data=data, chunks=(3, 5, 7), fletcher32=True)
        for offset, (mask, raw) in stored_chunks(dset).items():
            assert mask == 0
            assert len(raw) == 3 * 5 * 7 + 4
            payload = data[offset[0] : offset[0] + 3].tobytes()
            assert raw[:-4] == payload
            # HDF5 appends the checksum little-endian
            assert raw[-4:] == struct.pack("<I", hc.fletcher32(payload))
            assert raw[-4:] == struct.pack("<I", h5_fletcher32_reference(payload))


@pytest.mark.parametrize("size", [1, 2, 3, 4095, 40 * 80 * 320])
def test_fletcher32_and_shuffle_give_numcodecs_bytes(size):
    # h5chunks keeps its own versions for speed (see the comment there); they
    # must stay byte-identical to the library's
    from numcodecs import Fletcher32, Shuffle

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert bytes(Fletcher32().encode(data)) == data + struct.pack("<I", hc.fletcher32(data))
    for itemsize in (2, 4, 8):
        whole = data[: len(data) - len(data) % itemsize]
        if len(whole) >= 2 * itemsize:
            ours = hc._shuffle(whole, itemsize, reverse=False)
            assert bytes(Shuffle(elementsize=itemsize).encode(whole)) == ours.tobytes()
            back = hc._shuffle(ours, itemsize, reverse=True)
            assert back.tobytes() == whole


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filters", list(FILTERS))
def test_round_trip_and_same_bytes_as_hdf5(tmp_path, dtype, filters):
    # 95 events in chunks of 10: the last chunk is an edge chunk (5 events)
    data = image_like(95, 12, 20, dtype)
    chunks = (10, 12, 20)
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        ref = f.create_dataset("by_h5py", data=data, chunks=chunks, **FILTERS[filters])
        ours = f.create_dataset(
            "ours", shape=data.shape, dtype=data.dtype, chunks=chunks, **FILTERS[filters]
        )
        codec = hc.ChunkCodec.from_dataset(ours)
        assert codec.supported, codec.reason
        assert codec == hc.ChunkCodec.from_dataset(ref)
        for start in (0, 40, 80):  # blocks of 4 chunks, the last one 1.5 chunks
            hc.write_chunks(ours, start, hc.encode_block(codec, data[start : start + 40]))
        # exactly the bytes HDF5 + hdf5plugin stored themselves
        assert stored_chunks(ours) == stored_chunks(ref)
        # our reader decodes what h5py wrote
        np.testing.assert_array_equal(hc.read_block(ref, 0, 95), data)
    with h5py.File(path, "r") as f:
        # plain h5py (checking fletcher32) reads what we wrote, bit for bit
        back = f["ours"][...]
        assert back.dtype == data.dtype
        np.testing.assert_array_equal(back.view(np.uint8), data.view(np.uint8))
        np.testing.assert_array_equal(hc.read_block(f["ours"], 33, 92), data[33:92])


def test_decode_into_out_and_writable(tmp_path):
    data = image_like(20, 8, 8, "uint16")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dset = f.create_dataset("x", data=data, chunks=(10, 8, 8), **FILTERS["zstd5+fletcher32"])
        codec = hc.ChunkCodec.from_dataset(dset)
        mask, raw = dset.id.read_direct_chunk((10, 0, 0))
    decoded = codec.decode(raw, mask)
    assert decoded.flags.writeable and decoded.shape == (10, 8, 8)
    np.testing.assert_array_equal(decoded, data[10:])
    out = np.zeros((10, 8, 8), np.uint16)
    assert codec.decode(raw, mask, out=out) is out
    np.testing.assert_array_equal(out, data[10:])
    with pytest.raises(ValueError, match="out must be"):
        codec.decode(raw, mask, out=np.zeros((10, 8, 8), np.int32))


@pytest.mark.parametrize(
    "filters", [[], [hc.FILTER_DEFLATE], [hc.FILTER_SHUFFLE, hc.FILTER_DEFLATE]]
)
def test_a_decoded_chunk_is_writable_and_its_own(filters):
    """Whatever the last filter hands back (the raw bytes themselves, zlib's
    read-only bytes, or a 1-byte shuffle, which leaves them as they are)."""
    cds = {hc.FILTER_DEFLATE: (4,), hc.FILTER_SHUFFLE: (1,)}
    codec = hc.ChunkCodec([(f, cds[f]) for f in filters], (10, 4), "u1")
    block = np.arange(40, dtype="u1").reshape(10, 4)
    raw = np.frombuffer(codec.encode(block), dtype=np.uint8)
    decoded = codec.decode(raw)
    assert decoded.flags.writeable and not np.shares_memory(decoded, raw)
    np.testing.assert_array_equal(decoded, block)


def test_edge_chunk_is_padded_with_the_fill_value(tmp_path):
    data = image_like(25, 3, 5, "int16")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        kw = {"chunks": (10, 2, 4), "fillvalue": 7, **FILTERS["gzip+shuffle+fletcher32"]}
        ref = f.create_dataset("ref", data=data, **kw)
        ours = f.create_dataset("ours", shape=data.shape, dtype=data.dtype, **kw)
        codec = hc.ChunkCodec.from_dataset(ours)
        assert codec.fillvalue == 7
        hc.write_chunks(ours, 0, hc.encode_block(codec, data))
        assert stored_chunks(ours) == stored_chunks(ref)
        decoded = codec.decode(*reversed(ref.id.read_direct_chunk((20, 2, 4))))
        assert (decoded[5:] == 7).all() and (decoded[:, 1:] == 7).all()
        np.testing.assert_array_equal(ours[...], data)


def test_big_endian_dataset(tmp_path):
    data = image_like(30, 4, 6, "int16").astype(">i2")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        kw = {"chunks": (10, 4, 6), **FILTERS["gzip+shuffle+fletcher32"]}
        ref = f.create_dataset("ref", data=data, **kw)
        ours = f.create_dataset("ours", shape=data.shape, dtype=data.dtype, **kw)
        codec = hc.ChunkCodec.from_dataset(ours)
        assert codec.dtype == np.dtype(">i2")
        # native-order input is accepted (same values), converted to the file's order
        hc.write_chunks(ours, 0, hc.encode_block(codec, data.astype("<i2")))
        assert stored_chunks(ours) == stored_chunks(ref)
        np.testing.assert_array_equal(ours[...], data)
        np.testing.assert_array_equal(hc.read_block(ref, 5, 27), data[5:27])
        with pytest.raises(TypeError, match="without changing values"):
            codec.encode(data[:10].astype(np.int32))


@pytest.mark.parametrize("level", [0, 2**32 - 5, 2**31, 1, 5, 9, 30])
def test_zstd_levels_give_hdf5plugin_bytes(tmp_path, level):
    # the plugin reads cd_values[0] as a C int and clamps it to 1..22
    # (0, -5 and 2**31, which is INT_MIN, become 1; 30 becomes 22)
    data = image_like(8, 40, 64)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        ref = f.create_dataset(
            "ref", data=data, chunks=(8, 40, 64), compression=32015, compression_opts=(level,)
        )
        codec = hc.ChunkCodec.from_dataset(ref)
        assert codec.encode(data) == ref.id.read_direct_chunk((0, 0, 0))[1]


def test_realistic_dcnum_chunk_has_identical_bytes(tmp_path):
    # a full (40, 80, 320) uint8 chunk as dcnum writes it: zstd-5 + fletcher32
    data = image_like(80, 80, 320)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        ref = f.create_dataset(
            "ref", data=data, chunks=(40, 80, 320), **FILTERS["zstd5+fletcher32"]
        )
        codec = hc.ChunkCodec.from_dataset(ref)
        for start in (0, 40):
            raw = ref.id.read_direct_chunk((start, 0, 0))[1]
            assert len(raw) < 0.9 * data[:40].nbytes  # it does compress
            assert codec.encode(data[start : start + 40]) == raw


# ---------------------------------------------------------------- tiles


def test_pixel_tiled_chunks_read_as_frames_and_tiles(tmp_path):
    data = image_like(100, 80, 160, "uint16")
    path = tmp_path / "f.h5"
    kw = {"chunks": (40, 40, 80), **FILTERS["zstd5+fletcher32"]}
    with h5py.File(path, "w") as f:
        ref = f.create_dataset("ref", data=data, **kw)
        ours = f.create_dataset("ours", shape=data.shape, dtype=data.dtype, **kw)
        codec = hc.ChunkCodec.from_dataset(ours)
        # full-frame blocks and pixel-tile blocks (tuple origin)
        hc.write_chunks(ours, 0, hc.encode_block(codec, data[:40]))
        for y, x in [(0, 0), (0, 80), (40, 0), (40, 80)]:
            block = hc.encode_block(codec, data[40:100, y : y + 40, x : x + 80])
            assert len(block) == 2  # 40 events + an edge chunk of 20
            hc.write_chunks(ours, (40, y, x), block)
        assert stored_chunks(ours) == stored_chunks(ref)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["ours"][...], data)
        dset = f["ours"]
        codec = hc.ChunkCodec.from_dataset(dset)
        np.testing.assert_array_equal(hc.read_block(dset, 0, 100, codec=codec), data)
        np.testing.assert_array_equal(
            hc.read_block(dset, 40, 80, (slice(40, 80), slice(80, 160)), codec=codec),
            data[40:80, 40:80, 80:160],
        )
        # unaligned everything, and a tile given for one axis only
        np.testing.assert_array_equal(
            hc.read_block(dset, 13, 97, (slice(7, 71), slice(33, 151)), codec=codec),
            data[13:97, 7:71, 33:151],
        )
        np.testing.assert_array_equal(
            hc.read_block(dset, 39, 41, (slice(-10, None),)), data[39:41, -10:]
        )
        assert hc.read_block(dset, 5, 5).shape == (0, 80, 160)
        with pytest.raises(ValueError, match="step 1"):
            hc.read_block(dset, 0, 10, (slice(0, 10, 2),))
        with pytest.raises(ValueError, match="outside the dataset"):
            hc.read_block(dset, 90, 101)


def test_read_block_refuses_a_tile_or_out_that_does_not_fit(tmp_path):
    data = image_like(20, 4, 6)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dset = f.create_dataset("x", data=data, chunks=(10, 4, 6), **FILTERS["zstd5"])
        with pytest.raises(ValueError, match=r"tile .* has more axes than the frames"):
            hc.read_block(dset, 0, 10, (slice(0, 2), slice(0, 3), slice(0, 1)))
        with pytest.raises(TypeError, match="tile entries must be slices, got 2"):
            hc.read_block(dset, 0, 10, (2,))
        with pytest.raises(ValueError, match=r"out has shape \(10, 4, 5\)"):
            hc.read_block(dset, 0, 10, out=np.empty((10, 4, 5), "u1"))


def test_no_chunk_intersects_an_empty_region():
    """Even when the empty range starts inside a chunk."""
    assert list(hc._chunk_offsets([(5, 5), (0, 4)], (10, 4))) == []
    assert list(hc._chunk_offsets([(5, 6), (0, 4)], (10, 4))) == [(0, 0)]


def test_a_big_endian_dataset_reads_into_a_native_out(tmp_path):
    """``out`` of another byte order than the file's: each chunk is decoded on
    its own, then converted into ``out``."""
    data = image_like(30, 4, 6, "int16").astype(">i2")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dset = f.create_dataset("x", data=data, chunks=(10, 4, 6), **FILTERS["zstd5+fletcher32"])
        out = np.zeros(data.shape, "<i2")
        assert hc.read_block(dset, 0, 30, out=out) is out
        np.testing.assert_array_equal(out, data)


# ---------------------------------------------------------------- corruption


@pytest.mark.parametrize("filters", ["fletcher32", "zstd5+fletcher32", "gzip+shuffle+fletcher32"])
def test_corrupt_chunk_is_detected_and_located(tmp_path, filters):
    data = image_like(120, 16, 24, "uint8")
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("events/image", data=data, chunks=(40, 16, 24), **FILTERS[filters])
    offset = flip_bytes_in_chunk(path, "events/image", 1)
    assert offset == (40, 0, 0)
    with h5py.File(path, "r") as f:
        dset = f["events/image"]
        with pytest.raises(OSError):  # plain h5py notices too
            dset[...]
        with pytest.raises(hc.ChunkChecksumError, match=r"events 40 to 79") as info:
            hc.read_block(dset, 0, 120)
        err = info.value
        assert isinstance(err, OSError)
        assert err.chunk_offset == (40, 0, 0) and err.events == (40, 80)
        assert err.dataset == f"/events/image in {path}"  # for callers that report it
        assert "offset (40, 0, 0)" in str(err) and "events/image" in str(err)
        assert "fletcher32" in str(err)
        # the intact chunks still read
        np.testing.assert_array_equal(hc.read_block(dset, 0, 40), data[:40])
        np.testing.assert_array_equal(hc.read_block(dset, 80, 120), data[80:])


def test_corrupt_zstd_stream_without_checksum_raises_chunk_error(tmp_path):
    data = image_like(40, 16, 24)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dset = f.create_dataset("x", data=data, chunks=(20, 16, 24), **FILTERS["zstd5"])
        codec = hc.ChunkCodec.from_dataset(dset)
        raw = dset.id.read_direct_chunk((20, 0, 0))[1]
    with pytest.raises(hc.ChunkError, match="zstd"):
        codec.decode(b"\x00" * 8 + raw[8:])
    with pytest.raises(hc.ChunkError, match="decodes to"):
        codec.decode(hc.ChunkCodec([(hc.FILTER_ZSTD, (5,))], (10, 16, 24), "u1").encode(data[:10]))


def test_a_corrupt_deflate_stream_is_a_chunk_error():
    codec = hc.ChunkCodec([(hc.FILTER_DEFLATE, (4,))], (10, 4), "u1")
    raw = codec.encode(np.arange(40, dtype="u1").reshape(10, 4))
    with pytest.raises(hc.ChunkError, match=r"deflate \(zlib\) decompression failed"):
        codec.decode(raw[:2] + b"\xff" * (len(raw) - 2))


def test_a_chunk_too_short_for_its_fletcher32():
    codec = hc.ChunkCodec([(hc.FILTER_FLETCHER32, ())], (10, 4), "u1")
    with pytest.raises(hc.ChunkChecksumError, match="3 bytes is too short to hold a fletcher32"):
        codec.decode(b"\0\0\0")
    # 4 bytes hold the checksum of nothing (0): valid, but no chunk
    with pytest.raises(hc.ChunkError, match="chunk decodes to 0 bytes, expected 40"):
        codec.decode(struct.pack("<I", 0))


@pytest.mark.parametrize("events", [5, 20])
def test_a_zstd_frame_of_another_size_is_refused_when_decoded_into_out(events):
    """The frame's header says how many bytes it holds: a frame smaller than
    the chunk must not fill the start of ``out`` and leave the rest as it was."""
    codec = hc.ChunkCodec([(hc.FILTER_ZSTD, (5,))], (10, 16, 24), "u1")
    other = hc.ChunkCodec([(hc.FILTER_ZSTD, (5,))], (events, 16, 24), "u1")
    raw = other.encode(image_like(events, 16, 24))
    out = np.zeros((10, 16, 24), "u1")
    with pytest.raises(hc.ChunkError, match=f"decodes to {events * 16 * 24} bytes"):
        codec.decode(raw, out=out)


def test_old_hdf5_byte_swapped_fletcher32_is_accepted(tmp_path):
    # HDF5 < 1.6.3 stored the checksum with the bytes of each half swapped;
    # HDF5 still accepts it, and so do we
    data = image_like(10, 4, 5)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dset = f.create_dataset(
            "x", shape=data.shape, dtype="u1", chunks=(10, 4, 5), fletcher32=True
        )
        codec = hc.ChunkCodec.from_dataset(dset)
        value = hc.fletcher32(data.tobytes())
        swapped = ((value & 0x00FF00FF) << 8) | ((value >> 8) & 0x00FF00FF)
        assert swapped != value
        dset.id.write_direct_chunk((0, 0, 0), data.tobytes() + struct.pack("<I", swapped))
        np.testing.assert_array_equal(dset[...], data)
        np.testing.assert_array_equal(hc.read_block(dset, 0, 10, codec=codec), data)
        with pytest.raises(hc.ChunkChecksumError, match="mismatch"):
            codec.decode(data.tobytes() + struct.pack("<I", value ^ 1))


# ---------------------------------------------------------------- filter mask, fill


def test_filter_mask_skips_filters(tmp_path):
    # a chunk stored with zstd skipped (bit 0) but fletcher32 applied, as HDF5
    # does when an optional filter fails
    data = image_like(20, 6, 8, "uint16")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dset = f.create_dataset(
            "x", shape=data.shape, dtype=data.dtype, chunks=(10, 6, 8),
            **FILTERS["zstd5+fletcher32"],
        )  # fmt: skip
        codec = hc.ChunkCodec.from_dataset(dset)
        plain = data[10:].tobytes()
        dset.id.write_direct_chunk(
            (10, 0, 0), plain + struct.pack("<I", hc.fletcher32(plain)), filter_mask=0b01
        )
        hc.write_chunks(dset, 0, hc.encode_block(codec, data[:10]))
        assert dset.id.get_chunk_info_by_coord((10, 0, 0)).filter_mask == 1
        np.testing.assert_array_equal(dset[...], data)  # h5py honours the mask
        np.testing.assert_array_equal(hc.read_block(dset, 0, 20, codec=codec), data)
        mask, raw = dset.id.read_direct_chunk((10, 0, 0))
        np.testing.assert_array_equal(codec.decode(raw, mask), data[10:])


def test_unallocated_chunks_read_as_fill_value(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dset = f.create_dataset(
            "x", shape=(30, 4, 4), dtype="f4", chunks=(10, 4, 4), fillvalue=-1.5,
            **FILTERS["zstd5+fletcher32"],
        )  # fmt: skip
        dset[10:20] = 3.0
        out = hc.read_block(dset, 0, 30)
        np.testing.assert_array_equal(out, dset[...])
        assert (out[:10] == -1.5).all() and (out[10:20] == 3).all()


# ---------------------------------------------------------------- fallbacks


def test_unsupported_filter_falls_back_to_h5py(tmp_path):
    data = image_like(50, 8, 8, "int16")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        lzf = f.create_dataset("lzf", data=data, chunks=(10, 8, 8), compression="lzf")
        contiguous = f.create_dataset("contiguous", data=data)
        for dset, word in [(lzf, "lzf"), (contiguous, "not chunked")]:
            codec = hc.ChunkCodec.from_dataset(dset)
            assert not codec.supported
            assert word in codec.reason
            np.testing.assert_array_equal(hc.read_block(dset, 3, 47), data[3:47])
            np.testing.assert_array_equal(
                hc.read_block(dset, 3, 47, (slice(1, 5),), codec=codec), data[3:47, 1:5]
            )
            with pytest.raises(ValueError, match=word):
                codec.encode(data[:10])
            with pytest.raises(ValueError, match=word):
                hc.encode_block(codec, data[:10])
            with pytest.raises(ValueError, match=word):
                codec.decode(b"\0" * 64)


def test_the_fallback_reads_into_an_out_that_is_not_contiguous(tmp_path):
    data = image_like(50, 8, 8, "int16")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dset = f.create_dataset("lzf", data=data, chunks=(10, 8, 8), compression="lzf")
        for out in (np.zeros((44, 8, 8), "i2"), np.zeros((44, 8, 16), "i2")[:, :, ::2]):
            assert hc.read_block(dset, 3, 47, out=out) is out
            np.testing.assert_array_equal(out, data[3:47])


def test_a_dataset_of_a_type_numpy_has_not_is_unsupported(tmp_path):
    """An HDF5 time type: h5py cannot give its dtype, so neither can the codec."""
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((2,))
        space = h5py.h5s.create_simple((4,))
        h5py.h5d.create(f.id, b"time", h5py.h5t.UNIX_D32LE.copy(), space, dcpl=dcpl)
        codec = hc.ChunkCodec.from_dataset(f["time"])
        assert not codec.supported
        assert codec.reason == "cannot describe dtype: No NumPy equivalent for TypeTimeID exists"


def test_codecs_the_reader_cannot_apply_are_refused_with_the_reason(tmp_path):
    assert hc.ChunkCodec([(hc.FILTER_DEFLATE, (9,))], (10, 4), "u1").supported
    shuffle = hc.ChunkCodec([(hc.FILTER_SHUFFLE, ())], (10, 4), "u2")  # the item size: dtype's
    block = np.arange(40, dtype="u2").reshape(10, 4)
    np.testing.assert_array_equal(shuffle.decode(shuffle.encode(block)), block)
    for filters, dtype, words in [
        ([(hc.FILTER_DEFLATE, (10,))], "u1", "invalid deflate"),
        ([(hc.FILTER_DEFLATE, (4, 5))], "u1", "invalid deflate"),
        ([(hc.FILTER_SHUFFLE, (0,))], "u2", "invalid shuffle"),
        ([], "?", "not a plain integer or float"),
        ([], [("a", "<u2")], "not a plain integer or float"),
        ([], "V4", "not a plain integer or float"),
    ]:
        codec = hc.ChunkCodec(filters, (10, 4), dtype)
        assert not codec.supported and words in codec.reason, (filters, dtype)
    data = np.arange(200).reshape(50, 4) % 3 == 0
    with h5py.File(tmp_path / "f.h5", "w") as f:  # and read through h5py
        dset = f.create_dataset("flags", data=data, chunks=(10, 4), compression="gzip")
        assert not hc.ChunkCodec.from_dataset(dset).supported
        np.testing.assert_array_equal(hc.read_block(dset, 3, 47), data[3:47])


def test_codec_pickles():
    codec = hc.ChunkCodec(
        [(hc.FILTER_SHUFFLE, (2,)), (hc.FILTER_ZSTD, (5,)), (hc.FILTER_FLETCHER32, ())],
        (10, 4, 4), "<u2", fillvalue=3, name="events/image in x.rtdc",
    )  # fmt: skip
    clone = pickle.loads(pickle.dumps(codec))
    assert clone == codec and clone.supported and vars(clone) == vars(codec)
    block = np.arange(160, dtype="<u2").reshape(10, 4, 4)
    assert clone.encode(block) == codec.encode(block)
    err = pickle.loads(
        pickle.dumps(hc.ChunkChecksumError("bad", chunk_offset=(10, 0, 0), events=(10, 20)))
    )
    assert isinstance(err, hc.ChunkChecksumError) and err.events == (10, 20)


def test_write_chunks_validates_placement(tmp_path):
    data = image_like(45, 4, 4)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dset = f.create_dataset("x", shape=(45, 4, 4), dtype="u1", chunks=(10, 4, 4))
        codec = hc.ChunkCodec.from_dataset(dset)
        with pytest.raises(ValueError, match="not aligned"):
            hc.write_chunks(dset, 5, hc.encode_block(codec, data[5:15]))
        with pytest.raises(ValueError, match="resize the dataset"):
            hc.write_chunks(dset, 40, hc.encode_block(codec, np.zeros((10, 4, 4), "u1")))
        with pytest.raises(ValueError, match="ends inside a chunk"):
            hc.write_chunks(dset, 0, hc.encode_block(codec, data[:15]))
        other = hc.ChunkCodec([], (5, 4, 4), "u1")
        with pytest.raises(ValueError, match="encoded for chunks"):
            hc.write_chunks(dset, 0, hc.encode_block(other, data[:10]))
        with pytest.raises(ValueError, match="does not fit the chunk shape"):
            codec.encode(data[:11])
        with pytest.raises(ValueError, match=r"block has 2 axes, the dataset's chunks"):
            hc.encode_block(codec, data[0])
        with pytest.raises(ValueError, match=r"start \(0, 0\) must give one offset per axis"):
            hc.write_chunks(dset, (0, 0), hc.encode_block(codec, data[:10]))
        block = hc.encode_block(codec, data[:20])
        del block.chunks[1]
        with pytest.raises(ValueError, match=r"the block holds 1 chunks, its shape .* needs 2"):
            hc.write_chunks(dset, 0, block)
        f["contiguous"] = data
        with pytest.raises(ValueError, match="is not chunked; write it with"):
            hc.write_chunks(f["contiguous"], 0, hc.encode_block(codec, data[:10]))
        hc.write_chunks(dset, 40, hc.encode_block(codec, data[40:]))  # edge block: fine
        np.testing.assert_array_equal(dset[40:], data[40:])


def test_concurrent_reads_from_threads(tmp_path):
    data = image_like(400, 16, 32)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        dset = f.create_dataset("x", data=data, chunks=(20, 16, 32), **FILTERS["zstd5+fletcher32"])
        codec = hc.ChunkCodec.from_dataset(dset)
        out = np.zeros_like(data)
        errors = []

        def work(k):
            try:
                for start in range(k * 40, 400, 80):
                    hc.read_block(
                        dset, start, start + 40, codec=codec, out=out[start : start + 40]
                    )
            except Exception as exc:  # noqa: BLE001 - reported to the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        np.testing.assert_array_equal(out, data)


# --- copying a dataset chunk by chunk (the images of a new .rtdc output) ---


def _dcpl_properties(dset) -> tuple:
    plist = dset.id.get_create_plist()
    filters = tuple(plist.get_filter(i)[:3] for i in range(plist.get_nfilters()))
    fill = np.zeros(1, dtype=dset.dtype)
    plist.get_fill_value(fill)
    return (
        plist.get_layout(),
        plist.get_chunk(),
        filters,
        fill.tobytes(),
        plist.fill_value_defined(),
        plist.get_alloc_time(),
        plist.get_fill_time(),
    )


def _attrs_raw(dset) -> dict:
    """Each attribute's stored type (compared by HDF5) and value."""
    out = {}
    for key in dset.attrs:
        aid = dset.attrs.get_id(key)
        out[key] = (aid.get_type(), aid.shape, repr(dset.attrs[key]))
    return out


def _stored_chunks(dset) -> dict:
    offsets = []
    dset.id.chunk_iter(lambda info: offsets.append(info.chunk_offset))  # None: go on
    return {off: dset.id.read_direct_chunk(off) for off in offsets}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(chunks=(4, 6, 5), fletcher32=True, **hdf5plugin.Zstd(clevel=5)),
        dict(chunks=(3, 6, 5), compression="gzip", shuffle=True, fillvalue=7),
        dict(chunks=(4, 3, 5), maxshape=(None, 6, 5)),
    ],
    ids=["zstd-fletcher32", "gzip-shuffle-fill", "plain-tiles-maxshape"],
)
def test_chunk_copy_equals_h5py_copy(tmp_path, kwargs):
    """Layout, attributes (with their exact stored types) and stored bytes as Group.copy."""
    rng = np.random.default_rng(3)
    src_path = tmp_path / "src.h5"
    with h5py.File(src_path, "w") as h5:
        data = rng.integers(0, 40, (22, 6, 5)).astype(np.uint16)
        ds = h5.create_dataset("events/image", data=data, **kwargs)
        ds[8:12] = 0  # a chunk of zeros
        ds.attrs.create("CLASS", np.bytes_("IMAGE"))
        ds.attrs["text"] = "variable length"
        ds.attrs["numbers"] = np.arange(3, dtype=">i4")
        ds.attrs["empty"] = h5py.Empty("f8")
        # a NULLTERM string, as C writers make them: h5py would store NULLPAD
        tid = h5py.h5t.C_S1.copy()
        tid.set_size(6)
        tid.set_strpad(h5py.h5t.STR_NULLTERM)
        aid = h5py.h5a.create(ds.id, b"nullterm", tid, h5py.h5s.create(h5py.h5s.SCALAR))
        aid.write(np.array(b"abc", dtype="S6"), mtype=tid)
        aid.close()
        # an unallocated chunk stays unallocated
        h5.create_dataset("sparse", shape=(12, 4), chunks=(4, 4), dtype="i2")[4:8] = 5
    with h5py.File(src_path, "r") as hi, h5py.File(tmp_path / "out.h5", "w") as ho:
        for name in ("events/image", "sparse"):
            src = hi[name]
            assert hc.can_copy_chunks(src)
            hi.copy(src, ho, f"by-h5py-{name.replace('/', '-')}")
            ours = hc.create_empty_like(ho, f"ours-{name.replace('/', '-')}", src)
            copy = hc.ChunkCopy(src, ours)
            assert copy.fd is not None  # read with pread, checked on the first chunk
            seen = []
            copy.run(on_chunk=seen.append)
            copy.close()
            theirs = ho[f"by-h5py-{name.replace('/', '-')}"]
            assert (ours.shape, ours.maxshape, ours.dtype) == (theirs.shape, theirs.maxshape,
                                                               theirs.dtype)  # fmt: skip
            assert ours.id.get_type() == theirs.id.get_type()
            assert _dcpl_properties(ours) == _dcpl_properties(theirs)
            assert _attrs_raw(ours) == _attrs_raw(theirs)
            assert _stored_chunks(ours) == _stored_chunks(theirs)
            assert (
                sum(seen) == copy.nbytes == sum(len(c[1]) for c in _stored_chunks(ours).values())
            )
            np.testing.assert_array_equal(ours[()], src[()])


def test_attributes_are_copied_with_their_values(tmp_path):
    """Raw bytes of fixed-size types, whatever memory the copy's buffer had before."""
    numbers = np.random.default_rng(4).integers(-(2**31), 2**31, 3000).astype(">i4")
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        src = h5.create_dataset("x", data=np.arange(10), chunks=(5,))
        src.attrs["numbers"] = numbers
        src.attrs["unit"] = np.bytes_("pixel")
        dst = hc.create_empty_like(h5, "y", src)
        assert dst.attrs["unit"] == b"pixel"
        assert dst.attrs.get_id("numbers").dtype == ">i4"
        np.testing.assert_array_equal(dst.attrs["numbers"], numbers)


def test_chunk_copy_stops_between_chunks(tmp_path):
    with h5py.File(tmp_path / "src.h5", "w") as h5:
        h5.create_dataset("x", data=np.arange(100), chunks=(10,))
    with h5py.File(tmp_path / "src.h5", "r") as hi, h5py.File(tmp_path / "out.h5", "w") as ho:
        copy = hc.ChunkCopy(hi["x"], hc.create_empty_like(ho, "x", hi["x"]))
        stop = threading.Event()
        copy.run(stop, on_chunk=lambda n: copy.done == 3 and stop.set())
        assert copy.done == 3
        copy.run()
        assert copy.step() == 0  # all copied: nothing more to do
        copy.close()
        np.testing.assert_array_equal(ho["x"][()], np.arange(100))


def test_contiguous_dataset_is_not_copied_by_chunks(tmp_path):
    with h5py.File(tmp_path / "src.h5", "w") as h5:
        h5["x"] = np.arange(10)
        assert not hc.can_copy_chunks(h5["x"])


# --- reading stored chunks with pread, outside h5py's lock ---


def test_raw_chunks_read_the_bytes_h5py_reads(tmp_path):
    path = tmp_path / "frames.h5"
    data = np.random.default_rng(5).integers(0, 255, (50, 6, 7), dtype=np.uint8)
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset(
            "x", shape=data.shape, dtype=data.dtype, chunks=(8, 6, 7), fletcher32=True,
            **hdf5plugin.Zstd(clevel=5),
        )  # fmt: skip
        ds[:16] = data[:16]
        ds[24:] = data[24:]  # events 16..23: a chunk never written, read as the fill value
    with h5py.File(path, "r") as h5:
        ds = h5["x"]
        with hc.RawChunks.of(ds) as raw:
            assert raw is not None
            for first in (0, 8, 48):  # 48: the edge chunk
                mask, stored = raw.read((first, 0, 0))
                assert (mask, bytes(stored)) == ds.id.read_direct_chunk((first, 0, 0))
            with pytest.raises(KeyError):
                raw.read((16, 0, 0))
        np.testing.assert_array_equal(hc.read_block(ds, 3, 50), ds[3:50])
        assert not ds[16:24].any()


def test_raw_chunks_follow_a_rewritten_file(tmp_path):
    path = tmp_path / "frames.h5"
    for value in (1, 2):
        with h5py.File(path, "w") as h5:
            h5.create_dataset("x", data=np.full((30, 4, 4), value, np.uint8), chunks=(10, 4, 4))
        with h5py.File(path, "r") as h5:
            assert (hc.read_block(h5["x"], 0, 30) == value).all()


def test_raw_chunks_only_for_full_frame_chunks(tmp_path):
    with h5py.File(tmp_path / "tiles.h5", "w") as h5:
        ds = h5.create_dataset("x", data=np.zeros((30, 4, 4), np.uint8), chunks=(10, 2, 4))
        with hc.RawChunks.of(ds) as raw:
            assert raw is None
