#!/bin/sh
# Debian packages the tests need: Chromium for the live-page browser test, PostgreSQL for the
# server's PostgreSQL tests (tests/server/pg.py starts a throwaway cluster of its own with the
# package's initdb/pg_ctl; the package's system cluster is not used).
# Idempotent: does nothing when they are already there.
set -e
need=""
[ -x /usr/bin/chromium ] || need="$need chromium"
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need="$need postgresql"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "system-deps: need root to apt-get install$need" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
