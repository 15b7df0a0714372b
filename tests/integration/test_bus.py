"""The bus, black box: the real aigw-broker with real C and Python workers.

Each test starts its own broker on free loopback ports with short timers
(heartbeat 200 ms, expiry 600 ms, grace 1 s) and asserts what a client of the
bus would notice: which worker answered, what status, in what order, how
soon. Clients speak GWP/1 through tests/integration/gwp.py, written from
proto/PROTOCOL.md.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any, Dict, List

import pytest
import zmq

import gwp
from conftest import (Broker, Procs, error_code, services, unpack, wait_for,
                      wait_registered)

KINDS = ["py", "c"]


def finals(msgs: List[gwp.Message]) -> List[gwp.Message]:
    return [m for m in msgs if m.command == gwp.Command.FINAL]


def partials(msgs: List[gwp.Message]) -> List[gwp.Message]:
    return [m for m in msgs if m.command == gwp.Command.PARTIAL]


def for_rid(msgs: List[gwp.Message], rid: bytes) -> List[gwp.Message]:
    return [m for m in msgs if m.rid == rid]


# --------------------------------------------------------------------------
# 3.1 Dispatch by credit


def test_dispatch_spreads_by_credit_and_queues_the_rest(procs: Procs, broker: Broker,
                                                        client: gwp.Client) -> None:
    delay = 500
    workers = [procs.worker(broker, kind, "spread", mode="sleep", delay_ms=delay,
                            label=f"spread-{i}-{kind}")
               for i, kind in enumerate(["py", "c", "py"])]
    labels = {w.label for w in workers}  # type: ignore[attr-defined]
    wait_registered(client, "spread", 3)

    # Three requests, three workers of capacity 1: all served at once.
    start = time.monotonic()
    rids = [client.request("spread", {"n": i}) for i in range(3)]
    got = client.collect(rids, timeout_ms=5000)
    elapsed = time.monotonic() - start
    replies = [finals(got[r]) for r in rids]
    assert all(len(f) == 1 and f[0].status == 200 for f in replies), replies
    served_by = [unpack(f[0].body)["worker"] for f in replies]
    assert set(served_by) == labels, f"not spread across all workers: {served_by}"
    assert elapsed < 2 * delay / 1000, f"3 requests on 3 workers took {elapsed:.2f}s"

    # Seven requests: three in flight, four wait in the queue, then complete.
    start = time.monotonic()
    rids = [client.request("spread", {"n": i}) for i in range(7)]
    entry = wait_for(lambda: (e := services(client)["spread"])["in_flight"] == 3 and e,
                     1.0, "3 requests in flight")
    assert entry["queued"] == 4, entry
    assert entry["capacity"] == 3, entry
    got = client.collect(rids, timeout_ms=8000)
    elapsed = time.monotonic() - start
    statuses = [[f.status for f in finals(got[r])] for r in rids]
    assert statuses == [[200]] * 7, statuses
    served_by = [unpack(finals(got[r])[0].body)["worker"] for r in rids]
    counts = {label: served_by.count(label) for label in labels}
    assert min(counts.values()) >= 2, f"uneven dispatch: {counts}"
    # three waves of `delay` each: the queue really held requests back
    assert elapsed >= 3 * delay / 1000 * 0.9, f"7 requests finished in {elapsed:.2f}s"


# --------------------------------------------------------------------------
# 3.3 The routing slip


@pytest.mark.parametrize("kinds", [("py", "c", "py"), ("c", "py", "c")],
                         ids=["py-c-py", "c-py-c"])
def test_slip_forwards_through_three_services(procs: Procs, broker: Broker,
                                              client: gwp.Client, kinds: Any) -> None:
    stages = ["slip.auth", "slip.route", "slip.model"]
    labels = []
    for stage, kind in zip(stages, kinds):
        label = f"{stage}-{kind}"
        procs.worker(broker, kind, stage, mode="forward", label=label)
        labels.append(label)
    for stage in stages:
        wait_registered(client, stage, 1)

    env = gwp.Envelope(slip=list(stages), cur=0, model="tiny")
    rid = client.request(stages[0], b"\x81\xa6prompt\xa2hi", envelope=env,
                         deadline_ms=5000)
    reply = client.recv_final(rid, timeout_ms=5000)
    assert reply is not None, "no FINAL through the slip"
    assert reply.status == 200, (reply.status, reply.body)
    body = unpack(reply.body)
    assert body["path"] == labels, f"stages out of order: {body['path']}"
    assert body["service"] == stages[-1]
    assert body["body"] == b"\x81\xa6prompt\xa2hi", "body changed on the way"
    late = for_rid(client.pump(300), rid)
    assert late == [], f"more than one FINAL: {late}"
    assert all(e["in_flight"] == 0 for n, e in services(client).items() if n in stages)


# --------------------------------------------------------------------------
# 3.2 Streaming and stream credit


@pytest.mark.parametrize("kind", KINDS)
def test_stream_partials_in_order_with_credit(procs: Procs, broker: Broker,
                                              client: gwp.Client, kind: str) -> None:
    procs.worker(broker, kind, "stream", mode="stream", partials=10, capacity=4)
    wait_registered(client, "stream", 1)

    # A client that grants nothing gets exactly `window` PARTIALs, no FINAL.
    rid = client.request("stream", b"", stream=True, window=3, deadline_ms=10000)
    first = for_rid(client.pump(600), rid)
    assert [m.command for m in first] == [gwp.Command.PARTIAL] * 3, first
    assert [m.seq for m in first] == [0, 1, 2]

    client.credit(rid, 2)
    second = for_rid(client.pump(400), rid)
    assert [(m.command, m.seq) for m in second] == [(gwp.Command.PARTIAL, 3),
                                                    (gwp.Command.PARTIAL, 4)], second

    client.credit(rid, 100)
    rest = client.collect([rid], timeout_ms=3000)[rid]
    rest += for_rid(client.pump(300), rid)  # anything after the FINAL is a bug
    everything = first + second + rest
    assert [m.command for m in everything] == [gwp.Command.PARTIAL] * 10 + [
        gwp.Command.FINAL], everything
    assert [m.seq for m in partials(everything)] == list(range(10))
    assert [m.body for m in partials(everything)] == [f"chunk {i}".encode()
                                                      for i in range(10)]
    assert everything[-1].status == 200

    # window 0 = unlimited: the whole stream at once.
    rid = client.request("stream", b"", stream=True, window=0)
    msgs = client.collect([rid], timeout_ms=3000)[rid]
    assert [m.seq for m in partials(msgs)] == list(range(10))
    assert [m.command for m in msgs][-1] == gwp.Command.FINAL
    assert len(finals(msgs)) == 1

    # Without the STREAM flag a streaming worker sends no PARTIAL at all.
    rid = client.request("stream", b"", stream=False)
    msgs = client.collect([rid], timeout_ms=3000)[rid]
    assert [m.command for m in msgs] == [gwp.Command.FINAL], msgs


# --------------------------------------------------------------------------
# 3.4 CANCEL


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_reaches_worker_and_no_final_is_relayed(procs: Procs, broker: Broker,
                                                       client: gwp.Client,
                                                       kind: str) -> None:
    worker = procs.worker(broker, kind, "held", mode="hold", capacity=1)
    wait_registered(client, "held", 1)

    a = client.request("held", b"a")
    worker.wait_line(f"request {a.hex()}")
    b = client.request("held", b"b")  # no credit left: waits in the queue
    wait_for(lambda: services(client)["held"]["queued"] == 1, 1.0, "b queued")

    client.cancel(b)  # queued: the broker drops it, the worker never sees it
    client.cancel(a)  # dispatched: CANCEL goes on to the worker
    worker.wait_line(f"cancelled {a.hex()}", timeout=2)
    late = [m for m in client.pump(500) if m.rid in (a, b)]
    assert late == [], f"messages relayed after CANCEL: {late}"
    assert not worker.has_line(b.hex()), "a cancelled queued request was dispatched"

    # The worker's FINAL 499 freed its credit: the next request is dispatched.
    entry = services(client)["held"]
    assert (entry["in_flight"], entry["queued"]) == (0, 0), entry
    c = client.request("held", b"c")
    worker.wait_line(f"request {c.hex()}", timeout=2)
    client.cancel(c)


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_mid_stream_stops_it(procs: Procs, broker: Broker, client: gwp.Client,
                                    kind: str) -> None:
    worker = procs.worker(broker, kind, "slow", mode="stream", partials=40, delay_ms=50)
    wait_registered(client, "slow", 1)
    rid = client.request("slow", b"", stream=True, window=0)
    got = wait_for(lambda: partials(for_rid(client.pump(50), rid)), 3, "first PARTIAL")
    client.cancel(rid)
    worker.wait_line(f"cancelled {rid.hex()}", timeout=2)
    after = for_rid(client.pump(600), rid)
    assert finals(after) == [], "a FINAL was relayed after CANCEL"
    assert len(got) + len(after) < 10, "the stream went on after CANCEL"


# --------------------------------------------------------------------------
# 3.5 Dead workers


@pytest.mark.parametrize("kind", KINDS)
def test_killed_idempotent_worker_request_is_redispatched(procs: Procs, broker: Broker,
                                                          client: gwp.Client,
                                                          kind: str) -> None:
    doomed = procs.worker(broker, kind, "idem", mode="hold", idempotent=True,
                          label=f"doomed-{kind}")
    wait_registered(client, "idem", 1)
    rid = client.request("idem", b"x", deadline_ms=10000)
    doomed.wait_line(f"request {rid.hex()}")
    other = "c" if kind == "py" else "py"
    rescuer = procs.worker(broker, other, "idem", mode="echo", idempotent=True,
                           label=f"rescuer-{other}")
    wait_registered(client, "idem", 2)

    start = time.monotonic()
    doomed.kill(signal.SIGKILL)
    reply = client.recv_final(rid, timeout_ms=4000)
    assert reply is not None, "no FINAL after the worker was killed"
    assert reply.status == 200, (reply.status, reply.body)
    assert unpack(reply.body)["worker"] == rescuer.label  # type: ignore[attr-defined]
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("kind", KINDS)
def test_killed_non_idempotent_worker_request_fails_502(procs: Procs, broker: Broker,
                                                        client: gwp.Client,
                                                        kind: str) -> None:
    doomed = procs.worker(broker, kind, "once", mode="hold", label=f"doomed-{kind}")
    wait_registered(client, "once", 1)
    rid = client.request("once", b"x", deadline_ms=10000)
    doomed.wait_line(f"request {rid.hex()}")
    bystander = procs.worker(broker, "c" if kind == "py" else "py", "once", mode="echo")
    wait_registered(client, "once", 2)

    doomed.kill(signal.SIGKILL)
    reply = client.recv_final(rid, timeout_ms=4000)
    assert reply is not None, "no FINAL after the worker was killed"
    assert reply.status == 502, (reply.status, reply.body)
    assert error_code(reply) == "worker_lost", unpack(reply.body)
    assert not bystander.has_line(rid.hex()), "a non-idempotent request ran twice"


@pytest.mark.parametrize("kind", KINDS)
def test_killed_worker_after_partial_fails_502_even_if_idempotent(
        procs: Procs, broker: Broker, client: gwp.Client, kind: str) -> None:
    doomed = procs.worker(broker, kind, "half", mode="stream", partials=100, delay_ms=100,
                          idempotent=True)
    wait_registered(client, "half", 1)
    rid = client.request("half", b"", stream=True, deadline_ms=10000)
    doomed.wait_line(f"request {rid.hex()}")
    wait_for(lambda: partials(for_rid(client.pump(50), rid)), 3, "first PARTIAL")
    rescuer = procs.worker(broker, "py" if kind == "c" else "c", "half", mode="echo",
                           idempotent=True)
    wait_registered(client, "half", 2)
    doomed.kill(signal.SIGKILL)
    reply = client.recv_final(rid, timeout_ms=4000)
    assert reply is not None and reply.status == 502, reply
    assert not rescuer.has_line(rid.hex()), "a half-streamed request was re-dispatched"


@pytest.mark.parametrize("kind", KINDS)
def test_worker_disconnect_fails_its_requests_at_once(procs: Procs, make_broker: Any,
                                                      clients: Any, kind: str) -> None:
    # Long expiry: only the worker's DISCONNECT (3.5.7) can explain a fast 502.
    broker = make_broker(heartbeat_ms=1000, expiry_ms=5000)
    client = clients(broker)
    worker = procs.worker(broker, kind, "bye", mode="hold")
    wait_registered(client, "bye", 1)
    rid = client.request("bye", b"", deadline_ms=10000)
    worker.wait_line(f"request {rid.hex()}")
    start = time.monotonic()
    worker.stop()  # SIGTERM: the worker sends DISCONNECT on its way out
    reply = client.recv_final(rid, timeout_ms=4000)
    assert reply is not None and reply.status == 502, reply
    assert time.monotonic() - start < 2.0, "502 came from expiry, not from DISCONNECT"


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_worker_is_expired_then_reregisters(procs: Procs, broker: Broker,
                                                   client: gwp.Client, kind: str) -> None:
    worker = procs.worker(broker, kind, "frozen", mode="echo")
    wait_registered(client, "frozen", 1)
    worker.kill(signal.SIGSTOP)
    try:
        wait_for(lambda: services(client).get("frozen", {}).get("workers", 0) == 0, 3,
                 "the broker to expire it")
        held = client.request("frozen", b"while frozen", deadline_ms=10000)
    finally:
        worker.kill(signal.SIGCONT)
    # Woken up, it is unknown to the broker: DISCONNECT (3.5.3) or its own
    # expiry makes it reconnect on a fresh socket and READY again (3.5.4).
    reply = client.recv_final(held, timeout_ms=4000)
    assert reply is not None, "the held request was never answered"
    if reply.status == 503:  # grace (1 s) ran out first: acceptable, retry once
        reply = wait_for(lambda: (r := client.call("frozen", b"x", timeout_ms=1500))
                         and r.status == 200 and r, 5, "service back")
    assert reply.status == 200, reply
    assert services(client)["frozen"]["workers"] == 1


# --------------------------------------------------------------------------
# Broker restart


def test_restarted_broker_is_readopted_by_workers(procs: Procs, broker: Broker,
                                                  clients: Any) -> None:
    client = clients(broker)
    procs.worker(broker, "py", "rs.py", label="rs-py")
    procs.worker(broker, "c", "rs.c", label="rs-c")
    for service in ("rs.py", "rs.c"):
        wait_registered(client, service, 1)
        reply = client.call(service, b"before")
        assert reply is not None and reply.status == 200
    client.close()

    broker.kill()
    broker.start()
    start = time.monotonic()
    client = clients(broker)

    def served(service: str) -> bool:
        reply = client.call(service, b"after", timeout_ms=1500)
        return reply is not None and reply.status == 200

    for service in ("rs.py", "rs.c"):
        wait_for(lambda: served(service), 8.0, f"{service} served after restart",
                 interval=0.1)
    elapsed = time.monotonic() - start
    assert elapsed < 5.0, f"workers took {elapsed:.1f}s to come back"
    entries = services(client)
    assert entries["rs.py"]["workers"] == 1 and entries["rs.c"]["workers"] == 1, entries


# --------------------------------------------------------------------------
# 3.1.4-6 Queue limits, deadlines, unknown services


def test_queued_request_past_deadline_gets_504(procs: Procs, broker: Broker,
                                               client: gwp.Client) -> None:
    worker = procs.worker(broker, "c", "busy", mode="hold")
    wait_registered(client, "busy", 1)
    a = client.request("busy", b"")
    worker.wait_line(f"request {a.hex()}")
    start = time.monotonic()
    b = client.request("busy", b"", deadline_ms=300)
    reply = client.recv_final(b, timeout_ms=3000)
    elapsed = time.monotonic() - start
    assert reply is not None and reply.status == 504, reply
    assert error_code(reply) == "deadline_exceeded", unpack(reply.body)
    assert 0.25 <= elapsed < 1.5, f"504 after {elapsed:.2f}s for a 300 ms deadline"
    assert not worker.has_line(b.hex())
    assert services(client)["busy"]["queued"] == 0
    client.cancel(a)


def test_full_queue_answers_503_at_once(procs: Procs, make_broker: Any,
                                        clients: Any) -> None:
    broker = make_broker(queue_max=2)
    client = clients(broker)
    worker = procs.worker(broker, "py", "narrow", mode="hold")
    wait_registered(client, "narrow", 1)
    a = client.request("narrow", b"")
    worker.wait_line(f"request {a.hex()}")
    queued = [client.request("narrow", b"") for _ in range(2)]
    start = time.monotonic()
    d = client.request("narrow", b"")
    reply = client.recv_final(d, timeout_ms=2000)
    assert reply is not None and reply.status == 503, reply
    assert error_code(reply) == "queue_full", unpack(reply.body)
    assert time.monotonic() - start < 0.5
    msgs = client.pump(200)
    assert [m for m in msgs if m.rid in queued] == [], "queued requests were answered"
    assert services(client)["narrow"]["queued"] == 2
    for rid in [a] + queued:
        client.cancel(rid)


def test_unknown_service_gets_503_after_grace(broker: Broker, client: gwp.Client) -> None:
    start = time.monotonic()
    rid = client.request("no.such.service", b"", deadline_ms=10000)
    reply = client.recv_final(rid, timeout_ms=5000)
    elapsed = time.monotonic() - start
    assert reply is not None and reply.status == 503, reply
    assert error_code(reply) == "no_worker", unpack(reply.body)
    assert 0.9 <= elapsed < 2.5, f"503 after {elapsed:.2f}s with grace 1 s"


def test_worker_registering_within_grace_serves_held_request(
        procs: Procs, make_broker: Any, clients: Any) -> None:
    broker = make_broker(grace_ms=3000)
    client = clients(broker)
    rid = client.request("late", b"", deadline_ms=10000)
    time.sleep(0.2)  # the request is held: no worker exists yet
    procs.worker(broker, "c", "late", mode="echo", label="late-c")
    reply = client.recv_final(rid, timeout_ms=4000)
    assert reply is not None and reply.status == 200, reply
    assert unpack(reply.body)["worker"] == "late-c"


# --------------------------------------------------------------------------
# 5. gw.services


def test_gw_services_reports_workers_and_capacity(procs: Procs, broker: Broker,
                                                  client: gwp.Client) -> None:
    procs.worker(broker, "py", "svc.a", capacity=2, idempotent=True, label="a1")
    procs.worker(broker, "c", "svc.a", capacity=3, idempotent=True, label="a2")
    procs.worker(broker, "c", "svc.b", capacity=5, label="b1")
    wait_registered(client, "svc.a", 2)
    wait_registered(client, "svc.b", 1)
    reply = client.call("gw.services", b"")
    assert reply is not None and reply.status == 200
    body = unpack(reply.body)
    assert isinstance(body["broker"], str)
    assert isinstance(body["uptime_ms"], int) and body["uptime_ms"] >= 0
    entries = {e["name"]: e for e in body["services"]}
    a, b = entries["svc.a"], entries["svc.b"]
    assert (a["workers"], a["capacity"], a["in_flight"], a["queued"], a["idempotent"]) \
        == (2, 5, 0, 0, True), a
    assert sorted(a["labels"]) == ["a1", "a2"]
    assert (b["workers"], b["capacity"], b["idempotent"], b["labels"]) \
        == (1, 5, False, ["b1"]), b
    assert not any(name.startswith("gw.") for name in entries)


# --------------------------------------------------------------------------
# 7. The tap


def _tap_sub(ctx: zmq.Context, endpoint: str, hwm: int) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, hwm)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    return sub


def test_slow_tap_subscriber_does_not_slow_traffic(procs: Procs, broker: Broker,
                                                   client: gwp.Client) -> None:
    ctx = zmq.Context.instance()
    slow = _tap_sub(ctx, broker.tap, hwm=1)  # subscribes, never reads
    events: List[gwp.TapEvent] = []
    stop = threading.Event()

    def listen() -> None:
        sub = _tap_sub(ctx, broker.tap, hwm=100_000)
        while not stop.is_set():
            if sub.poll(50):
                events.append(gwp.parse_tap(sub.recv_multipart()))
        sub.close(linger=0)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    try:
        procs.worker(broker, "c", "tapecho", capacity=64)
        procs.worker(broker, "c", "tapecho", capacity=64)
        wait_registered(client, "tapecho", 2)
        # Both subscriptions must have reached the broker before the count.
        wait_for(lambda: client.call("tapecho", b"warm") and any(
            e.topic == "tapecho.FINAL" for e in events), 5, "tap subscription")

        total, window, sent = 2000, 200, 0
        rids: List[bytes] = []
        done: Dict[bytes, int] = {}
        start = time.monotonic()
        while len(done) < total and time.monotonic() - start < 30:
            while sent < total and sent - len(done) < window:
                rids.append(client.request("tapecho", b"%d" % sent))
                sent += 1
            msg = client.recv(1000)
            if msg is not None and msg.command == gwp.Command.FINAL:
                done[msg.rid] = msg.status
        elapsed = time.monotonic() - start
        assert len(done) == total, f"only {len(done)}/{total} completed"
        assert set(done.values()) == {200}
        assert elapsed < 15, f"{total} requests took {elapsed:.1f}s with a stuck subscriber"
        wait_for(lambda: sum(e.topic == "tapecho.FINAL" for e in events) > total, 5,
                 "tap events for every FINAL")
    finally:
        stop.set()
        listener.join(timeout=2)
        slow.close(linger=0)

    seqs = [e.seq for e in events]
    assert all(b == a + 1 for a, b in zip(seqs, seqs[1:])), "tap seq jumped or repeated"
    mine = set(rids)
    requests = {e.rid for e in events if e.topic == "tapecho.REQUEST"}
    assert mine <= requests, f"{len(mine - requests)} REQUESTs missing from the tap"
    final_events = [e for e in events if e.topic == "tapecho.FINAL" and e.rid in mine]
    assert len(final_events) == total and {e.status for e in final_events} == {200}
    assert all(e.time_us > 0 for e in events)


def test_aigw_tap_prints_json_events(procs: Procs, broker: Broker,
                                     client: gwp.Client) -> None:
    from conftest import BUILD
    tap_bin = BUILD / "aigw-tap"
    assert tap_bin.exists(), f"{tap_bin} is missing"
    procs.worker(broker, "c", "tapped", capacity=4)
    wait_registered(client, "tapped", 1)
    tap = procs.start("aigw-tap", [str(tap_bin), "--tap", broker.tap, "--json",
                                   "--service", "tapped", "--count", "4",
                                   "--timeout-ms", "8000"])

    def finished() -> bool:
        client.call("tapped", b"x", timeout_ms=1000)
        return not tap.alive
    wait_for(finished, 8, "aigw-tap to print 4 events and exit", interval=0.05)
    tap.popen.wait(timeout=2)
    tap._reader.join(timeout=2)
    lines = [line for line in tap.lines if line.startswith("{")]
    assert tap.popen.returncode == 0, tap.output()
    assert len(lines) == 4, tap.output()
    docs = [json.loads(line) for line in lines]
    assert {d["topic"] for d in docs} <= {"tapped.READY", "tapped.REQUEST", "tapped.FINAL"}
    assert any(d["topic"] == "tapped.REQUEST" for d in docs), docs
    seqs = [d["seq"] for d in docs]
    assert all(b > a for a, b in zip(seqs, seqs[1:])), seqs
    requested = {d["rid"] for d in docs if d["command"] == "REQUEST"}
    # The subscription takes effect a moment after aigw-tap starts (ZeroMQ's
    # slow joiner), so the first call's REQUEST may be missed while its FINAL
    # is seen; calls are sequential, so every FINAL after the first REQUEST
    # seen answers a REQUEST seen.
    first = next(i for i, d in enumerate(docs) if d["command"] == "REQUEST")
    for d in docs:
        assert d["service"] == "tapped" and d["topic"] == f"tapped.{d['command']}", d
    for d in docs[first:]:
        if d["command"] == "FINAL":
            assert d["status"] == 200 and d["rid"] in requested, d


def test_c_client_through_three_c_stages(procs: Procs, broker: Broker,
                                         client: gwp.Client) -> None:
    """The C client session (aigw-busbench) through a slip of C workers."""
    from conftest import BUILD
    for stage, mode in (("cb.a", "forward"), ("cb.b", "forward"), ("cb.c", "echo")):
        procs.worker(broker, "c", stage, mode=mode, capacity=16)
        wait_registered(client, stage, 1)
    bench = procs.start("busbench", [str(BUILD / "aigw-busbench"), "--bus", broker.bus,
                                     "--slip", "cb.a,cb.b,cb.c", "--requests", "3000",
                                     "--concurrency", "8", "--warmup", "100"])
    line = bench.wait_line(r"requests=3000", timeout=30)
    bench.popen.wait(timeout=5)
    assert bench.popen.returncode == 0, bench.output()
    assert " failed=0 " in f" {line} ", line


# --------------------------------------------------------------------------
# 2. Malformed frame sets


def _expect_400(client: gwp.Client, cases: Dict[str, List[bytes]],
                rids: Dict[str, bytes]) -> Dict[str, Any]:
    """Send each case; return the ones not answered by exactly one FINAL 400."""
    for frames in cases.values():
        client.send_frames(frames)
    got = client.collect(list(rids.values()), timeout_ms=2000)
    wrong: Dict[str, Any] = {}
    for name, r in rids.items():
        f = finals(got[r])
        if [m.status for m in f] != [400] or error_code(f[0]) != "bad_frame":
            wrong[name] = [(m.status, unpack(m.body) if m.body else None) for m in f]
    return wrong


def test_malformed_requests_get_400_and_broker_keeps_working(
        procs: Procs, broker: Broker, client: gwp.Client) -> None:
    procs.worker(broker, "c", "sane", capacity=4)
    wait_registered(client, "sane", 1)  # the client is a known peer from here
    hdr = [gwp.SIGNATURE, bytes([gwp.Command.REQUEST])]
    meta = gwp.build_meta(0, 0, 0)
    names = ["short meta", "bad service", "empty service", "missing body", "17 frames"]
    rid = {name: gwp.new_rid() for name in names}
    cases = {
        "short meta": hdr + [rid["short meta"], b"sane", meta[:15], b"", b""],
        "bad service": hdr + [rid["bad service"], b"no spaces!", meta, b"", b""],
        "empty service": hdr + [rid["empty service"], b"", meta, b"", b""],
        "missing body": hdr + [rid["missing body"], b"sane", meta, b""],
        "17 frames": hdr + [rid["17 frames"], b"sane", meta, b"", b""] + [b"x"] * 10,
    }
    wrong = _expect_400(client, cases, rid)
    assert wrong == {}, f"expected exactly one FINAL 400 bad_frame: {wrong}"
    _broker_still_serves(broker, client)


def test_oversized_envelope_gets_400(procs: Procs, broker: Broker,
                                     client: gwp.Client) -> None:
    procs.worker(broker, "c", "sane", capacity=4)
    wait_registered(client, "sane", 1)
    rid = gwp.new_rid()
    frames = gwp.build_request(rid, "sane")
    frames[5] = b"\xc0" * (gwp.ENVELOPE_MAX + 1)  # the bound is 64 KiB (section 2)
    wrong = _expect_400(client, {"huge envelope": frames}, {"huge envelope": rid})
    assert wrong == {}, f"expected exactly one FINAL 400 bad_frame: {wrong}"
    _broker_still_serves(broker, client)


def test_malformed_cancel_and_credit_with_rid_get_400(procs: Procs, broker: Broker,
                                                      client: gwp.Client) -> None:
    """Section 2: any malformed frame set from a client with a readable rid."""
    procs.worker(broker, "c", "sane", capacity=4)
    wait_registered(client, "sane", 1)
    rid = {"short cancel reason": gwp.new_rid(), "long credit": gwp.new_rid()}
    cases = {
        "short cancel reason": [gwp.SIGNATURE, bytes([gwp.Command.CANCEL]),
                                rid["short cancel reason"], b"\x01"],
        "long credit": [gwp.SIGNATURE, bytes([gwp.Command.CREDIT]), rid["long credit"],
                        b"\x00\x00\x00\x00\x01"],
    }
    wrong = _expect_400(client, cases, rid)
    assert wrong == {}, f"expected exactly one FINAL 400 bad_frame: {wrong}"
    _broker_still_serves(broker, client)


def test_garbage_without_rid_is_dropped_and_extra_frames_ignored(
        procs: Procs, broker: Broker, client: gwp.Client) -> None:
    procs.worker(broker, "c", "sane", capacity=4)
    wait_registered(client, "sane", 1)
    # Frame sets without a readable rid are dropped, not answered (a different
    # signature is answered with DISCONNECT, section 8).
    for frames in ([b"GWP2", b"\x02"], [gwp.SIGNATURE, b"\x7f"], [gwp.SIGNATURE],
                   [b""], [gwp.SIGNATURE, b"\x02\x02"],
                   [gwp.SIGNATURE, b"\x02", b"shortrid", b"sane"],
                   [gwp.SIGNATURE, b"\x02", b"r" * 17, b"sane", gwp.build_meta(0, 0, 0),
                    b"", b""]):
        client.send_frames(frames)
    noise = [m for m in client.pump(300) if m.command != gwp.Command.DISCONNECT]
    assert noise == [], f"unexpected replies to rid-less garbage: {noise}"

    # Extra frames beyond the command's are ignored (forward compatibility).
    ok = gwp.new_rid()
    client.send_frames(gwp.build_request(ok, "sane", body=b"extra") + [b"future", b"x"])
    reply = client.recv_final(ok, timeout_ms=2000)
    assert reply is not None and reply.status == 200, reply
    _broker_still_serves(broker, client)


def _broker_still_serves(broker: Broker, client: gwp.Client) -> None:
    assert broker.alive, broker.proc.output() if broker.proc else ""
    for i in range(20):
        reply = client.call("sane", b"%d" % i, timeout_ms=2000)
        assert reply is not None and reply.status == 200


# --------------------------------------------------------------------------
# 3.5.3 Liveness answers to unknown peers


def test_ping_from_unknown_worker_gets_disconnect_client_gets_pong(
        broker: Broker) -> None:
    ctx = zmq.Context.instance()

    def exchange(frames: List[bytes]) -> gwp.Message:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(broker.bus)
        try:
            sock.send_multipart(frames)
            assert sock.poll(2000), f"no answer to {frames}"
            return gwp.parse(sock.recv_multipart())
        finally:
            sock.close(linger=0)

    assert exchange(gwp.build_ping("W")).command == gwp.Command.DISCONNECT
    assert exchange(gwp.build_ping("C")).command == gwp.Command.PONG
    assert exchange(gwp.build_ping()).command == gwp.Command.PONG
    for command in (gwp.Command.FINAL,):
        frames = gwp.build_final(gwp.new_rid(), 200)
        assert exchange(frames).command == gwp.Command.DISCONNECT, command
    partial = gwp.build_partial(gwp.new_rid(), 0, b"x")
    assert exchange(partial).command == gwp.Command.DISCONNECT
