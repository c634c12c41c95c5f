"""Logs (design.md §7): one structured line per guarded request, never a raw key, a
credential or a body, in either format."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import random
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import aiohttp
import pytest

from proxy import keys, logs
from tests.conftest import DEFAULT_ROUTES, ROOT, ProxyHandle, free_port

SECRET = uuid.uuid4().hex[:12]
CREDENTIAL = f"Bearer sk_live_cred{SECRET}"
KEY = f"key{SECRET}"
ORDER_ID = f"order{SECRET}"
BODY = f'{{"card": "4242424242424242", "memo": "body{SECRET}"}}'.encode()
ROUTES = """
- name: orders
  match: {methods: [PUT], path: "/orders/{order_id}"}
  key: {path: order_id}
- name: emails
  match: {methods: [POST], path: "/emails"}
  key: {body: [/memo]}
""" + DEFAULT_ROUTES


class Capture(logging.Handler):
    """Every record any logger emits, rendered in both formats."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def json_lines(self) -> list[str]:
        return [logs.JsonFormatter().format(r) for r in self.records]

    def text(self) -> str:
        return "\n".join(logs.TextFormatter().format(r) for r in self.records)


@pytest.fixture
def captured() -> Iterator[Capture]:
    root, cap = logging.getLogger(), Capture()
    level = root.level
    root.addHandler(cap)
    root.setLevel(logging.DEBUG)
    try:
        yield cap
    finally:
        root.removeHandler(cap)
        root.setLevel(level)


async def send(client: aiohttp.ClientSession, method: str, url: str, *,
               key: str | None = KEY, body: bytes = BODY) -> int:
    headers = {"Authorization": CREDENTIAL, "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    async with client.request(method, url, data=body, headers=headers) as r:
        await r.read()
        return r.status


def key_hash(p: ProxyHandle, route: str, key: str) -> str:
    r = next(r for r in p.config.routes if r.name == route)
    sealer = p.deps.store.sealer
    scope = keys.scope_of(r, keys.tenant_of(r, {"Authorization": CREDENTIAL},
                                            keyed=sealer.tenant_hash))
    return sealer.key_hash(scope, key)


def assert_no_secrets(cap: Capture) -> None:
    rendered = "\n".join(cap.json_lines()) + "\n" + cap.text()
    for record in cap.records:  # also what a third-party formatter could reach
        rendered += f"\n{record.msg!r} {record.args!r} {getattr(record, 'fields', '')!r}"
    for secret in (SECRET, CREDENTIAL, "sk_live", KEY, ORDER_ID, "4242424242424242"):
        assert secret not in rendered, f"{secret!r} leaked into the logs"


async def test_guarded_requests_log_hashes_never_key_credential_or_body(
        make_proxy, upstream, client, captured):
    """Forwarded, replayed, 422, 409, 400 and path- and body-keyed requests log the key
    hash, never the key, the Authorization credential or the body."""
    p = await make_proxy(ROUTES)
    assert await send(client, "POST", p.url + "/exec/pay") == 201
    assert await send(client, "POST", p.url + "/exec/pay") == 201
    assert await send(client, "POST", p.url + "/exec/pay", body=BODY + b" ") == 422
    gated = asyncio.create_task(send(client, "POST", p.url + "/gate/pay"))
    async with asyncio.timeout(5):
        while upstream.count("/gate/pay") == 0:
            await asyncio.sleep(0.01)
    assert await send(client, "POST", p.url + "/gate/pay") == 409
    upstream.gate.set()
    assert await gated == 201
    assert await send(client, "POST", p.url + "/gate/nokey", key=None) == 400
    assert await send(client, "POST", p.url + "/exec/x", key=KEY * 20) == 400
    assert await send(client, "PUT", p.url + f"/orders/{ORDER_ID}", key=None) == 200
    assert await send(client, "POST", p.url + "/emails", key=None) == 200
    assert_no_secrets(captured)
    lines = [json.loads(line) for line in captured.json_lines()]
    guarded = [d for d in lines if d["msg"] == "guarded request"]
    assert [d["outcome"] for d in guarded if d["route"] == "exec"] == [
        "forwarded", "replayed", "mismatch"]
    assert {d["key_hash"] for d in guarded if d["route"] == "exec"} == {
        key_hash(p, "exec", KEY)}
    assert key_hash(p, "orders", ORDER_ID) in {d["key_hash"] for d in guarded}
    assert {"exec", "gate", "orders", "emails"} <= {d["route"] for d in guarded}
    for d in guarded:
        assert {"route", "outcome", "status", "key_hash", "tenant", "duration_ms"} <= set(d)


async def test_upstream_and_store_failures_log_no_secrets(make_proxy, client, captured):
    """The 502 (upstream refused) and 503 (store down) paths log no secret either."""
    p = await make_proxy(ROUTES, upstream_url=f"http://127.0.0.1:{free_port()}")
    assert await send(client, "POST", p.url + "/exec/down", key=KEY + "down") == 502
    await p.deps.store.pool.close()
    assert await send(client, "POST", p.url + "/exec/down", key=KEY + "down") == 503
    assert_no_secrets(captured)
    outcomes = [json.loads(line).get("outcome") for line in captured.json_lines()]
    assert "upstream_error" in outcomes and "store_error" in outcomes


def test_json_format_is_one_object_per_line_even_with_a_traceback():
    """A JSON record, traceback included, is one line that parses, with its fields."""
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("idemproxy.test", logging.ERROR, __file__, 1, "failed %s",
                                   ("here",), sys.exc_info())
    record.fields = {"route": "charges", "status": 500}
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["msg"] == "failed here" and doc["level"] == "error"
    assert doc["route"] == "charges" and "ValueError: boom" in doc["error"]


def test_text_format_is_one_readable_line_with_fields():
    """The text format puts the message and key=value fields on one line."""
    record = logging.LogRecord("idemproxy.request", logging.INFO, __file__, 1,
                               "guarded request", (), None)
    record.fields = {"route": "charges", "outcome": "replayed", "status": 201}
    line = logs.TextFormatter().format(record)
    assert "\n" not in line and "INFO" in line
    assert line.endswith("guarded request route=charges outcome=replayed status=201")


@pytest.mark.parametrize("fmt,formatter", [("json", logs.JsonFormatter),
                                           ("text", logs.TextFormatter)])
def test_configure_installs_one_stderr_handler(fmt, formatter):
    """logs.configure replaces the root handlers with one stderr handler in the format."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        logs.configure(fmt=fmt, level="warning")
        assert len(root.handlers) == 1 and root.level == logging.WARNING
        assert isinstance(root.handlers[0].formatter, formatter)
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


# The request log line (proxy/logs.py RequestLog): written directly when only the stderr
# handler would see it, byte for byte what the logging path writes.

FIELDS = {"route": "charges", "outcome": "replayed", "status": 201,
          "key_hash": "0f" * 8, "tenant": "ab" * 16, "duration_ms": 0.12}
WHEN = 1795896612.845  # 2026-11-28T20:10:12.845+00:00


@pytest.fixture
def configure_logs() -> Iterator[Callable[..., logs.BufferedStderrHandler]]:
    """logs.configure as `serve` calls it, its handler writing to a StringIO; undone after."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level

    def configure(*, fmt: str = "json", level: str = "info") -> logs.BufferedStderrHandler:
        logs.configure(fmt=fmt, level=level)
        handler = root.handlers[0]
        assert isinstance(handler, logs.BufferedStderrHandler)
        handler.setStream(io.StringIO())
        return handler

    try:
        yield configure
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def request_log(when: float = WHEN) -> logs.RequestLog:
    return logs.RequestLog(logging.getLogger("idemproxy.request"), clock=lambda: when)


def formatted(when: float, fields: dict[str, object]) -> str:
    """What the logging path writes for the guarded-request record created at `when`."""
    logger = logging.getLogger("idemproxy.request")
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "guarded request",
                               (), None, extra={"fields": fields})
    record.created = when
    return logs.JsonFormatter().format(record)


