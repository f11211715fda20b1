#!/usr/bin/env bash
# Sets up everything the demo and the tests need, from nothing, idempotently:
# a virtualenv (.venv) with the pinned packages, Pebble 2.10 (.tools/pebble), and with
# --with-bind the BIND 9 server used by the RFC 2136 tests (Debian package, needs root).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
with_bind=0
[ "${1:-}" = "--with-bind" ] && with_bind=1

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "bootstrap: Python 3.11 or newer is needed (found: $("$python" --version 2>&1))" >&2
  exit 1
fi

stamp=.venv/.installed-$(cat requirements.lock requirements-dev.lock pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: creating .venv with the pinned packages"
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  # (pip warns about package folders this machine's pip config lists but lacks: noise.)
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.lock \
    2> >(grep -v '^WARNING: Location' >&2)
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e . \
    2> >(grep -v '^WARNING: Location' >&2)
  rm -f .venv/.installed-*
  touch "$stamp"
fi

bash scripts/install-pebble.sh >/dev/null

if [ "$with_bind" = 1 ] && ! command -v named >/dev/null && [ ! -x /usr/sbin/named ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: BIND 9 is missing; install it with: sudo apt-get install bind9" >&2
    exit 1
  fi
  echo "bootstrap: installing BIND 9 (Debian package bind9)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends bind9 bind9-utils >/dev/null
fi
