#!/usr/bin/env bash
# Compare, side by side on this machine, how many requests each way of
# restarting an HTTP server loses under the same load and restart count.
#
#   baton-upgrade             `baton hello`, upgraded through its control socket
#   naive-restart             `baton hello`, SIGTERM + wait for exit + start again
#   nginx-reload              Debian nginx, `nginx -s reload` (SIGHUP)
#   nginx-binary-upgrade      Debian nginx, USR2 + WINCH + QUIT (documented binary upgrade)
#   haproxy-reload            Debian HAProxy, master-worker seamless reload (USR2 to the master)
#   haproxy-reload-idle-close the same with `option idle-close-on-response`
#   loadgen-check             no restarts: wrk vs `baton bench` req/s against `baton hello`
#                             and nginx (is the load generator the bottleneck?)
#
# Each restart scenario runs once in `--mode keepalive` and once in
# `--mode close` with `baton bench`, which counts requests (a failed request
# is never retried). The servers are started fresh for every run, on a free
# port picked the same way for all.
#
# Usage: bench/compare-peers.sh [options]
#   --concurrency N    concurrent clients            (env CONCURRENCY, default 32)
#   --duration D       measured window, e.g. 20s     (env DURATION,    default 20s)
#   --restarts K       restarts inside the window    (env RESTARTS,    default 20)
#   --scenarios "A B"  subset of scenarios, in order (env SCENARIOS,   default all)
#   --modes "M ..."    keepalive and/or close        (env MODES,       default "keepalive close")
#   --results DIR      where the JSON files go       (env RESULTS_DIR, default a new /tmp dir)
#   --no-build         use an existing binary (env BATON=path to choose it)
#   --no-install       never apt-get install nginx/haproxy (scenarios needing them are skipped)
#
# It builds with `cargo build --release -p baton-cli` and runs
# ${CARGO_TARGET_DIR:-target}/release/baton. Missing nginx/haproxy are
# installed with apt-get (root only); note that on a host with a running init
# system, installing the Debian packages also starts their default services.
#
# Output: a Markdown table on stdout (also RESULTS/summary.md) and, in
# RESULTS, one `baton bench` JSON per run (SCENARIO-MODE.json, schema in
# crates/baton-bench/SCHEMA.md) plus the servers' logs. Every process the
# script starts is tracked and killed at the end, also on Ctrl-C or failure.
#
# `baton bench` exits 1 when requests failed: expected for some peers, so the
# exit status is recorded, not fatal. wrk (loadgen-check) counts a refused
# connect as a write error and reconnects at once, so its error counts are
# events, not lost requests; `baton bench` counts requests.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/bench/compare-peers.sh"
ALL_SCENARIOS="baton-upgrade naive-restart nginx-reload nginx-binary-upgrade haproxy-reload haproxy-reload-idle-close loadgen-check"
# Bound on each wait inside a restart (the bench's own bound is 60 s).
WAIT_LIMIT_S=30

# fd 9: the script's own stderr, also from inside redirected function calls.
exec 9>&2
log() { printf '[compare-peers %(%H:%M:%S)T] %s\n' -1 "$*" >&9; }
die() { log "error: $*"; exit 2; }

# ---------------------------------------------------------------------------
# Process helpers (also used by the restart sub-commands below).

# True if PID exists and is not a zombie. PID 1 in some containers does not
# reap orphans, so an exited daemon can stay a zombie forever: that is "gone".
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# Live (non-zombie) children of PID, one per line.
live_children() {
    local p
    for p in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        if alive "$p"; then echo "$p"; fi
    done
    return 0
}

# wait_until SECONDS CMD...: poll CMD every 5 ms until it succeeds.
wait_until() {
    local limit=$1 start=$SECONDS
    shift
    until "$@"; do
        if (( SECONDS - start >= limit )); then return 1; fi
        sleep 0.005
    done
}

dead() { ! alive "$1"; }

# One HTTP/1.0 GET over bash's /dev/tcp; true on a 200 status line.
http_ok() {
    local port=$1 line=
    (
        exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
        printf 'GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
        IFS= read -r -t 2 line <&3 || exit 1
        exec 3>&-
        [[ $line == "HTTP/1."?" 200"* ]]
    ) 2>/dev/null
}

