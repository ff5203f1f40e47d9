"""A pytest plugin for the mutation run: each test is its own coverage context.

coverage's own ``dynamic_context = test_function`` finds the test by walking
up the calling frames, so lines run by dask's worker threads, the image copy
and the write-behind thread belong to no test. Switching the context around
each test covers every thread of the process; processes the test starts
record theirs under its name too (``startup/sitecustomize.py``).
"""

import json
import os
import time

import coverage
import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cov = coverage.Coverage.current()
    if cov is not None:
        cov.switch_context(item.nodeid)
    os.environ["ROLLMED_MUTATION_TEST"] = item.nodeid  # for the processes it starts
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    os.environ.pop("ROLLMED_MUTATION_TEST", None)
    if cov is not None:
        cov.switch_context("")
    durations = os.environ.get("ROLLMED_MUTATION_DURATIONS")
    if durations:  # a mutant runs its tests fastest first: most are killed by the first
        with open(durations, "a") as f:
            f.write(json.dumps([item.nodeid, seconds]) + "\n")
