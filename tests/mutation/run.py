"""Mutation testing of the safety modules: does each safety line have a test?

One small, realistic bug at a time (a comparison's boundary, a condition
negated, ``and``/``or`` swapped, a call, ``raise`` or state update removed, a
number off by one, ``+``/``-`` swapped) is made in a copy of the package, and
the tests that run that line must fail. A mutant they pass is a bug the suite
would let ship: a *survivor*. The accepted ones, each with its reason, are in
``tests/MUTATION.md``.

Usage (from the repository root, with the ``mutation`` extra installed)::

    python tests/mutation/run.py                 # every module of MODULES
    python tests/mutation/run.py sinks h5chunks  # some of them
    python tests/mutation/run.py --list sinks    # the mutants only, no tests
    python tests/mutation/run.py sources --only sources.py:69 \
        --tests "tests/test_sources.py -k handle" --out /tmp/try.json   # one survivor

How it stays within about an hour on 2 cores (measured in tests/MUTATION.md):

- each module has its own test selection (``MODULES``), not the suite;
- one traced run of that selection (``coverage``, one context per test:
  ``contexts.py``) tells which tests run each line; a mutant runs only those, with ``-x``.
  Lines only run in subprocesses (the CLI tests) run the whole selection;
  lines no test runs are survivors without running anything;
- a mutant's tests run fastest first (their times come from the traced run),
  so most mutants are killed within seconds;
- ``--jobs`` workers, each in its own copy of the project under
  ``--workdir``;
- ``--resume`` keeps the killed mutants of the last run's log (the same
  file, line and edit) and runs the rest: a stopped run goes on, and
  survivors face the tests written since.

Why not mutmut or cosmic-ray: mutmut 3 (the version in the mirror) copies
only the mutated files into ``mutants/`` and runs each mutant by forking the
process that already ran the tests; here dask's thread pools do
not survive a fork, and the CLI subprocess tests import the package from a
path it does not mutate. A mutant here is a plain edit of a file in a copy,
run by a fresh pytest, so every kind of test (threads, processes, the CLI,
real files) sees it. See tests/MUTATION.md for the measurement.

The results go to ``--out`` as JSON (mutant, status, the test that killed it).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import itertools
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = "rollmed_dask"

# module -> the tests that protect it (pytest arguments, from the root).
# Kept to what exercises the module's safety lines: the full suite takes 13
# minutes, so a mutant that needed it would make the run days long.
MODULES = {
    "sinks": (
        "rollmed_dask/sinks.py",
        ["tests/test_sinks.py", "tests/test_crash_safety.py", "tests/test_safety.py",
         "tests/test_rtdc.py", "tests/test_no_data_lost.py", "tests/test_identity.py",
         "tests/test_lean_output.py::test_plain_hdf5_stack_api_cli_and_folder",
         "tests/test_tiff.py::test_zarr_output_is_ome_zarr",
         "-m", "not slurm and not cluster", "-k", "not sigint and not sigkill and not ctrl_c"],
    ),
    "batch": (
        "rollmed_dask/batch.py",
        ["tests/test_batch_inputs.py", "tests/test_batch.py", "tests/test_no_data_lost.py",
         "tests/test_identity.py", "tests/test_folder_signals.py", "-m", "not slurm"],
    ),
    "job": (
        "rollmed_dask/job.py",
        ["tests/test_job.py", "tests/test_sinks.py", "tests/test_crash_safety.py",
         "tests/test_no_data_lost.py", "tests/test_identity.py", "tests/test_safety.py",
         "tests/test_slurm_failures.py::test_a_signal_just_after_the_move_says_the_new_output_is_there",
         "tests/test_folder_signals.py::test_ctrl_c_pressed_again_while_files_stop_waits_for_them",
         "-m", "not slurm and not cluster"],
    ),
    "h5chunks": (
        "rollmed_dask/h5chunks.py",
        ["tests/test_h5chunks_checks.py", "tests/test_h5chunks.py", "tests/test_sinks.py",
         "tests/test_identity.py", "-k", "not hypothesis"],
    ),
    "sources": (
        "rollmed_dask/sources.py",
        ["tests/test_sources.py", "tests/test_graph_keys.py", "tests/test_identity.py",
         "tests/test_no_data_lost.py", "tests/test_safety.py::test_api_bad_input_matrix",
         "tests/test_safety.py::test_truncated_file", "-m", "not slurm and not cluster"],
    ),
    "scheduling": (
        "rollmed_dask/scheduling.py",
        ["tests/test_pipeline.py", "tests/test_block_tasks.py", "tests/test_job.py",
         "tests/test_distributed.py", "tests/test_stalled_runs.py",
         "tests/test_interrupt_in_session.py", "tests/test_folder_signals.py",
         "-m", "not slurm"],
    ),
    "rtdc": (
        "rollmed_dask/rtdc",
        ["tests/test_rtdc.py", "tests/test_sinks.py", "tests/test_lean_output.py",
         "tests/test_dcnum_pipeline.py", "-m", "not slurm and not cluster"],
    ),
}  # fmt: skip

# not mutated: text only, or the test hooks, which act only when a test sets
# ROLLMED_DASK_TEST_KILL_AT / _PAUSE_AT / _SIGNAL_AT (a mutant there fires every
# point, each a 5-minute pause: timeouts that cost an hour and test nothing)
SKIP_FUNCTIONS = {"__repr__", "__str__", "crash_point", "pause_point", "_signal_point"}
NO_MUTATE = "# no mutate"  # on a line: its mutants are not made (say why beside it)
BOUNDARY = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}
FLIP = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
        ast.Is: ast.IsNot, ast.IsNot: ast.Is}  # fmt: skip


@dataclasses.dataclass
class Mutant:
    path: str  # relative to the root
    line: int
    kind: str
    before: str
    after: str
    start: tuple  # (line, col) of the replaced source segment
    end: tuple
    function: str = ""  # the enclosing function, Class.method: accepted.toml's key
    code: str = ""  # the text of the mutated line, stripped
    occurrence: int = 1  # the same edit of the same line text in the function: 1, 2, ...
    status: str = "not run"  # killed, survived, timeout, not covered, accepted
    by: str = ""  # the test that failed, or why it was not run
    seconds: float = 0.0

    @property
    def edit(self) -> str:
        return f"{self.kind}: {self.before!r} -> {self.after!r}"

    @property
    def name(self) -> str:
        return f"{self.path}:{self.line} {self.edit}"

    @property
    def key(self) -> tuple:
        """What an accepted mutant is known by: no line number, so edits elsewhere in the
        file keep it accepted; a change of its line or edit makes it run again."""
        return (self.path, self.function, self.code, self.edit, self.occurrence)

    def apply(self, source: str) -> str:
        lines = source.splitlines(keepends=True)
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line.encode()))
        data = source.encode()
        a = offsets[self.start[0] - 1] + self.start[1]
        b = offsets[self.end[0] - 1] + self.end[1]
        return (data[:a] + self.after.encode() + data[b:]).decode()


def _segment(node, source) -> str:
    return ast.get_source_segment(source, node) or ""


class _Finder(ast.NodeVisitor):
    """Collect the mutants of one file, in source order."""

    def __init__(self, path: str, source: str):
        self.path, self.source, self.found = path, source, []
        self.lines = source.splitlines()
        self.docstrings = set()
        self.scope = []  # the names of the enclosing classes and functions

    def add(self, node, kind: str, after: str) -> None:
        before = _segment(node, self.source)
        if not before or before == after or NO_MUTATE in self.lines[node.lineno - 1]:
            return
        self.found.append(
            Mutant(self.path, node.lineno, kind, before, after,
                   (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset),
                   ".".join(self.scope), self.lines[node.lineno - 1].strip())
        )  # fmt: skip

    def _body(self, body):
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            self.docstrings.add(id(body[0]))

    def visit_Module(self, node):  # constants and class fields are not mutated: functions
        self._functions(node.body)

    def _functions(self, body):
        for stmt in body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                self.visit(stmt)
            elif isinstance(stmt, ast.ClassDef):
                self.scope.append(stmt.name)
                self._functions(stmt.body)
                self.scope.pop()

    def visit_FunctionDef(self, node):
        if node.name in SKIP_FUNCTIONS:
            return
        self._body(node.body)
        self.scope.append(node.name)
        for stmt in node.body:  # default arguments and decorators are not mutated
            self.visit(stmt)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node):
        if not _is_type_checking(node.test):
            self.add(node.test, "negate condition", f"not ({_segment(node.test, self.source)})")
        self.generic_visit(node)

    visit_While = visit_If

    def visit_Compare(self, node):
        if len(node.ops) == 1:
            op = type(node.ops[0])
            for table, kind in ((BOUNDARY, "boundary"), (FLIP, "flip comparison")):
                if op in table:
                    new = ast.Compare(node.left, [table[op]()], node.comparators)
                    self.add(node, kind, ast.unparse(new))
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        self.add(node, "and/or", ast.unparse(ast.BoolOp(other, node.values)))
        self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.Not):
            self.add(node, "drop not", f"({_segment(node.operand, self.source)})")
        self.generic_visit(node)

    def visit_BinOp(self, node):
        if isinstance(node.op, ast.Add | ast.Sub) and not _is_text(node):  # a term forgotten
            self.add(node, "drop term", f"({_segment(node.left, self.source)})")
        self.generic_visit(node)

    def visit_Constant(self, node):
        if node.value is True or node.value is False:
            self.add(node, "boolean", str(not node.value))

    def visit_JoinedStr(self, node):
        return  # messages: their words are checked by the tests that match them

    def _remove(self, node, kind):
        self.add(node, kind, "pass")

    def visit_Expr(self, node):
        if id(node) not in self.docstrings and isinstance(node.value, ast.Call):
            self._remove(node, "remove call")
        self.generic_visit(node)

    def visit_Raise(self, node):
        self._remove(node, "remove raise")

    def visit_Assign(self, node):
        if any(isinstance(t, ast.Attribute | ast.Subscript) for t in node.targets):
            self._remove(node, "remove state update")
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        self._remove(node, "remove update")
        self.generic_visit(node)


def _is_type_checking(test) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def _is_text(node) -> bool:
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str) for n in ast.walk(node))


def find_mutants(path: pathlib.Path) -> list[Mutant]:
    """Every mutant of one file whose code compiles and differs from the original."""
    source = path.read_text()
    finder = _Finder(str(path.relative_to(ROOT)), source)
    finder.visit(ast.parse(source))
    original = ast.dump(ast.parse(source))
    mutants, seen = [], set()
    for mutant in finder.found:
        try:
            tree = ast.parse(mutant.apply(source))
        except SyntaxError:
            continue
        dump = ast.dump(tree)
        if dump != original and dump not in seen:
            seen.add(dump)
            mutants.append(mutant)
    count = {}
    for mutant in mutants:  # e.g. the two `True` of `shutdown(wait=True, cancel_futures=True)`
        same = (mutant.function, mutant.code, mutant.edit)
        mutant.occurrence = count[same] = count.get(same, 0) + 1
    return mutants


def module_files(target: str) -> list[pathlib.Path]:
    path = ROOT / target
    return sorted(path.glob("*.py")) if path.is_dir() else [path]


# --------------------------------------------------------------------------
# running


def _environment(copy: pathlib.Path) -> dict:
    path = os.pathsep.join([str(copy), str(copy / "tests" / "mutation")])  # and the plugin
    env = dict(os.environ, PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1")
    env.pop("COVERAGE_PROCESS_START", None)
    return env


def make_copy(workdir: pathlib.Path, name: str) -> pathlib.Path:
    """A copy of the project to mutate (the compiled kernels' library included)."""
    copy = workdir / name
    for part in (PACKAGE, "tests", "scripts", "notebooks", "benchmarks"):
        if (copy / part).exists():
            shutil.rmtree(copy / part)
        if (ROOT / part).exists():
            shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / part, copy / part)
    return copy


