"""Refuse a port someone already listens on, with one clear line, before binding it.

The supervisor's workers bind the proxied port with SO_REUSEPORT, which lets a second
idemproxy (same user) bind the same port without an error: the kernel then spreads
connections over both and requests alternate between two proxies with different
configs. So before any worker starts, the port is bound once here without SO_REUSEPORT:
that fails while anything listens on it, whether with SO_REUSEPORT or not. (Another
program binding it with SO_REUSEPORT in the moment between this check and the workers'
binds is the one case left; a second idemproxy always checks first.)
"""

from __future__ import annotations

import errno
import socket

from proxy.config import Listen


class PortInUse(Exception):
    """The address cannot be bound: in use, not local, or not allowed."""


def ensure_free(listen: Listen, *, what: str) -> None:
    """Raise PortInUse naming `what` (the config field) if `listen` cannot be bound."""
    try:
        infos = socket.getaddrinfo(listen.host or None, listen.port,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"{what} {listen}: cannot resolve the host ({exc.strerror})") \
            from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # As aiohttp binds it: SO_REUSEADDR, so a port in TIME_WAIT after a restart is
        # free; a socket in LISTEN on it still makes bind fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"{what} {listen}: the port is already in use (another "
                                "idemproxy or another program listens on it)") from None
            raise PortInUse(f"{what} {listen}: cannot listen there "
                            f"({exc.strerror or exc})") from None
