#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432, create a fresh test database,
# and print its SQLAlchemy URL. Installs the distribution's server if there is none.
set -euo pipefail
log() { echo "[postgres] $*" >&2; }
db="atelier_ci_$$"

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "no PostgreSQL server: installing Debian's"
    export DEBIAN_FRONTEND=noninteractive
    (apt-get update -qq && apt-get install -y -qq postgresql) >&2
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  log "starting cluster $version/main"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
  for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi

# Trust auth (as on these machines) or the postgres password we set below.
password=""
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; then
  password="atelier-ci"
  log "setting a password for the postgres role (TCP auth is not trust here)"
  su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD '$password'\"" >&2
fi
export PGPASSWORD="$password"
psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS $db" >&2
psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE $db" >&2
if [ -n "$password" ]; then
  echo "postgresql+asyncpg://postgres:$password@127.0.0.1:5432/$db"
else
  echo "postgresql+asyncpg://postgres@127.0.0.1:5432/$db"
fi