def pytest_command(args, timeout: int) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
            f"--timeout={timeout}", "--no-header", *args]  # fmt: skip


def cached_tests_by_line(copy: pathlib.Path, selection, files, timeout) -> dict:
    """:func:`tests_by_line`, kept in the copy for the same package, tests and selection."""
    import hashlib

    digest = hashlib.sha256(json.dumps(selection).encode())
    for path in sorted((ROOT / PACKAGE).rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py")):
        if "mutation" not in path.relative_to(ROOT).parts:  # the harness traces nothing
            digest.update(path.read_bytes())
    cache = copy / f".trace-{digest.hexdigest()[:16]}.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        lines = {tuple(json.loads(k)): set(v) for k, v in saved["lines"].items()}
        return lines, saved["seconds"]
    lines, seconds = tests_by_line(copy, selection, files, timeout)
    cache.write_text(json.dumps({"lines": {json.dumps(k): sorted(v) for k, v in lines.items()},
                                 "seconds": seconds}))  # fmt: skip
    return lines, seconds


def tests_by_line(copy: pathlib.Path, selection, files, timeout) -> tuple[dict, dict]:
    """``{(file, line): {test node id}}`` from one traced run of the selection, and
    ``{test node id: seconds}``."""
    import coverage

    data_file = copy / ".coverage-mutation"
    for old in copy.glob(".coverage-mutation*"):
        old.unlink()
    durations = copy / ".durations-mutation"
    durations.unlink(missing_ok=True)
    rc = copy / ".coveragerc-mutation"
    rc.write_text(
        f"[run]\nconcurrency = thread\nparallel = true\ndata_file = {data_file}\n"
        f"include = {copy / PACKAGE}/*\n"
    )
    cmd = [sys.executable, "-m", "coverage", "run", f"--rcfile={rc}",
           *pytest_command(["-p", "contexts", *selection], timeout)[1:]]  # fmt: skip
    cmd[cmd.index("-x")] = "--maxfail=1000"  # a baseline failure is reported below
    env = _environment(copy)
    # the processes the tests start (the CLI) trace too: startup/sitecustomize.py
    env["PYTHONPATH"] += os.pathsep + str(copy / "tests" / "mutation" / "startup")
    env["COVERAGE_PROCESS_START"] = str(rc)
    env["ROLLMED_MUTATION_DURATIONS"] = str(durations)
    proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the tests fail without a mutant:\n{proc.stdout[-3000:]}")
    cov = coverage.Coverage(config_file=str(rc))
    cov.combine()
    data = cov.get_data()
    result = {}
    for file in files:
        measured = str(copy / file.relative_to(ROOT))
        for line, contexts in data.contexts_by_lineno(measured).items():
            tests = {c for c in contexts if c}
            result[(str(file.relative_to(ROOT)), line)] = tests
    seconds = dict(json.loads(line) for line in durations.read_text().splitlines())
    return result, seconds


class Worker:
    """A process that runs one mutant's tests at a time in its copy of the project.

    It imports the heavy libraries (numpy, h5py, dask, pytest; not hypothesis,
    whose pytest plugin must be imported by pytest)
    once, before any thread exists, and forks a child for each mutant that
    runs pytest: the child imports the package, mutated, from the copy. This
    saves the 3 to 5 s that a fresh interpreter spends importing them per
    mutant, which is most of a mutant's time.
    """

    def __init__(self, copy: pathlib.Path):
        self.copy = copy
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(copy)], cwd=copy, env=_environment(copy),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def run(self, mutant: Mutant, tests: list[str], timeout: int, deadline: float) -> Mutant:
        """Run ``tests`` on the mutant: ``timeout`` seconds a test, ``deadline`` in all."""
        original = (ROOT / mutant.path).read_text()
        request = {"path": mutant.path, "source": mutant.apply(original), "original": original,
                   "args": pytest_command(tests, timeout)[3:], "timeout": deadline}  # fmt: skip
        t0 = time.perf_counter()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        mutant.seconds = round(time.perf_counter() - t0, 1)
        code, failed = answer["code"], answer["failed"]
        if code == 0:
            mutant.status = "survived"  # `by` says if only some of its tests ran
        elif code in (1, 2, 3):
            mutant.status, mutant.by = "killed", failed or f"exit {code}"
            if "Timeout" in failed:
                mutant.status = "timeout"
        elif code == "timeout":
            mutant.status, mutant.by = "timeout", f"the whole run took over {deadline:.0f} s"
        elif code < 0:  # e.g. a crash point's SIGKILL fired in the tests' own process
            mutant.status, mutant.by = "killed", f"the tests' process died (signal {-code})"
        else:
            mutant.status, mutant.by = "error", f"pytest exit {code}"
        return mutant

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def serve(copy: pathlib.Path) -> None:
    """The worker's side (``--serve``): one JSON request a line, one answer a line."""
    import signal

    import dask.array  # noqa: F401
    import h5py  # noqa: F401
    import hdf5plugin  # noqa: F401
    import numcodecs  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import xxhash  # noqa: F401

    os.chdir(copy)
    for line in sys.stdin:
        request = json.loads(line)
        target = copy / request["path"]
        target.write_text(request["source"])
        log = copy / ".mutant-output"
        pid = os.fork()
        if pid == 0:  # the child: pytest on the mutated copy, its output to the log
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.setpgid(0, 0)
            code = 4
            try:
                code = pytest.main(request["args"])
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(int(code))
        deadline = time.monotonic() + request["timeout"]
        code = None
        while code is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                code = "timeout"
            else:
                time.sleep(0.05)
        target.write_text(request["original"])
        out = log.read_text(errors="replace") if log.exists() else ""
        failed = [x for x in out.splitlines() if x.startswith(("FAILED", "ERROR"))]
        if "Timeout" in out[-3000:]:
            failed.insert(0, "Timeout")
        print(json.dumps({"code": code, "failed": failed[0] if failed else ""}), flush=True)


