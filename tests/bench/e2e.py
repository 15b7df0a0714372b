#!/usr/bin/env python3
"""End-to-end gateway benchmark (issue 6): aigw against a direct call and a
plain nginx reverse proxy, measured side by side in the same run.

    tests/bench/e2e.py                  full mode (a few minutes)
    BENCH_SHORT=1 tests/bench/e2e.py    short mode (about 45 s)
    tests/bench/e2e.py --profile edge   callgrind of one aigw stage under load
                                        (--profile gateway: the co-located one)
    tests/bench/e2e.py --no-write       do not touch docs/PERFORMANCE.md

It starts, each under its own prefix in a temporary directory and on free
127.0.0.1 ports:

- **mock**: nginx (Debian) answering a fixed OpenAI chat.completion from
  memory (``return 200``) and, when the request says
  ``Accept: text/event-stream`` (the bridge does for streams), a fixed SSE
  body of BENCH_CHUNKS chat.completion.chunk events + a usage chunk +
  ``[DONE]`` from a static file;
- **nginx**: a plain nginx reverse proxy in front of the mock (keep-alive
  upstream, HTTP/1.1, proxy_buffering off for streams) — the one-hop floor;
- **aigw**: broker, edge, auth (key from GATEWAY_API_KEYS), router
  (TARGET_API_URL = the mock), bridge, plus ratelimit and billing when their
  binaries are in the build folder (AIGW_SLIP follows), LOG_LEVEL=warn;
- **aigw-1p**: the same stages co-located as actors of one aigw-gateway
  process over inproc (DESIGN.md §8, docs/OPERATIONS.md);

then loads direct / nginx / aigw / aigw-1p in interleaved rounds, non-streaming
and streaming: at concurrency 16 and 64 with wrk (tests/bench/chat.lua: POST
of a ~1 KB chat body with Content-Type and Authorization), at concurrency 1
with probe(), a closed-loop client of its own on one keep-alive connection
sending the same bytes (wrk's per-request latencies at concurrency 1 sum to
more than the run on these VMs, docs/PERFORMANCE.md), and reads the CPU
time (utime+stime from /proc/<pid>/stat) of the serving processes before
and after every run. It prints one table with ratios to direct and to nginx
and writes it into docs/PERFORMANCE.md between the e2e-bench markers, with
the machine, the command and the DESIGN.md §8 / issue 6 target lines.

Environment: AIGW_BUILD (build folder, default build), BENCH_SHORT=1,
BENCH_E2E_SECONDS (per run), BENCH_E2E_ROUNDS, BENCH_CHUNKS (default 20),
BENCH_BUS=tcp|ipc (bus transport, default tcp as `make run`).
Standard library only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import http.client
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LUA = HERE / "chat.lua"
DOC = ROOT / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- e2e-bench:begin -->", "<!-- e2e-bench:end -->"

KEY = "sk-aigw-bench-0123456789abcdef0123"
UPSTREAM_KEY = "sk-upstream-bench-0123456789"
MODEL = "gpt-4o-mini"
PRICES = {MODEL: {"input": "0.15", "output": "0.6"}}  # USD per 1M tokens
CLK_TCK = os.sysconf("SC_CLK_TCK")
# aigw-rp (co-located, Redis and PostgreSQL) joins when make bench runs the
# e2e section inside tests/harness/services.sh (AIGW_TEST_PG_URL and
# AIGW_TEST_REDIS_URL set).
TARGETS = ["direct", "nginx", "aigw", "aigw-1p"]
AIGWS = ["aigw", "aigw-1p"]
LAYOUT = {"aigw": "separate processes, SQLite, in-process counters",
          "aigw-1p": "one process, SQLite, in-process counters",
          "aigw-rp": "one process, Redis and PostgreSQL"}
CONCURRENCY = (1, 16, 64)
MODES = ("chat", "stream")

# Issue 6 / DESIGN.md §8 targets
T_RPS_VS_NGINX = 0.25
T_ADDED_P50_US = 1000
T_ADDED_P99_US = 5000
T_CPU_US = 250
T_CPU_FINAL_US = 100
T_CHUNK_US = 200


def log(*args) -> None:
    print("[e2e]", *args, flush=True)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def build_dir() -> Path:
    b = Path(os.environ.get("AIGW_BUILD", "build"))
    return b if b.is_absolute() else ROOT / b


# --------------------------------------------------------------------------
# Bodies: the request the client sends, the answers the mock provider gives


def request_body(stream: bool) -> bytes:
    system = ("You are a concise, helpful assistant for a software company. Answer in plain "
              "English, cite the relevant documentation section when you can, and never invent "
              "API names. If a question is ambiguous, ask one clarifying question first.")
    user = ("Our service calls the chat completions API from a batch job that summarises "
            "support tickets. Each ticket is two to five paragraphs long and we send about "
            "forty thousand tickets a day. Recently some requests started to fail with HTTP "
            "429 and the job retried them immediately, which made things worse. How should we "
            "structure retries, what back-off would you recommend, and is there a way to send "
            "several tickets in one request without losing track of which summary belongs to "
            "which ticket? Please keep the answer short and give a small example in Python.")
    body = {"model": MODEL,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": user}],
            "temperature": 0.7, "max_tokens": 256, "top_p": 1, "user": "bench-client-42"}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


CONTENT = ("To avoid retry storms, retry only on 429 and 5xx, honour Retry-After, and use "
           "exponential back-off with full jitter: sleep random(0, min(cap, base * 2 ** n)). "
           "Batch tickets by numbering them in one prompt and asking for JSON keyed by number.")


def completion_json() -> str:
    body = {"id": "chatcmpl-bench0123456789abcdefABCDEF", "object": "chat.completion",
            "created": 1700000000, "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": CONTENT,
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 231, "completion_tokens": 62, "total_tokens": 293,
                      "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}},
            "service_tier": "default", "system_fingerprint": "fp_bench01"}
    text = json.dumps(body, separators=(",", ":"))
    assert "'" not in text and "$" not in text and "\\" not in text  # nginx string literal
    return text


def sse_body(chunks: int) -> bytes:
    words = CONTENT.split(" ")
    per = max(1, len(words) // chunks)
    events = []
    base = {"id": "chatcmpl-bench0123456789abcdefABCDEF", "object": "chat.completion.chunk",
            "created": 1700000000, "model": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_bench01"}
    for i in range(chunks):
        piece = " ".join(words[i * per:(i + 1) * per] if i < chunks - 1 else words[i * per:])
        delta = {"content": piece + " "}
        if i == 0:
            delta = {"role": "assistant", "content": piece + " ", "refusal": None}
        ev = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": "stop" if i == chunks - 1 else None}],
                  usage=None)
        events.append(ev)
    events.append(dict(base, choices=[], usage={"prompt_tokens": 231,
                                                "completion_tokens": chunks,
                                                "total_tokens": 231 + chunks}))
    out = "".join("data: " + json.dumps(e, separators=(",", ":")) + "\n\n" for e in events)
    return (out + "data: [DONE]\n\n").encode()


# --------------------------------------------------------------------------
# Processes


class Procs:
    """Every process this script starts, killed by pid at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: List[Tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: List[str], env: Optional[Dict[str, str]] = None
              ) -> subprocess.Popen:
        logf = self.tmp / f"{name}.log"
        full = dict(os.environ)
        full.update(env or {})
        p = subprocess.Popen(argv, env=full, stdin=subprocess.DEVNULL,
                             stdout=open(logf, "wb"), stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append((name, p, logf))
        return p

    def alive(self, name: str) -> bool:
        return any(n == name and p.poll() is None for n, p, _ in self.procs)

    def dead(self) -> List[str]:
        return [f"{n} (exit {p.poll()})" for n, p, _ in self.procs if p.poll() is not None]

    def output(self, name: str) -> str:
        for n, _, logf in self.procs:
            if n == name:
                return logf.read_text(errors="replace")
        return ""

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        for n, p, _ in self.procs:
            if n == name and p.poll() is None:
                p.send_signal(sig)
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def stop_all(self) -> None:
        for _, p, _ in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 5
        for _, p, _ in reversed(self.procs):
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of the process (reaped threads included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return 0
    rest = s[s.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])


def children_of(pid: int) -> List[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        if int(s[s.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(d))
    return out


def wait_http(port: int, path: str, timeout: float, procs: Procs, names: List[str],
              method: str = "GET") -> None:
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        for n in names:
            if not procs.alive(n):
                raise RuntimeError(f"{n} exited at start:\n{procs.output(n)[-3000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request(method, path)
            r = c.getresponse()
            r.read()
            c.close()
            if r.status == 200:
                return
            last = f"status {r.status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"127.0.0.1:{port}{path} not ready after {timeout}s ({last})")


# --------------------------------------------------------------------------
# nginx: the mock provider and the reverse proxy


NGINX_COMMON = """worker_processes 1;
daemon off;
{user}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_buffer_size 64k;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{body}
}}
"""

MOCK_SERVER = """    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /v1/chat/completions {{
            if ($http_accept ~ event-stream) {{ rewrite ^ /_sse last; }}
            default_type application/json;
            return 200 '{json}';
        }}
        # POST to a static file is 405 in nginx; answer it as a GET instead.
        location = /_sse {{
            internal;
            default_type text/event-stream;
            error_page 405 =200 $uri;
            alias {d}/stream.sse;
        }}
        location = /v1/models {{
            default_type application/json;
            return 200 '{{"object":"list","data":[{{"id":"{model}","object":"model","created":1700000000,"owned_by":"bench"}}]}}';
        }}
    }}"""

PROXY_SERVER = """    upstream mock {{
        server 127.0.0.1:{upstream};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /v1/chat/completions {{
            if ($http_accept ~ event-stream) {{ rewrite ^ /_stream last; }}
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location = /_stream {{
            internal;
            proxy_pass http://mock/v1/chat/completions;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}"""


def start_nginx(procs: Procs, name: str, tmp: Path, server: str) -> subprocess.Popen:
    d = tmp / name
    d.mkdir()
    user = "user root;" if os.geteuid() == 0 else ""
    conf = d / "nginx.conf"
    conf.write_text(NGINX_COMMON.format(user=user, d=d, body=server))
    return procs.start(name, ["nginx", "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")])


# --------------------------------------------------------------------------
# aigw


class Aigw:
    """The whole pipeline: separate processes, or (colocated) the broker and
    every C stage as actors of one aigw-gateway process."""

    def __init__(self, procs: Procs, tmp: Path, mock_port: int,
                 profile: Optional[str] = None, colocated: bool = False,
                 pg_url: str = "", redis_url: str = "") -> None:
        self.procs = procs
        self.colocated = colocated
        self.pg_url, self.redis_url = pg_url, redis_url
        self.name = "aigw-rp" if pg_url else "aigw-1p" if colocated else "aigw"
        self.prefix = {"aigw": "aigw-", "aigw-1p": "aigw1p-", "aigw-rp": "aigwrp-"}[self.name]
        tmp = tmp / {"aigw": "processes", "aigw-1p": "one-process", "aigw-rp": "redis-pg"}[self.name]
        tmp.mkdir(exist_ok=True)
        self.b = build_dir()
        have = lambda s: os.access(self.b / f"aigw-{s}", os.X_OK)  # noqa: E731
        need = [s for s in ("broker", "edge", "auth", "router", "bridge") if not have(s)]
        if colocated and not have("gateway"):
            need.append("gateway")
        if need:
            raise RuntimeError(f"missing binaries in {self.b}: {', '.join(need)} "
                               f"(build them: make BUILD={self.b.name})")
        self.stages = ["bridge", "router"]
        self.optional = {s: have(s) for s in ("ratelimit", "billing")}
        slip = ["auth"]
        if self.optional["ratelimit"]:
            self.stages.append("ratelimit")
            slip.append("ratelimit")
        slip.append("router")
        self.stages.append("auth")
        if self.optional["billing"]:
            self.stages.append("billing")
        self.stages.append("edge")
        self.slip = ",".join(slip)
        transport = os.environ.get("BENCH_BUS", "tcp")
        if transport == "ipc":
            self.bus, self.tap = f"ipc://{tmp}/bus.ipc", f"ipc://{tmp}/tap.ipc"
        else:
            self.bus = f"tcp://127.0.0.1:{free_port()}"
            self.tap = f"tcp://127.0.0.1:{free_port()}"
        self.transport = transport
        self.port = free_port()
        self.tmp = tmp
        self.profile = profile
        self.env = {"AIGW_BUS": self.bus, "LOG_LEVEL": "warn", "LOG_FORMAT": "text",
                    "GATEWAY_API_KEYS": KEY, "AIGW_KEYS_FILE": "", "AIGW_AUTH_OPEN": "",
                    "AIGW_CHANNELS_FILE": "", "AIGW_TARGET_MODELS": "",
                    "TARGET_API_URL": f"http://127.0.0.1:{mock_port}",
                    "TARGET_API_KEY": UPSTREAM_KEY, "AIGW_SLIP": self.slip,
                    "AIGW_READY_SERVICES": "", "PORT": str(self.port),
                    "AIGW_LISTEN": "127.0.0.1",
                    # each keep-alive connection holds one civetweb thread; wrk
                    # -c64 plus the readiness probe must fit with room to spare
                    "AIGW_EDGE_THREADS": os.environ.get("BENCH_EDGE_THREADS", "128"),
                    # billing/ratelimit stores stay inside the temp dir
                    "AIGW_VAR": str(tmp / "var"), "DATABASE_URL": str(tmp / "var" / "aigw.db"),
                    "REDIS_URL": "",
                    # The money path does its real work: every request is
                    # counted against a per-key rate limit (set far above the
                    # load, so nothing is refused), held and billed at a price.
                    "RATE_LIMIT_REQUESTS_PER_MINUTE": "1000000000",
                    "RATE_LIMIT_BURST": "1000000000",
                    "AIGW_PRICES_FILE": str(tmp / "prices.json")}
        if pg_url:
            self.env.update({"DATABASE_URL": pg_url, "REDIS_URL": redis_url})
        (tmp / "var").mkdir(exist_ok=True)
        (tmp / "prices.json").write_text(json.dumps(PRICES))

    def argv(self, stage: str) -> List[str]:
        argv = [str(self.b / f"aigw-{stage}")]
        if stage == "broker":
            argv += ["--bus", self.bus, "--tap", self.tap]
        if self.profile == stage:
            out = self.tmp / f"callgrind.out.{stage}"
            argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    f"--callgrind-out-file={out}"] + argv
        return argv

    def start(self) -> "Aigw":
        if self.colocated:
            env = dict(self.env, AIGW_TAP=self.tap,
                       AIGW_STAGES=",".join(s for s in self.stages))
            argv = [str(self.b / "aigw-gateway")]
            if self.profile == "gateway":
                argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                        f"--callgrind-out-file={self.tmp}/callgrind.out.gateway"] + argv
            self.procs.start(f"{self.prefix}gateway", argv, env)
            wait_http(self.port, "/health/ready", 60 if self.profile else 15, self.procs,
                      [f"{self.prefix}gateway"])
            return self
        self.procs.start("aigw-broker", self.argv("broker"), self.env)
        time.sleep(0.2)
        for s in self.stages:
            self.procs.start(f"aigw-{s}", self.argv(s), self.env)
        names = ["aigw-broker"] + [f"aigw-{s}" for s in self.stages]
        wait_http(self.port, "/health/ready", 60 if self.profile else 15, self.procs, names)
        return self

    def pg_version(self) -> str:
        try:
            out = subprocess.run(["psql", self.pg_url, "-Atc", "SHOW server_version"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
            return out.split()[0] if out else "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    def pids(self) -> Dict[str, int]:
        return {n: p.pid for n, p, _ in self.procs.procs if n.startswith(self.prefix)}

    def describe(self) -> str:
        parts = ["broker", "edge"] + [s for s in ("auth", "ratelimit", "router", "bridge",
                                                  "billing") if s in self.stages]
        missing = [s for s, ok in self.optional.items() if not ok]
        if self.pg_url:
            return (f"aigw-rp: as aigw-1p (but ratelimit in a thread of its own, the "
                    f"default with Redis: AIGW_FUSE), with the rate-limit counters and holds in Redis "
                    f"(REDIS_URL) and the store (keys, prices, the ledger) in PostgreSQL "
                    f"(DATABASE_URL), both local servers on loopback started for the bench, "
                    f"PostgreSQL {self.pg_version()} with its durable defaults (fsync on)")
        if self.colocated:
            return (f"aigw-1p: the same stages ({', '.join(parts)}) and configuration as actors of one "
                    f"aigw-gateway process over inproc (co-location, docs/OPERATIONS.md), "
                    f"AIGW_SLIP={self.slip}, LOG_LEVEL=warn, "
                    f"AIGW_EDGE_THREADS={self.env['AIGW_EDGE_THREADS']}")
        text = (f"aigw: {', '.join(parts)} as separate processes, one each, bus on loopback "
                f"{self.transport}, AIGW_SLIP={self.slip}, LOG_LEVEL=warn, "
                f"AIGW_EDGE_THREADS={self.env['AIGW_EDGE_THREADS']}; a per-key rate limit "
                f"(RATE_LIMIT_REQUESTS_PER_MINUTE far above the load) and a price for "
                f"{MODEL}, so every request is counted, held, settled and billed into "
                f"SQLite")
        if missing:
            text += f" ({', '.join(missing)} not built yet: not included)"
        return text


# --------------------------------------------------------------------------
# Load


def wrk(port: int, stream: bool, conc: int, seconds: int, body: Path) -> Dict[str, float]:
    threads = 1 if conc == 1 else 2
    env = dict(os.environ, BENCH_BODY=str(body), BENCH_KEY=KEY, BENCH_STREAM="1" if stream else "0")
    r = subprocess.run(["wrk", "-t", str(threads), "-c", str(conc), "-d", f"{seconds}s",
                        "--timeout", "10s", "--latency", "-s", str(LUA),
                        f"http://127.0.0.1:{port}/v1/chat/completions"],
                       env=env, capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"^BENCH (\{.*\})$", r.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stdout}\n{r.stderr}")
    res = json.loads(m.group(1))
    res["errors"] = sum(res[k] for k in ("connect", "read", "write", "status", "timeout"))
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    return res


def probe_request(port: int, stream: bool, body: bytes) -> bytes:
    """The request wrk sends with tests/bench/chat.lua, byte for byte but for
    the order of the headers (wrk's follows a Lua table's hash order)."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\n"
            f"Accept: {'text/event-stream' if stream else 'application/json'}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.I)
_CLOSE = re.compile(rb"\r\nconnection:[^\r\n]*close", re.I)


class ProbeError(Exception):
    """A response the probe cannot take (closed early, no framing, extra
    bytes): counted as a read error and the connection opened again."""


def probe(port: int, stream: bool, seconds: float, body: Path) -> Dict[str, float]:
    """The concurrency-1 latency probe: a closed loop on one keep-alive
    HTTP/1.1 connection (TCP_NODELAY) for `seconds`, sending the bytes wrk
    sends. A request's latency runs from just before sendall to the last byte
    of its response (Content-Length, or chunked framing up to the last
    chunk), so the latencies of one run cannot add up to more than the run.
    wrk's do on these VMs (docs/PERFORMANCE.md), which is why this exists.
    Same result keys as wrk()."""
    req = probe_request(port, stream, body.read_bytes())
    buf = bytearray(1 << 16)
    mv = memoryview(buf)
    lat: List[int] = []
    err = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    clock = time.perf_counter_ns
    find = buf.find
    sock: Optional[socket.socket] = None
    recv_into = None
    end = 0  # bytes of the current response in buf

    def more() -> None:
        nonlocal end, buf, mv, find
        if end == len(buf):  # a larger answer than ever: grow
            buf = buf + bytearray(len(buf))
            mv, find = memoryview(buf), buf.find
        n = recv_into(mv[end:])
        if not n:
            raise ProbeError("read")
        end += n

    gc_was = gc.isenabled()
    gc.disable()  # no collector pauses inside a measured request
    start = clock()
    deadline = start + int(seconds * 1e9)
    try:
        while clock() < deadline:
            if sock is None:
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                except OSError:
                    err["connect"] += 1
                    time.sleep(0.01)
                    continue
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            recv_into = sock.recv_into
            end = 0
            t0 = clock()
            try:
                sock.sendall(req)
            except OSError:
                err["write"] += 1
                sock.close()
                sock = None
                continue
            try:
                he = -1
                while he < 0:
                    more()
                    he = find(b"\r\n\r\n", 0, end)
                he += 4
                head = bytes(mv[:he])
                ok = head[9:12] == b"200"
                if _CHUNKED.search(head):
                    pos = he
                    while True:
                        eol = find(b"\r\n", pos, end)
                        while eol < 0:
                            more()
                            eol = find(b"\r\n", pos, end)
                        size = int(bytes(mv[pos:eol]).split(b";")[0], 16)
                        if size == 0:  # the last chunk, then trailers and CRLF
                            done = find(b"\r\n\r\n", eol, end)
                            while done < 0:
                                more()
                                done = find(b"\r\n\r\n", eol, end)
                            pos = done + 4
                            break
                        pos = eol + 2 + size + 2
                        while end < pos:
                            more()
                else:
                    m = _CONTENT_LENGTH.search(head)
                    if not m:
                        raise ProbeError("read")  # neither framing: not what we test
                    pos = he + int(m.group(1))
                    while end < pos:
                        more()
                t1 = clock()
                if end != pos:
                    raise ProbeError("read")  # bytes after the response: unasked
            except socket.timeout:
                err["timeout"] += 1
                sock.close()
                sock = None
                continue
            except (OSError, ValueError, ProbeError):
                err["read"] += 1
                sock.close()
                sock = None
                continue
            lat.append(t1 - t0)
            if not ok:
                err["status"] += 1
            if _CLOSE.search(head):
                sock.close()
                sock = None
        stop = clock()
    finally:
        if sock is not None:
            sock.close()
        if gc_was:
            gc.enable()
    duration = stop - start
    total = sum(lat)
    # The point of the probe: one request at a time, each timed inside the
    # run, so the latencies cannot sum to more than the run took.
    if total > duration:
        raise RuntimeError(f"probe latencies sum to {total} ns > the run's {duration} ns")
    lat.sort()
    n = len(lat)

    def pct(p: int) -> int:
        return round(lat[max(0, -(-n * p // 100) - 1)] / 1000) if n else 0
    res: Dict[str, float] = {"requests": n, "duration_us": duration // 1000,
                             "p50": pct(50), "p90": pct(90), "p99": pct(99),
                             "max": round(lat[-1] / 1000) if n else 0,
                             "mean": total / 1000 / max(1, n), "busy": total / duration,
                             **err}
    res["errors"] = sum(err.values())
    res["rps"] = n / (duration / 1e9)
    return res


def backing_pids() -> Dict[str, int]:
    """Redis and PostgreSQL (master and its backends) of the aigw-rp layout,
    started by tests/harness/services.sh; empty when they are not there."""
    pids: Dict[str, int] = {}
    try:
        pids["redis"] = int(Path(os.environ["REDISTEST_DIR"], "redis.pid").read_text().split()[0])
        pg = Path(os.environ["PGTEST_DIR"])
        master = int((pg / "data" / "postmaster.pid").read_text().split()[0])
        pids["postgres"] = master
        pids.update({f"postgres-{c}": c for c in children_of(master)})
    except (KeyError, OSError, ValueError, IndexError):
        return {}
    return pids


def settle(pids: Dict[str, int], limit: float = 5.0) -> None:
    """Wait until the processes have used no CPU for 200 ms (at most limit
    seconds): a run must not start while an earlier one's backlog (streams
    cut off by wrk's stop, billing's batches), on any target sharing the
    cores, is still being worked off."""
    end = time.time() + limit
    last = cpu_sample(pids)
    while time.time() < end:
        time.sleep(0.2)
        now = cpu_sample(pids)
        if sum(now.values()) - sum(last.values()) == 0:
            return
        last = now


def check_target(port: int, stream: bool, body: bytes, expect_chunks: int) -> str:
    """One request by hand: "" when the answer is what a client expects."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("POST", "/v1/chat/completions", body=body,
                  headers={"Content-Type": "application/json",
                           "Authorization": f"Bearer {KEY}",
                           "Accept": "text/event-stream" if stream else "application/json"})
        r = c.getresponse()
        data = r.read()
        c.close()
    except OSError as exc:
        return f"request failed: {exc}"
    if r.status != 200:
        return f"status {r.status}: {data[:300]!r}"
    if not stream:
        try:
            obj = json.loads(data)
        except ValueError:
            return f"not JSON: {data[:200]!r}"
        return "" if obj.get("object") == "chat.completion" else f"unexpected: {data[:200]!r}"
    events = [ln[6:] for ln in data.decode(errors="replace").split("\n") if ln.startswith("data: ")]
    chunks = sum(1 for e in events if '"chat.completion.chunk"' in e)
    if not events or events[-1] != "[DONE]" or chunks != expect_chunks:
        return (f"stream: {chunks} chunk events (expected {expect_chunks}), last "
                f"{events[-1][:80] if events else None!r}")
    return ""


def cpu_sample(pids: Dict[str, int]) -> Dict[str, int]:
    return {n: proc_cpu_ticks(p) for n, p in pids.items()}


def us_per_req(before: Dict[str, int], after: Dict[str, int], requests: int) -> float:
    ticks = sum(after[n] - before[n] for n in after)
    return ticks * 1e6 / CLK_TCK / max(1, requests)


# --------------------------------------------------------------------------
# Report


def machine() -> Dict[str, str]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    osr = {}
    with open("/etc/os-release") as f:
        for line in f:
            k, _, v = line.strip().partition("=")
            osr[k] = v.strip('"')

    def cmd(argv: List[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True)
            return (r.stdout + r.stderr).strip()
        except OSError:
            return "?"
    nginx = cmd(["nginx", "-v"]).split("/")[-1]
    wrkv = cmd(["wrk", "-v"]).split()[1] if cmd(["wrk", "-v"]) else "?"
    deb = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    return {"nproc": str(os.cpu_count()), "cpu": cpu,
            "load": Path("/proc/loadavg").read_text().split()[0], "kernel": platform.release(),
            "os": f"{osr.get('PRETTY_NAME', '?')} ({deb})",
            "libzmq": cmd(["pkg-config", "--modversion", "libzmq"]),
            "nginx": nginx, "wrk": wrkv}


def fmt_ratio(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.2f}×"


def verdict(ok: bool, text: str) -> str:
    return f"**{'met' if ok else 'missed'}** — {text}"


def build_report(res: Dict, cpu_by_proc: Dict, meta: Dict) -> Tuple[str, str]:
    """(markdown section, plain summary for the terminal)."""
    def agg(mode: str, c: int, t: str) -> Dict[str, float]:
        runs = res[(mode, c, t)]
        reqs = sum(r["requests"] for r in runs)
        return {"rps": statistics.median(r["rps"] for r in runs),
                "p50": statistics.median(r["p50"] for r in runs),
                "p99": statistics.median(r["p99"] for r in runs),
                "cpu": sum(r["cpu_us"] * r["requests"] for r in runs) / max(1, reqs),
                "mock_cpu": sum(r["mock_cpu_us"] * r["requests"] for r in runs) / max(1, reqs),
                "backing_cpu": sum(r.get("backing_cpu_us", 0) * r["requests"]
                                   for r in runs) / max(1, reqs),
                "errors": sum(r["errors"] for r in runs), "requests": reqs}

    A = {(m, c, t): agg(m, c, t) for m in MODES for c in CONCURRENCY for t in TARGETS}
    lines = ["| mode | conc. | target | req/s | p50 µs | p99 µs | CPU µs/req | "
             "req/s ÷ direct | req/s ÷ nginx | p50 − direct µs | p99 − direct µs | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in MODES:
        for c in CONCURRENCY:
            d, n = A[(m, c, "direct")], A[(m, c, "nginx")]
            for t in TARGETS:
                a = A[(m, c, t)]
                rd = a["rps"] / d["rps"] if d["rps"] else None
                rn = a["rps"] / n["rps"] if n["rps"] else None
                dp50 = "—" if t == "direct" else f"{a['p50'] - d['p50']:+.0f}"
                dp99 = "—" if t == "direct" else f"{a['p99'] - d['p99']:+.0f}"
                cpu = f"{a['cpu']:.0f}" if t != "direct" else f"({a['cpu']:.0f})"
                lines.append(f"| {m} | {c} | {t} | {a['rps']:,.0f} | {a['p50']:.0f} | "
                             f"{a['p99']:.0f} | {cpu} | {fmt_ratio(rd)} | {fmt_ratio(rn)} | "
                             f"{dp50} | {dp99} | {a['errors']} |")
    table = "\n".join(lines)

    # Target lines, for each aigw layout
    def target_lines(t: str) -> List[str]:
        c64a, c64n = A[("chat", 64, t)], A[("chat", 64, "nginx")]
        ratio = c64a["rps"] / c64n["rps"]
        c1a, c1d, c1n = A[("chat", 1, t)], A[("chat", 1, "direct")], A[("chat", 1, "nginx")]
        added50 = c1a["p50"] - c1d["p50"]
        # p99 against direct's p50, not its p99: direct's own tail swings by
        # tens of ms on a shared VM and would make the difference meaningless
        # (even negative); this way the figure can only overstate the cost.
        added99 = c1a["p99"] - c1d["p50"]
        ngx50 = c1n["p50"] - c1d["p50"]
        cpu = c64a["cpu"]
        s1a, s1d = A[("stream", 1, t)], A[("stream", 1, "direct")]
        nchunks = meta["chunks"] + 1  # content chunks + the usage chunk
        per_chunk = (s1a["p50"] - s1d["p50"]) / nchunks
        marginal = ((s1a["p50"] - s1d["p50"]) - added50) / nchunks
        return [
            f"- Throughput, non-streaming, concurrency 64: {t} "
            f"{c64a['rps']:,.0f} req/s = {ratio:.3f}× nginx ({c64n['rps']:,.0f}); target ≥ 0.25× — "
            + verdict(ratio >= T_RPS_VS_NGINX,
                      f"{ratio / T_RPS_VS_NGINX:.2f}× the target" if ratio >= T_RPS_VS_NGINX else
                      f"needs {T_RPS_VS_NGINX / ratio:.2f}× more throughput "
                      f"({T_RPS_VS_NGINX * c64n['rps']:,.0f} req/s)"),
            f"- Added latency p50, concurrency 1: {t} {added50:+.0f} µs over direct (nginx "
            f"{ngx50:+.0f} µs); target < {T_ADDED_P50_US} µs — "
            + verdict(added50 < T_ADDED_P50_US,
                      f"{T_ADDED_P50_US - added50:.0f} µs to spare" if added50 < T_ADDED_P50_US
                      else f"{added50 - T_ADDED_P50_US:.0f} µs over "
                      f"({added50 / T_ADDED_P50_US:.2f}×)"),
            f"- Added latency p99, concurrency 1 (DESIGN §8; {t} p99 − direct p50): "
            f"{added99:+.0f} µs; target < "
            f"{T_ADDED_P99_US} µs — "
            + verdict(added99 < T_ADDED_P99_US,
                      f"{T_ADDED_P99_US - added99:.0f} µs to spare" if added99 < T_ADDED_P99_US
                      else f"{added99 - T_ADDED_P99_US:.0f} µs over"),
            f"- CPU per request, {t}, non-streaming at concurrency 64: {cpu:.0f} µs "
            f"(nginx proxy {c64n['cpu']:.0f} µs); target < {T_CPU_US} µs — "
            + verdict(cpu < T_CPU_US,
                      f"{T_CPU_US - cpu:.0f} µs to spare" if cpu < T_CPU_US
                      else f"{cpu - T_CPU_US:.0f} µs over ({cpu / T_CPU_US:.2f}×)")
            + f"; final target < {T_CPU_FINAL_US} µs: "
            + ("met" if cpu < T_CPU_FINAL_US else f"missed ({cpu / T_CPU_FINAL_US:.1f}×)"),
            f"- Per streamed chunk, concurrency 1: ({t} − direct stream p50) / {nchunks} chunks "
            f"= {per_chunk:.0f} µs; target < {T_CHUNK_US} µs — "
            + verdict(per_chunk < T_CHUNK_US,
                      f"{T_CHUNK_US - per_chunk:.0f} µs to spare" if per_chunk < T_CHUNK_US
                      else f"{per_chunk - T_CHUNK_US:.0f} µs over ({per_chunk / T_CHUNK_US:.2f}×)")
            + f". Beyond the per-request overhead (minus the non-streaming added p50): "
            f"{marginal:.0f} µs per chunk.",
        ]
    targets = []
    for t in AIGWS:
        targets.append(f"**{t}** ({LAYOUT[t]}):")
        targets += target_lines(t)

    # Per-process CPU, non-streaming and streaming at c64
    procs = sorted({n for k in cpu_by_proc for n in cpu_by_proc[k]})
    bl = ["| aigw process | " + " | ".join(f"{m} c64 µs/req" for m in MODES) + " |",
          "|---|" + "---|" * len(MODES)]
    for n in procs:
        bl.append(f"| {n} | " + " | ".join(
            f"{cpu_by_proc[(m, 64)].get(n, 0) / max(1, A[(m, 64, 'aigw')]['requests']):.0f}"
            for m in MODES) + " |")
    bl.append("| **all** | " + " | ".join(f"**{A[(m, 64, 'aigw')]['cpu']:.0f}**"
                                          for m in MODES) + " |")
    for t in AIGWS[1:]:
        bl.append(f"| aigw-gateway ({t}, {LAYOUT[t]}) | " + " | ".join(
            f"{A[(m, 64, t)]['cpu']:.0f}" for m in MODES) + " |")
    if "aigw-rp" in AIGWS:
        bl.append("| Redis + PostgreSQL serving aigw-rp (not in its figures above) | " + " | ".join(
            f"{A[(m, 64, 'aigw-rp')]['backing_cpu']:.0f}" for m in MODES) + " |")
    breakdown = "\n".join(bl)

    mc = meta["machine"]
    problems = meta["problems"]
    describe = "\n".join(f"- {d};" for d in meta["describe"])
    section = f"""Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {mc['nproc']} cores ({mc['cpu']}), Linux {mc['kernel']}, {mc['os']}, libzmq {mc['libzmq']}, nginx {mc['nginx']}, wrk {mc['wrk']}; 1-minute load average {mc['load']} at the start (anything above ~0 means other work shared the cores).
Command: `{meta['command']}` ({meta['mode']}: {meta['rounds']} interleaved round(s) of {meta['seconds']} s per run; concurrency 1: the probe in tests/bench/e2e.py, concurrency 16 and 64: wrk -t2).

Setup, all on 127.0.0.1 and sharing the {mc['nproc']} cores with the client and the mock:
- mock provider: nginx, 1 worker, fixed chat.completion ({meta['resp_bytes']} bytes) from memory; streams: {meta['chunks']} chat.completion.chunk events + a usage chunk + `[DONE]` ({meta['sse_bytes']} bytes, one static file);
- nginx: reverse proxy, 1 worker, keep-alive upstream (HTTP/1.1), proxy_buffering off for streams;
{describe}
- client: at concurrency 16 and 64 wrk with tests/bench/chat.lua, at concurrency 1 the probe (same request bytes), POST of a {meta['req_bytes']}-byte chat body (streams: {meta['req_stream_bytes']} bytes, `stream_options.include_usage`), `Authorization: Bearer …`.

{table}

p50/p99 at concurrency 16 and 64 are wrk's per-request latencies (first byte written to last byte read; for streams the whole stream). Every figure of a concurrency-1 row (req/s, p50/p99, CPU, errors; so also the concurrency-1 target lines below) comes from the probe in e2e.py instead of wrk: one keep-alive HTTP/1.1 connection (TCP_NODELAY) sending wrk's request bytes in a closed loop for the same {meta['seconds']} s, each latency from just before the request is written to the last byte of the response read (Content-Length or the last chunk). wrk's latencies at concurrency 1 sum to more than its run on these VMs (docs/PERFORMANCE.md), so they cannot all be true; the probe's summed to {meta['probe_busy']} of each run here and are checked never to exceed it. Its own cost per request (Python) is in every latency and the same for every target, so the differences to direct cancel it. Medians over rounds. Each run starts once the previous one's work is done (every serving process of every target idle for 200 ms, at most 5 s). CPU µs/req is utime+stime of the serving processes (aigw: every aigw-* process; aigw-1p, aigw-rp: the aigw-gateway process, not Redis or PostgreSQL; nginx: master and worker; direct, in parentheses: the mock itself) over the requests the run completed, all rounds together; the mock's own CPU is not in the aigw or nginx figures. Errors are socket errors plus non-2xx answers (wrk's, or the probe's).

Targets (issue 6, DESIGN.md §8){meta['target_note']}:
{chr(10).join(targets)}

CPU per request by aigw process (same runs):

{breakdown}
"""
    if problems:
        section += "\nProblems seen in this run:\n" + "\n".join(f"- {p}" for p in problems) + "\n"
    summary = table + "\n\n" + "\n".join(targets) + "\n\n" + breakdown
    if problems:
        summary += "\n\nProblems:\n" + "\n".join(f"- {p}" for p in problems)
    return section, summary


def write_doc(section: str) -> None:
    text = DOC.read_text()
    if BEGIN not in text:
        raise RuntimeError(f"{DOC} has no {BEGIN} marker")
    new = BEGIN + "\n" + section.rstrip() + "\n" + END
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: new, text, flags=re.S)
    DOC.write_text(text)


# --------------------------------------------------------------------------
# Main


def setup(procs: Procs, tmp: Path, chunks: int, profile: Optional[str] = None):
    mock_port, proxy_port = free_port(), free_port()
    start_nginx(procs, "mock", tmp, MOCK_SERVER.format(port=mock_port, json=completion_json(),
                                                       d=tmp / "mock", model=MODEL))
    (tmp / "mock" / "stream.sse").write_bytes(sse_body(chunks))
    start_nginx(procs, "nginx", tmp, PROXY_SERVER.format(port=proxy_port, upstream=mock_port))
    wait_http(mock_port, "/v1/models", 10, procs, ["mock"])
    colocated = profile == "gateway"
    aigw = Aigw(procs, tmp, mock_port, profile, colocated=colocated).start()
    return mock_port, proxy_port, aigw


def bench(args) -> int:
    short = os.environ.get("BENCH_SHORT", "0") == "1"
    seconds = int(os.environ.get("BENCH_E2E_SECONDS", "2" if short else "5"))
    rounds = int(os.environ.get("BENCH_E2E_ROUNDS", "1" if short else "3"))
    chunks = int(os.environ.get("BENCH_CHUNKS", "20"))
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool):
            log(f"{tool} is not installed (apt-get install nginx-light wrk); e2e bench skipped")
            return 1
    tmp = Path(tempfile.mkdtemp(prefix="aigw-e2e-bench-"))
    procs = Procs(tmp)
    problems: List[str] = []
    load_at_start = Path("/proc/loadavg").read_text().split()[0]
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    try:
        mock_port, proxy_port, aigw = setup(procs, tmp, chunks)
        gateways = [aigw, Aigw(procs, tmp, mock_port, colocated=True).start()]
        pg_url = os.environ.get("AIGW_TEST_PG_URL", "")
        redis_url = os.environ.get("AIGW_TEST_REDIS_URL", "")
        if pg_url and redis_url:
            gateways.append(Aigw(procs, tmp, mock_port, colocated=True, pg_url=pg_url,
                                 redis_url=redis_url).start())
            if "aigw-rp" not in TARGETS:
                TARGETS.append("aigw-rp")
                AIGWS.append("aigw-rp")
        else:
            log("AIGW_TEST_PG_URL/AIGW_TEST_REDIS_URL not set (make bench sets them): "
                "aigw-rp, the Redis and PostgreSQL layout, is not measured")
        by_name = {g.name: g for g in gateways}
        ports = {"direct": mock_port, "nginx": proxy_port,
                 **{g.name: g.port for g in gateways}}
        for g in gateways:
            log(g.describe())
        bodies = {}
        for m in MODES:
            bodies[m] = tmp / f"body-{m}.json"
            bodies[m].write_bytes(request_body(m == "stream"))
        nginx_master = [p for n, p, _ in procs.procs if n == "nginx"][0].pid
        mock_master = [p for n, p, _ in procs.procs if n == "mock"][0].pid
        nginx_pids = {"nginx": nginx_master, **{f"nginx-w{i}": p for i, p in
                                                enumerate(children_of(nginx_master))}}
        mock_pids = {"mock": mock_master, **{f"mock-w{i}": p for i, p in
                                             enumerate(children_of(mock_master))}}
        if len(nginx_pids) < 2 or len(mock_pids) < 2:
            raise RuntimeError(f"nginx workers not found: {nginx_pids} {mock_pids}")
        for t in TARGETS:
            for m in MODES:
                err = check_target(ports[t], m == "stream", request_body(m == "stream"), chunks + 1)
                if err:
                    problems.append(f"{t} {m}: {err}")
                    log(f"check {t} {m}: {err}")
        # warm-up (not recorded)
        for m in MODES:
            for t in TARGETS:
                wrk(ports[t], m == "stream", 16, 1, bodies[m])
        res: Dict = {(m, c, t): [] for m in MODES for c in CONCURRENCY for t in TARGETS}
        cpu_by_proc: Dict = {(m, c): {} for m in MODES for c in CONCURRENCY}
        total = rounds * len(MODES) * len(CONCURRENCY) * len(TARGETS)
        done = 0
        for rnd in range(rounds):
            for m in MODES:
                for c in CONCURRENCY:
                    for t in TARGETS:
                        pids = {"direct": mock_pids, "nginx": nginx_pids}[t] \
                            if t in ("direct", "nginx") else by_name[t].pids()
                        every = {**mock_pids, **nginx_pids}
                        for g in gateways:
                            every.update(g.pids())
                        settle(every)
                        backing = backing_pids() if t == "aigw-rp" else {}
                        b0, m0 = cpu_sample(pids), cpu_sample(mock_pids)
                        k0 = cpu_sample(backing)
                        # concurrency 1: the probe instead of wrk (its
                        # latencies add up; see probe()); above: wrk
                        if c == 1:
                            r = probe(ports[t], m == "stream", seconds, bodies[m])
                        else:
                            r = wrk(ports[t], m == "stream", c, seconds, bodies[m])
                        b1, m1 = cpu_sample(pids), cpu_sample(mock_pids)
                        k1 = cpu_sample(backing)
                        r["cpu_us"] = us_per_req(b0, b1, r["requests"])
                        r["mock_cpu_us"] = us_per_req(m0, m1, r["requests"])
                        r["backing_cpu_us"] = us_per_req(k0, k1, r["requests"]) if backing else 0
                        if t == "aigw":
                            for n in b1:
                                cpu_by_proc[(m, c)][n] = cpu_by_proc[(m, c)].get(n, 0) + \
                                    (b1[n] - b0[n]) * 1e6 / CLK_TCK
                        res[(m, c, t)].append(r)
                        done += 1
                        log(f"[{done}/{total}] round {rnd + 1} {m:6} c{c:<3} {t:7} "
                            f"{r['rps']:9,.0f} req/s  p50 {r['p50']:6d} µs  p99 {r['p99']:6d} µs"
                            f"  cpu {r['cpu_us']:6.0f} µs/req  errors {r['errors']}"
                            + (f"  [probe: {r['requests']} req, p90 {r['p90']} max {r['max']} "
                               f"mean {r['mean']:.0f} µs, latencies = {r['busy']:.1%} of the run]"
                               if c == 1 else ""))
                        if r["errors"]:
                            problems.append(f"round {rnd + 1} {m} c{c} {t}: {r['errors']} errors "
                                            f"of {r['requests']} (connect {r['connect']}, read "
                                            f"{r['read']}, write {r['write']}, status "
                                            f"{r['status']}, timeout {r['timeout']})")
                        dead = procs.dead()
                        if dead:
                            raise RuntimeError(f"process(es) exited during the run: {dead}")
        for t in TARGETS:
            for m in MODES:
                err = check_target(ports[t], m == "stream", request_body(m == "stream"), chunks + 1)
                if err:
                    problems.append(f"after the load, {t} {m}: {err}")
        for n in [n for g in gateways for n in g.pids()]:
            out = [ln for ln in procs.output(n).splitlines() if ln.strip()]
            if out:
                problems.append(f"{n} logged {len(out)} line(s) at warn or above, e.g. "
                                f"`{out[0][:200]}`")
        cmd = ("BENCH_SHORT=1 make bench" if short else "make bench")
        extra = [f"{k}={os.environ[k]}" for k in ("BENCH_E2E_SECONDS", "BENCH_E2E_ROUNDS",
                                                   "BENCH_CHUNKS", "BENCH_BUS") if k in os.environ]
        if extra:
            cmd = " ".join(extra) + " " + cmd
        target_note = ""
        if not all(aigw.optional.values()):
            target_note = (" — provisional: the issue's target pipeline includes ratelimit and "
                           "billing, which were not in this run")
        busy = [r["busy"] for (_, c, _), runs in res.items() if c == 1 for r in runs]
        probe_busy = f"{min(busy):.1%}–{max(busy):.1%}" if busy else "—"
        meta = {"probe_busy": probe_busy, "machine": dict(machine(), load=load_at_start), "command": cmd, "mode": "short" if short else "full",
                "rounds": rounds, "seconds": seconds, "chunks": chunks,
                "resp_bytes": len(completion_json()), "sse_bytes": len(sse_body(chunks)),
                "req_bytes": len(request_body(False)), "req_stream_bytes": len(request_body(True)),
                "describe": [g.describe() for g in gateways], "problems": problems,
                "target_note": target_note}
        section, summary = build_report(res, cpu_by_proc, meta)
        print()
        print(summary)
        if not args.no_write:
            write_doc(section)
            log("results written to docs/PERFORMANCE.md")
        return 0
    finally:
        procs.stop_all()
        if os.environ.get("BENCH_KEEP_TMP") != "1":
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"logs kept in {tmp}")


