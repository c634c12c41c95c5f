"""Tenants from a verified identity (`tenant: {jwt: ...}`, `{header: ..., trusted: true}`):
JWTs signed here with generated keys, the JWKS served from a file and from an HTTP
endpoint (an aiohttp server), rotation and expiry, against real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from multidict import CIMultiDict

from proxy import keys
from proxy.config import JwtTenant, loads
from proxy.errors import ConfigError, CredentialMissing, RuntimeFailure, TokenInvalid
from proxy.keys.identity import Identities
from tests.test_flow import new_key
from tests.upstream import body_json

ISSUER, AUDIENCE = "https://id.example.com/", "https://api.example.com"


class Signer:
    """A generated signing key and its public JWK."""

    def __init__(self, kid: str, *, curve: bool = False) -> None:
        self.kid = kid
        if curve:
            self.private: Any = ec.generate_private_key(ec.SECP256R1())
            self.alg = "ES256"
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.alg = "RS256"
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk = {**jwk, "kid": kid, "use": "sig", "alg": self.alg}

    def token(self, sub: str = "alice", *, ttl: float = 600, **claims: Any) -> str:
        now = time.time()
        body = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": int(now),
                "exp": int(now + ttl), "jti": uuid.uuid4().hex, **claims}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": self.kid})


def jwks(*signers: Signer) -> str:
    return json.dumps({"keys": [s.jwk for s in signers]})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def routes(source: str, extra: str = "") -> str:
    return f"""
- name: jwt
  match: {{methods: [POST], path: "/exec/*"}}
  tenant:
    jwt: {{{source}, issuer: "{ISSUER}", audience: "{AUDIENCE}",
           algorithms: [RS256, ES256], refresh: 1s{extra}}}
