"""Process-level tests of aigw-bridge: the real aigw-broker and aigw-bridge
binaries (from AIGW_BUILD), the mock provider as upstream, and a GWP/1 client
(gwp.py) in the role of the router's caller.

The in-process version with more cases is the selftest (`aigw-selftest
bridge`); these check what only separate processes show: registration, the
environment configuration, a bridge killed mid-stream (not idempotent: the
client gets 502, never a silent truncation) and a clean SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from conftest import (BUILD, EXPIRY_MS, HEARTBEAT_MS, PYTHON, REPO, Broker, Proc, Procs,
                      services, wait_for)
import gwp

MOCK = REPO / "tests" / "mock_provider.py"
KEY = "sk-bridge-test"


@pytest.fixture(scope="session")
def bridge_bin() -> Path:
    path = BUILD / "aigw-bridge"
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: build it first (make, or set AIGW_BUILD)",
                    pytrace=False)
    return path


class Mock:
    """tests/mock_provider.py on a free port, with its control API."""

    def __init__(self, procs: Procs, tmp: Path, name: str) -> None:
        port_file = tmp / f"{name}.port"
        self.proc = procs.start(name, [PYTHON, str(MOCK), "--port", "0", "--port-file",
                                       str(port_file), "--api-key", KEY])
        wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 10,
                 f"{name} port file")
        self.port = int(port_file.read_text().strip())
        self.base = f"http://127.0.0.1:{self.port}/v1"

    def _http(self, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    def config(self, **fields: Any) -> None:
        self._http("/_mock/reset", {})
        if fields:
            self._http("/_mock/config", fields)

    def stats(self) -> Dict[str, Any]:
        return self._http("/_mock/stats")


@pytest.fixture
def mock(procs: Procs, tmp_path: Path) -> Mock:
    return Mock(procs, tmp_path, "mock")


def start_bridge(procs: Procs, bridge_bin: Path, broker: Broker, **env: str) -> Proc:
    full = {"AIGW_HEARTBEAT_MS": str(HEARTBEAT_MS), "AIGW_EXPIRY_MS": str(EXPIRY_MS),
            "AIGW_BREAKER_COOLDOWN_MS": "500", "LOG_LEVEL": "info"}
    full.update(env)
    proc = procs.start("bridge", [str(bridge_bin), "--bus", broker.bus], full)
    proc.wait_line(r"serving", timeout=10)
    return proc


@pytest.fixture
def bridge(procs: Procs, bridge_bin: Path, broker: Broker, client: gwp.Client) -> Proc:
    proc = start_bridge(procs, bridge_bin, broker)
    wait_for(lambda: "bridge" in services(client), 5, "bridge registered")
    return proc


def channel(cid: str, base: str, model: str = "mock-gpt", timeout_ms: int = 5000
            ) -> Dict[str, Any]:
    return {"id": cid, "type": "openai", "base": base, "key": KEY, "model": model,
            "timeout_ms": timeout_ms}


def chat_body(stream: bool = False, **extra: Any) -> Dict[str, Any]:
    body: Dict[str, Any] = {"model": "alias",
                            "messages": [{"role": "user", "content": "hello there world"}]}
    if stream:
        body["stream"] = True
    body.update(extra)
    return body


def send(client: gwp.Client, plan: List[Dict[str, Any]], body: Dict[str, Any],
         stream: bool = False, include_usage: bool = False, window: int = 0,
         op: str = "chat") -> bytes:
    env = gwp.Envelope(slip=["router", "bridge"], cur=1,
                       ann={"op": op, "plan": plan, "include_usage": include_usage})
    return client.request("bridge", body, envelope=env, deadline_ms=15000, window=window,
                          stream=stream)


def finish(client: gwp.Client, rid: bytes, timeout_ms: int = 8000, first_seq: int = 0
           ) -> Tuple[List[bytes], gwp.Message]:
    """PARTIAL payloads (sequence numbers from first_seq) and the FINAL of rid."""
    partials: List[bytes] = []
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline:
        msg = client.recv(100)
        if msg is None or msg.rid != rid:
            continue
        if msg.command == gwp.Command.PARTIAL:
            assert msg.seq == first_seq + len(partials), "PARTIALs out of order"
            partials.append(msg.body)
        elif msg.command == gwp.Command.FINAL:
            return partials, msg
    raise AssertionError(f"no FINAL within {timeout_ms} ms ({len(partials)} PARTIALs)")


def ann(final: gwp.Message) -> Dict[str, Any]:
    return gwp.Envelope.decode(final.envelope).ann if final.envelope else {}


def test_non_stream_passes_provider_json_through(mock: Mock, bridge: Proc,
                                                 client: gwp.Client) -> None:
    mock.config()
    rid = send(client, [channel("c1", mock.base)], chat_body())
    partials, final = finish(client, rid)
    assert final.status == 200 and not partials
    a = ann(final)
    assert a["ctype"] == "json" and a["channel"] == "c1" and a["attempts"] == 1
    assert a["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert "plan" not in a, "upstream keys must not travel back"
    reply = json.loads(final.body)
    assert reply["object"] == "chat.completion"
    last = mock.stats()["last_requests"][-1]
    assert last["headers"]["authorization"] == f"Bearer {KEY}"
    assert last["body"]["model"] == "mock-gpt"
    assert "stream_options" not in last["body"]


def test_stream_with_usage_and_done(mock: Mock, bridge: Proc, client: gwp.Client) -> None:
    mock.config(chunks=4)
    rid = send(client, [channel("c1", mock.base)], chat_body(stream=True), stream=True)
    partials, final = finish(client, rid)
    assert final.status == 200 and final.body == b""
    assert all(p.startswith(b"data: ") and p.endswith(b"\n\n") for p in partials)
    assert partials[-1] == b"data: [DONE]\n\n"
    #  role + 4 tokens + finish + [DONE]; the usage chunk is not forwarded
    assert len(partials) == 7
    assert not any(b'"choices":[]' in p for p in partials)
    assert ann(final)["usage"]["completion_tokens"] == 4
    sent = mock.stats()["last_requests"][-1]["body"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    #  The client asked for usage: the chunk is forwarded.
    rid = send(client, [channel("c1", mock.base)],
               chat_body(stream=True, stream_options={"include_usage": True}), stream=True,
               include_usage=True)
    partials, final = finish(client, rid)
    assert final.status == 200 and len(partials) == 8
    assert any(b'"choices":[]' in p for p in partials)


def test_failover_and_breaker(mock: Mock, bridge: Proc, client: gwp.Client) -> None:
    mock.config()
    plan = [channel("dead", "http://127.0.0.1:1/v1"), channel("live", mock.base)]
    for _ in range(3):
        _, final = finish(client, send(client, plan, chat_body()))
        assert final.status == 200
        assert ann(final)["channel"] == "live" and ann(final)["attempts"] == 2
    #  Open: skipped without an attempt.
    _, final = finish(client, send(client, plan, chat_body()))
    assert final.status == 200 and ann(final)["attempts"] == 1
    #  After the cooldown (500 ms) one probe goes to the dead channel again.
    time.sleep(0.6)
    _, final = finish(client, send(client, plan, chat_body()))
    assert final.status == 200 and ann(final)["attempts"] == 2
    #  Every channel failing: 502 naming the failure.
    _, final = finish(client, send(client, [channel("gone", "http://127.0.0.1:1/v1")],
                                   chat_body()))
    assert final.status == 502
    error = final.body_obj()["error"]
    assert "gone" in error["message"] and error["code"] == "upstream_unavailable"


def test_cancel_closes_upstream_within_a_second(mock: Mock, bridge: Proc,
                                                client: gwp.Client) -> None:
    mock.config(chunks=100, chunk_delay_ms=50)
    rid = send(client, [channel("c1", mock.base)], chat_body(stream=True), stream=True)
    got = 0
    deadline = time.monotonic() + 5
    while got < 2 and time.monotonic() < deadline:
        msg = client.recv(100)
        if msg is not None and msg.rid == rid and msg.command == gwp.Command.PARTIAL:
            got += 1
    assert got == 2
    client.cancel(rid)
    t0 = time.monotonic()
    wait_for(lambda: mock.stats()["disconnects"], 1.0, "upstream disconnect")
    assert time.monotonic() - t0 < 1.0
    assert mock.stats()["disconnects"][0]["chunks_sent"] < 100


def test_credit_pauses_the_upstream(mock: Mock, bridge: Proc, client: gwp.Client) -> None:
    mock.config(chunks=20)
    rid = send(client, [channel("c1", mock.base)], chat_body(stream=True), stream=True,
               window=2)
    msgs = [m for m in client.pump(600) if m.rid == rid]
    assert [m.command for m in msgs] == [gwp.Command.PARTIAL] * 2
    client.credit(rid, 1000)
    partials, final = finish(client, rid, first_seq=2)
    assert final.status == 200
    assert len(partials) == 20 + 3 - 2  #  the rest: tokens, finish, [DONE]
    assert partials[-1] == b"data: [DONE]\n\n"


def test_bridge_killed_mid_stream_gives_502(procs: Procs, bridge_bin: Path, broker: Broker,
                                            mock: Mock, client: gwp.Client) -> None:
    proc = start_bridge(procs, bridge_bin, broker)
    wait_for(lambda: "bridge" in services(client), 5, "bridge registered")
    mock.config(chunks=100, chunk_delay_ms=50)
    rid = send(client, [channel("c1", mock.base)], chat_body(stream=True), stream=True)
    msg = client.recv(3000)
    while msg is not None and not (msg.rid == rid and msg.command == gwp.Command.PARTIAL):
        msg = client.recv(3000)
    assert msg is not None, "no PARTIAL before the kill"
    proc.kill(signal.SIGKILL)
    final = client.recv_final(rid, timeout_ms=5000)
    assert final is not None, "no FINAL after the bridge died"
    assert final.status == 502, "a stream whose bridge died must end with 502"


def test_sigterm_stops_cleanly(procs: Procs, bridge_bin: Path, broker: Broker,
                               client: gwp.Client) -> None:
    proc = start_bridge(procs, bridge_bin, broker)
    wait_for(lambda: "bridge" in services(client), 5, "bridge registered")
    proc.kill(signal.SIGTERM)
    assert proc.popen.wait(timeout=3) == 0
    #  The bridge said DISCONNECT: the broker forgets it at once.
    wait_for(lambda: services(client).get("bridge", {}).get("workers", 0) == 0, 2,
             "bridge gone from gw.services")


def test_paused_stream_outlives_the_idle_timeout(mock: Mock, bridge: Proc,
                                                 client: gwp.Client) -> None:
    """A slow client pauses the transfer; the per-attempt (idle) timeout of
    1 s must not kill a transfer that is paused by us, not idle upstream."""
    mock.config(chunks=3000)
    rid = send(client, [channel("c1", mock.base, timeout_ms=1000)], chat_body(stream=True),
               stream=True, window=2)
    msgs = [m for m in client.pump(2500) if m.rid == rid]
    assert [m.command for m in msgs] == [gwp.Command.PARTIAL] * 2
    client.credit(rid, 1_000_000)
    partials, final = finish(client, rid, first_seq=2)
    assert final.status == 200, final.body_obj()
    assert len(partials) == 3000 + 3 - 2