def run_module(name, args, workdir: pathlib.Path, log) -> list[Mutant]:
    target, selection = MODULES[name]
    if args.tests:  # a survivor checked against other tests (a new one, or another file)
        selection = shlex.split(args.tests)
    files = module_files(target)
    mutants = [m for f in files for m in find_mutants(f)]
    if args.only:
        mutants = [m for m in mutants if any(text in m.name for text in args.only)]
    print(f"{name}: {len(mutants)} mutants in {', '.join(f.name for f in files)}", flush=True)
    if args.list:
        for mutant in mutants:
            print("  ", mutant.name)
        return mutants
    copies = [make_copy(workdir, f"w{i}") for i in range(args.jobs)]
    t0 = time.perf_counter()
    covering, seconds = cached_tests_by_line(copies[0], selection, files, args.timeout)
    print(f"  traced the selection in {time.perf_counter() - t0:.0f} s", flush=True)
    accepted, killers = read_accepted(), read_killers()
    markers = []  # -m and -k with their values, kept for the narrowed runs
    for i, arg in enumerate(selection[:-1]):
        if arg in ("-m", "-k"):
            markers += selection[i : i + 2]
    todo = []
    for mutant in mutants:
        lines = range(mutant.start[0], mutant.end[0] + 1)
        tests = set().union(*(covering.get((mutant.path, n), set()) for n in lines))
        measured = any((mutant.path, n) in covering for n in lines)
        # its known killer first, whatever the cap or the trace (not when --tests names them)
        known = [] if args.tests else killers.get(mutant.key, [])
        if mutant.name in args.done:
            mutant.status, mutant.by, mutant.seconds = args.done[mutant.name]
        elif mutant.key in accepted and not args.all:
            mutant.status, mutant.by = "accepted", accepted[mutant.key]
            _report(mutant, log)
        elif tests or known:  # fastest first: most often the first kills
            chosen = choose_tests(tests, seconds, args.max_tests)
            if len(chosen) < len(tests):
                mutant.by = f"ran {len(chosen)} of the {len(tests)} tests of its line"
            # the selection's -m/-k with them, but not for a known killer (a cluster test)
            todo.append((mutant, [*known, *(t for t in chosen if t not in known)], not known))
        elif measured or args.tests:  # run outside any test (collection, a process pool,
            todo.append((mutant, selection, False))  # a worker process): the whole selection
        else:
            mutant.status, mutant.by = "not covered", "no test of the selection runs this line"
            _report(mutant, log)
    free = [Worker(copy) for copy in copies]
    workers = list(free)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        running = {}
        for mutant, tests, filtered in todo:
            if not free:
                done, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
                for future in done:
                    free.append(running.pop(future))
                    _report(future.result(), log)
            worker = free.pop()
            timeout, deadline = _time_limits(tests, seconds, args.timeout)
            if filtered:
                tests = [*tests, *markers]
            running[pool.submit(worker.run, mutant, tests, timeout, deadline)] = worker
        for future in concurrent.futures.as_completed(running):
            _report(future.result(), log)
    for worker in workers:
        worker.close()
    return mutants


