"""dcnum's whole pipeline on one input, in a process of its own.

Used by ``tests/test_dcnum_pipeline.py``. dcnum's runner starts ``spawn``
worker processes that are not daemons: if one of them hangs, a runner inside
pytest would keep pytest from exiting after its last test (Python joins such
children at exit), and the test run would never end. In a process of its own,
a hung pipeline is killed with its workers, and the test says so.

SIGUSR1 prints every thread's stack to stderr, in this process and in each
worker (spawn imports this module in every worker): the test sends it to the
whole process group before it kills a hung pipeline.

Usage: python tests/dcnum_pipeline_job.py INPUT OUTPUT STRATEGY KERNEL_SIZE BATCH_SIZE
"""

import faulthandler
import pathlib
import signal
import sys

faulthandler.register(signal.SIGUSR1, all_threads=True)


def main(path_in: str, path_out: str, strategy: str, kernel_size: str, batch_size: str) -> None:
    import dcnum.logic

    job = dcnum.logic.DCNumPipelineJob(
        path_in=pathlib.Path(path_in).resolve(),
        path_out=pathlib.Path(path_out).resolve(),
        background_code="rollmed",
        background_kwargs={"kernel_size": int(kernel_size), "batch_size": int(batch_size)},
        basin_strategy=strategy,
        num_procs=1,
    )
    with dcnum.logic.DCNumJobRunner(job) as runner:
        runner.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
