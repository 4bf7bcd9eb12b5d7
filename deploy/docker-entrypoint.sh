#!/bin/sh
# The Atelier image's one entry point.
#
#   api                  the HTTP API (python -m starter.api) on ATELIER_API_HOST:ATELIER_API_PORT
#   worker [--only ai]   the Temporal worker (python -m worker); --only ai|main|all
#   migrate              apply the database migrations (python -m atelier.migrate upgrade), then exit
#   healthcheck          what the image's HEALTHCHECK runs: checks the role this container started as
#   anything else        run as given (e.g. `atelier ...`, `sh`)
#
# `exec` hands PID 1's signals to Python: on SIGTERM the worker stops polling and drains,
# the API stops accepting and finishes its requests.
set -eu

ROLE_FILE="${TMPDIR:-/tmp}/atelier-role"

record_role() {
    # The HEALTHCHECK of this image runs in the same container: tell it what to check.
    printf '%s\n' "$1" > "$ROLE_FILE" 2>/dev/null || true
}

cmd="${1:-api}"
[ "$#" -gt 0 ] && shift

case "$cmd" in
    api)
        record_role api
        exec python -m starter.api "$@"
        ;;
    worker)
        record_role worker
        exec python -m worker "$@"
        ;;
    migrate)
        record_role migrate
        exec python -m atelier.migrate upgrade "$@"
        ;;
    healthcheck)
        exec atelier-healthcheck "$@"
        ;;
    *)
        exec "$cmd" "$@"
        ;;
esac
