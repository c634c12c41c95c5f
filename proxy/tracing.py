"""OpenTelemetry traces: one more observer of the flow (proxy/observe.py), plus the
context it needs. Imported only when `tracing.enabled` is true (proxy/app.py), so a
process without tracing never loads the SDK.

    server span   per proxied request (guarded or not): the client's traceparent,
                  tracestate and baggage extracted (OTEL_PROPAGATORS)
      idempotency.claim / .complete / .release   the store calls (TracedStore)
      idempotency.wait                           a retry held while its key is in flight
      <METHOD> (client)                          the upstream call; its context goes
                                                 upstream in traceparent
      idempotency.replay                         a replay, linked to the original span

Spans go out over OTLP/HTTP as the standard OTEL_* variables say (the exporter reads
OTEL_EXPORTER_OTLP_ENDPOINT and the rest; BatchSpanProcessor OTEL_BSP_*). Attributes
never hold the key, the path (it may hold the key), credentials or bodies: the key's and
the tenant's hashes, the route's name and path template only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from proxy import tracectx
from proxy.config import Config
from proxy.observe import BaseObserver, Outcome, Verdict
from proxy.store import Completion, Store

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
REQUEST_ID = "X-Request-Id"
_NS = 1_000_000_000


class RequestTrace:
    """One request's spans and ids (tracectx.RequestTrace), kept in tracectx.CURRENT."""

    __slots__ = ("client", "method", "owner", "request_id", "server", "wait")

    def __init__(self, owner: Tracing, server: trace.Span, method: str,
                 request_id: str) -> None:
        self.owner, self.server, self.method = owner, server, method
        self.request_id = request_id
        self.client: trace.Span | None = None  # the upstream call, while it runs
        self.wait: trace.Span | None = None

    def outgoing(self, method: str, headers: CIMultiDict[str]) -> None:
        if self.client is not None:  # one call per request; a second closes the first
            self.client.end()
        client = self.owner.tracer.start_span(method, kind=SpanKind.CLIENT, attributes={
            "http.request.method": method})
        self.client = client
        ctx = trace.set_span_in_context(client)
        for name in ("traceparent", "tracestate"):  # ours replace the client's
            headers.popall(name, None)
        propagate.inject(headers, context=ctx)
        if REQUEST_ID not in headers:
            headers[REQUEST_ID] = self.request_id

    def replayed(self, origin: str) -> tuple[str, str] | None:
        ids = tracectx.parse_origin(origin)
        if ids is None:
            return None
        original = SpanContext(trace_id=ids[0], span_id=ids[1], is_remote=True,
                               trace_flags=TraceFlags(TraceFlags.SAMPLED))
        attrs = {"idempotency.original_trace_id": f"{ids[0]:032x}"}
        self.server.add_link(original, attrs)
        self.owner.tracer.start_span(
            "idempotency.replay", links=[Link(original, attrs)]).end()
        header = self.owner.original_header
        return None if header is None else (header, f"{ids[0]:032x}")

    def log_fields(self, route: str) -> tuple[tuple[str, str], ...]:
        ctx = self.server.get_span_context()
        return (("request_id", self.request_id), ("trace_id", f"{ctx.trace_id:032x}"),
                ("span_id", f"{ctx.span_id:016x}"), ("method", self.method),
                ("path", self.owner.templates.get(route, "")))

    def origin(self) -> str | None:
        """ORIGIN's value for this request's execution, if it has ids."""
        ctx = self.server.get_span_context()
        return tracectx.origin_value(ctx.trace_id, ctx.span_id) if ctx.is_valid else None

    def close(self, status: int) -> None:
        for span in (self.wait, self.client):
            if span is not None:
                if span is self.client and status:
                    span.set_attribute("http.response.status_code", status)
                span.end()
        self.wait = self.client = None


