"""aiohttp's private members the proxy relies on still exist in the installed aiohttp, and
connections.py's list of them is complete (pyproject.toml pins aiohttp to the minor versions
tested; this is what fails first when a new aiohttp drops one)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import aiohttp
from aiohttp import web_protocol, web_server

from proxy.http import connections

CONNECTIONS = Path(connections.__file__)
# connections.py's subclasses and the aiohttp class each one extends
SUBCLASSES = {"_ProblemRequestHandler": "RequestHandler", "_ProblemServer": "Server"}


async def _noop(request: object) -> None:
    return None


def _instances() -> dict[str, object]:
    server = web_server.Server(_noop)
    return {"Server": server,
            "RequestHandler": web_protocol.RequestHandler(server, loop=server._loop)}


def _classes() -> dict[str, ast.ClassDef]:
    tree = ast.parse(CONNECTIONS.read_text())
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _own_names(cls: ast.ClassDef) -> set[str]:
    """What the subclass itself introduces: attributes set in its __init__, and methods."""
    names = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
    for f in cls.body:
        if isinstance(f, ast.FunctionDef) and f.name == "__init__":
            names |= {t.attr for n in ast.walk(f) if isinstance(n, ast.Assign | ast.AnnAssign)
                      for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                      if isinstance(t, ast.Attribute)}
    return names


def _private_uses(cls: ast.ClassDef) -> set[str]:
    """Every `self._name` the subclass reads or writes (not dunders)."""
    return {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "self"
            and n.attr.startswith("_") and not n.attr.startswith("__")}


async def test_private_members_connections_relies_on_exist():
    """Each private member listed in connections.AIOHTTP_PRIVATES exists on aiohttp's class."""
    instances = _instances()
    for base, names in connections.AIOHTTP_PRIVATES.items():
        for name in sorted(names):
            assert hasattr(instances[base], name), f"aiohttp {base} has no {name}"


def test_connections_lists_every_private_member_it_uses():
    """connections.py's subclasses read, write or override no aiohttp private member that is
    missing from AIOHTTP_PRIVATES, and override no private method unknowingly."""
    classes = _classes()
    for sub, base in SUBCLASSES.items():
        declared = connections.AIOHTTP_PRIVATES[base]
        own = _own_names(classes[sub])
        used = _private_uses(classes[sub]) - own
        assert used <= declared, f"{sub} uses undeclared {sorted(used - declared)}"
        aiohttp_cls = getattr(web_protocol if base == "RequestHandler" else web_server, base)
        overridden = {name for name in own if name.startswith("_")
                      and not name.startswith("__") and hasattr(aiohttp_cls, name)}
        assert overridden <= declared, f"{sub} overrides undeclared {sorted(overridden)}"


async def test_client_session_retry_switch_exists():
    """forward.py turns aiohttp's connection retries off through ClientSession's private
    `_retry_connection`: it still exists (forward.py refuses to start without it)."""
    async with aiohttp.ClientSession() as session:
        assert hasattr(session, "_retry_connection")


def test_parser_check_reads_the_active_request_parser():
    """server.check_parser compares web_protocol's request parser to the C one: the name
    it reads is still there."""
    assert inspect.isclass(web_protocol.HttpRequestParser)
