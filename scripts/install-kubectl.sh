#!/bin/sh
# Install Debian's kubectl (package kubernetes-client) when no kubectl is on PATH: the
# deploy tests render deploy/kubernetes/ with `kubectl kustomize` (no cluster needed).
# Needs root or passwordless sudo.
set -e
if command -v kubectl >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "kubectl is missing and this is not a Debian/Ubuntu system: install kubectl" >&2
    exit 1
fi
echo "installing Debian's kubernetes-client package (kubectl, for the deploy tests)" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends kubernetes-client >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && \
         $SUDO apt-get install -y -q --no-install-recommends kubernetes-client >/dev/null; }
