"""The GWP/1 worker session and a cooperative event loop for Python handlers.

A ``Worker`` joins the bus with one DEALER connection per service (PROTOCOL.md
section 1: a process that serves several services opens one connection per
service) and runs them all from one thread with ``zmq.Poller``: no asyncio,
no threads on the hot path.

Handlers
    A handler takes a ``Request`` and either returns a ``Final`` (or None for
    an empty FINAL 200), or is a *generator*: every ``bytes`` it yields is one
    PARTIAL (a stream chunk), ``None`` yields the loop to other requests, and
    its return value is the ``Final``. Raising ``HandlerError`` ends the
    request with an error FINAL (OpenAI error object); any other exception is
    logged and answered with FINAL 500. Because handlers give control back at
    every yield, one thread interleaves many requests, and the loop honours
    CANCEL, deadlines and stream credit between yields: a generator whose
    chunk cannot be sent (window exhausted) is not resumed until CREDIT
    arrives; a cancelled or expired one is closed (``GeneratorExit`` runs its
    ``finally`` clauses, which is where a handler frees what it holds).

Session rules implemented here (PROTOCOL.md section 3):
    * READY with capacity (and the IDEMPOTENT flag) as the first frame set on
      every connection, retried until the socket accepts it (ZMQ_IMMEDIATE).
    * Registration is *confirmed* by the broker's first frame set on that
      connection after READY (GWP/1 has no READY acknowledgement): READY is
      followed at once by a PING (role W), which a broker that registered
      the worker answers with PONG and one that did not with DISCONNECT
      (3.5.3); frame sets on a connection arrive in order, so any message
      but DISCONNECT means READY was processed and the service is
      dispatchable (it is in ``gw.services``). ``registered(service)`` and
      the ``on_registered`` callback of ``add_service`` report it.
    * A REQUEST beyond capacity gets FINAL 503 ``over_capacity``.
    * PING (role W) when nothing was sent, or nothing heard, for
      ``heartbeat`` (at most one per heartbeat); PING answered with PONG.
    * DISCONNECT from the broker, broker silence for ``expiry``, or the TCP
      connection dropping (socket monitor) abandon the session's requests
      (their generators are closed) and reconnect on a fresh socket after a
      back-off of 1 s, 2 s, 4 s ... 32 s, reset by a successful exchange.
    * PARTIALs only for STREAM requests, at most ``window`` + CREDIT of them.
      The first PARTIAL of a request carries the envelope the request came
      with, annotated with ``req.ann`` (frame 5, section 2), so the client
      can send a stream's response headers (``ann.headers``: ratelimit's
      x-ratelimit-*; ``ann.channel``) before its first byte, as the FINAL
      envelope gives them for other responses.
    * CANCEL stops the handler and answers FINAL 499; a passed deadline stops
      it and answers FINAL 504 ``deadline_exceeded``.
    * ``stop()`` / ``remove_service()`` drain (new requests get 503
      ``draining``) and then send DISCONNECT.

Other threads (a model loader, a downloader) talk to the loop only through
``call_soon``, which wakes the poller through a self-pipe.

Failure: nothing here asserts on bytes from the network; malformed frame sets
are counted and dropped.
"""

from __future__ import annotations

import collections
import logging
import os
import socket as pysocket
import struct
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Generator, Iterator, List, Optional, Union

import zmq

from . import protocol as gwp
from .protocol import Command, Envelope, Message

log = logging.getLogger("aigw.worker")

#  What a generator handler may yield: a chunk (one PARTIAL) or None (yield
#  the loop).
Chunk = Optional[bytes]
HandlerResult = Union["Final", None, Iterator[Chunk]]
Handler = Callable[["Request"], HandlerResult]


