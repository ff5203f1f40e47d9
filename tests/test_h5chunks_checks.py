"""The raw chunk readers' checks, each forced to fail once (issue 23).

With HDF5 >= 1.14.4 a reported chunk address always holds the chunk, so the
branches for the files where it does not (wheels with an older HDF5 report
addresses without the user block) never run by themselves: here the
addresses are shifted as those versions report them, reads fail, files are
truncated under the reader, and the files live in memory.
"""

from __future__ import annotations

import errno
import io
import os
import struct

import h5py
import hdf5plugin
import numpy as np
import pytest

from rollmed_dask import h5chunks as hc

USERBLOCK = 512
ZSTD_FLETCHER32 = {**hdf5plugin.Zstd(clevel=5), "fletcher32": True}


@pytest.fixture(autouse=True)
def no_cached_tables(monkeypatch):
    """Each test builds its own address tables, and leaves none behind."""
    monkeypatch.setattr(hc.RawChunks, "_tables", {})


def frames(n=50, seed=5):
    return np.random.default_rng(seed).integers(0, 255, (n, 6, 7), dtype=np.uint8)


def write_frames(where, data, **kwargs):
    """``x``: whole-frame chunks of 8 events, zstd and fletcher32, as dcnum writes."""
    h5 = h5py.File(where, "w", **kwargs)
    h5.create_dataset("x", data=data, chunks=(8, 6, 7), **ZSTD_FLETCHER32)
    return h5


def copy_chunks(src, dst_file) -> h5py.Dataset:
    dst = hc.create_empty_like(dst_file, "x", src)
    copy = hc.ChunkCopy(src, dst)
    try:
        copy.run()
    finally:
        copy.close()
    return dst


def test_addresses_without_the_user_block_are_read_through_h5py(tmp_path, monkeypatch):
    """As HDF5 < 1.14.4 reports them: the pread check must catch every one."""
    data = frames()
    path = tmp_path / "userblock.h5"
    write_frames(path, data, userblock_size=USERBLOCK).close()
    real = hc._stored_chunk_infos

    def old_hdf5_infos(dset):
        return [info._replace(byte_offset=info.byte_offset - USERBLOCK) for info in real(dset)]

    monkeypatch.setattr(hc, "_stored_chunk_infos", old_hdf5_infos)
    with h5py.File(path, "r") as h5, h5py.File(tmp_path / "out.h5", "w") as out:
        src = h5["x"]
        with hc.RawChunks.of(src) as raw:
            assert raw is None
        np.testing.assert_array_equal(hc.read_block(src, 3, 50), data[3:])
        copy = hc.ChunkCopy(src, hc.create_empty_like(out, "y", src))
        assert copy.fd is None
        copy.close()
        np.testing.assert_array_equal(copy_chunks(src, out)[()], data)


def test_a_failed_read_of_a_stored_chunk_raises_instead_of_zeros(tmp_path, monkeypatch):
    data = frames()
    write_frames(tmp_path / "f.h5", data).close()
    real = hc.RawChunks.read

    def failing_read(self, offset):
        if offset[0] == 8:
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real(self, offset)

    monkeypatch.setattr(hc.RawChunks, "read", failing_read)
    with h5py.File(tmp_path / "f.h5", "r") as h5:
        np.testing.assert_array_equal(hc.read_block(h5["x"], 0, 8), data[:8])
        with pytest.raises(OSError, match="injected"):
            hc.read_block(h5["x"], 0, 50)


