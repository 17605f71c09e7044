"""Test hosts: network namespaces joined by veth pairs to one bridge, each with its own address from the benchmarking
range 198.18.0.0/15, so a Ray cluster's nodes reach each other over a real network and nothing else.

The bridge sits in a namespace of its own: the machine's own network is never touched, and no traffic leaves the
namespaces. `private_hosts` removes the namespaces and every process left in them on exit, also when a test fails.
Making namespaces needs root (CAP_NET_ADMIN) and iproute2; `can_make_hosts` says whether this machine can.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
SUBNET = "198.18.0"
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Host:
    """A host at `ip`: a network namespace, or None for this machine itself (loopback)."""

    netns: str | None
    ip: str

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def call(self, fn: Callable[[], T]) -> T:
        """fn() run in a thread that has joined this host's network namespace, so this process's own clients (httpx,
        a database driver) reach the hosts' addresses. A namespace is a per-thread property on Linux."""
        if self.netns is None:
            return fn()
        result: dict[str, object] = {}

        def run() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/run/netns/{self.netns}") as ns:
                if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {self.netns}")
            try:
                result["value"] = fn()
            except BaseException as exc:  # handed back to the caller's thread
                result["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]  # type: ignore[misc]
        return result["value"]  # type: ignore[return-value]


def can_make_hosts() -> str | None:
    """None when namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"rmd-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _kill_all_in(netns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


@contextmanager
def private_hosts(n: int) -> Iterator[list[Host]]:
    """n hosts at 198.18.0.1 … 198.18.0.n on one private bridge."""
    tag = uuid.uuid4().hex[:6]
    bridge_ns = f"rmd-{tag}-br"
    hosts = [Host(f"rmd-{tag}-h{i}", f"{SUBNET}.{i + 1}") for i in range(n)]
    made: list[str] = []
    try:
        _ip("netns", "add", bridge_ns)
        made.append(bridge_ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        for i, host in enumerate(hosts):
            _ip("netns", "add", host.netns)
            made.append(host.netns)
            # Interface names must stay under 16 characters, so the pair is named by index inside its namespaces.
            outside, inside = f"rmd{tag}b{i}", f"rmd{tag}h{i}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "netns", bridge_ns)
            _ip("link", "set", inside, "netns", host.netns)
            _ip("-n", bridge_ns, "link", "set", outside, "master", "br0", "up")
            _ip("-n", host.netns, "link", "set", inside, "name", "eth0")
            _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for netns in reversed(made):
            _kill_all_in(netns)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
