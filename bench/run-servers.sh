#!/usr/bin/env bash
# Tested servers under `baton run`: for each real server (gunicorn sync,
# gunicorn + uvicorn workers, uvicorn, node http, Go net/http, python
# http.server), with and without `--http`, with keep-alive and
# new-connection clients, run `baton bench` with reloads through the control
# socket and print a markdown table of failed/total requests, then the
# failure kinds, the reloads and the exact command lines.
#
#   bench/run-servers.sh                 # the full table (about 12 minutes)
#
# Environment (all optional):
#   BATON=path        the baton binary (default target/release/baton; it is
#                     copied into the scratch directory first, so a rebuild
#                     meanwhile does not change what is measured)
#   DURATION=20s RESTARTS=10 CONCURRENCY=16
#   SERVERS="gunicorn-sync gunicorn-uvicorn uvicorn node go http.server"
#   MODES="keepalive close"
#   LOGDIR=dir        where each run's logs and JSON are copied
#                     (default ./servers-logs under the current directory)
#   KEEP=1            keep the scratch directory
#
# Everything runs on 127.0.0.1 with ephemeral ports; the control sockets,
# logs and JSON live in a scratch directory under /tmp. One measurement at a
# time. Needs python3 and curl; a server whose program is missing is skipped.

set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=$ROOT/bench/servers
DURATION=${DURATION:-20s}
RESTARTS=${RESTARTS:-10}
CONCURRENCY=${CONCURRENCY:-16}
SERVERS=${SERVERS:-"gunicorn-sync gunicorn-uvicorn uvicorn node go http.server"}
MODES=${MODES:-"keepalive close"}
LOGDIR=${LOGDIR:-$PWD/servers-logs}
BATON_SRC=${BATON:-$ROOT/target/release/baton}

if [[ ! -x $BATON_SRC ]]; then
    echo "no baton binary at $BATON_SRC (cargo build --release --bin baton)" >&2
    exit 2
fi

WORK=$(mktemp -d /tmp/baton-servers.XXXXXX)
# Every process a run starts carries WORK in its command line (the baton
# copy, --chdir/--app-dir, the script or binary path) and in its
# environment (BATON_SERVERS_RUN, given to `baton run` only, which its
# children inherit), which is how leftovers are found.
cp "$BATON_SRC" "$WORK/baton"
BATON_MTIME=$(stat -c '%y' "$BATON_SRC" | cut -d. -f1)
BATON=$WORK/baton
mkdir -p "$WORK/apps" "$WORK/www" "$WORK/runs"
cp "$SRC/wsgi_app.py" "$SRC/asgi_app.py" "$SRC/server.js" "$WORK/apps/"
echo "hello from python http.server" >"$WORK/www/index.html"

