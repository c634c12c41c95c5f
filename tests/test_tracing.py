"""OpenTelemetry traces (docs/tracing.md) exported over OTLP/HTTP to a real receiver
(tests/otlp_receiver.py): parentage client -> proxy -> upstream, a replay linked to the
execution it repeats across two proxies on one store, nothing secret in a span, the ids
in the request log line, and no SDK loaded while tracing is off."""

from __future__ import annotations

import asyncio
import logging
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import pytest

from proxy.config import loads
from proxy.errors import ConfigError
from tests.conftest import DEFAULT_ROUTES, ROOT
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan, serve_receiver
from tests.test_at_rest import K1, assert_absent, table_rows_text
from tests.test_flow import new_key, post
from tests.test_logs import Capture

SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
TRACING = "tracing:\n  enabled: true\n"
ROUTES = """
- name: orders
  match: {methods: [PUT], path: "/orders/{order_id}"}
  key: {path: order_id}
- name: waits
  match: {methods: [POST], path: "/exec/wait/*"}
  concurrent: wait
""" + DEFAULT_ROUTES


@pytest.fixture
def records() -> Iterator[Capture]:
    """Every log record while the test runs."""
    root, cap = logging.getLogger(), Capture()
    level = root.level
    root.addHandler(cap)
    root.setLevel(logging.DEBUG)
    try:
        yield cap
    finally:
        root.removeHandler(cap)
        root.setLevel(level)


@pytest.fixture
async def otlp(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OtlpReceiver]:
    """A receiver the proxies started in the test export to, every 50 ms."""
    async for rx in serve_receiver():
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        yield rx


def traceparent() -> tuple[str, str, str]:
    """A sampled W3C traceparent from a client: (header, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def servers(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.kind == SERVER and s.trace_id == trace_id]


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> dict[str, ReceivedSpan]:
    return {s.name: s for s in spans
            if s.trace_id == parent.trace_id and s.parent_span_id == parent.span_id}


async def test_client_proxy_and_upstream_spans_form_one_trace(otlp, make_proxy, upstream,
                                                              client):
    """The proxy's server span continues the client's trace; claim, completion and the
    upstream call (a client span) are its children; the upstream receives the client
    span's context in traceparent and the trace id as X-Request-Id."""
    p = await make_proxy(ROUTES, extra=TRACING)
    header, trace_id, client_span = traceparent()
    status, _, _ = await post(client, p.url + "/exec/pay", key=new_key(),
                              headers={"traceparent": header})
    assert status == 201
    spans = await otlp.wait_for(lambda got: any(
        s.kind == CLIENT and s.trace_id == trace_id for s in got) and bool(servers(got,
                                                                               trace_id)))
    [server] = servers(spans, trace_id)
    assert server.parent_span_id == client_span and server.service == "idemproxy"
    assert server.name == "POST /exec/*" and server.attributes["http.route"] == "/exec/*"
    assert server.attributes["idempotency.outcome"] == "forwarded"
    assert server.attributes["idempotency.replayed"] is False
    kids = children(spans, server)
    assert {"idempotency.claim", "idempotency.complete", "POST"} <= set(kids)
    assert kids["POST"].kind == CLIENT
    sent = {k.lower(): v for k, v in upstream.executions[-1].headers.items()}
    assert sent["traceparent"] == f"00-{trace_id}-{kids['POST'].span_id}-01"
    assert sent["x-request-id"] == trace_id


async def test_a_replay_links_to_the_original_execution_across_two_proxies(
        otlp, make_proxy, upstream, client):
    """A replay answered by another proxy on the same store carries a link to the first
    execution's server span and names its trace in Idempotent-Original-Trace."""
    first, second = (await make_proxy(ROUTES, extra=TRACING),
                     await make_proxy(ROUTES, extra=TRACING))
    key = new_key()
    s1, h1, b1 = await post(client, first.url + "/exec/charge", key=key)
    s2, h2, b2 = await post(client, second.url + "/exec/charge", key=key)
    assert (s1, s2) == (201, 201) and b1 == b2 and upstream.count("/exec/charge") == 1
    assert "Idempotent-Original-Trace" not in h1
    origin = h2["Idempotent-Original-Trace"]
    spans = await otlp.wait_for(lambda got: len(
        [s for s in got if s.kind == SERVER]) >= 2 and any(s.links for s in got))
    [original] = servers(spans, origin)
    assert original.attributes["idempotency.outcome"] == "forwarded"
    [replayed] = [s for s in spans if s.kind == SERVER
                  and s.attributes.get("idempotency.replayed") is True]
    assert replayed.trace_id != origin
    assert (origin, original.span_id) in replayed.links
    assert children(spans, replayed)["idempotency.replay"].links == (
        (origin, original.span_id),)
    assert not any(":origin" in k.lower() for k in h2)


async def test_original_trace_header_null_sends_none(otlp, make_proxy, upstream, client):
    """tracing.original_trace_header: null: a replay names no original trace."""
    p = await make_proxy(ROUTES, extra=TRACING + "  original_trace_header: null\n")
    key = new_key()
    await post(client, p.url + "/exec/n", key=key)
    status, headers, _ = await post(client, p.url + "/exec/n", key=key)
    assert status == 201 and headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Original-Trace" not in headers


