"""The replay and omitted-body markers by configuration (`replay_header`,
`omitted_header`): the default convention and the conformance profile's
(`Idempotency-Replayed`, `Idempotency-Replay: omitted`), over real sockets against real
PostgreSQL; the snippets documented in docs/keys-and-tenancy.md are the ones tested."""

from __future__ import annotations

import re
import textwrap

import pytest

from proxy.config import loads
from proxy.errors import ConfigError
from tests.conftest import ROOT
from tests.test_flow import new_key, post
from tests.upstream import pattern

DOC = (ROOT / "docs" / "keys-and-tenancy.md").read_text()


def documented(convention: str) -> str:
    """The YAML snippet the docs give for a convention (the block after its heading)."""
    m = re.search(rf"\*\*{re.escape(convention)}\*\*.*?```yaml\n(.*?)```", DOC, re.S)
    assert m, f"no documented snippet for {convention}"
    return m.group(1)


def routes_with(snippet: str) -> str:
    """Two routes (a capped one for omitted bodies, a CORS one) with the snippet's fields."""
    fields = textwrap.indent(snippet, "  ")
    return (f"- name: capped\n  match: {{methods: [POST], path: /big}}\n"
            f"  max_stored_body: 1KiB\n{fields}"
            f"- name: cors\n  match: {{methods: [POST], path: \"/cors/*\"}}\n{fields}")


@pytest.mark.parametrize(("convention", "replayed", "omitted", "absent"), [
    ("Stripe's convention", "Idempotent-Replayed", "Idempotency-Body", "Idempotency-Replay"),
    ("The conformance profile", "Idempotency-Replayed", "Idempotency-Replay",
     "Idempotency-Body"),
])
async def test_each_convention_marks_replays_and_omitted_bodies(make_proxy, upstream, client,
                                                               convention, replayed,
                                                               omitted, absent):
    """A replay of a body over max_stored_body carries `<replayed>: true` and
    `<omitted>: omitted`, the other convention's header not at all; one execution."""
    p = await make_proxy(routes_with(documented(convention)))
    key, size = new_key(), 4096
    s1, h1, b1 = await post(client, p.url + f"/big?size={size}", key=key)
    s2, h2, b2 = await post(client, p.url + f"/big?size={size}", key=key)
    assert (s1, s2) == (200, 200) and b1 == pattern(size) and b2 == b""
    assert replayed not in h1 and omitted not in h1
    assert h2[replayed] == "true" and h2[omitted] == "omitted" and absent not in h2
    assert upstream.count("/big") == 1


async def test_a_cors_answer_exposes_the_configured_omitted_header(make_proxy, upstream,
                                                                  client):
    """Access-Control-Expose-Headers names the route's own markers, whatever they are."""
    p = await make_proxy(routes_with(documented("The conformance profile")))
    key = new_key()
    for _ in range(2):
        _, h, _ = await post(client, p.url + "/cors/a", key=key)
        names = {n.strip() for n in h["Access-Control-Expose-Headers"].split(",")}
        assert {"Idempotency-Replayed", "Idempotency-Replay"} <= names
        assert "Idempotency-Body" not in names
    assert upstream.count("/cors/a") == 1


@pytest.mark.parametrize(("fields", "problem"), [
    ("omitted_header: Idempotent-Replayed", "routes[0].omitted_header: 'Idempotent-Replayed' "
     "is also the replay_header"),
    ("omitted_header: Idempotency-Expires", "routes[0].omitted_header: 'Idempotency-Expires' "
     "is also the expires_header"),
    ("omitted_header: Content-Length", "routes[0].omitted_header: 'Content-Length' is a "
     "header the proxy or the upstream sets itself"),
    ("omitted_header: 'No Body'", "routes[0].omitted_header: 'No Body' is not an HTTP header "
     "name"),
])
def test_bad_omitted_headers_name_the_field(fields, problem):
    """check-config refuses a marker that collides with another or is no header name."""
    text = "routes:\n  - name: r\n    match: {path: /r}\n    " + fields + "\n"
    with pytest.raises(ConfigError) as info:
        loads(text, env={})
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_omitted_header_defaults_to_idempotency_body_and_sits_in_defaults():
    """Unset: Idempotency-Body; under `defaults` it applies to every route."""
    base = "routes:\n  - name: r\n    match: {path: /r}\n"
    assert loads(base, env={}).routes[0].omitted_header == "Idempotency-Body"
    cfg = loads("defaults:\n  omitted_header: Idempotency-Replay\n" + base, env={})
    assert cfg.routes[0].omitted_header == "Idempotency-Replay"
