#!/usr/bin/env bash
# Throwaway PostgreSQL and Redis servers for tests, on free loopback ports
# (PLATFORM.md §4). Source it, or run a command inside it:
#
#   tests/harness/services.sh make selftest     # servers up, command, servers down
#
# PostgreSQL runs without fsync (tests need no durability) unless
# PGTEST_DURABILITY is set, e.g. to "" for the server's durable defaults
# (make bench). Exports AIGW_TEST_PG_URL (postgresql://postgres@127.0.0.1:PORT/postgres),
# AIGW_TEST_REDIS_URL (redis://127.0.0.1:PORT) and the raw parts
# PGTEST_PORT, REDISTEST_PORT, REDISTEST_DIR for tests that stop and restart Redis.
set -uo pipefail
PG_BIN=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_postgres() {
    PGTEST_PORT=${1:-$(free_port)}
    PGTEST_DIR=$(mktemp -d /tmp/pgtest.XXXXXX)
    chown postgres:postgres "$PGTEST_DIR"
    ( cd "$PGTEST_DIR" &&
      runuser -u postgres -- "$PG_BIN/initdb" -D "$PGTEST_DIR/data" -U postgres -A trust \
          --no-sync -E UTF8 --locale=C.UTF-8 >"$PGTEST_DIR/initdb.log" 2>&1 &&
      runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PGTEST_DIR/data" -l "$PGTEST_DIR/server.log" -w -t 30 \
          -o "-p $PGTEST_PORT -k $PGTEST_DIR -c listen_addresses=127.0.0.1 ${PGTEST_DURABILITY--c fsync=off -c synchronous_commit=off -c full_page_writes=off} -c max_connections=200" \
          start >/dev/null ) || { cat "$PGTEST_DIR"/*.log >&2; return 1; }
    AIGW_TEST_PG_URL="postgresql://postgres@127.0.0.1:$PGTEST_PORT/postgres"
    export PGTEST_DIR PGTEST_PORT AIGW_TEST_PG_URL
}
stop_postgres() {
    [ -n "${PGTEST_DIR:-}" ] || return 0
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PGTEST_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PGTEST_DIR"; unset PGTEST_DIR
}

start_redis() {
    REDISTEST_PORT=${1:-$(free_port)}
    REDISTEST_DIR=$(mktemp -d /tmp/redistest.XXXXXX)
    redis-server --port "$REDISTEST_PORT" --bind 127.0.0.1 --daemonize yes \
        --pidfile "$REDISTEST_DIR/redis.pid" --dir "$REDISTEST_DIR" --logfile "$REDISTEST_DIR/redis.log" \
        --save '' --appendonly no || return 1
    for _ in $(seq 1 100); do redis-cli -p "$REDISTEST_PORT" ping 2>/dev/null | grep -q PONG && break; sleep 0.05; done
    AIGW_TEST_REDIS_URL="redis://127.0.0.1:$REDISTEST_PORT"
    export REDISTEST_DIR REDISTEST_PORT AIGW_TEST_REDIS_URL
}
stop_redis() {
    [ -n "${REDISTEST_DIR:-}" ] || return 0
    redis-cli -p "$REDISTEST_PORT" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$REDISTEST_DIR"; unset REDISTEST_DIR
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    trap 'stop_redis; stop_postgres' EXIT
    start_postgres || exit 1
    start_redis || exit 1
    "$@"
    exit $?
fi
