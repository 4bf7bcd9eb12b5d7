#!/bin/sh
# Runs once, when the postgres image initialises an empty data volume
# (/docker-entrypoint-initdb.d). Creates one role and database per owner:
#   - TEMPORAL_DB_USER owns Temporal's "temporal" and "temporal_visibility" databases
#     (schemas filled by deploy/temporal/setup-postgres.sh);
#   - APP_DB_USER owns APP_DB_NAME, the product's data (schema by `atelier.migrate`).
# Idempotent, so it may also be run by hand against an existing server:
#   docker compose exec postgresql sh /docker-entrypoint-initdb.d/init-databases.sh
# Passwords are read with \getenv, never put on a command line.
set -eu

: "${TEMPORAL_DB_USER:?}" "${TEMPORAL_DB_PASSWORD:?}" "${APP_DB_USER:?}" "${APP_DB_PASSWORD:?}" "${APP_DB_NAME:?}"
export TEMPORAL_DB_NAME="${TEMPORAL_DB_NAME:-temporal}"
export TEMPORAL_VISIBILITY_DB_NAME="${TEMPORAL_VISIBILITY_DB_NAME:-temporal_visibility}"

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname postgres <<'SQL'
\getenv temporal_user TEMPORAL_DB_USER
\getenv temporal_password TEMPORAL_DB_PASSWORD
\getenv temporal_db TEMPORAL_DB_NAME
\getenv visibility_db TEMPORAL_VISIBILITY_DB_NAME
\getenv app_user APP_DB_USER
\getenv app_password APP_DB_PASSWORD
\getenv app_db APP_DB_NAME

SELECT format('CREATE ROLE %I LOGIN CREATEDB PASSWORD %L', :'temporal_user', :'temporal_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'temporal_user') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'temporal_db', :'temporal_user')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'temporal_db') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'visibility_db', :'temporal_user')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'visibility_db') \gexec

SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'app_user', :'app_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app_user') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'app_db', :'app_user')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'app_db') \gexec
SQL
echo "databases ready: $TEMPORAL_DB_NAME, $TEMPORAL_VISIBILITY_DB_NAME (owner $TEMPORAL_DB_USER), $APP_DB_NAME (owner $APP_DB_USER)"
