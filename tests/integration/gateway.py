"""The whole gateway on loopback, for black-box end-to-end tests.

``Gateway`` starts the real processes of the full pipeline: one
aigw-broker, N aigw-edge, N aigw-auth, N aigw-ratelimit, N aigw-router,
N aigw-bridge and N aigw-billing, in front of one or more mock providers
(tests/mock_provider.py, started with ``MockProvider``). The edge's slip is
set explicitly to ``auth,ratelimit,router``. By default billing keeps its
ledger in a SQLite file in the gateway's workdir (``database_url`` for
PostgreSQL), ratelimit counts in memory (``redis_url`` for Redis) and
the bridges spool usage events in ``<workdir>/spool``; ``limits`` and
``prices`` (a dict, written to a file, or a path) become
AIGW_LIMITS_FILE and AIGW_PRICES_FILE. A count of 0 leaves a stage out
(``counts={"ratelimit": 0}`` also drops it from the slip). Every
process goes through conftest's ``Procs`` so the per-test finalizer (and the
atexit safety net) kills it, whatever the test did. Startup waits on each
edge's ``GET /health/ready`` and on every stage's registration with bounded
polls; ``stop`` kills everything. ``sql`` reads billing's store.

Typical use (the ``make_gateway`` and ``make_mock`` fixtures in conftest.py
wrap this)::

    a, b = MockProvider(procs), MockProvider(procs)
    gw = Gateway(procs, channels=[channel("a", a), channel("b", b)],
                 env={"AIGW_BREAKER_COOLDOWN_MS": "1000"}).start()
    status, headers, body = gw.request("POST", "/v1/chat/completions", chat())

Standard library only (plus conftest), so test_sdk.py and ad hoc scripts can
use it too.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gwp
from conftest import (BUILD, EXPIRY_MS, HEARTBEAT_MS, PYTHON, Broker, Proc, Procs, free_port,
                      wait_for, wait_registered)

HERE = Path(__file__).resolve().parent
MOCK = HERE.parent / "mock_provider.py"
KEY = "sk-aigw-e2e-0123456789abcdef"
MODEL = "mock-gpt"
EMBED_MODEL = "mock-embed"
MOCK_MODELS = ["mock-gpt", "mock-gpt-mini", "mock-embed"]

#  Stages of the gateway and their binaries, in start order (backends first,
#  so the edge's readiness is the last thing to come true).
STAGES = ("billing", "bridge", "router", "ratelimit", "auth", "edge")
#  The edge's slip (STAGES.md §6.1: ratelimit between auth and router).
SLIP = ("auth", "ratelimit", "router")
#  Variables of the money stages that must never leak in from the caller's
#  shell: the stages read an empty variable as unset (gw_env).
MONEY_ENV = ("DATABASE_URL", "REDIS_URL", "REDIS_ADDR", "REDIS_PASSWORD", "REDIS_DB",
             "AIGW_LIMITS_FILE", "AIGW_PRICES_FILE", "AIGW_PRICE_MULTIPLIER",
             "RATE_LIMIT_REQUESTS_PER_MINUTE", "RATE_LIMIT_BURST", "AIGW_TPM",
             "AIGW_MAX_CONCURRENT", "AIGW_DEFAULT_MAX_TOKENS", "AIGW_RATELIMIT_FAIL",
             "AIGW_RATELIMIT_PREFIX", "AIGW_REDIS_TIMEOUT_MS", "AIGW_DISCONNECT",
             "AIGW_BILLING_SETTLE", "AIGW_BILLING", "AIGW_SPOOL_MAX", "AIGW_SPOOL_FSYNC",
             "AIGW_GROUP_MULTIPLIERS", "AIGW_GROUPS_REFRESH_MS", "AIGW_ENFORCE_BALANCE",
             "AIGW_BALANCE_REFRESH_MS")

Response = Tuple[int, Dict[str, str], bytes]


def binary(stage: str) -> Path:
    return BUILD / f"aigw-{stage}"


def missing_binaries() -> List[str]:
    names = ["broker", "gateway"] + list(STAGES)
    return [str(binary(n)) for n in names if not os.access(binary(n), os.X_OK)]


def chat(content: str = "hello there world", model: str = MODEL, stream: bool = False,
         **extra: Any) -> Dict[str, Any]:
    body: Dict[str, Any] = {"model": model,
                            "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream"] = True
    body.update(extra)
    return body


def assert_openai_error(body: bytes, status: Optional[int] = None) -> Dict[str, Any]:
    """The OpenAI error object: {"error": {message, type, param, code}}."""
    try:
        obj = json.loads(body)
    except ValueError:
        raise AssertionError(f"error body is not JSON (status {status}): {body[:300]!r}")
    assert isinstance(obj, dict) and isinstance(obj.get("error"), dict), obj
    err = obj["error"]
    assert {"message", "type", "param", "code"} <= set(err), obj
    assert isinstance(err["message"], str) and err["message"], obj
    assert isinstance(err["type"], str) and err["type"], obj
    return err


def write_json_atomic(path: str, content: Any) -> None:
    """Write JSON so a reloading reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(content, f)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# The mock provider


