"""Fixtures for the bus integration tests: real processes on loopback.

Every process is started through ``Procs`` (a per-test fixture) and killed in
its finalizer; a module-level registry and atexit hook are the safety net for
anything a crashed fixture left behind. Waits are bounded polls.

Paths: AIGW_BUILD (default <repo>/build) holds aigw-broker, aigw-testworker
and aigw-tap. A missing broker or test worker FAILS the session (it never
skips: a suite that passes because nothing ran is a defect).
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set

import msgpack
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gwp  # noqa: E402
from ports import free_port  # noqa: E402,F401  (re-exported to the tests)

REPO = HERE.parent.parent
BUILD = Path(os.environ.get("AIGW_BUILD", str(REPO / "build")))
PYTHON = "/usr/bin/python3"
PYWORKER = HERE / "pyworker.py"

#  Short timers so failure paths finish in well under a second.
HEARTBEAT_MS = 200
EXPIRY_MS = 600
GRACE_MS = 1000
RECONNECT_MS = 200

_ALL: Set["Proc"] = set()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.02) -> Any:
    """Poll predicate until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A child process whose combined stdout/stderr is collected by line."""

    def __init__(self, name: str, argv: Sequence[str], env: Optional[Dict[str, str]] = None
                 ) -> None:
        self.name = name
        self.argv = list(argv)
        self.lines: List[str] = []
        self._cond = threading.Condition()
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.popen = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=full_env, start_new_session=True)
        _ALL.add(self)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in iter(self.popen.stdout.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def has_line(self, pattern: str) -> bool:
        rx = re.compile(pattern)
        with self._cond:
            return any(rx.search(line) for line in self.lines)

    def wait_line(self, pattern: str, timeout: float = 5.0) -> str:
        """Wait for an output line matching the regex; fail with the output."""
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
                if left <= 0 or (not self.alive and not self._reader.is_alive()):
                    break
                self._cond.wait(min(left, 0.1))
        raise AssertionError(
            f"{self.name}: no line matching {pattern!r} within {timeout}s "
            f"(exit={self.popen.poll()}); output:\n{self.output()}")

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines[-60:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            self.popen.wait(timeout=5)

    def stop(self, timeout: float = 2.0) -> None:
        """SIGTERM, then SIGKILL if it is still there after timeout."""
        if self.alive:
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
        else:
            self.popen.wait()
        if self.popen.stdout is not None:
            self._reader.join(timeout=1)
            self.popen.stdout.close()
        _ALL.discard(self)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_ALL):
        try:
            proc.kill(signal.SIGKILL)
        except Exception:
            pass


def _require(path: Path) -> Path:
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing or not executable: build it first "
                    f"(make, or set AIGW_BUILD)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def broker_bin() -> Path:
    return _require(BUILD / "aigw-broker")


@pytest.fixture(scope="session")
def testworker_bin() -> Path:
    return _require(BUILD / "aigw-testworker")


class Procs:
    """Starts processes for one test and kills them all at teardown."""

    def __init__(self, broker_bin: Path, testworker_bin: Path) -> None:
        self.broker_bin = broker_bin
        self.testworker_bin = testworker_bin
        self.procs: List[Proc] = []

    def start(self, name: str, argv: Sequence[str], env: Optional[Dict[str, str]] = None
              ) -> Proc:
        proc = Proc(name, argv, env)
        self.procs.append(proc)
        return proc

    def worker(self, broker: "Broker", kind: str, service: str, mode: str = "echo",
               capacity: int = 1, idempotent: bool = False, partials: Optional[int] = None,
               delay_ms: Optional[int] = None, label: Optional[str] = None,
               wait: bool = True) -> Proc:
        """Start a pyworker.py ("py") or aigw-testworker ("c") and wait for "ready"."""
        label = label or f"{kind}-{service}-{len(self.procs)}"
        args = ["--bus", broker.bus, "--service", service, "--mode", mode,
                "--capacity", str(capacity), "--label", label,
                "--heartbeat-ms", str(HEARTBEAT_MS), "--expiry-ms", str(EXPIRY_MS),
                "--reconnect-ms", str(RECONNECT_MS)]
        if idempotent:
            args.append("--idempotent")
        if partials is not None:
            args += ["--partials", str(partials)]
        if delay_ms is not None:
            args += ["--delay-ms", str(delay_ms)]
        if kind == "py":
            argv = [PYTHON, str(PYWORKER)] + args
        elif kind == "c":
            argv = [str(self.testworker_bin)] + args
        else:
            raise ValueError(kind)
        proc = self.start(label, argv)
        proc.label = label  # type: ignore[attr-defined]
        if wait:
            proc.wait_line(r"^ready$", timeout=10)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill(signal.SIGKILL)
            proc.stop()


class Broker:
    """The real aigw-broker on free loopback ports."""

    def __init__(self, procs: Procs, queue_max: Optional[int] = None,
                 heartbeat_ms: int = HEARTBEAT_MS, expiry_ms: int = EXPIRY_MS,
                 grace_ms: int = GRACE_MS, extra: Sequence[str] = ()) -> None:
        self.procs = procs
        self.bus_port = free_port()
        self.tap_port = free_port()
        self.bus = f"tcp://127.0.0.1:{self.bus_port}"
        self.tap = f"tcp://127.0.0.1:{self.tap_port}"
        self.args = ["--bus", self.bus, "--tap", self.tap,
                     "--heartbeat-ms", str(heartbeat_ms), "--expiry-ms", str(expiry_ms),
                     "--grace-ms", str(grace_ms)]
        if queue_max is not None:
            self.args += ["--queue-max", str(queue_max)]
        self.args += list(extra)
        self.proc: Optional[Proc] = None
        self.starts = 0

    def start(self, timeout: float = 5.0) -> "Broker":
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            self.proc = self.procs.start(f"broker#{self.starts}",
                                         [str(self.procs.broker_bin)] + self.args)
            try:
                self.proc.wait_line(r"broker listening", timeout=max(0.5, deadline
                                                                       - time.monotonic()))
                return self
            except AssertionError:
                # the port may still be held by the previous incarnation
                if self.proc.alive or time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill(signal.SIGKILL)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive


@pytest.fixture
def procs(broker_bin: Path, testworker_bin: Path) -> Iterator[Procs]:
    p = Procs(broker_bin, testworker_bin)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def broker(procs: Procs) -> Broker:
    return Broker(procs).start()


@pytest.fixture
def make_broker(procs: Procs) -> Callable[..., Broker]:
    def make(**kwargs: Any) -> Broker:
        return Broker(procs, **kwargs).start()
    return make


@pytest.fixture
def clients() -> Iterator[Callable[[Broker], gwp.Client]]:
    made: List[gwp.Client] = []

    def make(broker: Broker) -> gwp.Client:
        c = gwp.Client(broker.bus, heartbeat_ms=HEARTBEAT_MS)
        made.append(c)
        return c
    try:
        yield make
    finally:
        for c in made:
            c.close()


@pytest.fixture
def client(broker: Broker, clients: Callable[[Broker], gwp.Client]) -> gwp.Client:
    return clients(broker)


# --------------------------------------------------------------------------
# Helpers shared by the tests


def unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


def services(client: gwp.Client, timeout_ms: int = 2000) -> Dict[str, Dict[str, Any]]:
    """gw.services as {name: entry}; fails if the broker does not answer."""
    reply = client.call("gw.services", b"", timeout_ms=timeout_ms)
    assert reply is not None, "gw.services: no FINAL"
    assert reply.status == 200, f"gw.services: status {reply.status}"
    body = unpack(reply.body)
    return {entry["name"]: entry for entry in body["services"]}


def wait_registered(client: gwp.Client, service: str, workers: int,
                    timeout: float = 5.0) -> Dict[str, Any]:
    """Poll gw.services until service has at least `workers` workers."""
    def check() -> Optional[Dict[str, Any]]:
        entry = services(client).get(service)
        return entry if entry and entry["workers"] >= workers else None
    return wait_for(check, timeout, f"{workers} worker(s) registered for {service}",
                    interval=0.05)


def error_code(msg: gwp.Message) -> Optional[str]:
    try:
        return unpack(msg.body)["error"]["code"]
    except Exception:
        return None


# --------------------------------------------------------------------------
# The whole gateway (tests/integration/gateway.py): broker, edge, auth,
# router, bridge and mock providers, all through `procs` so teardown kills
# every one of them.


@pytest.fixture
def make_mock(procs: Procs) -> Callable[..., Any]:
    """make_mock(name="a", **kwargs) -> gateway.MockProvider."""
    import gateway

    def make(name: str = "mock", **kwargs: Any) -> "gateway.MockProvider":
        return gateway.MockProvider(procs, name=name, **kwargs)
    return make


@pytest.fixture
def make_gateway(procs: Procs, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """make_gateway(channels, **kwargs) -> a started gateway.Gateway; every
    gateway made is stopped (all processes killed) at teardown."""
    import gateway
    made: List["gateway.Gateway"] = []

    def make(channels: Sequence[Dict[str, Any]], **kwargs: Any) -> "gateway.Gateway":
        workdir = tmp_path / f"gw{len(made)}"
        workdir.mkdir()
        gw = gateway.Gateway(procs, channels, workdir=str(workdir), **kwargs)
        made.append(gw)
        return gw.start()
    try:
        yield make
    finally:
        for gw in made:
            gw.stop()


# --------------------------------------------------------------------------
# Local models (issue 5): the Python model worker with the tiny models.


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MODEL_PATH holding tiny-llama and tiny-gpt2 (make_tiny, deterministic)."""
    root = tmp_path_factory.mktemp("models")
    subprocess.run([PYTHON, str(REPO / "python" / "aigw_models" / "make_tiny.py"),
                    "--out", str(root)], check=True, stdout=subprocess.DEVNULL)
    return root


