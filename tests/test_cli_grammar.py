"""One CLI grammar (#28), the real `idemproxy` as a subprocess against real PostgreSQL:
--config/IDEMPROXY_CONFIG everywhere, encryption-key and tenant verbs under their own
nouns with the old spellings kept (deprecated), per-verb help with an example, `keys
show ROUTE KEY` with the stored answer, unknown routes refused, connection errors that
name host and port, serve's retry lines, and --output json|table."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid

import pytest

from proxy.cli import build_parser
from proxy.sealing import generate_key
from proxy.store import Completion
from tests.conftest import ROOT, free_port
from tests.test_cli import claim, cli, routes_config

K1 = f"k1:{generate_key()}"


async def complete(store, scope: str, key: str, *, body: bytes = b'{"id": "ch_1"}') -> None:
    token = uuid.uuid4()
    await store.claim(scope=scope, key=key, fingerprint=b"f" * 32, token=token, lease=60,
                      ttl=600)
    await store.complete(scope=scope, key=key, token=token, done=Completion(
        status=201, headers=(("Content-Type", "application/json"), ("X-Charge", "ch_1")),
        body=body, body_chunks=0, body_size=len(body), body_omitted=False), notify=False)


async def test_check_config_takes_config_and_the_environment_too(tmp_path):
    """check-config reads --config, then IDEMPROXY_CONFIG, as well as its positional FILE."""
    for args, env in ((("check-config", "--config", "config/example.yaml"), {}),
                      (("check-config",), {"IDEMPROXY_CONFIG": "config/example.yaml"}),
                      (("check-config", "config/example.yaml"), {})):
        code, out, err = await cli(*args, env=env)
        assert code == 0 and "config/example.yaml: OK" in out, (args, err)
    code, _, err = await cli("check-config")
    assert code == 2 and "--config" in err and "IDEMPROXY_CONFIG" in err


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for every command and verb, old spellings included."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sp in action.choices.items():
            yield from leaves(sp, (*path, name))


def test_every_command_and_verb_takes_config_and_shows_an_example():
    """Each leaf command accepts --config, and its --help ends with an example line."""
    found = dict(leaves(build_parser()))
    assert {("encryption-keys", "purge"), ("tenant", "erase"), ("keys", "show"),
            ("check-config",), ("tenant", "hash")} <= set(found)
    old = {("keys", v) for v in ("generate", "usage", "reencrypt", "purge")} | {
        ("tenant-hash",)}
    for path, sp in found.items():
        assert any("--config" in a.option_strings for a in sp._actions), path
        if path not in old:
            assert "example:\n  idemproxy " in sp.format_help(), path


async def test_encryption_keys_generate_and_its_old_spelling():
    """`encryption-keys generate ID` prints ID:BASE64; `keys generate` still does, with a
    deprecation line naming the new spelling on stderr."""
    code, out, err = await cli("encryption-keys", "generate", "k7")
    assert code == 0 and out.startswith("k7:") and err == ""
    code, out, err = await cli("keys", "generate", "k7")
    assert code == 0 and out.startswith("k7:")
    assert "deprecated" in err and "idemproxy encryption-keys generate" in err


async def test_usage_without_encryption_says_it_is_off_and_lists_a_table(db, store):
    """Without keys, `encryption-keys usage` says encryption is off (stderr) and labels
    plaintext records, as JSON or as a table; `keys usage` is the same, deprecated."""
    await complete(store, "cli-usage:-", uuid.uuid4().hex)
    code, out, err = await cli("encryption-keys", "usage", "-c", "config/example.yaml", db=db)
    rows = json.loads(out)
    assert code == 0 and "encryption at rest is off" in err
    assert any(r["key_id"] == "(none: plaintext)" and r["sealed"] >= 1 for r in rows)
    assert "null" not in out
    code, out, err = await cli("encryption-keys", "usage", "-c", "config/example.yaml",
                               "--output", "table", db=db)
    assert code == 0 and out.splitlines()[0].split() == ["key_id", "sealed", "fingerprints",
                                                        "configured", "primary"]
    code, out, err = await cli("keys", "usage", "-c", "config/example.yaml", db=db)
    assert code == 0 and "deprecated" in err and json.loads(out)


async def test_encryption_keys_purge_deletes_a_retired_keys_records(db, make_proxy, client):
    """Records sealed under a key no longer configured are deleted by `encryption-keys
    purge ID`; a key still configured is refused (exit 2)."""
    from tests.test_at_rest import ROUTES
    from tests.test_flow import post
    key_id = "r" + uuid.uuid4().hex[:6]
    sealed = f"{key_id}:{generate_key()}"
    p = await make_proxy(ROUTES, encryption_keys=sealed)
    await post(client, p.url + "/exec/cli-retired", key=uuid.uuid4().hex,
               headers={"Authorization": "Bearer x"})
    env = {"IDEMPROXY_ENCRYPTION_KEYS": sealed}
    code, _, err = await cli("encryption-keys", "purge", key_id, "-c",
                             "config/example.yaml", db=db, env=env)
    assert code == 2 and "still in" in err
    code, out, err = await cli("encryption-keys", "purge", key_id, "-c",
                               "config/example.yaml", db=db, env={"IDEMPROXY_ENCRYPTION_KEYS": K1})
    assert (code, out.strip()) == (0, f"deleted 1 records of key {key_id}"), err


async def test_tenant_erase_and_hash_and_their_old_spellings(db, store):
    """`tenant hash` prints the hash; `tenant erase --tenant H` deletes that tenant's
    records; `tenant-hash` and `keys purge` still work, each with a deprecation line."""
    cred = "Bearer cli-" + uuid.uuid4().hex
    code, out, err = await cli("tenant", "hash", cred, "-c", "config/example.yaml", db=db)
    assert code == 0 and len(out.strip()) == 32 and err == ""
    tenant = out.strip()
    code, out, err = await cli("tenant-hash", cred, "-c", "config/example.yaml", db=db)
    assert out.strip() == tenant and "use `idemproxy tenant hash`" in err
    await complete(store, f"charges:{tenant}", "a")
    await complete(store, f"charges:{tenant}", "b")
    code, out, err = await cli("tenant", "erase", "--tenant-of", cred, "-c",
                               "config/example.yaml", db=db)
    assert (code, out.strip()) == (0, f"deleted 2 records of tenant {tenant}"), err
    await complete(store, f"charges:{tenant}", "c")
    code, out, err = await cli("keys", "purge", "--tenant", tenant, "-c",
                               "config/example.yaml", db=db)
    assert code == 0 and out.startswith("deleted 1 ") and "use `idemproxy tenant erase`" in err
    code, _, err = await cli("tenant", "erase", "-c", "config/example.yaml", db=db)
    assert code == 2 and "--tenant-of" in err


async def test_keys_show_by_route_shows_the_stored_answer(db, store, tmp_path):
    """`keys show ROUTE KEY` finds the one scope holding the key and prints the stored
    answer's status, headers and body size; `--body` prints the body itself."""
    route = "show-" + uuid.uuid4().hex[:6]
    cfg, key = routes_config(tmp_path, route), uuid.uuid4().hex
    await complete(store, f"{route}:t1", key)
    code, out, err = await cli("keys", "show", route, key, "-c", cfg, db=db)
    rec = json.loads(out)
    assert code == 0 and rec["scope"] == f"{route}:t1" and rec["status"] == 201, err
    assert rec["body_size"] == 14 and ["X-Charge", "ch_1"] in rec["headers"]
    code, out, _ = await cli("keys", "show", route, key, "--body", "-c", cfg, db=db)
    assert (code, out) == (0, '{"id": "ch_1"}')


