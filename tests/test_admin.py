"""The admin API (design.md §4, §7): each verb, its problem+json errors, token auth beyond
loopback, and the metrics it exports after traffic."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__, keys
from tests.conftest import CLIENT_AUTH, ProxyHandle
from tests.upstream import TestUpstream, body_json

PROBLEM = "application/problem+json"
TOKEN = "adm-" + uuid.uuid4().hex
TOKEN_ENV = "IDEMPROXY_TEST_ADMIN_TOKEN"
BEYOND_LOOPBACK = f"admin:\n  listen: 0.0.0.0:9090\n  token_env: {TOKEN_ENV}"


def scope_for(p: ProxyHandle, route: str, headers: dict[str, str] | None = None) -> str:
    r = next(r for r in p.config.routes if r.name == route)
    return keys.scope_of(r, keys.tenant_of(r, headers or CLIENT_AUTH,
                                           keyed=p.deps.store.sealer.tenant_hash))


async def call(client: aiohttp.ClientSession, method: str, url: str, *,
               params: dict[str, str] | None = None, headers: dict[str, str] | None = None
               ) -> tuple[int, dict[str, str], dict[str, object]]:
    async with client.request(method, url, params=params, headers=headers) as r:
        return r.status, dict(r.headers), body_json(await r.read())


async def post(client: aiohttp.ClientSession, url: str, key: str) -> tuple[int, bytes]:
    async with client.post(url, data=b"{}", headers={"Idempotency-Key": key}) as r:
        return r.status, await r.read()


async def wait_for_executions(upstream: TestUpstream, path: str, n: int = 1) -> None:
    async with asyncio.timeout(5):
        while upstream.count(path) < n:
            await asyncio.sleep(0.01)


async def test_show_returns_a_completed_keys_record(make_proxy, client):
    """GET /admin/keys shows state, status, times and size, never the stored body."""
    p = await make_proxy()
    key = uuid.uuid4().hex
    await post(client, p.url + "/exec/show", key)
    s, h, doc = await call(client, "GET", p.admin_url + "/admin/keys",
                           params={"scope": scope_for(p, "exec"), "key": key})
    assert s == 200 and h["Content-Type"].startswith("application/json")
    assert doc["state"] == "completed" and doc["status"] == 201 and doc["key"] == key
    assert {"created_at", "completed_at", "expires_at", "body_size", "takeovers"} <= set(doc)
    assert doc["body_size"] > 0 and "body" not in doc


async def test_delete_forgets_a_key_so_the_next_request_executes(make_proxy, upstream, client):
    """DELETE /admin/keys removes the record; the retry runs upstream again; a second
    DELETE is a 404 problem."""
    p = await make_proxy()
    key = uuid.uuid4().hex
    await post(client, p.url + "/exec/del", key)
    params = {"scope": scope_for(p, "exec"), "key": key}
    s, _, doc = await call(client, "DELETE", p.admin_url + "/admin/keys", params=params)
    assert (s, doc) == (200, {"deleted": True})
    await post(client, p.url + "/exec/del", key)
    assert upstream.count("/exec/del") == 2
    await call(client, "DELETE", p.admin_url + "/admin/keys", params=params)
    s, h, doc = await call(client, "DELETE", p.admin_url + "/admin/keys", params=params)
    assert s == 404 and h["Content-Type"] == PROBLEM
    assert doc["type"] == "https://idemproxy.dev/errors/not-found"


async def test_in_flight_lists_a_stuck_claim_and_release_frees_it(make_proxy, upstream, client):
    """/admin/in-flight lists a running claim; POST /admin/keys/release ends it, so a retry
    forwards again instead of getting 409."""
    p = await make_proxy()
    key = uuid.uuid4().hex
    first = asyncio.create_task(post(client, p.url + "/gate/stuck", key))
    await wait_for_executions(upstream, "/gate/stuck")
    s, _, doc = await call(client, "GET", p.admin_url + "/admin/in-flight")
    assert s == 200
    mine = [r for r in doc["in_flight"] if r["key"] == key]  # type: ignore[union-attr]
    assert len(mine) == 1 and mine[0]["state"] == "in_flight"
    assert (await post(client, p.url + "/gate/stuck", key))[0] == 409
    params = {"scope": mine[0]["scope"], "key": key}
    s, _, doc = await call(client, "POST", p.admin_url + "/admin/keys/release", params=params)
    assert (s, doc) == (200, {"released": True})
    upstream.gate.set()
    await first
    assert (await post(client, p.url + "/gate/stuck", key))[0] == 201
    assert upstream.count("/gate/stuck") == 2


async def test_release_of_a_completed_key_is_404(make_proxy, client):
    """Only in-flight claims can be released; a completed key answers a 404 problem."""
    p = await make_proxy()
    key = uuid.uuid4().hex
    await post(client, p.url + "/exec/rel", key)
    s, h, doc = await call(client, "POST", p.admin_url + "/admin/keys/release",
                           params={"scope": scope_for(p, "exec"), "key": key})
    assert s == 404 and h["Content-Type"] == PROBLEM and "in-flight" in str(doc["detail"])


@pytest.mark.parametrize("method,path,params,status", [
    ("GET", "/admin/keys", {}, 400),
    ("DELETE", "/admin/keys", {"scope": "exec:-"}, 400),
    ("POST", "/admin/keys/release", {"key": "k"}, 400),
    ("GET", "/admin/in-flight", {"limit": "lots"}, 400),
    ("GET", "/admin/keys", {"scope": "exec:-", "key": "never-used"}, 404),
    ("GET", "/admin/nothing-here", {}, 404),
    ("PUT", "/admin/keys", {}, 405),
])
async def test_admin_errors_are_problem_json(make_proxy, client, method, path, params, status):
    """Bad admin calls, unknown paths and wrong methods all answer RFC 9457 problem+json."""
    p = await make_proxy()
    s, h, doc = await call(client, method, p.admin_url + path, params=params)
    assert s == status and h["Content-Type"] == PROBLEM
    assert doc["status"] == status and {"type", "title", "detail"} <= set(doc)


async def test_admin_answers_503_problem_when_the_store_is_down(make_proxy, client):
    """Key operations with the store unreachable answer 503 problem+json; /readyz stays
    200 (readiness never depends on the shared store), /readyz?store=1 is 503 and
    idemproxy_store_up 0."""
    p = await make_proxy()
    await p.deps.store.pool.close()
    s, h, doc = await call(client, "GET", p.admin_url + "/admin/in-flight")
    assert s == 503 and h["Content-Type"] == PROBLEM and "Retry-After" in h
    async with client.get(p.admin_url + "/readyz") as r:
        assert r.status == 200
    async with client.get(p.admin_url + "/readyz", params={"store": "1"}) as r:
        assert r.status == 503
    async with client.get(p.admin_url + "/metrics") as r:
        assert "idemproxy_store_up 0.0" in await r.text()


async def test_loopback_admin_needs_no_token(make_proxy, client):
    """On loopback (the default 127.0.0.1:9090) key operations need no token."""
    p = await make_proxy()
    assert p.config.admin.listen.is_loopback
    s, _, _ = await call(client, "GET", p.admin_url + "/admin/in-flight")
    assert s == 200


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}",
                                           "Bearer", f"Bearer {TOKEN}x"])
async def test_beyond_loopback_key_operations_need_the_token(make_proxy, client, monkeypatch,
                                                             authorization):
    """admin.listen beyond loopback: /admin/ without the right bearer token is a 401
    problem with WWW-Authenticate, and nothing is deleted."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    p = await make_proxy(extra=BEYOND_LOOPBACK)
    key = uuid.uuid4().hex
    await post(client, p.url + "/exec/auth", key)
    headers = {"Authorization": authorization} if authorization else {}
    params = {"scope": scope_for(p, "exec"), "key": key}
    for method, path in [("GET", "/admin/in-flight"), ("DELETE", "/admin/keys"),
                         ("POST", "/admin/keys/release"), ("GET", "/admin/keys")]:
        s, h, doc = await call(client, method, p.admin_url + path, params=params,
                               headers=headers)
        assert s == 401 and h["Content-Type"] == PROBLEM
        assert h["WWW-Authenticate"].startswith("Bearer") and TOKEN not in str(doc)
    assert await p.deps.store.show(scope=params["scope"], key=key) is not None


