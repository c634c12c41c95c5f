"""Let browser clients read the headers the proxy adds to a CORS answer.

A cross-origin script sees only the CORS-safelisted response headers unless the answer
names others in `Access-Control-Expose-Headers` (WHATWG Fetch, "CORS-safelisted response-
header name"). So when an upstream's answer is a CORS answer (it carries
`Access-Control-Allow-Origin`), the proxy appends the names of its own headers — the
route's replay header, its expiry header and its omitted-body header — so a browser client can
tell a replay and read when its key ends. Answers without that header are left alone: the
proxy never turns an answer into a CORS one.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict

from proxy.config import Route

ALLOW_ORIGIN = "Access-Control-Allow-Origin"
EXPOSE = "Access-Control-Expose-Headers"


def proxy_header_names(route: Route) -> tuple[str, ...]:
    """The response headers the proxy itself may add on this route."""
    names = [route.replay_header, route.omitted_header]
    if route.expires_header:
        names.append(route.expires_header)
    return tuple(names)


def expose(headers: CIMultiDict[str], names: Iterable[str]) -> None:
    """Append `names` to Access-Control-Expose-Headers if this is a CORS answer.

    Names already listed are not repeated. A `*` is kept and the names still added: `*`
    means "all" only for requests without credentials, so the names are what a
    credentialed request relies on.
    """
    if ALLOW_ORIGIN not in headers:
        return
    values = [v.strip() for v in headers.getall(EXPOSE, ()) if v.strip()]
    listed = {t.strip().lower() for v in values for t in v.split(",")}
    missing = [n for n in names if n.lower() not in listed]
    if missing:
        headers[EXPOSE] = ", ".join([*values, *missing])


def expose_for(route: Route, headers: CIMultiDict[str]) -> None:
    """`expose` with the route's own header names."""
    expose(headers, proxy_header_names(route))
