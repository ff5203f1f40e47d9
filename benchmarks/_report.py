"""Reporting: ratios between rows, the targets, the printed table."""

from __future__ import annotations

from _verify import EXPECTED_LAYOUT

IO_FLOORS = ("io-floor-threads", "io-floor-processes")
FLAT_FROM_EVENTS = 20000


def ratios(rows: list[dict]) -> None:
    """Add ``speedup_vs_dcnum`` and ``x_io_floor`` to the rows that have a partner."""
    ok = [r for r in rows if r["status"] == "ok" and r["case"] not in ("kernel", "graph")]
    dcnum = {(r["events"], r["kernel"]): r for r in ok if r["case"] == "dcnum"}
    floors = {}
    for r in ok:
        if r["case"] in IO_FLOORS:
            key = (r["events"], r["kernel"])
            if key not in floors or r["call_s"] < floors[key]["call_s"]:
                floors[key] = r
    for r in ok:
        key = (r["events"], r["kernel"])
        d = dcnum.get(key)
        if d is not None:
            r["speedup_vs_dcnum"] = d["call_s"] / r["call_s"]
            r["speedup_vs_dcnum_process"] = d["process_s"] / r["process_s"]
        f = floors.get(key)
        if f is not None:
            r["x_io_floor"] = r["call_s"] / f["call_s"]
            r["io_floor_case"] = f["case"]


