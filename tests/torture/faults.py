"""A small asyncio TCP fault proxy: latency, resets, partitions, and cuts after a commit.

Each proxy process reaches Postgres and the upstream through its own `Link`, so a fault
can hit one replica's connections only. A link listens on 127.0.0.1 and forwards to a TCP
address or a Unix socket (embedded Postgres listens on a socket only).

A Postgres link also reads the protocol (v3 framing: a type byte and an int32 length) in
both directions, to know which statement each `ReadyForQuery` ends. Armed with
`cut_after_commit`, it holds the server's answer to a claim / complete / release / COMMIT
until its `ReadyForQuery` (the statement has committed by then) and, by the dice, drops it
and aborts both sides: the database did the work, the proxy never hears of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import time
from collections import deque
from dataclasses import dataclass, field

SSL_REQUEST = 80877103
GSS_REQUEST = 80877104
CANCEL_REQUEST = 80877102

#: Statement kinds the cut applies to, found by text in Parse / Query messages.
_KINDS = (("idemproxy_claim", "claim"), ("idemproxy_complete", "complete"),
          ("idemproxy_release", "release"), ("INSERT INTO idemproxy_chunks", "chunk"))


def statement_kind(query: str) -> str:
    for needle, kind in _KINDS:
        if needle in query:
            return kind
    if query.strip().rstrip(";").upper() == "COMMIT":
        return "commit"
    return "other"


@dataclass
class LinkStats:
    connections: int = 0
    resets: int = 0
    cuts: dict[str, int] = field(default_factory=dict)


class _PgSniffer:
    """Tracks which statement kind each Sync / simple Query batch runs (client → server)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.started = False
        self.statements: dict[str, str] = {}
        self.batch: str = "other"
        self.pending: deque[str] = deque()
        self.ssl_reply_expected = False

    def feed(self, data: bytes) -> None:
        self.buf += data
        while True:
            if not self.started:
                if len(self.buf) < 8:
                    return
                length, code = struct.unpack("!ii", self.buf[:8])
                if len(self.buf) < length:
                    return
                del self.buf[:length]
                if code in (SSL_REQUEST, GSS_REQUEST):
                    self.ssl_reply_expected = True
                elif code != CANCEL_REQUEST:
                    self.started = True
                continue
            if len(self.buf) < 5:
                return
            kind = chr(self.buf[0])
            length = struct.unpack("!i", self.buf[1:5])[0]
            if len(self.buf) < 1 + length:
                return
            body = bytes(self.buf[5:1 + length])
            del self.buf[:1 + length]
            self._message(kind, body)

    def _message(self, kind: str, body: bytes) -> None:
        if kind == "P":  # Parse: name\0 query\0 ...
            name, _, rest = body.partition(b"\0")
            query = rest.partition(b"\0")[0].decode("utf-8", "replace")
            self.statements[name.decode()] = statement_kind(query)
            if not name:
                self.batch = statement_kind(query)
        elif kind == "B":  # Bind: portal\0 statement\0 ...
            stmt = body.split(b"\0", 2)[1].decode()
            self.batch = self.statements.get(stmt, self.batch)
        elif kind == "S":
            self.pending.append(self.batch)
            self.batch = "other"
        elif kind == "Q":
            self.pending.append(statement_kind(body.partition(b"\0")[0].decode("utf-8",
                                                                            "replace")))


