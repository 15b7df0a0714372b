"""GWP/1 in Python, written from proto/PROTOCOL.md alone (not from the C code).

It is the integration tests' own implementation of the protocol, so it also
works as a conformance check of the spec: frame building and parsing for
every command (section 2), the envelope (section 4), a synchronous
``Client`` and a synchronous ``Worker`` session (section 3).

Design notes:

* Everything is synchronous and single threaded except the client's optional
  keep-alive thread (PING when nothing was sent or heard for heartbeat,
  3.5.1); a lock serialises every use of the client's socket, so
  the thread can send PINGs while a test does something else (otherwise a
  test that waits on a subprocess for longer than the broker's expiry would
  see its requests cancelled by the broker, rule 3.5.2).
* Parsing follows the section 2 rules exactly: signature, known command,
  frame count, every fixed size exact, every variable size within its bound,
  at most 16 frames, extra frames ignored. Anything else raises
  ``Malformed`` (with the rid when it was readable).
* No process in the test suite trusts this module's view of the broker: the
  tests assert on what a client receives.
"""

from __future__ import annotations

import enum
import os
import re
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import msgpack
import zmq

SIGNATURE = b"GWP1"
RID_SIZE = 16
SERVICE_MAX = 127
LABEL_MAX = 256
ENVELOPE_MAX = 65536
BODY_MAX_DEFAULT = 32 * 1024 * 1024
FRAMES_MAX = 16
SLIP_MAX = 16
TIMINGS_MAX = 32
DEPTH_MAX = 8

READY_IDEMPOTENT = 0x01
REQUEST_STREAM = 0x01

_SERVICE_RE = re.compile(rb"^[A-Za-z0-9._\-/:]{1,127}$")


class Command(enum.IntEnum):
    """Command codes, PROTOCOL.md section 2."""

    READY = 0x01
    REQUEST = 0x02
    FORWARD = 0x03
    PARTIAL = 0x04
    FINAL = 0x05
    CANCEL = 0x06
    CREDIT = 0x07
    PING = 0x08
    PONG = 0x09
    DISCONNECT = 0x0A


#  Frames after signature and command, per command (the minimum; more are
#  accepted and ignored). PING's role frame is optional.
_FRAMES_AFTER_HEADER = {
    Command.READY: 4,
    Command.REQUEST: 5,
    Command.FORWARD: 5,
    Command.PARTIAL: 3,
    Command.FINAL: 4,
    Command.CANCEL: 2,
    Command.CREDIT: 2,
    Command.PING: 0,
    Command.PONG: 0,
    Command.DISCONNECT: 0,
}


