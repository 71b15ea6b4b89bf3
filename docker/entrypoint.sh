#!/bin/sh
# Container start: bring the database to the newest schema, waiting up to DATABASE_WAIT_S
# seconds for it to accept connections (PostgreSQL may still be starting), then run the
# command (the dashboard by default).
set -eu

wait_s="${DATABASE_WAIT_S:-60}"
started="$(date +%s)"
until study-query-llm db upgrade; do
    status=$?
    # 1: the database did not answer (worth waiting); anything else is a settings problem.
    if [ "$status" -ne 1 ] || [ $(( $(date +%s) - started )) -ge "$wait_s" ]; then
        echo "entrypoint: the database is not ready (see the error above); giving up" >&2
        exit "$status"
    fi
    echo "entrypoint: waiting for the database..." >&2
    sleep 2
done
exec "$@"
