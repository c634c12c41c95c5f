"""The client edge of the proxied port: connections and framing, one problem+json
renderer, headers, CORS, body-memory limits, routing, Forwarded, relayed responses and
HTTP/1.1 on the wire."""
