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

import shutil
import subprocess
import sys
import tempfile
import time

__all__ = [
    "SlurmError",
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


def _import_jobqueue():
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ImportError(
            "starting workers on SLURM needs dask-jobqueue, which is not installed; " + HPC_HINT
        ) from exc
    return dask_jobqueue


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
    cores=1,
    memory="2GB",
    walltime="00:30:00",
    jobs=1,
    job_extra=(),
    processes=1,
    scheduler_host=None,
    min_workers=1,
    timeout=300.0,
    **kw,
):
    """Start dask workers as SLURM jobs (``dask_jobqueue.SLURMCluster``) and connect.

    Each SLURM job runs ``processes`` dask worker processes sharing ``cores``
    cores and ``memory``. The scheduler runs in this process. Anything not passed
    here comes from your dask-jobqueue configuration (``jobqueue.slurm`` in
    ``~/.config/dask/jobqueue.yaml``): the account, the network interface, a
    job script prologue, ... Pass ``None`` for ``cores``, ``memory``,
    ``walltime`` or ``processes`` to take those from the configuration too.

    Before any job is queued the job script is checked with ``sbatch
    --test-only``, so an unknown partition or more memory than any node has
    fails at once. Then the function waits for ``min_workers`` workers instead
    of returning a client that might never get any.

    Parameters
    ----------
    queue : str, optional
        SLURM partition (``#SBATCH -p``); default: the configuration's, else
        SLURM's default partition.
    cores : int, default 1
        Cores per job (``--cpus-per-task``), shared by its worker processes.
    memory : str, default "2GB"
        Memory per job (``--mem``), shared by its worker processes.
    walltime : str, default "00:30:00"
        Time limit per job (``-t``), ``HH:MM:SS``.
    jobs : int, default 1
        Number of jobs to submit.
    job_extra : sequence of str, default ()
        Extra ``#SBATCH`` directives, e.g. ``["--account=abc", "--qos=short"]``;
        appended to the configuration's ``job-extra-directives``.
    processes : int, default 1
        Worker processes per job.
    scheduler_host : str, optional
        Address the scheduler listens on and the workers connect to, e.g. the
        login node's address on the cluster network (``"127.0.0.1"`` when the
        jobs run on this machine).
    min_workers : int, default 1
        Workers to wait for before returning; 0 (or ``jobs=0``) returns at once.
    timeout : float, default 300
        Seconds to wait for ``min_workers`` workers.
    **kw
        Passed on to ``dask_jobqueue.SLURMCluster`` (``account``,
        ``log_directory``, ``job_script_prologue``, ``interface``, ...).
        ``scheduler_options`` is merged with the configuration's. Without a
        ``log_directory`` (argument or configuration) the jobs' logs go to a
        new temporary directory, not to the current one; error messages name
        it. ``python`` defaults to this interpreter, ``sys.executable``.

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
    SlurmError
        If every job ended before its worker connected; the message has the end
        of the job's log.
    TimeoutError
        If fewer than ``min_workers`` workers connected within ``timeout``
        seconds; the message has the jobs' states and SLURM's reasons, e.g.
        ``PENDING (reason Resources)``. The jobs are cancelled.

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
    if "python" not in kw and config("python") is None:
        kw["python"] = sys.executable
    if "log_directory" not in kw and config("log-directory") is None:
        kw["log_directory"] = tempfile.mkdtemp(prefix="rollmed-dask-slurm-")
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

    cluster = jq.SLURMCluster(**options, **kw)
    client = None
    try:
        _check_submission(cluster.job_script())
        client = Client(cluster)
        if jobs:
            cluster.scale(jobs=int(jobs))
        if min_workers and jobs:
            _wait_for_workers(client, cluster, int(min_workers), float(timeout), log_dir)
        return client
    except BaseException:
        _close(client, cluster)
        raise


def close_client(client, timeout=30) -> None:
    """Close a client from :func:`start_local_cluster` or :func:`start_slurm_cluster`.

    Closes the client, then the cluster it was connected to: local worker
    processes stop, SLURM jobs are cancelled (``scancel``). Calling it twice
    is harmless.

    Parameters
    ----------
    client : distributed.Client
        The client to close.
    timeout : float, default 30
        Seconds to wait for the client to close.

    Examples
    --------
    .. code-block:: python

        client = start_local_cluster(1)
        close_client(client)
        client.status
        # 'closed'
    """
    _close(client, getattr(client, "cluster", None), timeout=timeout)


def _close(client, cluster, timeout=30) -> None:
    try:
        if client is not None:
            client.close(timeout=timeout)
    finally:
        if cluster is not None:
            cluster.close()


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
    return [str(w.job_id) for w in cluster.workers.values() if getattr(w, "job_id", None)]


def _job_states(job_ids) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` from squeue, for the jobs it still knows."""
    if not job_ids:
        return {}
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    return states


def _describe(job_ids, states) -> str:
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
    import os

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
            if seen_ids and not _job_states(seen_ids) and len(client.nthreads()) < n:
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
    states = _job_states(job_ids)
    raise TimeoutError(
        f"no SLURM worker started within {timeout:g} s: {_describe(job_ids, states)} — "
        "check the queue/partition/memory/walltime you asked for against `sinfo -N -l` "
        f"and the queue with `squeue`; the jobs were cancelled (their logs: {log_dir}). "
        "Job script:\n"
        f"{_header(cluster.job_script())}"
    )
