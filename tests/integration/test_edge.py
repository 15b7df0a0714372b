"""aigw-edge, black box: the real edge in front of the real broker and the
C / Python test workers, spoken to over real HTTP (http.client and raw
sockets, standard library only).

What a user of the gateway would notice: readiness that follows the
workers, streams that arrive as SSE chunks with credit flowing end to end,
a vanished client cancelling its request upstream, a lost broker turning
into a clean 502/503 instead of a hang, and a prompt, clean shutdown.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import pytest

from conftest import BUILD, Broker, Proc, Procs, free_port, wait_for


@pytest.fixture(scope="session")
def edge_bin() -> Path:
    path = BUILD / "aigw-edge"
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: build it first (make)", pytrace=False)
    return path


class Edge:
    """The real aigw-edge on a free loopback port."""

    def __init__(self, procs: Procs, edge_bin: Path, broker: Broker, slip: str,
                 extra: Optional[Dict[str, str]] = None) -> None:
        self.port = free_port()
        env = {"PORT": str(self.port), "AIGW_LISTEN": "127.0.0.1", "AIGW_BUS": broker.bus,
               "AIGW_SLIP": slip, "AIGW_READY_SERVICES": slip, "AIGW_SSE_KEEPALIVE_MS": "100",
               "AIGW_STREAM_WINDOW": "4", "AIGW_EDGE_THREADS": "8", "AIGW_DRAIN_MS": "0"}
        env.update(extra or {})
        self.proc: Proc = procs.start("edge", [str(edge_bin)], env)
        self.proc.wait_line(r"edge: listening on", timeout=5)

    def request(self, method: str, path: str, body: Optional[object] = None,
                headers: Optional[Dict[str, str]] = None, timeout: float = 10.0
                ) -> Tuple[int, Dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            hdrs = {"Content-Type": "application/json"} if data is not None else {}
            hdrs.update(headers or {})
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


@pytest.fixture
def edge_factory(procs: Procs, edge_bin: Path) -> Iterator:
    def make(broker: Broker, slip: str, **extra: str) -> Edge:
        return Edge(procs, edge_bin, broker, slip, extra)
    yield make


def assert_openai_error(body: bytes) -> Dict[str, object]:
    obj = json.loads(body)
    err = obj["error"]
    assert set(err) == {"message", "type", "param", "code"}, obj
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err


def chat(model: str, stream: bool = False) -> Dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


@pytest.mark.parametrize("kind", ["c", "py"])
def test_ready_follows_workers_and_streams_flow(procs: Procs, broker: Broker, edge_factory,
                                               kind: str) -> None:
    edge = edge_factory(broker, "svc")
    status, _, body = edge.request("GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}

    status, _, body = edge.request("GET", "/health/ready")
    assert status == 503
    assert_openai_error(body)
    procs.worker(broker, kind, "svc", mode="stream", partials=10, capacity=4)
    wait_for(lambda: edge.request("GET", "/health/ready")[0] == 200, 5, "ready")

    # 10 PARTIALs through a window of 4: credit must flow edge -> worker.
    status, headers, body = edge.request("POST", "/v1/chat/completions", chat("m", True))
    assert status == 200, body
    assert headers["content-type"] == "text/event-stream"
    assert headers["transfer-encoding"] == "chunked"
    text = body.decode().replace(": keep-alive\n\n", "")
    assert text == "".join(f"chunk {i}" for i in range(10)), text


def test_client_disconnect_cancels_upstream(procs: Procs, broker: Broker,
                                            edge_factory) -> None:
    edge = edge_factory(broker, "slow")
    worker = procs.worker(broker, "c", "slow", mode="stream", partials=1000, delay_ms=200)
    wait_for(lambda: edge.request("GET", "/health/ready")[0] == 200, 5, "ready")
    rid = "0123456789abcdef0123456789abcdef"
    payload = json.dumps(chat("m", True)).encode()
    sock = socket.create_connection(("127.0.0.1", edge.port), timeout=5)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                 b"X-Request-Id: " + rid.encode() + b"\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200"), first
    sock.close()
    start = time.monotonic()
    worker.wait_line(rf"^cancelled {rid}$", timeout=3)
    assert time.monotonic() - start < 2.0


def test_broker_down_gives_503_then_502_when_lost(procs: Procs, broker: Broker,
                                                  edge_factory) -> None:
    edge = edge_factory(broker, "hold")
    procs.worker(broker, "py", "hold", mode="hold")
    wait_for(lambda: edge.request("GET", "/health/ready")[0] == 200, 5, "ready")

    # The broker dies with a request in flight: a prompt 502, not a hang.
    results: Dict[str, object] = {}

    def run() -> None:
        results["reply"] = edge.request("POST", "/v1/chat/completions", chat("m"))

    import threading
    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.3)
    broker.kill()
    t.join(timeout=8)
    assert not t.is_alive()
    status, _, body = results["reply"]  # type: ignore[misc]
    assert status == 502, body
    assert_openai_error(body)

    # No broker at all: 503 at once, and not ready.
    start = time.monotonic()
    status, _, body = edge.request("POST", "/v1/chat/completions", chat("m"))
    assert status == 503 and time.monotonic() - start < 1.0
    assert assert_openai_error(body)["code"] == "broker_unavailable"
    status, _, body = edge.request("GET", "/health/ready")
    assert status == 503
    assert_openai_error(body)


def test_sigterm_stops_promptly(procs: Procs, broker: Broker, edge_factory) -> None:
    edge = edge_factory(broker, "svc")
    assert edge.request("GET", "/health")[0] == 200
    start = time.monotonic()
    edge.proc.kill(signal.SIGTERM)
    edge.proc.popen.wait(timeout=10)
    assert edge.proc.popen.returncode == 0
    assert time.monotonic() - start < 5.0
