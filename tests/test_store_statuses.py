"""Which upstream answers are stored: `release_statuses` with classes, `store_statuses`,
and how the two combine (decide.on_answer; docs/keys-and-tenancy.md), against real
PostgreSQL for the flow."""

from __future__ import annotations

import textwrap

import jsonschema
import pytest
import yaml

from proxy.config import loads
from proxy.errors import ConfigError
from proxy.flow import decide
from proxy.flow.decide import OnAnswer
from tests.test_docs import SCHEMA
from tests.test_flow import new_key, post

RECORD, RELEASE = OnAnswer.RECORD, OnAnswer.RELEASE
DEFAULT = frozenset({408, 425, 429, 502, 503, 504})


def route_of(fields: str):
    text = "routes:\n  - name: r\n    match: {path: /r}\n" + textwrap.indent(
        textwrap.dedent(fields), "    ")
    return loads(text, env={}).routes[0]


def problems_of(fields: str) -> list[str]:
    text = "routes:\n  - name: r\n    match: {path: /r}\n" + textwrap.indent(
        textwrap.dedent(fields), "    ")
    with pytest.raises(ConfigError) as info:
        loads(text, env={})
    return info.value.problems


# (release_statuses, store_statuses, status, decision)
ROWS = [
    (DEFAULT, None, 500, RECORD),
    (DEFAULT, None, 503, RELEASE),
    (frozenset({"5xx"}), None, 500, RELEASE),
    (frozenset({"5xx"}), None, 404, RECORD),
    (frozenset({"4xx", 404}), None, 404, RELEASE),
    (DEFAULT, frozenset({"2xx"}), 201, RECORD),
    (DEFAULT, frozenset({"2xx"}), 302, RELEASE),
    (DEFAULT, frozenset({"2xx"}), 404, RELEASE),
    (DEFAULT, frozenset({"2xx"}), 500, RELEASE),
    (DEFAULT, frozenset({"2xx", "4xx"}), 404, RECORD),
    (DEFAULT, frozenset({"2xx", "4xx"}), 429, RELEASE),
    (DEFAULT, frozenset({"2xx", "4xx"}), 500, RELEASE),
    (DEFAULT, frozenset({"2xx", "5xx"}), 500, RECORD),
    (DEFAULT, frozenset({"2xx", "5xx"}), 502, RELEASE),
    (frozenset({"2xx"}), frozenset({201}), 201, RECORD),
    (frozenset({"2xx"}), frozenset({201}), 200, RELEASE),
    (DEFAULT, frozenset({"2xx"}), 700, RELEASE),
]


@pytest.mark.parametrize(("release", "store", "status", "expected"), ROWS)
def test_the_most_specific_list_decides(release, store, status, expected):
    """An integer beats its class; a status neither list names is stored only without
    store_statuses."""
    assert decide.on_answer(status, release_statuses=release,
                            store_statuses=store) is expected


def test_classes_load_lower_case_beside_integers():
    """`release_statuses: [429, 5XX]` loads as {429, '5xx'}; store_statuses defaults to none."""
    route = route_of("release_statuses: [429, 5XX]\n")
    assert route.release_statuses == frozenset({429, "5xx"})
    assert route.store_statuses is None
    assert route_of("store_statuses: [2xx]\n").store_statuses == frozenset({"2xx"})


@pytest.mark.parametrize(("fields", "problem"), [
    ("store_statuses: [2xx, 429]", "routes[0].store_statuses: 429 is also in "
     "release_statuses (its default): an answer is either stored or released"),
    ("release_statuses: [5xx]\nstore_statuses: [2xx, 5xx]", "routes[0].store_statuses: 5xx "
     "is also in release_statuses (set at routes[0].release_statuses)"),
    ("store_statuses: []", "routes[0].store_statuses: [] stores no answer"),
    ("store_statuses: [6xx]", "routes[0].store_statuses: ['6xx'] is not a list of HTTP "
     "statuses like [429, 503] or classes like [5xx]"),
    ("release_statuses: [5xxx]", "routes[0].release_statuses: ['5xxx'] is not a list"),
    ("store_statuses: 2xx", "routes[0].store_statuses: '2xx' is not a list"),
])
def test_contradictions_and_bad_values_name_the_field(fields, problem):
    """check-config refuses a status in both lists, an empty store list and a bad class,
    naming the field."""
    found = problems_of(fields)
    assert any(p.startswith(problem) for p in found), found


