"""GWP/1 frames and the envelope, written from proto/PROTOCOL.md.

This module is the only Python production code that knows the frame layout
(PROTOCOL.md section 2) and the envelope (section 4). It builds frame sets
(lists of bytes, no routing id) and parses them, treating every frame as
hostile: signature, known command, frame count, fixed sizes exact, variable
sizes bounded, at most 16 frames; anything else raises ``Malformed`` and is
never an assertion.

Rates and costs: one ``parse`` is a handful of ``struct.unpack`` calls; the
envelope is decoded only by handlers that need it (msgpack with explicit
length limits, so a hostile map header cannot allocate gigabytes).
"""

from __future__ import annotations

import enum
import re
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import msgpack

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
CREDIT_MAX = 0x7FFFFFFF

READY_IDEMPOTENT = 0x01
REQUEST_STREAM = 0x01

_SERVICE_RE = re.compile(rb"^[A-Za-z0-9._\-/:]{1,127}$")


class Command(enum.IntEnum):
    """Command codes (PROTOCOL.md section 2)."""

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


#  Frames after signature and command: the minimum per command.
_NEED = {
    Command.READY: 4, Command.REQUEST: 5, Command.FORWARD: 5,
    Command.PARTIAL: 3, Command.FINAL: 4, Command.CANCEL: 2,
    Command.CREDIT: 2, Command.PING: 0, Command.PONG: 0, Command.DISCONNECT: 0,
}

_HAS_RID = (Command.REQUEST, Command.FORWARD, Command.PARTIAL, Command.FINAL,
            Command.CANCEL, Command.CREDIT)


