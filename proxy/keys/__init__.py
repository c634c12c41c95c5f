"""Keys: where a request's idempotency key comes from (header, path parameter, body),
whose it is (the tenant scope), and what makes two requests the same (the fingerprint);
JSON and form bodies as they read them. Pure: no socket, no clock, no store."""

from proxy.keys.sources import *  # noqa: F403 - the package's API is the sources module's
from proxy.keys.sources import __all__ as __all__
