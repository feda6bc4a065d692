"""Shared helpers: connections, leader lookup, retries on retriable in-band codes."""
import time

import grpc

from runnel_stubs import load

pb, rpc = load()

RETRIABLE = {
    pb.NOT_LEADER,
    pb.LEADER_NOT_AVAILABLE,
    pb.NOT_READY,
    pb.REQUEST_TIMED_OUT,
    pb.UNKNOWN_SERVER_ERROR,
}


class Cluster:
    """Channels to the nodes and a cache of partition leaders."""

    def __init__(self, bootstrap):
        self.nodes = [a.strip() for a in bootstrap.split(",") if a.strip()]
        self.channels = {}
        self.leaders = {}

    def broker(self, addr):
        if addr not in self.channels:
            self.channels[addr] = grpc.insecure_channel(addr)
        return rpc.BrokerStub(self.channels[addr])

    def admin(self, addr=None):
        addr = addr or self.nodes[0]
        if addr not in self.channels:
            self.channels[addr] = grpc.insecure_channel(addr)
        return rpc.AdminStub(self.channels[addr])

    def refresh(self, topic):
        for addr in self.nodes:
            try:
                meta = self.broker(addr).Metadata(pb.MetadataRequest(topics=[topic]), timeout=5)
            except grpc.RpcError:
                continue
            for t in meta.topics:
                if t.error.code == pb.NONE:
                    for p in t.partitions:
                        if p.leader_address:
                            self.leaders[(topic, p.partition)] = p.leader_address
                    return len(t.partitions)
                raise SystemExit(f"topic {topic}: {pb.ErrorCode.Name(t.error.code)} {t.error.message}")
        raise SystemExit("no node answered")

    def leader(self, topic, partition):
        if (topic, partition) not in self.leaders:
            self.refresh(topic)
        return self.leaders.get((topic, partition), self.nodes[0])

    def call(self, topic, partition, fn, deadline_s=30):
        """Calls fn(broker_stub) at the partition's leader until its `error` is not retriable.

        A NOT_LEADER answer carries the leader's address: follow it at once. Other retriable
        codes (and transport errors) back off and refresh metadata.
        """
        deadline = time.monotonic() + deadline_s
        backoff = 0.02
        while True:
            try:
                resp = fn(self.broker(self.leader(topic, partition)))
                err = resp.error if resp.HasField("error") else None
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                err = None
                resp = None
            if resp is not None and (err is None or err.code == pb.NONE):
                return resp
            if err is not None and err.code not in RETRIABLE:
                raise RuntimeError(f"{pb.ErrorCode.Name(err.code)}: {err.message}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}/{partition}: retries ran out")
            if err is not None and err.code == pb.NOT_LEADER and err.leader.address:
                self.leaders[(topic, partition)] = err.leader.address
                continue
            self.leaders.pop((topic, partition), None)
            time.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
