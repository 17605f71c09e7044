#!/usr/bin/env bash
# System programs the tests drive, from Debian's packages: PostgreSQL (the store's tests start a throwaway server,
# tests/support/postgres.py) and Chromium (the dashboard's browser test; Playwright's own browser download cannot
# work offline). Installed when missing and this machine can (root with apt-get, as in CI); elsewhere the tests that
# need them skip and say why, and under CI they fail instead.
set -euo pipefail
missing=()
command -v initdb >/dev/null || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v chromium >/dev/null || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
else
  echo "not installed and cannot be installed here: ${missing[*]}; the tests that need them will skip" >&2
fi
