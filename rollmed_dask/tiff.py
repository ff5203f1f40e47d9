"""TIFF inputs: a multi-page (Big)TIFF or OME-TIFF file, or a folder or glob of frames.

Each becomes a ``Source`` whose reader behaves like a read-only array of shape
(events, height, width) and reads only the pages it is asked for, so a block
task reads its own frames and nothing else. Like ``sources.HDF5Reader``, a
reader pickles as a reference (the path and the selection, or the folder and
the frame names) and opens the file lazily in the process that reads: it
works with threads, processes and ``distributed`` workers alike.

Which frames are the events
---------------------------
A file holds series (tifffile's word; OME-TIFF images, ImageJ hyperstacks);
the first is read unless ``series=N`` is given. A series is a grid of 2-D
pages with named axes (OME-TIFF: T, Z, C; a plain multi-page TIFF: one axis).
The events are the one axis longer than 1, or the one named with
``axis=T``; every other axis longer than 1 needs its plane chosen (``C=0``).
A single 2-D image, or colour (RGB) frames, are refused with one line: the
rolling median runs over a stack of grey frames.

The selection travels in the ``dataset`` argument that names the images in an
HDF5 file: ``dataset="series=1,axis=T,C=0"`` (CLI ``--dataset``, or
``--series``/``--axis``). The default ``events/image`` means "no selection".

tifffile (and imagecodecs, for compressed pages) is imported only here, and
only when a TIFF is read: ``pip install rollmed-dask[tiff]``.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import pathlib
import re
import threading

import numpy as np

from .sources import file_state, shared_handle

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
# the first four bytes of a classic TIFF and of a BigTIFF, in both byte orders
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
DEFAULT_DATASET = "events/image"  # what the HDF5 path calls "no selection here"


def _tifffile():
    try:
        import tifffile
    except ImportError:
        raise ImportError(
            "reading TIFF needs tifffile: pip install 'rollmed-dask[tiff]'"
        ) from None
    return tifffile


def is_tiff_file(path: pathlib.Path) -> bool:
    """True when ``path`` is a file that starts like a TIFF or BigTIFF."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in TIFF_MAGIC
    except OSError:
        return False


def is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def _is_zarr_folder(path: pathlib.Path) -> bool:
    return any((path / name).exists() for name in ("zarr.json", ".zarray", ".zgroup"))