class HandlerError(Exception):
    """Raise from a handler to end the request with an error FINAL."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param


@dataclass
class Final:
    """The FINAL a handler ends with.

    ``ann`` is merged into the request envelope's ``ann`` map, and the
    envelope (with this stage's timing appended) goes back in the FINAL, so
    stages after us (the edge, billing) read e.g. ``ann.usage`` there.
    """

    status: int = 200
    body: bytes = b""
    ann: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def msgpack(cls, obj: Any, status: int = 200, **ann: Any) -> "Final":
        """A msgpack body (the default body encoding on the bus)."""
        return cls(status, gwp.packb(obj), dict(ann))

    @classmethod
    def json(cls, raw: bytes, status: int = 200, **ann: Any) -> "Final":
        """Raw JSON bytes, marked ``ann.ctype = "json"`` so the edge sends them as is."""
        ann = dict(ann)
        ann["ctype"] = "json"
        return cls(status, raw, ann)

    @classmethod
    def error(cls, status: int, message: str, type_: str = "invalid_request_error",
              code: Optional[str] = None, param: Optional[str] = None) -> "Final":
        """An error FINAL whose body is the OpenAI error object (msgpack)."""
        return cls(status, gwp.error_body(message, type_, code, param))


class Request:
    """One request handed to a handler. Read-only for handlers except ``ann``."""

    def __init__(self, service: str, msg: Message) -> None:
        self.service = service
        self.rid = msg.rid
        self.deadline = msg.deadline  # unix ms, 0 = none
        self.window = msg.window
        self.flags = msg.flags
        self.stream = msg.stream
        self.body = msg.body
        self.raw_envelope = msg.envelope
        self.received_us = gwp.now_us()
        self.cancelled = False
        self.cancel_reason = 0
        #  Annotations added to the FINAL envelope, whatever the outcome.
        self.ann: Dict[str, Any] = {}
        #  Handler scratch space, read by the service's on_end callback.
        self.state: Dict[str, Any] = {}
        #  Set when the request ends: the FINAL's status (502 when abandoned
        #  by a lost connection) and the ann of the handler's Final.
        self.status: Optional[int] = None
        self.final_ann: Dict[str, Any] = {}
        self._envelope: Optional[Envelope] = None
        self._obj: Any = None
        self._obj_done = False

    @property
    def rid_hex(self) -> str:
        return self.rid.hex()

    def envelope(self) -> Envelope:
        """The decoded envelope (an empty one if the frame was empty).

        Raises HandlerError 400 ``bad_envelope`` for an invalid envelope.
        """
        if self._envelope is None:
            if not self.raw_envelope:
                self._envelope = Envelope(id=self.rid)
            else:
                try:
                    self._envelope = Envelope.decode(self.raw_envelope)
                except ValueError as exc:
                    raise HandlerError(400, f"bad envelope: {exc}", code="bad_envelope") from None
        return self._envelope

    @property
    def op(self) -> Optional[str]:
        """``ann.op`` from the envelope (chat, completions, embeddings, ...)."""
        op = self.envelope().ann.get("op")
        return op if isinstance(op, str) else None

    def obj(self) -> Any:
        """The body decoded as msgpack (None if empty); HandlerError 400 if invalid."""
        if not self._obj_done:
            if self.body:
                try:
                    self._obj = gwp.unpackb(self.body)
                except ValueError as exc:
                    raise HandlerError(400, f"request body is not msgpack: {exc}",
                                       code="bad_body") from None
            self._obj_done = True
        return self._obj

    def time_left(self) -> Optional[float]:
        """Seconds until the deadline, None without one."""
        if not self.deadline:
            return None
        return (self.deadline - gwp.now_ms()) / 1000


@dataclass
class _Task:
    """A request in progress on one session."""

    req: Request
    gen: Optional[Generator[Chunk, None, Any]]
    credit: Optional[int]  # None: unlimited window
    seq: int = 0
    pending: Optional[bytes] = None  # a chunk waiting for stream credit
    dropped: int = 0  # chunks yielded for a non-stream request


class _Session:
    """One DEALER connection registered for one service."""

    def __init__(self, worker: "Worker", service: str, handler: Handler, capacity: int,
                 idempotent: bool, label: str) -> None:
        self.worker = worker
        self.service = service
        self.handler = handler
        self.capacity = capacity
        self.flags = gwp.READY_IDEMPOTENT if idempotent else 0
        self.label = label
        self.tasks: Dict[bytes, _Task] = {}
        self.sock: Optional[zmq.Socket] = None
        self.monitor: Optional[zmq.Socket] = None
        self.ready_pending = False
        self.exchanged = False  # heard something on this connection
        self.backoff = worker.reconnect_min
        self.reconnect_at: Optional[float] = None
        self.last_send = 0.0
        self.last_recv = 0.0
        self.last_ping = 0.0
        self.connects = 0
        self.draining = False
        self.on_removed: Optional[Callable[[], None]] = None
        self.on_registered: Optional[Callable[[], None]] = None
        self.on_end: Optional[Callable[[Request], None]] = None
        self.registered = False  # the broker confirmed READY on this connection
        self.closed = False

    # -- connection ---------------------------------------------------------

    def connect(self) -> None:
        ctx = self.worker.ctx
        sock = ctx.socket(zmq.DEALER)
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
        sock.connect(self.worker.endpoint)
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock = sock
        self.connects += 1
        self.exchanged = False
        self.registered = False
        self.ready_pending = True
        self.reconnect_at = None
        self.last_recv = time.monotonic()
        self.worker._dirty = True
        self.send_ready()

    def send_ready(self) -> None:
        capacity = self.capacity
        if self.send(gwp.build_ready(self.service, capacity, self.flags, self.label)):
            self.ready_pending = False
            self.last_recv = time.monotonic()
            log.info("ready service=%s capacity=%d connect=%d", self.service, capacity,
                     self.connects)
            self.worker._event(f"ready {self.service}")
            if not self.registered and self.send(gwp.build_ping("W")):
                #  The probe: its PONG confirms the registration (see above).
                self.last_ping = time.monotonic()

    def confirm(self) -> None:
        """The broker answered on this connection after READY: registered."""
        if self.registered or self.ready_pending or self.sock is None:
            return
        self.registered = True
        log.info("registered service=%s connect=%d", self.service, self.connects)
        self.worker._event(f"registered {self.service}")
        if self.on_registered is not None:
            try:
                self.on_registered()
            except Exception:  # noqa: BLE001 — a callback must not break the loop
                log.exception("on_registered callback failed service=%s", self.service)

    def close_socket(self) -> None:
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
        self.worker._dirty = True

    def lost(self, why: str) -> None:
        """Abandon every request and reconnect after back-off (3.5.4)."""
        log.warning("reconnect service=%s why=%s in_flight=%d backoff=%.1fs", self.service,
                    why, len(self.tasks), self.backoff)
        self.worker._event(f"reconnect {self.service} {why}")
        for task in list(self.tasks.values()):
            self.worker._close_gen(task)
            self.worker._ended(self, task.req, 502)
        self.tasks.clear()
        self.registered = False
        self.close_socket()
        self.reconnect_at = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, self.worker.reconnect_max)

    def send(self, frames: List[bytes]) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        self.last_send = time.monotonic()
        return True

    # -- timers ---------------------------------------------------------------

    def timeout(self, now: float) -> float:
        """Seconds until this session's next timer."""
        if self.sock is None:
            return max(0.0, (self.reconnect_at or now) - now)
        if self.ready_pending:
            return 0.05
        due = max(self.last_ping, min(self.last_send, self.last_recv)) + self.worker.heartbeat
        due = min(due, self.last_recv + self.worker.expiry)
        return max(0.0, due - now)

    def tick(self, now: float) -> None:
        if self.sock is None:
            if self.reconnect_at is not None and now >= self.reconnect_at and not self.closed:
                self.connect()
            return
        if self.ready_pending:
            self.send_ready()
            if self.ready_pending:
                if now - self.last_recv >= self.worker.expiry:
                    self.lost("no connection")
                return
        if now - self.last_recv >= self.worker.expiry:
            self.lost("broker silent")
            return
        hb = self.worker.heartbeat
        if now - self.last_ping >= hb and (now - self.last_send >= hb
                                           or now - self.last_recv >= hb):
            if self.send(gwp.build_ping("W")):
                self.last_ping = now


class Worker:
    """A GWP/1 worker process: services, their handlers and the event loop.

    Typical use::

        worker = Worker("tcp://127.0.0.1:5555")

        @worker.handler("echo", capacity=4)
        def echo(req):
            for i in range(3):
                yield f"chunk {i}".encode()
            return Final.msgpack({"ok": True})

        worker.run()

    All methods run on the loop's thread, except ``call_soon`` and ``stop``,
    which any thread may call.
    """

    def __init__(self, endpoint: str, label: str = "", heartbeat_ms: int = 1000,
                 expiry_ms: int = 3000, reconnect_min_ms: int = 1000,
                 reconnect_max_ms: int = 32000, body_max: int = gwp.BODY_MAX_DEFAULT,
                 ctx: Optional[zmq.Context] = None,
                 on_event: Optional[Callable[[str], None]] = None) -> None:
        self.endpoint = endpoint
        self.label = label or f"{pysocket.gethostname()}:{os.getpid()}"
        self.heartbeat = heartbeat_ms / 1000
        self.expiry = max(expiry_ms, 2 * heartbeat_ms) / 1000
        self.reconnect_min = reconnect_min_ms / 1000
        self.reconnect_max = reconnect_max_ms / 1000
        self.body_max = body_max
        self.ctx = ctx or zmq.Context.instance()
        self.on_event = on_event
        self.sessions: Dict[str, _Session] = {}
        self.malformed = 0
        self._steps: List[Callable[[], bool]] = []
        self._calls: Deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        self._stop_deadline = 0.0
        self._running = False
        self._dirty = True
        self._poller = zmq.Poller()
        self._attached: List[Any] = []
        self._attached_socks: List[zmq.Socket] = []

    # -- configuration --------------------------------------------------------

    def handler(self, service: str, capacity: int = 1, idempotent: bool = False
                ) -> Callable[[Handler], Handler]:
        """Decorator: register the function as the handler of service."""
        def register(fn: Handler) -> Handler:
            self.add_service(service, fn, capacity, idempotent)
            return fn
        return register

    def add_service(self, service: str, handler: Handler, capacity: int = 1,
                    idempotent: bool = False, label: str = "",
                    on_registered: Optional[Callable[[], None]] = None,
                    on_end: Optional[Callable[[Request], None]] = None) -> None:
        """Register a service (connects at once if the loop is running).

        on_registered runs on the loop thread each time the broker confirms
        the registration (after every (re)connect), see ``registered``.
        on_end(req) runs once for every request the handler was started for,
        when it ends (``req.status``: the FINAL's status — 499 cancelled,
        504 deadline — or 502 when a lost connection abandoned it;
        ``req.final_ann``: the ann of the handler's Final); a usage producer
        hooks in here.
        Raises ValueError for an invalid or duplicate service name or capacity.
        """
        if not gwp.service_valid(service) or service.startswith("gw."):
            raise ValueError(f"invalid service name {service!r}")
        if not 1 <= capacity <= 65535:
            raise ValueError("capacity must be 1..65535")
        if service in self.sessions:
            raise ValueError(f"service {service!r} already registered")
        session = _Session(self, service, handler, capacity, idempotent, label or self.label)
        session.on_registered = on_registered
        session.on_end = on_end
        self.sessions[service] = session
        if self._running:
            session.connect()

    def registered(self, service: str) -> bool:
        """True once the broker has confirmed this service's READY on its
        current connection (False while connecting or reconnecting)."""
        session = self.sessions.get(service)
        return bool(session and session.registered)

    def set_capacity(self, service: str, capacity: int) -> None:
        """Announce a new capacity (a second READY, rule 3.6.6)."""
        session = self.sessions[service]
        session.capacity = max(1, min(65535, capacity))
        if session.sock is not None and not session.ready_pending:
            session.send_ready()

    def remove_service(self, service: str, drain: bool = True,
                       on_removed: Optional[Callable[[], None]] = None) -> bool:
        """Stop serving service: new requests get 503 ``draining``; once the
        in-flight ones end (at once if drain is False: they are abandoned),
        DISCONNECT is sent and the connection closed. Returns False if the
        service is unknown."""
        session = self.sessions.get(service)
        if session is None:
            return False
        session.draining = True
        session.on_removed = on_removed
        if not drain:
            for task in list(session.tasks.values()):
                self._end(session, task, gwp.build_final(
                    task.req.rid, 503, self._final_envelope(task.req, {}),
                    gwp.error_body("service stopped", "server_error", "draining")))
        self._reap(session)
        return True

    def attach(self, component: Any) -> None:
        """Drive a component from this loop (e.g. a ``UsageProducer``): it
        provides ``sockets()`` (polled for input; may change), ``on_ready(
        events) -> bool``, ``timeout(now) -> seconds``, ``tick(now)``,
        ``close()`` and ``pending`` (events still to deliver: at ``stop``
        the loop waits for them at most ``flush_grace`` seconds)."""
        self._attached.append(component)
        self._dirty = True

    #  At stop: how long to wait for attached components' pending work.
    flush_grace = 1.0

    def add_step(self, fn: Callable[[], bool]) -> None:
        """Run fn once per loop iteration; it returns True if it did work (then
        the loop does not sleep). A model engine's batched decode step is one."""
        self._steps.append(fn)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run fn on the loop thread at its next iteration (any thread)."""
        self._calls.append(fn)
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def stop(self, grace: float = 0.0) -> None:
        """Ask the loop to finish (any thread): drain for at most grace seconds,
        then DISCONNECT every session and return from run()."""
        def begin() -> None:
            self._stopping = True
            self._stop_deadline = time.monotonic() + grace
            for session in self.sessions.values():
                session.draining = True
        self.call_soon(begin)

    def in_flight(self, service: Optional[str] = None) -> int:
        """Requests in progress (for one service or all)."""
        if service is not None:
            session = self.sessions.get(service)
            return len(session.tasks) if session else 0
        return sum(len(s.tasks) for s in self.sessions.values())

    def _event(self, text: str) -> None:
        if self.on_event is not None:
            self.on_event(text)

    # -- the loop ---------------------------------------------------------------

    def run(self) -> None:
        """Run until stop(); connects every registered service first."""
        self._running = True
        for session in list(self.sessions.values()):
            if session.sock is None and session.reconnect_at is None:
                session.connect()
        try:
            while True:
                self.run_once()
                if self._stopping and (not any(s.tasks for s in self.sessions.values())
                                       or time.monotonic() >= self._stop_deadline):
                    break
            #  The requests just ended submitted usage events: give them a
            #  moment to be acknowledged (bounded by the grace and flush_grace).
            flush_until = min(self._stop_deadline, time.monotonic() + self.flush_grace)
            while any(getattr(c, "pending", 0) for c in self._attached) and \
                    time.monotonic() < flush_until:
                self.run_once(max_wait=0.05)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for session in list(self.sessions.values()):
            for task in list(session.tasks.values()):
                self._close_gen(task)
                self._ended(session, task.req, 502)
            session.tasks.clear()
            session.send(gwp.build_disconnect())
            if session.sock is not None:
                session.sock.setsockopt(zmq.LINGER, 200)
            session.closed = True
            session.close_socket()
        self.sessions.clear()
        for component in self._attached:
            try:
                component.close()
            except Exception:  # noqa: BLE001
                log.exception("closing %r failed", component)
        self._running = False
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _rebuild_poller(self) -> None:
        self._poller = zmq.Poller()
        self._poller.register(self._wake_r, zmq.POLLIN)
        for session in self.sessions.values():
            if session.sock is not None:
                self._poller.register(session.sock, zmq.POLLIN)
                self._poller.register(session.monitor, zmq.POLLIN)
        self._attached_socks = [sock for c in self._attached for sock in c.sockets()]
        for sock in self._attached_socks:
            self._poller.register(sock, zmq.POLLIN)
        self._dirty = False

    def run_once(self, max_wait: float = 0.25) -> None:
        """One iteration: poll, handle messages, run steps, advance handlers,
        run timers. Public so tests can drive the loop by hand."""
        busy = self._busy
        now = time.monotonic()
        wait = 0.0 if busy else max_wait
        if not busy:
            for session in self.sessions.values():
                wait = min(wait, session.timeout(now))
            if any(s.tasks for s in self.sessions.values()):
                wait = min(wait, 0.01)
            for component in self._attached:
                wait = min(wait, component.timeout(now))
        if not self._dirty and self._attached and self._attached_socks != [
                sock for c in self._attached for sock in c.sockets()]:
            self._dirty = True
        if self._dirty:
            self._rebuild_poller()
        events = dict(self._poller.poll(int(wait * 1000)))
        if self._wake_r in events:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                log.exception("call_soon callback failed")
        for session in list(self.sessions.values()):
            if session.sock is None:
                continue
            if session.monitor is not None and session.monitor in events:
                try:
                    session.monitor.recv_multipart(zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
                session.lost("connection dropped")
                continue
            if session.sock in events:
                self._drain(session)
        for component in self._attached:
            try:
                component.on_ready(events)
            except Exception:  # noqa: BLE001
                log.exception("component input failed")
        progressed = False
        for step in self._steps:
            try:
                progressed = bool(step()) or progressed
            except Exception:
                log.exception("step failed")
        for session in list(self.sessions.values()):
            for task in list(session.tasks.values()):
                progressed = self._advance(session, task) or progressed
        now = time.monotonic()
        for session in list(self.sessions.values()):
            session.tick(now)
            self._expire(session)
            self._reap(session)
        for component in self._attached:
            try:
                component.tick(now)
            except Exception:  # noqa: BLE001
                log.exception("component timer failed")
        self._busy = progressed

    _busy = False

    def _drain(self, session: _Session) -> None:
        """Handle every frame set that is ready on the session's socket (up
        to a bound, so one busy socket cannot starve the others)."""
        for _ in range(1000):
            if session.sock is None:
                return
            try:
                frames = session.sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            self._handle(session, frames)

    def _handle(self, session: _Session, frames: List[bytes]) -> None:
        session.last_recv = time.monotonic()
        if not session.exchanged:
            session.exchanged = True
            session.backoff = self.reconnect_min
        try:
            msg = gwp.parse(frames, self.body_max)
        except gwp.Malformed as exc:
            self.malformed += 1
            log.debug("malformed frame set on %s: %s", session.service, exc.reason)
            return
        cmd = msg.command
        if cmd != Command.DISCONNECT and not session.registered:
            session.confirm()
        if cmd == Command.PING:
            session.send(gwp.build_pong())
        elif cmd == Command.PONG:
            pass
        elif cmd == Command.DISCONNECT:
            session.lost("DISCONNECT")
        elif cmd == Command.REQUEST:
            self._start(session, msg)
        elif cmd == Command.CANCEL:
            task = session.tasks.get(msg.rid)
            if task is not None:
                task.req.cancelled = True
                task.req.cancel_reason = msg.reason
                log.info("cancel service=%s rid=%s reason=%d", session.service,
                         msg.rid.hex(), msg.reason)
                self._event(f"cancelled {msg.rid.hex()}")
                self._close_gen(task)
                self._end(session, task, gwp.build_final(
                    msg.rid, 499, self._final_envelope(task.req, {}),
                    gwp.error_body("request cancelled", "gateway_error", "cancelled")))
        elif cmd == Command.CREDIT:
            task = session.tasks.get(msg.rid)
            if task is not None and task.credit is not None:
                task.credit = min(gwp.CREDIT_MAX, task.credit + msg.credit)
                self._busy = True
        else:
            self.malformed += 1  # a command a worker never receives

    # -- requests -------------------------------------------------------------------

    def _start(self, session: _Session, msg: Message) -> None:
        req = Request(session.service, msg)
        if msg.rid in session.tasks:
            self.malformed += 1  # duplicate rid: the broker never does this
            return
        if session.draining:
            session.send(gwp.build_final(msg.rid, 503, self._final_envelope(req, {}),
                                         gwp.error_body(f"{session.service} is stopping",
                                                        "server_error", "draining")))
            return
        if len(session.tasks) >= session.capacity:
            session.send(gwp.build_final(msg.rid, 503, self._final_envelope(req, {}),
                                         gwp.error_body("worker over capacity",
                                                        "gateway_error", "over_capacity")))
            return
        if msg.deadline and gwp.now_ms() >= msg.deadline:
            session.send(gwp.build_final(msg.rid, 504, self._final_envelope(req, {}),
                                         gwp.error_body("deadline passed", "gateway_error",
                                                        "deadline_exceeded")))
            return
        credit = msg.window if (msg.stream and msg.window) else None
        task = _Task(req, None, credit)
        session.tasks[msg.rid] = task
        try:
            result = session.handler(req)
        except Exception as exc:  # noqa: BLE001 — any handler failure becomes a FINAL
            self._fail(session, task, exc)
            return
        if isinstance(result, types.GeneratorType):
            task.gen = result
            self._advance(session, task)
        else:
            self._finish(session, task, result)

    def _advance(self, session: _Session, task: _Task) -> bool:
        """Resume a generator handler once; True if it made progress."""
        if task.req.rid not in session.tasks:
            return False
        if task.pending is not None:
            if not self._send_partial(session, task, task.pending):
                return False  # still waiting for credit
            task.pending = None
            return True
        if task.gen is None:
            return False
        try:
            item = next(task.gen)
        except StopIteration as stop:
            task.gen = None
            self._finish(session, task, stop.value)
            return True
        except Exception as exc:  # noqa: BLE001
            task.gen = None
            self._fail(session, task, exc)
            return True
        if item is None:
            return False
        if not isinstance(item, (bytes, bytearray, memoryview)):
            task.gen.close()
            task.gen = None
            self._fail(session, task, TypeError(f"handler yielded {type(item).__name__}"))
            return True
        if not task.req.stream:
            task.dropped += 1
            return True
        if not self._send_partial(session, task, bytes(item)):
            task.pending = bytes(item)
        return True

    def _send_partial(self, session: _Session, task: _Task, payload: bytes) -> bool:
        if task.credit is not None and task.credit <= 0:
            return False
        head = self._head_envelope(task.req) if task.seq == 0 else b""
        if not session.send(gwp.build_partial(task.req.rid, task.seq, payload, head)):
            return False
        task.seq += 1
        if task.credit is not None:
            task.credit -= 1
        return True

    def _finish(self, session: _Session, task: _Task, result: Any) -> None:
        if result is None:
            result = Final()
        if not isinstance(result, Final):
            self._fail(session, task, TypeError(f"handler returned {type(result).__name__}"))
            return
        if task.pending is not None:
            #  A FINAL is never held back by stream credit (3.2.3); the last
            #  chunk goes first if the window allows, else it is lost.
            self._send_partial(session, task, task.pending)
            task.pending = None
        env = self._final_envelope(task.req, result.ann)
        self._end(session, task, gwp.build_final(task.req.rid, result.status, env, result.body),
                  result.ann)

    def _fail(self, session: _Session, task: _Task, exc: BaseException) -> None:
        if isinstance(exc, HandlerError):
            body = gwp.error_body(exc.message, exc.type, exc.code, exc.param)
            status = exc.status
        else:
            log.error("handler failed service=%s rid=%s: %r", session.service,
                      task.req.rid_hex, exc, exc_info=exc)
            body = gwp.error_body(f"internal error: {type(exc).__name__}", "server_error",
                                  "internal_error")
            status = 500
        self._end(session, task, gwp.build_final(task.req.rid, status,
                                                 self._final_envelope(task.req, {}), body))

    def _end(self, session: _Session, task: _Task, frames: List[bytes],
             final_ann: Optional[Dict[str, Any]] = None) -> None:
        session.tasks.pop(task.req.rid, None)
        session.send(frames)
        task.req.final_ann = dict(final_ann or {})
        self._ended(session, task.req, struct.unpack(">H", frames[3])[0])

    def _ended(self, session: _Session, req: Request, status: int) -> None:
        if req.status is not None:
            return
        req.status = status
        if session.on_end is not None:
            try:
                session.on_end(req)
            except Exception:  # noqa: BLE001 — a callback must not break the loop
                log.exception("on_end callback failed service=%s rid=%s", session.service,
                              req.rid_hex)

    def _close_gen(self, task: _Task) -> None:
        if task.gen is not None:
            try:
                task.gen.close()
            except Exception:  # noqa: BLE001 — a handler's cleanup failed
                log.exception("handler cleanup failed rid=%s", task.req.rid_hex)
            task.gen = None

    def _final_envelope(self, req: Request, ann: Dict[str, Any]) -> bytes:
        """The request's envelope with ann merged in and our timing appended;
        a minimal envelope if the request's was unreadable."""
        try:
            env = Envelope.decode(req.raw_envelope) if req.raw_envelope else Envelope(id=req.rid)
        except ValueError:
            env = Envelope(id=req.rid)
        env.ann.update(req.ann)
        env.ann.update(ann)
        if len(env.t) < gwp.TIMINGS_MAX:
            env.t.append((req.service, req.received_us, gwp.now_us()))
        try:
            return env.encode()
        except ValueError:
            return Envelope(id=req.rid, ann=dict(ann)).encode()

    def _head_envelope(self, req: Request) -> bytes:
        """The envelope of a request's first PARTIAL: the one it came with,
        with ``req.ann`` merged in (no timing: that goes with the FINAL).
        Empty if the request had no envelope and the handler annotated
        nothing; past 64 KiB only ``ann.headers`` and ``ann.channel`` stay."""
        if not req.raw_envelope and not req.ann:
            return b""
        try:
            env = Envelope.decode(req.raw_envelope) if req.raw_envelope else Envelope(id=req.rid)
        except ValueError:
            env = Envelope(id=req.rid)
        env.ann.update(req.ann)
        try:
            raw = env.encode()
            if len(raw) <= gwp.ENVELOPE_MAX:
                return raw
        except ValueError:
            pass
        small = {k: env.ann[k] for k in ("headers", "channel") if k in env.ann}
        try:
            raw = Envelope(id=req.rid, ann=small).encode() if small else b""
        except ValueError:
            return b""
        return raw if len(raw) <= gwp.ENVELOPE_MAX else b""

    def _expire(self, session: _Session) -> None:
        now = gwp.now_ms()
        for task in list(session.tasks.values()):
            if task.req.deadline and now >= task.req.deadline:
                log.info("deadline service=%s rid=%s", session.service, task.req.rid_hex)
                self._close_gen(task)
                self._end(session, task, gwp.build_final(
                    task.req.rid, 504, self._final_envelope(task.req, {}),
                    gwp.error_body("deadline passed", "gateway_error", "deadline_exceeded")))

    def _reap(self, session: _Session) -> None:
        if session.draining and not session.tasks and not self._stopping:
            if session.service in self.sessions:
                session.send(gwp.build_disconnect())
                if session.sock is not None:
                    session.sock.setsockopt(zmq.LINGER, 200)
                session.closed = True
                session.close_socket()
                del self.sessions[session.service]
                log.info("removed service=%s", session.service)
                self._event(f"removed {session.service}")
                if session.on_removed is not None:
                    session.on_removed()
