#!/usr/bin/env bash
# Installs what the playground browser tests need: Debian's chromium (no browser download).
set -u
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" != "0" ]; then echo "not root: cannot apt-get install chromium"; exit 1; fi
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
