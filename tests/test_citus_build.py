"""scripts/build-citus.sh (issue #29): cached by version, and a clear failure naming
CITUS_SRC when it has no source to build from (the Citus tests are never skipped)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.citus import citus_built
from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "build-citus.sh"


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_a_second_run_does_not_rebuild():
    """With Citus built for this version (make test's `citus` target ran), the script
    returns at once without building."""
    assert citus_built() is not None, "make citus has not run"
    done = subprocess.run([str(SCRIPT), sys.executable], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "building" not in done.stdout + done.stderr


def test_no_usable_source_fails_naming_citus_src(tmp_path: Path):
    """A PostgreSQL without Citus and a CITUS_SRC that is not there: exit 1 with a
    message naming CITUS_SRC, nothing installed."""
    lib = tmp_path / "lib"
    lib.mkdir()
    pg_config = _executable(tmp_path / "pg_config", (
        "#!/bin/sh\ncase \"$1\" in --pkglibdir) echo " + str(lib) + ";; "
        "--version) echo 'PostgreSQL 18.6';; esac\n"))
    python = _executable(tmp_path / "python", f"#!/bin/sh\necho {pg_config}\n")
    env = {**os.environ, "CITUS_SRC": str(tmp_path / "missing")}
    done = subprocess.run([str(SCRIPT), str(python)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "CITUS_SRC" in done.stderr
    assert not (lib / "citus.so").exists()