track() { echo "$1" >>"$2/pids"; }

# ---------------------------------------------------------------------------
# Server starters. Each writes its pid(s) to DIR/pids.

# start_hello DIR PORT [extra args...]: `baton hello` in its own session.
start_hello() {
    local d=$1 port=$2
    shift 2
    # shellcheck disable=SC1091
    . "$d/env"
    # Not a process-group leader here, so setsid execs in place: $! is the server.
    setsid "$BATON" hello --listen "127.0.0.1:$port" --pid-file "$d/hello.pid" \
        --drain-timeout 10s --log-format json "$@" \
        </dev/null >>"$d/hello.out" 2>>"$d/hello.err" &
    track $! "$d"
    echo $! >"$d/current.pid"
}

# ---------------------------------------------------------------------------
# Restart actions, run by `baton bench --restart-cmd` as
# `compare-peers.sh _restart KIND DIR`. They return once the restart is
# complete (see docs/BENCH-PEERS.md for what "complete" means for each) and
# exit 1 if it did not complete within WAIT_LIMIT_S.

restart_naive() {
    local d=$1 old
    . "$d/env"
    old=$(cat "$d/current.pid")
    kill -TERM "$old"
    wait_until "$WAIT_LIMIT_S" dead "$old" || { echo "old server $old still alive" >&2; return 1; }
    start_hello "$d" "$PORT"
    wait_until "$WAIT_LIMIT_S" http_ok "$PORT" || { echo "new server does not answer" >&2; return 1; }
}

nginx_cmd() { "$NGINX" -p "$1/" -c "$1/nginx.conf" -e "$1/error.log" "${@:2}"; }

# nginx -s reload (SIGHUP): the master re-reads the config, starts new
# workers, then gracefully stops the old ones. Complete = none of the old
# workers is alive and a new worker exists.
restart_nginx_reload() {
    local d=$1 master old
    . "$d/env"
    master=$(cat "$d/nginx.pid")
    old=$(live_children "$master" | tr '\n' ' ')
    nginx_cmd "$d" -s reload
    reloaded() {
        local now p
        now=$(live_children "$master")
        [ -n "$now" ] || return 1
        for p in $old; do
            if alive "$p"; then return 1; fi
        done
        for p in $now; do
            case " $old " in *" $p "*) return 1 ;; esac
        done
    }
    wait_until "$WAIT_LIMIT_S" reloaded || { echo "reload of $master did not complete (old workers: $old)" >&2; return 1; }
    for p in $(live_children "$master"); do track "$p" "$d"; done
}

# nginx binary upgrade (https://nginx.org/en/docs/control.html#upgrade):
# USR2 to the master (it renames its pid file to .oldbin and starts the new
# binary as a new master), wait for the new master's pid file and its worker,
# WINCH to the old master (its workers stop gracefully), wait until they are
# gone, QUIT to the old master, wait until it has exited. Complete = that.
restart_nginx_upgrade() {
    local d=$1 old new=
    . "$d/env"
    old=$(cat "$d/nginx.pid")
    kill -USR2 "$old"
    new_master_up() {
        [ -s "$d/nginx.pid.oldbin" ] || return 1
        new=$(cat "$d/nginx.pid" 2>/dev/null) || return 1
        [ -n "$new" ] && [ "$new" != "$old" ] && alive "$new" || return 1
        [ -n "$(live_children "$new")" ]
    }
    wait_until "$WAIT_LIMIT_S" new_master_up || { echo "new master did not start (USR2 to $old)" >&2; return 1; }
    track "$new" "$d"
    kill -WINCH "$old"
    old_workers_gone() {
        local p
        for p in $(live_children "$old"); do
            if [ "$p" != "$new" ]; then return 1; fi
        done
    }
    wait_until "$WAIT_LIMIT_S" old_workers_gone || { echo "old workers of $old did not stop after WINCH" >&2; return 1; }
    kill -QUIT "$old"
    wait_until "$WAIT_LIMIT_S" dead "$old" || { echo "old master $old did not exit after QUIT" >&2; return 1; }
    for p in $(live_children "$new"); do track "$p" "$d"; done
}

