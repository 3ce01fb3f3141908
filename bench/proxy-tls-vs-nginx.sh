#!/usr/bin/env bash
# baton proxy vs nginx over TLS, side by side in one run, in front of the
# same fast upstream (nginx answering 200 with a 2-byte body from the page
# cache), on 127.0.0.1 only, with the same ECDSA P-256 certificate.
#
#   bash bench/proxy-tls-vs-nginx.sh [DURATION_SECONDS] [CONNECTIONS] [ROUNDS]
#
# For each proxy, one worker each and then one per core (nginx
# `worker_processes`, baton proxy TOKIO_WORKER_THREADS), rounds
# interleaved:
#   - TLS handshakes per second: wrk with `Connection: close`, a new TLS
#     connection (a full handshake: wrk does not resume sessions) per
#     request; `handshake-few`: the same with FEW connections (default 4),
#     where less of the latency is wrk's own queueing;
#   - HTTP/1.1 keep-alive over TLS: wrk;
#   - HTTP/2: h2load, CONNECTIONS connections with 10 streams each; p50 and
#     p99 from its per-request log.
# Reported: requests/s, p50/p99 latency, CPU time per request of the proxy
# (utime+stime of all its processes from /proc, over the run), the CPU the
# load generator used (% of one core: at 100 it is what limits the run, and
# its own queueing is part of the latency it reports), errors.
#
# MODES="handshake h2" runs only those loads (default: handshake,
# keepalive and h2; handshake-few only when named).
# FAST_UPSTREAM=return: the upstream answers with nginx's `return 200`
# instead of the file (see start_fast_upstream in proxy-common.sh).
#
# Installs nginx, wrk, h2load (nghttp2-client) and openssl with apt-get when
# missing. Prints Markdown for docs/BENCH-PROXY.md. Every load is bounded
# in time.
set -euo pipefail

DURATION=${1:-8}
CONNS=${2:-32}
ROUNDS=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/baton-proxy-tls-bench.XXXXXX)
PIDS=()
cleanup() {
    for f in "$WORK"/*/nginx.pid; do [ -f "$f" ] && kill -QUIT "$(cat "$f")" 2>/dev/null || true; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    pkill -9 -f "$WORK" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

. "$ROOT/bench/proxy-common.sh"
if ! need h2load || ! need openssl; then
    echo "installing h2load and openssl" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq nghttp2-client openssl >/dev/null
fi

cd "$ROOT"
cargo build --release -q -p baton-cli
BATON="${CARGO_TARGET_DIR:-$ROOT/target}/release/baton"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$WORK/site.key" -out "$WORK/site.pem" -days 2 -subj /CN=site.test \
    -addext subjectAltName=DNS:site.test 2>/dev/null
chmod o+r "$WORK/site.key" "$WORK/site.pem"

start_fast_upstream 2
UP=$UPF

# nginx_tls NAME WORKERS -> PORT, PROC (its master's pid)
nginx_tls() {
    local d="$WORK/$1"
    PORT=$(free_port)
    nginx_proxy_conf "$d" "$PORT" "$2" "ssl http2" \
        "ssl_certificate $WORK/site.pem; ssl_certificate_key $WORK/site.key; ssl_protocols TLSv1.2 TLSv1.3; keepalive_requests 1000000;"
    nginx -p "$d" -c "$d/nginx.conf" -g 'daemon off;' &
    PIDS+=($!)
    PROC=$!
    wait_port "$PORT"
}

# baton_tls NAME THREADS -> PORT, PROC
baton_tls() {
    PORT=$(free_port)
    cat >"$WORK/$1.toml" <<EOF2
[server]
control_socket = "$WORK/$1.sock"

[[listeners]]
name = "secure"
address = "127.0.0.1:$PORT"
protocol = "https"
[[listeners.certificates]]
cert = "$WORK/site.pem"
key = "$WORK/site.key"

[upstreams.app]
servers = ["127.0.0.1:$UP"]

[[routes]]
listener = "secure"
upstream = "app"
EOF2
    TOKIO_WORKER_THREADS=$2 RUST_LOG=warn "$BATON" proxy --config "$WORK/$1.toml" >"$WORK/$1.out" 2>"$WORK/$1.err" &
    PIDS+=($!)
    PROC=$!
    wait_port "$PORT"
}

# h2load_summary LOG < h2load output -> "rps p50_ms p99_ms requests errors"
h2load_summary() {
    python3 -c '
import re, sys
t = sys.stdin.read()
rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", t).group(1))
m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", t)
done, failed, errored = int(m.group(3)), int(m.group(5)), int(m.group(6))
codes = re.search(r"status codes: (\d+) 2xx", t)
ok = int(codes.group(1)) if codes else 0
d = sorted(int(l.split()[2]) for l in open(sys.argv[1]) if l.strip())
p = lambda q: d[min(len(d) - 1, int(q * len(d)))] / 1000 if d else 0
print(f"{rps:.0f} {p(0.5):.2f} {p(0.99):.2f} {done} {failed + errored + (done - ok)}")
' "$1"
}

run_load() { # port mode -> "rps p50 p99 n errors"
    local port=$1 mode=$2
    case $mode in
        handshake) timed wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H "Connection: close" "https://127.0.0.1:$port/" 2>&1 | wrk_summary ;;
        handshake-few) timed wrk -t1 -c"${FEW:-4}" -d"${DURATION}s" --latency -H "Connection: close" "https://127.0.0.1:$port/" 2>&1 | wrk_summary ;;
        keepalive) timed wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "https://127.0.0.1:$port/" 2>&1 | wrk_summary ;;
        h2)
            rm -f "$WORK/h2.log"
            timed h2load -c"$CONNS" -m10 -t1 -D"$DURATION" --log-file="$WORK/h2.log" "https://127.0.0.1:$port/" 2>&1 | h2load_summary "$WORK/h2.log" ;;
    esac
}

measure() { # label pid port mode
    local c0 c1 out rps p50 p99 n bad cpu_us client
    c0=$(tree_ticks "$2")
    out=$(run_load "$3" "$4")
    c1=$(tree_ticks "$2")
    read -r rps p50 p99 n bad <<<"$out"
    cpu_us=$(python3 -c "print(f'{($c1-$c0)/$TCK*1e6/max($n,1):.1f}')")
    client=$(python3 -c "print(f'{$(cat "$WORK/client.cpu")/$DURATION*100:.0f}')")
    echo "| $1 | $4 | $rps | $p50 | $p99 | $cpu_us | $client | $bad |"
}

nginx_tls ngx1 1; N1=$PROC; N1P=$PORT
baton_tls b1 1; B1=$PROC; B1P=$PORT
nginx_tls ngxn "$(nproc)"; NN=$PROC; NNP=$PORT
baton_tls bn "$(nproc)"; BN=$PROC; BNP=$PORT

echo "## TLS: baton proxy vs nginx, fast upstream by ${FAST_UPSTREAM:-file} ($(nproc) cores; wrk -t1 -c$CONNS -d${DURATION}s; h2load -c$CONNS -m10 -t1 -D$DURATION; ECDSA P-256)"
echo
echo "| proxy | load | req/s | p50 ms | p99 ms | CPU µs/req | client CPU % | errors |"
echo "|---|---|---|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
for mode in ${MODES:-handshake keepalive h2}; do
    measure "nginx 1 worker" "$N1" "$N1P" "$mode"
    measure "baton proxy 1 worker" "$B1" "$B1P" "$mode"
    measure "nginx $(nproc) workers" "$NN" "$NNP" "$mode"
    measure "baton proxy $(nproc) workers" "$BN" "$BNP" "$mode"
done
done
echo