def written(handler: logs.BufferedStderrHandler) -> list[str]:
    return handler.stream.getvalue().splitlines()


EDGE_TIMES = [WHEN, 1795896612.0, 1795896612.0005, 1795896612.9994999,
              1795896612.9995, 1795896612.9999996, 1795896612.999999, 1.5e9 + 0.0015]


def test_request_line_is_what_the_json_formatter_writes(configure_logs):
    """For the same instant and fields, the request line equals JsonFormatter's line: the
    same text, so the same keys in the same order and the same millisecond rounding."""
    handler = configure_logs()
    rng = random.Random(7)
    times = EDGE_TIMES + [rng.uniform(1.5e9, 2.5e9) for _ in range(500)]
    for when in times:
        fields = dict(FIELDS, status=rng.choice([200, 201, 409, 422, 503]),
                      duration_ms=round(rng.expovariate(0.1), 2))
        request_log(when)(**fields)
        expected = formatted(when, fields)
        line = written(handler)[-1]
        assert line == expected, when
        assert list(json.loads(line).items()) == list(json.loads(expected).items())
    assert len(written(handler)) == len(times)
    assert written(handler)[0].startswith('{"ts": "2026-11-28T20:10:12.845+00:00", '
                                          '"level": "info", "logger": "idemproxy.request", '
                                          '"msg": "guarded request", "route": "charges"')


@pytest.mark.parametrize("route", ['say "hi"', "back\\slash", "café ✓ 注文", "tab\there"])
def test_request_line_escapes_route_names_as_json_does(configure_logs, route):
    """A route name with quotes, backslashes, control or non-ASCII characters is escaped
    exactly as json.dumps escapes it, and reads back as the name."""
    handler = configure_logs()
    fields = dict(FIELDS, route=route)
    request_log()(**fields)
    [line] = written(handler)
    assert line == formatted(WHEN, fields) and line.isascii()
    assert json.loads(line)["route"] == route