# HAProxy seamless reload: USR2 to the master. The master re-executes itself
# and starts a new worker, which receives the listening sockets from the
# previous one (`-x`, through `expose-fd listeners`); once the new worker
# reports ready the master tells the old one to stop (soft stop). Complete =
# every old worker has exited and a new worker exists (the old worker only
# gets its stop once the new one is ready, so this implies "new one ready").
restart_haproxy() {
    local d=$1 master old
    . "$d/env"
    master=$(cat "$d/master.pid")
    old=$(live_children "$master" | tr '\n' ' ')
    kill -USR2 "$master"
    reloaded() {
        local now p
        now=$(live_children "$master")
        [ -n "$now" ] || return 1
        for p in $old; do
            if alive "$p"; then return 1; fi
        done
        for p in $now; do
            case " $old " in *" $p "*) return 1 ;; esac
        done
    }
    wait_until "$WAIT_LIMIT_S" reloaded || { echo "reload of $master did not complete (old workers: $old)" >&2; return 1; }
    for p in $(live_children "$master"); do track "$p" "$d"; done
}

if [ "${1:-}" = _restart ]; then
    case $2 in
        naive) restart_naive "$3" ;;
        nginx-reload) restart_nginx_reload "$3" ;;
        nginx-binary-upgrade) restart_nginx_upgrade "$3" ;;
        haproxy) restart_haproxy "$3" ;;
        *) echo "unknown restart kind $2" >&2; exit 2 ;;
    esac
    exit
fi

# ---------------------------------------------------------------------------
# Options.

CONCURRENCY=${CONCURRENCY:-32}
DURATION=${DURATION:-20s}
RESTARTS=${RESTARTS:-20}
SCENARIOS=${SCENARIOS:-$ALL_SCENARIOS}
MODES=${MODES:-keepalive close}
RESULTS_DIR=${RESULTS_DIR:-}
BUILD=1
INSTALL=1
COMMAND_LINE="bench/compare-peers.sh${*:+ $*}"

while [ $# -gt 0 ]; do
    case $1 in
        --concurrency) CONCURRENCY=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --restarts) RESTARTS=$2; shift 2 ;;
        --scenarios) SCENARIOS=$2; shift 2 ;;
        --modes) MODES=$2; shift 2 ;;
        --results) RESULTS_DIR=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --no-install) INSTALL=0; shift ;;
        -h | --help) sed -n '2,/^$/p' "$SELF" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
for s in $SCENARIOS; do
    case " $ALL_SCENARIOS " in *" $s "*) ;; *) die "unknown scenario $s (known: $ALL_SCENARIOS)" ;; esac
done
for m in $MODES; do
    case $m in keepalive | close) ;; *) die "unknown mode $m" ;; esac
done
[[ $CONCURRENCY =~ ^[0-9]+$ ]] || die "--concurrency must be a number"
[[ $RESTARTS =~ ^[0-9]+$ ]] || die "--restarts must be a number"
command -v python3 >/dev/null || die "python3 is required"

WORK=$(mktemp -d /tmp/baton-peers-run.XXXXXX)
if [ -z "$RESULTS_DIR" ]; then RESULTS_DIR=$(mktemp -d /tmp/baton-peers-results.XXXXXX); fi
mkdir -p "$RESULTS_DIR"
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
: >"$RESULTS_DIR/runs.tsv"
MY_PGID=$(ps -o pgid= -p $$ | tr -d ' ')

# ---------------------------------------------------------------------------
# Cleanup: every process whose command line names DIR (all our servers carry
# it in their arguments), everything in DIR/pids, and their process groups
# (nginx workers rename their command line but share the master's group).

procs_of() {
    local d=$1 p cmd
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" = $$ ] && continue
        cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline") || continue
        case $cmd in *"$d"*) echo "$p" ;; esac
    done
    find "$d" -name pids -exec cat {} + 2>/dev/null || true
}

