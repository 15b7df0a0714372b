"""aigw_worker against the real C broker: streaming with credit, CANCEL,
deadlines, errors, draining and reconnecting after a broker restart."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, List

import msgpack
import pytest

import gwp
from aigw_worker import Final, HandlerError, Request, Worker
from conftest import HEARTBEAT_MS, Broker, services, wait_for, wait_registered


@contextmanager
def running(worker: Worker) -> Iterator[Worker]:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(timeout=5)
        assert not thread.is_alive()


def make_worker(broker: Broker, events: List[str] | None = None) -> Worker:
    return Worker(broker.bus, label="pytest", heartbeat_ms=HEARTBEAT_MS, expiry_ms=600,
                  reconnect_min_ms=100, reconnect_max_ms=400,
                  on_event=(events.append if events is not None else None))


def test_function_handler_final_with_annotations(broker: Broker, client: gwp.Client) -> None:
    worker = make_worker(broker)

    @worker.handler("t.echo", capacity=2)
    def echo(req: Request) -> Final:
        return Final.msgpack({"got": req.obj(), "op": req.op}, usage={"total_tokens": 3})

    with running(worker):
        wait_registered(client, "t.echo")
        env = gwp.Envelope(slip=["t.echo"], cur=0, ann={"op": "chat"})
        reply = client.call("t.echo", {"x": 1}, envelope=env)
        assert reply is not None and reply.status == 200
        assert msgpack.unpackb(reply.body) == {"got": {"x": 1}, "op": "chat"}
        out = gwp.Envelope.decode(reply.envelope)
        assert out.ann["usage"] == {"total_tokens": 3} and out.ann["op"] == "chat"
        assert out.t and out.t[-1][0] == "t.echo"


def test_stream_respects_window_and_credit(broker: Broker, client: gwp.Client) -> None:
    worker = make_worker(broker)
    produced: List[int] = []

    @worker.handler("t.stream")
    def stream(req: Request) -> Iterator[bytes]:
        for i in range(6):
            produced.append(i)
            yield f"chunk {i}".encode()
        return Final(200, b"", {"usage": {"completion_tokens": 6}})

    with running(worker):
        wait_registered(client, "t.stream")
        rid = client.request("t.stream", b"", stream=True, window=2)
        got = [client.recv(2000) for _ in range(2)]
        assert [m.body for m in got if m] == [b"chunk 0", b"chunk 1"]
        assert client.recv(300) is None  # window exhausted: nothing more
        assert len(produced) <= 3  # the producer is paused, not buffering
        client.credit(rid, 2)
        more = [client.recv(2000) for _ in range(2)]
        assert [m.body for m in more if m] == [b"chunk 2", b"chunk 3"]
        client.credit(rid, 10)
        rest = client.collect([rid], 3000)[rid]
        assert [m.body for m in rest if m.command == gwp.Command.PARTIAL] == \
            [b"chunk 4", b"chunk 5"]
        assert [m.seq for m in got + more if m] == [0, 1, 2, 3]
        final = rest[-1]
        assert final.command == gwp.Command.FINAL and final.status == 200
        # a request without the STREAM flag gets the FINAL only
        reply = client.call("t.stream", b"")
        assert reply is not None and reply.status == 200


def test_first_partial_carries_the_annotated_envelope(broker: Broker,
                                                     client: gwp.Client) -> None:
    """PROTOCOL.md §2, PARTIAL frame 5: the first PARTIAL of every request
    carries the envelope the request came with (ann.headers, written by
    ratelimit) plus what the handler put in req.ann (ann.channel), so the
    edge can send a stream's x-ratelimit-* and x-aigw-channel headers before
    its first byte; later PARTIALs carry none."""
    worker = make_worker(broker)

    @worker.handler("t.head")
    def head(req: Request) -> Iterator[bytes]:
        req.ann["channel"] = "local"
        yield b"one"
        yield b"two"
        return Final(200, b"", {"usage": {"completion_tokens": 2}})

    headers = {"x-ratelimit-limit-requests": "100", "x-ratelimit-remaining-requests": "99",
               "x-ratelimit-reset-requests": "600ms"}
    with running(worker):
        wait_registered(client, "t.head")
        for attempt in range(2):  # each request's first PARTIAL, not the worker's
            env = gwp.Envelope(slip=["t.head"], cur=0, tenant={"user": "u"},
                               ann={"op": "chat", "headers": headers})
            rid = client.request("t.head", b"", envelope=env, stream=True, window=8)
            got = client.collect([rid], 3000)[rid]
            partials = [m for m in got if m.command == gwp.Command.PARTIAL]
            assert [m.body for m in partials] == [b"one", b"two"], got
            assert partials[0].envelope, f"request {attempt}: no envelope on PARTIAL 0"
            first = gwp.Envelope.decode(partials[0].envelope)
            assert first.ann["headers"] == headers and first.ann["channel"] == "local"
            assert first.ann["op"] == "chat" and first.tenant == {"user": "u"}
            assert partials[1].envelope == b""
            final = gwp.Envelope.decode(got[-1].envelope)
            assert got[-1].status == 200 and final.ann["channel"] == "local"


def test_cancel_stops_the_handler_and_frees_credit(broker: Broker, client: gwp.Client) -> None:
    events: List[str] = []
    worker = make_worker(broker, events)
    cleaned: List[bytes] = []

    @worker.handler("t.hold", capacity=1)
    def hold(req: Request) -> Iterator[Any]:
        try:
            yield b"first"
            while True:
                yield None
        finally:
            cleaned.append(req.rid)

    with running(worker):
        wait_registered(client, "t.hold")
        rid = client.request("t.hold", b"", stream=True)
        first = client.recv(2000)
        assert first is not None and first.body == b"first"
        client.cancel(rid)
        wait_for(lambda: rid in cleaned, 2, "handler cleanup after CANCEL")
        assert f"cancelled {rid.hex()}" in events
        # the only slot is free again: a new request is served at once
        rid2 = client.request("t.hold", b"", stream=True)
        msg = client.recv(2000)
        assert msg is not None and msg.rid == rid2 and msg.body == b"first"
        client.cancel(rid2)
        # the cancelled request's FINAL 499 is not relayed
        assert all(m.rid != rid for m in client.pump(200))


def test_deadline_stops_the_handler_with_504(broker: Broker, client: gwp.Client) -> None:
    worker = make_worker(broker)
    cleaned: List[bool] = []

    @worker.handler("t.slow")
    def slow(req: Request) -> Iterator[None]:
        try:
            while True:
                yield None
        finally:
            cleaned.append(True)

    with running(worker):
        wait_registered(client, "t.slow")
        started = time.monotonic()
        reply = client.call("t.slow", b"", deadline_ms=300, timeout_ms=3000)
        assert reply is not None and reply.status == 504
        assert msgpack.unpackb(reply.body)["error"]["code"] == "deadline_exceeded"
        assert time.monotonic() - started < 1.5 and cleaned == [True]


def test_errors_become_openai_error_finals(broker: Broker, client: gwp.Client) -> None:
    worker = make_worker(broker)

    @worker.handler("t.err")
    def err(req: Request) -> Final:
        body = req.obj()
        if body == "bad":
            raise HandlerError(400, "no good", "invalid_request_error", "bad_thing", "x")
        raise RuntimeError("boom")

    with running(worker):
        wait_registered(client, "t.err")
        reply = client.call("t.err", "bad")
        assert reply is not None and reply.status == 400
        assert msgpack.unpackb(reply.body) == {"error": {
            "message": "no good", "type": "invalid_request_error", "param": "x",
            "code": "bad_thing"}}
        reply = client.call("t.err", "other")
        assert reply is not None and reply.status == 500
        assert msgpack.unpackb(reply.body)["error"]["type"] == "server_error"
        reply = client.call("t.err", b"\xc1")  # not msgpack
        assert reply is not None and reply.status == 400


def test_remove_service_drains_then_unregisters(broker: Broker, client: gwp.Client) -> None:
    worker = make_worker(broker)
    release = threading.Event()

    @worker.handler("t.drain", capacity=2)
    def drain(req: Request) -> Iterator[None]:
        while not release.is_set():
            yield None
        return Final.msgpack("done")

    removed = threading.Event()
    with running(worker):
        wait_registered(client, "t.drain")
        rid = client.request("t.drain", b"")
        wait_for(lambda: worker.in_flight("t.drain") == 1, 2, "request in flight")
        worker.call_soon(lambda: worker.remove_service("t.drain", on_removed=removed.set))
        time.sleep(0.1)
        late = client.call("t.drain", b"", timeout_ms=2000)
        assert late is not None and late.status == 503
        release.set()
        first = client.recv_final(rid, 2000)
        assert first is not None and first.status == 200
        assert removed.wait(2)
        wait_for(lambda: services(client).get("t.drain", {}).get("workers", 0) == 0, 3,
                 "t.drain unregistered")


def test_reconnects_after_broker_restart(broker: Broker, spawn: Any) -> None:
    events: List[str] = []
    worker = make_worker(broker, events)
    worker.add_service("t.re", lambda req: Final.msgpack("ok"))
    with running(worker):
        c1 = gwp.Client(broker.bus, heartbeat_ms=HEARTBEAT_MS)
        wait_registered(c1, "t.re")
        c1.close()
        assert broker.proc is not None
        broker.proc.kill()
        wait_for(lambda: any(e.startswith("reconnect t.re") for e in events), 3,
                 "worker noticed the broker died")
        Broker.start(broker)  # same ports
        c2 = gwp.Client(broker.bus, heartbeat_ms=HEARTBEAT_MS)
        try:
            wait_registered(c2, "t.re", timeout=5)
            reply = c2.call("t.re", b"")
            assert reply is not None and reply.status == 200
        finally:
            c2.close()
        assert worker.sessions["t.re"].connects >= 2  # a fresh socket


def test_protocol_parse_rejects_hostile_frames() -> None:
    from aigw_worker import protocol as p
    rid = b"r" * 16
    good = p.build_request(rid, "svc", 5, 2, 1, b"", b"x")
    msg = p.parse(good)
    assert (msg.rid, msg.service, msg.deadline, msg.window, msg.stream) == (rid, "svc", 5, 2,
                                                                            True)
    for frames, reason in [
            ([b"GWP2", b"\x02"], "signature"),
            ([b"GWP1", b"\x7f"], "unknown command"),
            (good[:4], "frames"),
            (good[:2] + [b"short"] + good[3:], "rid"),
            (good[:3] + [b"bad service!"] + good[4:], "service"),
            (p.build_final(rid, 200)[:3] + [b"\x00"] + [b"", b""], "status"),
            (good + [b""] * 20, "too many")]:
        with pytest.raises(p.Malformed, match=reason):
            p.parse(frames)
    partial = p.parse(p.build_partial(rid, 0, b"data", b"\x81\xa1v\x01"))
    assert (partial.seq, partial.body, partial.envelope) == (0, b"data", b"\x81\xa1v\x01")
    assert len(p.build_partial(rid, 1, b"data")) == 5  # no envelope: no frame 5
    with pytest.raises(p.Malformed, match="envelope"):
        p.parse(p.build_partial(rid, 0, b"") + [b"x" * (p.ENVELOPE_MAX + 1)])
    env = p.Envelope(id=rid, slip=["a", "b"], cur=0, ann={"op": "chat"}, extra={"zz": 1})
    back = p.Envelope.decode(env.encode())
    assert back.slip == ["a", "b"] and back.ann == {"op": "chat"} and back.extra == {"zz": 1}
    with pytest.raises(ValueError):
        p.Envelope.decode(b"\xdf\xff\xff\xff\xff")  # a map header claiming 4G entries
