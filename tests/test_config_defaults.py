"""Each config default is stated once, in the dataclasses of proxy/config/schema.py: the
loader takes its defaults from them, and every `default` in docs/config.schema.json is
checked against what the loader produces (docs/configuration.md's are, in test_docs.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tests.test_docs import SCHEMA, actual, properties, resolve, same


def schema_defaults(node: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(field path, default) for every property of the JSON Schema that states one."""
    for name, prop in properties(node).items():
        path = f"{prefix}.{name}" if prefix else name
        prop = resolve(prop)
        if name in ("defaults", "upstreams"):
            continue  # the same fields as routes[] and upstream, checked there
        if "default" in prop:
            yield path, prop["default"]
        if prop.get("type") == "array" and "properties" in resolve(prop.get("items", {})):
            yield from schema_defaults(resolve(prop["items"]), f"{path}[]")
        elif "properties" in prop or "$ref" in prop:
            yield from schema_defaults(prop, path)
        for alt in prop.get("oneOf", []) + prop.get("anyOf", []):
            if "properties" in resolve(alt):
                yield from schema_defaults(resolve(alt), path)


def test_json_schema_defaults_are_the_loaders():
    """Every default in docs/config.schema.json is the value the loader gives that field."""
    checked = 0
    for path, default in schema_defaults(SCHEMA):
        if path == "workers":
            continue  # `auto`: the cores this machine has (test_config checks it)
        assert same(actual(path), default), f"{path}: schema says {default!r}, " \
                                            f"loader has {actual(path)!r}"
        checked += 1
    assert checked >= 45, checked
