"""Coverage in the processes the tests start (the CLI, process pools), for the
mutation run's trace only: this folder is on their path only then.

Each process records its lines under the test that started it
(``ROLLMED_MUTATION_TEST``, set by ``contexts.py``).
"""

import os

if os.environ.get("COVERAGE_PROCESS_START"):
    import coverage

    # coverage's own .pth may have started it already
    _cov = coverage.process_startup() or coverage.Coverage.current()
    _test = os.environ.get("ROLLMED_MUTATION_TEST")
    if _cov is not None and _test:
        _cov.switch_context(_test)
