"""A small OTLP/HTTP trace receiver for the tests: POST /v1/traces with an
ExportTraceServiceRequest (protobuf, as the OTLP exporter sends it), decoded with
opentelemetry-proto into plain `ReceivedSpan`s."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.conftest import serve_app


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    service: str
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    attributes: dict[str, object]
    links: tuple[tuple[str, str], ...]  # (trace id, span id)
    status_code: int


def _value(v: AnyValue) -> object:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


@dataclass
class OtlpReceiver:
    spans: list[ReceivedSpan] = field(default_factory=list)
    url: str = ""

    async def _traces(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(raw)
        for rs in msg.resource_spans:
            res = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(ReceivedSpan(
                        s.name, str(res.get("service.name", "")), s.trace_id.hex(),
                        s.span_id.hex(), s.parent_span_id.hex(), s.kind,
                        {kv.key: _value(kv.value) for kv in s.attributes},
                        tuple((ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links),
                        s.status.code))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        return app

    async def wait_for(self, found: Callable[[list[ReceivedSpan]], bool], *,
                       timeout: float = 30.0) -> list[ReceivedSpan]:
        """The spans received, once `found` holds for them (polled; bounded by
        `timeout`, then the spans as they are, for the test's assertion to report)."""
        deadline = time.monotonic() + timeout
        while not found(self.spans) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return list(self.spans)


async def serve_receiver() -> AsyncIterator[OtlpReceiver]:
    rx = OtlpReceiver()
    async with serve_app(rx.app()) as rx.url:
        yield rx
