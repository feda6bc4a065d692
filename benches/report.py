#!/usr/bin/env python3
"""Prints the storage benchmark table (MB/s and ratios) from criterion's saved estimates.

Run after `cargo bench -p runnel-benches --bench storage`:  python3 benches/report.py
"""
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "criterion")


def estimate(group, bench, param=None):
    parts = [ROOT, group, bench] + ([str(param)] if param is not None else []) + ["new"]
    base = os.path.join(*parts)
    try:
        with open(os.path.join(base, "estimates.json")) as f:
            est = json.load(f)
        with open(os.path.join(base, "benchmark.json")) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None
    ns = est["median"]["point_estimate"]  # per iteration
    thr = meta.get("throughput") or {}
    if "Bytes" in thr:
        return ("MB/s", thr["Bytes"] / ns * 1e9 / 1e6, ns)
    if "Elements" in thr:
        return ("ops/s", thr["Elements"] / ns * 1e9, ns)
    return ("ns", ns, ns)


def row(label, e, ratio=None):
    if e is None:
        print(f"| {label} | (not run) | | |")
        return
    unit, v, ns = e
    r = f"{ratio:.2f}" if ratio is not None else ""
    print(f"| {label} | {v:,.0f} {unit} | {ns / 1e3:,.1f} µs | {r} |")


print("| benchmark | throughput (median) | time per op | ratio |")
print("|---|---|---|---|")
for n in (100, 1000):
    raw_sync = estimate("append", "raw_write_fdatasync", n)
    raw = estimate("append", "raw_write", n)
    fs = estimate("append", "runnel_fsync", n)
    bu = estimate("append", "runnel_buffered", n)
    row(f"append {n}×1 KiB, raw write+fdatasync (baseline)", raw_sync)
    row(f"append {n}×1 KiB, Runnel PersistMode::Fsync (fdatasync per append) / baseline", fs,
        fs[1] / raw_sync[1] if fs and raw_sync else None)
    row(f"append {n}×1 KiB, raw write, no sync (baseline)", raw)
    row(f"append {n}×1 KiB, Runnel PersistMode::Buffered / baseline", bu,
        bu[1] / raw[1] if bu and raw else None)
    pre = estimate("append", "raw_pwrite_preallocated", n)
    row(f"append {n}×1 KiB, raw pwrite into a preallocated file, no sync", pre)
    row(f"append {n}×1 KiB, Runnel PersistMode::Buffered / preallocated pwrite", bu,
        bu[1] / pre[1] if bu and pre else None)
row("read: sequential 1 MiB reads from the map, CRC checked", estimate("read", "sequential_1MiB_reads_256MiB"))
row("recovery: scanner over 250 MiB in memory", estimate("recovery", "scan_in_memory_250MiB"))
row("recovery: open + scan of a 250 MiB active segment", estimate("recovery", "open_scanning_active_segment_250MiB"))
one = estimate("wal", "append_durable_one_at_a_time")
win = estimate("wal", "append_64_in_flight")
row("WAL: 1 KiB entries, fdatasync'ed, one at a time", one)
row("WAL: 1 KiB entries, fdatasync'ed, 64 in flight (group commit) / one at a time", win,
    win[1] / one[1] if win and one else None)
sys.exit(0)
