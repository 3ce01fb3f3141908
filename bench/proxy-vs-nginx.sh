#!/usr/bin/env bash
# baton proxy vs nginx, side by side in one run, in front of the same
# upstream (`baton hello`), under the same wrk load, on 127.0.0.1 only.
#
#   bash bench/proxy-vs-nginx.sh [DURATION_SECONDS] [CONNECTIONS] [ROUNDS]
#   FAST_ONLY=1 bash bench/proxy-vs-nginx.sh ...   # only the fast-upstream tables
#   FAST_UPSTREAM=return BODIES=2 ...   # the fast upstream answers with `return 200`, not a file
#
# Measures, for each proxy and for keep-alive and new-connection-per-request
# clients: requests/s, p50/p99 latency (wrk --latency), CPU time per request
# (utime+stime of the proxy process from /proc, over the run) and resident
# memory (VmRSS after the run, VmHWM peak). nginx: the Debian package, one
# worker, proxy_pass to an upstream block with `keepalive`, access log off.
# baton proxy: release build, TOKIO_WORKER_THREADS=1 (one worker, like
# nginx) and again with the default (one per core), access log off.
#
# Then the same with a fast upstream (nginx answering 200 with a 2-byte
# body, and with a 4 KiB one), which leaves the proxies' own cost to
# measure: in front of it nginx with one worker and with one per core, and
# baton proxy with one worker and with one per core, with each worker
# model (`[server] runtime`: the tokio multi-thread runtime, and one
# current-thread runtime per worker), rounds interleaved; CPU per request
# counts every process and thread of a proxy, and "client CPU %" is what
# wrk used. BODIES="2" runs only the 2-byte body.
#
# Then, through baton proxy only: `baton bench` with 20 reloads and with 20
# upgrades under load (failed requests must be 0), and the time to reload a
# configuration of 10,000 routes with the p99 of wrk with and without those
# reloads going on.
#
# Installs nginx and wrk with apt-get when missing. Prints Markdown for
# docs/BENCH-PROXY.md. Every load is bounded in time.
set -euo pipefail