def choose_tests(tests, seconds: dict, most: int) -> list[str]:
    """The tests a mutant runs: the fastest first, at most ``most`` (0: all of them).

    A line every job runs (an argument check at the top of the job) is run by
    hundreds of tests: a survivor there ran them all, 10 minutes each. Its
    mutant now runs the fastest test of each test file in turn, then the second
    fastest of each, and so on, up to ``most``: every file's view of the line,
    cheapest first. A mutant that passes them is reported as survived, with how
    many of its tests ran (``--max-tests 0`` runs them all); the cap can only
    make the score lower, never call a mutant caught that is not.
    """
    ordered = sorted(tests, key=lambda t: (seconds.get(t, 1e9), t))
    if not most or len(ordered) <= most:
        return ordered
    by_file = {}
    for test in ordered:
        by_file.setdefault(test.split("::")[0], []).append(test)
    rounds = [test for group in itertools.zip_longest(*by_file.values()) for test in group if test]
    return sorted(rounds[:most], key=lambda t: (seconds.get(t, 1e9), t))


def _time_limits(tests, seconds: dict, most: int) -> tuple[int, float]:
    """A test's timeout and the whole run's, from the traced run's times.

    A mutant that hangs costs its timeout: ``most`` (300 s) for each of them
    made up a third of a module's time. Five times the slowest test (at least
    30 s) still lets a test run slower beside the other job; the whole run may
    take twice the traced sum, so a survivor is not cut short and called caught.
    """
    known = [seconds[t] for t in tests if t in seconds]
    if len(known) < len(tests) or not known:  # the whole selection: its tests are not named
        known = list(seconds.values()) or [most]
        return most, 2 * sum(known) + most + 60
    timeout = min(most, max(30, round(5 * max(known))))
    return timeout, 2 * sum(known) + timeout + 60