@pytest.fixture
def make_model_worker(procs: Procs, tiny_models_dir: Path) -> Callable[..., Proc]:
    """make_model_worker(broker, models="tiny,hash-embed", capacity=2, label=None,
    model_path=None, admin="model.admin", wait=True) -> Proc running
    python/aigw_model_worker.py on the broker with the short test timers; with
    wait, returns once every model's service is registered."""
    def make(broker: "Broker", models: str = "tiny,hash-embed", capacity: int = 2,
             label: Optional[str] = None, model_path: Optional[Path] = None,
             admin: str = "model.admin", wait: bool = True) -> Proc:
        label = label or f"models-{len(procs.procs)}"
        argv = [PYTHON, str(REPO / "python" / "aigw_model_worker.py"), "--bus", broker.bus,
                "--model-path", str(model_path or tiny_models_dir), "--models", models,
                "--capacity", str(capacity), "--label", label, "--admin-service", admin,
                "--heartbeat-ms", str(HEARTBEAT_MS), "--expiry-ms", str(EXPIRY_MS),
                "--reconnect-ms", str(RECONNECT_MS)]
        proc = procs.start(label, argv)
        if wait:
            names = [f"model.{m.strip()}" for m in models.split(",") if m.strip()]
            if admin:
                names.append(admin)
            for name in names:
                proc.wait_line(rf"ready service={re.escape(name)} ", timeout=15)
        return proc
    return make


