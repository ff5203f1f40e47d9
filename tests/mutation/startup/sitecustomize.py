"""Coverage in the processes the tests start (the CLI, process pools), for the
mutation run's trace only: this folder is on their path only then.

Each process records its lines under the test that started it
(``ROLLMED_MUTATION_TEST``, set by ``contexts.py``).
"""

import os
import sys

# a process that becomes another user (tests/cli_as_nobody.py) cannot write the
# data file: it is not traced, rather than print coverage's warning to stderr
_as_nobody = sys.argv[0].endswith("cli_as_nobody.py")
if os.environ.get("COVERAGE_PROCESS_START") and _as_nobody:
    import atexit

    import coverage

    _cov = coverage.Coverage.current()  # started by coverage's own .pth
    if _cov is not None:
        _cov.stop()
        atexit.unregister(_cov._atexit)
elif os.environ.get("COVERAGE_PROCESS_START"):
    import coverage

    # coverage's own .pth may have started it already
    _cov = coverage.process_startup() or coverage.Coverage.current()
    _test = os.environ.get("ROLLMED_MUTATION_TEST")
    if _cov is not None and _test:
        _cov.switch_context(_test)
