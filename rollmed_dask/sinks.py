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

The job holds the target's :class:`TargetLock` for the whole run, so no two
runs write one target; temporaries carry the run's pid and a random part, and
the next run on a target removes those of killed runs. A symbolic link, a
folder that is not a Zarr output of ours, or a target holding the input is
never replaced (``check_target``).
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import socket
import sys

import numpy as np

from . import rtdc
from .compression import DEFAULT_COMPRESSION, hdf5_filter, zarr_compressors

PARTIAL_SUFFIX = ".partial"
PROGRESS_DIR = ".rollmed-progress"
# The root attribute that marks a Zarr store as written (completely) by us.
ZARR_LOG_ATTR = "rollmed-dask log"
ZARR_JOB_ATTR = "rollmed-dask job"
# Test hook: ``ROLLMED_DASK_TEST_KILL_AT=<point>`` SIGKILLs the process at
# that named point, so the crash-window tests need no timing luck.
KILL_ENV = "ROLLMED_DASK_TEST_KILL_AT"
# Test hook: ``ROLLMED_DASK_TEST_PAUSE_AT=<point>:<folder>`` stops the process
# at that point until the test lets it go on, so that another process can act
# in a window that is otherwise too short to hit (see ``pause_point``).
PAUSE_ENV = "ROLLMED_DASK_TEST_PAUSE_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process here if the test hook names this point (or pause here)."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    pause_point(name)


