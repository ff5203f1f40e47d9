"""The dask graph, the one place it is made: planning, the block tasks, ``map_overlap``.

Knows nothing of file formats: it receives a ``Source`` (something sliceable
plus its storage chunks) and returns a lazy dask array (:func:`rolling_median`,
:func:`background_array`) or a job's block tasks (:func:`block_tasks`), each
with the exact result. There are two graphs, chosen by the source:

- a stored source that pickles small (an HDF5 or Zarr file): one task per
  block that reads its own overlap through a :class:`RollingMedianView`, no
  block depends on another (:func:`_stored_graph`);
- anything else (numpy, dask, a lazy array-like): ``map_overlap``
  (:func:`rolling_median_dask`).

Why the overlap is asymmetric, ``depth={0: (K, K - 1)}``: output row j needs input
rows j .. j+K-1, so every block needs K-1 rows of its successor. The last K rows
of the stack all repeat row N-K-1, and a short last block may not contain the
input of that row, so every block also gets K rows of its predecessor. Dask
silently rechunks when a chunk is shorter than the depth; the planner therefore
makes every event chunk at least K long and ``allow_rechunk=False`` turns any
slip into an error instead of a different graph. A dask input keeps its own
chunks (only runs shorter than K are joined): each block learns where it lies
from dask (``block_info``), so chunks need not be uniform.

Two lengths along the events, never to be confused: a *storage chunk*
(``chunk_events``, the events in one HDF5/Zarr chunk, 40 frames of 80x320
uint8 say) and a *block* (``block_events``, the events one task computes, a
dask chunk along the events; hundreds to thousands). Blocks are whole numbers
of storage chunks, of the input and of the output (``align_events``). The
public keyword ``event_chunk`` forces the block length.

Graph names are tokenized from the input (numpy by content, files by path and
state, see :func:`rollmed_dask.sources.data_token`) and every parameter, as
dask's own are: two different results never share a key, in one
``dask.compute``, composed, or on one ``distributed`` scheduler.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial

import numpy as np

from .core import check_kernel_size, get_window_kernel, select_engine
from .scheduling import whole_rounds

MiB = 2**20
DEFAULT_MEMORY_BUDGET = 256 * MiB
"""Memory one block task may use (its input with overlap, output and scratch)."""

# Peak bytes of one block task per event row, in units of one input row: the
# overlapped input concatenated by dask (1), the contiguous copy a kernel may
# make (1), its output (1) and the tail-filled copy (1).
_ROW_COPIES = 4


def default_min_blocks() -> int:
    """Blocks a short stack is split into at least: two per core, so every core has work."""
    return 2 * (os.cpu_count() or 1)


def parse_bytes(value) -> int:
    """Accept ``268435456``, ``"256MiB"``, ``"1 GB"``; dask's own parser."""
    from dask.utils import parse_bytes as dask_parse_bytes

    try:
        size = int(dask_parse_bytes(value) if isinstance(value, str) else value)
    except (ValueError, TypeError):
        size = -1
    if size <= 0:
        raise ValueError(
            f"memory_budget={value!r} is not a size; pass a number of bytes or a string "
            f"such as '256MiB' or '1GB'"
        )
    return size