class MockProvider:
    """tests/mock_provider.py on a free port, with its control API."""

    def __init__(self, procs: Procs, name: str = "mock", models: Sequence[str] = MOCK_MODELS,
                 api_key: Optional[str] = None) -> None:
        self.name = name
        argv = [PYTHON, str(MOCK), "--port", "0", "--models", ",".join(models)]
        if api_key:
            argv += ["--api-key", api_key]
        self.proc: Proc = procs.start(name, argv)
        line = self.proc.wait_line(r"^listening \d+$", timeout=10)
        self.port = int(line.split()[1])
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def _call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            payload = resp.read()
            assert resp.status == 200, f"{self.name} {path}: {resp.status} {payload[:200]!r}"
            return json.loads(payload)
        finally:
            conn.close()

    def config(self, **fields: Any) -> Dict[str, Any]:
        return self._call("POST", "/_mock/config", fields)

    def reset(self) -> None:
        self._call("POST", "/_mock/reset")

    def stats(self) -> Dict[str, Any]:
        return self._call("GET", "/_mock/stats")

    def requests(self, path: str = "/v1/chat/completions") -> int:
        return int(self.stats()["by_path"].get(path, 0))


def channel(cid: str, mock: Optional[MockProvider] = None, base_url: Optional[str] = None,
            models: Any = None, **fields: Any) -> Dict[str, Any]:
    """One entry of the router's channel file (docs/ROUTING.md)."""
    entry: Dict[str, Any] = {"id": cid,
                             "base_url": base_url or (mock.base_url if mock else ""),
                             "models": models if models is not None else list(MOCK_MODELS)}
    entry.update(fields)
    return entry


# --------------------------------------------------------------------------
# HTTP client with one keep-alive connection per thread and edge


class HttpClient:
    """Thread-safe: each thread keeps its own keep-alive connection per port."""

    def __init__(self, timeout: float = 15.0) -> None:
        self.timeout = timeout
        self._local = threading.local()

    def _conn(self, port: int) -> http.client.HTTPConnection:
        conns = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(port)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout)
            conns[port] = conn
        return conn

    def drop(self, port: int) -> None:
        conns = self._local.__dict__.setdefault("conns", {})
        conn = conns.pop(port, None)
        if conn is not None:
            conn.close()

    def request(self, port: int, method: str, path: str, body: Any = None,
                headers: Optional[Dict[str, str]] = None, raw: Optional[bytes] = None
                ) -> Response:
        """One request; a stale keep-alive connection is retried once on a fresh
        one only when the server closed it before answering anything (the
        idle-close race every HTTP client handles). Other connection errors
        propagate (the caller decides whether to fail over)."""
        data = raw if raw is not None else (json.dumps(body).encode()
                                            if body is not None else None)
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        for attempt in (0, 1):
            conn = self._conn(port)
            reused = conn.sock is not None
            try:
                conn.request(method, path, body=data, headers=hdrs)
                resp = conn.getresponse()
                payload = resp.read()
                if resp.will_close:
                    self.drop(port)
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as exc:
                self.drop(port)
                if attempt == 0 and reused:
                    continue
                raise exc
            except BaseException:
                self.drop(port)
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in self._local.__dict__.get("conns", {}).values():
            conn.close()
        self._local.__dict__["conns"] = {}


# --------------------------------------------------------------------------
# The gateway


