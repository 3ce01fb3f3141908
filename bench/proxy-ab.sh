#!/usr/bin/env bash
# Two builds of baton proxy (and nginx as the reference) side by side, in
# interleaved rounds, in front of the same upstream (`baton hello`), under
# the same wrk load, on 127.0.0.1 only. For judging a change on a noisy
# machine: compare medians, not single rounds.
#
#   bash bench/proxy-ab.sh BATON_A BATON_B [ROUNDS] [DURATION_SECONDS] [CONNECTIONS] [MODE]
#
# MODE is keepalive (default) or close. Each proxy runs with one worker
# (TOKIO_WORKER_THREADS=1, like nginx's one worker) and the access log off.
# Prints one line per proxy and round (req/s, p50, p99, CPU µs per request
# of the proxy process from /proc) and the medians. Installs nginx and wrk
# with apt-get when missing; every load is bounded in time.
set -euo pipefail

A=$(realpath "$1")
B=$(realpath "$2")
ROUNDS=${3:-5}
DURATION=${4:-6}
CONNS=${5:-32}
MODE=${6:-keepalive}
WORK=$(mktemp -d /tmp/baton-proxy-ab.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    [ -n "${NGX_WORKER:-}" ] && kill -9 "$NGX_WORKER" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

. "$(dirname "$0")/proxy-common.sh"
start_upstream "$A"
start_nginx

start_baton() { # name binary -> BPORT BPID
    local name=$1 bin=$2
    BPORT=$(free_port)
    proxy_config "$WORK/$name.toml" "$BPORT"
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn "$bin" proxy --config "$WORK/$name.toml" >/dev/null 2>&1 &
    BPID=$!
    PIDS+=($BPID)
    wait_port "$BPORT"
}
start_baton a "$A"; APID=$BPID; APORT=$BPORT
start_baton b "$B"; BPID_=$BPID; BPORT_=$BPORT

measure() { # label pid port -> "label rps p50 p99 cpu_us"
    local label=$1 pid=$2 port=$3 extra=()
    [ "$MODE" = close ] && extra=(-H "Connection: close")
    local c0 c1 out
    c0=$(cpu_ticks "$pid")
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "${extra[@]}" "http://127.0.0.1:$port/" 2>&1)
    c1=$(cpu_ticks "$pid")
    read -r rps p50 p99 n bad <<<"$(wrk_summary <<<"$out")"
    local cpu_us
    cpu_us=$(python3 -c "print(f'{($c1-$c0)/$TCK*1e6/max($n,1):.1f}')")
    echo "$label $rps $p50 $p99 $cpu_us$([ "$bad" != 0 ] && echo ' ERRORS')"
}

echo "# $MODE, wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS rounds; columns: req/s p50_ms p99_ms cpu_us_per_req"
RES=$WORK/results
for round in $(seq 1 "$ROUNDS"); do
    for p in "$NGX" "$APORT" "$BPORT_"; do wrk -t1 -c8 -d1s "http://127.0.0.1:$p/" >/dev/null 2>&1 || true; done
    # Alternate the order so that neither build always runs first.
    if [ $((round % 2)) -eq 1 ]; then order="nginx A B"; else order="B A nginx"; fi
    for who in $order; do
        case $who in
            nginx) measure nginx "$NGX_WORKER" "$NGX" ;;
            A) measure A "$APID" "$APORT" ;;
            B) measure B "$BPID_" "$BPORT_" ;;
        esac
    done | tee -a "$RES"
done
echo "# medians"
python3 - "$RES" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.split()
    rows.setdefault(f[0], []).append([float(x) for x in f[1:5]])
for k in ("nginx", "A", "B"):
    cols = list(zip(*rows[k]))
    print(k, " ".join(f"{statistics.median(c):.2f}" for c in cols))
n = [r[0] for r in rows["nginx"]]
for k in ("A", "B"):
    ratios = [r[0] / m for r, m in zip(rows[k], n)]
    print(f"{k}/nginx rate per round:", " ".join(f"{x:.2f}" for x in ratios), f"median {statistics.median(ratios):.2f}")
ab = [b[0] / a[0] for a, b in zip(rows["A"], rows["B"])]
print("B/A rate per round:", " ".join(f"{x:.2f}" for x in ab), f"median {statistics.median(ab):.2f}")
EOF