def targets(rows: list[dict], workers: int, extras: dict | None = None) -> list[dict]:
    """The targets of the issues, each measured and judged (never asserted).

    ``extras`` holds the results with tables of their own (``first_call``,
    ``io_stages``), for the targets of issue 16.
    """
    ok = [r for r in rows if r["status"] == "ok"]
    ours = [r for r in ok if r["case"] in ("ours-threads", "ours-processes")]
    out = []

    def add(name, measured, met, detail=""):
        out.append({"target": name, "measured": measured, "met": met, "detail": detail})

    # 1. >= 100x faster than dcnum, end to end
    pairs = [r for r in ours if "speedup_vs_dcnum" in r]
    if pairs:
        best = {}
        for r in pairs:
            key = (r["events"], r["kernel"])
            if key not in best or r["speedup_vs_dcnum"] > best[key]["speedup_vs_dcnum"]:
                best[key] = r
        worst = min(best.values(), key=lambda r: r["speedup_vs_dcnum"])
        add(">= 100x faster than dcnum end to end (best of ours per N, K; worst shown)",
            f"{worst['speedup_vs_dcnum']:.0f}x ({worst['case']}, N={worst['events']}, "
            f"K={worst['kernel']})", worst["speedup_vs_dcnum"] >= 100,
            "; ".join(f"N={n} K={k}: {r['speedup_vs_dcnum']:.0f}x ({r['case']})"
                      for (n, k), r in sorted(best.items())))  # fmt: skip
    else:
        add(">= 100x faster than dcnum end to end", "not measured", None)
    # 2. kernel
    kern = {(r["kernel"], r["scheduler"]): r for r in ok if r["case"] == "kernel"}
    two = f"{workers} thread(s)"
    k100, k500 = kern.get((100, two)), kern.get((500, two))
    if k100:
        add(
            "kernel <= 2 ns per pixel-event on 2 cores at K=100",
            f"{k100['ns_per_pixel_event']:.2f} ns",
            k100["ns_per_pixel_event"] <= 2.0,
        )
    else:
        add("kernel <= 2 ns per pixel-event on 2 cores at K=100", "not measured", None)
    if k100 and k500:
        ratio = k500["ns_per_pixel_event"] / k100["ns_per_pixel_event"]
        add(
            "kernel at K=500 within 2x of K=100 (2 cores)",
            f"{k500['ns_per_pixel_event']:.2f} ns = {ratio:.2f}x K=100",
            ratio <= 2.0,
        )
    else:
        add("kernel at K=500 within 2x of K=100", "not measured", None)
    # 3. within 1.5x of the I/O floor
    pairs = [r for r in ours if "x_io_floor" in r]
    if pairs:
        best = {}
        for r in pairs:
            key = (r["events"], r["kernel"])
            if key not in best or r["x_io_floor"] < best[key]["x_io_floor"]:
                best[key] = r
        worst = max(best.values(), key=lambda r: r["x_io_floor"])
        add("end to end within 1.5x of the I/O floor (best of ours per N, K; worst shown)",
            f"{worst['x_io_floor']:.2f}x ({worst['case']}, N={worst['events']}, "
            f"K={worst['kernel']})", worst["x_io_floor"] <= 1.5,
            "; ".join(f"N={n} K={k}: {r['x_io_floor']:.2f}x ({r['case']})"
                      for (n, k), r in sorted(best.items())))  # fmt: skip
    else:
        add("end to end within 1.5x of the I/O floor", "not measured", None)
    # 4. memory: N=200000 < 1 GB and flat
    big = [r for r in ours if r["events"] >= 200000]
    if big:
        peak = max(big, key=lambda r: r["peak_rss_tree_mb"])
        add("peak RSS (process tree) < 1 GB at N=200000 (worst of ours)",
            f"{peak['peak_rss_tree_mb']:.0f} MB ({peak['case']}, K={peak['kernel']})",
            peak["peak_rss_tree_mb"] < 1024,
            "; ".join(f"{r['case']} K={r['kernel']}: {r['peak_rss_tree_mb']:.0f} MB"
                      for r in big))  # fmt: skip
    else:
        add("peak RSS < 1 GB at N=200000", "not measured", None)
    sizes = sorted({r["events"] for r in ours})
    if len(sizes) > 1:
        # the issue's range: from N=20000 up; below it, blocks are shorter
        # than the budget allows and memory is not yet at its plateau
        n0 = min((n for n in sizes[:-1] if n >= FLAT_FROM_EVENTS), default=sizes[0])
        growth = []
        for r in ours:
            if r["events"] != sizes[-1]:
                continue
            base = [b for b in ours if b["events"] == n0 and b["case"] == r["case"]
                    and b["kernel"] == r["kernel"]]  # fmt: skip
            if base:
                growth.append((r["peak_rss_tree_mb"] / base[0]["peak_rss_tree_mb"], r))
        if growth:
            g, r = max(growth, key=lambda t: t[0])
            add(
                f"peak RSS flat from N={n0} to N={sizes[-1]} (growth <= 1.2x)",
                f"{g:.2f}x worst ({r['case']}, K={r['kernel']})",
                g <= 1.2,
                "; ".join(f"{rr['case']} K={rr['kernel']}: {gg:.2f}x" for gg, rr in growth),
            )
    # 5. graph
    graph = [r for r in ok if r["case"] == "graph"]
    if graph:
        g = graph[0]["graph"]
        add(
            f"graph for N={g['events']:.0e} built in < 2 s",
            f"{g['build_s']:.2f} s",
            g["build_s"] < 2.0 if g["events"] >= 10**7 else None,
            f"materialised {g['tasks']} tasks in {g['materialize_s']:.2f} s; "
            f"compute_background set-up on an HDF5 file {g['ooc_setup_s']:.2f} s",
        )
    _issue16_targets(ours, extras or {}, add)
    return out