class Gateway:
    """The full stack on one broker. Counts per stage are configurable for
    scale-out tests (0 leaves a stage out); ``stages[stage]`` holds the
    processes, ``kill`` and ``restart`` act on one of them.

    Money: ``database_url`` (billing's DATABASE_URL; default a SQLite file
    ``<workdir>/var/aigw.db``), ``redis_url`` (ratelimit's REDIS_URL; default
    counters in memory), ``limits`` / ``prices`` (dict written to a JSON file
    in the workdir, or a path; AIGW_LIMITS_FILE / AIGW_PRICES_FILE, given to
    every process). Anything else goes through ``env`` (all processes),
    ``edge_env`` (edges only) or ``stage_env`` ({stage: env}, one stage).

    ``colocated`` (stage names, "edge" included) runs the broker and those
    stages as one aigw-gateway process (DESIGN.md §8 co-location) on the
    same bus address; the other stages still run as their own processes
    and join it over tcp. ``colocated_proc`` is that process."""

    def __init__(self, procs: Procs, channels: Sequence[Dict[str, Any]],
                 keys: Sequence[str] = (KEY,), env: Optional[Dict[str, str]] = None,
                 edge_env: Optional[Dict[str, str]] = None,
                 counts: Optional[Dict[str, int]] = None,
                 broker_kwargs: Optional[Dict[str, Any]] = None,
                 workdir: Optional[str] = None,
                 database_url: Optional[str] = None,
                 redis_url: Optional[str] = None,
                 limits: Any = None, prices: Any = None,
                 stage_env: Optional[Dict[str, Dict[str, str]]] = None,
                 colocated: Sequence[str] = ()) -> None:
        missing = missing_binaries()
        if missing:
            raise AssertionError(f"missing binaries (build them: make, or set AIGW_BUILD): "
                                 f"{', '.join(missing)}")
        self.procs = procs
        self.keys = list(keys)
        self.key = self.keys[0] if self.keys else ""
        self.counts = {stage: 1 for stage in STAGES}
        self.counts.update(counts or {})
        self.env = dict(env or {})
        self.edge_env = dict(edge_env or {})
        self.stage_env = {stage: dict(e) for stage, e in (stage_env or {}).items()}
        self.workdir = workdir or tempfile.mkdtemp(prefix="aigw-e2e-")
        self.channels_file = os.path.join(self.workdir, "channels.json")
        with open(self.channels_file, "w") as f:
            json.dump(list(channels), f)
        #  Billing's store: SQLite in the workdir unless told otherwise.
        self.sqlite_path: Optional[str] = None
        if database_url is None:
            self.sqlite_path = os.path.join(self.workdir, "var", "aigw.db")
            database_url = f"sqlite://{self.sqlite_path}"
        elif database_url.startswith("sqlite://"):
            self.sqlite_path = database_url[len("sqlite://"):]
        self.database_url = database_url
        self.redis_url = redis_url or ""
        self.limits_file = self._json_file("limits.json", limits)
        self.prices_file = self._json_file("prices.json", prices)
        self.slip = [s for s in SLIP if self.counts.get(s, 1) > 0]
        self.spool_dir = os.path.join(self.workdir, "spool")
        self.broker = Broker(procs, **(broker_kwargs or {}))
        self.stages: Dict[str, List[Proc]] = {stage: [] for stage in STAGES}
        self.edge_ports: List[int] = []
        self.http = HttpClient()
        self.colocated = list(colocated)
        self.colocated_proc: Optional[Proc] = None
        for stage in self.colocated:
            assert stage in STAGES, f"unknown stage {stage}"
            self.counts[stage] = 0

    def _json_file(self, name: str, content: Any) -> str:
        """A dict/list is written to <workdir>/name; a str is a path; None is ''."""
        if content is None:
            return ""
        if isinstance(content, (str, os.PathLike)):
            return str(content)
        path = os.path.join(self.workdir, name)
        write_json_atomic(path, content)
        return path

    # -- lifecycle -----------------------------------------------------------

    def _common_env(self) -> Dict[str, str]:
        env = {"AIGW_BUS": self.broker.bus, "LOG_LEVEL": "info",
               "AIGW_HEARTBEAT_MS": str(HEARTBEAT_MS), "AIGW_EXPIRY_MS": str(EXPIRY_MS),
               "GATEWAY_API_KEYS": ",".join(self.keys),
               "AIGW_CHANNELS_FILE": self.channels_file,
               "AIGW_SLIP": ",".join(self.slip),
               "DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url,
               #  The bridges' usage spool: one folder per gateway (a bridge
               #  takes over the files of dead ones there; never the repo's
               #  var/spool, where another gateway's events would be found).
               "AIGW_SPOOL_DIR": self.spool_dir,
               "AIGW_LIMITS_FILE": self.limits_file, "AIGW_PRICES_FILE": self.prices_file}
        #  Nothing inherited from the caller's shell: the stages read an empty
        #  variable as unset (gw_env).
        for name in ("AIGW_KEYS_FILE", "AIGW_AUTH_OPEN", "TARGET_API_URL", "TARGET_API_KEY",
                     "AIGW_READY_SERVICES", "AIGW_TARGET_MODELS") + MONEY_ENV:
            env.setdefault(name, "")
        env.update(self.env)
        return env

    def _stage_env(self, stage: str) -> Dict[str, str]:
        env = self._common_env()
        env.update(self.stage_env.get(stage, {}))
        return env

    def _spawn(self, stage: str) -> Proc:
        env = self._stage_env(stage)
        index = len(self.stages[stage])
        if stage == "edge":
            port = free_port()
            env.update({"PORT": str(port), "AIGW_LISTEN": "127.0.0.1",
                        "AIGW_DRAIN_MS": "0", "AIGW_SSE_KEEPALIVE_MS": "500"})
            env.update(self.edge_env)
            self.edge_ports.append(port)
        proc = self.procs.start(f"{stage}#{index}", [str(binary(stage))], env)
        self.stages[stage].append(proc)
        return proc

    def _spawn_colocated(self) -> Proc:
        env = self._common_env()
        env.update({"AIGW_STAGES": ",".join(self.colocated), "AIGW_TAP": self.broker.tap,
                    "AIGW_GRACE_MS": "3000"})
        if "edge" in self.colocated:
            port = free_port()
            env.update({"PORT": str(port), "AIGW_LISTEN": "127.0.0.1",
                        "AIGW_DRAIN_MS": "0", "AIGW_SSE_KEEPALIVE_MS": "500"})
            env.update(self.edge_env)
            self.edge_ports.append(port)
        for stage in self.colocated:
            env.update(self.stage_env.get(stage, {}))
        self.colocated_proc = self.procs.start("gateway#0", [str(binary("gateway"))], env)
        self.colocated_proc.wait_line(r"gateway: .* in one process", timeout=10)
        return self.colocated_proc

    def start(self, timeout: float = 15.0) -> "Gateway":
        if self.colocated:
            self._spawn_colocated()
        else:
            self.broker.start()
        for stage in STAGES:
            for _ in range(self.counts[stage]):
                self._spawn(stage)
        for proc in self.stages["edge"]:
            proc.wait_line(r"edge: listening on", timeout=10)
        for port in self.edge_ports:
            self.wait_ready(port, timeout)
        #  An edge is ready once every service of its slip (and the bridge)
        #  has one worker; billing is not among them, and with several
        #  replicas each one must have registered.
        with gwp.Client(self.broker.bus, heartbeat_ms=HEARTBEAT_MS) as bus:
            for stage in STAGES:
                count = self.counts[stage] + (stage in self.colocated)
                if stage != "edge" and count > 0:
                    try:
                        wait_registered(bus, stage, count, timeout)
                    except AssertionError as exc:
                        raise AssertionError(f"{exc}\n{self.logs()}") from None
        return self

    def restart(self, stage: str, index: int = 0, timeout: float = 15.0) -> Proc:
        """Start a fresh process in place of stages[stage][index] (kill it
        first) and wait for its "serving on" line; not for the edge."""
        assert stage != "edge", "restart an edge by starting a new gateway"
        old = self.stages[stage][index]
        assert not old.alive, f"{old.name} is still running: kill it first"
        restarts = getattr(self, "_restarts", 0) + 1
        self._restarts = restarts  # type: ignore[attr-defined]
        proc = self.procs.start(f"{stage}#{index}.{restarts}", [str(binary(stage))],
                                self._stage_env(stage))
        self.stages[stage][index] = proc
        proc.wait_line(rf"{stage}: serving on", timeout=timeout)
        return proc

    def wait_ready(self, port: int, timeout: float = 15.0) -> None:
        def ready() -> bool:
            self._check_alive()
            try:
                return self.http.request(port, "GET", "/health/ready")[0] == 200
            except OSError:
                return False
        try:
            wait_for(ready, timeout, f"edge :{port} /health/ready", interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def _check_alive(self) -> None:
        every = [p for procs in self.stages.values() for p in procs]
        for proc in every + ([self.colocated_proc] if self.colocated_proc else []):
            if not proc.alive and not getattr(proc, "killed", False):
                raise AssertionError(f"{proc.name} exited with {proc.popen.poll()}:\n"
                                     f"{proc.output()}")

    def kill(self, stage: str, index: int = 0, sig: int = signal.SIGKILL) -> Proc:
        proc = self.stages[stage][index]
        proc.killed = True  # type: ignore[attr-defined]
        proc.kill(sig)
        return proc

    def stop(self) -> None:
        self.http.close()
        for stage in reversed(STAGES):
            for proc in self.stages[stage]:
                proc.killed = True  # type: ignore[attr-defined]
                proc.kill(signal.SIGKILL)
                proc.stop()
        for proc in (self.broker.proc, self.colocated_proc):
            if proc is not None:
                proc.kill(signal.SIGKILL)
                proc.stop()

    def logs(self) -> str:
        parts = []
        for proc in ([self.broker.proc, self.colocated_proc]
                     + [p for s in STAGES for p in self.stages[s]]):
            if proc is not None:
                parts.append(f"--- {proc.name} (exit={proc.popen.poll()})\n{proc.output()}")
        return "\n".join(parts)

    # -- billing's store -------------------------------------------------------

    def sql(self, query: str) -> List[Tuple[Any, ...]]:
        """Rows of one read-only query on billing's store (SQLite through
        sqlite3, PostgreSQL through psql; PostgreSQL values come back as
        strings). Portable SQL only: hex request ids via ``rid_hex_sql``."""
        if self.sqlite_path is not None:
            if not os.path.exists(self.sqlite_path):
                return []
            conn = sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True, timeout=10)
            try:
                return [tuple(row) for row in conn.execute(query)]
            finally:
                conn.close()
        out = subprocess.run(["psql", self.database_url, "-X", "-q", "-A", "-t", "-F", "|",
                              "-c", query], check=True, capture_output=True, text=True,
                             timeout=30).stdout
        return [tuple(line.split("|")) for line in out.splitlines() if line]

    @property
    def rid_hex_sql(self) -> str:
        """SQL expression for usage_ledger.request_id as 32 lowercase hex digits."""
        if self.sqlite_path is not None:
            return "lower(hex(request_id))"
        return "encode(request_id, 'hex')"

    # -- requests ------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.edge_ports[0]

    def url(self, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.edge_ports[index]}/v1"

    def auth_headers(self, key: Optional[str] = None) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.key if key is None else key}"}

    def request(self, method: str, path: str, body: Any = None, edge: int = 0,
                key: Optional[str] = None, headers: Optional[Dict[str, str]] = None,
                raw: Optional[bytes] = None) -> Response:
        hdrs = self.auth_headers(key)
        hdrs.update(headers or {})
        return self.http.request(self.edge_ports[edge], method, path, body, hdrs, raw)

    def chat(self, edge: int = 0, **kwargs: Any) -> Response:
        return self.request("POST", "/v1/chat/completions", chat(**kwargs), edge=edge)

    def raw_stream(self, body: Dict[str, Any], edge: int = 0,
                   timeout: float = 10.0) -> socket.socket:
        """Send a POST over a raw socket and return the socket (for SSE)."""
        payload = json.dumps(body).encode()
        sock = socket.create_connection(("127.0.0.1", self.edge_ports[edge]), timeout=timeout)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: aigw\r\n"
                     b"Authorization: Bearer " + self.key.encode() + b"\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        return sock



