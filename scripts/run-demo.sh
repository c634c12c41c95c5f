#!/usr/bin/env bash
# make run: start the demo charges API and idemproxy in front of it, print curl lines.
# Ports come from the same variables config/example.yaml reads (IDEMPROXY_LISTEN,
# IDEMPROXY_ADMIN_LISTEN) plus DEMO_UPSTREAM_PORT; the defaults are 8080, 9090 and 9000.
set -euo pipefail
BIN=${1:-.venv/bin}
LISTEN=${IDEMPROXY_LISTEN:-0.0.0.0:8080}
ADMIN=${IDEMPROXY_ADMIN_LISTEN:-127.0.0.1:9090}
UPSTREAM_PORT=${DEMO_UPSTREAM_PORT:-9000}
export IDEMPROXY_LISTEN=$LISTEN IDEMPROXY_ADMIN_LISTEN=$ADMIN
export IDEMPROXY_UPSTREAM=http://127.0.0.1:$UPSTREAM_PORT

# A second `make run` would find every port taken: say so once, plainly, and stop.
if ! "$BIN/python" - "$LISTEN" "$ADMIN" "127.0.0.1:$UPSTREAM_PORT" <<'PY'
import sys
from proxy.config.values import parse_listen
from proxy.ports import PortInUse, ensure_free
busy = []
for name, addr in zip(("proxy", "admin", "demo upstream"), sys.argv[1:]):
    try:
        ensure_free(parse_listen(addr), what=name)
    except PortInUse:
        busy.append(f"{addr} ({name})")
if busy:
    print(f"The demo is already running (or another program holds {', '.join(busy)}).\n"
          "Use that one, or stop it first (Ctrl-C in its terminal).", file=sys.stderr)
    raise SystemExit(1)
PY
then
  exit 1
fi

"$BIN/python" -m proxy.demo_upstream --port "$UPSTREAM_PORT" &
UPSTREAM=$!
trap 'kill $UPSTREAM 2>/dev/null || true' EXIT
PORT=${LISTEN##*:}
APORT=${ADMIN##*:}
cat <<TXT

  idemproxy: proxy on http://localhost:$PORT -> demo charges API on http://127.0.0.1:$UPSTREAM_PORT
  admin (health, metrics) on http://127.0.0.1:$APORT. Try, in another terminal:

    # the first request runs once ...
    curl -i -X POST localhost:$PORT/v1/charges -H 'Authorization: Bearer sk_demo' -H 'Idempotency-Key: order-1834' -d amount=2000
    # ... and the retry is replayed (same charge id, Idempotent-Replayed: true)
    curl -i -X POST localhost:$PORT/v1/charges -H 'Authorization: Bearer sk_demo' -H 'Idempotency-Key: order-1834' -d amount=2000
    # the same key with another body is refused (422)
    curl -i -X POST localhost:$PORT/v1/charges -H 'Authorization: Bearer sk_demo' -H 'Idempotency-Key: order-1834' -d amount=9999
    # metrics
    curl -s localhost:$APORT/metrics | grep idemproxy_requests

  The CLI is .venv/bin/idemproxy (e.g. .venv/bin/idemproxy keys list --config
  config/example.yaml). Ctrl-C stops both.

TXT
IDEMPROXY_LOG_FORMAT=${IDEMPROXY_LOG_FORMAT:-text} "$BIN/python" -m proxy serve --config config/example.yaml