# --------------------------------------------------------------------------
# Services from tests/harness/services.sh


def require_env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        if os.environ.get("AIGW_REQUIRE_SERVICES") == "1":
            pytest.fail(f"AIGW_REQUIRE_SERVICES=1 but {name} is not set "
                        f"(run under tests/harness/services.sh)", pytrace=False)
        pytest.skip(f"{name} not set (run under tests/harness/services.sh)")
    return value


class RedisControl:
    """Stop and restart the harness's Redis on its own port."""

    def __init__(self) -> None:
        self.port = require_env("REDISTEST_PORT")
        self.dir = require_env("REDISTEST_DIR")

    def ping(self) -> bool:
        out = subprocess.run(["redis-cli", "-p", self.port, "ping"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() == "PONG"

    def stop(self) -> None:
        subprocess.run(["redis-cli", "-p", self.port, "shutdown", "nosave"],
                       capture_output=True, timeout=5)
        wait_for(lambda: not self.ping(), 5, "Redis to stop")

    def start(self) -> None:
        if self.ping():
            return
        subprocess.run(["redis-server", "--port", self.port, "--bind", "127.0.0.1",
                        "--daemonize", "yes", "--pidfile", f"{self.dir}/redis.pid",
                        "--dir", self.dir, "--logfile", f"{self.dir}/redis.log",
                        "--save", "", "--appendonly", "no"], check=True, timeout=10)
        wait_for(self.ping, 5, "Redis to answer PING")


@pytest.fixture
def redis_ctl() -> Iterator[RedisControl]:
    require_env("AIGW_TEST_REDIS_URL")
    ctl = RedisControl()
    try:
        yield ctl
    finally:
        ctl.start()  # whatever happened, leave Redis running for the next test
