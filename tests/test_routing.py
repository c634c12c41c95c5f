"""Pure route matching: literal paths, `{param}` segments, a trailing `*`, first match wins."""

from __future__ import annotations

import pytest

from proxy.config import Route
from proxy.http.routing import PathPattern, match


def route(name: str, path: str, methods: tuple[str, ...] = ("POST",)) -> Route:
    return Route(name=name, methods=frozenset(methods), path=PathPattern.compile(path))


@pytest.mark.parametrize(("pattern", "path", "params"), [
    ("/v1/charges", "/v1/charges", {}),
    ("/orders/{order_id}", "/orders/42", {"order_id": "42"}),
    ("/orders/{order_id}", "/orders/a.b-c~d", {"order_id": "a.b-c~d"}),
    ("/t/{tenant}/orders/{id}", "/t/acme/orders/7", {"tenant": "acme", "id": "7"}),
    ("/files/*", "/files/", {}),
    ("/files/*", "/files/a/b/c", {}),
    ("/v1/customers*", "/v1/customers", {}),
    ("/v1/customers*", "/v1/customers/cus_1/sources", {}),
    ("/*", "/", {}),
    ("/hooks/{sender}/*", "/hooks/svix/a/b", {"sender": "svix"}),
])
def test_pattern_matches_and_binds_params(pattern: str, path: str,
                                          params: dict[str, str]) -> None:
    """A pattern matches the paths it names and binds each `{param}` to its segment."""
    assert PathPattern.compile(pattern).match(path) == params


@pytest.mark.parametrize(("pattern", "path"), [
    ("/v1/charges", "/v1/charges/"),          # a literal is the whole path, exactly
    ("/v1/charges", "/v1/charges/ch_1"),
    ("/v1/charges", "/v1/chargesx"),
    ("/v1/charges", "/V1/charges"),           # case matters
    ("/a.b", "/axb"),                         # '.' is literal, not a regex
    ("/orders/{order_id}", "/orders/"),       # a parameter is never empty
    ("/orders/{order_id}", "/orders/1/2"),    # ... and never spans a '/'
    ("/orders/{order_id}", "/orders"),
    ("/files/*", "/files"),                   # the '/' before '*' is part of the pattern
    ("/files/*", "/filesx"),
])
def test_pattern_does_not_match(pattern: str, path: str) -> None:
    """A literal matches only itself; `{param}` is one non-empty segment; `*` only trails."""
    assert PathPattern.compile(pattern).match(path) is None


def test_pattern_lists_its_params_in_order() -> None:
    """The compiled pattern names its parameters (config checks key.path against them)."""
    assert PathPattern.compile("/t/{tenant}/o/{id}/*").params == ("tenant", "id")


@pytest.mark.parametrize(("pattern", "reason"), [
    ("orders", "starting with /"),
    ("/orders/{id}.json", "malformed segment"),
    ("/orders/{id", "malformed segment"),
    ("/a/*/b", "malformed segment"),
    ("/a/{1id}", "malformed segment"),
    ("/a/{id}/b/{id}", "repeats the parameter {id}"),
])
def test_bad_patterns_are_refused_with_a_reason(pattern: str, reason: str) -> None:
    """An invalid pattern is a ValueError that says what is wrong with it."""
    with pytest.raises(ValueError, match=reason.replace("{", r"\{").replace("}", r"\}")):
        PathPattern.compile(pattern)


def test_first_matching_route_wins() -> None:
    """Routes are tried in order: an earlier, broader route shadows a later one."""
    routes = [route("all", "/*"), route("charges", "/v1/charges")]
    found = match(routes, "POST", "/v1/charges")
    assert found is not None and found.route.name == "all"
    found = match(list(reversed(routes)), "POST", "/v1/charges")
    assert found is not None and found.route.name == "charges"


def test_method_mismatch_falls_through_to_the_next_route() -> None:
    """A route whose path matches but whose methods do not is skipped, not a dead end."""
    routes = [route("puts", "/orders/{id}", ("PUT",)),
              route("posts", "/orders/{id}", ("POST", "PATCH"))]
    found = match(routes, "PATCH", "/orders/9")
    assert found is not None and found.route.name == "posts"
    assert dict(found.params) == {"id": "9"}
    assert match(routes, "DELETE", "/orders/9") is None


def test_no_route_is_none() -> None:
    """A path no route names gives None (the request streams through unguarded)."""
    assert match([route("charges", "/v1/charges")], "POST", "/v1/refunds") is None
    assert match([], "POST", "/") is None