"""


@pytest.fixture(scope="module")
def k1() -> Signer:
    return Signer("k1")


@pytest.fixture(scope="module")
def k2() -> Signer:
    return Signer("k2", curve=True)


@pytest.fixture
def jwks_file(tmp_path: Path, k1: Signer) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(jwks(k1))
    return path


class JwksServer:
    """An HTTP JWKS endpoint whose document a test can change (rotation)."""

    def __init__(self, doc: str) -> None:
        self.doc = doc
        self.hits = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(text=self.doc, content_type="application/json")


@pytest.fixture
async def jwks_server(k1: Signer) -> AsyncIterator[JwksServer]:
    server = JwksServer(jwks(k1))
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    yield server
    await runner.cleanup()


async def send(client, url: str, key: str, headers: dict[str, str]) -> tuple[int, Any, Any]:
    async with client.post(url, data=b'{"amount": 1}',
                           headers={"Idempotency-Key": key, **headers}) as resp:
        return resp.status, resp.headers, await resp.read()


def assert_token_invalid(status: int, headers: Any, body: bytes, why: str) -> None:
    assert status == 401 and headers["Content-Type"] == "application/problem+json"
    assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    doc = body_json(body)
    assert doc["type"].endswith("/token-invalid") and why in doc["detail"], doc


async def test_a_refreshed_token_keeps_its_scope(make_proxy, upstream, client, jwks_file, k1):
    """Two tokens for one `sub` (a refresh between request and retry): one execution,
    the retry replayed; another `sub` with the same key is another scope."""
    p = await make_proxy(routes(f"jwks_file: {jwks_file}"))
    key = new_key()
    s1, h1, b1 = await send(client, p.url + "/exec/refresh", key, bearer(k1.token("alice")))
    s2, h2, b2 = await send(client, p.url + "/exec/refresh", key, bearer(k1.token("alice")))
    assert (s1, s2) == (201, 201) and b1 == b2 and h2["Idempotent-Replayed"] == "true"
    s3, h3, b3 = await send(client, p.url + "/exec/refresh", key, bearer(k1.token("bob")))
    assert s3 == 201 and "Idempotent-Replayed" not in h3 and body_json(b3)["n"] == 2
    assert upstream.count("/exec/refresh") == 2


@pytest.mark.parametrize(("make", "why"), [
    (lambda k1, k2: k1.token(ttl=-120), "expired"),
    (lambda k1, k2: k1.token(nbf=int(time.time()) + 600), "not valid yet"),
    (lambda k1, k2: k1.token(aud="https://other.example.com"), "another audience"),
    (lambda k1, k2: k1.token(iss="https://evil.example.com/"), "another issuer"),
    (lambda k1, k2: Signer("k1").token(), "signature does not verify"),
    (lambda k1, k2: k2.token(), "a key the route's JWKS does not hold"),
    (lambda k1, k2: jwt.encode({"sub": "alice", "iss": ISSUER, "aud": AUDIENCE,
                                "exp": int(time.time()) + 60}, "s" * 32, algorithm="HS256",
                               headers={"kid": "k1"}), "signed with 'HS256'"),
    (lambda k1, k2: jwt.encode({"sub": "alice", "iss": ISSUER, "aud": AUDIENCE,
                                "exp": int(time.time()) + 60}, None, algorithm="none"),
     "signed with 'none'"),
    (lambda k1, k2: k1.token(sub=""), "no 'sub' claim"),
    (lambda k1, k2: "not.a.jwt", "not a JWT"),
])
async def test_an_invalid_token_is_a_401_never_a_new_scope(make_proxy, upstream, client,
                                                           jwks_file, k1, k2, make, why):
    """Expired, not yet valid, other audience or issuer, forged, unknown key, HS256 or
    none, no claim, garbage: 401 problem+json with a Bearer challenge, nothing forwarded."""
    p = await make_proxy(routes(f"jwks_file: {jwks_file}"))
    status, headers, body = await send(client, p.url + "/exec/bad", new_key(),
                                       bearer(make(k1, k2)))
    assert_token_invalid(status, headers, body, why)
    assert upstream.count("/exec/bad") == 0


async def test_no_token_is_credential_missing_and_basic_is_invalid(make_proxy, upstream,
                                                                  client, jwks_file):
    """No Authorization: 400 credential-missing; Basic instead of Bearer: 401."""
    p = await make_proxy(routes(f"jwks_file: {jwks_file}"))
    async with client.post(p.url + "/exec/none", data=b"{}", headers={
            "Idempotency-Key": new_key(), "Authorization": ""}) as resp:
        assert resp.status == 400
        assert body_json(await resp.read())["type"].endswith("/credential-missing")
    status, headers, body = await send(client, p.url + "/exec/none", new_key(),
                                       {"Authorization": "Basic YWxpY2U6cHc="})
    assert_token_invalid(status, headers, body, "Bearer")
    assert upstream.count("/exec/none") == 0


async def test_a_small_leeway_accepts_a_token_just_expired(make_proxy, upstream, client,
                                                          jwks_file, k1):
    """A token expired 5 s ago passes the default 30 s leeway; leeway: 0s refuses it."""
    p = await make_proxy(routes(f"jwks_file: {jwks_file}"))
    assert (await send(client, p.url + "/exec/leeway", new_key(),
                       bearer(k1.token(ttl=-5))))[0] == 201
    strict = await make_proxy(routes(f"jwks_file: {jwks_file}", ", leeway: 0s"))
    status, headers, body = await send(client, strict.url + "/exec/leeway", new_key(),
                                       bearer(k1.token(ttl=-5)))
    assert_token_invalid(status, headers, body, "expired")


async def test_jwks_url_rotation_is_picked_up_in_the_background(make_proxy, upstream, client,
                                                               jwks_server, k1, k2):
    """A token from a new key is refused until the endpoint publishes it, then accepted
    after the next background refresh; the principal's scope survives the rotation."""
    p = await make_proxy(routes(f'jwks_url: "{jwks_server.url}"'))
    assert jwks_server.hits == 1  # loaded at start-up
    key = new_key()
    status, headers, body = await send(client, p.url + "/exec/rotate", key,
                                       bearer(k2.token("carol")))
    assert_token_invalid(status, headers, body, "does not hold")
    jwks_server.doc = jwks(k1, k2)  # the provider publishes its new key
    for _ in range(50):
        await asyncio.sleep(0.2)
        status, _, body = await send(client, p.url + "/exec/rotate", key,
                                     bearer(k2.token("carol")))
        if status == 201:
            break
    assert status == 201 and body_json(body)["n"] == 1
    s, h, _ = await send(client, p.url + "/exec/rotate", key, bearer(k1.token("carol")))
    assert s == 201 and h["Idempotent-Replayed"] == "true"
    jwks_server.doc = jwks(k2)  # k1 retired
    before_retired = 0
    for _ in range(50):
        await asyncio.sleep(0.2)
        s, h, body = await send(client, p.url + "/exec/retired", new_key(),
                                bearer(k1.token("carol")))
        if s == 401:
            break
        before_retired += 1
    assert_token_invalid(s, h, body, "does not hold")
    assert upstream.count("/exec/rotate") == 1
    assert upstream.count("/exec/retired") == before_retired


