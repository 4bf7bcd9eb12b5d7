#!/bin/sh
# One-shot job (temporalio/admin-tools image, run after the server is up): wait until the
# frontend reports healthy, create the namespace if it is missing, and register the custom
# search attributes the workflows set (atelier.messages.SEARCH_ATTRIBUTES).
# Idempotent: what exists is left alone; at the end every attribute is checked to be there.
#
# Environment: TEMPORAL_ADDRESS (host:port), NAMESPACE, NAMESPACE_RETENTION (e.g. 168h),
# SEARCH_ATTRIBUTES ("Name=Type Name=Type ...").
set -eu

ADDRESS="${TEMPORAL_ADDRESS:-temporal:7233}"
NAMESPACE="${NAMESPACE:-default}"
RETENTION="${NAMESPACE_RETENTION:-168h}"
: "${SEARCH_ATTRIBUTES:?Name=Type pairs, space separated}"
TRIES="${TRIES:-60}"

# retry N command...: the server and its namespace cache take a few seconds to settle.
retry() {
    left="$1"
    shift
    until "$@"; do
        left=$((left - 1))
        if [ "$left" -le 0 ]; then
            echo "gave up: $*" >&2
            return 1
        fi
        sleep 2
    done
}

echo "waiting for Temporal at $ADDRESS"
retry "$TRIES" temporal operator cluster health --address "$ADDRESS" >/dev/null

if temporal operator namespace describe --namespace "$NAMESPACE" --address "$ADDRESS" >/dev/null 2>&1; then
    echo "namespace $NAMESPACE exists"
else
    echo "creating namespace $NAMESPACE (retention $RETENTION)"
    retry 5 temporal operator namespace create --namespace "$NAMESPACE" --retention "$RETENTION" --address "$ADDRESS"
fi

registered() {
    temporal operator search-attribute list --namespace "$NAMESPACE" --address "$ADDRESS" | grep -qw -- "$1"
}

for pair in $SEARCH_ATTRIBUTES; do
    name="${pair%%=*}"
    type="${pair#*=}"
    if retry "$TRIES" temporal operator search-attribute list --namespace "$NAMESPACE" --address "$ADDRESS" >/dev/null \
        && registered "$name"; then
        echo "search attribute $name exists"
    else
        echo "registering search attribute $name ($type)"
        retry 10 temporal operator search-attribute create --namespace "$NAMESPACE" --address "$ADDRESS" \
            --name "$name" --type "$type"
    fi
done

for pair in $SEARCH_ATTRIBUTES; do
    name="${pair%%=*}"
    retry 15 registered "$name" || { echo "search attribute $name is missing" >&2; exit 1; }
done
echo "namespace $NAMESPACE ready with search attributes: $SEARCH_ATTRIBUTES"
