"""docs/configuration.md and docs/config.schema.json stay in step with the config
dataclasses (proxy/config/schema.py) and the loader's defaults."""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import typing
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml

from proxy.config import Config, Listen, loads
from proxy.config.routes import DEFAULT_FIELDS, ROUTE_FIELDS
from proxy.config.values import parse_duration, parse_listen, parse_size
from proxy.errors import ConfigError
from proxy.http.routing import PathPattern
from tests.conftest import ROOT

DOC = ROOT / "docs" / "configuration.md"
SCHEMA = json.loads((ROOT / "docs" / "config.schema.json").read_text())
EXAMPLES = sorted((ROOT / "config").glob("*.yaml"))

# Where a dataclass field sits in the YAML when that is not its own name.
RENAMED = {("Route", "methods"): "match.methods", ("Route", "path"): "match.path",
           ("Route", "trailing_slash"): "match.trailing_slash",
           ("Route", "case_insensitive"): "match.case_insensitive", ("Tenant", "mode"): ""}
LEAVES = (Listen, PathPattern)  # dataclasses written as one scalar
NOT_CONFIG = {("Config", "source"), ("Config", "warnings")}  # not fields: where it was
# read from, and what check-config warns about
YAML_ONLY = {"defaults"}  # a YAML section with no dataclass of its own


def dataclass_paths(cls: type, prefix: str = "") -> Iterator[str]:
    """Every YAML field path the dataclasses define, e.g. `routes[].key.header`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if (cls.__name__, f.name) in NOT_CONFIG:
            continue
        name = RENAMED.get((cls.__name__, f.name), f.name)
        path = ".".join(p for p in (prefix, name) if p)
        hint = hints[f.name]
        args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple and args and dataclasses.is_dataclass(args[0]):
            yield path
            yield from dataclass_paths(args[0], f"{path}[]")
        elif dataclasses.is_dataclass(hint) and not issubclass(hint, LEAVES):
            yield from dataclass_paths(hint, path)
        else:
            yield path


def documented() -> dict[str, str]:
    """Field path -> default cell, from every `| field | type | default | meaning |` table."""
    rows: dict[str, str] = {}
    in_table = False
    for line in DOC.read_text().splitlines():
        if line.startswith("| field | type | default | meaning |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            m = re.fullmatch(r"`([a-z_.\[\]]+)`", cells[0])
            assert m and len(cells) == 4, f"malformed row in {DOC.name}: {line}"
            assert m.group(1) not in rows, f"{m.group(1)} documented twice"
            rows[m.group(1)] = cells[2]
    return rows


def test_every_config_field_is_documented():
    """Each dataclass field has a row in docs/configuration.md."""
    missing = set(dataclass_paths(Config)) - set(documented())
    assert not missing, f"undocumented config fields: {sorted(missing)}"


def test_every_documented_field_exists():
    """Each row in docs/configuration.md names a field that still exists."""
    stale = set(documented()) - set(dataclass_paths(Config)) - YAML_ONLY
    assert not stale, f"documented fields that no longer exist: {sorted(stale)}"


def actual(path: str) -> Any:
    """The loader's value for `path` in a file that sets nothing but one route."""
    obj: Any = loads("", env={})
    if path.startswith("routes[]."):
        cfg = loads("routes:\n  - name: r\n    match: {path: /r}\n", env={})
        obj, path = cfg.routes[0], path.removeprefix("routes[].")
        path = {"match.methods": "methods", "match.path": "path",
                "match.trailing_slash": "trailing_slash",
                "match.case_insensitive": "case_insensitive",
                "tenant": "tenant.mode"}.get(path, path)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def same(value: Any, doc: Any) -> bool:
    """Does the documented YAML default `doc` load to the loader's `value`?"""
    if isinstance(value, enum.Enum):
        return bool(value.value == doc)
    if isinstance(value, Listen):
        return parse_listen(doc) == value
    if isinstance(value, bool) or value is None:
        return value is doc
    if isinstance(value, float):  # a duration, or a plain number (tracing.sample_ratio)
        if isinstance(doc, int | float) and not isinstance(doc, bool):
            return float(doc) == value
        return parse_duration(doc) == value
    if isinstance(value, int):
        return (parse_size(doc) if isinstance(doc, str) else doc) == value
    if isinstance(value, (frozenset, tuple)):
        return isinstance(doc, list) and sorted(doc) == sorted(value)
    return bool(value == doc)


