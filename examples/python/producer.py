#!/usr/bin/env python3
"""Produces records to a Runnel topic with an idempotent producer id (retries never duplicate).

    python3 producer.py --bootstrap 127.0.0.1:9092 --topic demo --count 1000

Prints one JSON line per acknowledged batch: {"partition", "base_offset", "last_offset", "values"}.
"""
import argparse
import json
import time

from common import RETRIABLE, Cluster, pb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--partitions", type=int, default=3, help="when creating the topic")
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--batch", type=int, default=50, help="records per request")
    args = ap.parse_args()

    c = Cluster(args.bootstrap)
    # Any node answers admin calls (it forwards to the metadata leader); while the cluster is
    # still electing leaders the answer is a retriable code.
    deadline = time.monotonic() + 30
    while True:
        r = c.admin().CreateTopic(pb.CreateTopicRequest(name=args.topic, partitions=args.partitions), timeout=30)
        if r.error.code in (pb.NONE, pb.TOPIC_ALREADY_EXISTS):
            break
        if r.error.code not in RETRIABLE or time.monotonic() > deadline:
            raise SystemExit(f"create topic: {pb.ErrorCode.Name(r.error.code)} {r.error.message}")
        time.sleep(0.1)
    partitions = c.refresh(args.topic)

    # One producer id; a sequence per partition. A retry resends the same sequence, so the
    # server answers a batch it already has with its original offsets.
    while True:
        init = c.broker(c.nodes[0]).InitProducerId(pb.InitProducerIdRequest(), timeout=30)
        if init.error.code == pb.NONE:
            break
        if init.error.code not in RETRIABLE or time.monotonic() > deadline:
            raise SystemExit(f"init producer id: {init.error.message}")
        time.sleep(0.1)
    seq = [0] * partitions

    sent = 0
    while sent < args.count:
        n = min(args.batch, args.count - sent)
        p = (sent // args.batch) % partitions
        values = [f"py-{i}" for i in range(sent, sent + n)]
        req = pb.ProduceRequest(
            topic=args.topic,
            partition=p,
            records=[pb.Record(key=v.encode(), value=v.encode(), headers=[pb.Header(key="lang", value=b"python")]) for v in values],
            producer_id=init.producer_id,
            producer_epoch=init.producer_epoch,
            base_sequence=seq[p],
        )
        resp = c.call(args.topic, p, lambda b: b.Produce(req, timeout=30))
        seq[p] += n
        sent += n
        print(json.dumps({"partition": p, "base_offset": resp.base_offset, "last_offset": resp.last_offset, "values": values}), flush=True)


if __name__ == "__main__":
    main()