SUP_PID=""
cleanup() {
    if [[ -n $SUP_PID ]] && kill -0 "$SUP_PID" 2>/dev/null; then
        kill -TERM "$SUP_PID" 2>/dev/null
        sleep 2
        kill -KILL "$SUP_PID" 2>/dev/null
    fi
    kill_leftovers >/dev/null
    if [[ -d $WORK/runs ]]; then
        mkdir -p "$LOGDIR" && cp -r "$WORK/runs/." "$LOGDIR/" 2>/dev/null
    fi
    if [[ ${KEEP:-0} != 1 ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Processes started by this script that are still there: by command line
# (pgrep -f) and by the environment marker. Prints their pids.
leftovers() {
    {
        pgrep -f -- "$WORK"
        for e in /proc/[0-9]*/environ; do
            if grep -qzx -- "BATON_SERVERS_RUN=$WORK" "$e" 2>/dev/null; then
                p=${e#/proc/}; echo "${p%/environ}"
            fi
        done
    } | sort -un | while read -r p; do
        [[ -d /proc/$p ]] && echo "$p"
    done
}
kill_leftovers() {
    local left
    left=$(leftovers)
    if [[ -n $left ]]; then
        ps -o pid,ppid,pgid,args -p "$(echo "$left" | paste -sd,)" 2>/dev/null
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null
        sleep 0.5
    fi
}

# Shrink a run's logs: `--http` logs every request at info
# (baton_proxy::access) and python http.server / uvicorn log theirs too;
# drop the lines of requests answered 200 and keep everything else (other
# statuses, supervisor events, child tracebacks), with a count.
ACCESS_200='baton_proxy::access: request .* status=200 |"GET / HTTP/1\.[01]" 200 '
shrink_log() {
    local f=$1 n
    [[ -f $f ]] || return 0
    n=$(grep -c -E -- "$ACCESS_200" "$f")
    grep -v -E -- "$ACCESS_200" "$f" >"$f.tmp"
    mv "$f.tmp" "$f"
    echo "[run-servers.sh: removed $n access-log lines of requests answered 200]" >>"$f"
}

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# Print the arguments as one shell command line (single quotes where needed).
shell_words() {
    local a out=()
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$a")
        else out+=("'${a//\'/\'\\\'\'}'"); fi
    done
    echo "${out[*]}"
}

have() { command -v "$1" >/dev/null 2>&1; }
# The real program behind a pyenv shim (the shim costs a few hundred ms per
# start and runs pyenv's own scripts first).
realprog() { if have pyenv && pyenv which "$1" >/dev/null 2>&1; then pyenv which "$1"; else command -v "$1"; fi; }

GOSERVER=""
build_go() {
    have go || return 1
    mkdir -p "$WORK/go"
    (cd "$SRC" && GOFLAGS=-mod=mod GOCACHE=$WORK/go/cache GOPATH=$WORK/go/path \
        go build -o "$WORK/goserver" main.go) >"$WORK/go/build.log" 2>&1 || {
        echo "go build failed:" >&2; cat "$WORK/go/build.log" >&2; return 1
    }
    GOSERVER=$WORK/goserver
}

# server_def NAME HTTP(0|1) -> sets LISTEN_ARGS READY_ARGS CMD (array) SHORT READY_DESC
server_def() {
    local name=$1 http=$2
    READY_ARGS=()
    EXTRA_ARGS=()
    case $name in
    # gunicorn takes the socket from LISTEN_FDS itself. Not also `-b fd://3`:
    # gunicorn 27 then adopts fd 3 twice (once from -b, once from
    # LISTEN_FDS), closes it after the first and dies with EBADF.
    # --no-control-socket: gunicorn 27's control socket is a fixed path
    # (~/.gunicorn/gunicorn.ctl) that the old and new master of a reload
    # would both bind and unlink.
    gunicorn-sync)
        READY_ARGS=(--ready notify)
        READY_DESC="notify"
        CMD=("$(realprog gunicorn)" --workers 2 --preload --no-control-socket --chdir "$WORK/apps" wsgi_app:app)
        SHORT="gunicorn --workers 2 --preload --no-control-socket wsgi_app:app"
        ;;
    gunicorn-uvicorn)
        READY_ARGS=(--ready notify)
        READY_DESC="notify"
        CMD=("$(realprog gunicorn)" --workers 2 --preload -k "$UVICORN_WORKER" --no-control-socket --chdir "$WORK/apps" asgi_app:app)
        SHORT="gunicorn --workers 2 --preload -k $UVICORN_WORKER --no-control-socket asgi_app:app"
        ;;
    uvicorn)
        if [[ $http == 0 ]]; then READY_ARGS=(--ready delay:2s); READY_DESC="delay:2s"
        else READY_DESC="default (GET / of the child's socket)"; fi
        CMD=("$(realprog uvicorn)" --fd 3 --app-dir "$WORK/apps" asgi_app:app)
        SHORT="uvicorn --fd 3 asgi_app:app"
        ;;
    node)
        if [[ $http == 0 ]]; then READY_ARGS=(--ready delay:2s); READY_DESC="delay:2s"
        else READY_DESC="default (GET / of the child's socket)"; fi
        CMD=(node "$WORK/apps/server.js")
        SHORT="node server.js"
        ;;
    go)
        READY_ARGS=(--ready notify)
        READY_DESC="notify"
        CMD=("$GOSERVER")
        SHORT="./goserver (net/http, Shutdown)"
        ;;
    http.server)
        EXTRA_ARGS=(--port-env web=PORT)
        if [[ $http == 0 ]]; then READY_DESC="default (tcp probe of \$PORT)"
        else READY_DESC="default (GET / of \$PORT)"; fi
        CMD=(sh -c "exec $PY -m http.server \"\$PORT\" --bind 127.0.0.1 --directory $WORK/www")
        SHORT="--port-env web=PORT sh -c 'exec python3 -m http.server \"\$PORT\" --bind 127.0.0.1 --directory DIR'"
        ;;
    esac
}

