"""Tests of `llada-server ray` against real Ray: the CLI in a subprocess starts a Ray of its own
(once per test module), small, under a short RAY_TMPDIR of its own, which is also how every
process of that Ray is found again: they all inherit it in their environment."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from tests.support import ServerProcess, scrape, wait_for


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (each replica's metrics port is base + rank)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError(f"no {count} consecutive free ports")


class RayServer:
    """`python -m server ray --replicas N --metrics-port M ARGS` and the Ray it starts."""

    def __init__(self, replicas: int, args: list[str], log_path: Path):
        self.replicas = replicas
        self.metrics_port = free_ports(replicas)
        # Ray's socket paths must stay under the 107 bytes a Unix socket name may have.
        self.ray_dir = tempfile.mkdtemp(prefix="llr", dir="/tmp")
        cli_args = ["--replicas", str(replicas), "--metrics-port", str(self.metrics_port), *args]
        self.server = ServerProcess(cli_args, log_path, {"RAY_TMPDIR": self.ray_dir}, subcommand=("ray",))
        self.url = self.server.url

    def metrics_url(self, rank: int) -> str:
        return f"http://127.0.0.1:{self.metrics_port + rank}"

    def replica_labels(self) -> list[str | None]:
        """Each replica's label as its metrics port reports it (None where nothing answers)."""
        labels = []
        for rank in range(self.replicas):
            try:
                labels.append(replica_label(scrape(self.metrics_url(rank)).samples))
            except Exception:
                labels.append(None)
        return labels

    def wait_ready(self, timeout: float = 240.0) -> None:
        self.server.wait_ready(timeout)
        wait_for(lambda: all(self.replica_labels()), timeout, "every replica's metrics port")

    def processes(self) -> dict[int, str]:
        """pid -> command line of every process of this Ray (the CLI included)."""
        marker = f"RAY_TMPDIR={self.ray_dir}".encode()
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                pass
        return found

    def replica_pids(self) -> list[int]:
        return [pid for pid, cmd in self.processes().items() if cmd.startswith("ray::ServeReplica")]

    def stop(self, timeout: float = 60.0) -> int:
        return self.server.stop(timeout)

    def kill_leftovers(self) -> dict[int, str]:
        """SIGKILL what is left of this Ray (by pid) and remove its folder; returns what was left."""
        left = self.processes()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.ray_dir, ignore_errors=True)
        return left


def replica_label(samples: dict) -> str:
    """The replica label of a replica's scrape (Scrape.samples); every sample carries the same one."""
    (label,) = {dict(labels)["replica"] for _, labels in samples}
    return label
