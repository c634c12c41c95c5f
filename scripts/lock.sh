#!/bin/sh
# Regenerate requirements.lock: the runtime dependencies of pyproject.toml pinned with
# their hashes, which the Dockerfile installs with --require-hashes. pip-tools runs in a
# throwaway venv (it is not a dependency of the project). Run it with the Python the image
# uses (3.11) after changing the dependencies.
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m venv "$TMP/venv"
"$TMP/venv/bin/pip" install --quiet pip-tools
cp "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/LICENSE" "$TMP/"
cp -r "$ROOT/proxy" "$TMP/"
(cd "$TMP" && "$TMP/venv/bin/pip-compile" --quiet --generate-hashes --strip-extras \
    --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml)
sed 's|#    pip-compile .*|#    scripts/lock.sh  (pip-compile --generate-hashes --strip-extras pyproject.toml)|' \
    "$TMP/requirements.lock" > "$ROOT/requirements.lock"
echo "wrote requirements.lock" >&2
