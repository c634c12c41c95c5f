"""The upstream leg: the forwarder and its one error boundary, our HTTP/1.1 client and
aiohttp's, TLS, the upstream key, which upstream a route uses, transfer codings and the
WebSocket tunnel."""