@pytest.mark.parametrize("through", ["pread", "h5py"])
def test_the_copy_keeps_each_chunks_filter_mask(tmp_path, monkeypatch, through):
    """A chunk stored with zstd skipped (as HDF5 does when an optional filter
    fails): copied with mask 0, its raw bytes would be read as zstd."""
    if through == "h5py":
        monkeypatch.setattr(hc, "_address_holds_chunk", lambda *args: False)
    data = frames(16)
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        src = h5.create_dataset("x", shape=data.shape, dtype=data.dtype, chunks=(8, 6, 7),
                                **ZSTD_FLETCHER32)  # fmt: skip
        src[:8] = data[:8]
        plain = data[8:].tobytes()
        src.id.write_direct_chunk(
            (8, 0, 0), plain + struct.pack("<I", hc.fletcher32(plain)), filter_mask=0b01
        )
    with h5py.File(tmp_path / "f.h5", "r") as h5, h5py.File(tmp_path / "out.h5", "w") as out:
        dst = copy_chunks(h5["x"], out)
        assert dst.id.read_direct_chunk((8, 0, 0)) == h5["x"].id.read_direct_chunk((8, 0, 0))
        np.testing.assert_array_equal(dst[()], data)


@pytest.mark.parametrize("where", ["bytesio", "core"])
def test_files_that_are_not_plain_files_are_read_through_h5py(tmp_path, where):
    data = frames()
    if where == "bytesio":
        h5 = write_frames(io.BytesIO(), data)
    else:
        h5 = write_frames(tmp_path / "memory.h5", data, driver="core", backing_store=False)
    with h5, h5py.File(tmp_path / "out.h5", "w") as out:
        src = h5["x"]
        with hc.RawChunks.of(src) as raw:
            assert raw is None
        np.testing.assert_array_equal(hc.read_block(src, 3, 50), data[3:])
        np.testing.assert_array_equal(copy_chunks(src, out)[()], data)


def _last_chunk_in_the_file(dset):
    return max(hc._stored_chunk_infos(dset), key=lambda info: info.byte_offset)


