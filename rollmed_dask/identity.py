"""What an output was made from: an identity of the input's image data.

A background is only current for the frames it was computed from, so every
output records an identity of those frames, and every check that trusts an
existing output (a folder rerun, ``--resume``) compares it, never names or
times alone.

The identity (``digest``) is an ``xxh3_128`` digest over the ordered digests
of the input's rows in chunks of ``chunk_events`` events (the output's own
chunk length; blocks start on its multiples, so the chunk digests do not
depend on the block length), plus the dtype and the shape. Why so:

- The chunk digests are computed inside the block tasks, where the decoded
  rows are already in memory (:func:`block_digests`), and travel back with
  the block's result: no second read of the input. ``xxh3_128`` hashes
  5-6 GB/s on one core here, 0.18 ns per byte (``hashlib.blake2b``: 0.15
  GB/s, 36x slower, measured on a 1 MiB chunk); the block's median costs
  several ns per pixel-event.
- The digest is of the rows as the job sees them (decoded, basin mappings
  applied), so it holds for any storage: a copy recompressed, or a mapped
  basin, is the same data.
- Recomputing it (:func:`compute_identity`, the slow path) is one read and
  decode of the input on threads, far cheaper than the median.

Beside the digest, the record keeps the ``stat`` of the files the data come
from (:func:`files_state`): ``st_dev``, ``st_ino``, ``st_size``,
``st_mtime_ns``, ``st_ctime_ns``. A user can set ``mtime`` back, not
``ctime``, so an unchanged stat means unchanged data: that is the fast path
(microseconds). It is recorded only when it can be trusted: unchanged over
the whole job, and with the last change of every file older than the job's
start by :data:`QUIET_NS` (file times are coarse, a few ms on Linux, so a
change in the same tick as the recorded one could keep every field). Any
other stat (the folder moved or copied, the file touched) falls back to the
slow path, which compares the data themselves.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

PREFIX = "xxh3-128:"
#: The key of the record in an output's run log parameters (and in the job
#: parameters a Zarr store keeps in its root attributes).
ATTR = "input_identity"
#: A recorded stat is trusted only if every file was last changed this long
#: before the job started: far above the coarseness of file times (ms).
QUIET_NS = 1_000_000_000
# Rows hashed per read in the slow path: a few MiB, so threads overlap.
_READ_BYTES = 32 * 2**20


def _raw(rows):
    """The bytes of C-contiguous ``rows``, without a copy (empty ones too)."""
    return rows.reshape(-1).view(np.uint8)


def chunk_digests(rows, chunk_events: int) -> list[bytes]:
    """``xxh3_128`` digests of ``rows`` in consecutive runs of ``chunk_events`` rows.

    ``rows`` starts on a chunk boundary; the last run may be shorter.

    >>> rows = np.arange(10, dtype=np.uint8).reshape(5, 2)
    >>> [d.hex()[:8] for d in chunk_digests(rows, 2)] == [
    ...     d.hex()[:8] for d in chunk_digests(rows[:4], 2) + chunk_digests(rows[4:], 2)]
    True
    """
    import xxhash

    rows = np.ascontiguousarray(rows)
    return [
        xxhash.xxh3_128_digest(_raw(rows[i : i + chunk_events]))
        for i in range(0, len(rows), chunk_events)
    ]


def rows_digest(*parts) -> bytes:
    """One ``xxh3_128`` digest of several row arrays in order (a block's context)."""
    import xxhash

    h = xxhash.xxh3_128()
    for rows in parts:
        h.update(_raw(np.ascontiguousarray(rows)))
    return h.digest()


def block_digests(block, j0: int, start: int, stop: int, chunk_events: int):
    """Digests of one block task's input ``block`` (input rows ``j0 ..``).

    ``(chunks, context)``: the chunk digests of the block's own rows
    ``[start, stop)``, which make the output's identity, and one digest of
    the other rows the block read (its overlap, ``[j0, start)`` and
    ``[stop, j0 + len(block))``), which a resumed partial checks, since the
    block's result depends on them too.
    """
    own = block[start - j0 : stop - j0]
    context = rows_digest(block[: start - j0], block[stop - j0 :])
    return chunk_digests(own, chunk_events), context


def combine(digests, dtype, shape, chunk_events: int) -> str:
    """The identity of a stack from its chunk digests in event order."""
    import xxhash

    h = xxhash.xxh3_128()
    h.update(f"{np.dtype(dtype).str}|{tuple(shape)}|{chunk_events}|".encode())
    for digest in digests:
        h.update(digest)
    return PREFIX + h.hexdigest()


def compute_identity(array, chunk_events: int, threads: int | None = None) -> str:
    """The identity of ``array`` (N, H, W), by reading and hashing it (the slow path).

    Reads of a few MiB run on ``threads`` threads (default: one per core);
    HDF5 inputs decode outside h5py's lock, so the threads read in parallel.
    """
    from concurrent.futures import ThreadPoolExecutor

    shape = tuple(array.shape)
    dtype = np.dtype(array.dtype)
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = chunk_events * max(1, _READ_BYTES // (row_bytes * chunk_events))
    starts = range(0, shape[0], step)

    def digest(start):
        return chunk_digests(np.asarray(array[start : start + step]), chunk_events)

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        parts = list(pool.map(digest, starts))
    return combine([d for part in parts for d in part], dtype, shape, chunk_events)


def source_files(src) -> list[str]:
    """The files an input's images are read from: the input, and a basin holding them."""
    files = []
    for path in (src.path, getattr(src.array, "path", None)):
        if path is not None:
            path = os.path.abspath(path)
            if path not in files:
                files.append(path)
    return files


def _stat(path: str) -> list:
    st = os.stat(path)
    if not os.path.isdir(path):
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    # a Zarr store: its chunks are rewritten in place, the folder's stat stays
    import xxhash

    h, newest = xxhash.xxh3_128(), st.st_ctime_ns
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            s = os.stat(full)
            newest = max(newest, s.st_ctime_ns)
            h.update(f"{os.path.relpath(full, path)}|{s.st_ino}|{s.st_size}|".encode())
            h.update(f"{s.st_mtime_ns}|{s.st_ctime_ns}\n".encode())
    return [st.st_dev, st.st_ino, "tree", h.hexdigest(), newest]


def files_state(paths) -> list | None:
    """``[[path, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns], ...]``, or None
    when a file cannot be stat-ed. A folder (a Zarr store) is one entry over
    every file below it."""
    try:
        return [[path, *_stat(path)] for path in paths]
    except OSError:
        return None


def _newest_change(state) -> int:
    return max(entry[-1] for entry in state)


def trusted_state(before, after, started_ns: int):
    """The stat to record: ``after`` if unchanged since ``before`` and quiet at the start."""
    if before is None or before != after:
        return None
    if started_ns - _newest_change(before) < QUIET_NS:
        return None
    return before


def now_ns() -> int:
    return time.time_ns()


def record(digest: str | None, chunk_events: int, state) -> dict:
    """What an output keeps of its input (:data:`ATTR`), JSON-able."""
    return {"digest": digest, "chunk_events": chunk_events, "files": state}


def read_record(value) -> dict | None:
    """A stored record, or None if there is none (an older output) or it is damaged."""
    if not (isinstance(value, dict) and isinstance(value.get("digest"), str)):
        return None
    if not isinstance(value.get("chunk_events"), int):
        return None
    return value


def unchanged_since(state, input_path) -> bool:
    """The fast path: the files' stat is the recorded one, and ``input_path`` is
    the recorded input (same device and inode, whatever its spelling)."""
    if not state:
        return False
    try:
        st = os.stat(input_path)
    except OSError:
        return False
    if [st.st_dev, st.st_ino] != state[0][1:3]:
        return False
    return files_state([entry[0] for entry in state]) == state


def same_data(stored: dict, input_path, open_array) -> tuple[bool, str]:
    """Whether the input's data are those ``stored`` was made from.

    ``open_array()`` gives the input as the job sees it, for the slow path.
    Returns ``(same, how)``: how it was decided ("stat" or "data"), or why not.
    """
    if unchanged_since(stored.get("files"), input_path):
        return True, "stat"
    digest = compute_identity(open_array(), int(stored["chunk_events"]))
    if digest == stored["digest"]:
        return True, "data"
    return False, f"was made from other data (the input {_changed(stored, input_path)})"


def _changed(stored: dict, input_path) -> str:
    state = stored.get("files")
    if not state:
        return "has other frames now"
    try:
        st = os.stat(input_path)
    except OSError:
        return "cannot be read"
    was = state[0]
    if [st.st_dev, st.st_ino] != was[1:3]:
        return f"is not the file {was[0]!r} it was made from, and holds other frames"
    return f"changed since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(was[5] / 1e9))}"


def paths_same_file(a, b) -> bool:
    """Two spellings of one file (``in.rtdc`` and its absolute path), or equal strings."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError):
        return False


def differing_param(stored: dict, wanted: dict) -> str | None:
    """``"kernel_size=50, this run has 100"`` for the first parameter that
    differs, or None. Input paths are compared as files, not strings, and
    last: the parameters a user chose are the likelier news."""
    for key in sorted(wanted, key=lambda key: key == "input"):
        value = wanted[key]
        was = stored.get(key)
        if key == "input" and paths_same_file(was, value):
            continue
        if json.loads(json.dumps(was)) != json.loads(json.dumps(value)):
            return f"{key}={was!r}, this run has {value!r}"
    return None