class Malformed(Exception):
    """A frame set that violates section 2; rid is set when it was readable."""

    def __init__(self, reason: str, rid: Optional[bytes] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rid = rid


def new_rid() -> bytes:
    """A random request id in UUIDv4 layout (122 random bits)."""
    return uuid.uuid4().bytes


def now_ms() -> int:
    """Wall clock in unix milliseconds (deadlines are absolute, 3.4.2)."""
    return time.time_ns() // 1_000_000


def now_us() -> int:
    return time.time_ns() // 1_000


def service_valid(name: bytes | str) -> bool:
    raw = name.encode() if isinstance(name, str) else name
    return bool(_SERVICE_RE.match(raw))


@dataclass
class Message:
    """One decoded frame set. Only the fields of its command are meaningful."""

    command: Command
    rid: bytes = b""
    service: str = ""
    deadline: int = 0
    window: int = 0
    flags: int = 0
    envelope: bytes = b""
    body: bytes = b""
    seq: int = 0
    status: int = 0
    reason: int = 0
    credit: int = 0
    capacity: int = 0
    label: str = ""
    role: str = ""
    extra: List[bytes] = field(default_factory=list)

    @property
    def stream(self) -> bool:
        return bool(self.flags & REQUEST_STREAM)

    @property
    def idempotent(self) -> bool:
        return bool(self.flags & READY_IDEMPOTENT)

    def body_obj(self) -> Any:
        """The body decoded as msgpack (None for an empty body)."""
        if not self.body:
            return None
        return msgpack.unpackb(self.body, raw=False, strict_map_key=False)


# --------------------------------------------------------------------------
# Frame building


def _header(command: Command) -> List[bytes]:
    return [SIGNATURE, bytes([int(command)])]


def _check_rid(rid: bytes) -> None:
    if len(rid) != RID_SIZE:
        raise ValueError("rid must be 16 bytes")


def build_ready(service: str, capacity: int, flags: int = 0, label: str = "") -> List[bytes]:
    if not service_valid(service):
        raise ValueError(f"invalid service name {service!r}")
    if not 1 <= capacity <= 65535:
        raise ValueError("capacity must be 1..65535")
    raw_label = label.encode()
    if len(raw_label) > LABEL_MAX:
        raise ValueError("label too long")
    return _header(Command.READY) + [
        service.encode(),
        struct.pack(">I", capacity),
        struct.pack(">I", flags),
        raw_label,
    ]


def build_meta(deadline: int, window: int, flags: int) -> bytes:
    return struct.pack(">QII", deadline, window, flags)


def build_request(
    rid: bytes,
    service: str,
    deadline: int = 0,
    window: int = 0,
    flags: int = 0,
    envelope: bytes = b"",
    body: bytes = b"",
    command: Command = Command.REQUEST,
) -> List[bytes]:
    """REQUEST (or FORWARD, same layout)."""
    _check_rid(rid)
    if not service_valid(service):
        raise ValueError(f"invalid service name {service!r}")
    if len(envelope) > ENVELOPE_MAX:
        raise ValueError("envelope too large")
    return _header(command) + [
        rid,
        service.encode(),
        build_meta(deadline, window, flags),
        envelope,
        body,
    ]


def build_partial(rid: bytes, seq: int, payload: bytes, envelope: bytes = b"") -> List[bytes]:
    _check_rid(rid)
    frames = _header(Command.PARTIAL) + [rid, struct.pack(">I", seq), payload]
    return frames + [envelope] if envelope else frames


def build_final(rid: bytes, status: int, envelope: bytes = b"", body: bytes = b"") -> List[bytes]:
    _check_rid(rid)
    return _header(Command.FINAL) + [rid, struct.pack(">H", status), envelope, body]


def build_cancel(rid: bytes, reason: int = 499) -> List[bytes]:
    _check_rid(rid)
    return _header(Command.CANCEL) + [rid, struct.pack(">H", reason)]


def build_credit(rid: bytes, credit: int) -> List[bytes]:
    _check_rid(rid)
    if not 1 <= credit <= 0x7FFFFFFF:
        raise ValueError("credit must be 1..2^31-1")
    return _header(Command.CREDIT) + [rid, struct.pack(">I", credit)]


def build_ping(role: Optional[str] = None) -> List[bytes]:
    frames = _header(Command.PING)
    if role is not None:
        frames.append(role.encode())
    return frames


def build_pong() -> List[bytes]:
    return _header(Command.PONG)


def build_disconnect() -> List[bytes]:
    return _header(Command.DISCONNECT)


def error_body(message: str, type_: str, code: Optional[str] = None,
               param: Optional[str] = None) -> bytes:
    """The OpenAI error object as msgpack (section 6)."""
    return msgpack.packb(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        use_bin_type=True,
    )


# --------------------------------------------------------------------------
# Frame parsing


def parse(frames: Sequence[bytes], body_max: int = BODY_MAX_DEFAULT) -> Message:
    """Validate and decode one frame set (no routing id). Raises Malformed."""
    if len(frames) < 2:
        raise Malformed("too few frames")
    if len(frames) > FRAMES_MAX:
        rid = frames[2] if len(frames) > 2 and len(frames[2]) == RID_SIZE else None
        raise Malformed("too many frames", rid)
    if frames[0] != SIGNATURE:
        raise Malformed("bad signature")
    if len(frames[1]) != 1:
        raise Malformed("bad command frame")
    try:
        command = Command(frames[1][0])
    except ValueError:
        raise Malformed(f"unknown command 0x{frames[1][0]:02x}") from None
    rest = list(frames[2:])
    rid = rest[0] if rest and len(rest[0]) == RID_SIZE and command not in (
        Command.READY, Command.PING, Command.PONG, Command.DISCONNECT) else None
    need = _FRAMES_AFTER_HEADER[command]
    if len(rest) < need:
        raise Malformed(f"{command.name}: {len(rest)} frames, need {need}", rid)
    msg = Message(command=command)

    def fixed(index: int, size: int, what: str) -> bytes:
        if len(rest[index]) != size:
            raise Malformed(f"{command.name}: {what} is {len(rest[index])} bytes, "
                            f"must be {size}", rid)
        return rest[index]

    def service(index: int) -> str:
        raw = rest[index]
        if not _SERVICE_RE.match(raw):
            raise Malformed(f"{command.name}: invalid service name", rid)
        return raw.decode()

    def body(index: int) -> bytes:
        if len(rest[index]) > body_max:
            raise Malformed(f"{command.name}: body too large", rid)
        return rest[index]

    def envelope(index: int) -> bytes:
        if len(rest[index]) > ENVELOPE_MAX:
            raise Malformed(f"{command.name}: envelope too large", rid)
        return rest[index]

    if command == Command.READY:
        msg.service = service(0)
        (msg.capacity,) = struct.unpack(">I", fixed(1, 4, "capacity"))
        if not 1 <= msg.capacity <= 65535:
            raise Malformed("READY: capacity out of range")
        (msg.flags,) = struct.unpack(">I", fixed(2, 4, "flags"))
        if len(rest[3]) > LABEL_MAX:
            raise Malformed("READY: label too long")
        msg.label = rest[3].decode("utf-8", "replace")
    elif command in (Command.REQUEST, Command.FORWARD):
        msg.rid = fixed(0, RID_SIZE, "rid")
        msg.service = service(1)
        msg.deadline, msg.window, msg.flags = struct.unpack(">QII", fixed(2, 16, "meta"))
        msg.envelope = envelope(3)
        msg.body = body(4)
    elif command == Command.PARTIAL:
        msg.rid = fixed(0, RID_SIZE, "rid")
        (msg.seq,) = struct.unpack(">I", fixed(1, 4, "seq"))
        msg.body = body(2)
        if len(rest) > 3:  # optional frame 5: the envelope (PROTOCOL.md §2)
            msg.envelope = envelope(3)
    elif command == Command.FINAL:
        msg.rid = fixed(0, RID_SIZE, "rid")
        (msg.status,) = struct.unpack(">H", fixed(1, 2, "status"))
        msg.envelope = envelope(2)
        msg.body = body(3)
    elif command == Command.CANCEL:
        msg.rid = fixed(0, RID_SIZE, "rid")
        (msg.reason,) = struct.unpack(">H", fixed(1, 2, "reason"))
    elif command == Command.CREDIT:
        msg.rid = fixed(0, RID_SIZE, "rid")
        (msg.credit,) = struct.unpack(">I", fixed(1, 4, "credit"))
        if not 1 <= msg.credit <= 0x7FFFFFFF:
            raise Malformed("CREDIT: credit out of range", rid)
    elif command == Command.PING:
        if rest:
            if len(rest[0]) != 1:
                raise Malformed("PING: role must be 1 byte")
            msg.role = rest[0].decode("ascii", "replace")
        else:
            msg.role = "C"
    msg.extra = rest[need if command != Command.PING else min(1, len(rest)):]
    return msg


# --------------------------------------------------------------------------
# The envelope (section 4)


@dataclass
class Envelope:
    """Version 1 envelope; None / empty means the key is not set."""

    v: int = 1
    id: Optional[bytes] = None
    slip: List[str] = field(default_factory=list)
    cur: Optional[int] = None
    dl: Optional[int] = None
    stream: Optional[bool] = None
    model: Optional[str] = None
    trace: Optional[str] = None
    tenant: Dict[str, Any] = field(default_factory=dict)
    ann: Dict[str, Any] = field(default_factory=dict)
    t: List[Tuple[str, int, int]] = field(default_factory=list)

    def encode(self) -> bytes:
        out: Dict[str, Any] = {"v": self.v}
        if self.id is not None:
            out["id"] = bytes(self.id)
        if self.slip:
            out["slip"] = list(self.slip)
        if self.cur is not None:
            out["cur"] = self.cur
        if self.dl is not None:
            out["dl"] = self.dl
        if self.stream is not None:
            out["stream"] = self.stream
        if self.model is not None:
            out["model"] = self.model
        if self.trace is not None:
            out["trace"] = self.trace
        if self.tenant:
            out["tenant"] = dict(self.tenant)
        if self.ann:
            out["ann"] = dict(self.ann)
        if self.t:
            out["t"] = [list(x) for x in self.t]
        raw = msgpack.packb(out, use_bin_type=True)
        if len(raw) > ENVELOPE_MAX:
            raise ValueError("envelope too large")
        return raw

    @classmethod
    def decode(cls, raw: bytes) -> "Envelope":
        """Decode and validate; raises ValueError on anything not version 1."""
        if len(raw) > ENVELOPE_MAX:
            raise ValueError("envelope too large")
        try:
            obj = msgpack.unpackb(raw, raw=False, strict_map_key=False,
                                  max_bin_len=ENVELOPE_MAX, max_str_len=ENVELOPE_MAX,
                                  max_array_len=ENVELOPE_MAX, max_map_len=ENVELOPE_MAX)
        except Exception as exc:  # msgpack raises several types
            raise ValueError(f"not msgpack: {exc}") from None
        if not isinstance(obj, dict):
            raise ValueError("envelope is not a map")
        if _depth(obj) > DEPTH_MAX:
            raise ValueError("envelope nested too deeply")
        env = cls()
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ValueError("envelope key is not a string")
            if key == "v":
                env.v = _typed(value, int, key)
            elif key == "id":
                env.id = _typed(value, bytes, key)
                if len(env.id) != RID_SIZE:
                    raise ValueError("id must be 16 bytes")
            elif key == "slip":
                slip = _typed(value, list, key)
                if len(slip) > SLIP_MAX or not all(
                        isinstance(s, str) and service_valid(s) for s in slip):
                    raise ValueError("bad slip")
                env.slip = slip
            elif key == "cur":
                env.cur = _typed(value, int, key)
            elif key == "dl":
                env.dl = _typed(value, int, key)
            elif key == "stream":
                env.stream = _typed(value, bool, key)
            elif key == "model":
                env.model = _typed(value, str, key)
            elif key == "trace":
                env.trace = _typed(value, str, key)
            elif key == "tenant":
                env.tenant = _typed(value, dict, key)
            elif key == "ann":
                env.ann = _typed(value, dict, key)
            elif key == "t":
                timings = _typed(value, list, key)
                if len(timings) > TIMINGS_MAX:
                    raise ValueError("too many timings")
                env.t = [tuple(x) for x in timings]  # type: ignore[misc]
            # unknown keys are ignored (section 4)
        return env

    def next_service(self) -> Optional[str]:
        cur = self.cur or 0
        return self.slip[cur + 1] if cur + 1 < len(self.slip) else None


def _typed(value: Any, kind: type, key: str) -> Any:
    if kind is int and isinstance(value, bool):
        raise ValueError(f"envelope {key}: bool where int expected")
    if not isinstance(value, kind) or (kind is int and value < 0):
        raise ValueError(f"envelope {key}: wrong type {type(value).__name__}")
    return value


def _depth(obj: Any) -> int:
    if isinstance(obj, dict):
        return 1 + max((max(_depth(k), _depth(v)) for k, v in obj.items()), default=0)
    if isinstance(obj, list):
        return 1 + max((_depth(x) for x in obj), default=0)
    return 0


# --------------------------------------------------------------------------
# Sockets


def _new_dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A peer DEALER with the section 9 options."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 3000)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.connect(endpoint)
    return sock


class Client:
    """A GWP/1 client on one DEALER socket (synchronous, for tests).

    recv() answers PINGs, drops PONGs and returns every other frame set,
    including ones for rids it never sent (tests want to see those). A
    keep-alive thread sends PING (role C) when the client has sent nothing
    for heartbeat_ms, so the broker never expires an idle test client.
    """

    def __init__(self, endpoint: str, heartbeat_ms: int = 200,
                 ctx: Optional[zmq.Context] = None, keepalive: bool = True) -> None:
        self.endpoint = endpoint
        self.heartbeat_ms = heartbeat_ms
        self._ctx = ctx or zmq.Context.instance()
        self._sock = _new_dealer(self._ctx, endpoint)
        self._lock = threading.Lock()
        self._last_send = time.monotonic()
        self._last_recv = time.monotonic()
        self._last_ping = 0.0
        self._closed = threading.Event()
        self.malformed: List[Malformed] = []
        self.disconnects = 0
        self._thread: Optional[threading.Thread] = None
        if keepalive:
            self._thread = threading.Thread(target=self._keepalive, daemon=True)
            self._thread.start()

    # -- sending ------------------------------------------------------------

    def send_frames(self, frames: Sequence[bytes], timeout_ms: int = 2000) -> None:
        """Send a raw frame set (may be malformed on purpose)."""
        with self._lock:
            self._sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
            self._sock.send_multipart(list(frames))
            self._last_send = time.monotonic()

    def request(
        self,
        service: str,
        body: bytes | Any = b"",
        envelope: Optional[Envelope | bytes] = None,
        deadline_ms: Optional[int] = None,
        window: int = 0,
        stream: bool = False,
        rid: Optional[bytes] = None,
    ) -> bytes:
        """Send a REQUEST; returns its rid.

        body: bytes are sent as is, anything else is packed as msgpack.
        deadline_ms: relative milliseconds from now (None = no deadline).
        envelope: an Envelope (rid, deadline and stream filled in if unset)
        or raw bytes; None builds a minimal envelope {v, id, slip, cur, dl}.
        """
        rid = rid or new_rid()
        deadline = now_ms() + deadline_ms if deadline_ms is not None else 0
        if not isinstance(body, (bytes, bytearray)):
            body = msgpack.packb(body, use_bin_type=True)
        if envelope is None:
            envelope = Envelope(slip=[service], cur=0)
        if isinstance(envelope, Envelope):
            if envelope.id is None:
                envelope.id = rid
            if envelope.dl is None and deadline:
                envelope.dl = deadline
            if envelope.stream is None and stream:
                envelope.stream = True
            raw_env = envelope.encode()
        else:
            raw_env = envelope
        flags = REQUEST_STREAM if stream else 0
        self.send_frames(build_request(rid, service, deadline, window, flags, raw_env,
                                       bytes(body)))
        return rid

    def cancel(self, rid: bytes, reason: int = 499) -> None:
        self.send_frames(build_cancel(rid, reason))

    def credit(self, rid: bytes, credit: int) -> None:
        self.send_frames(build_credit(rid, credit))

    def ping(self) -> None:
        self.send_frames(build_ping("C"))

    # -- receiving ----------------------------------------------------------

    def recv(self, timeout_ms: int = 1000) -> Optional[Message]:
        """The next PARTIAL/FINAL/other frame set, or None after timeout_ms."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            left = deadline - time.monotonic()
            with self._lock:
                # short slices so the keep-alive thread gets the lock
                if self._sock.poll(max(0, min(50, int(left * 1000)))):
                    frames = self._sock.recv_multipart()
                else:
                    frames = None
            if frames is not None:
                self._last_recv = time.monotonic()
                try:
                    msg = parse(frames)
                except Malformed as exc:
                    self.malformed.append(exc)
                    continue
                if msg.command == Command.PING:
                    self.send_frames(build_pong())
                    continue
                if msg.command == Command.PONG:
                    continue
                if msg.command == Command.DISCONNECT:
                    self.disconnects += 1
                return msg
            if time.monotonic() >= deadline:
                return None

    def recv_final(self, rid: bytes, timeout_ms: int = 5000) -> Optional[Message]:
        """Wait for the FINAL of rid, ignoring everything else."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                return None
            msg = self.recv(left)
            if msg is not None and msg.command == Command.FINAL and msg.rid == rid:
                return msg

    def collect(self, rids: Sequence[bytes], timeout_ms: int = 5000
                ) -> Dict[bytes, List[Message]]:
        """Collect messages for rids until each has a FINAL or timeout."""
        want = set(rids)
        out: Dict[bytes, List[Message]] = {r: [] for r in rids}
        done: set = set()
        deadline = time.monotonic() + timeout_ms / 1000
        while done != want:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                break
            msg = self.recv(left)
            if msg is None or msg.rid not in want:
                continue
            out[msg.rid].append(msg)
            if msg.command == Command.FINAL:
                done.add(msg.rid)
        return out

    def call(self, service: str, body: bytes | Any = b"", timeout_ms: int = 5000,
             **kwargs: Any) -> Optional[Message]:
        """request() then wait for its FINAL."""
        rid = self.request(service, body, **kwargs)
        return self.recv_final(rid, timeout_ms)

    def pump(self, duration_ms: int) -> List[Message]:
        """Receive everything for duration_ms."""
        out: List[Message] = []
        deadline = time.monotonic() + duration_ms / 1000
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            if left <= 0:
                return out
            msg = self.recv(left)
            if msg is not None:
                out.append(msg)

    # -- life cycle ---------------------------------------------------------

    def _keepalive(self) -> None:
        period = self.heartbeat_ms / 1000
        while not self._closed.wait(period / 4):
            with self._lock:
                if self._closed.is_set():
                    return
                now = time.monotonic()
                if now - self._last_ping >= period and (
                        now - self._last_send >= period or now - self._last_recv >= period):
                    try:
                        self._sock.send_multipart(build_ping("C"), zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                    self._last_send = self._last_ping = time.monotonic()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            self._sock.close(linger=0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class WorkerRequest:
    """What the worker session remembers about a request it handed out."""

    msg: Message
    credit: Optional[int]  # None = unlimited window
    seq: int = 0
    cancelled: bool = False
    t_in_us: int = field(default_factory=now_us)


class Worker:
    """A GWP/1 worker session serving one service (synchronous).

    recv() runs timers and handles PING/PONG/DISCONNECT itself, returning
    REQUEST, CANCEL and CREDIT to the caller. Reconnects (fresh socket, new
    identity, READY again) on DISCONNECT, on broker silence for expiry_ms and
    on a dropped TCP connection (socket monitor, 3.5.6), backing off from
    reconnect_min_ms to reconnect_max_ms.
    """

    def __init__(
        self,
        endpoint: str,
        service: str,
        capacity: int = 1,
        idempotent: bool = False,
        label: str = "",
        heartbeat_ms: int = 1000,
        expiry_ms: int = 3000,
        reconnect_min_ms: int = 1000,
        reconnect_max_ms: int = 32000,
        on_event: Optional[Callable[[str], None]] = None,
    ) -> None:
        if not service_valid(service):
            raise ValueError(f"invalid service name {service!r}")
        self.endpoint = endpoint
        self.service = service
        self.capacity = capacity
        self.flags = READY_IDEMPOTENT if idempotent else 0
        self.label = label or f"{os.uname().nodename}:{os.getpid()}"
        self.heartbeat = heartbeat_ms / 1000
        self.expiry = expiry_ms / 1000
        self.reconnect_min = reconnect_min_ms / 1000
        self.reconnect_max = reconnect_max_ms / 1000
        self.on_event = on_event or (lambda text: None)
        self.requests: Dict[bytes, WorkerRequest] = {}
        self.connects = 0
        self.malformed = 0
        self._ctx = zmq.Context.instance()
        self._sock: Optional[zmq.Socket] = None
        self._monitor: Optional[zmq.Socket] = None
        self._backoff = self.reconnect_min
        self._reconnect_at: Optional[float] = None
        self._ready_pending = False
        self._connected = False
        self._last_send = 0.0
        self._last_recv = 0.0
        self._last_ping = 0.0
        self._connect()

    # -- connection -----------------------------------------------------------

    def _connect(self) -> None:
        self._sock = _new_dealer(self._ctx, self.endpoint)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.connects += 1
        self._connected = False
        self._ready_pending = True
        self._last_recv = time.monotonic()
        self._reconnect_at = None
        self._send_ready()

    def _send_ready(self) -> None:
        # With ZMQ_IMMEDIATE the send fails until the TCP connection is up;
        # keep READY pending and retry from the timers.
        if self._send(build_ready(self.service, self.capacity, self.flags, self.label)):
            self._ready_pending = False
            self._last_recv = time.monotonic()
            self.on_event("ready")

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.disable_monitor()
            assert self._monitor is not None
            self._monitor.close(linger=0)
            self._sock.close()
        self._sock = None
        self._monitor = None

    def _lost(self, why: str) -> None:
        """Abandon everything and reconnect after back-off (3.5.4)."""
        self.on_event(f"reconnect {why}")
        self._close()
        self.requests.clear()
        self._reconnect_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.reconnect_max)

    def _send(self, frames: Sequence[bytes]) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.send_multipart(list(frames), zmq.NOBLOCK)
        except zmq.Again:
            return False
        self._last_send = time.monotonic()
        return True

    @property
    def connected(self) -> bool:
        return self._connected

    # -- loop -------------------------------------------------------------------

    def timeout_ms(self) -> int:
        if self._sock is None:
            assert self._reconnect_at is not None
            return max(0, int((self._reconnect_at - time.monotonic()) * 1000))
        if self._ready_pending:
            return 50
        due = max(self._last_ping, min(self._last_send, self._last_recv)) + self.heartbeat
        return max(0, int((due - time.monotonic()) * 1000))

    def tick(self) -> None:
        now = time.monotonic()
        if self._sock is None:
            if self._reconnect_at is not None and now >= self._reconnect_at:
                self._connect()
            return
        if self._ready_pending:
            self._send_ready()
            if self._ready_pending:
                # not connected yet: the broker is still away
                if now - self._last_recv >= self.expiry:
                    self._lost("no connection")
                return
        if now - self._last_recv >= self.expiry:
            self._lost("broker silent")
            return
        # PING when nothing was sent, or nothing heard, for heartbeat (3.5.1),
        # at most one per heartbeat.
        if now - self._last_ping >= self.heartbeat and (
                now - self._last_send >= self.heartbeat
                or now - self._last_recv >= self.heartbeat):
            if self._send(build_ping("W")):
                self._last_ping = now

    def recv(self, timeout_ms: int = 100) -> Optional[Message]:
        """Wait up to timeout_ms for a REQUEST, CANCEL or CREDIT."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            self.tick()
            wait = min(self.timeout_ms(), max(0, int((deadline - time.monotonic()) * 1000)))
            if self._sock is None:
                time.sleep(wait / 1000)
            else:
                assert self._monitor is not None
                poller = zmq.Poller()
                poller.register(self._sock, zmq.POLLIN)
                poller.register(self._monitor, zmq.POLLIN)
                ready = dict(poller.poll(wait))
                if self._monitor in ready:
                    self._monitor.recv_multipart()
                    self._lost("connection dropped")
                    continue
                if self._sock in ready:
                    msg = self._handle(self._sock.recv_multipart())
                    if msg is not None:
                        return msg
                    continue
            if time.monotonic() >= deadline:
                self.tick()
                return None

    def _handle(self, frames: List[bytes]) -> Optional[Message]:
        self._last_recv = time.monotonic()
        if not self._connected:
            self._connected = True
            self._backoff = self.reconnect_min
        try:
            msg = parse(frames)
        except Malformed:
            self.malformed += 1
            return None
        if msg.command == Command.PING:
            self._send(build_pong())
            return None
        if msg.command == Command.PONG:
            return None
        if msg.command == Command.DISCONNECT:
            self._lost("DISCONNECT")
            return None
        if msg.command == Command.REQUEST:
            window = msg.window if msg.stream and msg.window else None
            self.requests[msg.rid] = WorkerRequest(msg, window)
            return msg
        if msg.command == Command.CANCEL:
            req = self.requests.get(msg.rid)
            if req is not None:
                req.cancelled = True
            return msg
        if msg.command == Command.CREDIT:
            req = self.requests.get(msg.rid)
            if req is not None and req.credit is not None:
                req.credit += msg.credit
            return msg
        self.malformed += 1  # a command a worker never receives
        return None

    # -- answering ----------------------------------------------------------

    def credit(self, rid: bytes) -> int:
        req = self.requests.get(rid)
        if req is None:
            return 0
        return 0x7FFFFFFF if req.credit is None else req.credit

    def partial(self, rid: bytes, payload: bytes) -> bool:
        """Send one PARTIAL; False if the window is exhausted or rid unknown."""
        req = self.requests.get(rid)
        if req is None or req.cancelled or not req.msg.stream:
            return False
        if req.credit is not None and req.credit <= 0:
            return False
        if not self._send(build_partial(rid, req.seq, payload)):
            return False
        req.seq += 1
        if req.credit is not None:
            req.credit -= 1
        return True

    def final(self, rid: bytes, status: int = 200, body: bytes = b"",
              envelope: bytes = b"") -> bool:
        if self.requests.pop(rid, None) is None:
            return False
        return self._send(build_final(rid, status, envelope, body))

    def error(self, rid: bytes, status: int, type_: str, code: Optional[str],
              message: str) -> bool:
        return self.final(rid, status, error_body(message, type_, code))

    def forward(self, request: Message, envelope: Envelope) -> bool:
        """FORWARD to the slip's next service, advancing the cursor (3.3)."""
        nxt = envelope.next_service()
        if nxt is None:
            return False
        req = self.requests.pop(request.rid, None)
        if req is None:
            return False
        envelope.cur = (envelope.cur or 0) + 1
        if len(envelope.t) < TIMINGS_MAX:
            envelope.t.append((self.service, req.t_in_us, now_us()))
        frames = build_request(request.rid, nxt, request.deadline, request.window,
                               request.flags, envelope.encode(), request.body,
                               command=Command.FORWARD)
        return self._send(frames)

    def close(self, linger_ms: int = 500) -> None:
        """Send DISCONNECT (3.5.7) and close, giving it linger_ms to leave."""
        sent = self._send(build_disconnect())
        if self._sock is not None and sent:
            self._sock.setsockopt(zmq.LINGER, linger_ms)
        self._close()


# --------------------------------------------------------------------------
# The tap (section 7)


@dataclass
class TapEvent:
    topic: str
    seq: int
    time_us: int
    rid: bytes
    size: int
    status: int

    @property
    def service(self) -> str:
        return self.topic.rsplit(".", 1)[0]

    @property
    def command(self) -> str:
        return self.topic.rsplit(".", 1)[1]


def parse_tap(frames: Sequence[bytes]) -> TapEvent:
    if len(frames) < 2 or not 1 <= len(frames[0]) <= 140 or len(frames[1]) != 40:
        raise Malformed("bad tap message")
    seq, time_us, rid, size, status, _reserved = struct.unpack(">QQ16sIHH", frames[1])
    return TapEvent(frames[0].decode("utf-8", "replace"), seq, time_us, rid, size, status)