# --------------------------------------------------------------------------
# SSE over a raw socket


class ChunkedReader:
    """Reads an HTTP/1.1 response from a raw socket: status, headers, and the
    chunked body piece by piece, reporting whether it ended cleanly."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.status = 0
        self.headers: Dict[str, str] = {}
        self.body = b""
        self.complete = False  # the terminating zero-length chunk arrived
        self.eof = False

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_head(self) -> None:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise AssertionError(f"connection closed before the headers: {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def read_chunk(self) -> Optional[bytes]:
        """Next chunk's data; None at the end (clean or not, see complete)."""
        while b"\r\n" not in self.buf:
            if not self._fill():
                return None
        size_line, rest = self.buf.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        while len(rest) < size + 2:
            if not self._fill():
                return None
            size_line, rest = self.buf.split(b"\r\n", 1)
        data, self.buf = rest[:size], rest[size + 2:]
        if size == 0:
            self.complete = True
            return None
        self.body += data
        return data

    def read_all(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while self.read_chunk() is not None:
                pass
        else:
            length = int(self.headers.get("content-length", "0"))
            while len(self.buf) < length and self._fill():
                pass
            self.body, self.complete = self.buf[:length], len(self.buf) >= length
            self.buf = self.buf[length:]
        return self.body


def sse_events(text: str) -> List[Tuple[Optional[str], str]]:
    """Parse SSE text into (event name, data) pairs; comments are skipped."""
    events: List[Tuple[Optional[str], str]] = []
    name: Optional[str] = None
    data: List[str] = []
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if line == "":
            if data or name:
                events.append((name, "\n".join(data)))
            name, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[6:] if line[5:6] == " " else line[5:])
    if data or name:
        events.append((name, "\n".join(data)))
    return events