def _issue16_targets(ours: list[dict], extras: dict, add) -> None:
    """One file on camera-like data: dcnum at N=20000, the first call, the floor."""
    at = {(r["events"], r["kernel"]): r for r in ours if r["case"] == "ours-threads"}
    r = at.get((20000, 100))
    if r is not None and "speedup_vs_dcnum" in r:
        add("N=20000, K=100: the call >= 100x dcnum's, the whole process >= 90x",
            f"{r['speedup_vs_dcnum']:.0f}x call, {r['speedup_vs_dcnum_process']:.0f}x process",
            r["speedup_vs_dcnum"] >= 100 and r["speedup_vs_dcnum_process"] >= 90)  # fmt: skip
    else:
        add("N=20000, K=100: the call >= 100x dcnum's, the whole process >= 90x",
            "not measured", None)  # fmt: skip
    fc = extras.get("first_call")
    if fc is not None and fc["plain"]["status"] == "ok":
        ex = fc["plain"]["extra"]
        parts = fc["parts"]["extra"]["parts"] if fc["parts"]["status"] == "ok" else {}
        kern = sum(t["cpu_s"] for name, t in parts.items() if "kernels" in name)
        add("first-call set-up <= 0.1 s over the steady call (uint8)",
            f"{ex['setup_wall_s']:.2f} s wall, {ex['setup_cpu_s']:.2f} s CPU",
            ex["setup_wall_s"] <= 0.1,
            f"of it the compiled kernels' import and first call: {kern:.3f} s CPU"
            if parts else "")  # fmt: skip
    other = {m: row for m, row in (fc or {}).items()
             if m not in _FIRST_CALL_KEYS and row["status"] == "ok"}  # fmt: skip
    if other:
        # the first call itself, minus the steady call: what a new process adds
        setup = {m: row["extra"]["setup_wall_s"] for m, row in other.items()}
        worst = max(setup, key=setup.get)
        add("first call of another dtype after installation: set-up <= 1 s",
            f"{setup[worst]:.2f} s wall ({worst}, worst)", setup[worst] <= 1.0,
            ", ".join(f"{m}: {v:.2f} s wall, {other[m]['extra']['setup_cpu_s']:.2f} s CPU"
                      for m, v in setup.items()))  # fmt: skip
    r = at.get((200000, 100))
    st = extras.get("io_stages")
    bound = ""
    if st is not None and st["status"] == "ok":
        ns = st["extra"]["ns_per_pixel_event"]
        floor = sum(v for name, v in ns.items() if name.startswith("floor"))
        stages = sum(v for name, v in ns.items() if not name.startswith("floor"))
        bound = f"bound from the stages when CPU-bound: {stages / floor:.2f}x"
    if r is not None and "x_io_floor" in r:
        add("N=200000, K=100: end to end <= 1.3x the I/O floor",
            f"{r['x_io_floor']:.2f}x", r["x_io_floor"] <= 1.3, bound)  # fmt: skip
    else:
        add("N=200000, K=100: end to end <= 1.3x the I/O floor", "not measured", None, bound)


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _exact_text(r):
    if r["status"] == "skipped":
        return ""
    if r.get("exact") is True:
        return "yes"
    if r.get("exact") is False:
        return "NO"
    if r.get("sample_exact"):
        return "sampled"
    return "n/a" if r["status"] == "ok" else ""


