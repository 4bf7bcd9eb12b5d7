#!/bin/sh
# One-shot job (temporalio/admin-tools image): create Temporal's own two databases on the
# PostgreSQL server and bring their schemas to the version this image ships.
# Idempotent: `create` accepts an existing database, `setup-schema -v 0.0` leaves a newer
# schema alone, and `update-schema` applies only the missing versions. So it runs on every
# `docker compose up`, and upgrading TEMPORAL_VERSION upgrades the schema before the server.
#
# Environment: POSTGRES_SEEDS (host), DB_PORT, SQL_USER, SQL_PASSWORD (read by the tool
# itself, never put on a command line), DBNAME, VISIBILITY_DBNAME.
set -eu

: "${POSTGRES_SEEDS:?the PostgreSQL host}"
: "${SQL_USER:?the role that owns Temporal's databases}"
: "${SQL_PASSWORD:?its password}"
DB_PORT="${DB_PORT:-5432}"
SCHEMA_ROOT=/etc/temporal/schema/postgresql/v12

sql_tool() {
    database="$1"
    shift
    temporal-sql-tool --plugin postgres12 --ep "$POSTGRES_SEEDS" -p "$DB_PORT" -u "$SQL_USER" --db "$database" "$@"
}

set_up() {
    database="$1"
    schema="$2"
    echo "== $database ($schema schema)"
    sql_tool "$database" create
    sql_tool "$database" setup-schema -v 0.0
    # The versioned/ folder itself: pointed at its parent, update-schema finds nothing and exits 0.
    sql_tool "$database" update-schema -d "$SCHEMA_ROOT/$schema/versioned"
}

set_up "${DBNAME:-temporal}" temporal
set_up "${VISIBILITY_DBNAME:-temporal_visibility}" visibility
echo "Temporal's schemas are ready"
