"""Loopback ports for tests: free ones for servers a test starts with a fixed port, and one
where a connect never completes."""

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


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A port on 127.0.0.1 where a connect waits and never completes: its listener's accept
    queue is full (a backlog of 0 holds one connection, never accepted), and Linux drops
    the SYNs of further connects instead of refusing them."""
    with socket.socket() as listener, contextlib.ExitStack() as held:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        for _ in range(4):
            sock = held.enter_context(socket.socket())
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
        yield port
