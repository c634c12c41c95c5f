"""What a process checks and loads before it serves: the HTTP parser in use, the
sealer's keys; and how a URL appears in its logs."""

from __future__ import annotations

import logging
from collections.abc import Callable

from proxy.config import Config
from proxy.sealing import keys_from_env
from proxy.store import RuntimeStore

log = logging.getLogger("idemproxy.server")


def check_parser(cfg: Config) -> None:
    """Refuse to run on aiohttp's pure-Python HTTP parser unless explicitly allowed.

    The C (llhttp) and Python parsers disagree on edge cases of request framing; a proxy
    whose framing differs from its upstream's is open to request smuggling.
    """
    from aiohttp import http_parser, web_protocol

    c_parser = getattr(http_parser, "HttpRequestParserC", None)
    active = web_protocol.HttpRequestParser  # type: ignore[attr-defined]
    if c_parser is None or active is not c_parser:
        if not cfg.allow_python_parser:
            raise RuntimeError("aiohttp's C HTTP parser is not active (AIOHTTP_NO_EXTENSIONS "
                               "set, or no wheel for this platform); refusing to start. Set "
                               "allow_python_parser: true to run anyway.")
        log.warning("running on aiohttp's pure-Python HTTP parser (allow_python_parser)")


async def open_sealer(cfg: Config, store: RuntimeStore, *,
                      on_unreadable: Callable[[str], None] | None = None,
                      quiet: bool = False) -> None:
    """Keys from `encryption.keys_env` and the installation secret, into the store; says
    in the log whether stored answers are encrypted (`quiet`: a worker, the supervisor
    says it)."""
    sealer = await store.load_sealer(keys=keys_from_env(cfg.encryption.keys_env),
                                     on_unreadable=on_unreadable)
    if quiet:
        return
    if sealer.primary is None:
        log.warning("stored answers are not encrypted at rest: $%s is not set",
                    cfg.encryption.keys_env)
    else:
        log.info("stored answers are sealed (AES-256-GCM)", extra={"fields": {
            "primary_key": sealer.primary.id, "keys": [k.id for k in sealer.keys]}})


def redact_url(url: str) -> str:
    """The URL without any user:password part, for logs."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    host = authority.rpartition("@")[2]
    return f"{scheme}{sep}{'***@' if '@' in authority else ''}{host}{slash}{path}"