async def test_jwks_file_rotation_and_a_failed_read_keeps_the_old_keys(make_proxy, upstream,
                                                                      client, jwks_file,
                                                                      k1, k2):
    """A rewritten JWKS file is re-read in the background; a broken one keeps the keys
    already loaded (an outage of the source never refuses valid tokens)."""
    p = await make_proxy(routes(f"jwks_file: {jwks_file}"))
    jwks_file.write_text("{not json")
    await asyncio.sleep(1.5)
    assert (await send(client, p.url + "/exec/file", new_key(), bearer(k1.token())))[0] == 201
    jwks_file.write_text(jwks(k2))
    for _ in range(50):
        await asyncio.sleep(0.2)
        if (await send(client, p.url + "/exec/file", new_key(), bearer(k2.token())))[0] == 201:
            break
    else:
        pytest.fail("the rotated file was never picked up")


async def test_an_unreachable_jwks_url_is_503_until_it_answers(make_proxy, upstream, client,
                                                              k1):
    """A JWKS URL down at start-up: the proxy starts, its route answers 503
    identity-unavailable (nothing forwarded) until a background refresh loads it."""
    server = JwksServer(jwks(k1))
    app = web.Application()
    app.router.add_get("/jwks", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    await runner.cleanup()  # the port is now closed: the first load fails
    p = await make_proxy(routes(f'jwks_url: "http://127.0.0.1:{port}/jwks"'))
    s, h, body = await send(client, p.url + "/exec/down", new_key(), bearer(k1.token()))
    assert s == 503 and body_json(body)["type"].endswith("/identity-unavailable")
    assert h["Retry-After"] == "1" and upstream.count("/exec/down") == 0
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        for _ in range(50):
            await asyncio.sleep(0.2)
            s, _, _ = await send(client, p.url + "/exec/down", new_key(), bearer(k1.token()))
            if s == 201:
                break
        assert s == 201
    finally:
        await runner.cleanup()


async def test_an_unreadable_jwks_file_stops_start_up(tmp_path):
    """A jwks_file that cannot be read is a start-up failure, not a proxy that 503s."""
    cfg = loads("routes:\n  - name: r\n    match: {path: /r}\n    tenant:\n      jwt: {"
                f"jwks_file: {tmp_path / 'missing.json'}, issuer: i, audience: a}}\n", env={})
    with pytest.raises(RuntimeFailure, match="missing.json"):
        async with Identities.open(cfg):
            pass


TRUSTED = """
- name: gw
  match: {methods: [POST], path: "/exec/*"}
  tenant: {header: X-User-Id, trusted: true}
"""


async def test_a_trusted_gateway_header_scopes_by_the_principal(make_proxy, upstream, client):
    """`{header: X-User-Id, trusted: true}`: whatever Authorization the client sends, the
    gateway's principal is the scope; no header is a 400 naming it."""
    p = await make_proxy(TRUSTED)
    key = new_key()
    s1, _, _ = await send(client, p.url + "/exec/gw", key, {"X-User-Id": "u-7",
                                                             "Authorization": "Bearer a"})
    s2, h2, _ = await send(client, p.url + "/exec/gw", key, {"X-User-Id": "u-7",
                                                             "Authorization": "Bearer b"})
    assert (s1, s2) == (201, 201) and h2["Idempotent-Replayed"] == "true"
    async with client.post(p.url + "/exec/gw", data=b"{}",
                           headers={"Idempotency-Key": new_key()}) as resp:
        doc = body_json(await resp.read())
        assert resp.status == 400 and "X-User-Id" in doc["detail"]
    assert upstream.count("/exec/gw") == 1


def test_a_jwt_claim_and_a_gateway_header_name_the_same_tenant():
    """The principal `alice` verified from a JWT and set by a gateway hash alike, apart
    from any credential `alice` could be (moving a route between the two keeps scopes)."""
    cfg = loads("routes:\n  - {name: a, match: {path: /a}, tenant: {jwt: {jwks_url: "
                "'https://id/jwks', issuer: i, audience: a}}}\n"
                "  - {name: b, match: {path: /b}, tenant: {header: X-User, trusted: true}}\n"
                "  - {name: c, match: {path: /c}, tenant: {header: X-User}}\n", env={})
    jwt_route, gw_route, plain = cfg.routes

    def keyed(b: bytes) -> str:
        return b.hex()

    def verify(j: JwtTenant, token: str) -> str:
        assert token == "tok" and j.issuer == "i"
        return "alice"

    via_jwt = keys.tenant_of(jwt_route, CIMultiDict(Authorization="bearer  tok"), keyed=keyed,
                             verify=verify)
    via_gw = keys.tenant_of(gw_route, CIMultiDict({"X-User": " alice "}), keyed=keyed)
    as_cred = keys.tenant_of(plain, CIMultiDict({"X-User": "alice"}), keyed=keyed)
    assert via_jwt == via_gw != as_cred
    with pytest.raises(TokenInvalid):
        keys.tenant_of(jwt_route, CIMultiDict([("Authorization", "Bearer a"),
                                                ("Authorization", "Bearer b")]),
                       keyed=keyed, verify=verify)
    with pytest.raises(CredentialMissing):
        keys.tenant_of(gw_route, CIMultiDict([("X-User", "a"), ("X-User", "b")]), keyed=keyed)


@pytest.mark.parametrize(("jwt_fields", "problem"), [
    ("{issuer: i, audience: a}", "routes[0].tenant.jwt: set exactly one of jwks_file, "
     "jwks_url"),
    ("{jwks_file: /j, jwks_url: 'https://x/j', issuer: i, audience: a}",
     "routes[0].tenant.jwt: set exactly one of jwks_file, jwks_url"),
    ("{jwks_file: /j, audience: a}", "routes[0].tenant.jwt.issuer: missing"),
    ("{jwks_file: /j, issuer: i}", "routes[0].tenant.jwt.audience: missing"),
    ("{jwks_file: /j, issuer: i, audience: a, algorithms: [HS256]}",
     "routes[0].tenant.jwt.algorithms: ['HS256'] is not a list of public-key JWT algorithms"),
    ("{jwks_file: /j, issuer: i, audience: a, algorithms: [none]}",
     "routes[0].tenant.jwt.algorithms: ['none'] is not a list"),
    ("{jwks_url: 'ftp://x', issuer: i, audience: a}", "routes[0].tenant.jwt.jwks_url: "
     "'ftp://x' is not an http(s) URL"),
    ("{jwks_file: /j, issuer: i, audience: a, leeway: 1h}", "routes[0].tenant.jwt.leeway: "
     "1h is more than 5m"),
    ("{jwks_file: /j, issuer: i, audience: a, secret: x}", "routes[0].tenant.jwt.secret: "
     "unknown field"),
])
def test_bad_jwt_tenants_name_the_field(jwt_fields, problem):
    """check-config refuses a JWT tenant without one JWKS, issuer or audience, or with a
    symmetric or `none` algorithm, naming the field."""
    text = ("routes:\n  - name: r\n    match: {path: /r}\n    tenant:\n      jwt: "
            + jwt_fields + "\n")
    with pytest.raises(ConfigError) as info:
        loads(text, env={})
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_trusted_needs_a_gateway_header():
    """`trusted: true` on Authorization, or with no header, is refused."""
    for tenant in ("{header: Authorization, trusted: true}", "{trusted: true}"):
        text = f"routes:\n  - name: r\n    match: {{path: /r}}\n    tenant: {tenant}\n"
        with pytest.raises(ConfigError, match=r"routes\[0\]\.tenant\.trusted"):
            loads(text, env={})
