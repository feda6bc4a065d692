#!/usr/bin/env bash
# End-to-end test of the Docker Compose deployment, run by .ci/run when a Docker engine answers.
#  1. Build the static binaries and the FROM-scratch image; bring deploy/compose.yaml up; wait
#     until all three containers are healthy.
#  2. From the host with the `runnel` CLI: create a topic, produce 10 000 records, consume them.
#  3. `docker kill` the node leading the most groups, keep producing, start it again and wait
#     until it has caught up; restart the whole project (new containers, same volumes) and check
#     that no record was lost; tear it down with its volumes.
#  4. Up again: cut one node off the Compose network, keep producing through the other two,
#     reconnect it and wait until every replica has converged; check every record.
#  5. Node 3 loses its disk: a new node 4 joins (`--join`) and replaces it (`cluster
#     replace-node`), as docs/DEPLOY.md says; with node 1 killed, nodes 2 and 4 take writes and
#     serve every record. Tear down with the volumes.
# Every wait is bounded; the project and its volumes are removed on any exit.
# Env: E2E_SKIP_BUILD=1 reuses target/x86_64-unknown-linux-gnu/release and the image;
# E2E_KEEP=1 leaves a failed run's project and work directory for inspection.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
if ! docker info >/dev/null 2>&1; then
    echo "SKIP deploy e2e: no Docker engine answers ('docker info' failed)"
    exit 0
fi
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose)
else
    echo "deploy e2e: Docker answers but neither 'docker compose' nor 'docker-compose' exists" >&2
    exit 1
fi

log() { echo "[e2e $(date +%T)] $*"; }

if [ "${E2E_SKIP_BUILD:-0}" = 1 ]; then
    bin=$("$root/deploy/docker/build.sh" --skip-cargo | tail -1)
else
    bin=$("$root/deploy/docker/build.sh" | tail -1)
fi
runnel="$bin/runnel"