async def test_a_wait_is_a_span_of_the_waiting_request(otlp, make_proxy, upstream, client):
    """A retry held while its key is in flight (concurrent: wait) has a wait span, and
    its answer is a replay linked to the execution it waited for."""
    p = await make_proxy(ROUTES, extra=TRACING)
    key = new_key()
    first = asyncio.create_task(post(client, p.url + "/exec/wait/slow?delay=0.5", key=key))
    while upstream.count("/exec/wait/slow") == 0:
        await asyncio.sleep(0.01)
    status, headers, _ = await post(client, p.url + "/exec/wait/slow?delay=0.5", key=key)
    assert status == (await first)[0] and upstream.count("/exec/wait/slow") == 1
    waiter_trace = headers.get("Idempotent-Original-Trace")
    assert waiter_trace is not None
    spans = await otlp.wait_for(lambda got: any(s.name == "idempotency.wait" for s in got))
    [wait] = [s for s in spans if s.name == "idempotency.wait"]
    [waiter] = [s for s in spans if s.span_id == wait.parent_span_id]
    assert waiter.kind == SERVER and waiter.attributes["idempotency.replayed"] is True


async def test_no_span_holds_the_key_a_credential_or_the_body(otlp, make_proxy, upstream,
                                                              client):
    """Keys (header or path), Authorization and bodies never reach a span: names and
    attributes hold hashes and templates only."""
    p = await make_proxy(ROUTES, extra=TRACING)
    secret = secrets.token_hex(8)
    body = f'{{"memo": "body{secret}"}}'.encode()
    auth = {"Authorization": f"Bearer cred{secret}"}
    for _ in range(2):  # an execution and a replay of each
        await post(client, p.url + "/exec/x", key=f"key{secret}", data=body, headers=auth)
        await post(client, p.url + f"/orders/order{secret}", method="PUT", data=body,
                   headers=auth)
    spans = await otlp.wait_for(lambda got: len(
        [s for s in got if s.kind == SERVER]) >= 4)
    assert len([s for s in spans if s.kind == SERVER]) == 4
    assert any(s.attributes.get("http.route") == "/orders/{order_id}" for s in spans)
    text = repr([(s.name, s.attributes) for s in spans])
    assert secret not in text and "idempotency.key_hash" in text


async def test_request_log_line_carries_request_and_trace_ids(otlp, make_proxy, upstream,
                                                              client, records):
    """With tracing on, a guarded request's log line has the request id (X-Request-Id
    when the client sent one), trace and span ids, method and path template."""
    p = await make_proxy(ROUTES, extra=TRACING)
    header, trace_id, _ = traceparent()
    await post(client, p.url + "/exec/logged", key=new_key(),
               headers={"traceparent": header, "X-Request-Id": "req-42"})

    def lines() -> list[dict[str, object]]:
        return [r.fields for r in records.records  # type: ignore[attr-defined]
                if r.name == "idemproxy.request"
                and getattr(r, "fields", {}).get("trace_id") == trace_id]
    for _ in range(200):  # the line is written once the answer is stored
        if lines():
            break
        await asyncio.sleep(0.05)
    [fields] = lines()
    assert fields["request_id"] == "req-42" and len(fields["span_id"]) == 16
    assert (fields["method"], fields["path"]) == ("POST", "/exec/*")
    sent = {k.lower(): v for k, v in upstream.executions[-1].headers.items()}
    assert sent["x-request-id"] == "req-42"


def test_tracing_config_defaults_and_bounds():
    """tracing is off by default; sample_ratio must lie in [0, 1]."""
    cfg = loads("upstream: {url: 'http://127.0.0.1:9'}\n", env={})
    assert (cfg.tracing.enabled, cfg.tracing.service_name, cfg.tracing.sample_ratio) == (
        False, "idemproxy", 1.0)
    assert cfg.tracing.original_trace_header == "Idempotent-Original-Trace"
    with pytest.raises(ConfigError, match="tracing.sample_ratio"):
        loads("tracing: {sample_ratio: 1.5}\n", env={})


def test_without_tracing_no_opentelemetry_module_is_loaded():
    """tracing.enabled false: serving imports nothing of OpenTelemetry."""
    code = ("import sys, proxy.cli, proxy.runtime, proxy.app, proxy.supervisor\n"
            "print([m for m in sys.modules if m.startswith(('opentelemetry', "
            "'proxy.tracing'))])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]"


async def test_the_stored_origin_is_sealed_with_the_headers(otlp, make_proxy, upstream,
                                                            client, db):
    """With encryption on, the original execution's trace id is in no column of any
    idemproxy table, yet a replay still names it and links to it."""
    p = await make_proxy(ROUTES, extra=TRACING, encryption_keys=K1)
    key = new_key()
    await post(client, p.url + "/exec/sealed", key=key)
    status, headers, _ = await post(client, p.url + "/exec/sealed", key=key)
    assert status == 201 and headers["Idempotent-Replayed"] == "true"
    origin = headers["Idempotent-Original-Trace"]
    spans = await otlp.wait_for(lambda got: bool(servers(got, origin)))
    [original] = servers(spans, origin)
    dump = await table_rows_text(db, key=key)
    assert_absent(dump, origin.encode())
    assert_absent(dump, original.span_id.encode())