def test_request_line_goes_through_logging_when_another_handler_listens(configure_logs):
    """With another handler on the root logger, the record reaches it (fields in order)
    and the stderr handler still writes its line."""
    handler = configure_logs()
    cap = Capture()
    logging.getLogger().addHandler(cap)
    request_log()(**FIELDS)
    [record] = cap.records
    assert record.getMessage() == "guarded request" and record.levelno == logging.INFO
    assert list(record.fields.items()) == list(FIELDS.items())
    [line] = written(handler)
    assert line == formatted(record.created, FIELDS)


def test_request_line_keeps_the_text_format_levels_and_filters(configure_logs):
    """The text format still gets its key=value line; a level above INFO or a handler
    filter that drops the record writes nothing."""
    handler = configure_logs(fmt="text")
    request_log()(**FIELDS)
    [line] = written(handler)
    assert line.endswith(" INFO    guarded request route=charges outcome=replayed "
                         f"status=201 key_hash={'0f' * 8} tenant={'ab' * 16} duration_ms=0.12")
    handler = configure_logs(level="warning")
    request_log()(**FIELDS)
    assert written(handler) == []
    handler = configure_logs()
    handler.addFilter(lambda record: False)
    request_log()(**FIELDS)
    assert written(handler) == []


def test_request_line_is_flushed_by_the_handler_rules(configure_logs, tmp_path):
    """The line waits in the buffer until `max_delay` has passed or logs.flush() runs."""
    handler = configure_logs()
    out = tmp_path / "stderr"
    handler.setStream(io.TextIOWrapper(io.BufferedWriter(io.FileIO(out, "w"), 1 << 16)))
    handler.max_delay = 3600
    request_log()(**FIELDS)
    assert out.read_text() == ""
    logs.flush()
    assert out.read_text() == formatted(WHEN, FIELDS) + "\n"
    handler.max_delay = 0
    request_log()(**FIELDS)
    assert out.read_text().count("guarded request") == 2
    handler.stream.close()


def test_request_line_failure_is_reported_not_raised(configure_logs, capsys):
    """A stream that fails makes the line a logging error on stderr, never an exception
    in the request path."""
    handler = configure_logs()
    handler.stream.close()
    request_log()(**FIELDS)
    assert "--- Logging error ---" in capsys.readouterr().err


FINISH = """
from prometheus_client import CollectorRegistry
from proxy import logs

from proxy.config import Route
from proxy.flow.context import Deps, Guarded, finish
from proxy.metrics import Metrics, Outcome
from proxy.http.routing import PathPattern
logs.configure()
route = Route(name="charges", methods=frozenset({"POST"}), path=PathPattern.compile("/c"))
g = Guarded(route=route, scope="charges:" + "ab" * 16, key="order-1", fingerprint=b"", body=b"",
            key_hash="0f" * 8)
finish(Deps(store=None, forwarder=None, metrics=Metrics(CollectorRegistry())), g, route,
       Outcome.REPLAYED, 201)
"""


def test_finish_writes_the_request_line_to_stderr():
    """`finish` in a process configured as `serve` puts one JSON line on stderr
    with the request's fields, by exit at the latest."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMPROXY_")}
    proc = subprocess.run([sys.executable, "-c", FINISH], cwd=ROOT, env=env,
                          capture_output=True, timeout=60, check=True)
    [line] = proc.stderr.decode().splitlines()
    doc = json.loads(line)
    assert list(doc) == ["ts", "level", "logger", "msg", "route", "outcome", "status",
                         "key_hash", "tenant", "duration_ms"]
    assert doc["msg"] == "guarded request" and doc["outcome"] == "replayed"
    assert doc["key_hash"] == "0f" * 8
    assert doc["tenant"] == "ab" * 16 and doc["status"] == 201


async def test_a_refused_guarded_request_logs_one_line(make_proxy, client, captured):
    """A 422 or 409 logs its one "guarded request" line and no second "request refused";
    a refusal with no guarded line (400, no key) still logs one, on the same connection."""
    p = await make_proxy(ROUTES)
    key = uuid.uuid4().hex
    assert await send(client, "POST", p.url + "/exec/one", key=key) == 201
    captured.records.clear()
    assert await send(client, "POST", p.url + "/exec/one", key=key, body=BODY + b" ") == 422
    assert await send(client, "POST", p.url + "/gate/nokey", key=None) == 400
    msgs = [(r.getMessage(), getattr(r, "fields", {}).get("status")) for r in captured.records
            if r.name.startswith("idemproxy") and r.levelno >= logging.INFO]
    assert msgs == [("guarded request", 422), ("request refused", 400)], msgs


def test_text_format_timestamps_have_milliseconds():
    """Text lines carry HH:MM:SS.mmm, so lines within one second keep their order."""
    record = logging.LogRecord("idemproxy", logging.INFO, __file__, 1, "m", (), None)
    record.created, record.msecs = 1_700_000_000.25, 250.0
    line = logs.TextFormatter().format(record)
    assert re.match(r"^\d\d:\d\d:\d\d\.250 INFO", line), line


def test_a_store_error_without_a_message_is_still_named():
    """A bare TimeoutError from the database becomes "TimeoutError", never "TimeoutError: "."""
    from proxy.store.pool import unavailable
    assert str(unavailable(TimeoutError())) == "TimeoutError"
    assert str(unavailable(OSError("refused"))) == "OSError: refused"