class Tracing(BaseObserver):
    """The tracer provider, the handler wrapper and the observer, for one process."""

    def __init__(self, cfg: Config, *, exporter: SpanExporter | None = None) -> None:
        t = cfg.tracing
        name = os.environ.get("OTEL_SERVICE_NAME") or t.service_name
        self.provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: name}),
            sampler=ParentBased(TraceIdRatioBased(t.sample_ratio)))
        self.provider.add_span_processor(BatchSpanProcessor(exporter or OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("idemproxy")
        self.original_header = t.original_trace_header
        self.templates = {r.name: r.path.text for r in cfg.routes}

    def shutdown(self) -> None:
        """Export what is left and stop (at the end of create_app's block)."""
        self.provider.shutdown()

    def wrap(self, handler: Handler) -> Handler:
        """`handler` inside a server span per request."""
        tracer = self.tracer

        async def traced(request: web.BaseRequest) -> web.StreamResponse:
            parent = propagate.extract(request.headers)
            span = tracer.start_span(request.method, context=parent, kind=SpanKind.SERVER,
                                     attributes=_request_attributes(request))
            ctx = span.get_span_context()
            rt = RequestTrace(self, span, request.method,
                              request.headers.get(REQUEST_ID) or f"{ctx.trace_id:032x}")
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            mine = tracectx.CURRENT.set(rt)
            status = 0
            try:
                resp = await handler(request)
                status = resp.status
                span.set_attribute("http.response.status_code", status)
                if status >= 400:
                    _problem(span, resp)
                return resp
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise
            finally:
                rt.close(status)
                span.end()
                tracectx.CURRENT.reset(mine)
                otel_context.detach(token)
        return traced

    def traced_store(self, store: Store) -> Store:
        return TracedStore(store, self)

    # --- the observer (proxy/observe.py) ----------------------------------------------

    def request_done(self, verdict: Verdict) -> None:
        rt = tracectx.CURRENT.get()
        if not isinstance(rt, RequestTrace):
            return
        span = rt.server
        template = self.templates.get(verdict.route)
        if template is not None:
            span.set_attribute("http.route", template)
            span.update_name(f"{rt.method} {template}")
        span.set_attribute("idempotency.route", verdict.route)
        span.set_attribute("idempotency.outcome", verdict.outcome.value)
        span.set_attribute("idempotency.replayed", verdict.outcome is Outcome.REPLAYED)
        if verdict.guarded:
            span.set_attribute("idempotency.key_hash", verdict.key_hash)
            span.set_attribute("idempotency.tenant_hash", verdict.tenant)

    def upstream_timed(self, route: str, start: float, end: float) -> None:
        rt = tracectx.CURRENT.get()
        if isinstance(rt, RequestTrace) and rt.client is not None:
            rt.client.end(end_time=_wall_ns(end))  # the upstream's headers arrived
            rt.client = None

    def waiting(self, delta: int) -> None:
        rt = tracectx.CURRENT.get()
        if not isinstance(rt, RequestTrace):
            return
        if delta > 0 and rt.wait is None:
            rt.wait = self.tracer.start_span("idempotency.wait")
        elif delta < 0 and rt.wait is not None:
            rt.wait.end()
            rt.wait = None

    def takeover(self, route: str) -> None:
        rt = tracectx.CURRENT.get()
        if isinstance(rt, RequestTrace):
            rt.server.add_event("idempotency.takeover")


class TracedStore:
    """The flow's store with a span around each claim, completion and release; a
    completion also stores the execution's ids (tracectx.ORIGIN). Everything else is the
    store's own."""

    def __init__(self, store: Store, owner: Tracing) -> None:
        self._store, self._tracer = store, owner.tracer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def claim(self, **kw: Any) -> Any:
        with self._tracer.start_as_current_span("idempotency.claim") as span:
            claim = await self._store.claim(**kw)
            span.set_attribute("idempotency.claim", claim.outcome.name.lower())
            return claim

    async def complete(self, *, done: Completion, **kw: Any) -> Any:
        done = done._replace(headers=tracectx.with_origin(done.headers))
        with self._tracer.start_as_current_span("idempotency.complete"):
            return await self._store.complete(done=done, **kw)

    async def release(self, **kw: Any) -> Any:
        with self._tracer.start_as_current_span("idempotency.release"):
            return await self._store.release(**kw)


def _request_attributes(request: web.BaseRequest) -> dict[str, str | int]:
    """HTTP semantic conventions, minus url.path and url.query: either may hold a key."""
    return {
        "http.request.method": request.method,
        "network.protocol.version": f"{request.version.major}.{request.version.minor}",
        "url.scheme": request.scheme,
    }


def _problem(span: trace.Span, resp: web.StreamResponse) -> None:
    """An error answer: its RFC 9457 problem type as the span's error.type."""
    kind = str(resp.status)
    if isinstance(resp, web.Response) and resp.content_type == "application/problem+json":
        try:
            kind = str(json.loads(resp.body or b"{}").get("type") or kind)  # type: ignore[arg-type]
        except (ValueError, AttributeError, TypeError):
            pass
    span.set_attribute("idempotency.problem_type", kind)
    if resp.status >= 500:
        span.set_attribute("error.type", kind)
        span.set_status(Status(StatusCode.ERROR, kind))


def _wall_ns(perf: float) -> int:
    """A perf_counter reading as the wall-clock nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.perf_counter() - perf) * _NS)
