"""aiohttp's keep-alive connections to the upstream, never lent again after a stray byte.

aiohttp's client (HTTPS upstreams, streamed uploads, HEAD) keeps parsing a connection
while it sits idle in the pool: a buggy upstream's second answer to one request lands in
the connection's queue, and aiohttp's pool lent that connection to the next request,
which read the stray answer as its own (another tenant's, stored for its key). Its pool
asks `is_connected()` before it lends an idle connection (and when it sweeps them); ours
also says no when anything arrived since the last answer ended (`should_close`: bytes
buffered or parsed, or the server said it would close), so such a connection is closed
instead. Our own client does the same check (proxy/upstream/client.py, `quiet`).
"""

from __future__ import annotations

import functools
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler

# aiohttp's private members this module reads or writes (aiohttp does not promise them;
# pyproject.toml pins its minor version, and tests/test_hostile_upstream.py fails when
# one disappears).
AIOHTTP_PRIVATES = {"TCPConnector": frozenset({"_factory", "_loop"})}


class _Handler(ResponseHandler):
    def is_connected(self) -> bool:
        return super().is_connected() and not self.should_close


def connector(**kwargs: Any) -> aiohttp.TCPConnector:
    """A TCPConnector (same arguments) whose idle connections are checked as above."""
    conn = aiohttp.TCPConnector(**kwargs)
    conn._factory = functools.partial(_Handler, loop=conn._loop)  # type: ignore[assignment]
    return conn