def read_accepted(path: pathlib.Path = ROOT / "tests" / "mutation" / "accepted.toml") -> dict:
    """``{mutant key: reason}``: the survivors accepted, not run again (``--all`` runs them)."""
    import tomllib

    if not path.exists():
        return {}
    entries = tomllib.loads(path.read_text()).get("accepted", [])
    return {(e["file"], e["function"], e["line"], e["mutant"], e.get("occurrence", 1)): e["reason"]
            for e in entries}  # fmt: skip


def read_killers(path: pathlib.Path = ROOT / "tests" / "mutation" / "killers.toml") -> dict:
    """``{mutant key: [test ids]}``: the test known to kill each mutant that a capped
    run may not pick (see killers.toml); it runs first."""
    import tomllib

    if not path.exists():
        return {}
    killers = {}
    for e in tomllib.loads(path.read_text()).get("killed", []):
        key = (e["file"], e["function"], e["line"], e["mutant"], e.get("occurrence", 1))
        killers.setdefault(key, []).append(e["test"])
    return killers


def _report(mutant: Mutant, log=None) -> None:
    if log is not None:  # each result as it comes: a run stopped early keeps its results
        log.write(json.dumps(dataclasses.asdict(mutant)) + "\n")
        log.flush()
    if mutant.status not in ("killed", "accepted"):
        print(f"  {mutant.status.upper()} ({mutant.seconds} s) {mutant.name}", flush=True)