stop_all() {
    local d=$1 p g pids= groups= i
    for p in $(procs_of "$d" | sort -u); do
        alive "$p" || continue
        pids+=" $p"
        g=$(ps -o pgid= -p "$p" 2>/dev/null | tr -d ' ') || continue
        if [ -n "$g" ] && [ "$g" != "$MY_PGID" ] && [ "$g" != 1 ]; then groups+=" $g"; fi
    done
    groups=$(echo "$groups" | tr ' ' '\n' | sort -u | tr '\n' ' ')
    [ -n "$pids$groups" ] || return 0
    for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
    for g in $groups; do kill -TERM -- "-$g" 2>/dev/null || true; done
    for i in $(seq 100); do
        local left=
        for p in $pids; do if alive "$p"; then left+=" $p"; fi; done
        for g in $groups; do
            if ps -eo pgid=,stat= | awk -v g="$g" '$1 == g && $2 !~ /^Z/' | grep -q .; then left+=" g$g"; fi
        done
        [ -z "$left" ] && return 0
        sleep 0.05
    done
    log "killing what is left after SIGTERM:$left"
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
    for g in $groups; do kill -KILL -- "-$g" 2>/dev/null || true; done
}

# Run a load generator in the background and wait for it: a SIGINT then
# interrupts `wait` and runs the trap at once (a foreground child that
# handles SIGINT itself and exits normally would make bash ignore it).
# Background jobs of a non-interactive shell start with SIGINT ignored, so on
# an interrupt cleanup() stops it explicitly.
LOADGEN_PID=
run_bg() {
    "$@" &
    LOADGEN_PID=$!
    local rc=0
    wait "$LOADGEN_PID" || rc=$?
    LOADGEN_PID=
    return "$rc"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$LOADGEN_PID" ]; then
        log "interrupted: stopping the load generator and every server"
        kill -TERM "$LOADGEN_PID" 2>/dev/null || true
    fi
    stop_all "$WORK"
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# Build, tools.

if [ -z "${BATON:-}" ]; then
    target=${CARGO_TARGET_DIR:-target}
    case $target in /*) ;; *) target="$ROOT/$target" ;; esac
    BATON="$target/release/baton"
fi
if [ "$BUILD" = 1 ]; then
    log "building: cargo build --release -p baton-cli"
    (cd "$ROOT" && cargo build --release -p baton-cli) >&2
fi
[ -x "$BATON" ] || die "no baton binary at $BATON"

want() { case " $SCENARIOS " in *" $1"*) return 0 ;; esac; return 1; }

apt_install() {
    [ "$INSTALL" = 1 ] || return 1
    [ "$(id -u)" = 0 ] || { log "not root: cannot apt-get install $*"; return 1; }
    log "installing $* with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" >&2 ||
        { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" >&2; }
}

NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
if want nginx || want loadgen-check; then
    [ -x "$NGINX" ] || apt_install nginx || log "nginx unavailable: its scenarios will be skipped"
fi
if want haproxy; then
    [ -x "$HAPROXY" ] || apt_install haproxy || log "haproxy unavailable: its scenarios will be skipped"
fi

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "command: $COMMAND_LINE (CONCURRENCY=$CONCURRENCY DURATION=$DURATION RESTARTS=$RESTARTS)"
    echo "nproc: $(nproc)"
    echo "kernel: $(uname -r)"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "baton: $("$BATON" --version 2>/dev/null || echo '?') ($(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo "?"))"
    if [ -x "$NGINX" ]; then echo "nginx: $("$NGINX" -v 2>&1)"; fi
    if [ -x "$HAPROXY" ]; then echo "haproxy: $("$HAPROXY" -v | head -1)"; fi
    if command -v wrk >/dev/null; then echo "wrk: $(wrk -v 2>&1 | head -1)"; fi
} >"$RESULTS_DIR/machine.txt"
cat "$RESULTS_DIR/machine.txt" >&2

# record SCENARIO MODE STATUS NOTE
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(printf '%s' "$4" | tr '\n\t' '  ')" >>"$RESULTS_DIR/runs.tsv"; }

# ---------------------------------------------------------------------------
# Scenario setup: prepare DIR, start the server on PORT, set RESTART_ARGS.
# Returns non-zero (with a reason in SKIP_REASON) if the scenario cannot run.

write_env() {
    local d=$1 port=$2
    {
        printf 'PORT=%q\n' "$port"
        printf 'BATON=%q\n' "$BATON"
        printf 'NGINX=%q\n' "$NGINX"
        printf 'HAPROXY=%q\n' "$HAPROXY"
        printf 'WAIT_LIMIT_S=%q\n' "$WAIT_LIMIT_S"
    } >"$d/env"
}

write_nginx_conf() {
    local d=$1 port=$2
    mkdir -p "$d/tmp"
    cat >"$d/nginx.conf" <<EOF
daemon on;
master_process on;
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log notice;
events { worker_connections 4096; }
http {
    access_log $d/access.log combined buffer=256k flush=1s;
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 65s;
    server {
        listen 127.0.0.1:$port;
        location / {
            default_type text/plain;
            return 200 "hello\n";
        }
    }
}
EOF
}

start_nginx() {
    local d=$1 port=$2 out
    write_nginx_conf "$d" "$port"
    out=$(nginx_cmd "$d" -t 2>&1) || { SKIP_REASON="nginx -t rejected the config: $out"; return 1; }
    # daemon on: nginx ignores WINCH when not daemonized, and the binary
    # upgrade needs it. The daemon calls setsid: its own process group.
    setsid "$NGINX" -p "$d/" -c "$d/nginx.conf" -e "$d/error.log" </dev/null >>"$d/nginx.out" 2>&1 ||
        { SKIP_REASON="nginx did not start: $(tail -3 "$d/error.log")"; return 1; }
    wait_until 10 test -s "$d/nginx.pid" || { SKIP_REASON="nginx wrote no pid file"; return 1; }
    track "$(cat "$d/nginx.pid")" "$d"
    wait_until 10 http_ok "$port" || { SKIP_REASON="nginx does not answer on $port"; return 1; }
}

write_haproxy_conf() {
    local d=$1 port=$2 idle_close=$3
    cat >"$d/haproxy.cfg" <<EOF
global
    nbthread 1
    # maxconn drives the fd limit HAProxy asks for: keep it under common hard limits.
    maxconn 4096
    stats socket $d/stats.sock mode 600 level admin expose-fd listeners

defaults
    mode http
    timeout connect 5s
    timeout client 65s
    timeout server 65s
    timeout http-keep-alive 65s
    option http-keep-alive
$( [ "$idle_close" = 1 ] && echo "    option idle-close-on-response" )

frontend fe
    bind 127.0.0.1:$port
    http-request return status 200 content-type text/plain string "hello"
EOF
}

start_haproxy() {
    local d=$1 port=$2 idle_close=$3 out
    write_haproxy_conf "$d" "$port" "$idle_close"
    out=$("$HAPROXY" -c -f "$d/haproxy.cfg" 2>&1) ||
        { SKIP_REASON="haproxy -c rejected the config ($("$HAPROXY" -v | head -1)): $(echo "$out" | grep -m1 ALERT)"; return 1; }
    # -W: master-worker; -S: master CLI socket. Foreground master, own session.
    setsid "$HAPROXY" -W -S "$d/master.sock" -f "$d/haproxy.cfg" -p "$d/haproxy.pid" \
        </dev/null >>"$d/haproxy.out" 2>&1 &
    echo $! >"$d/master.pid"
    track $! "$d"
    wait_until 10 http_ok "$port" || { SKIP_REASON="haproxy does not answer on $port: $(tail -3 "$d/haproxy.out")"; return 1; }
}

setup() {
    local scen=$1 d=$2 port=$3
    SKIP_REASON=
    RESTART_ARGS=()
    write_env "$d" "$port"
    case $scen in
        baton-upgrade)
            start_hello "$d" "$port" --control-socket "$d/control.sock"
            wait_until 10 grep -q '"event":"ready"' "$d/hello.out" ||
                { SKIP_REASON="baton hello not ready: $(tail -3 "$d/hello.err")"; return 1; }
            RESTART_ARGS=(--control-socket "$d/control.sock" --action upgrade)
            ;;
        naive-restart)
            start_hello "$d" "$port"
            wait_until 10 http_ok "$port" || { SKIP_REASON="baton hello does not answer"; return 1; }
            RESTART_ARGS=(--restart-cmd "$(printf 'bash %q _restart naive %q' "$SELF" "$d")")
            ;;
        nginx-reload | nginx-binary-upgrade)
            [ -x "$NGINX" ] || { SKIP_REASON="nginx is not installed"; return 1; }
            start_nginx "$d" "$port" || return 1
            RESTART_ARGS=(--restart-cmd "$(printf 'bash %q _restart %q %q' "$SELF" "$scen" "$d")")
            ;;
        haproxy-reload | haproxy-reload-idle-close)
            [ -x "$HAPROXY" ] || { SKIP_REASON="haproxy is not installed"; return 1; }
            local idle=0
            if [ "$scen" = haproxy-reload-idle-close ]; then idle=1; fi
            start_haproxy "$d" "$port" "$idle" || return 1
            RESTART_ARGS=(--restart-cmd "$(printf 'bash %q _restart haproxy %q' "$SELF" "$d")")
            ;;
    esac
}

# Copy the servers' logs and configs next to the JSON.
keep_logs() {
    local d=$1 name=$2 f
    mkdir -p "$RESULTS_DIR/logs/$name"
    for f in "$d"/*.log "$d"/*.out "$d"/*.err "$d"/*.conf "$d"/*.cfg; do
        [ -f "$f" ] || continue
        case $f in */access.log) continue ;; esac
        cp "$f" "$RESULTS_DIR/logs/$name/"
    done
}

