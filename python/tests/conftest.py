"""Fixtures for the Python package tests.

* ``tiny_models`` — a session-wide folder with tiny-llama and tiny-gpt2
  written by make_tiny (deterministic, well under a second).
* ``broker`` — the real C ``aigw-broker`` on free loopback ports, with short
  timers. The binary comes from ``$AIGW_BUILD`` (default ``build/``, then
  ``build-py/``); a missing binary FAILS the test (never skips).
* ``client`` — a GWP/1 test client (tests/integration/gwp.py, the spec-based
  implementation; test code only).
* ``spawn`` — starts child processes and kills them at teardown.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import pytest

HERE = Path(__file__).resolve().parent
PYDIR = HERE.parent
REPO = PYDIR.parent
sys.path.insert(0, str(PYDIR))
sys.path.insert(0, str(REPO / "tests" / "integration"))

import gwp  # noqa: E402  (test-only: the spec-based GWP/1 implementation)
from ports import free_port  # noqa: E402,F401  (re-exported to the tests)

PYTHON = "/usr/bin/python3"
HEARTBEAT_MS = 200
EXPIRY_MS = 600
GRACE_MS = 1000


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A child process with its output collected by line."""

    def __init__(self, argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> None:
        full = dict(os.environ)
        full.update(env or {})
        self.argv = list(argv)
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=full, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in iter(self.popen.stdout.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float = 10.0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.popen.poll() is not None:
                    break
                self._cond.wait(min(left, 0.1))
        raise AssertionError(f"no line matching {pattern!r} (exit={self.popen.poll()}):\n"
                             + "\n".join(self.lines[-40:]))

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            self.popen.wait(timeout=5)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
        if self.popen.stdout is not None:
            self._reader.join(timeout=1)
            self.popen.stdout.close()


@pytest.fixture
def spawn() -> Iterator[Callable[..., Proc]]:
    made: List[Proc] = []

    def start(argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> Proc:
        proc = Proc(argv, env)
        made.append(proc)
        return proc
    try:
        yield start
    finally:
        for proc in reversed(made):
            proc.kill(signal.SIGKILL)
            proc.stop()


def _broker_bin() -> Path:
    candidates = [Path(os.environ["AIGW_BUILD"])] if os.environ.get("AIGW_BUILD") else [
        REPO / "build", REPO / "build-py"]
    for folder in candidates:
        path = folder / "aigw-broker"
        if os.access(path, os.X_OK):
            return path
    pytest.fail(f"aigw-broker not found in {', '.join(map(str, candidates))}: build it "
                f"(make, or make BUILD=build-py) or set AIGW_BUILD", pytrace=False)


class Broker:
    """The real broker on free loopback ports."""

    def __init__(self, spawn: Callable[..., Proc]) -> None:
        self.spawn = spawn
        self.bus = f"tcp://127.0.0.1:{free_port()}"
        self.tap = f"tcp://127.0.0.1:{free_port()}"
        self.proc: Optional[Proc] = None

    def start(self) -> "Broker":
        self.proc = self.spawn([str(_broker_bin()), "--bus", self.bus, "--tap", self.tap,
                                "--heartbeat-ms", str(HEARTBEAT_MS),
                                "--expiry-ms", str(EXPIRY_MS), "--grace-ms", str(GRACE_MS)])
        self.proc.wait_line("broker listening", 5)
        return self


@pytest.fixture
def broker(spawn: Callable[..., Proc]) -> Broker:
    return Broker(spawn).start()


@pytest.fixture
def client(broker: Broker) -> Iterator[gwp.Client]:
    c = gwp.Client(broker.bus, heartbeat_ms=HEARTBEAT_MS)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aigw_models import make_tiny
    root = tmp_path_factory.mktemp("models")
    make_tiny.make_all(str(root))
    return root


def services(client: gwp.Client) -> Dict[str, Dict[str, Any]]:
    reply = client.call("gw.services", b"", timeout_ms=2000)
    assert reply is not None and reply.status == 200
    body = gwp.Message.body_obj(reply)
    return {entry["name"]: entry for entry in body["services"]}


def wait_registered(client: gwp.Client, service: str, workers: int = 1,
                    timeout: float = 10.0) -> Dict[str, Any]:
    def check() -> Optional[Dict[str, Any]]:
        entry = services(client).get(service)
        return entry if entry and entry["workers"] >= workers else None
    return wait_for(check, timeout, f"{workers} worker(s) for {service}", 0.05)