def test_a_file_truncated_under_the_reader_is_a_chunk_error(tmp_path):
    path = tmp_path / "f.h5"
    write_frames(path, frames()).close()
    with h5py.File(path, "r") as h5, h5py.File(tmp_path / "out.h5", "w") as out:
        src = h5["x"]
        last = _last_chunk_in_the_file(src)
        copy = hc.ChunkCopy(src, hc.create_empty_like(out, "x", src))
        with hc.RawChunks.of(src) as raw:
            assert raw is not None and copy.fd is not None
            os.truncate(path, last.byte_offset + last.size // 2)
            with pytest.raises(hc.ChunkError, match="cut short"):
                raw.read(last.chunk_offset)
        with pytest.raises(hc.ChunkError, match="cut short"):
            copy.run()
        copy.close()


@pytest.mark.parametrize("words", [(1, 65534), (65534, 2)], ids=["sum1-zero", "sum2-zero"])
def test_fletcher32_with_one_sum_a_multiple_of_65535(words):
    """HDF5's end-around carry gives 0xFFFF, never 0, for each sum on its own;
    random buffers hit this once in 65535."""
    from test_h5chunks import h5_fletcher32_reference

    data = struct.pack(">2H", *words)
    assert hc.fletcher32(data) == h5_fletcher32_reference(data)


def test_chunk_addresses_of_a_rewritten_file_are_found_again(tmp_path):
    """Without a scope the address table is reused for the same file state only: a
    file rewritten with another layout (other chunk sizes, so other addresses)
    reads its new pixels, not the old addresses' bytes."""
    path = tmp_path / "x.h5"
    rng = np.random.default_rng(0)
    first = rng.integers(0, 255, (40, 8, 16), dtype=np.uint8)
    second = rng.integers(0, 255, (40, 8, 16), dtype=np.uint8)
    for frames, level in ((first, 1), (second, 9)):
        with h5py.File(path, "w") as h5:
            # a user block and other data first: the second layout moves every chunk
            h5.create_dataset("pad", data=np.arange(level * 1000))
            h5.create_dataset("events/image", data=frames, chunks=(10, 8, 16),
                              **hdf5plugin.Zstd(clevel=level))  # fmt: skip
        with h5py.File(path, "r") as h5:
            np.testing.assert_array_equal(hc.read_block(h5["events/image"], 0, 40), frames)


@pytest.mark.parametrize("n", [0, 10, 255, 256, 300, 65791, 65792, 70000, 2**24])
def test_the_zstd_frame_header_gives_the_decompressed_size(n):
    """Real frames: one to eight bytes of content size, with and without the
    single-segment flag (2**24 bytes get a window descriptor first)."""
    import numcodecs

    assert hc._zstd_content_size(numcodecs.Zstd(level=1).encode(bytes(n))) == n


MAGIC = struct.pack("<I", 0xFD2FB528)


@pytest.mark.parametrize(
    ("header", "expected"),
    [  # descriptor: content-size flag (2 bits), single segment, 3 unused, dictionary flag (2)
        (bytes([0b00_1_000_00, 42]), 42),  # the shortest header with a size: six bytes
        (bytes([0b00_1_000_01, 7, 99]), 99),  # a 1-byte dictionary id, then the size
        (bytes([0b01_1_000_10, 7, 7, 44, 0]), 300),  # 2-byte id; a 2-byte size is 256 more
        (bytes([0b10_0_000_11, 0x48, 1, 2, 3, 4]) + struct.pack("<I", 70000), 70000),
        (bytes([0b11_1_000_00]) + struct.pack("<Q", 2**33), 2**33),
        (bytes([0b00_0_000_00, 0x48, 0, 0]), None),  # no content size written
        (bytes([0b10_1_000_00, 1, 2]), None),  # cut before the size's end
        (b"", None),
    ],
)  # fmt: skip
def test_the_zstd_frame_header_is_read_by_the_format(header, expected):
    """Frame headers built by RFC 8878 section 3.1.1.1, the ones numcodecs never
    writes among them; what is no zstd frame has no size."""
    assert hc._zstd_content_size(MAGIC + header) == expected
    assert hc._zstd_content_size(b"\x00" * 4 + header) is None


@pytest.mark.parametrize("reverse", [False, True])
def test_a_shuffle_keeps_the_bytes_that_fill_no_whole_item_at_the_end(reverse):
    """HDF5's shuffle moves whole items only and leaves the rest where it was."""
    data = np.arange(11, dtype=np.uint8)
    out = np.full(11, 255, dtype=np.uint8)
    shuffled = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]  # the first bytes of the items, then the second
    unshuffled = [0, 5, 1, 6, 2, 7, 3, 8, 4, 9]
    got = hc._shuffle(data, 2, reverse=reverse, out=out)
    assert got.tolist() == (unshuffled if reverse else shuffled) + [10]


def test_a_contiguous_dataset_has_no_raw_chunk_reader(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as h5:
        h5["x"] = frames()
        with hc.RawChunks.of(h5["x"]) as raw:
            assert raw is None


def test_the_address_tables_of_the_last_eight_scopes_are_kept(tmp_path):
    path = tmp_path / "f.h5"
    write_frames(path, frames()).close()
    with h5py.File(path, "r") as h5:
        for scope in range(9):
            hc.read_block(h5["x"], 0, 8, scope=f"job {scope}")
    assert [key[0] for key in hc.RawChunks._tables] == [f"job {s}" for s in range(1, 9)]


def test_the_copy_closes_the_file_it_could_not_read_chunks_from(tmp_path, monkeypatch):
    opened = []

    def mismatch(fd, dset, info):
        opened.append(fd)
        return False

    monkeypatch.setattr(hc, "_address_holds_chunk", mismatch)
    write_frames(tmp_path / "f.h5", frames()).close()
    with h5py.File(tmp_path / "f.h5", "r") as h5, h5py.File(tmp_path / "out.h5", "w") as out:
        copy = hc.ChunkCopy(h5["x"], hc.create_empty_like(out, "x", h5["x"]))
        assert copy.fd is None and len(opened) == 1
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(opened[0])
        copy.close()
