"""What the identity of an output's input data costs (issue 20).

    python benchmarks/identity.py [--files 200] [--events 200] [--big 4000]
                                  [--kernel 10] [--data DIR] [--json FILE]

Measured, one after the other on the same machine:

- ``hash``: the chunk digest alone (``xxh3_128``, and ``blake2b`` for
  comparison) on one output chunk of 40 frames of 80x320 uint8, in ns per
  pixel-event;
- ``job``: ``compute_background`` of one file of ``--big`` frames (K =
  ``--kernel``, threads), with the digests (as shipped) and with the block
  digests switched off, wall and CPU time of the process; and the digests'
  CPU (hash rate x pixel-events) against the job's CPU;
- ``fast path``: deciding "unchanged" from the stat of one input
  (:func:`rollmed_dask.identity.unchanged_since`), and the whole up-to-date
  check of one finished output (``batch.output_state``);
- ``slow path``: reading, decoding and hashing the ``--big`` file
  (:func:`rollmed_dask.identity.compute_identity`, threads), in MB/s of frames;
- ``rerun``: ``rollmed-dask -r raw bg -k K -q`` on a folder of ``--files``
  finished files of ``--events`` frames, run twice (whole process, wall), and
  once more on a copy of both folders (every file takes the slow path).

It prints a table and writes JSON (with the load average); it never asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

CHUNK = (40, 80, 320)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def per_call(func, *args, repeat=200) -> float:
    func(*args)
    t0 = time.perf_counter()
    for _ in range(repeat):
        func(*args)
    return (time.perf_counter() - t0) / repeat


def bench_hash() -> dict:
    import numpy as np
    import xxhash

    chunk = np.random.default_rng(0).integers(0, 255, CHUNK, dtype=np.uint8)
    xxh = per_call(xxhash.xxh3_128_digest, chunk)
    blake = per_call(lambda b: hashlib.blake2b(b, digest_size=16).digest(), chunk, repeat=20)
    return {
        "xxh3_128_ns_per_pixel_event": round(xxh / chunk.size * 1e9, 4),
        "blake2b_ns_per_pixel_event": round(blake / chunk.size * 1e9, 4),
        "xxh3_128_gb_per_s": round(chunk.nbytes / xxh / 1e9, 2),
    }


def bench_job(path: pathlib.Path, out_dir: pathlib.Path, k: int, hash_ns: float) -> dict:
    from rollmed_dask import compute_background, identity
    from rollmed_dask.sources import as_source

    n, h, w = as_source(path).shape
    rows = {}
    original = identity.block_digests
    for label in ("with digests", "without digests", "with digests again"):
        if label == "without digests":
            identity.block_digests = lambda block, j0, start, stop, ce: ([], b"")
        try:
            target = out_dir / f"job-{label.replace(' ', '-')}.rtdc"
            c0, t0 = time.process_time(), time.perf_counter()
            compute_background(path, target, k, progress=False, scheduler="threads")
            rows[label] = {
                "wall_s": round(time.perf_counter() - t0, 3),
                "cpu_s": round(time.process_time() - c0, 3),
            }
        finally:
            identity.block_digests = original
    pixel_events = n * h * w
    cpu = min(rows["with digests"]["cpu_s"], rows["with digests again"]["cpu_s"])
    digest_cpu = hash_ns * pixel_events / 1e9
    return {
        "events": n,
        "kernel": k,
        "runs": rows,
        "job_cpu_ns_per_pixel_event": round(cpu / pixel_events * 1e9, 3),
        "digest_cpu_ns_per_pixel_event": round(hash_ns, 4),
        "digest_share_of_job_cpu": round(digest_cpu / cpu, 4),
    }


def bench_checks(path: pathlib.Path, out_dir: pathlib.Path, k: int) -> dict:
    from rollmed_dask import batch, identity, rtdc
    from rollmed_dask.sources import as_source

    src = as_source(path)
    state = identity.files_state(identity.source_files(src))
    fast = per_call(identity.unchanged_since, state, path, repeat=2000)
    job = batch._Job(path, out_dir / "job-with-digests.rtdc", src.shape[0])
    opts = dict(in_place=False, kernel_size=k, batch_size=10000, output_dataset="events/image_bg",
                dataset="events/image", compression="zstd", overwrite=False)  # fmt: skip
    state_check = per_call(batch.output_state, job, opts, repeat=20)
    chunk_events = rtdc.default_chunk_events(src.shape[1:], src.dtype)
    t0 = time.perf_counter()
    identity.compute_identity(src.array, chunk_events)
    slow = time.perf_counter() - t0
    frames = src.shape[0] * src.shape[1] * src.shape[2] * src.dtype.itemsize
    return {
        "fast_path_us": round(fast * 1e6, 1),
        "output_state_ms": round(state_check * 1e3, 2),
        "output_state_result": batch.output_state(job, opts)[0],
        "slow_path_s": round(slow, 3),
        "slow_path_mb_per_s": round(frames / slow / 1e6, 1),
        "file_mb": round(path.stat().st_size / 1e6, 1),
    }


def cli(*args) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rollmed_dask", *map(str, args)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"rollmed-dask {args} failed: {proc.stderr[-2000:]}")
    return round(time.perf_counter() - t0, 2)


def bench_rerun(data: pathlib.Path, files: int, events: int, k: int) -> dict:
    from rollmed_dask.example import write_example

    raw = data / f"raw-{files}x{events}"
    if not raw.exists():
        log(f"writing {files} files of {events} frames ...")
        tmp = raw.with_name(raw.name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        for i in range(files):
            write_example(tmp / f"m{i:03d}.rtdc", n_events=events, seed=i)
        tmp.rename(raw)
    time.sleep(1.1)  # the inputs' last change older than identity.QUIET_NS
    bg = data / f"bg-{files}x{events}-k{k}"
    shutil.rmtree(bg, ignore_errors=True)
    log("first run ...")
    first = cli("-r", raw, bg, "-k", k, "-q")
    log("reruns ...")
    reruns = [cli("-r", raw, bg, "-k", k, "-q") for _ in range(2)]
    copy = data / "copied"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(raw, copy / raw.name)
    shutil.copytree(bg, copy / bg.name)
    log("rerun of a copy (slow path) ...")
    copied = cli("-r", copy / raw.name, copy / bg.name, "-k", k, "-q")
    shutil.rmtree(copy)
    return {"files": files, "events": events, "first_s": first, "rerun_s": reruns,
            "rerun_copied_s": copied}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--big", type=int, default=4000)
    p.add_argument("--kernel", type=int, default=10)
    p.add_argument("--data", type=pathlib.Path, default=None)
    p.add_argument("--json", type=pathlib.Path, default=None)
    a = p.parse_args(argv)
    data = a.data or pathlib.Path(tempfile.mkdtemp(prefix="rollmed-identity-"))
    data.mkdir(parents=True, exist_ok=True)
    from rollmed_dask.example import write_example

    doc = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "load_average_at_start": os.getloadavg()}}  # fmt: skip
    log("hash ...")
    doc["hash"] = bench_hash()
    big = data / f"big-{a.big}.rtdc"
    if not big.exists():
        write_example(big, n_events=a.big)
    time.sleep(1.1)
    out_dir = data / "out"
    out_dir.mkdir(exist_ok=True)
    log("job ...")
    doc["job"] = bench_job(big, out_dir, a.kernel, doc["hash"]["xxh3_128_ns_per_pixel_event"])
    log("checks ...")
    doc["checks"] = bench_checks(big, out_dir, a.kernel)
    doc["rerun"] = bench_rerun(data, a.files, a.events, a.kernel)
    doc["machine"]["load_average_at_end"] = os.getloadavg()

    h, j, c, r = doc["hash"], doc["job"], doc["checks"], doc["rerun"]
    runs = j["runs"]
    print(
        f"hash   xxh3_128 {h['xxh3_128_ns_per_pixel_event']} ns/px-ev "
        f"({h['xxh3_128_gb_per_s']} GB/s), blake2b {h['blake2b_ns_per_pixel_event']}"
    )
    print(
        f"job    N={j['events']} K={j['kernel']}: "
        + ", ".join(f"{k} {v['wall_s']} s wall / {v['cpu_s']} s CPU" for k, v in runs.items())
    )
    print(
        f"       job {j['job_cpu_ns_per_pixel_event']} ns/px-ev CPU; digests "
        f"{100 * j['digest_share_of_job_cpu']:.1f} % of it"
    )
    print(
        f"check  fast path {c['fast_path_us']} us; output_state {c['output_state_ms']} ms "
        f"({c['output_state_result']}); slow path {c['slow_path_s']} s for "
        f"{c['file_mb']} MB file = {c['slow_path_mb_per_s']} MB/s of frames"
    )
    print(
        f"rerun  {r['files']} files x {r['events']}: first {r['first_s']} s, reruns "
        f"{r['rerun_s']} s, rerun of a copy {r['rerun_copied_s']} s"
    )
    print(f"load   {doc['machine']['load_average_at_start']} -> "
          f"{doc['machine']['load_average_at_end']}")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