async def test_keys_show_by_route_lists_the_scopes_when_two_tenants_hold_the_key(
        db, store, tmp_path):
    """Two tenants' records of one key: `keys show ROUTE KEY` exits 2 naming both scopes;
    a key no tenant holds exits 1 saying a scope is ROUTE:TENANT."""
    route = "two-" + uuid.uuid4().hex[:6]
    cfg, key = routes_config(tmp_path, route), uuid.uuid4().hex
    await complete(store, f"{route}:t1", key)
    await complete(store, f"{route}:t2", key)
    code, _, err = await cli("keys", "show", route, key, "-c", cfg, db=db)
    assert code == 2 and f"{route}:t1" in err and f"{route}:t2" in err
    code, out, err = await cli("keys", "delete", route, "nope", "-c", cfg, db=db)
    assert code == 1 and out == "" and "no such key" in err and "ROUTE:TENANT" in err


@pytest.mark.parametrize("args", [("keys", "list", "--route", "nosuchroute"),
                                  ("keys", "show", "nosuchroute", "k"),
                                  ("keys", "release", "nosuchroute", "k")])
async def test_an_unknown_route_name_is_an_error(db, args):
    """A route the config does not have exits 2 naming the routes it has, never `[]`."""
    code, out, err = await cli(*args, "-c", "config/example.yaml", db=db)
    assert code == 2 and "no route named 'nosuchroute'" in err and "charges" in err, err
    assert out == ""


async def test_keys_list_prints_a_table(db, store, tmp_path):
    """`keys list --output table` prints a header row and one aligned row per key."""
    route = "table-" + uuid.uuid4().hex[:6]
    cfg, key = routes_config(tmp_path, route), uuid.uuid4().hex
    await claim(store, f"{route}:-", key)
    code, out, _ = await cli("keys", "list", "--route", route, "-o", "table", "-c", cfg,
                             db=db)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["scope", "key", "state"]
    assert lines[1].split()[:3] == [f"{route}:-", key, "in_flight"] and len(lines) == 2


async def test_connection_errors_name_host_and_port_never_the_password():
    """An unreachable database: exit 1, one line naming host and port, no password."""
    port = free_port()
    url = f"postgresql://idemproxy:hunter2secret@127.0.0.1:{port}/none"
    code, _, err = await cli("keys", "list", "-c", "config/example.yaml", db=url)
    assert code == 1 and err.startswith("error: database unreachable")
    assert f"127.0.0.1:{port}" in err and "hunter2secret" not in err, err


async def test_serve_logs_each_database_retry_with_what_it_waits_for(tmp_path):
    """`serve` with the database down logs one line per attempt naming host and port."""
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"listen: 127.0.0.1:{free_port()}\nadmin: {{listen: '127.0.0.1:"
                   f"{free_port()}'}}\nupstream: {{url: 'http://127.0.0.1:9'}}\nworkers: 1\n"
                   "logging: {format: text}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMPROXY_")}
    env["IDEMPROXY_DATABASE_URL"] = f"postgresql://u:pw@127.0.0.1:{port}/none"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "-c", str(cfg), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    seen: list[str] = []
    try:
        async with asyncio.timeout(60):
            assert proc.stderr is not None
            while len(seen) < 2:
                line = (await proc.stderr.readline()).decode()
                assert line, "serve exited before retrying"
                if "waiting for the database" in line:
                    seen.append(line)
    finally:
        proc.terminate()
        await proc.wait()
    assert all(f"127.0.0.1:{port}" in s and "pw@" not in s for s in seen), seen
    assert "attempt 1" in seen[0] and "attempt 2" in seen[1]
