#!/usr/bin/env python3
"""Upgrade time of the `hello` example: control request -> new generation active.

Compares, in the same run and on the same machine:
  * Baton upgrade: `{"command":"upgrade"}` on the control socket, timed from
    sending the request to receiving the answer (which comes only once the new
    generation is active), plus the server's own `elapsed_ms`;
  * naive restart: SIGTERM, wait for exit, start the binary again, timed until
    the port accepts a connection again (the window in which a client is
    refused).

Usage: python3 bench/upgrade-time.py [--upgrades N] [--restarts N]
Prints a Markdown table for docs/BENCHMARKS.md. Stdlib only.
"""

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build():
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "baton", "--example", "hello"],
        cwd=ROOT,
        check=True,
    )
    return os.path.join(ROOT, "target", "release", "examples", "hello")


def control(path, request, timeout=60):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall((json.dumps(request) + "\n").encode())
    line = s.makefile().readline()
    s.close()
    return json.loads(line)


def start(hello, args, devnull):
    p = subprocess.Popen(
        [hello] + args, stdout=subprocess.PIPE, stderr=devnull, text=True, start_new_session=True
    )
    ready = json.loads(p.stdout.readline())
    return p, ready


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--upgrades", type=int, default=50)
    ap.add_argument("--restarts", type=int, default=20)
    a = ap.parse_args()
    hello = build()
    tmp = tempfile.mkdtemp(prefix="baton-upgrade-time-")
    sock = os.path.join(tmp, "control.sock")
    devnull = open(os.devnull, "w")
    env_args = ["--control-socket", sock, "--drain-timeout", "5s"]

    # Baton upgrades.
    p, ready = start(hello, ["--listen", "127.0.0.1:0"] + env_args, devnull)
    pids = [p.pid]
    client_ms, server_ms = [], []
    try:
        for _ in range(a.upgrades):
            t0 = time.perf_counter()
            ans = control(sock, {"command": "upgrade"})
            client_ms.append((time.perf_counter() - t0) * 1000)
            if not ans.get("ok"):
                sys.exit(f"upgrade failed: {ans}")
            server_ms.append(ans["elapsed_ms"])
            pids.append(ans["pid"])
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()

    # Naive restarts on a fixed port.
    port = int(ready["listen"].rsplit(":", 1)[1])
    addr = f"127.0.0.1:{port}"
    naive_ms = []
    p, _ = start(hello, ["--listen", addr], devnull)
    try:
        for _ in range(a.restarts):
            t0 = time.perf_counter()
            p.send_signal(signal.SIGTERM)
            p.wait()
            p = subprocess.Popen(
                [hello, "--listen", addr], stdout=subprocess.DEVNULL, stderr=devnull,
                start_new_session=True,
            )
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.0002)
            naive_ms.append((time.perf_counter() - t0) * 1000)
    finally:
        p.kill()
        p.wait()

    def row(name, xs):
        return f"| {name} | {len(xs)} | {statistics.median(xs):.2f} | {pct(xs, 0.9):.2f} | {max(xs):.2f} |"

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, {platform.release()}")
    print()
    print("| what | n | median ms | p90 ms | max ms |")
    print("|---|---|---|---|---|")
    print(row("Baton upgrade, control request -> answer (new generation active)", client_ms))
    print(row("Baton upgrade, server-reported (request -> ready)", server_ms))
    print(row("naive restart, SIGTERM -> port accepts again", naive_ms))
    print()
    print(
        f"ratio naive restart / Baton upgrade (medians): "
        f"{statistics.median(naive_ms) / statistics.median(client_ms):.2f}"
    )
    print("(during a Baton upgrade the port never stops accepting; during a naive restart it refuses connections)")


if __name__ == "__main__":
    main()