DURATION=${1:-10}
CONNS=${2:-32}
ROUNDS=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/baton-proxy-bench.XXXXXX)
PIDS=()
cleanup() {
    # Upgrades start new generations whose pids we did not start directly:
    # stop each proxy through its control socket and kill what its pid
    # file names; nginx's master is asked to stop its worker.
    for sock in "$WORK"/*.sock; do
        [ -S "$sock" ] && [ -n "${BATON:-}" ] && timeout 5 "$BATON" ctl --socket "$sock" stop >/dev/null 2>&1 || true
    done
    for f in "$WORK"/*/nginx.pid; do [ -f "$f" ] && kill -QUIT "$(cat "$f")" 2>/dev/null || true; done
    sleep 1
    for f in "$WORK"/*.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    [ -n "${NGX_WORKER:-}" ] && kill -9 "$NGX_WORKER" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

. "$ROOT/bench/proxy-common.sh"

cd "$ROOT"
cargo build --release -q -p baton-cli
BATON="${CARGO_TARGET_DIR:-$ROOT/target}/release/baton"

start_upstream "$BATON"
start_nginx

# ---- baton proxy -----------------------------------------------------------
start_baton() { # name threads [runtime] -> sets BPORT BPID BSOCK
    local name=$1 threads=$2
    BPORT=$(free_port)
    BSOCK="$WORK/$name.sock"
    proxy_config "$WORK/$name.toml" "$BPORT" "pid_file = \"$WORK/$name.pid\"
drain_timeout = \"10s\"
runtime = \"${3:-multi-thread}\""
    if [ "$threads" = default ]; then
        RUST_LOG=warn "$BATON" proxy --config "$WORK/$name.toml" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    else
        TOKIO_WORKER_THREADS=$threads RUST_LOG=warn "$BATON" proxy --config "$WORK/$name.toml" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    fi
    BPID=$!
    PIDS+=($BPID)
    wait_port "$BPORT"
}

# wrk once; prints "rps p50_ms p99_ms requests errors" and leaves wrk's CPU
# seconds in $WORK/client.cpu
run_wrk() { # port mode
    local port=$1 mode=$2 extra=()
    [ "$mode" = close ] && extra=(-H "Connection: close")
    timed wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "${extra[@]}" "http://127.0.0.1:$port/" 2>&1 | wrk_summary
}

# sample PID PORT MODE: one wrk run; sets RPS P50 P99 BAD, CPU_US (CPU of
# PID and its children per request) and CLIENT (wrk's CPU, % of a core).
sample() {
    local pid=$1 c0 c1 n
    c0=$(tree_ticks "$pid")
    read -r RPS P50 P99 n BAD <<<"$(run_wrk "$2" "$3")"
    c1=$(tree_ticks "$pid")
    CPU_US=$(python3 -c "print(f'{($c1-$c0)/$TCK*1e6/max($n,1):.1f}')")
    CLIENT=$(python3 -c "print(f'{$(cat "$WORK/client.cpu")/$DURATION*100:.0f}')")
}

measure() { # label pid port mode
    sample "$2" "$3" "$4"
    echo "| $1 | $4 | $RPS | $P50 | $P99 | $CPU_US | $(rss_kb "$2") / $(hwm_kb "$2") | $BAD |"
}

# table TITLE: nginx ($NGX, $NGX_WORKER), baton proxy with one worker ($B1,
# $B1PORT) and one per core ($BD, $BDPORT), rounds interleaved.
table() {
    echo "## $1 ($(nproc) cores, wrk -t1 -c$CONNS -d${DURATION}s)"
    echo
    echo "| proxy | clients | req/s | p50 ms | p99 ms | CPU µs/req | RSS / peak KiB | errors |"
    echo "|---|---|---|---|---|---|---|---|"
    for round in $(seq 1 "$ROUNDS"); do
    for mode in keepalive close; do
        # warm both up (pools, page cache) without measuring
        wrk -t1 -c8 -d1s "http://127.0.0.1:$NGX/" >/dev/null 2>&1 || true
        wrk -t1 -c8 -d1s "http://127.0.0.1:$B1PORT/" >/dev/null 2>&1 || true
        measure "nginx 1 worker" "$NGX_WORKER" "$NGX" "$mode"
        measure "baton proxy 1 worker" "$B1" "$B1PORT" "$mode"
        measure "baton proxy $(nproc) workers" "$BD" "$BDPORT" "$mode"
    done
    done
    echo
}

start_baton b1 1
B1=$BPID; B1PORT=$BPORT
start_baton bd default
BD=$BPID; BDPORT=$BPORT
[ -z "${FAST_ONLY:-}" ] && table "proxy throughput and latency, upstream: baton hello"

# ---- a fast upstream -----------------------------------------------------------
# fast_measure label pid port mode: like measure, with wrk's CPU in place
# of memory.
fast_measure() {
    sample "$2" "$3" "$4"
    echo "| $1 | $4 | $RPS | $P50 | $P99 | $CPU_US | $CLIENT | $BAD |"
}
SAVED=("$UP" "$BD" "$BDPORT")
N=$(nproc)
for bytes in ${BODIES:-2 4096}; do
    start_fast_upstream "$bytes"
    UP=$UPF
    start_nginx "nginx-fast1-$bytes" 1; N1=$NGX_MASTER; N1P=$NGX
    start_nginx "nginx-fastn-$bytes" "$N"; NN=$NGX_MASTER; NNP=$NGX
    start_baton "f1-$bytes" 1; M1=$BPID; M1P=$BPORT
    start_baton "fd-$bytes" "$N"; MN=$BPID; MNP=$BPORT
    start_baton "w1-$bytes" 1 per-worker; W1=$BPID; W1P=$BPORT
    start_baton "wn-$bytes" "$N" per-worker; WN=$BPID; WNP=$BPORT
    echo "## proxy throughput and latency, fast upstream (nginx, a $bytes-byte body by ${FAST_UPSTREAM:-file}; $N cores, wrk -t1 -c$CONNS -d${DURATION}s)"
    echo
    echo "| proxy | clients | req/s | p50 ms | p99 ms | CPU µs/req | client CPU % | errors |"
    echo "|---|---|---|---|---|---|---|---|"
    for round in $(seq 1 "$ROUNDS"); do
    for mode in keepalive close; do
        for port in "$N1P" "$NNP" "$M1P" "$MNP" "$W1P" "$WNP"; do
            wrk -t1 -c8 -d1s "http://127.0.0.1:$port/" >/dev/null 2>&1 || true
        done
        fast_measure "nginx 1 worker" "$N1" "$N1P" "$mode"
        fast_measure "baton proxy 1 worker, multi-thread" "$M1" "$M1P" "$mode"
        fast_measure "baton proxy 1 worker, per-worker" "$W1" "$W1P" "$mode"
        fast_measure "nginx $N workers" "$NN" "$NNP" "$mode"
        fast_measure "baton proxy $N workers, multi-thread" "$MN" "$MNP" "$mode"
        fast_measure "baton proxy $N workers, per-worker" "$WN" "$WNP" "$mode"
    done
    done
    echo
done
UP=${SAVED[0]}; BD=${SAVED[1]}; BDPORT=${SAVED[2]}
[ -n "${FAST_ONLY:-}" ] && exit 0

# ---- zero failed requests across 20 reloads and 20 upgrades ------------------
echo "## baton bench through baton proxy"
echo
echo '```'
for action in reload upgrade; do
for mode in keepalive close; do
    echo "\$ baton bench --url http://127.0.0.1:PORT/ --control-socket SOCK --action $action --mode $mode --restarts 20 --duration 10s --concurrency 16"
    "$BATON" bench --url "http://127.0.0.1:$BDPORT/" --control-socket "$WORK/bd.sock" --action "$action" \
        --mode "$mode" --restarts 20 --duration 10s --concurrency 16 >"$WORK/bench.txt" 2>&1 || true
    sed -n '1,/^errors in restart windows/p' "$WORK/bench.txt"
    echo "restarts answered ok: $(grep -c 'answered ok' "$WORK/bench.txt") of 20"
    echo
done
done
echo '```'
echo

# ---- 10,000 routes -----------------------------------------------------------
python3 - "$WORK/bd.toml" "$UP" <<'EOF'
import sys
path, up = sys.argv[1], sys.argv[2]
text = open(path).read()
routes = "".join(
    f'\n[[routes]]\nlistener = "web"\npath_prefix = "/r{i}"\nupstream = "app"\n' for i in range(10000)
)
open(path + ".10k", "w").write(text + routes)
EOF
cp "$WORK/bd.toml.10k" "$WORK/bd.toml"
reload_ms() {
    python3 - "$WORK/bd.sock" <<'EOF'
import json, socket, sys
def req(cmd):
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
    s.sendall((json.dumps({"command": cmd}) + "\n").encode())
    line = s.makefile().readline(); s.close(); return json.loads(line)
a = req("reload"); assert a["ok"], a
st = req("status")
print(f'{st["last_reload"]["elapsed_ms"]:.1f} {st["proxy"]["routes"]}')
EOF
}
echo "## reloading 10,000 routes"
echo
ms=()
for _ in $(seq 1 5); do ms+=("$(reload_ms)"); done
echo "reload (read + parse + validate + build + swap), 5 times: $(printf '%s ms; ' "${ms[@]%% *}")routes: ${ms[0]##* }"
echo
# In-flight latency with and without a reload every 0.5 s, interleaved
# rounds. The reloads are asked with `baton ctl` (a Python client would cost
# the shared cores more than the reload itself).
echo "| wrk keep-alive through baton proxy (10,000 routes) | round | req/s | p50 ms | p99 ms |"
echo "|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
    read -r r p50 p99 _ <<<"$(run_wrk "$BDPORT" keepalive)"
    echo "| no reloads | $round | $r | $p50 | $p99 |"
    ( end=$((SECONDS + DURATION)); while [ $SECONDS -lt $end ]; do "$BATON" ctl --socket "$WORK/bd.sock" reload >/dev/null; sleep 0.5; done ) &
    RL=$!
    read -r r p50 p99 _ <<<"$(run_wrk "$BDPORT" keepalive)"
    wait $RL || true
    echo "| a reload every 0.5 s | $round | $r | $p50 | $p99 |"
done
echo

# The same below saturation: a fixed rate (about a quarter of what the
# machine can do), so that there is idle CPU for the reload to use.
RATE=${RATE:-8000}
echo "| baton bench keep-alive at $RATE req/s, 32 clients, through baton proxy (10,000 routes) | round | requests | failed | p50 ms | p99 ms | p99.9 ms |"
echo "|---|---|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
    for restarts in 0 20; do
        out=$("$BATON" bench --url "http://127.0.0.1:$BDPORT/" --control-socket "$WORK/bd.sock" --action reload \
            --restarts "$restarts" --rate "$RATE" --concurrency 32 --duration "${DURATION}s" --warmup 1s 2>/dev/null || true)
        label="no reloads"; [ "$restarts" = 20 ] && label="20 reloads (one per $((DURATION * 1000 / 20)) ms)"
        echo "$out" | awk -v l="$label" -v r="$round" '/^requests:/{n=$2; f=$NF} /^  all/{print "| " l " | " r " | " n " | " f " | " $2 " | " $4 " | " $5 " |"}'
    done
done
