#!/usr/bin/env bash
# Compare the baton-bench load generator with `wrk -t1` against the trivial
# loopback server (examples/trivial_server.rs). Runs each tool ROUNDS times,
# alternating, and prints every figure; take the medians.
#
#   crates/baton-bench/scripts/compare-wrk.sh [CONCURRENCY] [DURATION] [ROUNDS]
#
# Needs wrk (apt-get install -y wrk). Traffic goes to 127.0.0.1 only.
set -euo pipefail
c=${1:-64}
d=${2:-5}
rounds=${3:-3}
root=$(cd "$(dirname "$0")/../../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-bench}
cargo build --quiet --release -p baton-bench --examples
bin=$CARGO_TARGET_DIR/release/examples
addr=127.0.0.1:${PORT:-8089}
"$bin/trivial_server" "$addr" 2>/dev/null &
server=$!
trap 'kill $server' EXIT
# Wait (bounded) until the server accepts connections.
for _ in $(seq 50); do
  if (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null; then break; fi
  sleep 0.1
done
for mode in keepalive close; do
  hdr=()
  [ "$mode" = close ] && hdr=(-H "Connection: close")
  for r in $(seq "$rounds"); do
    w=$(wrk -t1 -c"$c" -d"${d}s" "${hdr[@]}" "http://$addr/" | awk '/Requests\/sec/ {print $2}')
    b=$("$bin/loadgen" "http://$addr/" "$c" "${d}s" "$mode" 1 2>/dev/null | sed -n 's/^requests: [0-9]* (\([0-9]*\) req\/s).*/\1/p')
    echo "$mode c=$c round $r: wrk -t1 $w req/s, baton-bench $b req/s"
  done
done
