"""Where the graph runs, and how finished blocks reach the single writer.

``scheduler=`` takes what dask users already know: None (an active
``distributed.Client`` if there is one, else threads), ``"threads"``,
``"processes"``, ``"synchronous"``, a ``Client``, or a scheduler address
``"tcp://host:port"``; or a function without arguments that starts a cluster
and returns its Client (``rollmed_dask.cluster`` has such starters): it is
called only once the job's checks have passed, so a run that cannot succeed
never submits a SLURM job, and its cluster is closed when the job ends.

Block results are handed to ``on_result`` in the calling process as soon as each
block finishes, on every scheduler, so a single writer can store them while the
workers go on, and no result is held longer than it takes to write it:

- local schedulers: a dask ``Callback`` sees each block's result in the main
  thread, hands it to the writer and drops the scheduler's reference to it;
- distributed: ``as_completed`` over the block futures, each released after
  writing.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

LOCAL_SCHEDULERS = {
    "threads": "threads",
    "threading": "threads",
    "processes": "processes",
    "multiprocessing": "processes",
    "synchronous": "synchronous",
    "sync": "synchronous",
    "single-threaded": "synchronous",
}


@dataclass
class Resolved:
    """A resolved scheduler: a local scheduler name or a distributed Client."""

    local: str | None = None
    client: object = None
    owns_client: bool = False

    def __post_init__(self):
        # kept as text: an owned client is closed before the summary is made
        if self.client is not None:
            self.description = f"distributed scheduler at {self.client.scheduler.address}"
        else:
            self.description = f"local {self.local} scheduler"

    #: set when computing the blocks failed: an owned cluster's logs are kept
    failed: bool = False

    def close(self) -> None:
        if self.owns_client:
            from .cluster import close_client

            # also closes a cluster started for this job (scancel of its jobs)
            close_client(self.client, keep_logs=self.failed)


def whole_rounds(n_events: int, length: int, unit: int, kernel_size: int, shortest: int) -> int:
    """The block length, at most ``length``, with which the local cores finish together.

    Blocks of one length take about equally long, so with 2 cores 9 blocks
    end with one block running alone while the other core idles (N = 20000 at
    K = 100: 8 x 2400 + 800 events, 0.1 to 0.2 s of a 3.5 s job); 10 x 2000
    keep both busy to the end. Multiples of ``unit`` down to 3/4 of
    ``length`` (never below ``shortest``) are tried: blocks go to the first
    free core in order, each costing its events plus K (its overlap), and a
    shorter length is taken only if the job ends at least 1 % sooner (less is
    below the noise of the block times).

    >>> import os
    >>> whole_rounds(20000, 2400, 40, 100, 400) if os.cpu_count() == 2 else 2000
    2000
    """
    cores = os.cpu_count() or 1
    if cores == 1 or length >= n_events:
        return length
    best, best_finish = length, math.inf
    lowest = max(shortest, unit * math.ceil(0.75 * length / unit))
    for candidate in range(length, lowest - 1, -unit):
        count, rest = divmod(n_events, candidate)
        blocks = [candidate] * count
        if rest >= kernel_size:
            blocks.append(rest)
        elif rest:
            blocks[-1] += rest  # as plan_event_chunks: a chunk shorter than K joins the last
        busy = [0] * cores
        for events in blocks:
            busy[busy.index(min(busy))] += events + kernel_size
        if max(busy) < 0.99 * best_finish:
            best, best_finish = candidate, max(busy)
    return best


def _active_client():
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def resolve_scheduler(scheduler=None) -> Resolved:
    """Resolve ``scheduler=`` to a local scheduler name or a Client.

    Examples
    --------
    >>> resolve_scheduler("threads").local
    'threads'
    """
    if scheduler is None:
        client = _active_client()
        if client is not None:
            return Resolved(client=client)
        import dask

        configured = dask.config.get("scheduler", None)
        if configured is None:
            return Resolved(local="threads")
        scheduler = configured
    if isinstance(scheduler, str):
        if scheduler in LOCAL_SCHEDULERS:
            return Resolved(local=LOCAL_SCHEDULERS[scheduler])
        if "://" in scheduler:
            from distributed import Client

            try:
                client = Client(scheduler, timeout="10s")
            except OSError as exc:
                raise ConnectionError(
                    f"cannot reach a dask scheduler at {scheduler!r} ({exc}); check the "
                    f"address, or start one with `dask scheduler`"
                ) from None
            return Resolved(client=client, owns_client=True)
        if scheduler in ("dask.distributed", "distributed"):
            client = _active_client()
            if client is None:
                raise ValueError(
                    "scheduler='distributed' but no distributed Client is active; "
                    "create one (distributed.Client()) or pass its address"
                )
            return Resolved(client=client)
        raise ValueError(
            f"scheduler={scheduler!r} is not known; pass 'threads', 'processes', "
            f"'synchronous', a distributed Client or an address 'tcp://host:port'"
        )
    if type(scheduler).__name__ == "Client" and hasattr(scheduler, "compute"):
        return Resolved(client=scheduler)
    if callable(scheduler):
        client = scheduler()
        if not (type(client).__name__ == "Client" and hasattr(client, "compute")):
            raise ValueError(
                f"scheduler={scheduler!r} returned {client!r}; a function passed as the "
                f"scheduler must start a cluster and return its distributed Client"
            )
        return Resolved(client=client, owns_client=True)
    raise ValueError(
        f"scheduler={scheduler!r} is not a scheduler; pass 'threads', 'processes', "
        f"'synchronous', a distributed Client or an address 'tcp://host:port'"
    )


def stream_blocks(tasks: list, on_result, resolved: Resolved, num_workers=None) -> None:
    """Compute ``tasks`` (dask Delayed) and pass each result to ``on_result``.

    ``on_result`` runs in the calling process, one block at a time, in order of
    completion. On a local scheduler it returns, or raises (an error, Ctrl-C),
    only once no task is running any more: a task may write into the sink's
    temporary output, which the caller removes right after a failure.
    """
    if not tasks:
        return
    try:
        if resolved.client is not None:
            _stream_distributed(tasks, on_result, resolved.client)
        else:
            _stream_local(tasks, on_result, resolved.local, num_workers)
    except Exception:
        # an error, not an interrupt (KeyboardInterrupt is no Exception)
        resolved.failed = True
        raise


def _stream_local(tasks, on_result, scheduler: str, num_workers) -> None:
    import dask
    from dask.callbacks import Callback

    block_keys = {task.key for task in tasks}

    class _Writer(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if key in block_keys:
                on_result(result)
                # The writer has the block: drop the scheduler's reference, which
                # it would otherwise keep as a result of the compute until the end.
                state["cache"][key] = None

    kwargs = {}
    pool = None
    if scheduler == "threads":
        from concurrent.futures import ThreadPoolExecutor

        # Our own pool rather than dask's shared one, so that it can be waited
        # for: on Ctrl-C dask returns at once while its threads still write.
        pool = ThreadPoolExecutor(num_workers or os.cpu_count() or 1)
        kwargs["pool"] = pool
    elif scheduler == "processes":
        # dask's process pool is its own and waited for on errors; it sends
        # tasks in batches of 6 by default: a process would hold six finished
        # blocks and the writer receive them at once
        kwargs["chunksize"] = 1
        if num_workers:
            kwargs["num_workers"] = num_workers
    # The writer goes to this compute only, beside the callbacks registered
    # globally: registered itself, a job computing at the same time in another
    # thread (a batch of files) could take it away, and its blocks would never
    # be written (dask empties the global set while a local scheduler runs).
    kwargs["callbacks"] = [_Writer()._callback, *list(Callback.active)]
    try:
        # Block tasks are made ready to run (fused by to_delayed, or one
        # delayed call each); optimising again would only cost time.
        dask.compute(*tasks, scheduler=_local_get(scheduler), optimize_graph=False, **kwargs)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _local_get(scheduler: str):
    """The get function of a local scheduler.

    Passed to dask as a function, not by name: given a name, dask imports
    ``distributed`` to look for a Client (0.2 s per run), which
    ``resolve_scheduler`` has already done without importing it.
    """
    if scheduler == "threads":
        from dask.threaded import get
    elif scheduler == "processes":
        from dask.multiprocessing import get
    else:
        from dask.local import get_sync as get
    return get


#: Checks run in the loop that waits for a distributed run's blocks; each may
#: raise (a batch stops its files with KeyboardInterrupt: dask's local callbacks
#: never run on a distributed scheduler).
STOP_CHECKS: set = set()


def _stream_distributed(tasks, on_result, client) -> None:
    """As blocks finish, write them; meanwhile watch that the run can still make
    progress: when its workers are all lost, or all paused for memory, dask
    would wait for ever (``cluster.run_watch`` raises instead)."""
    import time

    from distributed import as_completed

    from .cluster import run_watch

    watch = run_watch(client)
    futures = client.compute(tasks)
    try:
        finished = as_completed(futures, with_results=True)
        while not finished.is_empty():
            for check in list(STOP_CHECKS):
                check()
            if finished.has_ready():
                future, result = next(finished)
                on_result(result)
                future.release()
                watch.progress()
                continue
            watch()
            time.sleep(0.05)
    except BaseException:
        keys = {f.key for f in futures if not f.done()}
        client.cancel([f for f in futures if not f.done()])
        _wait_until_not_running(client, keys)
        raise


def _wait_until_not_running(client, keys, timeout: float = 30.0) -> None:
    """Wait (at most ``timeout``) until no worker runs one of ``keys`` any more.

    Cancelling a future does not stop its task: a block still running would
    write into the temporary output after the caller removed it (in a notebook
    it stayed there until the process ended). A worker that cannot be asked
    (lost, or the scheduler gone) writes nothing more that we can wait for.
    """
    import time

    def executing(dask_worker, keys=frozenset(keys)):
        return sum(ts.key in keys for ts in dask_worker.state.executing)

    deadline = time.monotonic() + timeout
    while keys and time.monotonic() < deadline and client.status == "running":
        try:
            running = client.run(executing, on_error="ignore", wait=True)
        except Exception:
            return
        if not any(isinstance(n, int) and n for n in running.values()):
            return
        time.sleep(0.1)
