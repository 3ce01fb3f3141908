#!/usr/bin/env bash
# baton proxy vs nginx, side by side in one run, in front of the same
# upstream (`baton hello`), under the same wrk load, on 127.0.0.1 only.
#
#   bash bench/proxy-vs-nginx.sh [DURATION_SECONDS] [CONNECTIONS] [ROUNDS]
#
# Measures, for each proxy and for keep-alive and new-connection-per-request
# clients: requests/s, p50/p99 latency (wrk --latency), CPU time per request
# (utime+stime of the proxy process from /proc, over the run) and resident
# memory (VmRSS after the run, VmHWM peak). nginx: the Debian package, one
# worker, proxy_pass to an upstream block with `keepalive`, access log off.
# baton proxy: release build, TOKIO_WORKER_THREADS=1 (one worker, like
# nginx) and again with the default (one per core), access log off.
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
    [ -f "$WORK/nginx/nginx.pid" ] && kill -QUIT "$(cat "$WORK/nginx/nginx.pid")" 2>/dev/null || true
    sleep 1
    for f in "$WORK"/*.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    [ -n "${NGX_WORKER:-}" ] && kill -9 "$NGX_WORKER" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk; then
    echo "installing nginx and wrk" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq nginx-light wrk >/dev/null
fi

cd "$ROOT"
cargo build --release -q -p baton-cli
BATON="${CARGO_TARGET_DIR:-$ROOT/target}/release/baton"

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 200); do
        if python3 -c "import socket,sys;socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "port $1 never opened" >&2; return 1
}
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS/{print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/{print $2}' "/proc/$1/status"; }
TCK=$(getconf CLK_TCK)

UP=$(free_port)
"$BATON" hello --listen "127.0.0.1:$UP" >"$WORK/hello.out" 2>"$WORK/hello.err" &
PIDS+=($!)
wait_port "$UP"

# ---- nginx -----------------------------------------------------------------
NGX=$(free_port)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    upstream app { server 127.0.0.1:$UP; keepalive 64; }
    server {
        listen 127.0.0.1:$NGX;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }
}
EOF
nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
PIDS+=($!)
wait_port "$NGX"
NGX_WORKER=$(pgrep -P "$(cat "$WORK/nginx/nginx.pid")" | head -1)

# ---- baton proxy -----------------------------------------------------------
start_baton() { # name threads -> sets BPORT BPID BSOCK
    local name=$1 threads=$2
    BPORT=$(free_port)
    BSOCK="$WORK/$name.sock"
    cat >"$WORK/$name.toml" <<EOF
[server]
control_socket = "$BSOCK"
pid_file = "$WORK/$name.pid"
drain_timeout = "10s"

[[listeners]]
name = "web"
address = "127.0.0.1:$BPORT"

[upstreams.app]
servers = ["127.0.0.1:$UP"]

[[routes]]
listener = "web"
path_prefix = "/"
upstream = "app"
EOF
    if [ "$threads" = default ]; then
        RUST_LOG=warn "$BATON" proxy --config "$WORK/$name.toml" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    else
        TOKIO_WORKER_THREADS=$threads RUST_LOG=warn "$BATON" proxy --config "$WORK/$name.toml" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    fi
    BPID=$!
    PIDS+=($BPID)
    wait_port "$BPORT"
}

# wrk once; prints "rps p50_ms p99_ms requests"
run_wrk() { # port mode
    local port=$1 mode=$2 extra=()
    [ "$mode" = close ] && extra=(-H "Connection: close")
    wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "${extra[@]}" "http://127.0.0.1:$port/" 2>&1 | python3 -c '
import re, sys
t = sys.stdin.read()
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v); x = float(m.group(1))
    return x / 1000 if m.group(2) == "us" else x * 1000 if m.group(2) == "s" else x
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
# Anchored: the Stdev column of the latency line can end in 50% too.
p50 = ms(re.search(r"^\s*50%\s+(\S+)", t, re.M).group(1)); p99 = ms(re.search(r"^\s*99%\s+(\S+)", t, re.M).group(1))
n = int(re.search(r"(\d+) requests in", t).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
sock = re.search(r"Socket errors: (.*)", t)
bad = int(errs.group(1)) if errs else 0
if sock:
    bad += sum(int(x) for x in re.findall(r"\d+", sock.group(1)))
print(f"{rps:.0f} {p50:.2f} {p99:.2f} {n} {bad}")
'
}

measure() { # label pid port mode
    local label=$1 pid=$2 port=$3 mode=$4
    local c0 c1 out
    c0=$(cpu_ticks "$pid")
    out=$(run_wrk "$port" "$mode")
    c1=$(cpu_ticks "$pid")
    read -r rps p50 p99 n bad <<<"$out"
    local cpu_us
    cpu_us=$(python3 -c "print(f'{($c1-$c0)/$TCK*1e6/max($n,1):.1f}')")
    echo "| $label | $mode | $rps | $p50 | $p99 | $cpu_us | $(rss_kb "$pid") / $(hwm_kb "$pid") | $bad |"
}

start_baton b1 1
B1=$BPID; B1PORT=$BPORT
start_baton bd default
BD=$BPID; BDPORT=$BPORT

echo "## proxy throughput and latency ($(nproc) cores, wrk -t1 -c$CONNS -d${DURATION}s, upstream: baton hello)"
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