run_restart_scenario() {
    local scen=$1 mode=$2 name="$1-$2" d port rc=0
    d="$WORK/$name"
    mkdir -p "$d"
    port=$(free_port)
    log "$name: starting on 127.0.0.1:$port"
    if ! setup "$scen" "$d" "$port"; then
        log "$name: skipped: $SKIP_REASON"
        record "$scen" "$mode" skipped "$SKIP_REASON"
        keep_logs "$d" "$name"
        stop_all "$d"
        return 0
    fi
    log "$name: baton bench --mode $mode --concurrency $CONCURRENCY --duration $DURATION --restarts $RESTARTS"
    run_bg "$BATON" bench --url "http://127.0.0.1:$port/" --mode "$mode" \
        --concurrency "$CONCURRENCY" --duration "$DURATION" --restarts "$RESTARTS" \
        --warmup 1s --restart-timeout 60s --log-format json \
        --json "$RESULTS_DIR/$name.json" "${RESTART_ARGS[@]}" \
        >"$d/bench.out" 2>"$d/bench.log" || rc=$?
    # 0: no failed request; 1: some failed (expected for some peers);
    # anything else: the bench itself could not run.
    if [ "$rc" -le 1 ] && [ -f "$RESULTS_DIR/$name.json" ]; then
        record "$scen" "$mode" ran "bench exit $rc"
    else
        record "$scen" "$mode" error "baton bench exited $rc: $(tail -2 "$d/bench.log" | tr '\n' ' ')"
    fi
    keep_logs "$d" "$name"
    stop_all "$d"
    if http_ok "$port"; then log "$name: warning: port $port still answers after cleanup"; fi
}

