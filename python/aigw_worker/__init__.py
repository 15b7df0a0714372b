"""aigw_worker — join the aigw bus (GWP/1) from any Python program.

``Worker`` runs one or more services, each on its own DEALER connection to
the broker, from a single-threaded ``zmq.Poller`` loop; handlers are plain
functions or generators (see ``aigw_worker.worker``). ``protocol`` holds the
frame codec and the envelope, written from ``proto/PROTOCOL.md``;
``usage.UsageProducer`` sends usage events to ``billing`` (STAGES.md §6.2).

Requires Debian's ``python3-zmq`` and ``python3-msgpack`` on /usr/bin/python3.
"""

from .protocol import Envelope, Malformed, Message, error_body, error_object, packb, unpackb
from .usage import UsageProducer
from .worker import Final, HandlerError, Request, Worker

__all__ = ["Envelope", "Final", "HandlerError", "Malformed", "Message", "Request",
           "UsageProducer", "Worker", "error_body", "error_object", "packb", "unpackb"]