def frame_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The TIFF files directly in ``folder`` (not hidden), in no particular order."""
    return [
        p
        for p in folder.iterdir()
        if p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith(".") and p.is_file()
    ]


def is_frame_folder(path: pathlib.Path) -> bool:
    """A folder (not a Zarr store) that holds TIFF files directly."""
    path = pathlib.Path(path)
    return path.is_dir() and not _is_zarr_folder(path) and bool(frame_files(path))


def claims(path) -> bool:
    """Whether ``path`` is a TIFF input: a TIFF file, a folder of frames or a glob.

    Cheap, and without importing tifffile: ``sources.open_path`` asks it first.
    """
    text = os.fspath(path)
    path = pathlib.Path(text)
    if path.is_file():
        return is_tiff_file(path)
    if path.is_dir():
        return is_frame_folder(path)
    # a glob of TIFF files, or one that matches files ("data[1].rtdc" that is
    # not there stays a missing file)
    return is_glob(text) and (path.suffix.lower() in TIFF_SUFFIXES or bool(glob.glob(text)))


def natural_key(name: str) -> list:
    """Sort key that orders numbers by value: frame_2 before frame_10.

    Examples
    --------
    >>> sorted(["f_10.tif", "f_2.tif", "f_1.tif"], key=natural_key)
    ['f_1.tif', 'f_2.tif', 'f_10.tif']
    """
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def parse_selection(dataset: str | None) -> dict:
    """``"series=1,axis=T,C=0"`` -> ``{"series": 1, "axis": "T", "C": 0}``.

    Examples
    --------
    >>> parse_selection("series=1, axis=t, c=0")
    {'series': 1, 'axis': 'T', 'C': 0}
    >>> parse_selection("events/image")
    {}
    """
    if dataset in (None, "", DEFAULT_DATASET):
        return {}
    selection = {}
    for part in dataset.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not key or not value:
            raise ValueError(
                f"the TIFF selection {dataset!r} is not understood; give it as "
                f"series=N,axis=NAME and a plane for each other axis, such as "
                f"'series=0,axis=T,C=1'"
            )
        if key.lower() == "axis":
            selection["axis"] = value.upper()
            continue
        try:
            number = int(value)
        except ValueError:
            raise ValueError(
                f"{part.strip()!r} in the TIFF selection {dataset!r} needs a whole number"
            ) from None
        selection["series" if key.lower() == "series" else key.upper()] = number
    return selection


# ---------------------------------------------------------------------------
# one multi-page file
# ---------------------------------------------------------------------------

_quiet_lock = threading.Lock()
_quiet_depth = [0, logging.NOTSET]  # callers inside, the level to restore


@contextlib.contextmanager
def _quiet():
    """tifffile's log warnings held back while a file is opened and described:
    a damaged file gets one clear error from us, not log lines besides. Counted,
    so that threads inside at once restore the level only when the last leaves."""
    log = logging.getLogger("tifffile")
    with _quiet_lock:
        if _quiet_depth[0] == 0:
            _quiet_depth[1] = log.level
            log.setLevel(logging.CRITICAL)
        _quiet_depth[0] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth[0] -= 1
            if _quiet_depth[0] == 0:
                log.setLevel(_quiet_depth[1])


@contextlib.contextmanager
def _open_tiff(path: str):
    """(TiffFile, lock) for the duration of a ``with`` block, shared by concurrent reads.

    tifffile's page lookup moves the file position and a keyframe, so lookups
    hold ``lock``; page reads take the same lock (the handle's) only for the
    seek and read, and decode outside it, so threads decompress in parallel.
    """
    with shared_handle(path, _open_tiff_file) as tif:
        yield tif, tif.filehandle.lock


def _open_tiff_file(path: str):
    with _quiet():
        tif = _tifffile().TiffFile(path)
    tif.filehandle.set_lock(True)  # the lock the page lookups and reads share
    return tif


def _damaged(path, where: str, exc: BaseException) -> ValueError:
    return ValueError(
        f"cannot read {where} of {str(path)!r} ({type(exc).__name__}: {exc}); the file is "
        f"damaged or truncated: copy it again from the original"
    )


class TiffStackReader:
    """A picklable, lazily opened view of the frames of one TIFF series.

    ``reader[a:b]`` reads the pages of events a..b-1 only, one at a time
    (:func:`_read_page`, which the tests count).
    """

    def __init__(self, path, series: int = 0, axis: str | None = None, planes=None):
        self.path = os.fspath(pathlib.Path(path).resolve())
        self.series = int(series)
        self.planes = dict(planes or {})
        try:
            with _quiet(), _open_tiff(self.path) as (tif, lock), lock:
                self._describe(tif, axis)
        except (ValueError, KeyError, ImportError):
            raise
        except Exception as exc:  # tifffile raises many kinds for a bad file
            raise _damaged(self.path, "the header", exc) from None
        self.ndim = 3
        self.chunks = (1,) + self.shape[1:]  # one page per frame

    def _describe(self, tif, axis) -> None:
        n_series = len(tif.series)
        if not 0 <= self.series < n_series:
            raise ValueError(
                f"{self.path!r} has {n_series} series (0 to {n_series - 1}), not "
                f"series={self.series}; pass series=N with N in that range"
            )
        series = tif.series[self.series]
        axes, shape = series.axes, tuple(series.shape)
        where = f"series {self.series} of {self.path!r} (axes {axes}, shape {shape})"
        if "S" in axes or series.keyframe.shape != shape[-2:] or axes[-2:] != "YX":
            raise ValueError(
                f"{where} holds colour or multi-sample frames; the rolling median needs "
                f"grey frames: save one channel per file (e.g. in Fiji, Image > Color > "
                f"Split Channels) and pass that"
            )
        page_axes, page_shape = axes[:-2], shape[:-2]
        if math.prod(page_shape) != len(series):
            raise ValueError(
                f"{where} should hold {math.prod(page_shape)} pages but {len(series)} are "
                f"there: the file is truncated or damaged; copy it again from the original"
            )
        sizes = dict(zip(page_axes, page_shape, strict=True))
        if axis is None:
            longer = [a for a in page_axes if sizes[a] > 1]
            if not longer:
                raise ValueError(
                    f"{where} is a single 2-D image; the rolling median needs a stack of "
                    f"frames: pass a multi-page TIFF, or a folder of frames"
                )
            if len(longer) > 1:
                raise ValueError(
                    f"{where} has {len(longer)} axes longer than 1 ({', '.join(longer)}); "
                    f"say which one holds the events, such as axis={longer[0]} "
                    f"(--axis {longer[0]}), and choose a plane of the others, such as "
                    f"{','.join(f'{a}=0' for a in longer[1:])}"
                )
            axis = longer[0]
        if axis not in sizes:
            raise ValueError(
                f"{where} has no axis {axis!r}; the events axis is one of "
                f"{', '.join(page_axes) or 'none'}"
            )
        for name, index in self.planes.items():
            if name not in sizes or name == axis:
                raise ValueError(
                    f"{where}: {name}={index} names no other axis; choose planes of "
                    f"{', '.join(a for a in page_axes if a != axis) or 'no other axis'}"
                )
            if not 0 <= index < sizes[name]:
                raise ValueError(f"{where}: {name}={index} is out of range 0..{sizes[name] - 1}")
        missing = [a for a in page_axes if a != axis and sizes[a] > 1 and a not in self.planes]
        if missing:
            raise ValueError(
                f"{where}: events along {axis}, but {', '.join(missing)} also "
                f"{'has' if len(missing) == 1 else 'have'} more than one plane; choose one, "
                f"such as {','.join(f'{a}=0' for a in missing)} (--dataset "
                f"'axis={axis},{','.join(f'{a}=0' for a in missing)}')"
            )
        self.axis = axis
        # the page of event e: the grid index with e on the events axis
        self._page_shape = page_shape
        self._axis_pos = page_axes.index(axis)
        self._fixed = [self.planes.get(a, 0) for a in page_axes]
        self.shape = (sizes[axis],) + shape[-2:]
        self.dtype = np.dtype(series.dtype)

    def page_index(self, event: int) -> int:
        index = list(self._fixed)
        index[self._axis_pos] = event
        return int(np.ravel_multi_index(index, self._page_shape))

    def _read(self, events: range) -> np.ndarray:
        out = np.empty((len(events),) + self.shape[1:], dtype=self.dtype)
        with _open_tiff(self.path) as (tif, lock):
            series = tif.series[self.series]
            for row, event in enumerate(events):
                number = self.page_index(event)
                try:
                    out[row] = _read_page(series, number, lock)
                except Exception as exc:
                    raise _damaged(self.path, f"page {number} (event {event})", exc) from None
        return out

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        events, tile = key[0], key[1:]
        if isinstance(events, int | np.integer):
            return self[(slice(int(events), int(events) + 1),) + tile][0]
        return self._read(range(*events.indices(self.shape[0])))[(slice(None),) + tile]

    def __len__(self):
        return self.shape[0]

    def __reduce__(self):
        return (type(self), (self.path, self.series, self.axis, self.planes))

    def __dask_tokenize__(self):
        return ("TiffStackReader", self.path, file_state(self.path), self.series, self.axis,
                sorted(self.planes.items()))  # fmt: skip

    def __repr__(self):
        return (
            f"TiffStackReader({self.path!r}, series={self.series}, axis={self.axis!r}, "
            f"shape={self.shape}, {self.dtype})"
        )


# ---------------------------------------------------------------------------
# a folder (or glob) of single-frame files
# ---------------------------------------------------------------------------

_SEQUENCE = re.compile(r"^(.*?)(\d+)(\D*)$")


def check_sequence(names: list[str]) -> None:
    """Refuse a numbered sequence with a gap: frame_1, frame_2, frame_4.

    Names that share a prefix and suffix around their last number form a
    sequence; its numbers must advance by one constant step (the smallest).

    Examples
    --------
    >>> check_sequence(["f_1.tif", "f_2.tif", "f_3.tif"])
    >>> check_sequence(["f_1.tif", "f_2.tif", "f_4.tif"])
    Traceback (most recent call last):
    ...
    ValueError: frame f_3.tif is missing from the numbered sequence f_1.tif ... f_4.tif ...
    """
    matches = [_SEQUENCE.match(name) for name in names]
    if len(names) < 3 or not all(matches):
        return
    if len({(m.group(1), m.group(3)) for m in matches}) != 1:
        return
    numbers = [int(m.group(2)) for m in matches]
    steps = np.diff(numbers)
    step = int(steps.min())
    if step <= 0 or (steps == step).all():
        return
    gap = int(np.argmax(steps != step))
    width = len(matches[gap].group(2))
    prefix, suffix = matches[0].group(1), matches[0].group(3)
    missing = f"{prefix}{numbers[gap] + step:0{width}d}{suffix}"
    raise ValueError(
        f"frame {missing} is missing from the numbered sequence {names[0]} ... {names[-1]} "
        f"(between {names[gap]} and {names[gap + 1]}); restore it, or if frames were "
        f"left out on purpose, number the files again without gaps"
    )


class TiffFrameReader:
    """A picklable view of a sorted list of single-frame TIFF files as one stack."""

    def __init__(self, folder, names):
        self.folder = os.fspath(pathlib.Path(folder).resolve())
        self.names = tuple(names)
        first = self._frame(0)
        self.shape = (len(self.names),) + first.shape
        self.dtype = first.dtype
        self.ndim = 3
        self.chunks = (1,) + first.shape

    def _frame(self, i: int) -> np.ndarray:
        path = os.path.join(self.folder, self.names[i])
        try:
            pages, frame = _read_frame_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"the frame {path!r} disappeared while it was read; keep the folder as it "
                f"is until the run ends"
            ) from None
        except Exception as exc:
            raise _damaged(path, "the frame", exc) from None
        if pages != 1 or frame.ndim != 2:
            raise ValueError(
                f"{path!r} holds {pages} page(s) of shape {frame.shape}; a folder of frames "
                f"needs one grey 2-D image per file: pass a multi-page TIFF as one file instead"
            )
        if hasattr(self, "shape") and (frame.shape != self.shape[1:] or frame.dtype != self.dtype):
            raise ValueError(
                f"frame {self.names[i]} has shape {frame.shape} {frame.dtype}, but "
                f"{self.names[0]} has {self.shape[1:]} {self.dtype}; all frames must have "
                f"one shape and type: remove or convert the odd ones"
            )
        return frame

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        events, tile = key[0], key[1:]
        if isinstance(events, int | np.integer):
            return self[(slice(int(events), int(events) + 1),) + tile][0]
        rows = range(*events.indices(self.shape[0]))
        out = np.empty((len(rows),) + self.shape[1:], dtype=self.dtype)
        for row, i in enumerate(rows):
            out[row] = self._frame(i)
        return out[(slice(None),) + tile]

    def __len__(self):
        return self.shape[0]

    def __reduce__(self):
        return (type(self), (self.folder, self.names))

    def __dask_tokenize__(self):
        # every frame's state: a frame rewritten in place must change the token
        states = [file_state(os.path.join(self.folder, n)) for n in self.names]
        return ("TiffFrameReader", self.folder, self.names, states)

    def __repr__(self):
        return (
            f"TiffFrameReader({self.folder!r}, {len(self.names)} frames {self.names[0]} ... "
            f"{self.names[-1]}, shape={self.shape}, {self.dtype})"
        )


def find_frames(path) -> tuple[pathlib.Path, list[str]]:
    """The folder and the naturally sorted frame names of a folder or a glob
    (its files named .tif, .tiff, .btf or .tf8)."""
    text = os.fspath(path)
    if pathlib.Path(text).is_dir():
        folder = pathlib.Path(text)
        files = frame_files(folder)
    else:
        files = [pathlib.Path(p) for p in glob.glob(text)]
        files = [p for p in files if p.suffix.lower() in TIFF_SUFFIXES and p.is_file()]
        if not files:
            raise FileNotFoundError(
                f"no TIFF file (.tif, .tiff) matches {text!r}: check the folder and the pattern"
            )
        folders = {p.parent.resolve() for p in files}
        if len(folders) > 1:
            raise ValueError(
                f"{text!r} matches frames in {len(folders)} folders; the frames of one stack "
                f"must be in one folder: give a pattern for one of them"
            )
        folder = files[0].parent
    names = sorted((p.name for p in files), key=natural_key)
    check_sequence(names)
    return folder, names


# ---------------------------------------------------------------------------
# the Source
# ---------------------------------------------------------------------------


def open_tiff(path, dataset: str | None = None):
    """The ``Source`` of a TIFF file, a folder of TIFF frames or a glob of them.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib, tifffile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> tifffile.imwrite(d / "stack.tif", np.zeros((5, 4, 6), np.uint16))
    >>> open_tiff(d / "stack.tif").shape
    (5, 4, 6)
    >>> for i in range(1, 11):
    ...     tifffile.imwrite(d / f"frame_{i}.tif", np.full((4, 3), i, np.uint8))
    >>> reader = open_tiff(str(d / "frame_*.tif")).array
    >>> reader.names[:3], reader.names[-1], int(reader[2].max())
    (('frame_1.tif', 'frame_2.tif', 'frame_3.tif'), 'frame_10.tif', 3)
    """
    from .sources import Source, _check_stack

    text = os.fspath(path)
    selection = parse_selection(dataset)
    if pathlib.Path(text).is_file():
        series = selection.pop("series", 0)
        axis = selection.pop("axis", None)
        reader = TiffStackReader(text, series, axis, selection)
        source_path = pathlib.Path(text)
    else:
        if selection:
            raise ValueError(
                f"{text!r} is a folder of frames; the selection {dataset!r} (series, axis) "
                f"applies to one multi-page TIFF file: drop it"
            )
        folder, names = find_frames(text)
        reader = TiffFrameReader(folder, names)
        source_path = folder
    _check_stack(reader.shape, reader.dtype, repr(reader))
    # the selection as given (as an HDF5 dataset name is): batch reruns compare it
    return Source(reader, reader.chunks, path=source_path, dataset=dataset, pickles_small=True)


def is_tiff_source(source) -> bool:
    return isinstance(source.array, TiffStackReader | TiffFrameReader)


def _read_page(series, number: int, lock) -> np.ndarray:
    """Page ``number`` of an open series (tests count the calls)."""
    with lock:  # tifffile's page lookup moves the file position: one thread at a time
        page = series[number]
    return page.asarray()  # seeks and reads under the handle's lock, decodes outside


def _read_frame_file(path: str) -> tuple[int, np.ndarray]:
    """(number of pages, first page) of one frame file (tests count the calls)."""
    with _tifffile().TiffFile(path) as tif:
        return len(tif.pages), tif.pages[0].asarray()
