"""A long-lived Python process (a notebook's kernel) whose Zarr run gets Ctrl-C.

Used by ``tests/test_interrupt_in_session.py``. The run stops while a block is
about to be written (the test hook ``zarr-opened``: that block goes on once
``<hook>/zarr-opened.go`` exists, 1 s after the Ctrl-C). The process then
lives on for 3 s, as a notebook does, and prints what the output's folder
holds: a temporary that a block wrote after it was removed would be there
until the process exits.

Usage: python tests/interrupted_in_session.py threads|cluster INPUT OUTPUT HOOK
"""

import json
import os
import pathlib
import signal
import sys
import threading
import time


def press_ctrl_c_when_paused(hook: pathlib.Path) -> None:
    here = hook / "zarr-opened.here"
    deadline = time.monotonic() + 120
    while not here.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C in a terminal or a notebook
    time.sleep(1.0)
    (hook / "zarr-opened.go").touch()  # the paused block goes on and writes


def main(route: str, source: str, output: str, hook: str) -> None:
    hook = pathlib.Path(hook)
    # before the workers start: they inherit it
    os.environ["ROLLMED_DASK_TEST_PAUSE_AT"] = f"zarr-opened:{hook}"
    from rollmed_dask import compute_background

    client = cluster = None
    scheduler = "threads"
    if route == "cluster":
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                               dashboard_address=None)  # fmt: skip
        client = scheduler = Client(cluster)
    threading.Thread(target=press_ctrl_c_when_paused, args=(hook,), daemon=True).start()
    outcome = "finished"
    try:
        compute_background(source, output, 5, scheduler=scheduler, progress=False,
                           event_chunk=20)  # fmt: skip
    except KeyboardInterrupt as exc:
        outcome = "interrupted"
        # kept, as IPython keeps the last traceback (sys.last_traceback): its frames
        # hold the run's futures, which must not keep its blocks running
        sys.last_traceback = exc.__traceback__
    time.sleep(3.0)  # the session goes on
    left = sorted(os.listdir(pathlib.Path(output).parent))
    print(json.dumps({"outcome": outcome, "left": left}), flush=True)
    if client is not None:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