# ---------------------------------------------------------------------------
# loadgen-check: same server, wrk vs baton bench, keep-alive, no restarts.

run_loadgen_check() {
    local target d port wrk_rate bench_rate dur=10s
    : >"$RESULTS_DIR/loadgen.tsv"
    for target in baton-hello nginx; do
        d="$WORK/loadgen-$target"
        mkdir -p "$d"
        port=$(free_port)
        write_env "$d" "$port"
        if [ "$target" = nginx ]; then
            if [ ! -x "$NGINX" ] || ! start_nginx "$d" "$port"; then
                log "loadgen-check: nginx skipped: ${SKIP_REASON:-not installed}"
                continue
            fi
        else
            start_hello "$d" "$port"
            wait_until 10 http_ok "$port" || { log "loadgen-check: baton hello did not start"; stop_all "$d"; continue; }
        fi
        wrk_rate=skipped
        if command -v wrk >/dev/null; then
            log "loadgen-check $target: wrk -t1 -c$CONCURRENCY -d$dur"
            run_bg wrk -t1 -c"$CONCURRENCY" -d"$dur" "http://127.0.0.1:$port/" >"$RESULTS_DIR/wrk-$target.txt" 2>&1 || true
            wrk_rate=$(awk '/^Requests\/sec:/ {print $2}' "$RESULTS_DIR/wrk-$target.txt")
        fi
        log "loadgen-check $target: baton bench --concurrency $CONCURRENCY --duration $dur"
        run_bg "$BATON" bench --url "http://127.0.0.1:$port/" --mode keepalive --concurrency "$CONCURRENCY" \
            --duration "$dur" --warmup 1s --log-format json \
            --json "$RESULTS_DIR/loadgen-$target.json" >/dev/null 2>"$d/bench.log" || true
        bench_rate=$(python3 -c 'import json,sys; print("%.0f" % json.load(open(sys.argv[1]))["rate"])' \
            "$RESULTS_DIR/loadgen-$target.json" 2>/dev/null || echo error)
        printf '%s\t%s\t%s\n' "$target" "$wrk_rate" "$bench_rate" >>"$RESULTS_DIR/loadgen.tsv"
        keep_logs "$d" "loadgen-$target"
        stop_all "$d"
    done
}

