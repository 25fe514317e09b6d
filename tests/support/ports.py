"""Free loopback ports for servers a test starts with a fixed port."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


def free_ports(n: int, *, pair_first: bool = False) -> list[int]:
    """``n`` distinct free loopback ports, all held until every one is chosen (so no two
    picks collide); ``pair_first``: the first one's successor is free too and not among
    the others (worker N's admin listener is admin.port + N)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if pair_first and not ports:
                nxt = socket.socket()
                held.append(nxt)
                try:
                    nxt.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def free_port() -> int:
    """One free loopback port (nothing listens on it once this returns)."""
    return free_ports(1)[0]


@contextlib.contextmanager
def busy_port(*, listen: bool = True) -> Iterator[int]:
    """A loopback port held by someone else until the context ends: listening (a server
    there already), or only bound (``listen=False``: connections to it are refused)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        if listen:
            busy.listen(1)
        yield int(busy.getsockname()[1])
