"""The real `idemproxy` CLI as a subprocess (design.md §5): check-config on every example,
and migrate, keys list|show|delete|release and purge against real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from proxy.store import Completion
from proxy.store.postgres import PostgresStore
from tests.conftest import ROOT, free_port

EXAMPLES = sorted((ROOT / "config").glob("*.yaml"))


async def cli(*args: str, db: str | None = None, env: dict[str, str] | None = None
              ) -> tuple[int, str, str]:
    """Run `python -m proxy ARGS` from the repository root; (exit code, stdout, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMPROXY_")}
    full_env.update(env or {})
    if db is not None:
        full_env["IDEMPROXY_DATABASE_URL"] = db
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args, cwd=ROOT, env=full_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def keys_cmd(verb: str, *rest: str) -> tuple[str, ...]:
    return ("keys", verb, *rest, "--config", "config/example.yaml")


def routes_config(tmp_path: Path, *names: str) -> str:
    """A config file with one route per name (tenant by Authorization); its path."""
    cfg = tmp_path / f"routes-{uuid.uuid4().hex[:6]}.yaml"
    cfg.write_text("upstream: {url: 'http://127.0.0.1:9'}\nroutes:\n" + "".join(
        f"  - {{name: {n}, match: {{path: /{n}}}}}\n" for n in names))
    return str(cfg)


async def claim(store: PostgresStore, scope: str, key: str, *, ttl: float = 60) -> None:
    await store.claim(scope=scope, key=key, fingerprint=b"f" * 32, token=uuid.uuid4(),
                      lease=min(60, ttl), ttl=ttl)  # a live lease outlives its window


@pytest.fixture
async def fresh_db(db: str) -> AsyncIterator[str]:
    """An empty database on the test server (never migrated), dropped afterwards."""
    name = "idemproxy_cli_" + uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(db)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
        url = urlunsplit(urlsplit(db)._replace(path="/" + name))
        yield url
        await conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
async def test_every_example_config_passes_check_config(path: Path):
    """`idemproxy check-config` accepts each config/*.yaml and exits 0."""
    code, out, err = await cli("check-config", str(path.relative_to(ROOT)))
    assert code == 0, err
    assert "OK" in out and "Traceback" not in err


def test_the_examples_are_there():
    """The payments, webhooks and orders examples exist beside example.yaml."""
    assert {p.name for p in EXAMPLES} >= {"example.yaml", "payments.yaml", "webhooks.yaml",
                                          "orders.yaml"}


@pytest.mark.parametrize("text,expect", [
    ("routes:\n  - name: a\n    match: {path: /a}\n    ttl: 24 hours\n",
     "routes[0].ttl: '24 hours' is not a duration"),
    ("upstream:\n  url: ftp://x\n", "upstream.url:"),
    ("admin:\n  listen: 9090\n", "admin.listen:"),
    ("routes:\n  - name: a\n    match: {path: /a}\n    colour: red\n", "routes[0].colour:"),
    ("routes: [\n", "not valid YAML"),
])
async def test_a_bad_config_exits_2_naming_the_field(tmp_path, text, expect):
    """A bad config exits 2 with the field path in stderr, and no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    code, out, err = await cli("check-config", str(bad))
    assert code == 2 and expect in err, err
    assert "Traceback" not in err and "OK" not in out


async def test_a_missing_config_file_exits_2():
    """check-config on a file that does not exist exits 2 with one clear line."""
    code, _, err = await cli("check-config", "config/no-such-file.yaml")
    assert code == 2 and "no-such-file.yaml: cannot read" in err and "Traceback" not in err


async def test_check_config_warns_about_an_open_admin_port_without_a_token(tmp_path):
    """An admin listener beyond loopback without the token set passes with a warning."""
    cfg = tmp_path / "open-admin.yaml"
    cfg.write_text("upstream: {url: 'http://127.0.0.1:9'}\nadmin:\n  listen: 0.0.0.0:9090\n")
    code, _, err = await cli("check-config", str(cfg))
    assert code == 0 and "IDEMPROXY_ADMIN_TOKEN" in err
    code, _, err = await cli("check-config", str(cfg), env={"IDEMPROXY_ADMIN_TOKEN": "t"})
    assert code == 0 and err == ""


async def test_migrate_applies_once_and_keys_refuse_an_unmigrated_database(fresh_db):
    """Key commands never migrate behind your back; `migrate` applies, then is a no-op."""
    code, _, err = await cli(*keys_cmd("list"), db=fresh_db)
    assert code == 1 and "idemproxy migrate" in err and "Traceback" not in err
    code, out, _ = await cli("migrate", "--config", "config/example.yaml", db=fresh_db)
    assert code == 0 and out.startswith("applied: 0001_")
    code, out, _ = await cli("migrate", "--config", "config/example.yaml", db=fresh_db)
    assert code == 0 and out.strip() == "schema is current"
    code, out, _ = await cli(*keys_cmd("list"), db=fresh_db)
    assert code == 0 and json.loads(out) == []


async def test_keys_list_show_release(db, store):
    """`keys list` shows an in-flight claim, `show` its record, `release` frees it once."""
    scope, key = "cli-release:-", uuid.uuid4().hex
    await claim(store, scope, key)
    code, out, _ = await cli(*keys_cmd("list", "--limit", "10000"), db=db)
    assert code == 0
    assert [r["scope"] for r in json.loads(out) if r["key"] == key] == [scope]
    code, out, _ = await cli(*keys_cmd("show", scope, key), db=db)
    assert code == 0 and json.loads(out)["state"] == "in_flight"
    code, out, _ = await cli(*keys_cmd("release", scope, key), db=db)
    assert (code, out.strip()) == (0, "released")
    code, _, err = await cli(*keys_cmd("release", scope, key), db=db)
    assert code == 1 and "no in-flight claim" in err
    assert await store.show(scope=scope, key=key) is None


async def test_keys_delete_then_show_is_gone(db, store):
    """`keys delete` removes a record; `show` and a second `delete` then exit 1."""
    scope, key = "cli-delete:-", uuid.uuid4().hex
    await claim(store, scope, key)
    code, out, _ = await cli(*keys_cmd("delete", scope, key), db=db)
    assert (code, out.strip()) == (0, "deleted")
    for verb in ("show", "delete"):
        code, out, err = await cli(*keys_cmd(verb, scope, key), db=db)
        assert code == 1 and out == "" and "no such key" in err


async def test_purge_deletes_expired_records(db, store):
    """`purge` deletes records whose window has passed and leaves live ones, and claims
    still in flight past their window (only the running sweeper ends those, #25)."""
    dead, live, flying = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex
    token = uuid.uuid4()
    await store.claim(scope="cli-purge:-", key=dead, fingerprint=b"f" * 32, token=token,
                      lease=0.01, ttl=0.01)
    assert await store.complete(scope="cli-purge:-", key=dead, token=token, notify=False,
                                done=Completion(200, (), b"x", 0, 1, False))
    await claim(store, "cli-purge:-", flying, ttl=0.01)
    await claim(store, "cli-purge:-", live)
    await asyncio.sleep(0.05)
    code, out, _ = await cli("purge", "--config", "config/example.yaml", db=db)
    assert code == 0 and out.startswith("deleted ") and int(out.split()[1]) >= 1
    assert await store.show(scope="cli-purge:-", key=dead) is None
    assert await store.show(scope="cli-purge:-", key=live) is not None
    assert await store.show(scope="cli-purge:-", key=flying) is not None


async def test_keys_usage_errors_exit_2():
    """`keys show` without SCOPE and KEY, or an unknown verb, exits 2 without a traceback."""
    for args in (keys_cmd("show"), keys_cmd("delete", "only-scope"), keys_cmd("explode")):
        code, _, err = await cli(*args)
        assert code == 2 and "Traceback" not in err, args


async def test_an_unreachable_database_exits_1_with_one_line():
    """No database at the URL: exit 1 and one clear line, no traceback."""
    url = f"postgresql://idemproxy@127.0.0.1:{free_port()}/none"
    code, _, err = await cli(*keys_cmd("list"), db=url)
    assert code == 1 and err.startswith("error: database unreachable")
    assert "Traceback" not in err


# --- a stranger's first hour (#14) ------------------------------------------------------

async def test_version_matches_the_package_metadata():
    """`idemproxy --version` prints the installed package's version (which pyproject.toml
    reads from proxy.__version__), and exits 0."""
    from importlib.metadata import version
    code, out, _ = await cli("--version")
    assert (code, out.strip()) == (0, f"idemproxy {version('idemproxy')}")


def test_license_file_and_metadata_agree():
    """LICENSE is the Apache-2.0 text the metadata names, shipped, with project URLs."""
    import tomllib
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert meta["urls"]["Homepage"].startswith("https://")


@pytest.mark.parametrize("args", [("serve",), ("keys", "list"), ("migrate",), ("purge",)])
async def test_no_config_anywhere_exits_2_saying_what_to_set(args):
    """Without --config or IDEMPROXY_CONFIG a command exits 2 naming both, not "cannot read"."""
    code, _, err = await cli(*args)
    assert code == 2 and "--config" in err and "IDEMPROXY_CONFIG" in err, err
    assert "cannot read" not in err and "Traceback" not in err


async def test_a_negative_limit_is_a_usage_error():
    """`keys list --limit -1` exits 2 with argparse's line, never a database error name."""
    code, _, err = await cli(*keys_cmd("list", "--limit", "-1"))
    assert code == 2 and "--limit" in err and "Error:" not in err.replace("error:", "")


async def test_check_config_on_a_binary_file_exits_2_naming_it(tmp_path):
    """A binary file is "not a YAML text file" (exit 2), not a UnicodeDecodeError."""
    bad = tmp_path / "binary.yaml"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    code, _, err = await cli("check-config", str(bad))
    assert code == 2 and f"{bad}: not a YAML text file" in err, err
    assert "UnicodeDecodeError" not in err


async def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    """PyYAML's `<unicode string>` is replaced by the file's name, line and column."""
    bad = tmp_path / "broken.yaml"
    bad.write_text("listen: 127.0.0.1:8080\nroutes: [\n")
    code, _, err = await cli("check-config", str(bad))
    assert code == 2 and f"{bad}:3:" in err and "not valid YAML" in err, err
    assert "<unicode string>" not in err


async def test_an_empty_config_file_is_an_error(tmp_path):
    """An empty (or comments-only) file exits 2 instead of "OK (0 routes, ...)"."""
    for text in ("", "# nothing yet\n\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        code, out, err = await cli("check-config", str(empty))
        assert code == 2 and "empty" in err and "OK" not in out, err


async def test_check_config_counts_one_route_in_the_singular(tmp_path):
    """"1 route", not "1 routes"."""
    cfg = tmp_path / "one.yaml"
    cfg.write_text("upstream: {url: 'http://127.0.0.1:9'}\n"
                   "routes:\n  - {name: a, match: {path: /a}}\n")
    code, out, _ = await cli("check-config", str(cfg))
    assert code == 0 and "(1 route," in out


def test_data_dir_counts_from_the_config_files_folder(tmp_path, monkeypatch):
    """A relative (or absent) data_dir resolves against the config's folder, not the cwd."""
    from proxy.config import load
    (tmp_path / "etc").mkdir()
    cfg = tmp_path / "etc" / "c.yaml"
    cfg.write_text("upstream: {url: 'http://127.0.0.1:9'}\ndata_dir: state\n")
    monkeypatch.chdir("/")
    assert load(cfg, env={}).data_dir == str(tmp_path / "etc" / "state")
    cfg.write_text("upstream: {url: 'http://127.0.0.1:9'}\n")
    assert load(cfg, env={}).data_dir == str(tmp_path / "etc" / ".idemproxy")
    cfg.write_text("upstream: {url: 'http://127.0.0.1:9'}\ndata_dir: /var/lib/x\n")
    assert load(cfg, env={}).data_dir == "/var/lib/x"


@pytest.mark.parametrize("args", [("keys", "list"), ("keys", "show", "a:-", "k"), ("purge",)])
async def test_read_only_commands_never_create_a_cluster(tmp_path, args):
    """With no URL and no cluster under data_dir, keys/purge exit 1 and create nothing."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("upstream: {url: 'http://127.0.0.1:9'}\ndata_dir: state\n")
    code, _, err = await cli(*args, "--config", str(cfg))
    assert code == 1 and "no database" in err and "idemproxy migrate" in err, err
    assert not (tmp_path / "state").exists()


async def test_the_image_refuses_a_private_embedded_database(tmp_path):
    """IDEMPROXY_EMBEDDED_DATABASE=0 (the image's setting) without a URL: exit 2 saying
    what to set, and no cluster is created."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"listen: 127.0.0.1:{free_port()}\nadmin: {{listen: '127.0.0.1:"
                   f"{free_port()}'}}\nupstream: {{url: 'http://127.0.0.1:9'}}\n"
                   "data_dir: state\nworkers: 1\n")
    code, _, err = await cli("serve", "--config", str(cfg),
                             env={"IDEMPROXY_EMBEDDED_DATABASE": "0"})
    assert code == 2 and "IDEMPROXY_DATABASE_URL" in err
    assert "IDEMPROXY_EMBEDDED_DATABASE=1" in err and not (tmp_path / "state").exists()


async def test_keys_list_shows_stored_keys_newest_first_with_their_scope(db, store,
                                                                         tmp_path):
    """`keys list` lists completed keys too, newest first, filtered by route, state and
    age, bounded by --limit; each row's scope is what `keys show` takes."""
    from proxy.store import Completion
    route = "cli-list-" + uuid.uuid4().hex[:6]
    cfg = routes_config(tmp_path, route, f"{route}-other")
    keys = [uuid.uuid4().hex for _ in range(3)]
    for k in keys:
        token = uuid.uuid4()
        await store.claim(scope=f"{route}:t1", key=k, fingerprint=b"f" * 32, token=token,
                          lease=60, ttl=60)
        if k != keys[1]:
            await store.complete(scope=f"{route}:t1", key=k, token=token, done=Completion(
                status=201, headers=(), body=b"{}", body_chunks=0, body_size=2,
                body_omitted=False), notify=False)
    await claim(store, f"{route}-other:t1", uuid.uuid4().hex)

    async def ls(*extra: str) -> list[dict[str, object]]:
        code, out, err = await cli("keys", "list", "-c", cfg, "--route", route, *extra, db=db)
        assert code == 0, err
        rows: list[dict[str, object]] = json.loads(out)
        return rows
    rows = await ls()
    assert [r["key"] for r in rows] == keys[::-1]
    assert {r["scope"] for r in rows} == {f"{route}:t1"}
    assert [r["key"] for r in await ls("--state", "completed")] == [keys[2], keys[0]]
    assert [r["key"] for r in await ls("--limit", "1")] == [keys[2]]
    assert await ls("--older-than", "1h") == []
    assert len(await ls("--newer-than", "1h")) == 3
    code, out, _ = await cli(*keys_cmd("show", str(rows[0]["scope"]), str(rows[0]["key"])),
                             db=db)
    assert code == 0 and json.loads(out)["state"] == "completed"


def test_exception_text_is_never_empty():
    """An exception without a message is described by its class name, not "Name: "."""
    from proxy.errors import describe
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(ValueError("bad")) == "ValueError: bad"
