#!/usr/bin/env bash
# Servers the tests start for themselves. The store's tests run a throwaway PostgreSQL (tests/support/postgres.py)
# from Debian's `postgresql` binaries: install them when missing and this machine can (root with apt-get, as in CI).
# Elsewhere the PostgreSQL cases skip and say why; under CI they fail instead.
set -euo pipefail
if command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends postgresql >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends postgresql >/dev/null; }
else
  echo "PostgreSQL is not installed and cannot be installed here: the store's PostgreSQL tests will skip" >&2
fi