def test_a_contradiction_set_in_defaults_is_reported_where_it_was_set():
    """store_statuses under defaults, release_statuses on the route: both paths named."""
    text = ("defaults:\n  store_statuses: [2xx, 5xx]\nroutes:\n  - name: r\n"
            "    match: {path: /r}\n    release_statuses: [5xx]\n")
    with pytest.raises(ConfigError) as info:
        loads(text, env={})
    assert any(p.startswith("defaults.store_statuses: 5xx is also in release_statuses "
                            "(set at routes[0].release_statuses)")
               for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("doc", [
    {"defaults": {"release_statuses": [429, "5xx"], "store_statuses": ["2xx", "4XX"]}},
])
def test_the_schema_takes_classes(doc):
    """The JSON Schema accepts classes beside integers."""
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)


@pytest.mark.parametrize("text", ["defaults:\n  store_statuses: []\n",
                                  "defaults:\n  release_statuses: [6xx]\n",
                                  "defaults:\n  store_statuses: [2xx, 99]\n"])
def test_the_schema_refuses_what_the_loader_refuses(text):
    """An empty store list, a 6xx class and a status under 100 fail the schema too."""
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(yaml.safe_load(text))
    with pytest.raises(ConfigError):
        loads(text, env={})


SUCCESS_ONLY = """
- name: ok
  match: {methods: [POST], path: "/exec/*"}
  store_statuses: [2xx]
"""


@pytest.mark.parametrize("status", [400, 404, 409, 500])
async def test_success_only_runs_a_failure_again(make_proxy, upstream, client, status):
    """store_statuses: [2xx]: a 4xx or 500 reaches the client unstored and the retry runs."""
    p = await make_proxy(SUCCESS_ONLY)
    key, path = new_key(), f"/exec/so{status}"
    s1, _, _ = await post(client, p.url + f"{path}?status={status}", key=key)
    s2, h2, _ = await post(client, p.url + f"{path}?status={status}", key=key)
    assert (s1, s2) == (status, status) and "Idempotent-Replayed" not in h2
    assert upstream.count(path) == 2
    assert p.metric("idemproxy_requests_total", route="ok", outcome="released") == 2


async def test_success_only_stores_a_success(make_proxy, upstream, client):
    """store_statuses: [2xx]: a 201 is stored and replayed, the upstream called once."""
    p = await make_proxy(SUCCESS_ONLY)
    key = new_key()
    await post(client, p.url + "/exec/so201", key=key)
    s, h, _ = await post(client, p.url + "/exec/so201", key=key)
    assert s == 201 and h["Idempotent-Replayed"] == "true"
    assert upstream.count("/exec/so201") == 1


async def test_a_released_class_runs_again_and_an_integer_beats_it(make_proxy, upstream,
                                                                    client):
    """release_statuses: [5xx]: a 500 runs again; store_statuses: [500] beside it stores it."""
    p = await make_proxy("""
        - name: rel
          match: {methods: [POST], path: "/exec/rel/*"}
          release_statuses: [5xx]
        - name: keep
          match: {methods: [POST], path: "/exec/keep/*"}
          release_statuses: [5xx]
          store_statuses: [2xx, 500]
    """)
    for route, runs in (("rel", 2), ("keep", 1)):
        key, path = new_key(), f"/exec/{route}/x"
        for _ in range(2):
            s, _, _ = await post(client, p.url + path + "?status=500", key=key)
            assert s == 500
        assert upstream.count(path) == runs, route
