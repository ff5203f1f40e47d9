"""Which files a folder run takes, and each file's share of the threads (issue 23)."""

import shutil

import pytest

from rollmed_dask import batch, compute_backgrounds, job


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


def test_each_file_job_gets_its_share(small_rtdc, tmp_path, monkeypatch):
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
        scheduler="threads", num_workers=4, files_at_once=2, progress=False,
    )  # fmt: skip
    assert seen == [2, 2]
