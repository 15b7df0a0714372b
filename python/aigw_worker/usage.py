"""The usage event producer (proto/STAGES.md §6.2) for Python workers.

A worker that is a backend (a ``model.*`` worker) sends one usage event per
request it served to service ``billing``: a GWP/1 REQUEST whose body is the
event map. ``UsageProducer`` is the GWP/1 *client* for that, on its own
DEALER connection to the broker, driven by the worker's loop (``Worker``
polls its socket and runs its timers; see ``Worker.attach``), so it never
blocks the request path and needs no thread.

The spool (in memory): every submitted event is kept, keyed by its ``rid``
(billing's idempotency key), until billing answers it:

* FINAL 200 — the acknowledgement (billing answers only after COMMIT): the
  event is dropped from the spool and never sent again.
* FINAL 400 — malformed, it will never be accepted: dropped and logged.
* anything else — 5xx, the broker's 503 ``no_worker`` (no billing worker
  within its grace), 504, no answer by the attempt's deadline, a lost
  broker — keep it and resend after a back-off that doubles per attempt
  (``backoff_min_ms`` .. ``backoff_max_ms``). Each attempt is a new GWP
  request id with the same body (same ``rid``), so billing's idempotency
  makes a resend of an event it did commit a harmless duplicate.

Bounded: at most ``max_events`` events are kept (default 10 000, env
``AIGW_BILLING_SPOOL_MAX``). Money must not be lost, so the spool is never
trimmed: the producer's user applies backpressure instead — the model
service refuses new billed requests with 503 ``usage_spool_full`` while
the events owed plus its requests in flight reach the bound (``room``),
like the bridge (docs/BILLING.md). Only if a caller submits anyway is an
event refused: ``submit`` returns False, the event is logged at ERROR level
as one JSON line (``usage event dropped (spool full): {...}``, enough to
bill it by hand) and counted in ``stats()["dropped_full"]``. At most
``inflight_max`` events are outstanding at once.

The spool is in memory only: events not yet acknowledged when the process
exits are lost (logged at shutdown with their count). The C bridge keeps a
spool file for that; a model worker's requests are slow enough that the
window is small, and the ratelimit holds of such requests expire on their
own (§6.3).

Session rules (PROTOCOL.md §3.5, client side): PING (role C) when nothing
was sent or heard for ``heartbeat``; PONG to PING; a broker silent for
``expiry``, a DISCONNECT or the TCP connection dropping fail the outstanding
attempts (they are resent) and reconnect on a fresh socket after 1 s, 2 s,
4 s ... 32 s (reset by any answer). A request past its deadline is
cancelled (CANCEL reason 504) and resent later.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import zmq

from . import protocol as gwp
from .protocol import Command, Envelope

log = logging.getLogger("aigw.usage")

SPOOL_MAX_DEFAULT = 10_000


@dataclass
class _Event:
    rid: bytes
    body: bytes
    summary: Dict[str, Any]
    attempts: int = 0
    due: float = 0.0  # monotonic time of the next attempt
    grid: Optional[bytes] = None  # GWP request id of the attempt in flight
    deadline: float = 0.0  # monotonic deadline of that attempt


def _summary(event: Dict[str, Any]) -> Dict[str, Any]:
    """The event as JSON-safe values (rid in hex), for logs."""
    out: Dict[str, Any] = {}
    for key, value in event.items():
        out[key] = value.hex() if isinstance(value, (bytes, bytearray)) else value
    return out


class UsageProducer:
    """A GWP/1 client that delivers usage events to ``service`` exactly once
    (with billing's idempotency), from an in-memory bounded spool."""

    def __init__(self, endpoint: str, service: str = "billing",
                 max_events: int = SPOOL_MAX_DEFAULT, timeout_ms: int = 5000,
                 backoff_min_ms: int = 100, backoff_max_ms: int = 5000,
                 heartbeat_ms: int = 1000, expiry_ms: int = 3000,
                 reconnect_min_ms: int = 1000, reconnect_max_ms: int = 32000,
                 inflight_max: int = 256, ctx: Optional[zmq.Context] = None) -> None:
        if not gwp.service_valid(service):
            raise ValueError(f"invalid service name {service!r}")
        self.endpoint = endpoint
        self.service = service
        self.max_events = max(1, max_events)
        self.attempt_timeout = timeout_ms / 1000
        self.backoff_min = backoff_min_ms / 1000
        self.backoff_max = max(backoff_min_ms, backoff_max_ms) / 1000
        self.heartbeat = heartbeat_ms / 1000
        self.expiry = max(expiry_ms, 2 * heartbeat_ms) / 1000
        self.reconnect_min = reconnect_min_ms / 1000
        self.reconnect_max = reconnect_max_ms / 1000
        self.inflight_max = max(1, inflight_max)
        self.ctx = ctx or zmq.Context.instance()
        self.spool: "collections.OrderedDict[bytes, _Event]" = collections.OrderedDict()
        self.inflight: Dict[bytes, _Event] = {}  # grid -> event
        #  (due, n, rid) of events waiting for an attempt; stale entries (the
        #  event was acked, or rescheduled) are skipped when popped.
        self._due: List[Any] = []
        self._order = itertools.count()
        self.sock: Optional[zmq.Socket] = None
        self.monitor: Optional[zmq.Socket] = None
        self.reconnect_at: Optional[float] = None
        self.reconnect_backoff = self.reconnect_min
        self.last_send = self.last_recv = self.last_ping = 0.0
        self.closed = False
        self.counters = {"submitted": 0, "sent": 0, "acked": 0, "duplicates": 0,
                         "rejected": 0, "retries": 0, "dropped_full": 0, "reconnects": 0}

    # -- the producer's API ---------------------------------------------------

    def submit(self, event: Dict[str, Any]) -> bool:
        """Spool one event (a §6.2 map with a 16-byte ``rid``) and send it as
        soon as possible. False if the spool is full (the event is logged
        and dropped) or an event with this rid is already spooled."""
        rid = event.get("rid")
        if not isinstance(rid, (bytes, bytearray)) or len(rid) != gwp.RID_SIZE:
            raise ValueError("usage event needs a 16-byte rid")
        rid = bytes(rid)
        if rid in self.spool:
            return False
        summary = _summary(event)
        if len(self.spool) >= self.max_events:
            self.counters["dropped_full"] += 1
            log.error("usage event dropped (spool full, %d events): %s", len(self.spool),
                      json.dumps(summary, sort_keys=True))
            return False
        ev = self.spool[rid] = _Event(rid, gwp.packb(event), summary, due=time.monotonic())
        heapq.heappush(self._due, (ev.due, next(self._order), rid))
        self.counters["submitted"] += 1
        if self.sock is None and self.reconnect_at is None and not self.closed:
            self._connect()
        self._send_due(time.monotonic())
        return True

    def room(self, reserved: int = 0) -> bool:
        """True if ``reserved`` more events (e.g. requests in flight that
        will each submit one) still fit after the ones kept."""
        return len(self.spool) + reserved <= self.max_events

    @property
    def pending(self) -> int:
        """Events kept (not acknowledged yet)."""
        return len(self.spool)

    def stats(self) -> Dict[str, int]:
        out = dict(self.counters)
        out["pending"] = len(self.spool)
        out["inflight"] = len(self.inflight)
        return out

    # -- the loop's side (Worker.attach) ----------------------------------------

    def sockets(self) -> List[zmq.Socket]:
        """Sockets to poll for input (they change on reconnect)."""
        return [s for s in (self.sock, self.monitor) if s is not None]

    def on_ready(self, ready: Any) -> bool:
        """Handle input on the sockets in ready (a set or the poller's dict);
        True if anything was received."""
        did = False
        if self.monitor is not None and self.monitor in ready:
            try:
                self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self._lost("connection dropped")
            return True
        if self.sock is not None and self.sock in ready:
            for _ in range(1000):
                if self.sock is None:
                    break
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.ZMQError:
                    break
                did = True
                self._handle(frames)
        return did

    def timeout(self, now: float) -> float:
        """Seconds until the next timer (resend, deadline, heartbeat)."""
        if self.closed:
            return 60.0
        due = now + 60.0
        if self.sock is None:
            if self.reconnect_at is not None:
                due = min(due, self.reconnect_at)
        else:
            due = min(due, max(self.last_ping, min(self.last_send, self.last_recv))
                      + self.heartbeat, self.last_recv + self.expiry)
            if len(self.inflight) < self.inflight_max and self._due:
                due = min(due, self._due[0][0])
            for ev in self.inflight.values():
                due = min(due, ev.deadline)
        return max(0.0, due - now)

    def tick(self, now: Optional[float] = None) -> None:
        """Run the timers: reconnect, heartbeat, expiry, deadlines, resends."""
        if self.closed:
            return
        now = time.monotonic() if now is None else now
        if self.sock is None:
            if self.reconnect_at is not None and now >= self.reconnect_at:
                self._connect()
            return
        if now - self.last_recv >= self.expiry:
            self._lost("broker silent")
            return
        if now - self.last_ping >= self.heartbeat and (
                now - self.last_send >= self.heartbeat or now - self.last_recv >= self.heartbeat):
            if self._send(gwp.build_ping("C")):
                self.last_ping = now
        for grid, ev in list(self.inflight.items()):
            if now >= ev.deadline:
                self._send(gwp.build_cancel(grid, 504))
                self._retry(ev, "no answer by the deadline")
        self._send_due(now)

    def close(self) -> None:
        """Close the connection; unacknowledged events are logged and lost."""
        if self.spool:
            log.warning("usage producer closing with %d unacknowledged events",
                        len(self.spool))
            for ev in self.spool.values():
                log.warning("usage event not delivered: %s", json.dumps(ev.summary,
                                                                          sort_keys=True))
        self.closed = True
        self._close_socket()

    # -- internals ------------------------------------------------------------------

    def _connect(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDTIMEO, 0)
        sock.setsockopt(zmq.RCVTIMEO, 0)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        sock.setsockopt(zmq.HEARTBEAT_TTL, 3000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.connect(self.endpoint)
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock = sock
        self.reconnect_at = None
        now = time.monotonic()
        self.last_recv = self.last_send = now
        self.last_ping = 0.0

    def _close_socket(self) -> None:
        if self.sock is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            if self.monitor is not None:
                self.monitor.close(linger=0)
            self.sock.close(linger=0)
        self.sock = None
        self.monitor = None

    def _lost(self, why: str) -> None:
        log.warning("usage producer reconnects (%s): %d outstanding, %d spooled", why,
                    len(self.inflight), len(self.spool))
        self.counters["reconnects"] += 1
        for ev in list(self.inflight.values()):
            self._retry(ev, why)
        self._close_socket()
        self.reconnect_at = time.monotonic() + self.reconnect_backoff
        self.reconnect_backoff = min(self.reconnect_backoff * 2, self.reconnect_max)

    def _send(self, frames: List[bytes]) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        self.last_send = time.monotonic()
        return True

    def _send_due(self, now: float) -> None:
        if self.sock is None:
            return
        retry: List[_Event] = []
        while self._due and len(self.inflight) < self.inflight_max:
            due, _, rid = self._due[0]
            if due > now:
                break
            heapq.heappop(self._due)
            ev = self.spool.get(rid)
            if ev is None or ev.grid is not None or ev.due != due:
                continue  # stale
            grid = gwp.new_rid()
            deadline_ms = gwp.now_ms() + int(self.attempt_timeout * 1000)
            env = Envelope(id=grid, slip=[self.service], cur=0, dl=deadline_ms)
            frames = gwp.build_request(grid, self.service, deadline_ms, 0, 0, env.encode(),
                                       ev.body)
            ev.attempts += 1
            if not self._send(frames):
                #  Not connected yet (ZMQ_IMMEDIATE) or the pipe is full: the
                #  attempt failed at once; back off like any failure.
                retry.append(ev)
                continue
            ev.grid = grid
            ev.deadline = now + self.attempt_timeout
            self.inflight[grid] = ev
            self.counters["sent"] += 1
        for ev in retry:
            self._schedule(ev, now)

    def _schedule(self, ev: _Event, now: float) -> None:
        delay = min(self.backoff_max, self.backoff_min * (2 ** min(ev.attempts - 1, 30)))
        ev.due = now + delay
        heapq.heappush(self._due, (ev.due, next(self._order), ev.rid))

    def _retry(self, ev: _Event, why: str) -> None:
        if ev.grid is not None:
            self.inflight.pop(ev.grid, None)
            ev.grid = None
        if ev.rid not in self.spool:
            return
        self.counters["retries"] += 1
        self._schedule(ev, time.monotonic())
        log.debug("usage event %s: %s; attempt %d again in %.2fs", ev.rid.hex(), why,
                  ev.attempts + 1, ev.due - time.monotonic())

    def _handle(self, frames: List[bytes]) -> None:
        self.last_recv = time.monotonic()
        self.reconnect_backoff = self.reconnect_min
        try:
            msg = gwp.parse(frames)
        except gwp.Malformed:
            return
        if msg.command == Command.PING:
            self._send(gwp.build_pong())
        elif msg.command == Command.DISCONNECT:
            self._lost("DISCONNECT")
        elif msg.command == Command.FINAL:
            ev = self.inflight.pop(msg.rid, None)
            if ev is None:
                return  # a late answer to an attempt already given up
            ev.grid = None
            if msg.status == 200:
                self.spool.pop(ev.rid, None)
                self.counters["acked"] += 1
                try:
                    reply = gwp.unpackb(msg.body) if msg.body else None
                except ValueError:
                    reply = None
                if isinstance(reply, dict) and reply.get("duplicate"):
                    self.counters["duplicates"] += 1
            elif msg.status == 400:
                self.spool.pop(ev.rid, None)
                self.counters["rejected"] += 1
                log.error("usage event rejected by %s (400, dropped): %s; event %s",
                          self.service, _error_message(msg.body),
                          json.dumps(ev.summary, sort_keys=True))
            else:
                self._retry(ev, f"status {msg.status}")


def _error_message(body: bytes) -> str:
    try:
        obj = gwp.unpackb(body)
        return str(obj["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return "(no message)"
