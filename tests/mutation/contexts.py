"""A pytest plugin for the mutation run: each test is its own coverage context.

coverage's own ``dynamic_context = test_function`` finds the test by walking
up the calling frames, so lines run by dask's worker threads, the image copy
and the write-behind thread belong to no test. Switching the context around
each test covers every thread of the process; processes the test starts
record theirs under its name too (``startup/sitecustomize.py``).
"""

import os

import coverage
import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cov = coverage.Coverage.current()
    if cov is not None:
        cov.switch_context(item.nodeid)
    os.environ["ROLLMED_MUTATION_TEST"] = item.nodeid  # for the processes it starts
    yield
    os.environ.pop("ROLLMED_MUTATION_TEST", None)
    if cov is not None:
        cov.switch_context("")
