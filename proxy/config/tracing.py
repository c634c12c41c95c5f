"""The `tracing` section (docs/tracing.md): a module of its own so that schema.py stays
one screenful of sections; it imports nothing, so schema.py can."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tracing:
    """OpenTelemetry traces (docs/tracing.md); the exporter reads the OTEL_* variables."""

    enabled: bool = False  # off: the OpenTelemetry SDK is not even imported
    service_name: str = "idemproxy"  # service.name, unless OTEL_SERVICE_NAME says otherwise
    sample_ratio: float = 1.0  # parent-based: a sampled client's request is always kept
    # on a replay: the trace id of the execution it repeats; None: not sent
    original_trace_header: str | None = "Idempotent-Original-Trace"
