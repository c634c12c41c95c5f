"""HTTPS upstreams: a private CA (ca_file), client certificates (mTLS), server_name, and
`verify: false`; a failed handshake is its own problem and the request was not sent."""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from proxy.config import loads
from proxy.errors import ConfigError
from tests.test_flow import new_key, post
from tests.tls_certs import PrivateCA, make_private_ca
from tests.upstream import TestUpstream


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> PrivateCA:
    return make_private_ca(tmp_path_factory.mktemp("ca"))


class HttpsUpstream(TestUpstream):
    __test__ = False
    sni: list[str | None]


@pytest.fixture
async def https_upstream(ca: PrivateCA) -> AsyncIterator[Callable[..., object]]:
    """Start a recording upstream over HTTPS (optionally requiring a client cert)."""
    runners: list[web.AppRunner] = []

    async def start(*, mtls: bool = False, tls12: bool = False) -> HttpsUpstream:
        up = HttpsUpstream()
        up.sni = []
        ctx = ca.server_context(require_client_cert=mtls)
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.sni_callback = lambda obj, name, _ctx: up.sni.append(name)  # type: ignore[assignment]
        runner = web.AppRunner(up.app(), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        up.url = f"https://127.0.0.1:{runner.addresses[0][1]}"
        return up

    yield start
    for runner in runners:
        await runner.cleanup()


ROUTES = """
- name: pay
  match: {methods: [POST], path: "/exec/*"}
"""


def tls(**fields: object) -> str:
    return "  tls:\n" + "".join(f"    {k}: {v}\n" for k, v in fields.items())


async def test_a_private_ca_in_ca_file_is_trusted(make_proxy, https_upstream, ca, client):
    """With ca_file, a guarded POST runs once over HTTPS and its retry replays."""
    up = await https_upstream()
    p = await make_proxy(ROUTES, upstream_url=up.url, extra=tls(ca_file=ca.ca_file))
    key = new_key()
    s1, _, b1 = await post(client, p.url + "/exec/a", key=key)
    s2, h2, b2 = await post(client, p.url + "/exec/a", key=key)
    assert (s1, s2) == (201, 201) and b1 == b2 and h2["Idempotent-Replayed"] == "true"
    assert up.count("/exec/a") == 1
    async with client.get(p.url + "/anything") as resp:  # unguarded traffic too
        assert resp.status == 200


async def test_without_ca_file_the_handshake_fails_as_its_own_problem(
        make_proxy, https_upstream, client, caplog):
    """A certificate the proxy does not trust: 502 upstream-tls-failed saying the request
    was not sent, the key released, and an error log line with the reason."""
    up = await https_upstream()
    p = await make_proxy(ROUTES, upstream_url=up.url)
    key = new_key()
    with caplog.at_level(logging.ERROR, logger="idemproxy.upstream"):
        status, headers, body = await post(client, p.url + "/exec/b", key=key)
    doc = json.loads(body)
    assert status == 502 and headers["Content-Type"] == "application/problem+json"
    assert doc["type"].endswith("/upstream-tls-failed")
    assert "TLS" in doc["detail"] and "not sent" in doc["detail"]
    assert "127.0.0.1" not in doc["detail"]
    assert up.count() == 0
    lines = [r for r in caplog.records if r.name == "idemproxy.upstream"]
    assert lines and lines[0].levelno == logging.ERROR
    assert "certificate not accepted" in lines[0].fields["reason"]  # type: ignore[attr-defined]
    # released, not left in flight: the same key forwards again (and fails the same way)
    assert (await post(client, p.url + "/exec/b", key=key))[0] == 502


async def test_mtls_with_a_client_certificate(make_proxy, https_upstream, ca, client):
    """An upstream that demands a client certificate accepts cert_file + key_file."""
    up = await https_upstream(mtls=True)
    p = await make_proxy(ROUTES, upstream_url=up.url, extra=tls(
        ca_file=ca.ca_file, cert_file=ca.client_cert, key_file=ca.client_key))
    assert (await post(client, p.url + "/exec/m", key=new_key()))[0] == 201
    assert up.count("/exec/m") == 1


async def test_mtls_without_a_client_certificate_tls12_is_a_tls_failure(
        make_proxy, https_upstream, ca, client):
    """Without cert_file, a TLS 1.2 upstream refuses in the handshake: a TLS failure,
    not sent, the key released."""
    up = await https_upstream(mtls=True, tls12=True)
    p = await make_proxy(ROUTES, upstream_url=up.url, extra=tls(ca_file=ca.ca_file))
    key = new_key()
    status, _, body = await post(client, p.url + "/exec/n", key=key)
    assert status == 502 and json.loads(body)["type"].endswith("/upstream-tls-failed")
    assert (await post(client, p.url + "/exec/n", key=key))[0] == 502  # released: no 409
    assert up.count() == 0


async def test_mtls_without_a_client_certificate_tls13_is_an_unknown_outcome(
        make_proxy, https_upstream, ca, client):
    """TLS 1.3 servers check a client certificate after our handshake ended, so the
    refusal reaches us as a reset after the request was written: 502 upstream-failed
    with the key held (the proxy cannot tell it from a crash); nothing executed."""
    up = await https_upstream(mtls=True)
    p = await make_proxy(ROUTES, upstream_url=up.url, extra=tls(ca_file=ca.ca_file))
    key = new_key()
    status, _, body = await post(client, p.url + "/exec/n13", key=key)
    assert status == 502 and json.loads(body)["type"].endswith("/upstream-failed")
    assert (await post(client, p.url + "/exec/n13", key=key))[0] == 409
    assert up.count() == 0


async def test_server_name_is_sent_as_sni_and_checked(make_proxy, https_upstream, ca,
                                                      client):
    """server_name is the SNI the upstream sees; a name the certificate lacks fails."""
    up = await https_upstream()
    p = await make_proxy(ROUTES, upstream_url=up.url,
                         extra=tls(ca_file=ca.ca_file, server_name="upstream.test"))
    assert (await post(client, p.url + "/exec/s", key=new_key()))[0] == 201
    assert up.sni[-1] == "upstream.test"
    q = await make_proxy(ROUTES, upstream_url=up.url,
                         extra=tls(ca_file=ca.ca_file, server_name="other.test"))
    status, _, body = await post(client, q.url + "/exec/s2", key=new_key())
    assert status == 502 and json.loads(body)["type"].endswith("/upstream-tls-failed")
    assert up.count("/exec/s2") == 0


async def test_verify_false_works_and_warns_loudly(make_proxy, https_upstream, client,
                                                   caplog):
    """verify: false reaches an untrusted upstream, with a warning when the session opens."""
    up = await https_upstream()
    with caplog.at_level(logging.WARNING, logger="idemproxy.upstream"):
        p = await make_proxy(ROUTES, upstream_url=up.url, extra=tls(verify="false"))
    assert any("NOT checked" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert (await post(client, p.url + "/exec/v", key=new_key()))[0] == 201


def test_tls_problems_name_their_field(ca: PrivateCA, tmp_path: Path):
    """Unreadable or malformed PEM files are config errors naming the field path."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = {
        f"ca_file: {junk}": r"upstream\.tls\.ca_file: cannot load",
        f"cert_file: {junk}": r"upstream\.tls\.cert_file: cannot load",
        f"cert_file: {ca.client_cert}\n    key_file: {ca.server_key}":
            r"upstream\.tls\.cert_file: cannot load",
        "ca_file: /no/such/file": r"upstream\.tls\.ca_file: '/no/such/file' is not",
    }
    for fields, message in cases.items():
        text = f"upstream:\n  url: https://x.test\n  tls:\n    {fields}\n"
        with pytest.raises(ConfigError, match=message):
            loads(text, env={})


def test_context_of_verify_false_checks_nothing(ca: PrivateCA):
    """verify: false turns off both the chain and the host name check."""
    from proxy.config import UpstreamTLS
    from proxy.upstream.tls import client_context

    ctx = client_context(UpstreamTLS(verify=False))
    assert ctx.verify_mode is ssl.CERT_NONE and not ctx.check_hostname