def check_budget_holds_a_row(
    budget: int, kernel_size: int, row_bytes: int, n_events: int | None = None
) -> None:
    """Refuse a memory budget too small for one event of a block with its overlap.

    A block of L events holds ``L + 2K`` rows (see the module docstring), but
    never more than the stack's N: with ``K`` near N the one block is the whole
    stack. Each row is held ``_ROW_COPIES`` times; below ``L = 1`` the budget
    decides nothing and every block would silently be planned at its
    shortest, far over the budget. (Measured, numba engine, 80 x 320 uint8,
    N = 20000 in one block of 512 MB: peak RSS 1.22 GB at K = 19999, 1.47 GB
    at K = 10000, 1.59 GB at K = 5000, so 2 to 3 copies on top of the
    interpreter; 4 leaves room for the scipy engine's.)

    >>> check_budget_holds_a_row(64 * MiB, 100, 25600)
    >>> check_budget_holds_a_row(10, 100, 25600)
    Traceback (most recent call last):
    ...
    ValueError: a memory budget of 10 bytes cannot hold one event of a block with its \
overlap: with K=100 that is 1 + 2K = 201 events of 25600 bytes, 4 copies each (20582400 \
bytes); give a memory budget of at least 20MiB, or a smaller K
    >>> check_budget_holds_a_row(10, 19999, 25600, n_events=20000)
    Traceback (most recent call last):
    ...
    ValueError: a memory budget of 10 bytes cannot hold one event of a block with its \
overlap: with K=19999 that is the whole stack, N = 20000 events of 25600 bytes, 4 copies \
each (2048000000 bytes); give a memory budget of at least 1954MiB, or a smaller K
    """
    rows = 1 + 2 * kernel_size
    what = f"1 + 2K = {rows}"
    if n_events is not None and n_events < rows:
        rows, what = n_events, f"the whole stack, N = {n_events}"
    minimum = _ROW_COPIES * row_bytes * rows
    if budget < minimum:
        raise ValueError(
            f"a memory budget of {budget} bytes cannot hold one event of a block with its "
            f"overlap: with K={kernel_size} that is {what} events of "
            f"{row_bytes} bytes, {_ROW_COPIES} copies each ({minimum} bytes); give a memory "
            f"budget of at least {math.ceil(minimum / MiB)}MiB, or a smaller K"
        )


def plan_pixel_tiles(image_shape: tuple, storage_chunks: tuple | None) -> tuple[int, int]:
    """Tile height and width: the storage tile, or the full frame.

    A tile that cuts across a compressed storage chunk makes every tile
    decompress the whole chunk again (17x slower reading, measured), so tiles
    follow the file's own chunking.
    """
    height, width = image_shape
    if storage_chunks is None:
        return height, width
    return min(storage_chunks[1], height), min(storage_chunks[2], width)


