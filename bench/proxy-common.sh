# Shared by bench/proxy-vs-nginx.sh, bench/proxy-ab.sh and
# bench/proxy-instructions.sh (sourced, not run): tools, ports, process
# counters, the upstream, the proxy's configuration, nginx, and wrk's
# summary. Expects WORK (a scratch directory) and the array PIDS (what
# cleanup kills) to be set by the caller; NO_PEERS=1 skips installing nginx
# and wrk (a caller that runs neither).

need() { command -v "$1" >/dev/null 2>&1; }
if [ -z "${NO_PEERS:-}" ] && { ! need nginx || ! need wrk; }; then
    echo "installing nginx and wrk" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq nginx-light wrk >/dev/null
fi

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { # PORT [SECONDS, default 10]
    local tries=$(( ${2:-10} * 20 ))
    for _ in $(seq 1 "$tries"); do
        if python3 -c "import socket,sys;socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "port $1 never opened" >&2; return 1
}

# proxy_config FILE PORT [SERVER_LINES]: a baton proxy configuration with
# one HTTP listener "web" on 127.0.0.1:PORT sending everything to the
# upstream on $UP, its control socket at FILE's name with .sock, and
# SERVER_LINES added to [server].
proxy_config() {
    cat >"$1" <<EOF
[server]
control_socket = "${1%.toml}.sock"
${3:-}

[[listeners]]
name = "web"
address = "127.0.0.1:$2"

[upstreams.app]
servers = ["127.0.0.1:$UP"]

[[routes]]
listener = "web"
path_prefix = "/"
upstream = "app"
EOF
}
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS/{print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/{print $2}' "/proc/$1/status"; }
TCK=$(getconf CLK_TCK)

# CPU ticks of a process and its children (nginx's workers).
tree_ticks() {
    local total=0 p
    for p in "$1" $(pgrep -P "$1" || true); do
        total=$((total + $(cpu_ticks "$p")))
    done
    echo "$total"
}

# timed CMD... : runs CMD (its output passes through) and leaves the CPU
# seconds it used in $WORK/client.cpu, to show when the load generator
# itself is what limits a run.
timed() {
    python3 -c '
import resource, subprocess, sys
p = subprocess.run(sys.argv[2:])
r = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(f"{r.ru_utime + r.ru_stime:.2f}")
sys.exit(p.returncode)
' "$WORK/client.cpu" "$@"
}


# start_upstream BATON -> UP (port of a `baton hello`)
start_upstream() {
    UP=$(free_port)
    "$1" hello --listen "127.0.0.1:$UP" >"$WORK/hello.out" 2>"$WORK/hello.err" &
    PIDS+=($!)
    wait_port "$UP"
}

# nginx_proxy_conf DIR PORT [WORKERS] [LISTEN_OPTIONS] [SERVER_LINES]:
# writes DIR/nginx.conf for nginx as a reverse proxy on 127.0.0.1:PORT in
# front of the upstream on $UP (upstream keep-alive, access log off),
# WORKERS workers (default 1), LISTEN_OPTIONS after the address (such as
# `ssl http2`) and SERVER_LINES in its server block.
nginx_proxy_conf() {
    local d=$1
    mkdir -p "$d"
    cat >"$d/nginx.conf" <<EOF
worker_processes ${3:-1};
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $d/body;
    proxy_temp_path $d/proxy;
    upstream app { server 127.0.0.1:$UP; keepalive 64; }
    server {
        listen 127.0.0.1:$2 ${4:-};
        ${5:-}
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
}

# start_nginx [NAME] [WORKERS] -> NGX (its port), NGX_MASTER, NGX_WORKER (its
# first worker's pid): WORKERS workers (default 1), proxy_pass to the
# upstream on $UP with upstream keep-alive, access log off; its files in
# $WORK/NAME (default nginx).
start_nginx() {
    local d="$WORK/${1:-nginx}"
    NGX=$(free_port)
    nginx_proxy_conf "$d" "$NGX" "${2:-1}"
    nginx -p "$d" -c "$d/nginx.conf" -g 'daemon off;' &
    PIDS+=($!)
    NGX_MASTER=$!
    wait_port "$NGX"
    NGX_WORKER=$(pgrep -P "$(cat "$d/nginx.pid")" | head -1)
}

# start_fast_upstream BYTES -> UPF (its port): nginx, one worker, answering
# every request with 200 and the same file of BYTES bytes from the page
# cache, access log off: a fast upstream, so that the proxy in front of it
# is what is measured. FAST_UPSTREAM=return: the same body from nginx's
# `return 200 "..."` instead, which does no file system calls per
# request; bodies under 4000 bytes only.
start_fast_upstream() {
    local bytes=$1 d="$WORK/fast-$1"
    local serve="try_files /body =404;"
    if [ "${FAST_UPSTREAM:-file}" = return ]; then
        # nginx refuses a configuration parameter of 4 KiB or more.
        if [ "$bytes" -ge 4000 ]; then
            echo "FAST_UPSTREAM=return takes bodies under 4000 bytes (BODIES=2)" >&2
            exit 2
        fi
        serve="return 200 \"$(python3 -c "print('x' * $bytes)")\";"
    fi
    UPF=$(free_port)
    mkdir -p "$d/www"
    python3 -c "import sys; open(sys.argv[1], 'w').write('x' * $bytes)" "$d/www/body"
    # nginx's worker may run as another user (nobody, when started as
    # root): it must be able to reach the file.
    chmod o+x "$WORK" "$d"
    chmod o+rx "$d/www"
    chmod o+r "$d/www/body"
    cat >"$d/nginx.conf" <<EOF
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $d/body-temp;
    keepalive_requests 1000000;
    default_type text/plain;
    server {
        listen 127.0.0.1:$UPF;
        root $d/www;
        location / { $serve }
    }
}
EOF
    nginx -p "$d" -c "$d/nginx.conf" -g 'daemon off;' &
    PIDS+=($!)
    wait_port "$UPF"
}

# wrk_summary < wrk --latency output -> "rps p50_ms p99_ms requests errors"
wrk_summary() {
    python3 -c '
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
