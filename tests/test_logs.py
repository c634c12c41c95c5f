"""Logs (design.md §7): one structured line per guarded request, never a raw key, a
credential or a body, in either format."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import uuid
from collections.abc import Iterator

import aiohttp
import pytest

from proxy import keys, logs
from tests.conftest import DEFAULT_ROUTES, ProxyHandle, free_port

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
    scope = keys.scope_of(r, keys.tenant_of(r, {"Authorization": CREDENTIAL}))
    return hashlib.sha256(f"{scope}\x1f{key}".encode()).hexdigest()[:16]


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