class Link:
    """One forwarding listener with switchable faults."""

    def __init__(self, name: str, *, target: tuple[str, int] | str, postgres: bool = False,
                 rng: random.Random | None = None) -> None:
        self.name = name
        self.target = target
        self.postgres = postgres
        self.rng = rng or random.Random(0)
        self.latency = 0.0
        self.partitioned = False
        self.cut_kinds: frozenset[str] = frozenset()
        self.cut_probability = 0.0
        self.cut_until = 0.0
        self.stats = LinkStats()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.partitioned = False
        self.reset(count=False)
        if self._tasks:  # aborted sockets end their pumps; cancel only stragglers
            _, pending = await asyncio.wait(set(self._tasks), timeout=2)
            for task in pending:
                task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # --- faults ---

    def reset(self, *, count: bool = True) -> int:
        """Abort every open connection (both sides): an RST in the middle of whatever."""
        n = 0
        for client, server in list(self._conns):
            client.transport.abort()
            if server is not None:
                server.transport.abort()
            n += 1
        self._conns.clear()
        if count:
            self.stats.resets += 1
        return n

    def arm_cut(self, kinds: frozenset[str], *, probability: float, seconds: float) -> None:
        self.cut_kinds, self.cut_probability = kinds, probability
        self.cut_until = time.monotonic() + seconds

    def end_partition(self) -> None:
        if self.partitioned:
            self.partitioned = False
            self.reset(count=False)  # connections held during the partition are dead

    def heal(self) -> None:
        self.latency = 0.0
        self.cut_kinds = frozenset()
        self.end_partition()

    # --- plumbing ---

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self.stats.connections += 1
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
        self._conns.add(pair)
        try:
            if self.partitioned:
                while self.partitioned and not writer.is_closing():
                    await asyncio.sleep(0.05)  # silence: the peer waits for its timeout
                return
            try:
                if isinstance(self.target, str):
                    up_r, up_w = await asyncio.open_unix_connection(self.target)
                else:
                    up_r, up_w = await asyncio.open_connection(*self.target)
            except OSError:
                return
            self._conns.discard(pair)
            pair = (writer, up_w)
            self._conns.add(pair)
            sniffer = _PgSniffer() if self.postgres else None
            await asyncio.gather(self._pump(reader, up_w, sniffer=sniffer, to_server=True),
                                 self._pump(up_r, writer, sniffer=sniffer, to_server=False,
                                            pair=pair), return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.discard(pair)
            for w in pair:
                if w is not None:
                    w.transport.abort()
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *,
                    sniffer: _PgSniffer | None, to_server: bool,
                    pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] | None = None
                    ) -> None:
        parser = _ServerFramer() if sniffer is not None and not to_server else None
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if self.latency:
                    await asyncio.sleep(self.latency)
                if self.partitioned:
                    await self._hold()
                    return
                if sniffer is not None and to_server:
                    sniffer.feed(data)
                if parser is not None and sniffer is not None:
                    out, cut_kind = parser.feed(data, sniffer, self._should_cut,
                                                armed=self._armed())
                    if out:
                        dst.write(out)
                    if cut_kind is not None:
                        self.stats.cuts[cut_kind] = self.stats.cuts.get(cut_kind, 0) + 1
                        for w in pair or ():
                            if w is not None:
                                w.transport.abort()
                        return
                else:
                    dst.write(data)
                await dst.drain()
        finally:
            with contextlib.suppress(Exception):
                if dst.can_write_eof():
                    dst.write_eof()

    async def _hold(self) -> None:
        while self.partitioned:
            await asyncio.sleep(0.05)

    def _armed(self) -> bool:
        return bool(self.cut_kinds) and time.monotonic() <= self.cut_until

    def _should_cut(self, kind: str) -> bool:
        if kind not in self.cut_kinds or time.monotonic() > self.cut_until:
            return False
        return self.rng.random() < self.cut_probability


class _ServerFramer:
    """Frames server → client messages; when armed, holds a statement's CommandComplete
    (and what follows) until its ReadyForQuery, so the answer can be dropped whole."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.held = bytearray()
        self.completed = False  # a CommandComplete in the current batch

    def feed(self, data: bytes, sniffer: _PgSniffer, should_cut: object, *, armed: bool
             ) -> tuple[bytes, str | None]:
        self.buf += data
        out = bytearray()
        if sniffer.ssl_reply_expected and self.buf:
            sniffer.ssl_reply_expected = False
            out += self.buf[:1]
            del self.buf[:1]
        while len(self.buf) >= 5:
            kind = chr(self.buf[0])
            length = struct.unpack("!i", self.buf[1:5])[0]
            if len(self.buf) < 1 + length:
                break
            msg = bytes(self.buf[:1 + length])
            del self.buf[:1 + length]
            if kind == "Z":
                stmt = sniffer.pending.popleft() if sniffer.pending else "other"
                if self.held and msg[5:6] == b"I" and should_cut(stmt):  # type: ignore
                    return bytes(out), stmt
                out += self.held + msg
                self.held = bytearray()
                self.completed = False
                continue
            if kind in "Cs":  # CommandComplete, or PortalSuspended (a row-limited fetch)
                self.completed = True
            if armed and self.completed:
                self.held += msg
            else:
                out += self.held + msg
                self.held = bytearray()
        return bytes(out), None