def profile(args) -> int:
    """One aigw stage under callgrind while `--requests` chat requests pass."""
    tmp = Path(tempfile.mkdtemp(prefix="aigw-e2e-profile-"))
    procs = Procs(tmp)
    chunks = int(os.environ.get("BENCH_CHUNKS", "20"))
    try:
        _, _, aigw = setup(procs, tmp, chunks, profile=args.profile)
        body = tmp / "body.json"
        body.write_bytes(request_body(args.stream))
        # warm-up through the whole path, then the measured requests on
        # --concurrency keep-alive connections (wrk cannot stop at a count,
        # so this is a small client of its own)
        errors: List[int] = []

        def client(n: int) -> None:
            c = http.client.HTTPConnection("127.0.0.1", aigw.port, timeout=60)
            for _ in range(n):
                c.request("POST", "/v1/chat/completions", body=body.read_bytes(),
                          headers={"Content-Type": "application/json",
                                   "Authorization": f"Bearer {KEY}",
                                   "Accept": "text/event-stream" if args.stream
                                   else "application/json"})
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    errors.append(r.status)
            c.close()

        def load(total: int) -> float:
            per = max(1, total // args.concurrency)
            t0 = time.time()
            ts = [threading.Thread(target=client, args=(per,)) for _ in range(args.concurrency)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return time.time() - t0
        load(min(100, args.requests))  # warm-up: connections, caches, first-use paths
        # count only the measured requests: the stage runs uninstrumented
        # (--instr-atstart=no) through start-up and warm-up; switch it on now
        name = f"{aigw.prefix}{args.profile}"
        pid = [p for n, p, _ in procs.procs if n == name][0].pid
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], capture_output=True,
                       timeout=60)
        time.sleep(0.3)
        n = max(1, args.requests // args.concurrency) * args.concurrency
        errors.clear()
        took = load(args.requests)
        log(f"{n} {'streaming' if args.stream else 'non-streaming'} requests on "
            f"{args.concurrency} connections in {took:.1f} s under callgrind "
            f"({len(errors)} non-200)")
        procs.stop(name)
        parts = sorted(aigw.tmp.glob(f"callgrind.out.{args.profile}*"),
                       key=lambda p: p.stat().st_mtime)
        log(f"callgrind parts: {[p.name for p in parts]}; the last one is the measured load")
        out = parts[-1]
        r = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(out)],
                           capture_output=True, text=True)
        lines = r.stdout.splitlines()
        total = next((int(ln.split()[0].replace(",", "")) for ln in lines
                      if "PROGRAM TOTALS" in ln), 0)
        rows = [ln for ln in lines if re.match(r"^\s*[\d,]+ \(", ln) and "TOTALS" not in ln]
        print(f"aigw-{args.profile}: {total:,} instructions for {n} requests = "
              f"{total / n:,.0f} per request\n")
        print("Inclusive (function and everything it calls):")
        print("\n".join(rows[:args.top]))
        r = subprocess.run(["callgrind_annotate", str(out)], capture_output=True, text=True)
        rows = [ln for ln in r.stdout.splitlines()
                if re.match(r"^\s*[\d,]+ \(", ln) and "TOTALS" not in ln]
        print("\nSelf (exclusive):")
        print("\n".join(rows[:args.top]))
        if args.keep:
            dest = Path(args.keep)
            shutil.copy(out, dest)
            log(f"callgrind output copied to {dest} (do not commit it)")
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-write", action="store_true", help="do not update docs/PERFORMANCE.md")
    ap.add_argument("--profile", metavar="STAGE",
                    help="run aigw-STAGE under valgrind --tool=callgrind instead of benchmarking "
                         "(gateway: the co-located aigw-gateway)")
    ap.add_argument("--requests", type=int, default=300, help="requests for --profile")
    ap.add_argument("--concurrency", type=int, default=4, help="connections for --profile")
    ap.add_argument("--stream", action="store_true", help="--profile streaming requests")
    ap.add_argument("--top", type=int, default=40, help="lines of callgrind_annotate to show")
    ap.add_argument("--keep", metavar="FILE", help="copy the callgrind output to FILE")
    args = ap.parse_args()
    if args.profile:
        return profile(args)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