# ---------------------------------------------------------------------------

log "results: $RESULTS_DIR"
for scen in $SCENARIOS; do
    if [ "$scen" = loadgen-check ]; then
        run_loadgen_check
        continue
    fi
    for mode in $MODES; do
        run_restart_scenario "$scen" "$mode"
    done
done

python3 - "$RESULTS_DIR" "$RESTARTS" >"$RESULTS_DIR/summary.md" <<'PY'
import json, os, statistics, sys

results, restarts_wanted = sys.argv[1], int(sys.argv[2])
machine = open(os.path.join(results, "machine.txt")).read().strip()
print("```")
print(machine)
print("```")
print()
print("| scenario | mode | requests | failed | failed % | errors by class | req/s | p99 ms | median restart ms | failed restarts |")
print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|")
notes = []
for line in open(os.path.join(results, "runs.tsv")):
    scen, mode, status, note = line.rstrip("\n").split("\t")
    if status != "ran":
        print(f"| {scen} | {mode} | – | – | – | {status} (see below) | – | – | – | – |")
        notes.append(f"- {scen} / {mode}: {status}: {note}")
        continue
    r = json.load(open(os.path.join(results, f"{scen}-{mode}.json")))
    errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items() if v) or "–"
    rs = r["restarts"]
    med = statistics.median(x["duration_s"] for x in rs) * 1000 if rs else float("nan")
    failed_restarts = sum(1 for x in rs if not x["success"]) + max(0, restarts_wanted - len(rs))
    pct = 100.0 * r["failed"] / r["requests"] if r["requests"] else 0.0
    print(f"| {scen} | {mode} | {r['requests']} | {r['failed']} | {pct:.3f} | {errors} "
          f"| {r['rate']:.0f} | {r['latency']['all']['p99_ms']:.2f} | {med:.1f} | {failed_restarts} |")
    for x in rs:
        if not x["success"]:
            o = x["outcome"]
            detail = o.get("stderr") or o.get("error") or o["kind"]
            notes.append(f"- {scen} / {mode}: restart {x['index']} failed: {detail.strip()[:300]}")
lg = os.path.join(results, "loadgen.tsv")
if os.path.exists(lg) and os.path.getsize(lg):
    print()
    print("Load generator check (keep-alive, no restarts, same server, one after the other):")
    print()
    print("| server | wrk -t1 req/s | baton bench req/s |")
    print("|---|---:|---:|")
    for line in open(lg):
        target, w, b = line.rstrip("\n").split("\t")
        try:
            w = f"{float(w):.0f}"
        except ValueError:
            pass
        print(f"| {target} | {w} | {b} |")
if notes:
    print()
    print("Notes:")
    print()
    print("\n".join(notes))
PY
cat "$RESULTS_DIR/summary.md"
log "results: $RESULTS_DIR (summary.md, one JSON per run, logs/)"
