#!/usr/bin/env bash
# Instructions per keep-alive request of two builds of `baton proxy`,
# counted by valgrind's callgrind: repeatable whatever else the machine is
# doing, unlike a rate. For judging the hot-path cost of a small change.
#
#   bash bench/proxy-instructions.sh BATON_A BATON_B [SMALL] [LARGE]
#   MODE=close bash bench/proxy-instructions.sh ...   # a new connection per request
#
# Each build runs under callgrind (one worker thread, access log off) in
# front of a native `baton hello`; one client sends SMALL, then (in a fresh
# run) LARGE requests, one at a time on one keep-alive connection. The
# per-request figure is (I(LARGE) - I(SMALL)) / (LARGE - SMALL): start-up
# and shutdown cancel out. Everything runs on 127.0.0.1 and is bounded.
set -euo pipefail

A=$(realpath "$1")
B=$(realpath "$2")
SMALL=${3:-2000}
LARGE=${4:-12000}
WORK=$(mktemp -d /tmp/baton-proxy-instr.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
command -v valgrind >/dev/null || { apt-get update -qq >/dev/null && apt-get install -y -qq valgrind >/dev/null; }

NO_PEERS=1 . "$(dirname "$0")/proxy-common.sh"

UP=$(free_port)
"$A" hello --listen "127.0.0.1:$UP" >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$UP"

# requests PORT N: N GETs on one keep-alive connection (MODE=close: each
# on a new connection, with `Connection: close`), each answered 200.
requests() {
    python3 - "$1" "$2" "${MODE:-keepalive}" <<'EOF'
import socket, sys
port, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if mode == "close":
    req = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), 30)
        s.settimeout(60)
        s.sendall(req)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        s.close()
        assert buf.lower().startswith(b"http/1.1 200"), buf[:100]
    sys.exit(0)
s = socket.create_connection(("127.0.0.1", port), 30)
s.settimeout(60)
req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
buf = b""
for i in range(n):
    s.sendall(req)
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].decode("latin-1").lower()
            assert head.startswith("http/1.1 200"), head
            length = int(head.split("content-length:")[1].split("\r\n")[0])
            if len(buf) >= end + 4 + length:
                buf = buf[end + 4 + length:]
                break
        chunk = s.recv(65536)
        assert chunk, f"closed after {i} requests"
        buf += chunk
EOF
}

# instructions BINARY N -> total instructions of the proxy process
instructions() {
    local bin=$1 n=$2 port out
    port=$(free_port)
    proxy_config "$WORK/p.toml" "$port"
    out=$WORK/callgrind.$n.out
    TOKIO_WORKER_THREADS=1 RUST_LOG=warn timeout 600 valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$bin" proxy --config "$WORK/p.toml" >/dev/null 2>"$WORK/valgrind.err" &
    local pid=$!
    PIDS+=($pid)
    wait_port "$port" 60 # valgrind starts slowly
    requests "$port" "$n"
    kill -TERM "$pid"
    wait "$pid" || true
    awk '/^(summary|totals):/ {print $2; exit}' "$out"
}

echo "# instructions per ${MODE:-keepalive} request (callgrind; $SMALL and $LARGE requests, one worker)"
for label in A B; do
    bin=$A; [ "$label" = B ] && bin=$B
    s=$(instructions "$bin" "$SMALL")
    l=$(instructions "$bin" "$LARGE")
    per=$(python3 -c "print(f'{($l-$s)/($LARGE-$SMALL):.0f}')")
    echo "$label $per"
    eval "PER_$label=$per"
done
python3 -c "print(f'B/A instructions per request: {$PER_B/$PER_A:.4f}')"