def test_documented_defaults_are_the_loaders_defaults():
    """A default written as a literal (`24h`, `false`, `[POST]`) is what the loader uses."""
    checked = 0
    for path, cell in documented().items():
        m = re.fullmatch(r"`([^`]*)`", cell)
        if m is None or path in YAML_ONLY:
            continue  # `required`, `none`, prose: nothing literal to compare
        doc = yaml.safe_load(m.group(1))
        assert same(actual(path), doc), f"{path}: documented default {cell}, " \
                                        f"loader has {actual(path)!r}"
        checked += 1
    assert checked >= 30


def schema_paths(node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Every field path the JSON Schema defines (following $ref, oneOf and anyOf)."""
    for name, prop in properties(node).items():
        path = f"{prefix}.{name}" if prefix else name
        prop = resolve(prop)
        if name == "defaults":
            yield path
        elif prop.get("type") == "array" and "properties" in resolve(prop["items"]):
            yield path
            yield from schema_paths(resolve(prop["items"]), f"{path}[]")
        elif "properties" in prop and "oneOf" not in prop.get("anyOf", [{}])[0]:
            yield from schema_paths(prop, path)
        else:
            yield path
            for alt in prop.get("oneOf", []) + prop.get("anyOf", []):
                if "properties" in resolve(alt):
                    yield from schema_paths(resolve(alt), path)


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None or "properties" in node:
        return node
    target: dict[str, Any] = SCHEMA["$defs"][ref.removeprefix("#/$defs/")]
    return {**resolve(target), **{k: v for k, v in node.items() if k != "$ref"}}


def properties(node: dict[str, Any]) -> dict[str, Any]:
    props = dict(node.get("properties", {}))
    if "$ref" in node:
        props.update(properties(resolve({"$ref": node["$ref"]})))
    return props


def test_the_schema_defines_exactly_the_documented_fields():
    """docs/config.schema.json and docs/configuration.md name the same fields."""
    assert set(schema_paths(SCHEMA)) == set(documented())


def test_the_schema_route_fields_are_the_loaders():
    """The schema's route and defaults fields are the ones the loader accepts."""
    route = SCHEMA["$defs"]["route"]
    assert set(properties(route)) == ROUTE_FIELDS
    assert set(properties(SCHEMA["$defs"]["routeSettings"])) == DEFAULT_FIELDS


def test_the_schema_is_a_valid_json_schema():
    """The schema itself passes the draft 2020-12 meta-schema."""
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates_against_the_schema(path):
    """config/*.yaml pass the JSON Schema an editor would use."""
    jsonschema.Draft202012Validator(SCHEMA).validate(yaml.safe_load(path.read_text()))


BAD = {
    "unknown top-level field": "colour: red\n",
    "unknown route field": "routes:\n  - name: a\n    match: {path: /a}\n    colour: red\n",
    "a route without match": "routes:\n  - name: a\n",
    "a bad duration": "routes:\n  - name: a\n    match: {path: /a}\n    ttl: 24 hours\n",
    "a bad size": "defaults:\n  max_request_body: ten megs\n",
    "two key sources": "routes:\n  - name: a\n    match: {path: /a}\n"
                       "    key: {header: X-Id, body: [/id]}\n",
    "bucket without body": "routes:\n  - name: a\n    match: {path: /a}\n"
                           "    key: {header: X-Id, bucket: 1d}\n",
    "name under defaults": "defaults:\n  name: a\n",
    "an unknown preset": "routes:\n  - name: a\n    match: {path: /a}\n    preset: gitlab\n",
    "a bad tenant": "routes:\n  - name: a\n    match: {path: /a}\n    tenant: everyone\n",
    "a bad concurrent policy": "defaults:\n  concurrent: queue\n",
    "a bad admin address": "admin:\n  listen: somewhere\n",
    "an ftp upstream": "upstream:\n  url: ftp://example\n",
    "an unknown tls field": "upstream:\n  url: https://x\n  tls: {cafile: /etc/ca.pem}\n",
    "upstream_key without header": "routes:\n  - name: a\n    match: {path: /a}\n"
                                   "    upstream_key: {}\n",
    "a named upstream without a url mapping": "upstreams:\n  mail: https://x\n",
    "a bad mismatch_status": "defaults:\n  mismatch_status: 418\n",
}


@pytest.mark.parametrize("text", BAD.values(), ids=BAD.keys())
def test_bad_configs_fail_the_schema_and_the_loader(text):
    """What the loader refuses, the schema refuses too (so an editor flags it)."""
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(yaml.safe_load(text))
    with pytest.raises(ConfigError):
        loads(text, env={})


def test_env_references_pass_the_schema():
    """`${VAR:-default}` is accepted where the loader expands it (addresses, durations)."""
    doc = {"listen": "${LISTEN:-0.0.0.0:8080}", "upstream": {"timeout": "${T:-30s}"},
           "defaults": {"ttl": "${TTL}"}}
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
