"""Start a distributed cluster to run the pipeline on: local processes or SLURM jobs.

Nothing here runs on import: ``distributed`` and ``dask_jobqueue`` are imported
inside the functions, so ``import rollmed_dask.cluster`` is cheap and works
without the ``[hpc]`` extra.

Both starters return a ``distributed.Client``; pass it as ``scheduler=`` and
close it with :func:`close_client`, which also closes the cluster behind it (for
SLURM that cancels the jobs)::

    client = start_slurm_cluster(queue="normal", memory="8GB", jobs=4)
    try:
        ...  # compute_background(..., scheduler=client)
    finally:
        close_client(client)
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

__all__ = [
    "RunStalled",
    "SlurmError",
    "SlurmJobLost",
    "SlurmSubmitError",
    "WorkersPaused",
    "close_client",
    "start_local_cluster",
    "start_slurm_cluster",
]

HPC_HINT = 'install it with: pip install "rollmed-dask[hpc]"'


class SlurmError(RuntimeError):
    """A SLURM job for a dask worker failed before its worker joined the cluster."""


class SlurmSubmitError(SlurmError, ValueError):
    """``sbatch`` rejected the worker job (unknown partition, too much memory, ...)."""


class RunStalled(RuntimeError):
    """A distributed run stopped making progress: no block finished for the lost
    worker timeout while its workers were paused for memory, gone, or the
    scheduler could not be reached. Not a user's mistake: the run failed."""


class WorkersPaused(RunStalled):
    """Every dask worker is paused for memory (dask pauses one at 80 % of its
    limit) and no block finished for the lost worker timeout."""


class SlurmJobLost(SlurmError, RunStalled):
    """Every dask worker of a run is gone: its SLURM jobs ended (walltime, scancel, a
    failed node, ...) or SLURM cannot be asked and no worker came back in time."""


class SlurmWorkerTimeout(SlurmError, TimeoutError):
    """No worker joined within the wait for the first worker (the job pends)."""


#: Seconds a run may go on without any block finishing, while its workers are
#: paused, lost or unreachable, before it stops (default). The dask config key
#: ``rollmed-dask.lost-worker-timeout`` sets it for every client; a cluster of
#: :func:`start_slurm_cluster` has its own ``lost_worker_timeout``.
LOST_WORKER_TIMEOUT = 60.0

#: Seconds to wait for the first SLURM worker (a job may pend that long in a queue).
WORKER_WAIT = 3600.0


def _slurm_command_timeout(budget: float) -> float:
    """Seconds one squeue / sacct / scancel may take: with slurmctld down each
    tries for about 9 s; a run must still stop near its lost worker timeout."""
    return max(2.0, min(30.0, budget / 3))


# squeue states of a job that has not ended; any other state means it has
_ACTIVE_STATES = {
    "PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
}  # fmt: skip


def _import_jobqueue():
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ImportError(
            "starting workers on SLURM needs dask-jobqueue, which is not installed; " + HPC_HINT
        ) from exc
    _undo_jobqueue_sigint()
    return dask_jobqueue


def _undo_jobqueue_sigint() -> None:
    """Give Ctrl-C back to Python: ``import dask_jobqueue`` (its ``runner`` module)
    makes SIGINT call ``sys.exit()``, which ends a run with exit status 0, as if it
    had succeeded, and skips the ``KeyboardInterrupt`` cleanup of callers."""
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGINT)
    if getattr(handler, "__module__", None) == "dask_jobqueue.runner":
        signal.signal(signal.SIGINT, signal.default_int_handler)


