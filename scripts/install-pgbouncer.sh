#!/bin/sh
# Install Debian's pgbouncer package when it is missing (the fleet tests run it, as an
# unprivileged user, in front of the embedded PostgreSQL). Needs root or passwordless sudo.
set -e
if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "pgbouncer is missing and this is not a Debian/Ubuntu system: install PgBouncer" \
         "(1.18 or later) so that pgbouncer or /usr/sbin/pgbouncer exists" >&2
    exit 1
fi
echo "installing Debian's pgbouncer package (for the fleet tests)" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends pgbouncer >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && \
         $SUDO apt-get install -y -q --no-install-recommends pgbouncer >/dev/null; }
# The package may start a system-wide instance; the tests start their own.
if [ -x /etc/init.d/pgbouncer ]; then $SUDO /etc/init.d/pgbouncer stop >/dev/null 2>&1 || true; fi
