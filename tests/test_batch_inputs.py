"""Which files a folder run takes, and each file's share of the threads (issue 23)."""

import argparse
import pathlib
import shutil
import time

import h5py
import pytest

from rollmed_dask import batch, cli, compute_background, compute_backgrounds, job


def test_hidden_files_and_folders_below_a_folder_are_not_inputs(small_rtdc, tmp_path):
    """Hidden names are our temporaries (``.NAME.<pid>-<random>.partial``) and
    other tools' scratch files: never inputs."""
    for name in ("a.rtdc", ".hidden.rtdc", ".scratch/b.rtdc", "day1/.c.rtdc", "day1/d.rtdc"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(small_rtdc, tmp_path / name)
    found = batch.find_inputs([tmp_path], recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p, _ in found] == ["a.rtdc", "day1/d.rtdc"]


@pytest.mark.parametrize(
    ("num_workers", "files_at_once", "n_jobs", "expected"),
    [(4, 2, 5, (2, 2)), (5, 2, 5, (2, 2)), (4, None, 3, (3, 1)), (2, 4, 4, (2, 1))],
)
def test_files_side_by_side_share_the_threads(num_workers, files_at_once, n_jobs, expected):
    """(files at once, threads each): together no more than the threads given."""
    shared = batch._Shared("threads", num_workers, files_at_once, n_jobs)
    try:
        assert (shared.files_at_once, shared.num_workers) == expected
    finally:
        shared.close()


def test_each_file_job_gets_its_share(small_rtdc, tmp_path, monkeypatch, capsys):
    """Two files side by side get two threads each; the batch's bar counts them."""
    for name in ("a.rtdc", "b.rtdc"):
        shutil.copy(small_rtdc, tmp_path / name)
    seen = []
    real = job.compute_background

    def recording(*args, num_workers=None, **kwargs):
        seen.append(num_workers)
        return real(*args, num_workers=num_workers, **kwargs)

    monkeypatch.setattr(job, "compute_background", recording)
    compute_backgrounds(
        [tmp_path / "a.rtdc", tmp_path / "b.rtdc"], tmp_path / "out", 10,
        scheduler="threads", num_workers=4, files_at_once=2, progress=True,
    )  # fmt: skip
    assert seen == [2, 2]
    err = capsys.readouterr().err
    last = err.splitlines()[-1].rsplit("\r", 1)[-1]  # the bar as it was left
    assert last.startswith("files 2/2: 100%") and "| 600/600 [" in last, last
    assert err.count("done     ") == 2


def test_zarr_stores_are_known_by_name_or_by_their_metadata(tmp_path):
    """A folder is a Zarr store (one input) by its name or by its metadata files."""
    for name in ("named.zarr", "v3", "v2-group", "v2-array", "plain"):
        (tmp_path / name).mkdir()
    (tmp_path / "v3/zarr.json").write_text("{}")
    (tmp_path / "v2-group/.zgroup").write_text("{}")
    (tmp_path / "v2-array/.zarray").write_text("{}")
    stores = [p.name for p in sorted(tmp_path.iterdir()) if batch.is_zarr_store(p)]
    assert stores == ["named.zarr", "v2-array", "v2-group", "v3"]


def test_an_input_named_twice_is_one_job(small_rtdc, tmp_path):
    """``-r raw raw/day1``: the files of day1 are found twice, and taken once."""
    (tmp_path / "day1").mkdir()
    shutil.copy(small_rtdc, tmp_path / "day1/a.rtdc")
    found = batch.find_inputs(
        [tmp_path, tmp_path / "day1", tmp_path / "day1/a.rtdc"], recursive=True
    )
    assert [p.relative_to(tmp_path).as_posix() for p, _ in found] == ["day1/a.rtdc"]


@pytest.mark.parametrize(
    ("names", "out", "options", "words"),
    [
        (["a.rtdc", "a.h5"], "out", {}, "would both be written to"),
        (["a.rtdc", "a_bg.rtdc"], ".", {}, "would be the input"),
        (["a.rtdc"], "out", {"in_place": True}, "drop the output folder"),
        (["a.rtdc"], None, {}, "pass an output folder"),
    ],
)
def test_a_batch_that_cannot_be_planned_is_refused_before_any_work(
    small_rtdc, tmp_path, names, out, options, words
):
    for name in names:  # a_bg.rtdc: a measurement named like an output, not ours
        shutil.copy(small_rtdc, tmp_path / name)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=words):
        compute_backgrounds(
            [tmp_path / n for n in names], out and tmp_path / out, 10, progress=False, **options
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_input_processed_in_place_and_copied_is_no_output_of_ours(rtdc_copy, tmp_path):
    """A copy of an input that got its background in place carries that run's log,
    whose output is the input: it is not an output of this batch, never skipped
    as up to date."""
    compute_background(rtdc_copy, rtdc_copy, 10, in_place=True, progress=False)
    (tmp_path / "out").mkdir()
    shutil.copy(rtdc_copy, tmp_path / "out/input_bg.rtdc")
    [result] = compute_backgrounds([rtdc_copy], tmp_path / "out", 10, progress=False)
    assert result["status"] == "failed"
    assert "was not written by rollmed-dask" in result["error"]


def test_an_output_of_another_pipeline_is_named_by_its_pipeline_id(rtdc_copy, tmp_path):
    """dcnum's own backgrounds carry other pipeline ids: the refusal names it whole."""
    with h5py.File(rtdc_copy) as h5, h5py.File(tmp_path / "input_bg.rtdc", "w") as out:
        out["events/image_bg"] = h5["events/image"][:]
        out["events/image_bg"].attrs["dcnum ppid background"] = "sparsemed:k=10^s=1"
    [result] = compute_backgrounds([rtdc_copy], tmp_path, 10, progress=False)
    assert result["status"] == "failed"
    assert "was made with sparsemed:k=10^s=1, not kernel_size=10;" in result["error"]


def test_each_failure_is_one_line_with_the_type_of_an_unexpected_error(
    small_rtdc, tmp_path, monkeypatch
):
    """Faults injected per file: the expected kinds say their message (an OSError
    its errno and file, a KeyError its key), anything else its type too; another
    run's output that appears meanwhile is refused; each file is timed."""
    names = ["bug", "full", "key", "ok", "taken"]
    for name in names:
        shutil.copy(small_rtdc, tmp_path / f"{name}.rtdc")
    real = job.compute_background
    faults = {
        "bug": RuntimeError("unexpected"),
        "full": OSError(28, "No space left on device", "/x"),
        "key": KeyError("events/image"),
    }

    def faulty(source, target, *args, **kwargs):
        name = source.stem
        if name in faults:
            raise faults[name]
        if name == "taken":  # another run wrote it, with other parameters, since the check
            real(source, target, 12, progress=False, scheduler="synchronous")
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(job, "compute_background", faulty)
    t0 = time.perf_counter()
    results = compute_backgrounds(
        [tmp_path / f"{n}.rtdc" for n in names], tmp_path / "out", 10, progress=False
    )
    elapsed = time.perf_counter() - t0
    got = {pathlib.Path(r["input"]).stem: r for r in results}
    assert {n: got[n]["error"] for n in names} == {
        "bug": "RuntimeError: unexpected",
        "full": "[Errno 28] No space left on device: '/x'",
        "key": "events/image",
        "ok": None,
        "taken": f"output {str(tmp_path / 'out/taken_bg.rtdc')!r} already exists; choose "
        f"another path, or pass --overwrite (overwrite=True) to replace it (a file, or a "
        f"Zarr output of rollmed-dask) once the new result is complete",
    }
    assert got["ok"]["status"] == "done"
    assert 0 < got["ok"]["seconds"] <= elapsed


def test_a_file_whose_batch_was_stopped_before_it_started_is_not_started(small_rtdc, tmp_path):
    stop = batch._Stop()
    stop.event.set()
    job_ = batch._Job(small_rtdc, tmp_path / "small_bg.rtdc", 300)
    result = batch._run_one(job_, {}, "threads", 1, stop)
    assert (result.status, result.error) == ("not started", None)
    assert list(tmp_path.iterdir()) == [] and stop.threads == set()


def test_the_command_line_tells_one_input_from_many(tmp_path, capsys):
    """``INPUT OUTPUT`` is one file's job, more paths or -r a batch; one path alone
    is no job (``--example`` makes its own), and --example with a path names it."""
    parse = cli.build_parser().parse_args
    assert not batch.is_batch(parse(["--example", str(tmp_path)]))
    assert not batch.is_batch(parse(["a.rtdc", "a_bg.rtdc"]))
    assert batch.is_batch(parse(["a.rtdc", "b.rtdc", "out"]))
    assert batch.is_batch(parse(["-r", "raw", "out"]))
    assert batch.is_batch(parse(["a.rtdc", "out/"]))
    with pytest.raises(SystemExit) as exited:
        cli.main([str(tmp_path / "a.rtdc")])
    assert exited.value.code == 2
    assert "INPUT and OUTPUT are required" in capsys.readouterr().err
    assert cli.main(["--example", str(tmp_path), "x.rtdc"]) == 2
    assert "so 'x.rtdc' would not be used: drop it," in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_summary_table_lists_what_happened():
    rows = [{"status": "done", "events": 1500}, {"status": "interrupted", "events": 300}]
    rows += [{"status": "not started", "events": None}] * 2
    assert batch.summary_table(rows, 0.0).splitlines() == [
        "done         1 file      1,500 events",
        "skipped      0 files",
        "failed       0 files",
        "interrupted  1 file",
        "not started  2 files",
        "batch        4 files in 0.0 s, - events/s",
    ]
    rows = [{"status": "done", "events": 1500}, {"status": "skipped", "events": 300}]
    assert batch.summary_table(rows, 3.0).splitlines()[1:] == [
        "skipped      1 file",
        "failed       0 files",
        "batch        2 files in 3.0 s, 500 events/s",
    ]


@pytest.mark.parametrize("resume", [False, True])
def test_the_last_line_of_a_stopped_folder_run_counts_every_kind(resume):
    rows = ["done", "skipped", "skipped", "interrupted", "not started", "failed"]
    args = argparse.Namespace(in_place=False, paths=["raw", "out"], resume=resume)
    how = "their partial outputs kept for --resume" if resume else "nothing of them left"
    assert batch.what_was_kept([{"status": s} for s in rows], args) == (
        f"1 finished file(s) kept in out; 2 up to date left as they were; 2 interrupted or "
        f"not started ({how}): run the same command again to do them"
    )
    args.in_place = True
    assert batch.what_was_kept([{"status": "done"}], args) == "1 finished file(s) kept in place"


def test_report_paths_that_are_refused_and_taken(small_rtdc, tmp_path):
    """--report never replaces a folder, an input or another tool's JSON; a report
    of ours is replaced, also inside an input folder, and a failed write leaves no
    temporary."""
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(small_rtdc, raw / "a.rtdc")
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "settings.json").write_text('{"threads": 4}')
    batch.write_report(raw / "report.json", [{"status": "done", "events": 3}], 1.0)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        batch.check_report_path(tmp_path / "folder.json", [raw], overwrite=True)
    with pytest.raises(ValueError, match="is an input of this run"):
        batch.check_report_path(raw / "a.rtdc", [raw], overwrite=True)
    with pytest.raises(FileExistsError, match="is not a report of rollmed-dask"):
        batch.check_report_path(tmp_path / "settings.json", [raw], overwrite=False)
    batch.check_report_path(raw / "report.json", [raw], overwrite=False)
    batch.check_report_path(tmp_path / "settings.json", [raw / "a.rtdc"], overwrite=True)
    with pytest.raises(IsADirectoryError):  # the rename onto a folder fails
        batch.write_report(tmp_path / "folder.json", [], 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.json", "raw", "settings.json"]


def test_the_processes_scheduler_has_one_pool_for_the_batch_and_closes_it():
    shared = batch._Shared("processes", 2, None, 3)
    pool = shared.pool
    assert pool is not None and shared.num_workers == 1
    shared.close()
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(print)
    shared = batch._Shared("threads", 2, None, 3)
    assert shared.pool is None
    shared.close()


@pytest.mark.cluster
@pytest.mark.filterwarnings("ignore::UserWarning:distributed")
def test_a_cluster_started_for_the_batch_is_shared_by_its_files_and_closed():
    """A function as the scheduler starts a cluster for the batch: its threads are
    shared out as a local scheduler's, and it is closed with the batch."""
    from distributed import Client, LocalCluster

    clients = []

    def start():
        cluster = LocalCluster(
            n_workers=1, threads_per_worker=3, processes=False, dashboard_address=None
        )
        clients.append(Client(cluster))
        return clients[-1]

    shared = batch._Shared(start, None, None, 5)
    try:
        assert shared.scheduler is clients[0]
        assert (shared.files_at_once, shared.num_workers) == (3, 1)
    finally:
        shared.close()
    assert clients[0].status == "closed"