# Which program each server needs.
server_prog() {
    case $1 in
    gunicorn-sync) echo gunicorn ;;
    gunicorn-uvicorn) echo gunicorn ;;
    uvicorn) echo uvicorn ;;
    node) echo node ;;
    go) echo go ;;
    http.server) echo python3 ;;
    esac
}

PY=$(python3 -c 'import sys;print(sys.executable)')
UVICORN_WORKER=""
if python3 -W ignore -c 'import uvicorn.workers' 2>/dev/null; then
    UVICORN_WORKER=uvicorn.workers.UvicornWorker
elif python3 -c 'import uvicorn_worker' 2>/dev/null; then
    UVICORN_WORKER=uvicorn_worker.UvicornWorker
fi

RESULTS=$WORK/results.tsv
: >"$RESULTS"
declare -A READY_OF CMDLINES SKIPPED
PROBLEMS=()

# one_run SERVER HTTP MODE
one_run() {
    local server=$1 http=$2 mode=$3
    local id="$server-$([[ $http == 1 ]] && echo http || echo fd)-$mode"
    local dir=$WORK/runs/$id
    mkdir -p "$dir"
    server_def "$server" "$http"
    local port sock
    port=$(free_port)
    sock=$dir/ctl.sock
    local args=(run --listen "web=127.0.0.1:$port" "${EXTRA_ARGS[@]}" "${READY_ARGS[@]}"
        --settle 1s --drain-timeout 10s --control-socket "$sock")
    [[ $http == 1 ]] && args+=(--http)
    args+=(-- "${CMD[@]}")
    shell_words "$BATON" "${args[@]}" >"$dir/cmdline"
    READY_OF["$server/$http"]=$READY_DESC
    CMDLINES["$server/$http"]=$(sed "s#$WORK#\$WORK#g" "$dir/cmdline")

    echo "== $id: port $port" >&2
    env BATON_SERVERS_RUN="$WORK" "$BATON" "${args[@]}" >"$dir/supervisor.out" 2>"$dir/supervisor.err" &
    SUP_PID=$!

    # Wait until it serves: GET / answers 200 through the public address.
    local ok=0
    for _ in $(seq 1 150); do
        if ! kill -0 "$SUP_PID" 2>/dev/null; then break; fi
        if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/") == 200 ]]; then
            ok=1; break
        fi
        sleep 0.2
    done
    if [[ $ok == 0 ]]; then
        echo "   $id: never served; supervisor log tail:" >&2
        tail -5 "$dir/supervisor.err" >&2
        PROBLEMS+=("$id: never served (see $LOGDIR/$id/supervisor.err)")
        printf '%s\t%s\t%s\tNA\tNA\t{}\t0\t0\t0\tnever served\n' "$server" "$http" "$mode" >>"$RESULTS"
    else
        # The first child may still be settling its workers; a moment of
        # plain service before the measurement.
        sleep 1
        "$BATON" bench --url "http://127.0.0.1:$port/" --mode "$mode" --concurrency "$CONCURRENCY" \
            --duration "$DURATION" --restarts "$RESTARTS" --control-socket "$sock" --action reload \
            --json "$dir/bench.json" >"$dir/bench.out" 2>"$dir/bench.err"
        local rc=$?
        if [[ -s $dir/bench.json ]]; then
            python3 - "$dir/bench.json" "$server" "$http" "$mode" "$rc" >>"$RESULTS" <<'EOF'
import json, sys
path, server, http, mode, rc = sys.argv[1:]
d = json.load(open(path))
kinds = {k: v for k, v in d["errors"].items() if v}
inwin = sum(d["errors_in_restart_windows"].values())
rs = d["restarts"]
okr = sum(1 for r in rs if r["success"])
# Reloads that completed while the load ran (the bench fires the rest
# after the load window when reloads take longer than their spacing).
under = sum(1 for r in rs if r["start_s"] + r["duration_s"] <= d["elapsed_s"])
bad = [r["outcome"] for r in rs if not r["success"]]
note = f"bench exit {rc}"
if bad:
    note += "; failed reloads: " + "; ".join(json.dumps(b)[:200] for b in bad)
print("\t".join([server, http, mode, str(d["requests"]), str(d["failed"]),
                 json.dumps(kinds, separators=(",", ":")) + f" ({inwin} in reload windows)",
                 str(len(rs)), str(okr), str(under), note]))
EOF
        else
            echo "   $id: bench wrote no JSON (exit $rc):" >&2
            tail -5 "$dir/bench.err" >&2
            PROBLEMS+=("$id: bench wrote no JSON (exit $rc)")
            printf '%s\t%s\t%s\tNA\tNA\t{}\t0\t0\t0\tbench exit %s, no JSON\n' "$server" "$http" "$mode" "$rc" >>"$RESULTS"
        fi
        "$BATON" ctl --socket "$sock" status --json >"$dir/status-after.json" 2>&1
    fi

    # Stop: control stop, then TERM/KILL if the supervisor is still there.
    "$BATON" ctl --socket "$sock" stop >"$dir/stop.out" 2>&1
    local t
    for t in $(seq 1 150); do kill -0 "$SUP_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$SUP_PID" 2>/dev/null; then
        PROBLEMS+=("$id: supervisor still running 15 s after ctl stop; killed")
        kill -TERM "$SUP_PID" 2>/dev/null; sleep 2; kill -KILL "$SUP_PID" 2>/dev/null
    fi
    wait "$SUP_PID" 2>/dev/null
    echo "supervisor exit status $?" >>"$dir/stop.out"
    SUP_PID=""
    sleep 0.3
    local left
    left=$(leftovers)
    if [[ -n $left ]]; then
        echo "   $id: processes left after stop:" >&2
        ps -o pid,ppid,args -p "$(echo "$left" | paste -sd,)" >&2
        PROBLEMS+=("$id: processes left after stop: $(ps -o args= -p "$(echo "$left" | paste -sd,)" | sed "s#$WORK#\$WORK#g" | paste -sd';')")
        kill_leftovers >/dev/null
    fi
    sed -i "s#$WORK#\$WORK#g" "$dir/cmdline"
    shrink_log "$dir/supervisor.err"
    shrink_log "$dir/supervisor.out"
    # What the supervisor answered other than 200 (502/503 with --http).
    local non200
    non200=$(grep -o -E 'baton_proxy::access: request .* status=[0-9]+' "$dir/supervisor.err" | grep -o -E 'status=[0-9]+$' | sort | uniq -c | awk '{printf "%s%s x%s", (NR>1?", ":""), $2, $1}')
    [[ -n $non200 ]] && PROBLEMS+=("$id: the supervisor answered $non200")
}

START=$(date +%s)
for server in $SERVERS; do
    prog=$(server_prog "$server")
    if ! have "$prog"; then
        echo "skipping $server: $prog not found" >&2
        SKIPPED[$server]="$prog not found"; continue
    fi
    if [[ $server == go ]] && [[ -z $GOSERVER ]] && ! build_go; then
        SKIPPED[$server]="go build failed"; continue
    fi
    if [[ $server == gunicorn-uvicorn ]] && { [[ -z $UVICORN_WORKER ]] || ! have uvicorn; }; then
        echo "skipping $server: no uvicorn worker class (uvicorn.workers or uvicorn_worker)" >&2
        SKIPPED[$server]="no UvicornWorker"; continue
    fi
    for mode in $MODES; do
        for http in 0 1; do
            one_run "$server" "$http" "$mode"
        done
    done
done
END=$(date +%s)

# ---- report -------------------------------------------------------------
cell() { # server http mode -> failed/total, † when fewer reloads completed under load
    awk -F'\t' -v s="$1" -v h="$2" -v m="$3" -v n="$RESTARTS" '$1==s && $2==h && $3==m {
        printf "%s/%s", $5, $4; if ($9 < n) printf " † (%s of %s reloads under load)", $9, n; exit }' "$RESULTS"
}
echo "## Tested servers under \`baton run\`"
echo
echo "baton bench --mode MODE --concurrency $CONCURRENCY --duration $DURATION --restarts $RESTARTS --action reload;"
echo "\`baton run --settle 1s --drain-timeout 10s\`; $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), $((END - START)) s in all."
echo
echo "| server | readiness (without / with --http) | command line | mode | without --http: failed/total | with --http: failed/total |"
echo "|---|---|---|---|---|---|"
for server in $SERVERS; do
    if [[ -n ${SKIPPED[$server]:-} ]]; then
        echo "| $server | – | skipped: ${SKIPPED[$server]} | – | – | – |"
        continue
    fi
    server_def "$server" 0
    short=$SHORT
    r0=${READY_OF["$server/0"]:-?}; r1=${READY_OF["$server/1"]:-?}
    ready=$([[ $r0 == "$r1" ]] && echo "$r0" || echo "$r0 / $r1")
    for mode in $MODES; do
        echo "| $server | $ready | \`${short//|/\\|}\` | $mode | $(cell "$server" 0 "$mode") | $(cell "$server" 1 "$mode") |"
    done
