"""Ray nodes a test starts as `ray start --block` children of its own: SIGTERM to one stops exactly that node's
processes, so a teardown never touches other Ray clusters on the machine (a plain `ray stop` would stop them all)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
# A test's cluster stops whole: no node needs Ray's 30 s drain on SIGTERM, which lets other nodes' Serve proxies
# route around it.
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def node_ports() -> list[str]:
    """`ray start` options giving every listening port of a node explicitly, each free: the defaults (52365, 8076,
    ...) collide with other clusters on the machine."""
    names = ["node-manager", "object-manager", "dashboard-agent-listen", "dashboard-agent-grpc", "metrics-export"]
    names.append("runtime-env-agent")
    return [f"--{name}-port={port}" for name, port in zip(names, free_ports(len(names)), strict=True)]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after a minute."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
