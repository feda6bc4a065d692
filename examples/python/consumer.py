#!/usr/bin/env python3
"""Consumes a Runnel topic: resumes each partition at the group's committed offset, reads up to
the high watermark, and commits after processing (at-least-once). With --replay-from it reads
one partition from an offset instead, without committing.

    python3 consumer.py --bootstrap 127.0.0.1:9092 --topic demo --group billing
    python3 consumer.py --bootstrap 127.0.0.1:9092 --topic demo --partition 0 --replay-from 10

Prints one JSON line per record: {"partition", "offset", "value"}.
"""
import argparse
import json

from common import Cluster, pb


def read_until_hw(c, topic, partition, offset, on_record):
    """Fetches from `offset` until the high watermark; returns the next offset to consume."""
    while True:
        req = pb.FetchRequest(topic=topic, partition=partition, offset=offset, max_bytes=1 << 20, max_wait_ms=0)
        resp = c.call(topic, partition, lambda b: b.Fetch(req, timeout=30))
        for r in resp.records:
            on_record(partition, r)
        offset = resp.next_offset
        if offset >= resp.high_watermark:
            return offset


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group")
    ap.add_argument("--partition", type=int)
    ap.add_argument("--replay-from", type=int)
    args = ap.parse_args()

    c = Cluster(args.bootstrap)
    partitions = c.refresh(args.topic)

    def emit(p, r):
        print(json.dumps({"partition": p, "offset": r.offset, "value": r.value.decode()}), flush=True)

    if args.replay_from is not None:
        p = args.partition or 0
        read_until_hw(c, args.topic, p, args.replay_from, emit)
        return

    if not args.group:
        raise SystemExit("--group is required unless --replay-from is given")
    for p in range(partitions) if args.partition is None else [args.partition]:
        fo = pb.FetchOffsetsRequest(group=args.group, topic=args.topic, partitions=[p])
        committed = c.call(args.topic, p, lambda b: _first(b.FetchOffsets(fo, timeout=30)))
        start = committed.offset if committed.offset >= 0 else 0
        nxt = read_until_hw(c, args.topic, p, start, emit)
        # Commit only after the records were processed (printed).
        co = pb.CommitOffsetsRequest(group=args.group, topic=args.topic, offsets=[pb.PartitionOffset(partition=p, offset=nxt)])
        c.call(args.topic, p, lambda b: _first(b.CommitOffsets(co, timeout=30)))


class _first:
    """Adapts a per-partition list response to the single-`error` shape Cluster.call expects."""

    def __init__(self, resp):
        items = list(getattr(resp, "offsets", None) or getattr(resp, "results", None) or [])
        self.item = items[0]
        self.error = self.item.error
        self.offset = getattr(self.item, "offset", -1)

    def HasField(self, name):
        return self.item.HasField(name)


if __name__ == "__main__":
    main()