def summary(results: dict) -> str:
    lines = []
    for name, mutants in results.items():
        statuses = ("killed", "timeout", "survived", "accepted", "not covered", "error")
        count = {s: sum(m.status == s for m in mutants) for s in statuses}
        caught = count["killed"] + count["timeout"]
        score = 100 * caught / max(len(mutants), 1)
        details = ", ".join(f"{v} {k}" for k, v in count.items() if v)
        lines.append(f"{name}: {caught}/{len(mutants)} caught ({score:.0f} %), {details}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"some of: {' '.join(MODULES)}")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run at once (default 2)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds a test may take")
    parser.add_argument(
        "--max-tests", type=int, default=40,
        help="tests a mutant runs at most, the fastest of each test file in turn (0: all)",
    )  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "rollmed-mutation")
    )
    parser.add_argument("--out", default=str(ROOT / "tests" / "mutation" / "last-run.json"))
    parser.add_argument(
        "--resume", action="store_true",
        help="keep the results of --out's .jsonl whose mutant is unchanged; run the rest",
    )  # fmt: skip
    parser.add_argument(
        "--only", action="append", metavar="TEXT",
        help="only the mutants whose name (as printed: 'rollmed_dask/x.py:LINE kind: ...') "
        "contains TEXT; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--tests", metavar="ARGS",
        help="pytest arguments instead of the module's selection, e.g. "
        "\"tests/test_x.py -k name\" (with --only: does a new test kill a survivor?)",
    )  # fmt: skip
    parser.add_argument(
        "--all", action="store_true",
        help="run the accepted mutants of tests/mutation/accepted.toml too (after a change "
        "to the lines they are on)",
    )  # fmt: skip
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # a Worker's process
    args = parser.parse_args(argv)
    if args.serve:
        serve(pathlib.Path(args.serve))
        return 0
    unknown = set(args.modules) - set(MODULES)
    if unknown:
        parser.error(
            f"unknown module {', '.join(sorted(unknown))}; choose from {', '.join(MODULES)}"
        )
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    t0 = time.perf_counter()
    args.done = {}
    if args.resume and os.path.exists(f"{args.out}l"):
        for line in open(f"{args.out}l"):  # noqa: SIM115
            m = json.loads(line)
            if m["status"] in ("killed", "timeout"):  # survivors run again: new tests
                args.done[Mutant(**m).name] = (m["status"], m["by"], m["seconds"])
    elif not args.list and os.path.exists(f"{args.out}l"):
        os.unlink(f"{args.out}l")  # a new run starts a new log
    log = None if args.list else open(f"{args.out}l", "a")  # noqa: SIM115 (the whole run)
    for name in args.modules or list(MODULES):
        started = time.perf_counter()
        results[name] = run_module(name, args, workdir, log)
        if not args.list:
            minutes = (time.perf_counter() - started) / 60
            print(f"{summary({name: results[name]})} in {minutes:.0f} min", flush=True)
    if args.list:
        return 0
    print(f"\n{summary(results)}\ntotal {time.perf_counter() - t0:.0f} s", flush=True)
    pathlib.Path(args.out).write_text(
        json.dumps({n: [dataclasses.asdict(m) for m in ms] for n, ms in results.items()}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
