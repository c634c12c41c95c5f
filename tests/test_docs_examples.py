"""The examples of README.md and docs/ that run, run (the curl lines: tests/test_readme.py):
every YAML block loads with the real loader, every `idemproxy` line of an sh block runs
against real PostgreSQL in the current grammar (no usage error, no deprecated
spelling), and every `idemproxy ...` named in the prose parses."""

from __future__ import annotations

import re
import shlex
import uuid
from pathlib import Path

import pytest
import yaml

from proxy.cli import build_parser
from proxy.config import loads
from proxy.config.routes import ROUTE_FIELDS
from proxy.config.schema import Config
from proxy.store import Completion
from tests.conftest import ROOT
from tests.test_cli import cli
from tests.test_cli_grammar import leaves
from tests.tls_certs import make_private_ca

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = {f for f in Config.__dataclass_fields__} | {"defaults"}
ENV = {"IDEMPROXY_DATABASE_URL": "postgresql://u@db/idemproxy",
       "IDEMPROXY_DATABASE_LISTEN_URL": "postgresql://u@db/idemproxy"}
# Commands that do not end by themselves: the examples name them, the suite runs them
# elsewhere (tests/test_cli.py, test_readme.py).
LONG_RUNNING = ("serve",)


def blocks(lang: str) -> list[tuple[str, str]]:
    """(page name, text) of every fenced block of `lang`."""
    return [(p.name, b) for p in PAGES
            for b in re.findall(rf"```{lang}\n(.*?)```", p.read_text(), re.S)]


def as_config(text: str) -> str:
    """A documented YAML block as a whole config: a list of routes, a route's fields, or
    a config (or part of one) as it stands."""
    doc = yaml.safe_load(text)
    indented = "".join(f"    {line}\n" for line in text.splitlines())
    if isinstance(doc, list):
        return "routes:\n" + "".join(f"  {line}\n" for line in text.splitlines())
    if set(doc) <= TOP:
        return text
    assert set(doc) <= ROUTE_FIELDS, f"a YAML example that is no config: {list(doc)}"
    return "routes:\n  - name: r\n    match: {path: /r}\n" + indented


def test_the_docs_have_yaml_examples():
    """The YAML examples are there to be checked (routes, fragments, whole configs)."""
    assert len(blocks("yaml")) >= 8


@pytest.mark.parametrize("page,text", blocks("yaml"), ids=lambda v: v[:40])
def test_every_yaml_example_loads(page, text, tmp_path):
    """Each YAML block of the README and docs/ loads with the real loader (the
    certificates it names are stood in for by a test CA's)."""
    ca = make_private_ca(tmp_path)
    stand_in = {".pem": ca.client_cert, ".key": ca.client_key}
    for path in set(re.findall(r"/etc/idemproxy/[\w.-]+", text)):
        real = ca.ca_file if "ca" in Path(path).stem else stand_in[Path(path).suffix]
        text = text.replace(path, str(real))
    loads(as_config(text), env=ENV)


def cli_lines() -> list[tuple[str, list[str]]]:
    """(page, argv) for each `idemproxy` line of the sh blocks."""
    out = []
    for page, block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("#"):
                continue
            words = shlex.split(line.partition(" #")[0])
            if words and words[0] in ("idemproxy", ".venv/bin/idemproxy"):
                out.append((page, words[1:]))
    return out


async def test_every_idemproxy_line_runs_in_the_current_grammar(db, store):
    """Against a migrated database holding the documented keys, each `idemproxy` line
    exits 0 (or 1: not found), with no usage error and no deprecation line."""
    lines = [(p, argv) for p, argv in cli_lines() if argv[0] not in LONG_RUNNING]
    assert len(lines) >= 8, lines
    code, out, err = await cli("tenant", "hash", "Bearer sk_demo", "-c",
                               "config/example.yaml", db=db)
    assert code == 0, err
    for key in ("order-1834", "order-2001"):
        token = uuid.uuid4()
        scope = f"charges:{out.strip()}"
        await store.delete(scope=scope, key=key)
        await store.claim(scope=scope, key=key, fingerprint=b"f" * 32, token=token,
                          lease=60, ttl=600)
        await store.complete(scope=scope, key=key, token=token, done=Completion(
            status=201, headers=(), body=b"{}", body_chunks=0, body_size=2,
            body_omitted=False), notify=False)
    for page, argv in lines:
        code, _, err = await cli(*argv, db=db, env={"IDEMPROXY_CONFIG": "config/example.yaml"})
        assert code in (0, 1) and "deprecated" not in err and "Traceback" not in err, \
            (page, argv, code, err)


def prose_commands() -> list[tuple[str, str]]:
    """(page, command) for each `idemproxy ...` in backticks outside code blocks, but
    for the paragraphs that name the old spellings on purpose."""
    out = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for para in re.split(r"\n\s*\n", text):
            if "deprecat" in para or "still work" in para or "is now" in para:
                continue
            out += [(page.name, c) for c in re.findall(r"`idemproxy ([^`]+)`",
                                                          para.replace("\n", " "))]
    return out


def unknown(found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (page, command) pairs that name no current command or verb."""
    known = {" ".join(path) for path, _ in leaves(build_parser())}
    old = {"keys generate", "keys usage", "keys reencrypt", "keys purge", "tenant-hash"}
    bad = []
    for page, command in found:
        words = []
        for w in command.split():
            if w.startswith("-") or not re.fullmatch(r"[a-z-]+", w):
                break  # options, arguments and placeholders (COMMAND, VERB) end it
            words.append(w)
        named = " ".join(words)
        if not named:
            continue  # `idemproxy COMMAND --help`: a placeholder, no command
        if named in old or not any(k == named or k.startswith(named + " ") or
                                   named.startswith(k + " ") for k in known):
            bad.append((page, command))
    return bad


def test_every_command_named_in_the_prose_exists():
    """Each `idemproxy NOUN VERB` the prose names is a current command or verb."""
    found = prose_commands()
    assert len(found) >= 10 and not unknown(found), unknown(found)


def test_the_prose_check_can_fail():
    """An old spelling, or a verb that does not exist, is caught."""
    found = [("x", "keys reencrypt"), ("x", "keys explode K"), ("x", "tenant-hash CRED"),
             ("x", "encryption-keys reencrypt --batch 5")]
    assert unknown(found) == found[:3]