def start_local_cluster(n_workers: int, threads_per_worker: int = 1, memory_limit="auto", **kw):
    """Start a ``distributed.LocalCluster`` of worker processes and connect to it.

    Parameters
    ----------
    n_workers : int
        Number of worker *processes* (at least 1).
    threads_per_worker : int, default 1
        Threads in each worker process.
    memory_limit : str, int or float, default "auto"
        Memory limit of each worker, as ``distributed.LocalCluster`` takes it
        (``"auto"`` shares the machine's memory between the workers, ``"4GB"``,
        a number of bytes, or 0 for no limit).
    **kw
        Passed on to ``distributed.LocalCluster``. The dashboard (if bokeh is
        installed) listens on a free port unless you pass ``dashboard_address``;
        ``client.dashboard_link`` says where.

    Returns
    -------
    distributed.Client
        Connected to the new cluster; ``client.cluster`` is the cluster. Close
        both with :func:`close_client`.

    Raises
    ------
    ValueError
        If ``n_workers`` or ``threads_per_worker`` is smaller than 1.

    Examples
    --------
    .. code-block:: python

        from rollmed_dask.cluster import start_local_cluster, close_client
        client = start_local_cluster(2)
        len(client.nthreads())
        # 2
        close_client(client)
    """
    if int(n_workers) < 1:
        raise ValueError(f"n_workers={n_workers!r}: need at least one worker")
    if int(threads_per_worker) < 1:
        raise ValueError(f"threads_per_worker={threads_per_worker!r}: need at least one thread")
    from distributed import Client, LocalCluster

    kw.setdefault("dashboard_address", ":0")  # a free port: ":8787" may be taken
    cluster = LocalCluster(
        n_workers=int(n_workers),
        threads_per_worker=int(threads_per_worker),
        processes=True,
        memory_limit=memory_limit,
        **kw,
    )
    try:
        return Client(cluster)
    except BaseException:
        cluster.close()
        raise


def _machine_memory() -> int:
    from distributed.system import MEMORY_LIMIT

    return int(MEMORY_LIMIT)


def local_worker_memory(n_workers: int):
    """``(bytes, threads)`` of each worker of ``start_local_cluster(n_workers)``:
    distributed's "auto" gives one single-threaded worker its core's share of
    the machine's memory."""
    cores = os.cpu_count() or 1
    return int(_machine_memory() * min(1.0, 1 / cores)), 1


