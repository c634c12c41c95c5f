"""`idemproxy serve`: one process (`workers: 1`), or one of the supervisor's workers.

The process's life (store, migrations, sealer, listeners, background tasks, signals,
drain) is proxy/runtime.py's, shared with the supervisor (proxy/supervisor.py).
"""

from __future__ import annotations

from proxy.config import Config
from proxy.runtime import Role, run
from proxy.startup import check_parser, open_sealer, redact_url

__all__ = ["check_parser", "open_sealer", "redact_url", "serve"]


async def serve(cfg: Config, *, worker: bool = False) -> int:
    """Run the proxy. A supervisor's worker (`worker=True`) shares the proxied port with its
    siblings and leaves migrations, the admin listener and the sweeper to the supervisor."""
    return await run(cfg, role=Role.WORKER if worker else Role.SINGLE)
