#!/usr/bin/env bash
# Build dist/statsd, the one-file standalone executable, from a clean checkout.
#
#   packaging/build.sh            # uses (and if needed creates) ./.venv
#   PYTHON=python3.12 packaging/build.sh
#
# Needs only python3 (3.11+) with venv, and the network the first time (to
# install the project's dependencies and PyInstaller into .venv). The
# binary is built for this machine's OS, CPU and C library (glibc): build it
# on the oldest distribution it must run on.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
BIN=$VENV/bin

if [ ! -x "$BIN/python" ]; then
    echo "build.sh: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    "$BIN/pip" install --quiet --upgrade pip
fi
# The project and its run-time dependencies (what the binary will carry).
if ! "$BIN/python" -c "import aiohttp, aiohttplimiter, limits, orjson, tinydb, jinja2, pygal" 2>/dev/null; then
    echo "build.sh: installing the project into $VENV" >&2
    "$BIN/pip" install --quiet -e .
fi
if [ ! -x "$BIN/pyinstaller" ]; then
    echo "build.sh: installing PyInstaller into $VENV" >&2
    # The project's `binary` extra pins it; older checkouts lack the extra.
    "$BIN/pip" install --quiet -e '.[binary]'
    [ -x "$BIN/pyinstaller" ] || "$BIN/pip" install --quiet 'pyinstaller>=6.10'
fi

rm -rf build/statsd dist/statsd
"$BIN/pyinstaller" packaging/statsd.spec --distpath dist --workpath build \
    --noconfirm --clean --log-level WARN

# The binary must start and know its version, with nothing of .venv around.
version=$(env -i PATH=/usr/bin:/bin HOME=/nonexistent dist/statsd --version)
size=$(stat -c %s dist/statsd)
awk -v s="$size" -v v="$version" \
    'BEGIN { printf "built dist/statsd (%s): %d bytes (%.1f MB, %.1f MiB)\n", v, s, s / 1e6, s / 1048576 }'