def local_worker_bound(n_workers: int, memory_budget) -> tuple[int, str]:
    """The local workers this machine can run, and why fewer than asked ("" if not).

    More worker processes than cores only compete for them; each needs memory
    for itself (``job.WORKER_BASE_MEMORY``) and four times its memory budget
    (``job.fit_budget_to_workers`` plans blocks to a quarter of a worker).
    """
    from dask.utils import format_bytes

    from .job import _WORKER_MEMORY_SHARE, WORKER_BASE_MEMORY
    from .pipeline import parse_bytes

    cores = os.cpu_count() or 1
    total = _machine_memory()
    per_worker = WORKER_BASE_MEMORY + parse_bytes(memory_budget) / _WORKER_MEMORY_SHARE
    fits = max(1, int(total // per_worker))
    bound = min(n_workers, cores, fits)
    if bound >= n_workers:
        return n_workers, ""
    why = f"this machine has {cores} core(s)" if bound == cores else ""
    if fits == bound:
        memory = (
            f"{format_bytes(total)} of memory, enough for {fits} worker(s) of "
            f"{format_bytes(per_worker)} each (the memory budget {memory_budget} planned "
            "at a quarter of a worker)"
        )
        why = f"{why} and {memory}" if why else f"this machine has {memory}"
    return bound, why


def slurm_worker_memory(options: dict):
    """``((bytes, threads) per worker process, how it was asked)`` of the workers
    :func:`start_slurm_cluster` would start with ``options``, from them and the
    dask-jobqueue configuration; ``(None, None)`` if that cannot be told yet
    (the start then says what is missing)."""
    import dask
    from dask.utils import format_bytes
    from dask.utils import parse_bytes as dask_parse_bytes

    from .pipeline import parse_bytes

    def get(key):
        value = options.get(key)
        return value if value is not None else dask.config.get(f"jobqueue.slurm.{key}", None)

    memory, cores, processes = get("memory"), get("cores"), get("processes")
    if memory is None or cores is None:
        return None, None
    if processes is None:
        try:
            from dask_jobqueue.core import nprocesses_nthreads
        except ImportError:
            return None, None
        _undo_jobqueue_sigint()
        processes = nprocesses_nthreads(int(cores))[0]
    try:
        parse_bytes(memory)  # ours: the start then says what is wrong with it
        # each worker's limit as dask-jobqueue gives it (``--memory-limit``):
        # divided, then rounded by format_bytes to 2 decimals (1000MB / 3 is
        # 317.89MiB, 690 bytes below the quotient)
        share = format_bytes(dask_parse_bytes(memory) / max(int(processes), 1))
        limit = dask_parse_bytes(share.replace(" ", ""))
    except ValueError:
        return None, None
    threads = max(int(cores) // max(int(processes), 1), 1)
    spelled = f"--memory {memory} with {processes} worker process(es) of {threads} thread(s)"
    return (limit, threads), spelled


def start_slurm_cluster(
    *,
    queue=None,
    cores=None,
    memory=None,
    walltime=None,
    jobs=1,
    job_extra=(),
    processes=None,
    scheduler_host=None,
    min_workers=1,
    timeout=WORKER_WAIT,
    lost_worker_timeout=LOST_WORKER_TIMEOUT,
    on_wait=None,
    **kw,
):
    """Start dask workers as SLURM jobs (``dask_jobqueue.SLURMCluster``) and connect.

    Each SLURM job runs ``processes`` dask worker processes sharing ``cores``
    cores and ``memory``. The scheduler runs in this process. Anything not passed
    here (or passed as ``None``) comes from your dask-jobqueue configuration
    (``jobqueue.slurm`` in ``~/.config/dask/jobqueue.yaml``, or the folder
    ``DASK_CONFIG`` names): cores, memory, walltime, the account, the network
    interface, a job script prologue, ...

    Before any job is queued the job script is checked with ``sbatch
    --test-only``, so an unknown partition or more memory than any node has
    fails at once. Then the function waits for ``min_workers`` workers instead
    of returning a client that might never get any.

    Parameters
    ----------
    queue : str, optional
        SLURM partition (``#SBATCH -p``); default: the configuration's, else
        SLURM's default partition.
    cores : int, optional
        Cores per job (``--cpus-per-task``), shared by its worker processes;
        default: the configuration's ``cores`` (required there if not here).
    memory : str, optional
        Memory per job (``--mem``), shared by its worker processes, e.g.
        ``"4GB"``; default: the configuration's ``memory`` (required there if
        not here).
    walltime : str, optional
        Time limit per job (``-t``), ``HH:MM:SS``; default: the configuration's
        (dask-jobqueue ships ``00:30:00``).
    jobs : int, default 1
        Number of jobs to submit.
    job_extra : sequence of str, default ()
        Extra ``#SBATCH`` directives, e.g. ``["--account=abc", "--qos=short"]``;
        appended to the configuration's ``job-extra-directives``.
    processes : int, optional
        Worker processes per job; default: the configuration's, else
        dask-jobqueue's choice from ``cores``.
    scheduler_host : str, optional
        Address the scheduler listens on and the workers connect to, e.g. the
        login node's address on the cluster network (``"127.0.0.1"`` when the
        jobs run on this machine).
    min_workers : int, default 1
        Workers to wait for before returning; 0 (or ``jobs=0``) returns at once.
    timeout : float, default 3600
        Seconds to wait for ``min_workers`` workers: a job may pend that long
        in a busy queue.
    lost_worker_timeout : float, default 60
        During a run (``compute_background(..., scheduler=client)``): when no
        worker is left, stop as soon as SLURM says their jobs have ended (the
        walltime, ``scancel``, a failed node), and at the latest after this
        many seconds without a worker (SLURM cannot be asked, or a job runs but
        its worker does not come back). The error, :class:`SlurmJobLost`,
        names each job with its SLURM state and reason. Also how long no block
        may finish while every worker is paused for memory
        (:class:`WorkersPaused`).
    on_wait : callable, optional
        Called with one line (the jobs' states and reasons, the time waited)
        once a minute (sooner for a ``timeout`` under 10 minutes) while no
        worker has joined yet.
    **kw
        Passed on to ``dask_jobqueue.SLURMCluster`` (``account``,
        ``log_directory``, ``job_script_prologue``, ``interface``, ...).
        ``scheduler_options`` is merged with the configuration's. Without a
        ``log_directory`` (argument or configuration) the jobs' logs go to a
        new temporary directory, not to the current one: error messages name
        it, and :func:`close_client` removes it unless the run failed (an
        interrupt is no failure).
        ``python`` defaults to this interpreter, ``sys.executable``.

    Returns
    -------
    distributed.Client
        Connected to the scheduler, with at least ``min_workers`` workers;
        ``client.cluster`` is the ``SLURMCluster``. Close both, and cancel the
        jobs, with :func:`close_client`.

    Raises
    ------
    ImportError
        If dask-jobqueue is not installed.
    FileNotFoundError
        If ``sbatch`` is not on the ``PATH``.
    SlurmSubmitError
        If SLURM rejects the job (also a ``ValueError``); the message has
        sbatch's reason.
    ValueError
        If cores or memory per job are given neither here nor in the
        configuration.
    SlurmError
        If every job ended before its worker connected; the message has the end
        of the job's log.
    SlurmWorkerTimeout
        If fewer than ``min_workers`` workers connected within ``timeout``
        seconds (also a ``SlurmError`` and a ``TimeoutError``); the message
        has the jobs' states and SLURM's reasons, e.g. ``PENDING (reason
        Resources)``, or says that ``squeue`` failed. The jobs are cancelled.

    Examples
    --------
    .. code-block:: python

        from rollmed_dask.cluster import start_slurm_cluster, close_client
        client = start_slurm_cluster(
            queue="debug", cores=4, memory="16GB", walltime="02:00:00", jobs=8,
            job_extra=["--account=myproject"],
        )
        client.submit(sum, [1, 2, 3]).result()
        # 6
        close_client(client)

    On a single machine running SLURM (``scripts/local-slurm.sh``):

    .. code-block:: python

        client = start_slurm_cluster(memory="1GB", scheduler_host="127.0.0.1")
    """
    jq = _import_jobqueue()
    import dask
    from distributed import Client

    if shutil.which("sbatch") is None:
        raise FileNotFoundError(
            "sbatch is not on the PATH: start_slurm_cluster must run where SLURM jobs "
            "can be submitted (a login node); for a test setup on one machine run "
            "`sudo bash scripts/local-slurm.sh start`"
        )
    if int(jobs) < 0:
        raise ValueError(f"jobs={jobs!r}: cannot be negative")

    def config(key):
        return dask.config.get(f"jobqueue.slurm.{key}", None)

    options = dict(queue=queue, cores=cores, memory=memory, walltime=walltime,
                   processes=processes)  # fmt: skip
    options = {k: v for k, v in options.items() if v is not None}
    for key, flag in (("cores", "--cores"), ("memory", "--memory")):
        if key not in options and config(key) is None:
            raise ValueError(
                f"{key} per SLURM job is not set: pass {key}=... (CLI {flag}), or set "
                f"jobqueue.slurm.{key} in your dask configuration (~/.config/dask/jobqueue.yaml)"
            )
    if "python" not in kw and config("python") is None:
        kw["python"] = sys.executable
    temp_log_dir = None
    if kw.get("log_directory") is None and config("log-directory") is None:
        temp_log_dir = kw["log_directory"] = tempfile.mkdtemp(prefix="rollmed-dask-slurm-")
    log_dir = kw.get("log_directory") or config("log-directory")
    directives = kw.pop("job_extra_directives", None)
    if directives is None:
        directives = config("job-extra-directives") or []
    directives = list(directives) + list(job_extra or ())
    if directives:
        kw["job_extra_directives"] = directives
    scheduler_options = dict(config("scheduler-options") or {})
    scheduler_options.update(kw.pop("scheduler_options", None) or {})
    # the default ":8787" warns (or fails) when the port is taken
    scheduler_options.setdefault("dashboard_address", ":0")
    if scheduler_host is not None:
        scheduler_options["host"] = scheduler_host
    kw["scheduler_options"] = scheduler_options

    try:
        cluster = jq.SLURMCluster(**options, **kw)
    except BaseException:
        _remove_log_dir(temp_log_dir)
        raise
    # read by close_client and by lost_worker_watch
    cluster.rollmed_slurm = _SlurmRun(log_dir, temp_log_dir, float(lost_worker_timeout))
    client = None
    try:
        _check_submission(cluster.job_script())
        client = Client(cluster)
        if jobs:
            cluster.scale(jobs=int(jobs))
        if min_workers and jobs:
            _wait_for_workers(client, cluster, int(min_workers), float(timeout), log_dir, on_wait)
        return client
    except BaseException as exc:
        # the errors that name the log folder keep it; sbatch's refusal (no job
        # ran) and an interrupt do not
        keep = isinstance(exc, SlurmError) and not isinstance(exc, SlurmSubmitError)
        _close(client, cluster, keep_logs=keep)
        raise


class _SlurmRun:
    """What ``start_slurm_cluster`` remembers about its cluster."""

    def __init__(self, log_dir, temp_log_dir, lost_worker_timeout):
        self.log_dir = log_dir
        self.temp_log_dir = temp_log_dir  # made by us: removed unless a run failed
        self.lost_worker_timeout = lost_worker_timeout
        self.job_ids: set[str] = set()  # every job ever started, lost ones too
        self.lost = False  # a run lost its workers: keep the logs


def close_client(client, timeout=30, keep_logs=False) -> None:
    """Close a client from :func:`start_local_cluster` or :func:`start_slurm_cluster`.

    Closes the client, then the cluster it was connected to: local worker
    processes stop, SLURM jobs are cancelled (``scancel``). The temporary log
    directory :func:`start_slurm_cluster` made (when given no
    ``log_directory``) is removed, unless ``keep_logs`` or a job was lost.
    Calling it twice is harmless.

    Parameters
    ----------
    client : distributed.Client
        The client to close.
    timeout : float, default 30
        Seconds to wait for the client to close.
    keep_logs : bool, default False
        Keep the temporary log directory of the SLURM jobs, e.g. after a
        failed run. A ``log_directory`` you chose is always kept.

    Examples
    --------
    .. code-block:: python

        client = start_local_cluster(1)
        close_client(client)
        client.status
        # 'closed'
    """
    _close(client, getattr(client, "cluster", None), timeout=timeout, keep_logs=keep_logs)


def _close(client, cluster, timeout=30, keep_logs=False) -> None:
    # Ctrl-C or SIGTERM pressed again while closing must not leave a job
    # running or the temporary log folder behind: they wait until the end
    from .sinks import pause_point

    with _signals_deferred():
        pause_point("cluster-closing")  # test hook: a signal while the cluster closes
        run = getattr(cluster, "rollmed_slurm", None)
        if run is not None:
            # first, and bounded: dask-jobqueue's own scancel has no timeout and
            # hides its failure
            _cancel_jobs(cluster, run)
        try:
            if client is not None:
                client.close(timeout=timeout)
        finally:
            if cluster is not None:
                cluster.close(timeout=timeout)
                if run is not None and run.temp_log_dir is not None:
                    # an empty folder (no job ever ran) is worth nothing to keep
                    kept = keep_logs or run.lost
                    if not kept or not _has_files(run.temp_log_dir):
                        _remove_log_dir(run.temp_log_dir)
                        run.temp_log_dir = None


def _cancel_jobs(cluster, run) -> None:
    """``scancel`` every job of the cluster, with a timeout; a failure is said on
    stderr (the jobs may still hold their nodes), never silent."""
    job_ids = sorted(set(_job_ids(cluster)), key=lambda j: (len(j), j))
    if not job_ids:
        return
    limit = _slurm_command_timeout(run.lost_worker_timeout)
    try:
        proc = subprocess.run(
            ["scancel", *job_ids], capture_output=True, text=True, timeout=limit
        )  # fmt: skip
        failed = "" if proc.returncode == 0 else " ".join((proc.stderr + proc.stdout).split())
        failed = failed if proc.returncode == 0 else failed or f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        failed = f"no answer within {limit:g} s"
    except OSError as exc:
        failed = " ".join(str(exc).split())
    if failed:
        print(
            f"rollmed-dask: warning: scancel {' '.join(job_ids)} failed ({failed}): check "
            "with `squeue --me` and cancel what is left yourself",
            file=sys.stderr,
        )
    # done (or failed) here: dask-jobqueue's own scancel would only repeat it
    for job in cluster.workers.values():
        if getattr(job, "job_id", None):
            job.cancel_command = "true"


class _signals_deferred:
    """Hold SIGINT and SIGTERM while the body runs (main thread only); a signal
    that came meanwhile is delivered once the body is done (if ``deliver``, the
    body raised nothing and the program is not already ending for an exception:
    a Ctrl-C pressed while a SIGTERM's cleanup closes the cluster must not turn
    exit 143 into 130)."""

    def __init__(self, deliver: bool = True):
        self.deliver = deliver

    def __enter__(self):
        self.pending = []
        self.previous = {}
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, lambda num, frame: self.pending.append(num))
        return self

    def __exit__(self, exc_type, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        # sys.exc_info(): the exception this body runs in the cleanup of, if any
        ending = exc_type is not None or sys.exc_info()[1] is not None
        if self.pending and self.deliver and not ending:
            # already ending for a reason: the held signal need not be raised again
            signal.raise_signal(self.pending[0])
        return False


def _has_files(path) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


def _remove_log_dir(path) -> None:
    if path is None:
        return
    # a cancelled job's slurmstepd may still be closing its log file: try again
    for _ in range(10):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            return
        time.sleep(0.2)


def _check_submission(script: str) -> None:
    """Ask sbatch whether it would accept ``script``, without queueing it."""
    try:
        proc = subprocess.run(
            ["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(
            "sbatch --test-only did not answer within 60 s: is slurmctld reachable? (try `sinfo`)"
        ) from exc
    if proc.returncode != 0:
        said = "\n".join(
            line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()
        )  # fmt: skip
        raise SlurmSubmitError(
            f"SLURM rejects the worker job: {said or f'sbatch exit code {proc.returncode}'}\n"
            "check the queue/partition, cores, memory and walltime against `sinfo -N -l`; "
            f"the job script was:\n{_header(script)}"
        )


def _header(script: str) -> str:
    return "\n".join(line for line in script.splitlines() if line.startswith("#"))


def _job_ids(cluster) -> list[str]:
    ids = [str(w.job_id) for w in cluster.workers.values() if getattr(w, "job_id", None)]
    run = getattr(cluster, "rollmed_slurm", None)
    if run is not None:
        run.job_ids.update(ids)
    return ids


def _job_states(job_ids, timeout=30.0):
    """``({job id: (state, reason)}, "")`` for the jobs SLURM still knows, or
    ``(None, why)`` when SLURM cannot be asked (no squeue, squeue fails): that
    says nothing about the jobs, which may well be running."""
    if not job_ids:
        return {}, ""
    # all our jobs in any state, rather than `-j IDS`: squeue fails on ids it has
    # forgotten, and a failure must mean "cannot ask", never "the jobs died"
    cmd = ["squeue", "-h", "--states=all", "-u", getpass.getuser(), "-o", "%i|%T|%r"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return None, "squeue is not on the PATH"
    except subprocess.TimeoutExpired:
        return None, f"squeue did not answer within {timeout:g} s"
    except OSError as exc:
        return None, f"squeue failed: {' '.join(str(exc).split())}"
    if proc.returncode != 0:
        said = " ".join((proc.stderr or proc.stdout).split())
        return None, f"squeue failed (exit {proc.returncode}{': ' + said if said else ''})"
    wanted = set(job_ids)
    states = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] in wanted:
            states[parts[0]] = (parts[1], parts[2])
    return states, ""


def _accounted_states(job_ids, timeout=30.0) -> dict[str, tuple[str, str]]:
    """States from ``sacct`` (SLURM's accounting, if the site keeps it) of jobs
    that squeue has forgotten; {} where there is no accounting."""
    if not job_ids:
        return {}
    cmd = ["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobIDRaw,State,Reason"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] in job_ids:
            states[parts[0]] = (parts[1].split()[0], parts[2])  # "CANCELLED by 0"
    return states


def _describe_jobs(job_ids, states) -> str:
    """What became of the SLURM jobs, for the error when no worker came."""
    if not job_ids:
        return "no job was submitted (sbatch failed: see the log above)"
    described = []
    for job_id in job_ids:
        state, reason = states.get(job_id, ("gone from the queue", ""))
        if reason and reason != "None":
            described.append(f"job {job_id} state is {state} (reason {reason})")
        else:
            described.append(f"job {job_id} state is {state}")
    return "; ".join(described)


def _log_tail(log_dir, job_ids, lines=1) -> str:
    """The last non-empty line of each job's log, with the log's path, on one line."""
    import glob

    if not log_dir:
        return ""
    found = []
    for job_id in job_ids:
        for path in sorted(glob.glob(os.path.join(log_dir, f"*-{job_id}.*"))):
            with open(path, errors="replace") as f:
                tail = [line.strip() for line in f.read().splitlines() if line.strip()]
            if tail:
                found.append(f"{' | '.join(tail[-lines:])!r} ({path})")
    return "; ".join(found)


def _wait_for_workers(client, cluster, n: int, timeout: float, log_dir, on_wait=None) -> None:
    started = time.monotonic()
    deadline = started + timeout
    next_check = started + 2.0
    # a line each minute; sooner for a short wait, so that one comes at all
    report_every = min(60.0, max(5.0, timeout / 10))
    next_report = started + report_every
    seen_ids: list[str] = []
    while True:
        if len(client.nthreads()) >= n:
            return
        now = time.monotonic()
        if now >= deadline:
            break
        if now >= next_check:
            next_check = now + 2.0
            seen_ids = _job_ids(cluster)
            states, _ = _job_states(seen_ids, _slurm_command_timeout(timeout))
            ended = states is not None and not any(
                states.get(j, ("",))[0] in _ACTIVE_STATES for j in seen_ids
            )
            if seen_ids and ended and len(client.nthreads()) < n:
                # every job has left the queue and too few workers came: they died
                missing = [j for j in seen_ids if j not in states]
                states.update(_accounted_states(missing))
                described = "; ".join(_job_line(j, states.get(j)) for j in seen_ids)
                log = _log_tail(log_dir, seen_ids, lines=1)
                raise SlurmError(
                    f"{described}; it ended before its dask worker joined the scheduler"
                    + (f"; the end of its log: {log}" if log else "")
                )
            if on_wait is not None and now >= next_report and states is not None:
                next_report = now + report_every
                described = "; ".join(_job_line(j, states.get(j)) for j in seen_ids)
                on_wait(
                    f"waiting for the first dask worker for {now - started:.0f} s of "
                    f"{timeout:g} (--worker-wait): {described}"
                )
        time.sleep(0.25)
    job_ids = _job_ids(cluster)
    states, problem = _job_states(job_ids, _slurm_command_timeout(timeout))
    # a job that never ran wrote no log: an empty temporary folder is removed
    logs = f" (their logs: {log_dir})" if log_dir and _has_files(log_dir) else ""
    jobs = (
        f"cannot ask SLURM about job(s) {', '.join(job_ids)}: {problem}"
        if states is None
        else _describe_jobs(job_ids, states)
    )
    raise SlurmWorkerTimeout(
        f"no SLURM worker started within {timeout:g} s: {jobs}; the jobs were cancelled"
        f"{logs}; wait longer (--worker-wait, timeout=), or check the queue with `squeue` "
        "and what you asked for (partition, memory, walltime) against `sinfo -N -l`"
    )


# hints for the states a lost job ends in
_STATE_HINTS = {
    "TIMEOUT": "it reached its walltime: ask for more (--walltime)",
    "CANCELLED": "it was cancelled (scancel, or an administrator)",
    "OUT_OF_MEMORY": "it ran out of memory: ask for more (--memory)",
    "NODE_FAIL": "its node failed",
    "PREEMPTED": "it was preempted by another job",
    "DEADLINE": "it reached its deadline",
}


def _job_line(job_id, state_reason) -> str:
    if state_reason is None:
        return f"SLURM job {job_id} has ended (SLURM no longer knows its state)"
    state, reason = state_reason
    why = f", reason {reason}" if reason and reason != "None" else ""
    hint = _STATE_HINTS.get(state)
    return f"SLURM job {job_id} is {state}{why}" + (f": {hint}" if hint else "")


def _configured_timeout() -> float:
    import dask

    return float(dask.config.get("rollmed-dask.lost-worker-timeout", LOST_WORKER_TIMEOUT))


def _adopt_jobqueue_cluster(cluster):
    """A user's own dask-jobqueue SLURM cluster gets the SLURM-aware watch too:
    after ``scancel`` of its jobs a run stops with their state, not never."""
    if type(cluster).__name__ != "SLURMCluster" or not hasattr(cluster, "workers"):
        return None
    run = _SlurmRun(None, None, _configured_timeout())
    try:
        cluster.rollmed_slurm = run
    except AttributeError:
        return None
    return run


def run_watch(client):
    """A check for a run on any distributed ``client`` that raises once the run
    can no longer make progress: :class:`SlurmJobLost` when its SLURM workers are
    gone (see :func:`lost_worker_watch`), :class:`WorkersPaused` when no block
    finished for the timeout while every worker is paused for memory, and
    :class:`RunStalled` when there has been no worker, or no answer from the
    scheduler, for that long.

    Call the check often (it asks at most every 2 s) and its ``progress()``
    whenever a block finishes. The timeout is the cluster's
    ``lost_worker_timeout`` (:func:`start_slurm_cluster`), else the dask config
    key ``rollmed-dask.lost-worker-timeout`` (default 60 s).
    """
    # a user's own dask-jobqueue cluster: its import made Ctrl-C exit with status 0
    _undo_jobqueue_sigint()
    cluster = getattr(client, "cluster", None)
    run = getattr(cluster, "rollmed_slurm", None) or _adopt_jobqueue_cluster(cluster)
    timeout = run.lost_worker_timeout if run is not None else _configured_timeout()
    return _RunWatch(client, timeout, lost_worker_watch(client))


class _RunWatch:
    PERIOD = 2.0

    def __init__(self, client, timeout: float, slurm):
        self.client, self.timeout, self.slurm = client, timeout, slurm
        self.last_progress = time.monotonic()
        self.next_check = self.last_progress + self.PERIOD

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + self.PERIOD
        if self.slurm is not None:
            self.slurm()
        stalled = now - self.last_progress
        if stalled < self.timeout:
            return
        address = getattr(self.client.scheduler, "address", "?")
        if self.client.status != "running":
            raise RunStalled(
                f"the dask scheduler at {address} has not been reachable for {stalled:.0f} s "
                f"(client {self.client.status}) and no block finished, so the run stopped"
            )
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        if not workers and self.slurm is None:
            raise RunStalled(
                f"no block finished for {stalled:.0f} s and the dask scheduler at {address} "
                "has no worker, so the run stopped; start workers for it (`dask worker "
                f"{address}`), or use --workers N / --slurm"
            )
        paused = [(a, w) for a, w in workers.items() if w.get("status") == "paused"]
        if workers and len(paused) == len(workers):
            raise WorkersPaused(_paused_line(paused, stalled))


def _paused_line(paused, stalled: float) -> str:
    from dask.utils import format_bytes

    def use(worker):
        limit = worker.get("memory_limit") or 0
        return worker.get("metrics", {}).get("memory", 0), limit

    address, worker = max(paused, key=lambda aw: use(aw[1])[0])
    memory, limit = use(worker)
    which = "the dask worker" if len(paused) == 1 else f"each of the {len(paused)} dask workers"
    return (
        f"no block finished for {stalled:.0f} s: {which} is paused for memory ({address} "
        f"uses {format_bytes(memory)} of its {format_bytes(limit)} limit; dask pauses a "
        "worker at 80 %), so the run stopped; give each worker more memory (--memory, "
        "or the cluster's memory_limit) or plan smaller blocks (a smaller --memory-budget)"
    )


def lost_worker_watch(client):
    """A check for a run on ``client`` that raises :class:`SlurmJobLost` once all
    its workers are gone for good, or None if ``client`` has no SLURM cluster
    from :func:`start_slurm_cluster` (or a user's own ``SLURMCluster``, once
    :func:`run_watch` has seen it).

    Call the check often (it asks the scheduler and SLURM at most every 2 s).
    With no worker left it raises at once when SLURM says every job has ended,
    and after ``lost_worker_timeout`` seconds without a worker otherwise (SLURM
    cannot be asked; a job runs, or pends, but no worker joins).
    """
    cluster = getattr(client, "cluster", None)
    run = getattr(cluster, "rollmed_slurm", None)
    if run is None:
        return None
    _job_ids(cluster)
    return _LostWorkerWatch(client, cluster, run)


class _LostWorkerWatch:
    PERIOD = 2.0

    def __init__(self, client, cluster, run):
        self.client, self.cluster, self.run = client, cluster, run
        self.next_check = time.monotonic() + self.PERIOD
        self.no_worker_since = None

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + self.PERIOD
        _job_ids(self.cluster)
        if self.client.nthreads():
            self.no_worker_since = None
            return
        if self.no_worker_since is None:
            self.no_worker_since = now
        job_ids = sorted(self.run.job_ids, key=lambda j: (len(j), j))
        timeout = self.run.lost_worker_timeout
        # bounded: with slurmctld down squeue takes 9 s to fail, and the run
        # must still stop near its timeout
        states, problem = _job_states(job_ids, _slurm_command_timeout(timeout))
        waited = time.monotonic() - self.no_worker_since
        if states is None:
            if waited >= timeout:
                self._lost(
                    f"no dask worker for {waited:.0f} s, and SLURM cannot be asked about "
                    f"job(s) {', '.join(job_ids)} ({problem}), so the run stopped"
                )
            return
        active = [j for j in job_ids if states.get(j, ("",))[0] in _ACTIVE_STATES]
        if active and waited < timeout:
            return
        missing = [j for j in job_ids if j not in states]
        states.update(_accounted_states(missing, _slurm_command_timeout(timeout)))
        described = "; ".join(_job_line(j, states.get(j)) for j in job_ids)
        if active:
            self._lost(f"no dask worker joined for {waited:.0f} s: {described}")
        self._lost(f"{described}; no dask worker is left to finish the run")

    def _lost(self, message: str):
        self.run.lost = True
        logs = self.run.log_dir
        raise SlurmJobLost(message + (f" (job logs: {logs})" if logs else ""))
