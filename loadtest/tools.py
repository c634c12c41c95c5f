"""Install the load tools from Debian's packages when they are missing (we run as root)."""

from __future__ import annotations

import os
import shutil
import subprocess

# binary → Debian package that provides it
PACKAGES = {"wrk": "wrk", "nginx": "nginx-light", "pgbench": "postgresql-client",
            "psql": "postgresql-client"}


def missing() -> list[str]:
    return sorted({pkg for exe, pkg in PACKAGES.items()
                   if shutil.which(exe) is None and not os.path.exists(f"/usr/sbin/{exe}")})


def ensure() -> None:
    need = missing()
    if not need:
        return
    print(f"installing {' '.join(need)} (apt-get)", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *need],
                   check=True, env=env)
    still = missing()
    if still:
        raise RuntimeError(f"could not install {', '.join(still)}")


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"
