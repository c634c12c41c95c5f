"""The manual: README.md stays a short front door whose links reach real pages and
anchors, the docs site builds with MkDocs in strict mode (every link and anchor between
pages resolves), and the docs say what the code does where the two once disagreed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

from proxy.config import loads
from proxy.errors import ConfigError
from tests.conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")
README_MAX_BYTES = 15 * 1024


def anchors(page: Path) -> set[str]:
    """The ids MkDocs gives the page's headings (the toc extension's slugify)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slugify(m.group(1).strip(), "-") for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_the_readme_is_a_short_front_door():
    """README.md is at most 15 KB and keeps the two commands a newcomer needs."""
    text = README.read_text()
    assert len(text.encode()) <= README_MAX_BYTES, len(text.encode())
    assert "make run" in text and "make test" in text


def test_every_readme_link_reaches_a_file_and_anchor():
    """Each relative link in README.md names a file that exists, and its #anchor is a
    heading of that page."""
    checked = 0
    for target in LINK.findall(README.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        page = (ROOT / path) if path else README
        assert page.exists(), f"README links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(page), f"README links to {target}: no such heading"
        checked += 1
    assert checked >= 10


def test_the_readme_links_every_docs_page():
    """Each page of docs/ is reachable from the README (the site's index aside)."""
    linked = set(LINK.findall(README.read_text()))
    missing = [p.name for p in PAGES if p.name != "index.md"
               and not any(t.split("#")[0] == f"docs/{p.name}" for t in linked)]
    assert not missing, missing


def contract(text: str) -> str:
    """The contract table: the lines of the `| situation |` table."""
    start = text.index("| situation | the proxy answers | upstream called? |")
    return text[start:text.index("\n\n", start)]


def test_the_readme_and_the_site_show_the_same_contract_table():
    """The README's contract table and docs/index.md's are the same, row for row."""
    assert contract(README.read_text()) == contract((DOCS / "index.md").read_text())


def test_the_site_builds_strict_with_every_page_in_its_nav(tmp_path):
    """`mkdocs build --strict` (what `make docs` runs) succeeds into a temporary folder:
    every link and #anchor between pages resolves, and no page is left out of the nav."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    built = {p.parent.name for p in (tmp_path / "site").glob("*/index.html")}
    assert {p.stem for p in PAGES if p.stem != "index"} <= built


def test_a_broken_anchor_fails_the_strict_build(tmp_path):
    """The check can fail: a copy of the docs with a link to a missing anchor does not
    build."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for page in PAGES:
        (docs / page.name).write_text(page.read_text())
    (docs / "faq.md").write_text((docs / "faq.md").read_text()
                                 + "\n[gone](guarantees.md#no-such-heading)\n")
    cfg = (ROOT / "mkdocs.yml").read_text()
    (tmp_path / "mkdocs.yml").write_text(cfg)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-d", str(tmp_path / "site")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no-such-heading" in proc.stdout + proc.stderr


def prose() -> list[tuple[str, str]]:
    """(file, paragraph) for every paragraph of the README and docs/ outside code."""
    out = []
    for path in [README, *PAGES]:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        out += [(path.name, p) for p in re.split(r"\n\s*\n", text)]
    return out


def test_a_lease_longer_than_the_window_is_an_error_in_the_code_and_the_docs():
    """The loader refuses lock_timeout > ttl, and no page calls it a warning."""
    with pytest.raises(ConfigError, match="lock_timeout"):
        loads("routes:\n  - name: a\n    match: {path: /a}\n    ttl: 30s\n"
              "    lock_timeout: 60s\n", env={})
    for name, para in prose():
        for sentence in re.split(r"(?<=[.;:])\s", para.replace("\n", " ")):
            if "lock_timeout" in sentence and "longer than" in sentence:
                assert "warn" not in sentence or "wait_timeout" in sentence, (name, sentence)


def test_the_tenant_hash_is_documented_as_an_hmac():
    """No page calls the tenant hash a plain SHA-256: it is an HMAC under the
    installation secret (keys.tenant_of with Sealer.tenant_hash)."""
    for name, para in prose():
        flat = para.replace("\n", " ")
        if "tenant" in flat.lower() and "SHA-256" in flat:
            assert "HMAC" in flat, (name, flat)
