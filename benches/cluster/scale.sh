#!/usr/bin/env bash
# Partition count at scale: starts three release `runneld` processes on 127.0.0.1 (data under
# target/bench-tmp or $RUNNEL_BENCH_DIR), creates PARTITIONS partitions (topics of at most 1000),
# writes one record to each of the first topic's partitions, then reports per node: open
# descriptors, resident memory (VmRSS and its file-backed part RssFile), disk held by the data
# directory (allocated blocks), and the time one node takes to restart (SIGTERM, start, until
# gRPC health says SERVING). Prints one JSON object.
#
#   PARTITIONS=1000 benches/cluster/scale.sh
#   PARTITIONS=10000 benches/cluster/scale.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
partitions=${PARTITIONS:-1000}
groups=${DATA_GROUPS:-3}
cargo build --release --locked -q -p runnel-server -p runnel-cli
runneld=target/release/runneld
runnel=target/release/runnel
base=${RUNNEL_BENCH_DIR:-target/bench-tmp}
mkdir -p "$base"
dir=$(mktemp -d "$base/scale-XXXXXX")
port=$(( 21000 + RANDOM % 9000 ))
nodes=""
for n in 1 2 3; do
  nodes+="${nodes:+,}$n=127.0.0.1:$((port + 10*n + 1))/127.0.0.1:$((port + 10*n))"
done
declare -A pids
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
start() {
  local n=$1
  "$runneld" --node-id "$n" --data-dir "$dir/node-$n" \
    --listen-client "127.0.0.1:$((port + 10*n))" --listen-peer "127.0.0.1:$((port + 10*n + 1))" \
    --nodes "$nodes" --data-groups "$groups" --log-level warn >>"$dir/node-$n.log" 2>&1 &
  pids[$n]=$!
}
wait_serving() {
  for _ in $(seq 1 6000); do
    "$runnel" health --addr "127.0.0.1:$((port + 10*$1))" --timeout-ms 500 >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "node $1 never served" >&2; return 1
}
for n in 1 2 3; do start "$n"; done
for n in 1 2 3; do wait_serving "$n"; done
b="127.0.0.1:$((port + 10)),127.0.0.1:$((port + 20)),127.0.0.1:$((port + 30))"
sleep 3
t0=$(date +%s.%N)
left=$partitions; i=0
while [ "$left" -gt 0 ]; do
  p=$(( left > 1000 ? 1000 : left ))
  "$runnel" -b "$b" topic create "scale-$i" --partitions "$p" >/dev/null
  left=$(( left - p )); i=$(( i + 1 ))
done
t1=$(date +%s.%N)
first=$(( partitions > 1000 ? 1000 : partitions ))
seq 1 "$first" | "$runnel" -b "$b" produce scale-0 >/dev/null
sleep 2
measure() {
  local pid=${pids[$1]}
  local fds rss file kib
  fds=$(ls "/proc/$pid/fd" | wc -l)
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
  file=$(awk '/^RssFile:/ {print $2}' "/proc/$pid/status")
  kib=$(du -sk "$dir/node-$1" | cut -f1)
  echo "{\"node\": $1, \"open_fds\": $fds, \"vm_rss_kib\": $rss, \"rss_file_kib\": $file, \"disk_kib\": $kib}"
}
m1=$(measure 1); m2=$(measure 2); m3=$(measure 3)
kill -TERM "${pids[3]}"; wait "${pids[3]}" || true
r0=$(date +%s.%N)
start 3
wait_serving 3
r1=$(date +%s.%N)
sleep 2
m3b=$(measure 3)
python3 - "$partitions" "$t0" "$t1" "$r0" "$r1" "$m1" "$m2" "$m3" "$m3b" <<'EOF'
import json, sys
p, t0, t1, r0, r1 = int(sys.argv[1]), *map(float, sys.argv[2:6])
print(json.dumps({
    "partitions": p,
    "create_s": round(t1 - t0, 1),
    "restart_s": round(r1 - r0, 1),
    "nodes": [json.loads(x) for x in sys.argv[6:9]],
    "node3_after_restart": json.loads(sys.argv[9]),
}))
EOF
