"""Verification: every output against the benchmark's oracle, or against each other.

``verify_full`` streams the oracle (``_oracle.py``) over the whole stack;
``verify_sampled`` checks sampled rows against ``np.partition`` and compares
the outputs with each other in full, for sizes where the full oracle would
take too long.
"""

from __future__ import annotations

MiB = 2**20
IMAGE_SHAPE = (80, 320)
# what dcnum writes for events/image_bg of a uint8 80 x 320 stack
EXPECTED_LAYOUT = {"chunks": [40, 80, 320], "filters": [[32015, [5]], [3, []]]}


def layout(dset) -> dict:
    """Chunks, filters (id, values), dtype and shape of an HDF5 dataset."""
    plist = dset.id.get_create_plist()
    filters = []
    for i in range(plist.get_nfilters()):
        code, _flags, values, _name = plist.get_filter(i)
        filters.append([int(code), [int(v) for v in values]])
    return {"chunks": list(dset.chunks) if dset.chunks else None, "filters": filters,
            "dtype": str(dset.dtype), "shape": list(dset.shape)}  # fmt: skip


def open_file(path):
    """An ``.rtdc`` file opened for reading, zstd filter registered."""
    import h5py
    import hdf5plugin  # noqa: F401

    return h5py.File(path, "r")


def datasets_equal(a, b) -> tuple[bool, int | None]:
    """Whether two datasets hold the same values; the first differing event if not.

    Chunks whose stored bytes are identical (same chunk shape and filters) are
    equal without decoding; the others are decoded and compared.
    """
    import numpy as np

    if a.shape != b.shape or a.dtype != b.dtype:
        return False, 0
    n = a.shape[0]
    raw = a.chunks is not None and a.chunks == b.chunks and layout(a)["filters"] == \
        layout(b)["filters"] and a.chunks[1:] == a.shape[1:]  # fmt: skip
    step = a.chunks[0] if raw else 1000
    for s in range(0, n, step):
        if raw:
            try:
                ma, ra = a.id.read_direct_chunk((s, 0, 0))
                mb, rb = b.id.read_direct_chunk((s, 0, 0))
                if ma == mb and ra == rb:
                    continue
            except (OSError, RuntimeError, KeyError):
                pass
        x, y = a[s : s + step], b[s : s + step]
        if not np.array_equal(x, y):
            bad = np.nonzero((x != y).reshape(len(x), -1).any(axis=1))[0]
            return False, int(s + bad[0])
    return True, None


def _first_bad(got, want, offset: int) -> int | None:
    import numpy as np

    if got.shape == want.shape and np.array_equal(got, want):
        return None
    if got.shape != want.shape:
        return offset
    bad = np.nonzero((got != want).reshape(len(got), -1).any(axis=1))[0]
    return int(offset + bad[0])


def verify_full(input_path, outputs: dict, n: int, k: int, threads: int) -> dict:
    """Stream the oracle over the whole stack, compare every output with it."""
    import _oracle
    import numpy as np

    res = {name: {"exact": True, "check": "oracle, all rows", "first_bad_event": None}
           for name in outputs}  # fmt: skip
    files = {name: open_file(p) for name, p in outputs.items()}
    try:
        dsets = {}
        for name, f in files.items():
            d = f["events/image_bg"]
            if d.shape != (n, *IMAGE_SHAPE) or str(d.dtype) != "uint8":
                res[name].update(exact=False, first_bad_event=0,
                                 check=f"wrong shape/dtype {d.shape} {d.dtype}")  # fmt: skip
            else:
                dsets[name] = d
        with open_file(input_path) as fin:
            img = fin["events/image"]
            block = max(256, (64 * MiB) // (IMAGE_SHAPE[0] * IMAGE_SHAPE[1]))
            last = None
            for s in range(0, n - k, block):
                e = min(s + block, n - k)
                truth = _oracle.median_windows(img[s : e + k - 1], k, threads=threads)
                last = truth[-1]
                for name, d in dsets.items():
                    if res[name]["exact"]:
                        bad = _first_bad(d[s:e], truth, s)
                        if bad is not None:
                            res[name].update(exact=False, first_bad_event=bad)
        tail = np.broadcast_to(last, (k, *IMAGE_SHAPE))
        for name, d in dsets.items():
            if res[name]["exact"]:
                bad = _first_bad(d[n - k : n], tail, n - k)
                if bad is not None:
                    res[name].update(exact=False, first_bad_event=bad)
    finally:
        for f in files.values():
            f.close()
    return res


def _sample_rows(n: int, k: int, count: int, seed: int) -> list[int]:
    """Rows to check against the oracle: the ends, block borders (multiples of the
    40-event storage chunk, and their neighbours) and random rows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    last = n - k - 1
    rows = {0, 1, last, max(0, last - 1)}
    borders = rng.integers(1, max(2, last // 40), size=count // 2) * 40
    rows.update(int(b + d) for b in borders for d in (-1, 0))
    rows.update(int(r) for r in rng.integers(0, last + 1, size=count // 2))
    return sorted(r for r in rows if 0 <= r <= last)


def verify_sampled(input_path, outputs: dict, n: int, k: int, count: int = 48) -> dict:
    """Oracle at sampled rows, tail repeats, and all outputs equal in full."""
    import numpy as np

    rows = _sample_rows(n, k, count, seed=n + k)
    res = {name: {"exact": None, "first_bad_event": None, "sample_exact": True,
                  "check": f"oracle at {len(rows)} sampled rows + tail; "}
           for name in outputs}  # fmt: skip
    files = {name: open_file(p) for name, p in outputs.items()}
    try:
        with open_file(input_path) as fin:
            img = fin["events/image"]
            for j in rows:
                truth = np.partition(img[j : j + k], k // 2, axis=0)[k // 2]
                for name, f in files.items():
                    r = res[name]
                    if (
                        r["sample_exact"]
                        and _first_bad(f["events/image_bg"][j : j + 1], truth[None], j) is not None
                    ):
                        r.update(sample_exact=False, exact=False, first_bad_event=j)
        for name, f in files.items():
            d = f["events/image_bg"]
            if res[name]["sample_exact"]:
                bad = _first_bad(d[n - k : n], np.broadcast_to(d[n - k - 1], (k, *IMAGE_SHAPE)),
                                 n - k)  # fmt: skip
                if bad is not None:
                    res[name].update(sample_exact=False, exact=False, first_bad_event=bad)
        names = list(files)
        anchor = names[0]
        for name in names:
            if name == anchor:
                res[name]["check"] += "the others compared with it in full"
                continue
            same, bad = datasets_equal(files[anchor]["events/image_bg"],
                                       files[name]["events/image_bg"])  # fmt: skip
            res[name]["check"] += f"{'identical to' if same else 'DIFFERS from'} {anchor}"
            res[name]["identical_to"] = anchor if same else None
            if not same:
                # one of the two is wrong at row `bad`: ask the oracle which
                res[name]["first_difference"] = bad
                with open_file(input_path) as fin:
                    j = min(bad, n - k - 1)  # tail rows repeat row N-K-1
                    truth = np.partition(fin["events/image"][j : j + k], k // 2, axis=0)[k // 2]
                for who in (anchor, name):
                    if not np.array_equal(files[who]["events/image_bg"][bad], truth):
                        res[who].update(sample_exact=False, exact=False, first_bad_event=bad)
    finally:
        for f in files.values():
            f.close()
    return res


def output_layout(path) -> dict | None:
    try:
        with open_file(path) as f:
            return layout(f["events/image_bg"])
    except (OSError, KeyError):
        return None
