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

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk; then
    echo "installing nginx and wrk" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq nginx-light wrk >/dev/null
fi

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 200); do
        if python3 -c "import socket,sys;socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "port $1 never opened" >&2; return 1
}
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)

UP=$(free_port)
"$A" hello --listen "127.0.0.1:$UP" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$UP"

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

start_baton() { # name binary -> BPORT BPID
    local name=$1 bin=$2
    BPORT=$(free_port)
    cat >"$WORK/$name.toml" <<EOF
[server]
control_socket = "$WORK/$name.sock"

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
    python3 - "$label" "$c0" "$c1" "$TCK" <<EOF
import re, sys
label, c0, c1, tck = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t = """$out"""
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v); x = float(m.group(1))
    return x / 1000 if m.group(2) == "us" else x * 1000 if m.group(2) == "s" else x
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
p50 = ms(re.search(r"^\s*50%\s+(\S+)", t, re.M).group(1)); p99 = ms(re.search(r"^\s*99%\s+(\S+)", t, re.M).group(1))
n = int(re.search(r"(\d+) requests in", t).group(1))
bad = re.search(r"(Non-2xx|Socket errors)", t)
print(f"{label} {rps:.0f} {p50:.2f} {p99:.2f} {(c1-c0)/tck*1e6/max(n,1):.1f}{' ERRORS' if bad else ''}")
EOF
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
