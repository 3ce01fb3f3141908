#!/usr/bin/env python3
"""Idle connections through an upgrade of the `tcp_echo` example (raw
connections) or the `hello` example (HTTP/1.1 keep-alive connections,
`--server hello`): migrated to the new generation, or drained (what nginx,
HAProxy and Pingora do: only the listening socket is passed on).

For each round and each case, a fresh server, N connections opened and
each checked with one echo, then one upgrade over the control socket:
  * migrate: connection migration on (`--settle 0s`); timed from the upgrade
    request to its answer, and to the old generation's exit (every
    connection handed over); then each connection must still echo (for
    hello: answer a GET on the same connection, from the new generation,
    without `Connection: close`);
  * drain: `--no-migrate --drain-timeout 1s`: the old generation keeps the
    connections until its drain timeout, then closes them.
Reports connections still working / closed after the upgrade, the times,
and the old and new generations' RSS (VmRSS) around the upgrade.

Usage: python3 bench/migrate-idle.py [--connections N] [--rounds R] [--server tcp_echo|hello]
Needs `ulimit -n` above N (each process holds N connections). Prints a
Markdown table for docs/BENCHMARKS.md. Stdlib only.
"""

import argparse
import ctypes
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(server):
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "baton", "--example", server],
        cwd=ROOT,
        check=True,
    )
    return os.path.join(ROOT, "target", "release", "examples", server)


def control(path, request, timeout=120):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall((json.dumps(request) + "\n").encode())
    line = s.makefile().readline()
    s.close()
    return json.loads(line)


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def echo(s, byte):
    try:
        s.sendall(byte)
        return s.recv(1) == byte
    except OSError:
        return False


def get(s, generation):
    """One GET on keep-alive connection `s`: answered 200 by `generation`,
    and the connection stays open."""
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                return False
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        head = head.decode("latin-1").lower()
        length = int(head.split("content-length:")[1].split("\r\n")[0])
        while len(body) < length:
            chunk = s.recv(4096)
            if not chunk:
                return False
            body += chunk
        return (
            head.startswith("http/1.1 200")
            and "connection: close" not in head
            and f"generation {generation} ".encode() in body
        )
    except (OSError, ValueError, IndexError):
        return False


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def one(binary, n, migrate, http):
    d = tempfile.mkdtemp(prefix="baton-migrate-bench-")
    sock = os.path.join(d, "control.sock")
    args = [binary, "--listen", "127.0.0.1:0", "--control-socket", sock, "--settle", "0s"]
    args += ["--drain-timeout", "60s"] if migrate else ["--no-migrate", "--drain-timeout", "1s"]
    devnull = open(os.devnull, "w")
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=devnull, text=True)
    ready = json.loads(p.stdout.readline())
    host, port = ready["listen"].rsplit(":", 1)
    conns = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)))
        s.settimeout(10)
        conns.append(s)
    if http:
        ok_before = sum(get(s, 1) for s in conns)
    else:
        ok_before = sum(echo(s, b"a") for s in conns)
    old_rss = rss_kib(p.pid)
    t0 = time.monotonic()
    answer = control(sock, {"command": "upgrade"})
    t_answer = time.monotonic() - t0
    new_pid = answer["pid"]
    while p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.001)
    t_exit = time.monotonic() - t0
    new_rss = rss_kib(new_pid)
    if http:
        ok_after = sum(get(s, 2) for s in conns)
    else:
        ok_after = sum(echo(s, b"b") for s in conns)
    for s in conns:
        s.close()
    try:
        os.kill(new_pid, signal.SIGKILL)
    except OSError:
        pass
    deadline = time.monotonic() + 10
    while not gone(new_pid) and time.monotonic() < deadline:
        try:
            os.waitpid(new_pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.01)
    return dict(
        ok_before=ok_before,
        ok_after=ok_after,
        closed=n - ok_after,
        answer_ms=t_answer * 1000,
        old_exit_ms=t_exit * 1000,
        old_rss_mib=old_rss / 1024,
        new_rss_mib=new_rss / 1024,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--server", choices=["tcp_echo", "hello"], default="tcp_echo")
    a = ap.parse_args()
    # Generations whose parent (the previous one) exited are reparented to
    # us, so that we can reap them.
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    binary = build(a.server)
    results = {"migrate": [], "drain": []}
    for _ in range(a.rounds):
        for case in ("migrate", "drain"):
            results[case].append(one(binary, a.connections, case == "migrate", a.server == "hello"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"server: {a.server}, connections: {a.connections}, rounds: {a.rounds} (medians)\n")
    print("| case | still working after the upgrade | closed | upgrade answered | old generation gone | RSS old → new |")
    print("|---|---|---|---|---|---|")
    for case, rs in results.items():
        med = lambda k: statistics.median(r[k] for r in rs)
        print(
            f"| {case} | {med('ok_after'):.0f} / {a.connections} | {med('closed'):.0f} "
            f"| {med('answer_ms'):.0f} ms | {med('old_exit_ms'):.0f} ms "
            f"| {med('old_rss_mib'):.1f} → {med('new_rss_mib'):.1f} MiB |"
        )
    print("\nraw:", json.dumps(results))


main()