async def test_beyond_loopback_the_token_opens_key_operations(make_proxy, client, monkeypatch):
    """With the token (scheme case-insensitive) every verb works beyond loopback."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    p = await make_proxy(extra=BEYOND_LOOPBACK)
    key = uuid.uuid4().hex
    await post(client, p.url + "/exec/auth-ok", key)
    params = {"scope": scope_for(p, "exec"), "key": key}
    for scheme in ("Bearer", "bearer"):
        s, _, _ = await call(client, "GET", p.admin_url + "/admin/keys", params=params,
                             headers={"Authorization": f"{scheme} {TOKEN}"})
        assert s == 200
    s, _, _ = await call(client, "DELETE", p.admin_url + "/admin/keys", params=params,
                         headers={"Authorization": f"Bearer {TOKEN}"})
    assert s == 200


async def test_beyond_loopback_without_a_token_set_everything_is_refused(make_proxy, client,
                                                                         monkeypatch):
    """If the token variable is unset, no Authorization header opens key operations."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    p = await make_proxy(extra=BEYOND_LOOPBACK)
    for auth in ("Bearer ", "Bearer  ", "Bearer undefined"):
        s, _, _ = await call(client, "GET", p.admin_url + "/admin/in-flight",
                             headers={"Authorization": auth})
        assert s == 401


