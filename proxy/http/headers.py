"""Pure header policy: hop-by-hop handling, what is forwarded, stored and replayed.

RFC 9110 §7.6.1: a proxy removes the hop-by-hop fields, including every field named in
`Connection`, before forwarding a message in either direction.
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
})
# Never stored: regenerated on every response (RFC 9110 §6.6.1 Date, §10.2.4 Server).
FRESH_ON_REPLAY = frozenset({"date", "server"})

Headers = CIMultiDictProxy[str] | CIMultiDict[str]


def hop_by_hop(headers: Headers) -> frozenset[str]:
    """The hop-by-hop field names of this message, the Connection-listed ones included."""
    listed = headers.getall("Connection", ())
    if not listed:
        return HOP_BY_HOP
    named = {t.strip().lower() for v in listed for t in v.split(",")}
    return HOP_BY_HOP | {n for n in named if n}


def end_to_end(headers: Headers, *, without: frozenset[str] = frozenset()
               ) -> list[tuple[str, str]]:
    """Every (name, value) pair that is not hop-by-hop (nor named, lower-case, in
    `without`), in order, duplicates kept."""
    drop = hop_by_hop(headers)
    if without:
        drop = drop | without
    return [(k, v) for k, v in headers.items() if k.lower() not in drop]


# Set by for_upstream itself (or the client library), whatever the client sent.
_REWRITTEN = frozenset({"content-length", "x-forwarded-for", "x-forwarded-proto",
                        "x-forwarded-host", "forwarded"})


def for_upstream(headers: Headers, *, client_ip: str | None, scheme: str,
                 upstream_host: str, trusted: bool = False) -> CIMultiDict[str]:
    """Request headers to send upstream: end-to-end ones plus X-Forwarded-*.

    `Host` is rewritten to the upstream's: the client's Host never selects another upstream
    (it is passed on as X-Forwarded-Host). Content-Length is set by the client library from
    the body we actually send. The client's X-Forwarded-* and Forwarded are replaced by
    what the proxy saw, unless the client is `trusted` (in trusted_proxies: a load
    balancer in front of the proxy): then X-Forwarded-For is appended to and the others
    kept (proxy/http/forwarded.py).
    """
    drop = hop_by_hop(headers)
    kept: list[tuple[str, str]] = []
    host = ""
    for k, v in headers.items():  # end_to_end's filter, in the same one pass
        lk = k.lower()
        if lk in drop:
            continue
        if lk == "host":
            host = v
        elif lk not in _REWRITTEN or (trusted and lk == "forwarded"):
            kept.append((k, v))
    out: CIMultiDict[str] = CIMultiDict(kept)
    prior = ", ".join(headers.getall("X-Forwarded-For", ())) if trusted else ""
    if client_ip:
        out["X-Forwarded-For"] = f"{prior}, {client_ip}" if prior else client_ip
    elif prior:
        out["X-Forwarded-For"] = prior
    out["X-Forwarded-Proto"] = headers.get("X-Forwarded-Proto", scheme) if trusted else scheme
    forwarded_host = headers.get("X-Forwarded-Host") if trusted else None
    if forwarded_host or host:
        out["X-Forwarded-Host"] = forwarded_host or host
    out["Host"] = upstream_host
    return out


def to_store(headers: Headers, *, keep_set_cookie: bool) -> list[tuple[str, str]]:
    """The response headers kept for replay: end-to-end, minus Date/Server (and Set-Cookie)."""
    return [(k, v) for k, v in end_to_end(headers)
            if k.lower() not in FRESH_ON_REPLAY
            and (keep_set_cookie or k.lower() != "set-cookie")]



def reply_and_store(headers: Headers, *, keep_set_cookie: bool
                    ) -> tuple[list[tuple[str, str]], tuple[tuple[str, str], ...]]:
    """One pass over the head of an answer read whole: the end-to-end headers for the
    client (Content-Length aside: the body in one piece sets its own) and those to store
    (`to_store`), each in order, duplicates kept."""
    drop = hop_by_hop(headers)
    reply: list[tuple[str, str]] = []
    stored: list[tuple[str, str]] = []
    for k, v in headers.items():
        lk = k.lower()
        if lk in drop:
            continue
        if lk != "content-length":
            reply.append((k, v))
        if lk not in FRESH_ON_REPLAY and (keep_set_cookie or lk != "set-cookie"):
            stored.append((k, v))
    return reply, tuple(stored)