def pause_point(name: str) -> None:
    """If the test hook names this point: create ``<folder>/<point>.here`` and
    wait until the test creates ``<folder>/<point>.go`` (at most 5 minutes)."""
    point, _, folder = os.environ.get(PAUSE_ENV, "").partition(":")
    if point != name or not folder:
        return
    import time

    here = pathlib.Path(folder) / f"{name}.here"
    here.touch()
    deadline = time.monotonic() + 300
    while not here.with_suffix(".go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def option_error(exc_type, template: str, option: str) -> Exception:
    """``exc_type`` whose message names the keyword ``option`` (``overwrite=True``).

    ``exc.template`` and ``exc.option`` let the command line name its own
    flag (``--overwrite``) instead: each interface speaks its own language.
    """
    exc = exc_type(template.replace("{option}", f"{option}=True"))
    exc.template, exc.option = template, option
    return exc


def partial_path(target: pathlib.Path) -> pathlib.Path:
    """The stable temporary name of ``target``, used by resumable Zarr runs
    only: hidden, in the same folder, so the final move is a rename on the same
    file system. The target's lock guards it."""
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


def run_partial_path(target: pathlib.Path) -> pathlib.Path:
    """A temporary name of ``target`` that no other run uses (pid and random)."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def backup_path(target: pathlib.Path) -> pathlib.Path:
    """Where the old output waits while a folder output is swapped in."""
    return target.with_name(f".{target.name}.old")


def temporaries(target: pathlib.Path) -> list[pathlib.Path]:
    """Temporaries of ``target`` on disk: the resumable one and per-run ones."""
    pattern = re.compile(
        re.escape(f".{target.name}.") + r"\d+-[0-9a-f]{8}" + re.escape(PARTIAL_SUFFIX)
    )
    found = [p for p in target.parent.iterdir() if pattern.fullmatch(p.name)]
    stable = partial_path(target)
    return found + ([stable] if stable.exists() else [])


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_stale_temporaries(target: pathlib.Path, *, keep_resumable: bool) -> None:
    """Remove per-run temporaries of killed runs. Only called under the
    target's lock, so none of them belongs to a live run."""
    for path in temporaries(target):
        if not (keep_resumable and path == partial_path(target)):
            _remove(path)


def is_our_zarr(path: pathlib.Path) -> bool:
    """True for a complete Zarr store written by rollmed-dask."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and ZARR_LOG_ATTR in meta.get("attributes", {})


def zarr_job_params(path: pathlib.Path):
    """The job parameters a complete Zarr output of ours was made with, or None."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    return meta.get("attributes", {}).get(ZARR_JOB_ATTR)


class TargetBusyError(OSError):
    """Another run holds the target's lock."""


class TargetChangedError(OSError):
    """Another program changed an in-place target while the run worked on its copy."""


def file_state(path: pathlib.Path) -> tuple:
    """What changes when any program writes to or replaces the file at ``path``.

    ``st_ctime_ns`` cannot be set back by a user (``os.utime`` sets it to
    now), so a change that restores size and mtime is still seen.
    """
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class TargetLock:
    """An exclusive lock on a target: ``.NAME.lock`` beside it, held with
    ``flock`` by one process.

    The kernel drops the lock when its holder dies, even by SIGKILL, so a
    stale lock file needs no pid checks: the next run simply takes it. The file
    is removed on release; a run that opened the old file before that notices
    (the inode changed) and opens the new one.
    """

    def __init__(self, target: pathlib.Path):
        self.target = target
        self.path = target.with_name(f".{target.name}.lock")
        self.fd = None

    def __enter__(self):
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 100).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise TargetBusyError(
                    f"another rollmed-dask run (pid {holder}) is writing {str(self.target)!r}; "
                    f"wait for it to finish, or write to another path"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        try:
            os.unlink(self.path)  # before unlocking: a waiting run then sees a new inode
        finally:
            os.close(self.fd)
        return False


def recover_backup(target: pathlib.Path) -> str | None:
    """Finish a folder swap that a killed run left half done (under the lock).

    ``move_into_place`` parks the old output as ``.NAME.old`` and then moves
    the new one in. Killed between the two renames, nothing is under the
    target's name: the old output is put back. Killed after both, the parked
    old output is what the complete new one replaced, and it is removed.
    Returns a message when something was restored.
    """
    backup = backup_path(target)
    if not (backup.exists() or backup.is_symlink()):
        return None
    if target.exists() or target.is_symlink():
        _remove(backup)
        return None
    os.replace(backup, target)
    return (
        f"restored {str(target)!r} from {backup.name}, "
        f"left by a run that was killed while replacing it"
    )


def move_into_place(tmp: pathlib.Path, target: pathlib.Path) -> None:
    """Replace ``target`` by the complete ``tmp`` (under the target's lock).

    A file onto a file is one atomic rename. ``os.replace`` cannot swap a file
    and a folder, nor replace a non-empty folder: the old target is parked as
    ``.NAME.old`` first, and ``recover_backup`` puts it back if the process
    dies before the new one is in place. At every moment either the target or
    its parked copy holds a complete output.
    """
    if target.exists() and (tmp.is_dir() or target.is_dir()):
        check_removable(target)  # again: the old output may have changed hands since
        backup = backup_path(target)
        # Ctrl-C or SIGTERM between the two renames would leave nothing under the
        # target's name: they wait until both are done
        deferred = _defer_interrupts()
        try:
            os.replace(target, backup)  # fails if a backup exists: never overwrite one
            crash_point("move-parked")
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(backup, target)
                raise
        except BaseException:
            _restore_interrupts(deferred)
            raise
        try:
            _restore_interrupts(deferred)  # an interrupt that waited is raised here...
        finally:
            crash_point("move-installed")
            _remove(backup)  # ...once the replaced output is gone
    else:
        crash_point("move-file")
        os.replace(tmp, target)


_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


def _defer_interrupts():
    """Hold back SIGINT and SIGTERM; returns what :func:`_restore_interrupts` needs.

    Their handlers are swapped for one that only notes the signal. Blocking
    them with ``pthread_sigmask`` would not do: it blocks them for the calling
    thread only, the kernel hands them to another thread (dask's, zarr's),
    and Python then runs the handler in the main thread all the same. Python
    runs handlers in the main thread only, so elsewhere (a batch's file
    threads) there is nothing to hold back.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {sig: signal.getsignal(sig) for sig in _INTERRUPTS}
    if any(handler is None for handler in previous.values()):
        return None  # a handler set outside Python cannot be put back
    caught = []
    for sig in _INTERRUPTS:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    return previous, caught


def _restore_interrupts(deferred) -> None:
    """Put the handlers back, then deliver the first signal that was held back."""
    if deferred is None:
        return
    previous, caught = deferred
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if caught:
        signal.raise_signal(caught[0])


def check_removable(target: pathlib.Path) -> None:
    """Refuse, before anything changes, to replace a folder that this user may
    not remove completely (someone else's output in a shared folder).

    Replacing it would install the new output, then fail half-way through
    removing the old one and leave it, hidden, as ``.NAME.old``.
    """
    euid = os.geteuid() if hasattr(os, "geteuid") else None
    parent = os.stat(target.parent)
    if (
        euid not in (None, 0)
        and parent.st_mode & 0o1000  # sticky: only an entry's owner may rename it
        and euid not in (parent.st_uid, os.lstat(target).st_uid)
    ):
        blocked = target
    else:
        blocked = None
        effective = os.access in os.supports_effective_ids
        walk_errors = []
        # an old output that is a file (the format changed) has nothing inside
        tree = os.walk(target, onerror=walk_errors.append) if target.is_dir() else ()
        for folder, dirs, files in tree:
            if (dirs or files) and not os.access(
                folder, os.R_OK | os.W_OK | os.X_OK, effective_ids=effective
            ):
                blocked = pathlib.Path(folder)
                break
        if blocked is None and walk_errors:
            blocked = pathlib.Path(walk_errors[0].filename or target)
    if blocked is not None:
        raise PermissionError(
            f"cannot replace {str(target)!r}: this user may not remove "
            f"{str(blocked)!r} of the old output (owner uid {os.lstat(blocked).st_uid}); "
            f"nothing was changed: ask its owner to remove it, or write to another path"
        )


def check_output_folder(target: pathlib.Path) -> None:
    """Fail early, before any work, if nothing can be written beside ``target``."""
    parent = target.parent
    if not parent.is_dir():
        raise FileNotFoundError(
            f"the output folder {str(parent)!r} does not exist; create it first"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into the output folder {str(parent)!r}")


def check_not_symlink(target: pathlib.Path) -> None:
    """Refuse a symbolic link as output.

    Replacing it would put a plain file in place of the link and leave the
    file it points to as it was; writing through it would put the temporary
    beside a file somewhere else. Neither is what the path says, so the user
    chooses: the link's target, or another name.
    """
    if target.is_symlink():
        raise ValueError(
            f"output {str(target)!r} is a symbolic link to {os.readlink(target)!r}; "
            f"give the path it points to, or another path"
        )


def check_target(target: pathlib.Path, overwrite: bool, input_path=None) -> None:
    """Fail early, before any work, if the target cannot be written or replaced.

    Only what rollmed-dask writes is ever replaced: a file, or a complete Zarr
    store of ours. A folder of any other kind is refused even with
    ``overwrite``, and so is any target that holds the input.
    """
    check_not_symlink(target)
    check_output_folder(target)
    if not target.exists():
        return
    if input_path is not None:
        inside = pathlib.Path(input_path).resolve()
        if target.resolve() in (inside, *inside.parents):
            raise ValueError(
                f"the output {str(target)!r} holds the input {str(input_path)!r}; "
                f"write to another path"
            )
    if target.is_dir() and not is_our_zarr(target):
        raise FileExistsError(
            f"the output {str(target)!r} is a folder that rollmed-dask did not write; "
            f"it is never replaced: give a new path, such as "
            f"{str(target / 'background.rtdc')!r}"
        )
    if not overwrite:
        raise option_error(
            FileExistsError,
            f"output {str(target)!r} already exists; choose another path, or pass "
            f"{{option}} to replace it (a file, or a Zarr output of rollmed-dask) once "
            f"the new result is complete",
            "overwrite",
        )
    check_removable(target)  # a file too: in a sticky folder, the final rename over it would fail


def _remove_temporary(path: pathlib.Path) -> None:
    """Remove a per-run temporary now, and again when the interpreter exits.

    After an interrupt, a worker thread may still be finishing its block and
    write a Zarr chunk into the temporary just removed. Python joins worker
    threads before it runs ``atexit`` handlers, so that removal comes last. The
    name is this run's own, so no other run's output can be hit.
    """
    import atexit

    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    atexit.register(lambda: path.exists() and _remove(path))


def disk_full_error(exc: BaseException, where: pathlib.Path) -> OSError | None:
    """One clear error for a full disk (or quota), or None for other errors.

    HDF5 reports a failed write inside some calls (``h5py``'s ``copy``) as a
    RuntimeError whose text carries the errno, so the text is checked too.
    """
    if not isinstance(exc, OSError | RuntimeError):
        return None
    if (getattr(exc, "strerror", None) or "").startswith("the disk is full"):  # already says so
        return exc
    text = str(exc)
    if (
        getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        or "No space left on device" in text
        or "Disk quota exceeded" in text
    ):
        return OSError(
            errno.ENOSPC,
            f"the disk is full (no space left on device) while writing in "
            f"{str(where.parent)!r}; nothing was changed: free some space there or "
            f"choose another output folder",
        )
    return None


class Sink:
    """The shared part of the sinks: target, temporary path, resume bookkeeping."""

    def __init__(self, target, dataset, shape, dtype, *, chunk_events, job_params, resume):
        self.target = pathlib.Path(target)
        # resumable Zarr needs a name the next run finds; the lock guards it
        self.tmp = partial_path(self.target) if resume else run_partial_path(self.target)
        self.dataset = dataset
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.chunk_events = chunk_events
        self.job_params = job_params
        self.resume = resume

    def abort(self) -> None:
        """Remove the temporary output, unless it is kept to be resumed."""
        if not self.resume:
            _remove_temporary(self.tmp)

    def done_digests(self) -> dict:
        """``{start: digests or None}`` of the blocks a previous, interrupted run
        completed: the digests of the input rows each block read, recorded with
        it, None where none were."""
        return {}

    #: What the partial's first run recorded about its input (``open``), or None.
    previous_input = None


class HDF5Sink(Sink):
    """``events/image_bg`` in an ``.rtdc``-compatible HDF5 file (README, "Output format").

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
        compression=DEFAULT_COMPRESSION,
        input_path=None,
        in_place=False,
        copy_images=False,
        plain=False,
        **kwargs,
    ):
        super().__init__(target, dataset, shape, dtype, **kwargs)
        self.compression = compression
        self.input_path = input_path
        self.in_place = in_place
        self.copied_from = None  # file_state of an in-place target when copied
        self.copy_images = copy_images
        # no .rtdc metadata nor dcnum pipeline labels: a TIFF input, or (found
        # in open) a plain HDF5 input, is no .rtdc data
        self.plain = plain
        self.h5 = None
        self.dset = None
        self.codec = None
        self.image_copy = None  # BackgroundCopy of the input's images into a new file
        self.write_behind = None

    def open(self, input_data=None) -> None:
        import h5py
        import hdf5plugin  # noqa: F401

        from .h5chunks import ChunkCodec

        if self.in_place:
            self._copy_target()
            self.write_behind = WriteBehind(self.tmp)
            self.write_behind.wrote(self.tmp.stat().st_size)
            self.h5 = h5py.File(self.tmp, "a")
            if self.dataset in self.h5:
                # deleted before the new one is written, in one session: HDF5
                # reuses the freed space, so repeated runs do not grow the file
                del self.h5[self.dataset]
        else:
            self.h5 = h5py.File(self.tmp, "w", libver="latest")
            self.write_behind = WriteBehind(self.tmp)
            self.plain = self.plain or (
                self.input_path is not None and not rtdc.is_rtdc_file(self.input_path)
            )
            if self.input_path is not None and not self.plain:
                copy = rtdc.prepare_output_file(
                    self.h5, self.input_path, copy_images=self.copy_images, defer_images=True
                )
                if copy is not None:
                    # the images' chunks are copied beside the computation, not before it
                    self.image_copy = BackgroundCopy(copy, self.write_behind.wrote)
        self.dset = self.h5.create_dataset(
            self.dataset,
            shape=self.shape,
            dtype=self.dtype,
            maxshape=(None,) + self.shape[1:],
            chunks=(self.chunk_events,) + self.shape[1:],
            **rtdc.filter_kwargs(hdf5_filter(self.compression)),
        )
        for key, value in rtdc.IMAGE_ATTRS.items():
            self.dset.attrs.create(key, value)
        codec = ChunkCodec.from_dataset(self.dset)
        self.codec = codec if codec.supported else None

    def _copy_target(self) -> None:
        """In place: a byte-for-byte copy of the target, beside it, to write into.

        HDF5 gives no guarantee for a file killed while open for writing, so the
        user's file is never opened for writing: the copy gets the new dataset
        and replaces the file by a rename once complete.
        """
        need = self.target.stat().st_size
        free = shutil.disk_usage(self.target.parent).free
        if free < need:
            raise OSError(
                errno.ENOSPC,
                f"the disk is full: in_place copies {str(self.target)!r} ({need:,} bytes) "
                f"beside it first, but only {free:,} bytes are free; free some space "
                f"there, or write a new file instead",
            )
        # what the file was when copied: checked again before the copy replaces it
        self.copied_from = file_state(self.target)
        shutil.copyfile(self.target, self.tmp)
        shutil.copymode(self.target, self.tmp)
        crash_point("inplace-copied")

    def _check_target_unchanged(self) -> None:
        """Refuse to replace a file that another program changed since it was copied.

        Our copy has the background but not that program's change; the rename
        would silently undo it. A lock cannot help: programs that do not ask
        for one (h5py, dclab, an editor) would write all the same. What is
        left is a window of one ``stat`` and one rename.
        """
        if file_state(self.target) != self.copied_from:
            raise TargetChangedError(
                f"{str(self.target)!r} was changed by another program during the run; "
                f"the background was not added and the file is as that program left it: "
                f"run again when nothing else writes to it",
            )

    @property
    def prepare(self):
        from functools import partial

        if self.codec is None:
            return _pass_block
        return partial(_encode_block_task, self.codec)

    def write(self, payload) -> int:
        if self.image_copy is not None:
            self.image_copy.check()  # a failed copy (a full disk) ends the job now
        start, data = payload
        if isinstance(data, np.ndarray):
            self.dset[start : start + len(data)] = data
            self.write_behind.wrote(data.nbytes)
            return len(data)
        from .h5chunks import write_chunks

        write_chunks(self.dset, start, data)
        self.write_behind.wrote(data.nbytes)
        return data.shape[0]

    def commit(self, dataset_attrs: dict, log_lines: list[str]) -> None:
        if self.image_copy is not None:
            self.image_copy.finish()
            self.image_copy = None
        for key, value in dataset_attrs.items():
            self.dset.attrs[key] = value
        if not self.plain:
            rtdc.write_pipeline_attrs(self.h5, self.dataset)  # dcnum then skips its background
        rtdc.write_log(self.h5, _free_log_name(self.h5, rtdc.run_log_name()), log_lines)
        self.h5.close()
        self.h5 = None
        write_behind, self.write_behind = self.write_behind, None
        write_behind.close(sync=True)  # the data on disk before the rename that publishes it
        if self.in_place:
            crash_point("inplace-written")
            self._check_target_unchanged()
            os.replace(self.tmp, self.target)
            crash_point("inplace-replaced")
            return
        move_into_place(self.tmp, self.target)

    def abort(self) -> None:
        copy, self.image_copy = self.image_copy, None
        write_behind, self.write_behind = self.write_behind, None
        h5, self.h5 = self.h5, None
        try:
            if copy is not None:
                copy.cancel()  # before the file closes: the copy writes into it
            if write_behind is not None:
                write_behind.close(sync=False)
            if h5 is not None:
                h5.close()
        except (OSError, RuntimeError):
            pass  # a file HDF5 cannot flush (full disk) is removed all the same
        finally:
            _remove_temporary(self.tmp)


class BackgroundCopy:
    """Runs an :class:`rollmed_dask.rtdc.ImageCopy` in a thread beside the job.

    Copying a large input's images takes seconds (GBs to read and write) and
    little CPU; done before the computation, as ``h5py.Group.copy`` would, it
    is time in which the cores wait. Each chunk is one short HDF5 call, so the
    workers' reads and the writer's chunks go on in between. The thread's
    error (a full disk) is raised in the job by :meth:`check` (at the next
    block) or :meth:`finish` (at commit); :meth:`cancel` stops it at the next
    chunk. Only a finished copy leaves a complete output.
    """

    def __init__(self, copy, on_chunk):
        import threading

        self.copy = copy
        self.on_chunk = on_chunk
        self.stop = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, name="rollmed-image-copy", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.copy.run(self.stop, self.on_chunk)
        except BaseException as exc:  # raised in the job's thread, see check()
            self.error = exc

    def check(self) -> None:
        """Raise the copy's error, if it failed."""
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Wait for the copy to end, and raise its error if it failed."""
        self.thread.join()
        try:
            self.check()
        finally:
            self.copy.close()

    def cancel(self) -> None:
        """Stop the copy at the next chunk; its error no longer matters."""
        self.stop.set()
        self.thread.join()
        self.copy.close()


class WriteBehind:
    """Writes a file's new data to disk while the job still runs.

    The job writes GBs (the compressed background, and the input's images in a
    new file) that the kernel keeps as dirty pages; the ``fsync`` before the
    output is renamed into place would then wait for all of them while
    every core idles (0.7 s at N = 200000, measured). Here a thread starts
    the writeback (:func:`_start_writeback`) whenever another :data:`STEP`
    bytes were written, so the disk works beside the computation and the
    final sync only has the rest (0.00-0.01 s, same runs). Its file
    descriptor is opened once and also does the final ``fsync``
    (:meth:`close`): an error of an earlier writeback (a full disk, an I/O
    error) is reported there, not lost in the thread.
    """

    #: Bytes written between two writebacks: enough to keep the disk busy,
    #: few enough that the final sync is short (64 MiB take about 0.2 s here).
    STEP = 64 * 2**20

    def __init__(self, path: pathlib.Path):
        import threading

        self.fd = os.open(path, os.O_RDONLY)
        self.pending = 0
        self.error = None
        self.closing = False
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rollmed-write-behind", daemon=True)
        self.thread.start()

    def wrote(self, nbytes: int) -> None:
        """Count ``nbytes`` more written; wake the thread every :data:`STEP` bytes."""
        with self.lock:
            self.pending += nbytes
            if self.pending < self.STEP:
                return
            self.pending = 0
        self.wake.set()

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.closing:
                return
            try:
                _start_writeback(self.fd)
            except OSError as exc:
                self.error = exc  # raised by close(sync=True)
                return

    def close(self, sync: bool) -> None:
        """Stop the thread; with ``sync``, ``fsync`` the file and raise any write error."""
        self.closing = True
        self.wake.set()
        self.thread.join()
        try:
            if sync:
                if self.error is not None:
                    raise self.error
                os.fsync(self.fd)
        finally:
            os.close(self.fd)


def _free_log_name(h5, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... if runs in the same second logged before."""
    logs = h5.get("logs", {})
    candidate, n = name, 1
    while candidate in logs:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _pass_block(block, start, digests=None):
    return start, np.ascontiguousarray(block)


def _encode_block_task(codec, block, start, digests=None):
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

    def __init__(
        self, target, dataset, shape, dtype, *, compression=DEFAULT_COMPRESSION, **kwargs
    ):
        super().__init__(target, dataset, shape, dtype, **kwargs)
        self.compression = compression
        self.complete = False  # a resumed partial that only lacked the final move

    def _params_file(self) -> pathlib.Path:
        return self.tmp / PROGRESS_DIR / "job.json"

    def _input_file(self) -> pathlib.Path:
        return self.tmp / PROGRESS_DIR / "input.json"

    def open(self, input_data=None) -> None:
        """Create the temporary store, or check the partial one to continue.

        ``input_data`` (JSON-able: the input's stat and identity, see
        :mod:`rollmed_dask.identity`) is kept in the progress folder; the one a
        continued partial kept is :attr:`previous_input`.
        """
        import zarr

        if self.resume and self.tmp.exists():
            self._check_resumable()
            try:
                self.previous_input = json.loads(self._input_file().read_text())
            except (OSError, ValueError):
                self.previous_input = None
            return
        root = zarr.open_group(store=str(self.tmp), mode="w")
        root.create_array(
            self.dataset,
            shape=self.shape,
            dtype=self.dtype,
            chunks=(self.chunk_events,) + self.shape[1:],
            compressors=zarr_compressors(self.compression),
            fill_value=0,
            dimension_names=NGFF_AXES,  # OME-Zarr 0.5 asks for them (see ngff_attrs)
        )
        (self.tmp / PROGRESS_DIR).mkdir()
        self._input_file().write_text(json.dumps(input_data, sort_keys=True))
        self._params_file().write_text(json.dumps(self.job_params, sort_keys=True))

    def _check_resumable(self) -> None:
        if not (self.tmp / self.dataset / "zarr.json").is_file():
            raise option_error(
                ValueError,
                f"the partial output {str(self.tmp)!r} lacks the metadata of its array "
                f"{self.dataset!r} (its run was stopped while creating it, or it was "
                f"damaged), so it cannot be continued; rerun without {{option}} to start over",
                "resume",
            )
        from .identity import differing_param

        stored = zarr_job_params(self.tmp)
        if (
            not self._params_file().exists()
            and isinstance(stored, dict)
            and differing_param(stored, self.job_params) is None
        ):
            # committed (progress removed, job recorded) but killed before the
            # move: complete; the job checks its data and moves it into place
            self.complete = True
            return
        try:
            previous = json.loads(self._params_file().read_text())
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict):
            raise option_error(
                ValueError,
                f"the partial output {str(self.tmp)!r} has no readable record of its "
                f"parameters ({PROGRESS_DIR}/job.json), so it cannot be continued; rerun "
                f"without {{option}} to start over",
                "resume",
            )
        why = differing_param(previous, self.job_params)
        if why is not None:
            raise option_error(
                ValueError,
                f"the partial output {str(self.tmp)!r} was made with {why}; rerun without "
                f"{{option}} to start over",
                "resume",
            )

    def abort(self) -> None:
        settle_zarr_io()  # nothing may write into the temporary once it is removed
        super().abort()

    def install(self) -> None:
        """Move a complete partial (see :attr:`complete`) into place."""
        move_into_place(self.tmp, self.target)

    def done_digests(self) -> dict:
        progress = self.tmp / PROGRESS_DIR
        if not (self.resume and progress.is_dir()):
            return {}
        return {
            int(marker.name): _read_block_digests(marker)
            for marker in progress.iterdir()
            if marker.name.isdigit()
        }

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
        group_name, _, array_name = self.dataset.strip("/").rpartition("/")
        (root[group_name] if group_name else root).attrs.update(ngff_attrs(array_name))
        # the log marks the store as ours: only such a folder is ever replaced;
        # written last, the job attribute lets a resumed run recognise this
        # partial as complete if the process dies before the move
        root.attrs.update(
            {ZARR_LOG_ATTR: {rtdc.run_log_name(): log_lines}, ZARR_JOB_ATTR: self.job_params}
        )
        _remove(self.tmp / PROGRESS_DIR)
        move_into_place(self.tmp, self.target)


def settle_zarr_io(timeout: float = 120) -> None:
    """Wait until zarr's event loop has finished every task it still runs.

    zarr 3 writes the chunks of one assignment as tasks gathered on its own
    event-loop thread. When one fails (a full disk), ``gather`` raises at once
    and leaves the others running; an interrupt in ``zarr.core.sync.sync``
    leaves its coroutine running too. Removing the temporary under them, and
    exiting while they were pending, printed 100 to 370 lines of asyncio errors
    ("Task was destroyed but it is pending!", "cannot schedule new futures
    after shutdown") after the one line of the error. Waiting for them (their
    errors are read here and dropped: the first one is already raised) leaves
    nothing running. A no-op where zarr never ran.
    """
    import asyncio

    zarr_sync = sys.modules.get("zarr.core.sync")
    loop = zarr_sync.loop[0] if zarr_sync is not None else None
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    name = "rollmed-dask settle"

    async def others_done():
        # two threads may settle at once: neither waits for the other
        asyncio.current_task().set_name(name)
        while pending := [t for t in asyncio.all_tasks() if t.get_name() != name]:
            done, _ = await asyncio.wait(pending)
            for task in done:
                if not task.cancelled():
                    task.exception()  # read: no "exception was never retrieved"

    future = asyncio.run_coroutine_threadsafe(others_done(), loop)
    try:
        future.result(timeout)
    except TimeoutError:
        future.cancel()


NGFF_AXES = ("t", "y", "x")


def ngff_attrs(array_name: str) -> dict:
    """OME-Zarr (NGFF 0.5) image metadata for the group that holds the background.

    One resolution level, the array itself; axes t (the events), y, x in
    pixels. With it, OME-Zarr readers (napari-ome-zarr, Fiji's N5/Zarr
    reader, ``ome_zarr``) open ``out.zarr/events`` as an image.
    """
    axes = [{"name": "t", "type": "time"}] + [{"name": n, "type": "space"} for n in "yx"]
    dataset = {
        "path": array_name,
        "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}],
    }
    multiscale = {"name": array_name, "axes": axes, "datasets": [dataset]}
    return {"ome": {"version": "0.5", "multiscales": [multiscale]}}


def _read_block_digests(path: pathlib.Path):
    """A block's ``(chunk digests, context digest)`` as its marker holds them, or None."""
    try:
        data = json.loads(path.read_text())
        return [bytes.fromhex(d) for d in data["chunks"]], bytes.fromhex(data["context"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _plain(value):
    return value.decode() if isinstance(value, bytes | np.bytes_) else value


def _zarr_write_block(store_path: str, dataset: str, block, start: int, digests=None):
    import zarr

    array = zarr.open_array(store=store_path, path=dataset, mode="r+")
    pause_point("zarr-opened")  # test hook: a block still to write when the run stops
    try:
        array[start : start + len(block)] = block
    except BaseException:
        settle_zarr_io()  # the block's other chunks may still be in flight
        raise
    crash_point("zarr-data")
    # One marker per block start, written only after the block's data: resume
    # trusts a marker, so a block without one is computed again. It holds the
    # digests of the input rows the block read, which a resumed run checks;
    # renamed into place, so it is never seen half written.
    marker = pathlib.Path(store_path) / PROGRESS_DIR / str(start)
    text = ""
    if digests is not None:
        chunks, context = digests
        text = json.dumps({"chunks": [d.hex() for d in chunks], "context": context.hex()})
    tmp = marker.with_name(f"{start}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    tmp.write_text(text)
    os.replace(tmp, marker)
    crash_point("zarr-marker")
    return start, len(block)


def _start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages to disk, without waiting for them.

    Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` (through ctypes: Python
    has no binding) only queues the pages: no journal commit, no cache flush
    of the device, unlike ``fdatasync``. Elsewhere ``fdatasync`` (or
    ``fsync``) in this background thread does the same job, at a higher cost.
    """
    sync_file_range = _sync_file_range()
    if sync_file_range is None:
        getattr(os, "fdatasync", os.fsync)(fd)
    elif sync_file_range(fd, 0, 0, 2) != 0:  # 2: SYNC_FILE_RANGE_WRITE
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_SYNC_FILE_RANGE = []


def _sync_file_range():
    """libc's ``sync_file_range`` on Linux, else None (looked up once)."""
    if not _SYNC_FILE_RANGE:
        func = None
        if sys.platform.startswith("linux"):
            import ctypes

            try:
                func = ctypes.CDLL(None, use_errno=True).sync_file_range
                func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            except (OSError, AttributeError):
                func = None
        _SYNC_FILE_RANGE.append(func)
    return _SYNC_FILE_RANGE[0]