done
echo
if awk -F'\t' -v n="$RESTARTS" '$9 < n {f=1} END {exit !f}' "$RESULTS"; then
    echo "† A reload took longer than the spacing of the $RESTARTS reloads (${DURATION} / $((RESTARTS + 1))),"
    echo "so only some completed while the load ran; the bench fired the rest after it."
    echo
fi
echo "### Failure kinds and reloads per run"
echo
echo "| server | --http | mode | requests | failed | failure kinds | reloads fired | reloads ok | reloads done under load | notes |"
echo "|---|---|---|---|---|---|---|---|---|---|"
awk -F'\t' 'BEGIN{OFS=" | "} {h=($2==1?"yes":"no"); print "| " $1, h, $3, $4, $5, $6, $7, $8, $9, $10 " |"}' "$RESULTS"
echo
echo "### Command lines"
echo
echo "(\$WORK is the scratch directory; its apps/ holds copies of bench/servers/, www/ the index.html.)"
echo
for server in $SERVERS; do
    [[ -n ${SKIPPED[$server]:-} ]] && continue
    for http in 0 1; do
        [[ -n ${CMDLINES["$server/$http"]:-} ]] || continue
        echo "- $server, $([[ $http == 1 ]] && echo "with" || echo "without") --http:"
        echo '  ```'
        echo "  ${CMDLINES["$server/$http"]}"
        echo '  ```'
    done
done
echo
echo "### Problems seen by the script"
echo
if [[ ${#PROBLEMS[@]} == 0 ]]; then echo "none (every run served, wrote its JSON, stopped, and left no process)"; fi
for p in "${PROBLEMS[@]}"; do echo "- $p"; done
echo
echo "### Machine and versions"
echo
echo "- \`nproc\` $(nproc), \`uname -r\` $(uname -r), $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- baton: $BATON_SRC (built $BATON_MTIME, sha256 $(sha256sum "$BATON" | cut -c1-12))"
have gunicorn && echo "- $(gunicorn --version 2>&1)"
have uvicorn && echo "- $(uvicorn --version 2>&1)"
have node && echo "- node $(node --version 2>&1)"
have go && echo "- $(go version 2>&1)"
echo "- $(python3 --version 2>&1) ($PY)"
echo
echo "Logs and JSON per run: $LOGDIR/<server>-<fd|http>-<mode>/ (supervisor.err with the"
echo "access-log lines of 200 answers removed, bench.json, bench.err, status-after.json, cmdline)"
