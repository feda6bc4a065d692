#!/usr/bin/env bash
# Starts three release `runneld` processes on 127.0.0.1 with their data on the project's disk
# (target/bench-tmp, or $RUNNEL_BENCH_DIR; never /tmp, which may be a RAM disk), runs the four
# standard workloads with `runnel bench` (1 KiB records), prints one JSON summary per line,
# and stops and removes the cluster on exit.
#
#   benches/cluster/run.sh                  # all four workloads, 10 s each
#   SECONDS_PER_RUN=5 benches/cluster/run.sh a c
#
# Workloads (the same four as benches/compare):
#   a  one producer waiting for each acknowledgement
#   b  eight such producers
#   c  one producer with 256 records in flight
#   d  consume a backlog of $BACKLOG records (default 1 000 000) with one consumer
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${SECONDS_PER_RUN:-10}
backlog=${BACKLOG:-1000000}
partitions=${PARTITIONS:-1}
workloads=("$@")
[ ${#workloads[@]} -gt 0 ] || workloads=(a b c d)
cargo build --release --locked -q -p runnel-server -p runnel-cli
runneld=target/release/runneld
runnel=target/release/runnel
base=${RUNNEL_BENCH_DIR:-target/bench-tmp}
mkdir -p "$base"
dir=$(mktemp -d "$base/cluster-XXXXXX")
port=$(( 21000 + RANDOM % 9000 ))
nodes=""
for n in 1 2 3; do
  nodes+="${nodes:+,}$n=127.0.0.1:$((port + 10*n + 1))/127.0.0.1:$((port + 10*n))"
done
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
for n in 1 2 3; do
  "$runneld" --node-id "$n" --data-dir "$dir/node-$n" \
    --listen-client "127.0.0.1:$((port + 10*n))" --listen-peer "127.0.0.1:$((port + 10*n + 1))" \
    --nodes "$nodes" --data-groups 3 --log-level warn >"$dir/node-$n.log" 2>&1 &
  pids+=($!)
done
b="127.0.0.1:$((port + 10)),127.0.0.1:$((port + 20)),127.0.0.1:$((port + 30))"
for _ in $(seq 1 100); do
  "$runnel" -b "$b" health --timeout-ms 500 >/dev/null 2>&1 && break
  sleep 0.2
done
# Leaders settle (the balancer moves them to their preferred nodes) before measuring.
sleep 3
common=(--record-size 1024 --partitions "$partitions" --json --quiet)
for w in "${workloads[@]}"; do
  t="bench-$w-$RANDOM"
  case $w in
    a) "$runnel" -b "$b" bench produce --topic "$t" --producers 1 --window 1 --duration "${secs}s" "${common[@]}" ;;
    b) "$runnel" -b "$b" bench produce --topic "$t" --producers 8 --window 1 --duration "${secs}s" "${common[@]}" ;;
    c) "$runnel" -b "$b" bench produce --topic "$t" --producers 1 --window 256 --duration "${secs}s" "${common[@]}" ;;
    d) "$runnel" -b "$b" bench produce --topic "$t" --producers 1 --window 4096 --records "$backlog" --duration 600s "${common[@]}" >/dev/null
       "$runnel" -b "$b" bench consume --topic "$t" --consumers 1 --from earliest --duration 600s "${common[@]}" ;;
    *) echo "unknown workload $w (a, b, c or d)" >&2; exit 2 ;;
  esac | python3 -c "import json,sys; d=json.load(sys.stdin); d['workload']='$w'; print(json.dumps(d))"
done