project="runnel-e2e-$$"
network="${project}_runnel"
read -r p1 p2 p3 p4 < <(python3 -c '
import socket
s = [socket.socket() for _ in range(4)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
export RUNNEL_PORT_1=$p1 RUNNEL_PORT_2=$p2 RUNNEL_PORT_3=$p3 RUNNEL_HOST=127.0.0.1 RUNNEL_BIND=127.0.0.1
all="127.0.0.1:$p1,127.0.0.1:$p2,127.0.0.1:$p3"
port_of() { local v="RUNNEL_PORT_$1"; echo "${!v}"; }
work=$(mktemp -d)

C() { "${compose[@]}" -p "$project" -f "$root/deploy/compose.yaml" "$@"; }
cleanup() {
    local rc=$?
    if [ "$rc" != 0 ]; then
        log "FAILED (exit $rc); last node logs:"
        C logs --no-color --tail 60 2>&1 || true
    fi
    if [ "$rc" != 0 ] && [ "${E2E_KEEP:-0}" = 1 ]; then
        log "E2E_KEEP=1: leaving project $project up and $work in place"
        exit "$rc"
    fi
    docker rm -f "${project}-runnel-4" >/dev/null 2>&1 || true
    C down -v --remove-orphans -t 10 >/dev/null 2>&1 || true
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT

# Polls "$@" every second until it succeeds; fails after $deadline seconds.
until_ok() {
    local deadline=$1 what=$2
    shift 2
    local end=$((SECONDS + deadline))
    until "$@" >"$work/last" 2>&1; do
        if [ "$SECONDS" -ge "$end" ]; then
            log "timed out after ${deadline}s waiting for: $what"
            cat "$work/last"
            return 1
        fi
        sleep 1
    done
}

container() { C ps -q "runnel-$1"; }
healthy() {
    local id
    for n in 1 2 3; do
        id=$(container "$n")
        [ -n "$id" ] || return 1
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$id")" = healthy ] || return 1
    done
}

# `cluster status --json` through $1; then a check in Python on it (leader | converged).
status() {
    timeout 30 "$runnel" -b "$1" cluster status --json >"$work/status.json" &&
        python3 - "$2" "$work/status.json" <<'PY'
import json, sys
from collections import Counter
mode, doc = sys.argv[1], json.load(open(sys.argv[2]))
views = {v["answered_by"]: {g["group"]: g for g in v["groups"]} for v in doc["views"]}
groups = sorted({g for v in views.values() for g in v})
# Each group as its leader sees it.
lead = {}
for g in groups:
    for node, v in views.items():
        if g in v and v[g]["leader"] == node:
            lead[g] = v[g]
if mode == "leader":
    if set(lead) != set(groups):
        sys.exit("not every group has a leader")
    print(Counter(x["leader"] for x in lead.values()).most_common(1)[0][0])
elif mode == "converged":
    if not all(n["up"] for n in doc["nodes"]) or len(views) != 3:
        sys.exit("not every node answers")
    for g in groups:
        l = lead.get(g)
        if l is None:
            sys.exit(f"group {g} has no leader")
        if len(l["replicas"]) != 3 or any(r["lag"] != 0 for r in l["replicas"]):
            sys.exit(f"group {g} replicas lag: {l['replicas']}")
        for node, v in views.items():
            if v[g]["applied_index"] != l["committed_index"]:
                sys.exit(f"group {g}: node {node} applied {v[g]['applied_index']} of {l['committed_index']}")
    print("converged")
PY
}

# produce <bootstrap> <topic> <first> <last>: values r<first>..r<last>, every one acknowledged.
produce() {
    seq -f 'r%06g' "$3" "$4" >"$work/in"
    timeout 300 "$runnel" -b "$1" produce "$2" --no-create <"$work/in"
}

# expect <bootstrap> <topic> <n>: the topic holds exactly r000001..r<n>, each once (read to the
# end of every partition, so an extra or duplicated record fails too).
expect() {
    timeout 300 "$runnel" -b "$1" consume "$2" --from earliest --exit-at-end --format json >"$work/out.json"
    python3 -c '
import json, sys
for line in open(sys.argv[1]):
    print(json.loads(line)["value"])' "$work/out.json" >"$work/out"
    local got distinct
    got=$(wc -l <"$work/out")
    distinct=$(sort -u "$work/out" | wc -l)
    seq -f 'r%06g' 1 "$3" >"$work/want"
    if [ "$got" != "$3" ] || [ "$distinct" != "$3" ] || ! cmp -s <(sort "$work/out") "$work/want"; then
        log "topic $2: read $got records ($distinct distinct), expected r000001..r$(printf %06d "$3") once each"
        return 1
    fi
    log "topic $2: all $3 records read back, each once"
}

up() {
    C up -d
    until_ok 120 "three healthy containers" healthy
    until_ok 60 "every group to have a leader" status "$all" leader
}

log "phase 1: compose up (${compose[*]}, project $project, ports $p1 $p2 $p3)"
up
until_ok 60 "topic creation" timeout 20 "$runnel" -b "$all" topic create e2e --partitions 6
produce "$all" e2e 1 10000
expect "$all" e2e 10000

victim=$(status "$all" leader)
log "docker kill node $victim (it leads the most groups)"
docker kill "$(container "$victim")" >/dev/null
produce "$all" e2e 10001 12000
log "2000 records acknowledged with node $victim down; starting it again"
docker start "$(container "$victim")" >/dev/null
until_ok 120 "three healthy containers" healthy
until_ok 120 "node $victim to catch up" status "$all" converged
expect "$all" e2e 12000

log "restarting the whole project: new containers on the same volumes"
C down -t 30
up
until_ok 120 "every replica to converge after the restart" status "$all" converged
expect "$all" e2e 12000
C down -v -t 10
log "phase 1 passed; volumes removed"

log "phase 2: a node cut off the network"
up
until_ok 60 "topic creation" timeout 20 "$runnel" -b "$all" topic create e2e-net --partitions 6
produce "$all" e2e-net 1 1000
cut=$(status "$all" leader)
others=$(for n in 1 2 3; do [ "$n" = "$cut" ] || printf '127.0.0.1:%s,' "$(port_of "$n")"; done)
others=${others%,}
log "disconnecting node $cut from $network"
docker network disconnect "$network" "$(container "$cut")"
produce "$others" e2e-net 1001 4000
log "3000 records acknowledged through the other two; reconnecting node $cut"
# Compose gave the container its service name as a network alias; a reconnect must restore it.
docker network connect --alias "runnel-$cut" "$network" "$(container "$cut")"
until_ok 120 "node $cut to converge" status "$all" converged
expect "$all" e2e-net 4000
log "phase 2 passed"

# docs/DEPLOY.md, "A node lost its disk": node 3's volume is gone; node 4 joins empty and
# replaces it; then node 1 stops and nodes 2 and 4 carry the cluster.
log "phase 3: node 3 lost its disk; node 4 replaces it"
C rm -sf runnel-3 >/dev/null
docker volume rm "${project}_runnel-3-data" >/dev/null
new_name="${project}-runnel-4"
C run -d --name "$new_name" --no-deps \
    -e RUNNEL_NODE_ID=4 \
    -e RUNNEL_NODES="1=runnel-1:9093/127.0.0.1:$p1,2=runnel-2:9093/127.0.0.1:$p2,4=$new_name:9093/127.0.0.1:$p4" \
    -e RUNNEL_JOIN=true -p "127.0.0.1:$p4:9092" runnel-3 >/dev/null
survivors="127.0.0.1:$p1,127.0.0.1:$p2,127.0.0.1:$p4"
until_ok 60 "node 4 to answer" "$runnel" health --addr "127.0.0.1:$p4"
timeout 300 "$runnel" -b "$survivors" cluster replace-node --old 3 --new 4 \
    --peer "$new_name:9093" --client "127.0.0.1:$p4"
until_ok 120 "node 4 to converge" status "$survivors" converged
docker kill "$(container 1)" >/dev/null
log "node 1 killed: nodes 2 and 4 must carry every group"
produce "127.0.0.1:$p2,127.0.0.1:$p4" e2e-net 4001 5000
expect "127.0.0.1:$p2,127.0.0.1:$p4" e2e-net 5000
C down -v -t 10
log "deploy e2e passed: compose up, 17 000 records, a killed node, a full restart, a partitioned node, a replaced node"
