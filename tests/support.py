"""What the tests and the load tests share to drive a real server: a free port, the CLI in a
subprocess, deadline-based polling, and parsed /metrics scrapes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition", interval: float = 0.05
) -> object:
    """Poll `predicate` until it returns something truthy (returned); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class ServerProcess:
    """`python -m server [SUBCOMMAND] --port <free port> ARGS` with its output in log_path."""

    def __init__(
        self, args: list[str], log_path: Path, env: dict[str, str] | None = None, subcommand: tuple[str, ...] = ()
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", *subcommand, "--port", str(self.port), *args],
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + "/health", timeout=1, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the drain), then SIGKILL past timeout; the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Scrape:
    """One parsed GET /metrics: `value(name, **labels)` reads one sample (KeyError when absent)."""

    def __init__(self, text: str):
        self.samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        if key not in self.samples:  # every series is exported from the start, so absent = a typo
            raise KeyError(f"no sample {name}{labels or ''} in /metrics")
        return self.samples[key]

    def moved(self, before: Scrape, name: str, **labels: str) -> float:
        """This scrape's value minus before's; a labelled series first seen here counts from 0."""
        key = (name, frozenset(labels.items()))
        return self.value(name, **labels) - before.samples.get(key, 0.0)

    def batches_over(self, rows: int) -> float:
        """Forwards with more than `rows` rows, from the llada_batch_rows histogram."""
        return self.value("llada_batch_rows_count") - self.value("llada_batch_rows_bucket", le=f"{float(rows)}")


def scrape(url: str, headers: dict[str, str] | None = None) -> Scrape:
    response = httpx.get(url + "/metrics", timeout=30, headers=headers, trust_env=False)
    assert response.status_code == 200, response.text
    return Scrape(response.text)
