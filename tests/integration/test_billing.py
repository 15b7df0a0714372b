"""aigw-billing under fire: the producer's spool contract (STAGES.md §6.2).

A producer written here in Python keeps every usage event in a spool until
billing acknowledges it (FINAL 200 after COMMIT) and resends unacknowledged
events with back-off. While a few thousand events are in flight, aigw-billing
is killed with SIGKILL several times and restarted. Afterwards the ledger must
hold exactly one row per event, each priced as the documented formula says
(computed here independently, in Python integers), and every user's balance
must equal minus the sum of that user's rows — on SQLite and on PostgreSQL.

PostgreSQL comes from AIGW_TEST_PG_URL (tests/harness/services.sh); without
it the PostgreSQL case is skipped, or FAILS when AIGW_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import msgpack
import pytest

import gwp
from conftest import BUILD, EXPIRY_MS, HEARTBEAT_MS, Broker, Proc, Procs, unpack

EVENTS = 3000
WINDOW = 200  # events in flight at once
#  Kill billing when this share of the events is acknowledged, and restart it
#  after this many seconds. The long pause outlasts the broker's expiry and
#  grace, so the broker answers 503 no_worker and the producer's spool must
#  resend; the short ones leave the broker to re-dispatch (IDEMPOTENT).
KILLS = ((0.12, 0.1), (0.3, 0.0), (0.5, 1.8), (0.7, 0.25))
DEADLINE_MS = 4000  # per attempt
MULTIPLIER_MILLI = 1500  # AIGW_PRICE_MULTIPLIER=1.5
PRICES = {  # USD per 1M tokens, as the price file states them
    "gpt-4o": {"input": "2.50", "output": "10.00", "cached_input": "1.25"},
    "mini": {"input": 0.15, "output": 0.6, "cached_input": 0.075},
}
MICROS = {  # the same, in micro-units per 1M tokens (exact)
    "gpt-4o": (2_500_000, 10_000_000, 1_250_000),
    "mini": (150_000, 600_000, 75_000),
}
USERS = ["u0", "u1", "u2", "u3", "u4"]


def expected_cost(model: str, prompt: int, completion: int, cached: int) -> int:
    """docs/BILLING.md: one rounding, half up, at the end."""
    price_in, price_out, price_cached = MICROS[model]
    raw = (prompt - cached) * price_in + cached * price_cached + completion * price_out
    scaled = raw * MULTIPLIER_MILLI * 1000  # group multiplier 1.0
    return (scaled + 500_000_000_000) // 1_000_000_000_000


def billing_bin() -> Path:
    path = BUILD / "aigw-billing"
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: build it first (make)", pytrace=False)
    return path


# --------------------------------------------------------------------------
# Databases


class Ledger:
    """Reads the ledger and balances of one database."""

    def __init__(self, url: str, sqlite_path: Optional[Path] = None) -> None:
        self.url = url
        self.sqlite_path = sqlite_path

    def _rows(self, sql: str) -> List[Tuple[str, ...]]:
        if self.sqlite_path is not None:
            with sqlite3.connect(str(self.sqlite_path)) as conn:
                return [tuple(str(v) for v in row) for row in conn.execute(sql)]
        out = subprocess.run(["psql", self.url, "-X", "-q", "-A", "-t", "-F", "|", "-c", sql],
                             check=True, capture_output=True, text=True, timeout=30).stdout
        return [tuple(line.split("|")) for line in out.splitlines() if line]

    def ledger(self) -> List[Tuple[str, int, str]]:
        """(rid hex, cost, user) per row."""
        hexed = "lower(hex(request_id))" if self.sqlite_path else "encode(request_id, 'hex')"
        return [(r[0], int(r[1]), r[2]) for r in self._rows(
            f"SELECT {hexed}, cost_micros, user_name FROM usage_ledger")]

    def balances(self) -> Dict[str, int]:
        return {r[0]: int(r[1]) for r in self._rows("SELECT name, balance_micros FROM users")}


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        path = tmp_path / "var" / "billing.db"
        yield Ledger(f"sqlite://{path}", sqlite_path=path)
        return
    base = os.environ.get("AIGW_TEST_PG_URL", "")
    if not base:
        if os.environ.get("AIGW_REQUIRE_SERVICES") == "1":
            pytest.fail("AIGW_REQUIRE_SERVICES=1 but AIGW_TEST_PG_URL is not set "
                        "(run under tests/harness/services.sh)", pytrace=False)
        pytest.skip("AIGW_TEST_PG_URL not set")
    name = f"aigw_billing_it_{os.getpid()}_{random.randrange(1 << 30)}"
    subprocess.run(["psql", base, "-X", "-q", "-c", f"CREATE DATABASE {name}"], check=True,
                   capture_output=True, timeout=30)
    try:
        yield Ledger(base.rsplit("/", 1)[0] + "/" + name)
    finally:
        subprocess.run(["psql", base, "-X", "-q", "-c",
                        f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
                       capture_output=True, timeout=30)


# --------------------------------------------------------------------------
# The producer


class Producer:
    """Spools usage events and resends each until billing acknowledges it.

    One attempt per event is in flight at a time, each with a fresh GWP
    request id (the event's own rid, in the body, is the idempotency key).
    A FINAL other than 200 — 502 worker lost, 503 no worker, 504 — or no
    FINAL by the deadline schedules a resend with exponential back-off.
    A 400 would be permanent; here it fails the test.
    """

    def __init__(self, client: gwp.Client, events: Dict[bytes, bytes]) -> None:
        self.client = client
        self.spool: Dict[bytes, bytes] = dict(events)  # rid -> body, until acked
        self.tries: Counter = Counter()
        self.retry_at: Dict[bytes, float] = {rid: 0.0 for rid in events}
        self.inflight: Dict[bytes, Tuple[bytes, float]] = {}  # grid -> (rid, sent at)
        self.busy: set = set()  # rids with an attempt in flight
        self.acks: Dict[bytes, Tuple[int, bool]] = {}  # rid -> (cost, duplicate)
        self.statuses: Counter = Counter()
        self.rejected: List[str] = []

    def _retry(self, rid: bytes) -> None:
        self.busy.discard(rid)
        self.tries[rid] += 1
        self.retry_at[rid] = time.monotonic() + min(0.05 * 2 ** (self.tries[rid] - 1), 1.0)

    def send(self) -> None:
        now = time.monotonic()
        for rid in list(self.spool):
            if len(self.inflight) >= WINDOW:
                break
            if rid in self.busy or self.retry_at[rid] > now:
                continue
            grid = self.client.request("billing", self.spool[rid], deadline_ms=DEADLINE_MS)
            self.inflight[grid] = (rid, now)
            self.busy.add(rid)

    def receive(self) -> None:
        msg = self.client.recv(timeout_ms=20)
        while msg is not None:
            if msg.command == gwp.Command.FINAL and msg.rid in self.inflight:
                rid, _ = self.inflight.pop(msg.rid)
                self.statuses[msg.status] += 1
                if msg.status == 200:
                    body = unpack(msg.body)
                    self.acks[rid] = (body["cost"], body["duplicate"])
                    self.spool.pop(rid, None)
                    self.busy.discard(rid)
                elif msg.status == 400:
                    self.rejected.append(repr(unpack(msg.body)))
                    self.spool.pop(rid, None)
                    self.busy.discard(rid)
                else:
                    self._retry(rid)
            msg = self.client.recv(timeout_ms=0)
        # An attempt that got no FINAL at all by its deadline is lost.
        limit = time.monotonic() - DEADLINE_MS / 1000 - 1.0
        for grid, (rid, sent) in list(self.inflight.items()):
            if sent < limit:
                del self.inflight[grid]
                self.statuses["lost"] += 1
                self._retry(rid)


BATCH = 64  # events per batch request of the batch producer


def batch_body(bodies: List[bytes]) -> bytes:
    """{events: [...]}: the spooled event bodies appended as they are."""
    packer = msgpack.Packer(use_bin_type=True)
    return (packer.pack_map_header(1) + packer.pack("events")
            + packer.pack_array_header(len(bodies)) + b"".join(bodies))


class BatchProducer(Producer):
    """The same spool, sending what is due as batches ({events: [...]}).

    Each attempt is one request for up to BATCH events; the FINAL's
    {results: [...]} acknowledges, refuses or reschedules each event on its
    own, and a failed or lost attempt reschedules all of its events, which
    go out again in whatever batch is next (STAGES.md §6.2, "Batches").
    """

    def __init__(self, client: gwp.Client, events: Dict[bytes, bytes]) -> None:
        super().__init__(client, events)
        self.batches: Dict[bytes, Tuple[List[bytes], float]] = {}  # grid -> (rids, sent)
        self.inflight = self.batches  # type: ignore[assignment]  # what the test checks
        self.requests = 0

    def send(self) -> None:
        now = time.monotonic()
        due = [rid for rid in self.spool
               if rid not in self.busy and self.retry_at[rid] <= now]
        while due and len(self.batches) < WINDOW // BATCH:
            group, due = due[:BATCH], due[BATCH:]
            grid = self.client.request("billing", batch_body([self.spool[r] for r in group]),
                                       deadline_ms=DEADLINE_MS)
            self.batches[grid] = (group, now)
            self.busy.update(group)
            self.requests += 1

    def receive(self) -> None:
        msg = self.client.recv(timeout_ms=20)
        while msg is not None:
            if msg.command == gwp.Command.FINAL and msg.rid in self.batches:
                group, _ = self.batches.pop(msg.rid)
                self.statuses[msg.status] += 1
                if msg.status == 200:
                    results = unpack(msg.body)["results"]
                    assert len(results) == len(group)
                    for rid, result in zip(group, results):
                        self.statuses[f"item {result['status']}"] += 1
                        if result["status"] == 200:
                            self.acks[rid] = (result["cost"], result["duplicate"])
                            self.spool.pop(rid, None)
                            self.busy.discard(rid)
                        elif result["status"] == 400:
                            self.rejected.append(repr(result))
                            self.spool.pop(rid, None)
                            self.busy.discard(rid)
                        else:
                            self._retry(rid)
                else:
                    assert msg.status != 400, unpack(msg.body)
                    for rid in group:
                        self._retry(rid)
            msg = self.client.recv(timeout_ms=0)
        limit = time.monotonic() - DEADLINE_MS / 1000 - 1.0
        for grid, (group, sent) in list(self.batches.items()):
            if sent < limit:
                del self.batches[grid]
                self.statuses["lost"] += 1
                for rid in group:
                    self._retry(rid)


def make_events(count: int) -> Tuple[Dict[bytes, bytes], Dict[bytes, Tuple[str, int]]]:
    """count events: rid -> msgpack body, and rid -> (user, expected cost)."""
    rng = random.Random(4)
    bodies: Dict[bytes, bytes] = {}
    truth: Dict[bytes, Tuple[str, int]] = {}
    for i in range(count):
        rid = os.urandom(16)
        model = "gpt-4o" if i % 3 else "mini"
        prompt = rng.randrange(1, 20000)
        cached = rng.randrange(0, prompt + 1) if i % 4 == 0 else 0
        completion = rng.randrange(0, 4000)
        user = USERS[i % len(USERS)]
        event = {"rid": rid, "ts": gwp.now_ms(), "key": f"k{i % 7:07d}", "user": user,
                 "group": "default", "model": model, "channel": "ch-a",
                 "prompt_tokens": prompt, "completion_tokens": completion,
                 "cached_tokens": cached, "estimated": i % 17 == 0,
                 "status": 200 if i % 23 else 499, "hold": 1000 if i % 10 == 0 else 0}
        bodies[rid] = msgpack.packb(event, use_bin_type=True)
        truth[rid] = (user, expected_cost(model, prompt, completion, cached))
    return bodies, truth


# --------------------------------------------------------------------------
# The test


@pytest.mark.parametrize("form", ["single", "batch"])
def test_billing_survives_sigkill(procs: Procs, broker: Broker, database: Ledger,
                                  tmp_path: Path, form: str) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    env = {"AIGW_BUS": broker.bus, "DATABASE_URL": database.url,
           "AIGW_PRICES_FILE": str(prices), "AIGW_PRICE_MULTIPLIER": "1.5",
           "AIGW_HEARTBEAT_MS": str(HEARTBEAT_MS), "AIGW_EXPIRY_MS": str(EXPIRY_MS),
           "LOG_LEVEL": "info"}
    starts = 0

    def start_billing() -> Proc:
        nonlocal starts
        starts += 1
        proc = procs.start(f"billing#{starts}", [str(billing_bin())], env)
        proc.wait_line(r"billing: serving on", timeout=15)
        return proc

    billing = start_billing()
    bodies, truth = make_events(EVENTS)
    client = gwp.Client(broker.bus, heartbeat_ms=HEARTBEAT_MS)
    producer = (BatchProducer if form == "batch" else Producer)(client, bodies)
    kills = list(KILLS)
    began = time.monotonic()
    try:
        while producer.spool:
            assert time.monotonic() - began < 45, (
                f"{len(producer.spool)} events never acknowledged; statuses "
                f"{dict(producer.statuses)}; billing output:\n{billing.output()}")
            producer.send()
            if kills and len(producer.acks) >= kills[0][0] * EVENTS:
                _, pause = kills.pop(0)
                assert producer.inflight, "kill with nothing in flight proves little"
                billing.kill(signal.SIGKILL)
                time.sleep(pause)
                billing = start_billing()
            producer.receive()
    finally:
        client.close()
    elapsed = time.monotonic() - began
    billing.stop()

    assert not kills and starts == len(KILLS) + 1
    assert not producer.rejected, producer.rejected[:3]
    assert len(producer.acks) == EVENTS
    #  The spool was needed: some attempts failed and were resent.
    assert sum(producer.tries.values()) > 0, producer.statuses

    rows = database.ledger()
    by_rid = {rid: (cost, user) for rid, cost, user in rows}
    # Exactly one row per event, nothing else.
    assert len(rows) == EVENTS == len(by_rid)
    assert set(by_rid) == {rid.hex() for rid in bodies}
    # Each row priced as documented, and acknowledged with that cost (also
    # when the ack was for a resent duplicate).
    for rid, (user, cost) in truth.items():
        assert by_rid[rid.hex()] == (cost, user)
        assert producer.acks[rid][0] == cost
    # Balances equal minus the sum of each user's rows.
    spent: Counter = Counter()
    for _, cost, user in rows:
        spent[user] += cost
    assert database.balances() == {user: -spent[user] for user in USERS}
    duplicates = sum(1 for _, dup in producer.acks.values() if dup)
    if form == "batch":
        # Batches really went out, and some were resent (a resent batch
        # billed nothing twice: one row per event, checked above).
        assert producer.requests < EVENTS / 4, producer.requests
    print(f"\n{form}: {EVENTS} events, {len(KILLS)} SIGKILLs, {elapsed:.1f}s, "
          f"statuses {dict(producer.statuses)}, duplicate acks {duplicates}")


def test_batch_results_per_event(procs: Procs, broker: Broker, tmp_path: Path) -> None:
    """A batch is answered once, one result per event in order: a bad event
    is refused alone, the others are recorded; the same batch resent (a
    lost FINAL) is acknowledged as duplicates with the first costs and
    bills nothing twice; a malformed container is a whole 400; and the
    single-event form still works beside it."""
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    path = tmp_path / "var" / "billing.db"
    database = Ledger(f"sqlite://{path}", sqlite_path=path)
    env = {"AIGW_BUS": broker.bus, "DATABASE_URL": database.url,
           "AIGW_PRICES_FILE": str(prices), "AIGW_PRICE_MULTIPLIER": "1.5",
           "AIGW_BILLING_BATCH_MAX": "16",  # a batch of 40 spans transactions
           "AIGW_HEARTBEAT_MS": str(HEARTBEAT_MS), "AIGW_EXPIRY_MS": str(EXPIRY_MS)}
    billing = procs.start("billing", [str(billing_bin())], env)
    billing.wait_line(r"billing: serving on", timeout=15)
    bodies, truth = make_events(40)
    rids = list(bodies)
    bad = 17  # cached_tokens > prompt_tokens: invalid, refused alone
    event = unpack(bodies[rids[bad]])
    event["cached_tokens"] = event["prompt_tokens"] + 1
    items = [msgpack.packb(event, use_bin_type=True) if i == bad else bodies[r]
             for i, r in enumerate(rids)]
    items.append(msgpack.packb(["not", "a", "map"]))  # refused alone as well
    with gwp.Client(broker.bus, heartbeat_ms=HEARTBEAT_MS) as client:
        for attempt in range(2):
            reply = client.call("billing", batch_body(items), timeout_ms=10000)
            assert reply is not None and reply.status == 200
            results = unpack(reply.body)["results"]
            assert len(results) == len(items)
            for i, rid in enumerate(rids):
                if i == bad:
                    assert results[i]["status"] == 400
                    assert "cached_tokens" in results[i]["error"]
                    continue
                assert results[i] == {"status": 200, "cost": truth[rid][1],
                                      "duplicate": attempt == 1}, (i, results[i])
            assert results[-1]["status"] == 400
        # Exactly one row per good event, after two deliveries of the batch.
        rows = {rid: cost for rid, cost, _ in database.ledger()}
        assert rows == {r.hex(): truth[r][1] for i, r in enumerate(rids) if i != bad}
        # The single form, beside it.
        single_bodies, single_truth = make_events(1)
        (rid, body), = single_bodies.items()
        reply = client.call("billing", body, timeout_ms=10000)
        assert reply is not None and reply.status == 200
        assert unpack(reply.body) == {"cost": single_truth[rid][1], "duplicate": False}
        # Malformed containers: one 400 for the request, nothing recorded.
        for raw in (b"\x81\xa6events\xa1x", b"\x81\xa6events\x90",
                    b"\x81\xa6events\x92\x80", b"\x81\xa6events\xdd\xff\xff\xff\xff"):
            reply = client.call("billing", raw, timeout_ms=10000)
            assert reply is not None and reply.status == 400, raw
            assert unpack(reply.body)["error"]["code"] == "invalid_usage_batch"
        assert len(database.ledger()) == len(rids) - 1 + 1
    billing.stop()
