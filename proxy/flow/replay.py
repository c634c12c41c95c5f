"""Answer a retry from the stored response: status, headers and body as first sent."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from uuid import UUID

from aiohttp import web

from proxy import tracectx
from proxy.config import Route
from proxy.errors import StoredAnswerUnreadable, StoreError
from proxy.flow.decide import guard_headers as guard_headers  # the flow imports it from here
from proxy.flow.relay import ClientSink, pump
from proxy.http import cors
from proxy.http.responses import Relayed, RelayedWhole, stored_reason, typed
from proxy.sizes import CHUNK
from proxy.store import Record, Store

log = logging.getLogger("idemproxy.replay")


async def replay(request: web.BaseRequest, record: Record, *, route: Route, scope: str, key: str,
                 store: Store) -> web.StreamResponse:
    assert record.status is not None
    extra = {route.replay_header: "true", **guard_headers(route, record.expires_at)}
    if record.body_omitted:
        extra[route.omitted_header] = "omitted"
    reason, headers = stored_reason(record.headers)
    origin, headers = tracectx.stored_origin(headers)
    if origin is not None and (trace := tracectx.CURRENT.get()) is not None:
        named = trace.replayed(origin)  # a link to the execution repeated (tracing on)
        if named is not None:
            extra[named[0]] = named[1]
    resp: web.StreamResponse
    if record.body_chunks == 0:
        resp = RelayedWhole(status=record.status, reason=reason, body=record.body or b"",
                            typed=typed(headers))
    else:
        resp = Relayed(status=record.status, reason=reason, typed=typed(headers))
        resp.content_length = record.body_size
    for k, v in headers:
        if k.lower() != "content-length":
            resp.headers.add(k, v)
    resp.headers.update(extra)
    cors.expose_for(route, resp.headers)
    if record.body_chunks == 0:
        return resp
    sink = ClientSink(request, resp)
    await sink.start()
    await stream_stored(sink, store, scope=scope, key=key, token=record.lock_token,
                        sealed=record.sealed, size=record.body_size)
    return resp


async def stream_stored(sink: ClientSink, store: Store, *, scope: str, key: str,
                        token: UUID, sealed: bool, size: int) -> None:
    """Write a stored body's chunks from byte `sink.offered` on (0 for a replay; where a
    client fell behind a recording, execute._catch_up) and end the response; cut the
    connection instead of ever passing off a short or altered body."""
    start = sink.offered
    try:
        await pump(_from(store.read_chunks(scope=scope, key=key, token=token, sealed=sealed,
                                           start=start // CHUNK), skip=start % CHUNK),
                   sink)
        if sink.gone:
            return
    except (StoreError, StoredAnswerUnreadable) as exc:
        # headers are out: cut the connection, never a short or altered body
        log.error("store failed during a streamed replay: %s", exc)
        sink.abort()
        return
    if sink.offered != size:  # deleted under us: never pass off a short body
        log.error("stored body changed during replay (%d of %d bytes)", sink.offered, size)
        sink.abort()
        return
    await sink.finish()


async def _from(chunks: AsyncIterator[bytes], *, skip: int) -> AsyncIterator[bytes]:
    """`chunks` without its first `skip` bytes (less than one chunk)."""
    async for chunk in chunks:
        yield chunk[skip:] if skip else chunk
        skip = 0
