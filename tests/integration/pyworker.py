#!/usr/bin/python3
"""A GWP/1 test worker in Python (gwp.py), twin of tests/c/aigw_testworker.c.

Modes:
  echo     FINAL 200 at once with the reply body below.
  stream   --partials N PARTIALs (payload "chunk <i>"), respecting the stream
           window and CREDIT, --delay-ms apart, then FINAL 200. A request
           without the STREAM flag gets the FINAL only.
  forward  append --label to the envelope annotation "path" and FORWARD to
           the slip's next service; at the end of the slip, answer as echo.
  sleep    wait --delay-ms, then answer as echo.
  hold     never answer (for kill and cancel tests).

The reply body (msgpack map, identical in the C worker):
  {"worker": label, "service": service, "mode": mode, "pid": int,
   "path": [labels from ann "path" (comma separated) ..., label],
   "body": bin (the request body, verbatim)}

Every mode answers CANCEL with FINAL 499 (3.4.1) after printing
"cancelled <rid hex>". Lines on stdout (flushed): "ready" once READY is sent,
"request <rid hex>" per REQUEST, "cancelled <rid hex>", "credit <rid hex> N",
"reconnect <why>".
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Dict, List

import msgpack
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gwp  # noqa: E402


@dataclass
class Job:
    """A request being answered later (sleep) or streamed (stream)."""

    msg: gwp.Message
    due: float
    sent: int = 0


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def reply_body(args: argparse.Namespace, msg: gwp.Message) -> bytes:
    path: List[str] = []
    try:
        env = gwp.Envelope.decode(msg.envelope) if msg.envelope else gwp.Envelope()
        raw = env.ann.get("path")
        if isinstance(raw, str) and raw:
            path = raw.split(",")
    except ValueError:
        pass
    path.append(args.label)
    return msgpack.packb({
        "worker": args.label,
        "service": args.service,
        "mode": args.mode,
        "pid": os.getpid(),
        "path": path,
        "body": msg.body,
    }, use_bin_type=True)


def forward(worker: gwp.Worker, args: argparse.Namespace, msg: gwp.Message) -> None:
    try:
        env = gwp.Envelope.decode(msg.envelope)
    except ValueError:
        worker.error(msg.rid, 400, "invalid_request_error", "bad_envelope",
                     "envelope is not valid")
        return
    if env.next_service() is None:
        worker.final(msg.rid, 200, reply_body(args, msg))
        return
    prev = env.ann.get("path")
    env.ann["path"] = f"{prev},{args.label}" if isinstance(prev, str) and prev else args.label
    worker.forward(msg, env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bus", default=os.environ.get("AIGW_BUS", "tcp://127.0.0.1:5555"))
    ap.add_argument("--service", required=True)
    ap.add_argument("--capacity", type=int, default=1)
    ap.add_argument("--idempotent", action="store_true")
    ap.add_argument("--mode", choices=["echo", "stream", "forward", "sleep", "hold"],
                    default="echo")
    ap.add_argument("--partials", type=int, default=5)
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--label", default=f"py:{os.getpid()}")
    ap.add_argument("--heartbeat-ms", type=int, default=1000)
    ap.add_argument("--expiry-ms", type=int, default=3000)
    ap.add_argument("--reconnect-ms", type=int, default=1000,
                    help="first reconnect back-off (doubles up to 32 s)")
    args = ap.parse_args()

    stopping = False

    def on_term(_signo: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    worker = gwp.Worker(args.bus, args.service, args.capacity, args.idempotent, args.label,
                        heartbeat_ms=args.heartbeat_ms, expiry_ms=args.expiry_ms,
                        reconnect_min_ms=args.reconnect_ms,
                        reconnect_max_ms=max(args.reconnect_ms, 32000),
                        on_event=say)
    delay = args.delay_ms / 1000
    jobs: Dict[bytes, Job] = {}

    while not stopping:
        now = time.monotonic()
        wait = 100
        for job in jobs.values():
            wait = min(wait, max(0, int((job.due - now) * 1000)))
        msg = worker.recv(wait)
        if msg is not None:
            rid = msg.rid.hex()
            if msg.command == gwp.Command.REQUEST:
                say(f"request {rid}")
                if args.mode == "echo":
                    worker.final(msg.rid, 200, reply_body(args, msg))
                elif args.mode == "forward":
                    forward(worker, args, msg)
                elif args.mode in ("sleep", "stream"):
                    jobs[msg.rid] = Job(msg, time.monotonic() + delay)
                # hold: keep it
            elif msg.command == gwp.Command.CANCEL:
                say(f"cancelled {rid}")
                jobs.pop(msg.rid, None)
                worker.final(msg.rid, 499, gwp.error_body("cancelled", "gateway_error",
                                                          "cancelled"))
            elif msg.command == gwp.Command.CREDIT:
                say(f"credit {rid} {msg.credit}")
        # run due jobs
        now = time.monotonic()
        for key in list(jobs):
            job = jobs[key]
            if key not in worker.requests:
                del jobs[key]  # abandoned by a reconnect
                continue
            if job.due > now:
                continue
            if args.mode == "sleep" or not job.msg.stream:
                worker.final(key, 200, reply_body(args, job.msg))
                del jobs[key]
                continue
            # stream: one PARTIAL per due time, never beyond the window
            while job.sent < args.partials and job.due <= now:
                if not worker.partial(key, f"chunk {job.sent}".encode()):
                    job.due = now + 0.005  # wait for CREDIT
                    break
                job.sent += 1
                job.due = now + delay if delay else now
                if delay:
                    break
            if job.sent >= args.partials:
                worker.final(key, 200, reply_body(args, job.msg))
                del jobs[key]
    worker.close()
    zmq.Context.instance().term()  # waits for DISCONNECT to leave (linger)
    return 0


if __name__ == "__main__":
    sys.exit(main())
