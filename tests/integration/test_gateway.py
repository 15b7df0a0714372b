"""The whole gateway, black box: real aigw-broker, aigw-edge, aigw-auth,
aigw-router and aigw-bridge processes on loopback in front of mock providers
(tests/mock_provider.py), spoken to over real HTTP and SSE.

What a user would notice: the weighted split between channels, failover
that hides a broken provider, a breaker that stops hammering it and lets it
back in when it heals, a broken stream that ends with an explicit SSE error,
a vanished client that stops the upstream transfer, malformed JSON and
oversized bodies refused cleanly, and a gateway that keeps serving while its
processes are killed.

Run: AIGW_BUILD=$PWD/build AIGW_TESTDATA=../shared/testdata \
     /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration/test_gateway.py
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

import gwp
from conftest import REPO, free_port, services, wait_for
from gateway import (KEY, ChunkedReader, Gateway, MockProvider, assert_openai_error,
                     channel, chat, sse_events)

TESTDATA = Path(os.environ.get("AIGW_TESTDATA", str(REPO.parent / "shared" / "testdata")))


def run_parallel(fn: Any, count: int, threads: int = 16) -> List[Any]:
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(fn, range(count)))


def content_of(body: bytes) -> str:
    return json.loads(body)["choices"][0]["message"]["content"]


def stream_text(events: List[Tuple[Optional[str], str]]) -> str:
    text = ""
    for name, data in events:
        if name is None and data.startswith("{"):
            for choice in json.loads(data).get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
    return text


# --------------------------------------------------------------------------
# 2. Weighted choice


def test_weighted_choice_follows_weights(make_mock, make_gateway) -> None:
    """Weights 1:3 in one priority tier: the first attempt goes to each
    channel in proportion. 2,000 requests: one standard deviation of the
    share is ~1%, so the 5% tolerance cannot flake, but a router that
    ignored the weights (50%) or always took the heaviest (100%) fails."""
    a, b = make_mock("a"), make_mock("b")
    gw = make_gateway([channel("a", a, weight=1), channel("b", b, weight=3)])
    total = 2000

    def one(i: int) -> Tuple[int, str]:
        status, headers, body = gw.chat(content=f"request {i}")
        return status, headers.get("x-aigw-channel", "")

    start = time.monotonic()
    results = run_parallel(one, total)
    elapsed = time.monotonic() - start
    bad = [r for r in results if r[0] != 200]
    assert not bad, f"{len(bad)} failed: {bad[:5]}"
    served_a, served_b = a.requests(), b.requests()
    assert served_a + served_b == total, (served_a, served_b)
    share_a = served_a / total
    assert abs(share_a - 0.25) <= 0.05, f"channel a got {share_a:.3f} of {total} (want 0.25)"
    assert abs(served_b / total - 0.75) <= 0.05
    # What the user sees agrees with what the providers saw.
    by_header = sum(1 for _, ch in results if ch == "a")
    assert by_header == served_a, (by_header, served_a)
    print(f"weighted: a={served_a} b={served_b} in {elapsed:.1f}s "
          f"({total / elapsed:.0f} req/s)")


# --------------------------------------------------------------------------
# 3. Failover


@pytest.mark.parametrize("fault", ["status500", "refused"])
def test_failover_hides_a_broken_channel(make_mock, make_gateway, fault: str) -> None:
    """A broken channel at the same priority as a healthy one: every request
    succeeds, from the healthy channel (streams too: the failure happens
    before the first byte, so the bridge can still fail over)."""
    b = make_mock("b")
    if fault == "status500":
        a: Optional[MockProvider] = make_mock("a")
        a.config(status=500, count=-1)
        chan_a = channel("a", a)
    else:
        a = None
        chan_a = channel("a", base_url=f"http://127.0.0.1:{free_port()}/v1")
    gw = make_gateway([chan_a, channel("b", b)])

    for i in range(8):
        status, headers, body = gw.chat(content=f"stream {i}", stream=True)
        assert status == 200, body
        events = sse_events(body.decode())
        assert events[-1] == (None, "[DONE]"), body[-300:]
        assert stream_text(events) == f"mock reply to: stream {i}"
    for i in range(40):
        status, headers, body = gw.chat(content=f"plain {i}")
        assert status == 200, (i, body)
        assert headers.get("x-aigw-channel") == "b", headers
        assert content_of(body) == f"mock reply to: plain {i}"
    assert b.requests() == 48
    if a is not None:
        # The broken channel really was tried (and failed over from): with
        # equal weights it is drawn first half the time until its breaker
        # opens after 3 failures (default cooldown 30 s, longer than this test).
        assert a.requests() == 3, a.stats()["by_path"]


# --------------------------------------------------------------------------
# 4. Cooldown and recovery


def test_breaker_cools_down_and_recovers(make_mock, make_gateway) -> None:
    """A (weight 9) fails 3 times in a row: its breaker opens and A gets no
    request during the cooldown although it would be drawn first 90% of the
    time. Healed, and once the cooldown has passed, A is probed and then
    takes its share again."""
    cooldown = 1.0
    a, b = make_mock("a"), make_mock("b")
    a.config(status=500, count=-1)
    gw = make_gateway([channel("a", a, weight=9), channel("b", b, weight=1)],
                      env={"AIGW_BREAKER_FAILURES": "3",
                           "AIGW_BREAKER_COOLDOWN_MS": str(int(cooldown * 1000))})

    sent = 0
    while a.requests() < 3:
        status, headers, body = gw.chat()
        sent += 1
        assert status == 200 and headers.get("x-aigw-channel") == "b", (status, body)
        assert sent < 60, "channel a was never tried"
    opened = time.monotonic()  # the breaker opened at or before this instant
    assert a.requests() == 3

    # Open: A is skipped. Only requests that finished inside the cooldown count.
    during = 0
    while time.monotonic() < opened + cooldown * 0.6:
        status, headers, body = gw.chat()
        assert status == 200 and headers.get("x-aigw-channel") == "b", (status, body)
        during += 1
    assert during >= 10, f"only {during} requests in the cooldown window: inconclusive"
    assert a.requests() == 3, f"a was called while its breaker was open ({during} requests)"

    # Heal A (reset also zeroes its stats), let the cooldown pass.
    a.reset()
    time.sleep(max(0.0, opened + cooldown + 0.2 - time.monotonic()))

    def probed() -> bool:
        status, _, body = gw.chat()
        assert status == 200, body
        return a.requests() >= 1
    wait_for(probed, 3.0, "the half-open probe to reach channel a", interval=0)

    served = []
    for _ in range(40):
        status, headers, body = gw.chat()
        assert status == 200, body
        served.append(headers.get("x-aigw-channel"))
    # Closed again: A's weight applies (expected ~36 of 40).
    assert served.count("a") >= 20, served
    assert a.requests() >= 21


# --------------------------------------------------------------------------
# 5. A stream broken by the provider


@pytest.mark.parametrize("fault", ["break_after_chunks", "error_after_chunks"])
def test_broken_stream_ends_with_sse_error(make_mock, make_gateway, fault: str) -> None:
    """The provider drops the connection (or sends an error event) after two
    token chunks: the client gets those chunks, then `event: error` with an
    OpenAI error object, then a clean end of the chunked body; never [DONE],
    never a 200 stream that just stops."""
    a = make_mock("a")
    a.config(**{fault: 2, "chunks": 10})
    gw = make_gateway([channel("a", a)])

    sock = gw.raw_stream(chat(stream=True))
    try:
        reader = ChunkedReader(sock)
        reader.read_head()
        assert reader.status == 200
        assert reader.headers["content-type"].startswith("text/event-stream")
        reader.read_all()
    finally:
        sock.close()
    text = reader.body.decode()
    events = sse_events(text)
    assert reader.complete, f"stream truncated without its last chunk:\n{text}"
    assert (None, "[DONE]") not in events, text
    assert stream_text(events) == "mock reply", text  # the 2 chunks that were sent
    names = [name for name, _ in events]
    assert "error" in names, f"no `event: error` in:\n{text}"
    assert names[-1] == "error", f"the error event is not the last one:\n{text}"
    err = assert_openai_error(events[-1][1].encode())
    print(f"{fault}: {err}")


# --------------------------------------------------------------------------
# 6. A disconnecting client stops the upstream transfer


def test_client_disconnect_closes_upstream_within_a_second(make_mock, make_gateway) -> None:
    a = make_mock("a")
    a.config(chunk_delay_ms=300, chunks=50)
    gw = make_gateway([channel("a", a)])

    sock = gw.raw_stream(chat(stream=True))
    reader = ChunkedReader(sock)
    reader.read_head()
    assert reader.status == 200
    tokens = 0
    while tokens < 2:
        data = reader.read_chunk()
        assert data is not None, reader.body
        tokens = sum(1 for name, d in sse_events(reader.body.decode())
                     if name is None and '"content":"' in d and '"content":""' not in d)
    sock.close()
    closed = time.time()

    def disconnect() -> Optional[Dict[str, Any]]:
        recs = [r for r in a.stats()["disconnects"] if r["phase"] == "streaming"]
        return recs[0] if recs else None
    rec = wait_for(disconnect, 5.0, "the provider to see its stream closed", interval=0.05)
    lag = rec["at"] - closed
    print(f"upstream closed {lag * 1000:.0f} ms after the client, "
          f"{rec['chunks_sent']} of 50 chunks sent")
    assert lag < 1.0, rec
    assert rec["chunks_sent"] < 10, rec  # not drained to the end
    assert a.stats()["active_streams"] == 0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_client_disconnect_before_first_byte_closes_upstream(make_mock, make_gateway,
                                                             stream: bool) -> None:
    """The provider takes 3 s to answer; the client gives up after 0.3 s. The
    provider should see its connection closed (phase "latency") within a
    second, not serve a request nobody will read."""
    a = make_mock("a")
    a.config(latency_ms=3000)
    gw = make_gateway([channel("a", a)])
    sock = gw.raw_stream(chat(stream=stream))
    wait_for(lambda: a.stats()["requests"] >= 1, 2.0, "the request to reach the provider")
    sock.close()
    closed = time.time()

    def disconnect() -> Optional[Dict[str, Any]]:
        recs = a.stats()["disconnects"]
        return recs[0] if recs else None
    try:
        rec = wait_for(disconnect, 2.0, "the provider to see its request abandoned",
                       interval=0.05)
    except AssertionError:
        rec = None
    assert rec is not None, "upstream request not cancelled after the client went away"
    assert rec["phase"] == "latency" and rec["at"] - closed < 1.0, rec


# --------------------------------------------------------------------------
# 7. Malformed JSON


def test_every_jsontestsuite_n_file_gets_400(make_mock, make_gateway) -> None:
    suite = TESTDATA / "JSONTestSuite" / "test_parsing"
    assert suite.is_dir(), f"{suite} is missing (set AIGW_TESTDATA)"
    files = sorted(suite.glob("n_*.json"))
    assert len(files) > 150, f"only {len(files)} n_ files in {suite}"
    a = make_mock("a")
    gw = make_gateway([channel("a", a)])
    # Control: the same route with a valid body works.
    assert gw.chat()[0] == 200

    wrong = []
    for path in files:
        status, _, body = gw.request("POST", "/v1/chat/completions", raw=path.read_bytes())
        try:
            if status != 400:
                raise AssertionError(f"status {status}")
            assert_openai_error(body, status)
        except AssertionError as exc:
            wrong.append(f"{path.name}: {exc}: {body[:120]!r}")
    assert not wrong, f"{len(wrong)} of {len(files)} n_ files:\n" + "\n".join(wrong)
    assert a.requests() == 1  # nothing malformed reached the provider


# --------------------------------------------------------------------------
# 8. Oversized body


def test_oversized_body_gets_413_without_reading_it(make_mock, make_gateway) -> None:
    a = make_mock("a")
    gw = make_gateway([channel("a", a)], edge_env={"AIGW_BODY_MAX": str(1024 * 1024)})
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    try:
        start = time.monotonic()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: aigw\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(100 * 1024 * 1024).encode() + b"\r\n\r\n"
                     b'{"model":')
        sock.settimeout(2.0)
        reader = ChunkedReader(sock)
        reader.read_head()
        elapsed = time.monotonic() - start
        assert reader.status == 413, reader.headers
        assert elapsed < 2.0, elapsed
        err = assert_openai_error(reader.read_all(), 413)
        # The edge does not wait for the other 100 MiB: it closes the connection.
        sock.settimeout(2.0)
        closed = reader.buf == b"" and (reader.eof or sock.recv(1) == b"")
        assert closed, "connection left open after 413"
    finally:
        sock.close()
    print(f"413 in {elapsed * 1000:.0f} ms: {err}")
    assert a.requests() == 0


# --------------------------------------------------------------------------
# 9. Scale-out and process failure


class Balancer:
    """What a load balancer in front of two edges does: alternate; when the
    connection to an edge fails before any answer, send the request to the
    other one (and stop using the dead edge)."""

    RETRYABLE = (ConnectionRefusedError, ConnectionResetError, BrokenPipeError,
                 http.client.RemoteDisconnected, http.client.IncompleteRead)

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.down: set = set()

    def chat(self, i: int) -> Dict[str, Any]:
        edges = [e for e in (i % 2, 1 - i % 2) if e not in self.down] or [1 - i % 2]
        rec: Dict[str, Any] = {"i": i, "start": time.monotonic(), "retried": 0}
        for edge in edges:
            try:
                status, headers, body = self.gw.chat(edge=edge, content=f"load {i}")
                rec.update(status=status, body=body, edge=edge, end=time.monotonic())
                return rec
            except self.RETRYABLE as exc:
                self.down.add(edge)
                rec["retried"] += 1
                rec["error"] = repr(exc)
        rec.update(status=-1, end=time.monotonic())
        return rec


def test_scale_out_and_killed_processes(make_mock, make_gateway, procs) -> None:
    """Two of every stage on one broker. Both edges serve, both bridges hold
    requests at once. Then, under load, one auth and one router, then one
    bridge, then one edge are SIGKILLed.

    What is asserted, and why:

    * auth and router are idempotent stages. They hold a request for
      microseconds, so a bare SIGKILL would rarely catch one in flight and
      the check could pass vacuously; they are therefore frozen first
      (SIGSTOP, 0.3 s: requests dispatched to them pile up unanswered, as in
      a process that crashes mid-work; gw.services must show some in
      flight), then SIGKILLed. The broker must re-dispatch those requests to
      the survivor (nothing was streamed) and stop dispatching to the dead
      worker: no request may fail because of these kills.
    * the bridge is not idempotent (an upstream call may already have
      happened): requests in flight at the killed bridge end with 502 (the
      broker's worker_lost), at most its capacity (8) of them, and only
      requests that were in flight at the kill instant (or dispatched to it
      before the broker noticed, within the 600 ms expiry). Everything not
      dispatched to it, including what was queued, succeeds on the other
      bridge.
    * a killed edge drops its client connections; the balancer re-sends
      those requests to the other edge, where they succeed. (The provider
      may see such a request twice: that is the load balancer's retry.)
    """
    capacity = 8
    mock = make_mock("m")
    mock.config(latency_ms=100)
    gw = make_gateway([channel("m", mock)],
                      counts={"edge": 2, "auth": 2, "router": 2, "bridge": 2},
                      env={"AIGW_BRIDGE_CAPACITY": str(capacity)})
    bus = gwp.Client(gw.broker.bus, heartbeat_ms=200)
    try:
        listing = services(bus)
        for stage in ("auth", "router", "bridge"):
            assert listing[stage]["workers"] == 2, listing[stage]
        assert listing["auth"]["idempotent"] and listing["router"]["idempotent"]
        assert not listing["bridge"]["idempotent"], listing["bridge"]

        # --- Scale-out: 16 concurrent clients over both edges. A bridge is
        # never dispatched more than its capacity, so more than 8 requests in
        # flight at the bridge service means both bridges hold requests.
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], services(bus)["bridge"]["in_flight"])
                time.sleep(0.01)
        sampler = threading.Thread(target=sample)
        sampler.start()
        lb = Balancer(gw)
        try:
            warm = run_parallel(lb.chat, 160)
        finally:
            stop.set()
            sampler.join()
        assert all(r["status"] == 200 for r in warm), [r for r in warm if r["status"] != 200]
        assert {r["edge"] for r in warm} == {0, 1}
        assert peak[0] > capacity, f"bridge in_flight peaked at {peak[0]}: one bridge only?"

        # --- Kills under load.
        total = 400
        kills: Dict[str, float] = {}

        frozen: Dict[str, int] = {}

        def killer() -> None:
            plan = [(0.5, "freeze"), (0.8, ("auth", "router")), (1.7, ("bridge",)),
                    (2.6, ("edge",))]
            t0 = time.monotonic()
            for at, stages in plan:
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                if stages == "freeze":
                    gw.kill("auth", 0, signal.SIGSTOP)
                    gw.kill("router", 0, signal.SIGSTOP)
                    continue
                if "auth" in stages:
                    listing = services(bus)
                    frozen.update(auth=listing["auth"]["in_flight"],
                                  router=listing["router"]["in_flight"])
                for stage in stages:
                    kills[stage] = time.monotonic()  # before: kill() also reaps
                    gw.kill(stage, 0)
        killing = threading.Thread(target=killer)
        killing.start()
        results = run_parallel(lb.chat, total)
        killing.join()
        assert set(kills) == {"auth", "router", "bridge", "edge"}
        # The frozen auth and router really held requests when they died.
        assert frozen["auth"] >= 1 and frozen["router"] >= 1, frozen
        assert results[-1]["start"] > kills["edge"], "load ended before the last kill"

        t_bridge = kills["bridge"]
        expiry = 0.6
        failed = [r for r in results if r["status"] != 200]
        summary = (f"{len(failed)} of {total} failed; kills at "
                   + ", ".join(f"{k}={v - results[0]['start']:.2f}s" for k, v in kills.items()))
        print(summary, f"; in flight at the frozen auth/router when killed: {frozen}")
        for r in failed:
            where = (f"request {r['i']} [{r['start'] - t_bridge:+.2f}s, "
                     f"{r['end'] - t_bridge:+.2f}s] around the bridge kill: "
                     f"{r['status']} {r.get('body', r.get('error'))!r}")
            assert r["status"] == 502, where
            assert assert_openai_error(r["body"])["code"] == "worker_lost", where
            assert r["start"] < t_bridge + expiry + 0.2 and r["end"] > t_bridge, where
        assert len(failed) <= capacity, summary
        retried = [r for r in results if r["retried"]]
        assert retried, "no request was in flight at the killed edge: kill too late?"
        assert all(r["edge"] == 1 for r in results if r["start"] > kills["edge"] + 0.1)

        # The survivors carry on alone.
        listing = services(bus)
        for stage in ("auth", "router", "bridge"):
            assert listing[stage]["workers"] == 1, listing[stage]
        for i in range(10):
            status, _, body = gw.chat(edge=1)
            assert status == 200, body
    finally:
        bus.close()


# --------------------------------------------------------------------------
# Usage headers


def test_non_stream_responses_carry_the_usage_as_headers(make_mock, make_gateway) -> None:
    """The provider's usage is readable without parsing the body."""
    a = make_mock("a")
    gw = make_gateway([channel("a", a)])
    status, headers, body = gw.chat(content="how many tokens is this")
    assert status == 200, body
    usage = json.loads(body)["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0, usage
    assert headers.get("x-aigw-prompt-tokens") == str(usage["prompt_tokens"]), headers
    assert headers.get("x-aigw-completion-tokens") == str(usage["completion_tokens"]), headers
    assert headers.get("x-aigw-total-tokens") == str(usage["total_tokens"]), headers


def test_slow_requests_are_logged_with_stage_timings(make_mock, make_gateway) -> None:
    """With AIGW_SLOW_REQUEST_MS, a request slower than that leaves one
    warning that says which stage held it; faster ones leave none."""
    a = make_mock("a")
    gw = make_gateway([channel("a", a)], edge_env={"AIGW_SLOW_REQUEST_MS": "400"})
    status, headers, body = gw.chat(content="fast")
    assert status == 200, body
    a.config(latency_ms=700)
    status, headers, body = gw.chat(content="slow")
    assert status == 200, body
    rid = headers["x-request-id"]

    def slow_lines() -> List[str]:
        return [ln for ln in gw.logs().splitlines() if "slow request" in ln]
    lines = wait_for(slow_lines, 5.0, "the slow-request warning")
    assert len(lines) == 1, lines  # the fast request is not there
    line = lines[0]
    assert "WARN" in line and f"rid={rid}" in line and "status=200" in line, line
    took = float(line.split("slow request ")[1].split(" ms")[0])
    assert 700 <= took < 5000, line
    # every stage on the path, each with its arrival and hand-off in ms
    # after the edge took the request; the bridge held it for the latency
    spans = {}
    for stage in ("auth", "ratelimit", "router", "bridge"):
        assert f" {stage} " in line, line
        t_in, t_out = line.split(f" {stage} ")[1].split()[0].split("-")
        spans[stage] = (float(t_in), float(t_out))
    assert spans["bridge"][1] - spans["bridge"][0] >= 650, spans
    assert spans["auth"][0] <= spans["ratelimit"][0] <= spans["router"][0] <= spans["bridge"][0]