def table(rows) -> str:
    head = ["case", "N", "K", "scheduler", "call s", "process s", "ns/px-ev", "x dcnum",
            "x io-floor", "peak RSS MB", "exact", "note"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        note = ""
        if r["status"] == "skipped":
            note = "skipped: " + r["reason"]
        elif r["status"] != "ok":
            note = "FAILED: " + str(r.get("error", ""))[:120]
        elif r["case"] == "graph":
            g = r["graph"]
            note = (f"build; materialise {g['materialize_s']:.2f} s ({g['tasks']} tasks); "
                    f"HDF5 set-up {g['ooc_setup_s']:.2f} s")  # fmt: skip
        elif r["case"] == "kernel":
            note = (
                f"first call {r['first_call_s']:.2f} s; {r['blocks']} blocks x "
                f"{r['block_events']}; median {r['ns_per_pixel_event_median']:.2f} ns"
            )
        elif r["case"] in IO_FLOORS:
            note = (
                f"no compute: reads the input, writes the known result ({r['background_from']}) "
                f"into a lean .rtdc like ours (events/image a virtual dataset)"
            )
        lay = r.get("layout")
        if lay and (lay["chunks"] != EXPECTED_LAYOUT["chunks"]
                    or lay["filters"] != EXPECTED_LAYOUT["filters"]):  # fmt: skip
            note += f" layout differs from dcnum's: {lay['chunks']} {lay['filters']}"
        if r["status"] == "ok" and r.get("exact") is None and r.get("check"):
            note += ("; " if note else "") + r["check"]
        cells = [
            r["case"], str(r.get("events", "")), _fmt(r.get("kernel"), "d"),
            r.get("scheduler") or "", _fmt(r.get("call_s"), ".2f"),
            _fmt(r.get("process_s"), ".2f") if r["case"] != "kernel" else "",
            _fmt(r.get("ns_per_pixel_event"), ".1f" if (r.get("ns_per_pixel_event") or 0) >= 10
                 else ".2f"),
            _fmt(r.get("speedup_vs_dcnum"), ".1f"), _fmt(r.get("x_io_floor"), ".2f"),
            _fmt(r.get("peak_rss_tree_mb"), ".0f"), _exact_text(r), note,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_text(targets) -> str:
    lines = []
    for t in targets:
        state = {True: "met", False: "NOT met", None: "not judged"}[t["met"]]
        lines.append(f"- {t['target']}: {t['measured']} -> {state}")
        if t["detail"]:
            lines.append(f"    {t['detail']}")
    return "\n".join(lines)


# first_call's keys other than the per-dtype runs
_FIRST_CALL_KEYS = ("events", "kernel", "plain", "parts")


def first_call_text(fc: dict) -> str:
    """Set-up of the first call over the steady ones, and where it goes."""
    lines = [f"First compute_background call in a fresh process (N={fc['events']}, "
             f"K={fc['kernel']}; wall and CPU seconds; set-up = first call - fastest of "
             f"calls 2 and 3):"]  # fmt: skip
    modes = [("plain", "as a user runs it"), ("parts", "after the set-up below")]
    modes += [(m, f"{m} images") for m in fc if m not in _FIRST_CALL_KEYS]
    for mode, what in modes:
        row = fc[mode]
        if row["status"] != "ok":
            lines.append(f"- {what}: FAILED {row.get('error')}")
            continue
        ex = row["extra"]
        if ex.get("events"):
            what = f"{what} (file of {ex['events']} frames of the input)"
        calls = ", ".join(f"{c['wall_s']:.2f} / {c['cpu_s']:.2f}" for c in ex["calls"])
        load = ex.get("load_avg")
        note = f"; load {load[0]:.2f}-{load[1]:.2f}" if load else ""
        if ex.get("kernels_compiled"):
            note += f"; {ex['kernels_compiled']} kernels COMPILED in the process"
        lines.append(f"- {what}: calls {calls}; set-up {ex['setup_wall_s']:.2f} s wall, "
                     f"{ex['setup_cpu_s']:.2f} s CPU{note}")  # fmt: skip
        for name, t in ex["parts"].items():
            lines.append(f"    {name}: {t['wall_s']:.3f} s wall, {t['cpu_s']:.3f} s CPU")
    return "\n".join(lines)


def io_stages_text(row: dict) -> str:
    """Each stage of a file job in CPU ns per output pixel-event, and what it bounds."""
    if row["status"] != "ok":
        return f"Stages of a file job: FAILED {row.get('error')}"
    ex = row["extra"]
    ns = ex["ns_per_pixel_event"]
    lines = [
        f"Stages of a file job (K={ex['kernel']}, {ex['blocks']} blocks of {ex['block_events']} "
        f"events, 1 thread, CPU ns per output pixel-event):"
    ]
    lines += [f"- {name}: {v:.2f}" for name, v in ns.items()]
    ours = sum(v for name, v in ns.items() if not name.startswith("floor"))
    floor = sum(v for name, v in ns.items() if name.startswith("floor"))
    io = ours - ns.get("kernel", 0.0)
    lines.append(
        f"ours {ours:.2f} (I/O {io:.2f} + kernel {ns.get('kernel', 0.0):.2f}) vs plain h5py "
        f"floor {floor:.2f}: with every core busy a job cannot run below {ours / floor:.2f}x "
        f"that floor, however the stages overlap"
    )
    return "\n".join(lines)
