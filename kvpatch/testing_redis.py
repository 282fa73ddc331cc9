"""Throwaway Redis Cluster on loopback: several `redis-server` processes in cluster mode, each on a
free port, joined by `redis-cli --cluster create`. For the cluster tests and
tools/bench_redis_cluster.py, so both run against real servers (no mock of the cluster protocol).

Nodes run without persistence and with `cluster-require-full-coverage no`: a killed node's slots
fail alone while the others keep answering, the configuration the cluster tier needs
(docs/reuse.md). A node can be killed and restarted on its port (it rejoins from its nodes file).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

#: How long the cluster may take to start (or a restarted node to rejoin) before it is a failure.
START_TIMEOUT_S = 30.0


def free_port() -> int:
    """A loopback TCP port nothing listens on now (and whose cluster-bus port, +10000, is valid)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 <= 65535:
            return port


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (Debian/Ubuntu: apt-get install redis-server)")
    return path


class LocalCluster:
    """`masters` redis-server processes in cluster mode under `directory`, no replicas."""

    def __init__(self, directory: Path, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        self.directory, self.node_timeout_ms = directory, node_timeout_ms
        self.server, self.cli = _binary("redis-server"), _binary("redis-cli")
        self.ports = [free_port() for _ in range(masters)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """The URL of the first node (the cluster client discovers the others from it)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        """Start every node, create the cluster, wait until every node reports cluster_state:ok."""
        for port in self.ports:
            self.start_node(port, wait=False)
        for port in self.ports:
            self._wait(port, "ping", lambda out: out.strip() == "PONG")
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run([self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=START_TIMEOUT_S)
        for port in self.ports:
            self.wait_ok(port)

    def start_node(self, port: int, wait: bool = True) -> None:
        """(Re)start the node of `port`; with `wait`, until it reports cluster_state:ok again."""
        node_dir = self.directory / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [self.server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(node_dir), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-require-full-coverage", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait:
            self.wait_ok(port)

    def kill_node(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait()

    def wait_ok(self, port: int) -> None:
        self._wait(port, "cluster info", lambda out: "cluster_state:ok" in out)

    def _wait(self, port: int, command: str, done: Callable[[str], bool]) -> None:
        """Poll `redis-cli -p port <command>` until `done(output)`; RuntimeError after START_TIMEOUT_S."""
        deadline, out = time.monotonic() + START_TIMEOUT_S, ""
        while time.monotonic() < deadline:
            out = subprocess.run([self.cli, "-p", str(port), *command.split()], capture_output=True, text=True,
                                 timeout=START_TIMEOUT_S).stdout
            if done(out):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis cluster node 127.0.0.1:{port}: no {command!r} success within "
                           f"{START_TIMEOUT_S:g} s (last answer: {out.strip()[:200]!r})")

    def stop(self) -> None:
        """Kill every node still running."""
        for port in list(self.procs):
            self.kill_node(port)
