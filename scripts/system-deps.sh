#!/bin/sh
# Debian packages the tests need: Chromium for the live-page browser test.
# Idempotent: does nothing when they are already there.
set -e
need=""
[ -x /usr/bin/chromium ] || need="$need chromium"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "system-deps: need root to apt-get install$need" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