class Malformed(Exception):
    """A frame set that violates PROTOCOL.md section 2.

    ``rid`` is set when the request id was readable, so a caller can answer
    for it.
    """

    def __init__(self, reason: str, rid: Optional[bytes] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rid = rid


def new_rid() -> bytes:
    """A random 16-byte request id in UUIDv4 layout (122 random bits)."""
    return uuid.uuid4().bytes


def now_ms() -> int:
    """Wall clock in unix milliseconds (deadlines are absolute)."""
    return time.time_ns() // 1_000_000


def now_us() -> int:
    """Wall clock in unix microseconds (envelope timings)."""
    return time.time_ns() // 1_000


def service_valid(name: str | bytes) -> bool:
    """True if name matches the ABNF ``service`` rule."""
    raw = name.encode() if isinstance(name, str) else name
    return bool(_SERVICE_RE.match(raw))


@dataclass
class Message:
    """One decoded frame set; only the fields of its command are meaningful."""

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

    @property
    def stream(self) -> bool:
        """REQUEST flag bit 0: the client accepts PARTIALs."""
        return bool(self.flags & REQUEST_STREAM)


# --------------------------------------------------------------------------
# Building


def _header(command: Command) -> List[bytes]:
    return [SIGNATURE, bytes([int(command)])]


def _rid(rid: bytes) -> bytes:
    if len(rid) != RID_SIZE:
        raise ValueError("rid must be 16 bytes")
    return bytes(rid)


def build_ready(service: str, capacity: int, flags: int = 0, label: str = "") -> List[bytes]:
    """READY for one service; capacity 1..65535, label at most 256 bytes."""
    if not service_valid(service):
        raise ValueError(f"invalid service name {service!r}")
    if not 1 <= capacity <= 65535:
        raise ValueError("capacity must be 1..65535")
    raw = label.encode()[:LABEL_MAX]
    return _header(Command.READY) + [service.encode(), struct.pack(">I", capacity),
                                     struct.pack(">I", flags), raw]


def build_request(rid: bytes, service: str, deadline: int = 0, window: int = 0,
                  flags: int = 0, envelope: bytes = b"", body: bytes = b"",
                  command: Command = Command.REQUEST) -> List[bytes]:
    """REQUEST or FORWARD (same layout)."""
    if not service_valid(service):
        raise ValueError(f"invalid service name {service!r}")
    if len(envelope) > ENVELOPE_MAX:
        raise ValueError("envelope too large")
    return _header(command) + [_rid(rid), service.encode(),
                               struct.pack(">QII", deadline, window, flags),
                               bytes(envelope), bytes(body)]


def build_partial(rid: bytes, seq: int, payload: bytes, envelope: bytes = b"") -> List[bytes]:
    """PARTIAL number seq of request rid; ``envelope`` (optional frame 5, sent
    only when not empty) tells the client what it needs before the first
    payload byte: ``ann.headers`` and ``ann.channel``."""
    frames = _header(Command.PARTIAL) + [_rid(rid), struct.pack(">I", seq), bytes(payload)]
    if envelope:
        if len(envelope) > ENVELOPE_MAX:
            raise ValueError("PARTIAL envelope larger than 64 KiB")
        frames.append(bytes(envelope))
    return frames


def build_final(rid: bytes, status: int, envelope: bytes = b"", body: bytes = b"") -> List[bytes]:
    """FINAL with an HTTP-like status; envelope may be empty."""
    if len(envelope) > ENVELOPE_MAX:
        raise ValueError("envelope too large")
    return _header(Command.FINAL) + [_rid(rid), struct.pack(">H", status),
                                     bytes(envelope), bytes(body)]


def build_cancel(rid: bytes, reason: int = 499) -> List[bytes]:
    """CANCEL (client side; used by tests and tools)."""
    return _header(Command.CANCEL) + [_rid(rid), struct.pack(">H", reason)]


def build_credit(rid: bytes, credit: int) -> List[bytes]:
    """CREDIT (client side; used by tests and tools)."""
    if not 1 <= credit <= CREDIT_MAX:
        raise ValueError("credit must be 1..2^31-1")
    return _header(Command.CREDIT) + [_rid(rid), struct.pack(">I", credit)]


def build_ping(role: Optional[str] = "W") -> List[bytes]:
    """PING; a worker always sends role W."""
    frames = _header(Command.PING)
    if role is not None:
        frames.append(role.encode()[:1])
    return frames


def build_pong() -> List[bytes]:
    return _header(Command.PONG)


def build_disconnect() -> List[bytes]:
    return _header(Command.DISCONNECT)


def error_object(message: str, type_: str = "server_error", code: Optional[str] = None,
                 param: Optional[str] = None) -> Dict[str, Any]:
    """The OpenAI error object (PROTOCOL.md section 6) as a dict."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_body(message: str, type_: str = "server_error", code: Optional[str] = None,
               param: Optional[str] = None) -> bytes:
    """The OpenAI error object packed as msgpack, for a FINAL >= 400."""
    return packb(error_object(message, type_, code, param))


def packb(obj: Any) -> bytes:
    """msgpack with bin type for bytes (the project's encoding)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(raw: bytes, limit: int = BODY_MAX_DEFAULT) -> Any:
    """Decode untrusted msgpack with every length bounded by limit.

    Raises ValueError for anything that is not well-formed msgpack.
    """
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=False,
                               max_bin_len=limit, max_str_len=limit,
                               max_array_len=limit, max_map_len=limit,
                               max_ext_len=limit)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ValueError(f"not msgpack: {exc}") from None


# --------------------------------------------------------------------------
# Parsing


def parse(frames: Sequence[bytes], body_max: int = BODY_MAX_DEFAULT) -> Message:
    """Validate and decode one frame set (no routing id); raises Malformed."""
    if len(frames) < 2:
        raise Malformed("too few frames")
    if frames[0] != SIGNATURE:
        raise Malformed("bad signature")
    if len(frames[1]) != 1:
        raise Malformed("bad command frame")
    try:
        command = Command(frames[1][0])
    except ValueError:
        raise Malformed(f"unknown command 0x{frames[1][0]:02x}") from None
    rest = [bytes(f) for f in frames[2:]]
    rid = rest[0] if command in _HAS_RID and rest and len(rest[0]) == RID_SIZE else None
    if len(frames) > FRAMES_MAX:
        raise Malformed("too many frames", rid)
    need = _NEED[command]
    if len(rest) < need:
        raise Malformed(f"{command.name}: {len(rest)} frames, need {need}", rid)
    msg = Message(command=command)

    def fixed(index: int, size: int, what: str) -> bytes:
        if len(rest[index]) != size:
            raise Malformed(f"{command.name}: {what} is {len(rest[index])} bytes, "
                            f"must be {size}", rid)
        return rest[index]

    def bounded(index: int, limit: int, what: str) -> bytes:
        if len(rest[index]) > limit:
            raise Malformed(f"{command.name}: {what} too large", rid)
        return rest[index]

    def service(index: int) -> str:
        if not _SERVICE_RE.match(rest[index]):
            raise Malformed(f"{command.name}: invalid service name", rid)
        return rest[index].decode()

    if command == Command.READY:
        msg.service = service(0)
        (msg.capacity,) = struct.unpack(">I", fixed(1, 4, "capacity"))
        (msg.flags,) = struct.unpack(">I", fixed(2, 4, "flags"))
        msg.label = bounded(3, LABEL_MAX, "label").decode("utf-8", "replace")
    elif command in (Command.REQUEST, Command.FORWARD):
        msg.rid = fixed(0, RID_SIZE, "rid")
        msg.service = service(1)
        msg.deadline, msg.window, msg.flags = struct.unpack(">QII", fixed(2, 16, "meta"))
        msg.envelope = bounded(3, ENVELOPE_MAX, "envelope")
        msg.body = bounded(4, body_max, "body")
    elif command == Command.PARTIAL:
        msg.rid = fixed(0, RID_SIZE, "rid")
        (msg.seq,) = struct.unpack(">I", fixed(1, 4, "seq"))
        msg.body = bounded(2, body_max, "payload")
        if len(rest) > 3:  # optional frame 5: the envelope
            msg.envelope = bounded(3, ENVELOPE_MAX, "envelope")
    elif command == Command.FINAL:
        msg.rid = fixed(0, RID_SIZE, "rid")
        (msg.status,) = struct.unpack(">H", fixed(1, 2, "status"))
        msg.envelope = bounded(2, ENVELOPE_MAX, "envelope")
        msg.body = bounded(3, body_max, "body")
    elif command == Command.CANCEL:
        msg.rid = fixed(0, RID_SIZE, "rid")
        (msg.reason,) = struct.unpack(">H", fixed(1, 2, "reason"))
    elif command == Command.CREDIT:
        msg.rid = fixed(0, RID_SIZE, "rid")
        (msg.credit,) = struct.unpack(">I", fixed(1, 4, "credit"))
        if not 1 <= msg.credit <= CREDIT_MAX:
            raise Malformed("CREDIT: credit out of range", rid)
    elif command == Command.PING:
        if rest:
            msg.role = fixed(0, 1, "role").decode("ascii", "replace")
        else:
            msg.role = "C"
    return msg


# --------------------------------------------------------------------------
# The envelope (section 4)


@dataclass
class Envelope:
    """A version 1 envelope. None or empty means the key is not set.

    ``extra`` keeps unknown keys so a stage passes them through unchanged.
    """

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
    extra: Dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        """msgpack map with only the keys that are set; ValueError if > 64 KiB."""
        out: Dict[str, Any] = dict(self.extra)
        out["v"] = self.v
        for key in ("id", "cur", "dl", "stream", "model", "trace"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.slip:
            out["slip"] = list(self.slip)
        if self.tenant:
            out["tenant"] = dict(self.tenant)
        if self.ann:
            out["ann"] = dict(self.ann)
        if self.t:
            out["t"] = [list(x) for x in self.t]
        raw = packb(out)
        if len(raw) > ENVELOPE_MAX:
            raise ValueError("envelope too large")
        return raw

    @classmethod
    def decode(cls, raw: bytes) -> "Envelope":
        """Decode and validate untrusted bytes; raises ValueError."""
        if len(raw) > ENVELOPE_MAX:
            raise ValueError("envelope too large")
        obj = unpackb(raw, ENVELOPE_MAX)
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
                    raise ValueError("envelope id must be 16 bytes")
            elif key == "slip":
                slip = _typed(value, list, key)
                if len(slip) > SLIP_MAX or not all(
                        isinstance(s, str) and service_valid(s) for s in slip):
                    raise ValueError("bad slip")
                env.slip = slip
            elif key in ("cur", "dl"):
                setattr(env, key, _typed(value, int, key))
            elif key == "stream":
                env.stream = _typed(value, bool, key)
            elif key in ("model", "trace"):
                setattr(env, key, _typed(value, str, key))
            elif key in ("tenant", "ann"):
                setattr(env, key, _typed(value, dict, key))
            elif key == "t":
                timings = _typed(value, list, key)
                if len(timings) > TIMINGS_MAX:
                    raise ValueError("too many timings")
                env.t = [tuple(x) if isinstance(x, list) else x for x in timings]
            else:
                env.extra[key] = value
        return env

    def next_service(self) -> Optional[str]:
        """slip[cur + 1], or None at the end of the slip."""
        cur = self.cur or 0
        return self.slip[cur + 1] if cur + 1 < len(self.slip) else None


def _typed(value: Any, kind: type, key: str) -> Any:
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"envelope {key}: wrong type {type(value).__name__}")
    if not isinstance(value, kind):
        raise ValueError(f"envelope {key}: wrong type {type(value).__name__}")
    return value


def _depth(obj: Any) -> int:
    if isinstance(obj, dict):
        return 1 + max((max(_depth(k), _depth(v)) for k, v in obj.items()), default=0)
    if isinstance(obj, list):
        return 1 + max((_depth(x) for x in obj), default=0)
    return 0