async def test_beyond_loopback_probes_and_metrics_stay_open(make_proxy, client, monkeypatch):
    """Probes and Prometheus need no token; look-alike paths are not open."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    p = await make_proxy(extra=BEYOND_LOOPBACK)
    for path in ("/healthz", "/readyz", "/metrics"):
        async with client.get(p.admin_url + path) as r:
            assert r.status == 200, path
    for path in ("/healthz/", "/metrics/../admin/in-flight", "//admin/in-flight"):
        async with client.get(p.admin_url + path) as r:
            assert r.status == 401, path


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def test_metrics_after_traffic(make_proxy, client):
    """After traffic /metrics exports every family the design lists, pool usage included,
    with zero series declared for each route."""
    p = await make_proxy()
    key = uuid.uuid4().hex
    await post(client, p.url + "/exec/metrics", key)
    await post(client, p.url + "/exec/metrics", key)
    async with client.get(p.admin_url + "/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        samples = scrape(await r.text())
    names = {name for name, _ in samples}
    assert {"idemproxy_requests_total", "idemproxy_upstream_seconds_bucket",
            "idemproxy_store_seconds_bucket", "idemproxy_claims_in_flight",
            "idemproxy_waiters", "idemproxy_claims_taken_over_total",
            "idemproxy_records_lost_total", "idemproxy_sweeper_deleted_total",
            "idemproxy_db_pool_size", "idemproxy_db_pool_idle", "idemproxy_db_pool_max",
            "idemproxy_build_info"} <= names
    req = "idemproxy_requests_total"
    assert samples[(req, (("outcome", "forwarded"), ("route", "exec")))] == 1
    assert samples[(req, (("outcome", "replayed"), ("route", "exec")))] == 1
    assert samples[(req, (("outcome", "mismatch"), ("route", "gate")))] == 0
    assert samples[("idemproxy_store_seconds_count", (("op", "claim"),))] >= 1
    assert samples[("idemproxy_replay_cache_hits_total", ())] == 1
    assert samples[("idemproxy_replay_cache_entries", ())] >= 1
    assert samples[("idemproxy_replay_cache_bytes", ())] > 0
    assert samples[("idemproxy_db_pool_max", ())] == 20
    assert 1 <= samples[("idemproxy_db_pool_size", ())] <= 20
    assert samples[("idemproxy_claims_in_flight", ())] == 0


async def test_metrics_labels_stay_low_cardinality(make_proxy, client):
    """No label value carries a key, a tenant or a request path."""
    p = await make_proxy()
    key = "card-" + uuid.uuid4().hex
    await post(client, p.url + "/exec/card-path", key)
    async with client.get(p.admin_url + "/metrics") as r:
        text = await r.text()
    assert key not in text and "card-path" not in text
    labels = {k for fam in text_string_to_metric_families(text) for s in fam.samples
              for k in s.labels}
    assert labels <= {"route", "outcome", "op", "le", "version"}


async def test_in_flight_and_waiters_gauges_follow_a_wait(make_proxy, upstream, client):
    """While a retry waits on an in-flight key the gauges read 1 and 1; scraping does not
    disturb them, and both are back to 0 when the first completes."""
    p = await make_proxy("""
        - name: waiting
          match: {methods: [POST], path: "/gate/*"}
          concurrent: wait
          wait_timeout: 10s
    """)
    key = uuid.uuid4().hex
    first = asyncio.create_task(post(client, p.url + "/gate/gauge", key))
    await wait_for_executions(upstream, "/gate/gauge")
    second = asyncio.create_task(post(client, p.url + "/gate/gauge", key))
    async with asyncio.timeout(5):
        while p.metric("idemproxy_waiters") < 1:
            await asyncio.sleep(0.01)
    for _ in range(5):
        async with client.get(p.admin_url + "/metrics") as r:
            samples = scrape(await r.text())
        assert samples[("idemproxy_waiters", ())] == 1
        assert samples[("idemproxy_claims_in_flight", ())] == 1
        await asyncio.sleep(0.03)
    upstream.gate.set()
    assert [s for s, _ in await asyncio.gather(first, second)] == [201, 201]
    assert p.metric("idemproxy_waiters") == 0 and p.metric("idemproxy_claims_in_flight") == 0


MULTIPROCESS_SCRAPE = """
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from proxy.metrics import Metrics
m = Metrics(CollectorRegistry())
m.declare_routes(["charges"])
m.in_flight.inc()
m.pool_size.set(3)
scrape = CollectorRegistry()
multiprocess.MultiProcessCollector(scrape)
print(generate_latest(scrape).decode())
"""


async def test_workers_metrics_sum_gauges_without_a_pid_label(tmp_path):
    """In multiprocess mode (workers: N) gauges add up across processes, with no pid label,
    and the build info survives."""
    import os
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", MULTIPROCESS_SCRAPE, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    samples = scrape(out.decode())
    assert samples[("idemproxy_claims_in_flight", ())] == 1
    assert samples[("idemproxy_db_pool_size", ())] == 3
    assert samples[("idemproxy_build_info", (("version", __version__),))] == 1
    assert not any("pid" in dict(labels) for _, labels in samples)