def plan_event_chunks(
    n_events: int,
    kernel_size: int,
    row_bytes: int,
    *,
    unit: int = 1,
    memory_budget=DEFAULT_MEMORY_BUDGET,
    event_chunk: int | None = None,
    min_blocks: int = 1,
) -> tuple[int, ...]:
    """Block lengths along the events: uniform, a multiple of ``unit``, at least K each.

    Parameters
    ----------
    n_events : int
        N, the length of the stack.
    kernel_size : int
        K; no block may be shorter (see the module docstring).
    row_bytes : int
        Bytes of one event in one pixel tile.
    unit : int
        Blocks are whole multiples of this (the storage chunk of the input and
        of the output), so that no stored chunk is read or written by two tasks.
    memory_budget : int or str
        Memory one task may use; decides the block length.
    event_chunk : int, optional
        Force this block length (rounded up to a multiple of ``unit``).
    min_blocks : int
        Split a short stack into at least this many blocks so that every core
        has work, but never into blocks shorter than 4K, where reading the
        overlap would cost more than it gains (the last block, the rest, may be
        as short as K). Above 1, blocks may also be shortened a little so that
        the cores finish together (``whole_rounds``).

    Returns
    -------
    tuple of int
        ``(L, L, ..., L, last)`` with ``K <= last <= L + K``.

    Examples
    --------
    >>> plan_event_chunks(1000, 10, 25600, unit=40, memory_budget="16MiB")
    (120, 120, 120, 120, 120, 120, 120, 120, 40)
    """
    budget = parse_bytes(memory_budget)
    if event_chunk is None:
        length = budget // (_ROW_COPIES * max(row_bytes, 1)) - 2 * kernel_size
        if min_blocks > 1:
            length = min(length, max(math.ceil(n_events / min_blocks), 4 * kernel_size))
    else:
        if event_chunk < kernel_size:
            raise ValueError(
                f"event_chunk={event_chunk} is shorter than kernel_size={kernel_size}; "
                f"a block must hold at least one window: pass event_chunk >= {kernel_size}"
            )
        length = unit * math.ceil(event_chunk / unit)
    # whole units, within the budget (a forced length rounds up), never shorter than K
    length = max(unit * (length // unit), unit * math.ceil(kernel_size / unit))
    if event_chunk is None and min_blocks > 1:  # no core idling through a last, lone block
        length = whole_rounds(n_events, length, unit, kernel_size, min(length, 4 * kernel_size))
    if length >= n_events:
        return (n_events,)
    count, rest = divmod(n_events, length)
    blocks = [length] * count
    if rest >= kernel_size:
        blocks.append(rest)
    elif rest:
        blocks[-1] += rest  # a last block shorter than K would be rechunked by dask
    return tuple(blocks)


def plan_chunks(
    shape: tuple,
    dtype,
    kernel_size: int,
    storage_chunks: tuple | None = None,
    *,
    align_events: int = 1,
    memory_budget=DEFAULT_MEMORY_BUDGET,
    event_chunk: int | None = None,
    min_blocks: int = 1,
) -> tuple[tuple[int, ...], ...]:
    """The dask chunks for a stack: blocks by budget, pixel tiles by storage.

    ``align_events`` is the storage chunk length of the output (its
    ``chunk_events``); blocks are multiples of it and of the input's storage
    chunk. ``event_chunk`` forces the block length.
    """
    n_events, height, width = shape
    tile_h, tile_w = plan_pixel_tiles((height, width), storage_chunks)
    unit = math.lcm(storage_chunks[0] if storage_chunks else 1, max(align_events, 1))
    row_bytes = tile_h * tile_w * np.dtype(dtype).itemsize
    if event_chunk is None:
        check_budget_holds_a_row(parse_bytes(memory_budget), kernel_size, row_bytes, n_events)
    block_lengths = plan_event_chunks(
        n_events,
        kernel_size,
        row_bytes,
        unit=unit,
        memory_budget=memory_budget,
        event_chunk=event_chunk,
        min_blocks=min_blocks,
    )
    return block_lengths, _split(height, tile_h), _split(width, tile_w)


def _split(size: int, step: int) -> tuple[int, ...]:
    return tuple(min(step, size - start) for start in range(0, size, step))


def as_dask_array(source, chunks):
    """The source as a dask array with the given chunks, named by what it holds."""
    import dask.array as da
    from dask.base import tokenize

    from .sources import data_token

    array = source.array
    if isinstance(array, da.Array):
        return array.rechunk(chunks)
    return da.from_array(
        array,
        chunks=chunks,
        name="rollmed-input-" + tokenize(data_token(array), chunks),
        lock=False,
        asarray=True,
        fancy=False,
        meta=np.empty((0, 0, 0), dtype=source.dtype),
    )


def merge_short_chunks(chunks, kernel_size: int, length: int) -> tuple[int, ...]:
    """Event chunks of a dask input: kept where at least K long, short ones joined.

    A run of chunks shorter than K (dask would rechunk them silently under an
    overlap of depth K) is joined into blocks of ``length`` events or more, or
    into its long neighbour if it stays shorter than K; chunks of K or more
    stay as they are, so the input is not copied into a chunking of our own.

    Examples
    --------
    >>> merge_short_chunks((30, 4, 4, 30, 4), 10, 100)
    (30, 42)
    >>> merge_short_chunks((5, 5, 5, 40, 40), 10, 12)
    (15, 40, 40)
    >>> merge_short_chunks((40, 40, 40), 10, 100)
    (40, 40, 40)
    """
    out, group = [], 0
    for chunk in chunks:
        if chunk >= kernel_size and (group == 0 or group >= kernel_size):
            out.extend([group, chunk] if group else [chunk])
            group = 0
            continue
        group += chunk
        if group >= length:
            out.append(group)
            group = 0
    if group >= kernel_size or (group and not out):
        out.append(group)
    elif group:
        out[-1] += group
    return tuple(out)


def background_rows(read, start: int, stop: int, n_events: int, kernel_size: int, engine: str):
    """Background rows [start, stop), given ``read(a, b)`` -> input rows [a, b).

    Rows j >= N-K repeat row N-K-1; a range lying wholly in that tail needs
    only the one window N-K-1. Input row N-1 is never read.
    """
    return _background_rows(read, start, stop, n_events, kernel_size, engine)[0]


def _background_rows(read, start, stop, n_events, kernel_size, engine, digest_events=0):
    """``background_rows``, and with ``digest_events`` the digests of the rows
    read (:func:`rollmed_dask.identity.block_digests`), else None.

    The digests need every row of ``[start, stop)``; only the last block lacks
    one (input row N-1, which no window reads), so it reads that row more.
    """
    k = kernel_size
    first_tail = n_events - k
    j0 = min(start, first_tail - 1)
    j1 = min(stop, first_tail)
    end = j1 - 1 + k
    block = read(j0, max(end, stop) if digest_events else end)  # first: overlaps a kernel load
    digests = None
    if digest_events:
        from .identity import block_digests

        digests = block_digests(block, j0, start, stop, digest_events)
        block = block[: end - j0]
    medians = get_window_kernel(engine)(block, k)
    if stop <= first_tail:
        return medians, digests
    out = np.empty((stop - start,) + medians.shape[1:], dtype=medians.dtype)
    computed = max(0, first_tail - start)
    out[:computed] = medians[:computed]
    out[computed:] = medians[-1]
    return out, digests


def _median_block(block, *, kernel_size, n_events, engine, block_info):
    """Output rows of one ``map_overlap`` block from its overlapped input ``block``.

    Dask says where the block lies (its chunks need not be uniform). The input
    starts K rows before the block (none for the first block) and ends K-1 rows
    after it (none for the last).
    """
    start, stop = block_info[None]["array-location"][0]
    base = start - kernel_size if start > 0 else 0
    return background_rows(
        lambda a, b: block[a - base : b - base], start, stop, n_events, kernel_size, engine
    )


class RollingMedianView:
    """The background of a stored stack as a read-only array, computed on demand.

    ``view[s:e]`` reads input rows ``s .. e+K-2`` itself (plus window N-K-1 in
    the tail) and returns the exact background rows ``s .. e-1``. In
    :func:`_stored_graph`, every block is one task that slices the view and so
    reads its own overlap: no block depends on another, so a worker process
    receives a file path and returns only its result. With ``map_overlap``, each input block
    would instead travel to its neighbours: through the main process on dask's
    processes scheduler (7x slower and 3.5 GB at N=20000, measured), and between
    workers on a cluster.

    Only for sources that pickle small (HDF5 readers, Zarr arrays): an
    in-memory array would be pickled whole into every task.
    """

    def __init__(self, source_array, kernel_size: int, engine: str):
        self.source = source_array
        self.kernel_size = kernel_size
        self.engine = engine
        self.shape = tuple(source_array.shape)
        self.dtype = np.dtype(source_array.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        events, tile = key[0], key[1:]
        if isinstance(events, int | np.integer):
            return self[(slice(events, events + 1),) + tile][0]
        start, stop, step = events.indices(self.shape[0])
        if stop <= start:
            return np.empty((0,) + self.shape[1:], dtype=self.dtype)[(slice(None),) + tile]

        def read(a, b):
            return np.asarray(self.source[(slice(a, b),) + tile])

        rows = background_rows(read, start, stop, self.shape[0], self.kernel_size, self.engine)
        return rows[::step]

    def rows_and_digests(self, start: int, stop: int, digest_events: int):
        """Background rows ``[start, stop)`` of whole frames, and the digests of
        the input rows read for them (:func:`rollmed_dask.identity.block_digests`)."""

        def read(a, b):
            return np.asarray(self.source[a:b])

        return _background_rows(
            read, start, stop, self.shape[0], self.kernel_size, self.engine, digest_events
        )


def rolling_median_dask(x, kernel_size: int, engine: str = "auto"):
    """Exact rolling median of a dask array whose blocks (chunks along events) are at least K long.

    Any chunking dask allows, uniform or not; ``map_overlap`` with
    ``allow_rechunk=False`` refuses a chunk shorter than K rather than
    rechunking it behind our back. The graph's names are tokenized from the
    input and the parameters, as dask's own are.
    """
    import dask.array as da

    n_events = x.shape[0]
    k = check_kernel_size(kernel_size, n_events)
    engine = select_engine(engine, x.dtype)
    block_lengths = x.chunks[0]
    if len(block_lengths) > 1 and min(block_lengths) < k:
        raise ValueError(
            f"event chunks {block_lengths[:3]}... must each be at least "
            f"kernel_size={k} long; let plan_chunks choose them"
        )
    func = partial(_median_block, kernel_size=k, n_events=n_events, engine=engine)
    depth = {0: (k, k - 1), 1: 0, 2: 0} if len(block_lengths) > 1 else {0: 0, 1: 0, 2: 0}
    return da.map_overlap(
        func,
        x,
        depth=depth,
        boundary="none",
        trim=False,
        allow_rechunk=False,
        chunks=x.chunks,
        dtype=x.dtype,
        meta=np.empty((0, 0, 0), dtype=x.dtype),
        token="rolling_median",
    )


def _dask_input_chunks(source, kernel_size, memory_budget, min_blocks):
    """A dask input's own chunks, with blocks shorter than K joined."""
    x = source.array
    unit = source.storage_chunks[0] if source.storage_chunks else 1
    row_bytes = max(x.chunks[1]) * max(x.chunks[2]) * x.dtype.itemsize
    length = plan_event_chunks(
        x.shape[0],
        kernel_size,
        row_bytes,
        unit=unit,
        memory_budget=memory_budget,
        min_blocks=min_blocks,
    )[0]
    return (merge_short_chunks(x.chunks[0], kernel_size, length),) + x.chunks[1:]


def _is_dask_array(array) -> bool:
    # by module, not isinstance: asking must not import dask.array (file jobs never do)
    return type(array).__module__.startswith("dask.array")


def plan_source_chunks(
    source,
    kernel_size: int,
    *,
    memory_budget=DEFAULT_MEMORY_BUDGET,
    event_chunk: int | None = None,
    align_events: int = 1,
    whole_frames: bool = False,
) -> tuple[tuple[int, ...], ...]:
    """The chunks of a source's background: a dask input's own, else :func:`plan_chunks`.

    A dask input keeps its chunks (runs shorter than K joined) unless
    ``event_chunk`` or ``align_events`` ask for others. ``whole_frames``
    plans blocks of whole frames (the block tasks of a stored source each
    read and finish whole frames), otherwise pixel tiles follow the storage.
    """
    if _is_dask_array(source.array) and event_chunk is None and align_events == 1:
        return _dask_input_chunks(source, kernel_size, memory_budget, default_min_blocks())
    storage = source.storage_chunks
    if whole_frames and storage is not None:
        storage = (storage[0],) + tuple(source.shape[1:])
    return plan_chunks(
        source.shape,
        source.dtype,
        kernel_size,
        storage,
        align_events=align_events,
        memory_budget=memory_budget,
        event_chunk=event_chunk,
        min_blocks=default_min_blocks(),
    )


def _stored_graph(source, kernel_size: int, engine: str, chunks, finish=None, digest_events=0):
    """The graph of a stored source's background: one task per chunk, no neighbours.

    Every task reads its own overlap through one :class:`RollingMedianView`
    (one key of the graph, which all tasks refer to: it holds the reader) and
    computes its rows; with ``finish``, it returns ``finish(rows, start)``
    instead, and with ``digest_events`` also the digests of the input rows it
    read: ``(finish(rows, start), digests)``. A plain ``HighLevelGraph`` of
    one layer, keyed as dask arrays are (``(name, i, j, l)``):
    :func:`background_array` wraps it as an array and :func:`block_tasks` as
    Delayed, without importing ``dask.array`` (0.2
    to 0.5 s of every CLI run, measured) and with no rechunk or fusion pass.

    Returns
    -------
    name : str
        The layer name, tokenized from the input's data and state (a file
        rewritten on disk must not share keys with its old contents), K, the
        engine, the chunks and ``finish`` (two jobs on one input, say HDF5 and
        Zarr output, on one distributed client must not share keys).
    graph : dask.highlevelgraph.HighLevelGraph
    """
    from itertools import product

    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    from .sources import data_token

    token = tokenize(data_token(source.array), kernel_size, engine, chunks, finish, digest_events)
    name = f"rolling_median-{token}"
    view_key = f"rolling_median-view-{token}"
    layer = {view_key: RollingMedianView(source.array, kernel_size, engine)}
    bounds = [_bounds(axis) for axis in chunks]
    for index in product(*(range(len(axis)) for axis in chunks)):
        region = tuple(slice(*bounds[axis][i]) for axis, i in enumerate(index))
        if digest_events:
            layer[(name, *index)] = (_digested_chunk, view_key, region, finish, digest_events)
        else:
            layer[(name, *index)] = (_stored_chunk, view_key, region, finish)
    return name, HighLevelGraph({name: MaterializedLayer(layer)}, {name: set()})


def _bounds(chunks) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of consecutive chunk lengths."""
    out, start = [], 0
    for length in chunks:
        out.append((start, start + length))
        start += length
    return out


def _stored_chunk(view, region: tuple, finish):
    rows = view[region]
    return rows if finish is None else finish(rows, region[0].start)


def _digested_chunk(view, region: tuple, finish, digest_events: int):
    start, stop = region[0].start, region[0].stop
    rows, digests = view.rows_and_digests(start, stop, digest_events)
    return finish(rows, start, digests), digests


def background_array(source, kernel_size: int, engine: str, chunks):
    """The lazy background of a validated source, in the given chunks.

    A stored source that pickles small gets one task per chunk that reads its
    own overlap (:func:`_stored_graph`); anything else, in memory or a dask
    array, goes through ``map_overlap`` (:func:`rolling_median_dask`).
    """
    import dask.array as da

    if source.pickles_small:
        name, graph = _stored_graph(source, kernel_size, engine, chunks)
        meta = np.empty((0, 0, 0), dtype=source.dtype)
        return da.Array(graph, name, chunks, meta=meta)
    return rolling_median_dask(as_dask_array(source, chunks), kernel_size, engine)


@dataclass(frozen=True)
class BlockTask:
    """One block of a job: background rows ``[start, stop)`` of whole frames.

    ``task`` is a dask Delayed that computes to ``finish(rows, start)``.
    """

    start: int
    stop: int
    task: object


def plan_block_tasks(source, kernel_size: int, **planning) -> tuple[tuple[int, ...], ...]:
    """The chunks :func:`block_tasks` takes: a stored source's blocks are whole frames.

    Planned before the tasks because the sink that gives ``finish`` records
    the block length. ``planning``: ``memory_budget``, ``event_chunk`` and
    ``align_events``, as for :func:`plan_source_chunks`.
    """
    return plan_source_chunks(source, kernel_size, whole_frames=source.pickles_small, **planning)


def block_tasks(
    source, kernel_size: int, engine: str, chunks, finish, digest_events: int = 0
) -> list[BlockTask]:
    """The block tasks of a source's background: the one way a job's graph is made.

    Each task computes the background rows of one block of whole frames and
    returns ``finish(rows, start)``, so only what ``finish`` makes of them (a
    sink's compressed chunks, say) leaves the worker, never the raw block.

    Parameters
    ----------
    source : rollmed_dask.sources.Source
        The validated input.
    kernel_size : int
        K, validated (:func:`rollmed_dask.core.check_kernel_size`).
    engine : str
        A resolved engine (:func:`rollmed_dask.core.select_engine`).
    chunks : tuple of tuple of int
        From :func:`plan_block_tasks`.
    finish : callable
        ``finish(rows, start)``, run in the task; it joins the graph's tokens.
    digest_events : int
        With a stored source that pickles small, each task calls
        ``finish(rows, start, digests)`` and returns ``(its result,
        digests)``: the digests of the input rows it read, in chunks of
        ``digest_events`` rows (:func:`rollmed_dask.identity.block_digests`),
        which cost no second read. Other sources return ``(finish(rows,
        start), None)``.

    Returns
    -------
    list of BlockTask
        In event order. A stored source that pickles small gets one task per
        block that reads its own overlap (:func:`_stored_graph`); anything
        else gets ``map_overlap``, the blocks made whole frames and ``finish``
        fused into each, with the block's place given by dask.
    """
    if source.pickles_small:
        from dask.delayed import Delayed

        if len(chunks[1]) != 1 or len(chunks[2]) != 1:
            raise ValueError(
                f"block_tasks takes blocks of whole frames, not pixel tiles {chunks[1:]}; "
                f"plan them with plan_block_tasks"
            )
        name, graph = _stored_graph(source, kernel_size, engine, chunks, finish, digest_events)
        return [
            BlockTask(start, stop, Delayed((name, i, 0, 0), graph, layer=name))
            for i, (start, stop) in enumerate(_bounds(chunks[0]))
        ]
    _, height, width = source.shape
    bg = background_array(source, kernel_size, engine, chunks).rechunk({1: height, 2: width})
    payloads = bg.map_blocks(
        _finish_block,
        finish=finish,
        with_digests=bool(digest_events),
        dtype=object,
        meta=np.empty((0, 0, 0), dtype=object),
        token="prepared",  # tokenized with bg and finish: two jobs never share keys
    )
    # optimize_graph: reading, the median and finish fuse into one task per block
    blocks = payloads.to_delayed(optimize_graph=True).ravel()
    return [
        BlockTask(start, stop, task)
        for task, (start, stop) in zip(blocks, _bounds(bg.chunks[0]), strict=True)
    ]


def _finish_block(block, *, finish, with_digests=False, block_info=None):
    # dask says where the block lies: chunks need not be uniform
    start = block_info[None]["array-location"][0][0]
    return (finish(block, start), None) if with_digests else finish(block, start)


def rolling_median(
    images,
    kernel_size: int = 100,
    *,
    engine: str = "auto",
    dataset: str = "events/image",
    memory_budget=DEFAULT_MEMORY_BUDGET,
    event_chunk: int | None = None,
    align_events: int = 1,
):
    """Lazy, exact rolling-median background of an image stack.

    ``bg[j] = sorted(img[j:j+K])[K//2]`` per pixel for ``j < N-K``; the last K
    events repeat ``bg[N-K-1]``. Bit-identical to dcnum's ``BackgroundRollMed``
    for uint8 and even K, defined for every K with ``1 <= K < N`` and every
    integer or float dtype (the output keeps the input dtype).

    Parameters
    ----------
    images : path, h5py/zarr dataset, numpy or dask array, or a lazy array-like
        The stack, shape (N, H, W). A path opens an HDF5 (``.rtdc``) file or a
        Zarr store; ``dataset`` names the images in it. A dask array keeps its
        chunks (runs of event chunks shorter than K are joined); anything else
        with ``shape``, ``dtype`` and ``__getitem__`` (xarray, ...) is read
        block by block, never loaded whole.
    kernel_size : int
        K, the number of events in each window.
    engine : {"auto", "compiled", "scipy", "numpy"}
        The per-block kernel; all give the same bits, NaNs included. "auto"
        picks the compiled kernels, or numpy for longdouble ("numba", their old
        name, selects them too). "scipy" refuses 64-bit integers
        and longdouble, which it cannot select exactly.
    dataset : str
        Dataset inside a file or group.
    memory_budget : int or str
        Memory one task may use, e.g. ``"256MiB"``; decides the block length.
    event_chunk : int, optional
        Force the block length: the events one task computes (at least K,
        rounded up to whole storage chunks); rechunks a dask input.
    align_events : int
        Make blocks multiples of this (the output's storage chunk length);
        rechunks a dask input if more than 1.

    Returns
    -------
    dask.array.Array
        Lazy; same shape, dtype and pixel tiling as the input.

    Raises
    ------
    ValueError
        For a bad ``kernel_size``, an empty stack, ndim != 3 or an unsupported dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from rollmed_dask import rolling_median
    >>> img = np.random.default_rng(0).integers(0, 255, (500, 8, 8), dtype=np.uint8)
    >>> bg = rolling_median(img, kernel_size=20)
    >>> bg.shape, bg.dtype
    ((500, 8, 8), dtype('uint8'))
    >>> from rollmed_dask.core import rolling_median_reference
    >>> bool((bg.compute() == rolling_median_reference(img, 20)).all())
    True
    """
    from .sources import as_source

    source = as_source(images, dataset)
    k = check_kernel_size(kernel_size, source.shape[0])
    engine = select_engine(engine, source.dtype)
    chunks = plan_source_chunks(
        source,
        k,
        memory_budget=memory_budget,
        event_chunk=event_chunk,
        align_events=align_events,
    )
    return background_array(source, k, engine, chunks)
