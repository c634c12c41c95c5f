#!/usr/bin/env bash
# make run: start the demo charges API and idemproxy in front of it, print curl lines.
set -euo pipefail
BIN=${1:-.venv/bin}
"$BIN/python" -m proxy.demo_upstream --port 9000 &
UPSTREAM=$!
trap 'kill $UPSTREAM 2>/dev/null || true' EXIT
cat <<'TXT'

  idemproxy: proxy on http://localhost:8080 -> demo charges API on http://127.0.0.1:9000
  admin (health, metrics) on http://127.0.0.1:9090. Try, in another terminal:

    # the first request runs once ...
    curl -i -X POST localhost:8080/v1/charges -H 'Authorization: Bearer sk_demo' -H 'Idempotency-Key: order-1834' -d amount=2000
    # ... and the retry is replayed (same charge id, Idempotent-Replayed: true)
    curl -i -X POST localhost:8080/v1/charges -H 'Authorization: Bearer sk_demo' -H 'Idempotency-Key: order-1834' -d amount=2000
    # the same key with another body is refused (422)
    curl -i -X POST localhost:8080/v1/charges -H 'Authorization: Bearer sk_demo' -H 'Idempotency-Key: order-1834' -d amount=9999
    # metrics
    curl -s localhost:9090/metrics | grep idemproxy_requests

  Ctrl-C stops both.

TXT
IDEMPROXY_LOG_FORMAT=${IDEMPROXY_LOG_FORMAT:-text} "$BIN/python" -m proxy serve --config config/example.yaml
