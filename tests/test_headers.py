"""Pure header policy (RFC 9110 §7.6.1): what is forwarded, stored and replayed."""

from __future__ import annotations

from multidict import CIMultiDict

from proxy.http import headers


def _upstream_answer() -> CIMultiDict[str]:
    return CIMultiDict([
        ("Content-Type", "application/json"), ("Connection", "keep-alive, X-Trace-Hop"),
        ("Keep-Alive", "timeout=5"), ("Transfer-Encoding", "chunked"), ("X-Trace-Hop", "1"),
        ("Date", "Sat, 28 Nov 2026 10:00:00 GMT"), ("Server", "legacy/1"),
        ("Set-Cookie", "a=1"), ("X-Multi", "one"), ("X-Multi", "two"), ("Trailer", "X"),
        ("Upgrade", "h2c"), ("Proxy-Authenticate", "Basic"),
    ])


def test_hop_by_hop_fields_are_never_stored():
    """Connection, Keep-Alive, TE, Trailer, Upgrade, Proxy-* and Connection-listed names
    are dropped before storing; Date and Server too (fresh on replay)."""
    stored = headers.to_store(_upstream_answer(), keep_set_cookie=False)
    assert stored == [("Content-Type", "application/json"), ("X-Multi", "one"),
                      ("X-Multi", "two")]


def test_set_cookie_is_stored_only_when_the_route_opts_in():
    """replay_set_cookie: true keeps Set-Cookie, in place."""
    stored = headers.to_store(_upstream_answer(), keep_set_cookie=True)
    assert ("Set-Cookie", "a=1") in stored
    assert ("Server", "legacy/1") not in stored


def test_an_answer_read_whole_splits_into_reply_and_stored_headers_in_one_pass():
    """reply_and_store gives the end-to-end headers without Content-Length (for the
    client) and exactly what to_store keeps, both in order with duplicates."""
    answer = _upstream_answer()
    answer.add("Content-Length", "2")
    for keep in (False, True):
        reply, stored = headers.reply_and_store(answer, keep_set_cookie=keep)
        assert stored == tuple(headers.to_store(answer, keep_set_cookie=keep))
        assert reply == [(k, v) for k, v in headers.end_to_end(answer)
                         if k.lower() != "content-length"]
        assert ("Date", "Sat, 28 Nov 2026 10:00:00 GMT") in reply


def test_forwarded_request_headers():
    """Upstream requests lose hop-by-hop fields, get X-Forwarded-*, and the upstream's Host."""
    incoming = CIMultiDict([("Host", "api.example"), ("Connection", "close, X-Hop"),
                            ("X-Hop", "1"), ("TE", "trailers"), ("Content-Length", "3"),
                            ("X-Forwarded-For", "10.0.0.1"), ("Accept", "*/*")])
    out = headers.for_upstream(incoming, client_ip="127.0.0.1", scheme="http",
                               upstream_host="127.0.0.1:9000", trusted=True)
    assert out["Host"] == "127.0.0.1:9000" and out["X-Forwarded-Host"] == "api.example"
    assert out["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    assert out["X-Forwarded-Proto"] == "http" and out["Accept"] == "*/*"
    for gone in ("Connection", "X-Hop", "TE", "Content-Length"):
        assert gone not in out


def test_forwarded_headers_from_an_untrusted_client_are_replaced():
    """A client not in trusted_proxies cannot choose X-Forwarded-For/-Proto/-Host or
    Forwarded: they are what the proxy saw."""
    incoming = CIMultiDict([("Host", "api.example"), ("X-Forwarded-For", "6.6.6.6"),
                            ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "bank"),
                            ("Forwarded", "for=6.6.6.6;proto=https")])
    for trusted, want in ((False, ("10.1.1.1", "http", "api.example", None)),
                          (True, ("6.6.6.6, 10.1.1.1", "https", "bank",
                                  "for=6.6.6.6;proto=https"))):
        out = headers.for_upstream(incoming, client_ip="10.1.1.1", scheme="http",
                                   upstream_host="up:1", trusted=trusted)
        assert (out["X-Forwarded-For"], out["X-Forwarded-Proto"], out["X-Forwarded-Host"],
                out.get("Forwarded")) == want
