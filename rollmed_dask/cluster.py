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
    "SlurmError",
    "SlurmJobLost",
    "SlurmSubmitError",
    "close_client",
    "start_local_cluster",
    "start_slurm_cluster",
]

HPC_HINT = 'install it with: pip install "rollmed-dask[hpc]"'


class SlurmError(RuntimeError):
    """A SLURM job for a dask worker failed before its worker joined the cluster."""


class SlurmSubmitError(SlurmError, ValueError):
    """``sbatch`` rejected the worker job (unknown partition, too much memory, ...)."""


class SlurmJobLost(SlurmError):
    """Every dask worker of a run is gone: its SLURM jobs ended (walltime, scancel, a
    failed node, ...) or SLURM cannot be asked and no worker came back in time."""


#: Seconds a run may go on without any dask worker before it stops (default).
LOST_WORKER_TIMEOUT = 60.0

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
    timeout=300.0,
    lost_worker_timeout=LOST_WORKER_TIMEOUT,
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
    timeout : float, default 300
        Seconds to wait for ``min_workers`` workers.
    lost_worker_timeout : float, default 60
        During a run (``compute_background(..., scheduler=client)``): when no
        worker is left, stop as soon as SLURM says their jobs have ended (the
        walltime, ``scancel``, a failed node), and at the latest after this
        many seconds without a worker (SLURM cannot be asked, or a job runs but
        its worker does not come back). The error, :class:`SlurmJobLost`,
        names each job with its SLURM state and reason.
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
    TimeoutError
        If fewer than ``min_workers`` workers connected within ``timeout``
        seconds; the message has the jobs' states and SLURM's reasons, e.g.
        ``PENDING (reason Resources)``, or says that ``squeue`` failed. The
        jobs are cancelled.

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
            _wait_for_workers(client, cluster, int(min_workers), float(timeout), log_dir)
        return client
    except BaseException as exc:
        # the errors that name the log folder keep it; sbatch's refusal (no job
        # ran) and an interrupt do not
        keep = isinstance(exc, (SlurmError, TimeoutError)) and not isinstance(
            exc, SlurmSubmitError
        )
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
    try:
        if client is not None:
            client.close(timeout=timeout)
    finally:
        if cluster is not None:
            cluster.close()
            run = getattr(cluster, "rollmed_slurm", None)
            if run is not None and run.temp_log_dir is not None:
                # an empty folder (no job ever ran) is worth nothing to keep
                kept = keep_logs or run.lost
                if not kept or not _has_files(run.temp_log_dir):
                    _remove_log_dir(run.temp_log_dir)
                    run.temp_log_dir = None


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


def _job_states(job_ids):
    """``({job id: (state, reason)}, "")`` for the jobs SLURM still knows, or
    ``(None, why)`` when SLURM cannot be asked (no squeue, squeue fails): that
    says nothing about the jobs, which may well be running."""
    if not job_ids:
        return {}, ""
    # all our jobs in any state, rather than `-j IDS`: squeue fails on ids it has
    # forgotten, and a failure must mean "cannot ask", never "the jobs died"
    cmd = ["squeue", "-h", "--states=all", "-u", getpass.getuser(), "-o", "%i|%T|%r"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return None, "squeue is not on the PATH"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"squeue failed: {exc}"
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


def _accounted_states(job_ids) -> dict[str, tuple[str, str]]:
    """States from ``sacct`` (SLURM's accounting, if the site keeps it) of jobs
    that squeue has forgotten; {} where there is no accounting."""
    if not job_ids:
        return {}
    cmd = ["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobIDRaw,State,Reason"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
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


def _log_tail(log_dir, job_ids, lines=20) -> str:
    import glob

    if not log_dir:
        return ""
    found = []
    for job_id in job_ids:
        for path in sorted(glob.glob(os.path.join(log_dir, f"*-{job_id}.*"))):
            with open(path, errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
            if tail:
                found.append(f"--- {path} ---\n" + "\n".join(tail))
    return "\n".join(found)


def _wait_for_workers(client, cluster, n: int, timeout: float, log_dir) -> None:
    deadline = time.monotonic() + timeout
    next_check = time.monotonic() + 2.0
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
            states, _ = _job_states(seen_ids)
            ended = states is not None and not any(
                states.get(j, ("",))[0] in _ACTIVE_STATES for j in seen_ids
            )
            if seen_ids and ended and len(client.nthreads()) < n:
                # every job has left the queue and too few workers came: they died
                log = _log_tail(log_dir, seen_ids)
                raise SlurmError(
                    f"the SLURM job(s) {', '.join(seen_ids)} ended before their dask worker "
                    "joined the scheduler (is the same Python with distributed on the "
                    "compute nodes? can they reach the scheduler's address? pass "
                    "scheduler_host=...)" + (f"\n{log}" if log else "")
                )
        time.sleep(0.25)
    job_ids = _job_ids(cluster)
    states, problem = _job_states(job_ids)
    # a job that never ran wrote no log: an empty temporary folder is removed
    logs = f" (their logs: {log_dir})" if log_dir and _has_files(log_dir) else ""
    jobs = (
        f"cannot ask SLURM about job(s) {', '.join(job_ids)}: {problem}"
        if states is None
        else _describe_jobs(job_ids, states)
    )
    raise TimeoutError(
        f"no SLURM worker started within {timeout:g} s: {jobs} — "
        "check the queue/partition/memory/walltime you asked for against `sinfo -N -l` "
        f"and the queue with `squeue`; the jobs were cancelled{logs}. "
        "Job script:\n"
        f"{_header(cluster.job_script())}"
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


def lost_worker_watch(client):
    """A check for a run on ``client`` that raises :class:`SlurmJobLost` once all
    its workers are gone for good, or None if ``client`` has no SLURM cluster
    from :func:`start_slurm_cluster`.

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
        states, problem = _job_states(job_ids)
        waited = now - self.no_worker_since
        timeout = self.run.lost_worker_timeout
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
        states.update(_accounted_states(missing))
        described = "; ".join(self._job_line(j, states.get(j)) for j in job_ids)
        if active:
            self._lost(f"no dask worker joined for {waited:.0f} s: {described}")
        self._lost(f"{described}; no dask worker is left to finish the run")

    @staticmethod
    def _job_line(job_id, state_reason) -> str:
        if state_reason is None:
            return f"SLURM job {job_id} has ended (SLURM no longer knows its state)"
        state, reason = state_reason
        why = f", reason {reason}" if reason and reason != "None" else ""
        hint = _STATE_HINTS.get(state)
        return f"SLURM job {job_id} is {state}{why}" + (f": {hint}" if hint else "")

    def _lost(self, message: str):
        self.run.lost = True
        logs = self.run.log_dir
        raise SlurmJobLost(message + (f" (job logs: {logs})" if logs else ""))
