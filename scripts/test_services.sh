#!/usr/bin/env bash
# Make sure what the test suite needs is there: Chromium for the UI tests, docker-compose
# to validate docker-compose.yml, and the local PostgreSQL server for the integration
# tests. Installs them from the distribution's packages when missing, starts PostgreSQL
# when it is down, and waits until it accepts connections. Safe to run repeatedly.
set -euo pipefail

PGHOST="${TEST_POSTGRES_HOST:-127.0.0.1}"
PGPORT="${TEST_POSTGRES_PORT:-5432}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root to run: $*" >&2; return 1; fi
}

pg_up() { pg_isready -q -h "$PGHOST" -p "$PGPORT" 2>/dev/null; }

apt_updated=""
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
    as_root apt-get install -y -qq "$@" >/dev/null
}

if [ ! -x /usr/bin/chromium ]; then
    echo "chromium: not installed; installing it (for the UI tests)"
    apt_install chromium
fi
echo "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo missing)"

if ! command -v docker-compose >/dev/null; then
    echo "docker-compose: not installed; installing it (the tests validate docker-compose.yml)"
    apt_install docker-compose
fi
echo "docker-compose: $(docker-compose version --short 2>/dev/null || echo missing)"

if command -v pg_isready >/dev/null && pg_up; then
    echo "postgresql: accepting connections on $PGHOST:$PGPORT"
    exit 0
fi

if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "postgresql: not installed; installing it"
    apt_install postgresql postgresql-contrib
fi

version="$(ls /etc/postgresql | sort -V | tail -n1)"
conf="/etc/postgresql/$version/main"
# Trust local TCP connections for the throwaway test databases (idempotent).
if ! grep -q "study-query-llm tests" "$conf/pg_hba.conf" 2>/dev/null; then
    as_root sed -i '1i # study-query-llm tests\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' \
        "$conf/pg_hba.conf"
fi
echo "postgresql: starting cluster $version/main"
as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload || true

for _ in $(seq 1 60); do
    if pg_up; then
        echo "postgresql: accepting connections on $PGHOST:$PGPORT"
        exit 0
    fi
    sleep 1
done
echo "postgresql: did not come up on $PGHOST:$PGPORT" >&2
exit 1
