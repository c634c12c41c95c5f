"""TLS to the upstream: one client `SSLContext` per upstream, from `upstream.tls`.

    ca_file      the CAs that may sign the upstream's certificate (default: the system's)
    cert_file    a client certificate for mTLS (key_file, or the key inside cert_file)
    server_name  the name sent as SNI and checked in the certificate (default: URL host)
    verify       false: no certificate check at all — logged loudly at start-up

The context is built when the config is loaded (so `check-config` reports an unreadable
or malformed PEM file, naming the field) and again when the upstream session opens.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING

from proxy.errors import ConfigError

if TYPE_CHECKING:  # proxy.config imports this module while it loads
    from proxy.config.schema import UpstreamTLS

log = logging.getLogger("idemproxy.upstream")


def client_context(tls: UpstreamTLS, *, where: str = "upstream") -> ssl.SSLContext:
    """The context for one upstream; ConfigError naming `where.tls.FIELD` if the files
    cannot be read or are not what they should be."""
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"{where}.tls.ca_file: cannot load {tls.ca_file!r}: "
                           f"{_reason(exc)}"]) from None
    if tls.cert_file:
        try:
            ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError([f"{where}.tls.cert_file: cannot load the client certificate "
                               f"{tls.cert_file!r} with its key: {_reason(exc)}"]) from None
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def warn_if_unverified(tls: UpstreamTLS, *, url: str, where: str = "upstream") -> None:
    """The loud start-up line for `verify: false`."""
    if not tls.verify and url.startswith("https:"):
        log.warning("%s.tls.verify is false: the upstream's certificate is NOT checked. "
                    "Anyone on the network path can impersonate %s and read or change "
                    "every request, credentials included. Use tls.ca_file for a private CA "
                    "instead.", where, url)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def failure_reason(exc: BaseException) -> str:
    """Why a handshake failed, for the log line (never for the client)."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:  # the exception, what aiohttp wraps in it, and its causes
        cause = todo.pop(0)
        if cause is None or cause in seen:
            continue
        seen.append(cause)
        if isinstance(cause, ssl.SSLCertVerificationError) and \
                getattr(cause, "verify_message", None):
            return f"certificate not accepted: {cause.verify_message}"
        if isinstance(cause, ssl.CertificateError) and not isinstance(cause, ssl.SSLError):
            return f"certificate not accepted: {cause}"
        todo += [getattr(cause, "certificate_error", None), getattr(cause, "os_error", None),
                 cause.__cause__, cause.__context__]
    for cause in seen:
        if isinstance(cause, ssl.SSLError):
            return f"handshake failed: {cause.reason or cause.strerror or cause}"
    if any(isinstance(c, ConnectionResetError) for c in seen):
        return "handshake failed: the upstream reset the connection (our client certificate "\
            "missing or refused?)"
    return f"handshake failed: {type(exc).__name__}"
