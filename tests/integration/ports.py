"""Free loopback ports for test processes, shared by the integration tests
and the Python worker tests (python/tests puts this folder on sys.path)."""

from __future__ import annotations

import socket

_PORTS_GIVEN: set = set()


def free_port() -> int:
    """A port free now and not handed out before in this run: the kernel
    may give the same just-released port to two calls in a row (a broker's
    bus and tap once got one port between them)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port
