#!/usr/bin/env bash
# The process launcher behind `make run`: starts every process listed in
# deploy/aigw.procs (or $AIGW_PROCS), prefixes each line of their output with
# the process name, restarts a process that exits (after 1 s, doubling up to
# 30 s while it keeps crashing within 10 s of starting), and stops everything
# on Ctrl-C / SIGTERM.
set -uo pipefail
cd "$(dirname "$0")/.."
export BUILD=${AIGW_BUILD:-build}
procs=${AIGW_PROCS:-deploy/aigw.procs}
mkdir -p var

# Embedded defaults for a one-command start. With no client keys configured,
# auth runs in open mode and the edge listens on loopback only.
if [ -z "${GATEWAY_API_KEYS:-}" ] && [ -z "${AIGW_KEYS_FILE:-}" ]; then
    export AIGW_AUTH_OPEN=${AIGW_AUTH_OPEN:-1}
    export AIGW_LISTEN=${AIGW_LISTEN:-127.0.0.1}
    echo "[run] no GATEWAY_API_KEYS: open mode, listening on ${AIGW_LISTEN} only"
fi
if [ -z "${TARGET_API_URL:-}" ] && [ -z "${AIGW_CHANNELS_FILE:-}" ]; then
    echo "[run] no upstream: set TARGET_API_URL and TARGET_API_KEY (or AIGW_CHANNELS_FILE)"
fi
export PORT=${PORT:-8080}
# Local models (the Python model worker) are reachable as local/<name>.
export AIGW_LOCAL_MODELS=${AIGW_LOCAL_MODELS:-1}
stopping=0
children=()

supervise() {  # name, command...
    local name=$1; shift
    local delay=1 pid=""
    # Stopping: pass the signal on and wait until the program has exited, so
    # run.sh returns only when everything is down.
    trap 'stopping=1; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; [ -n "$pid" ] && wait "$pid" 2>/dev/null; exit 0' TERM INT
    while [ "$stopping" = 0 ]; do
        local started=$SECONDS
        "$@" > >(sed -u "s/^/[$name] /") 2>&1 &
        pid=$!
        wait "$pid"
        local rc=$?
        [ "$stopping" = 1 ] && break
        if [ $((SECONDS - started)) -ge 10 ]; then delay=1; fi
        echo "[run] $name exited (status $rc); restarting in ${delay}s"
        sleep "$delay"
        delay=$((delay * 2)); [ "$delay" -gt 30 ] && delay=30
    done
}

stop_all() {
    stopping=1
    echo "[run] stopping"
    # Each supervisor runs in its own process group: signal the whole group.
    for pid in "${children[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    wait 2>/dev/null
    exit 0
}
trap stop_all INT TERM

set -m  # job control: each background supervisor gets its own process group
while read -r name cmd; do
    case "$name" in ''|'#'*) continue ;; esac
    cmd=$(eval echo "$cmd")
    prog=${cmd%% *}
    if [ ! -x "$prog" ]; then
        echo "[run] $name: $prog is not built yet; skipped"
        continue
    fi
    supervise "$name" $cmd &
    children+=($!)
done < "$procs"
set +m
echo "[run] started ${#children[@]} process(es); Ctrl-C stops them"
wait
