#!/usr/bin/env bash
# make bench — benchmarks (not tests). Results are printed and written into
# docs/PERFORMANCE.md between the markers of each section, with the command
# and the machine they came from. Two sections:
#
#   bus   the bus microbenchmark (aigw-busbench through a broker and stages)
#   e2e   the end-to-end gateway benchmark: direct vs nginx vs aigw under wrk
#         (tests/bench/e2e.py; needs nginx and wrk from Debian)
#
#   make bench                   both, full mode (a few minutes)
#   BENCH_SHORT=1 make bench     both, short mode (about a minute)
#   BENCH_ONLY=bus|e2e           one section only
#   AIGW_BUILD=dir               binaries from another build folder
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${AIGW_BUILD:-build}
ONLY=${BENCH_ONLY:-}
N=${BENCH_REQUESTS:-20000}
[ "${BENCH_SHORT:-0}" = 1 ] && N=3000

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
}
trap cleanup EXIT

bus_bench() {
    BUS=tcp://127.0.0.1:$(free_port)
    TAP=tcp://127.0.0.1:$(free_port)
    LOG_LEVEL=warn "$B/aigw-broker" --bus "$BUS" --tap "$TAP" & pids+=($!)
    start_worker() { LOG_LEVEL=warn "$B/aigw-testworker" --bus "$BUS" --capacity 256 "$@" >/dev/null & pids+=($!); }
    start_worker --service bench.echo --mode echo
    start_worker --service bench.a --mode forward
    start_worker --service bench.b --mode forward
    start_worker --service bench.c --mode echo
    sleep 1

    results=()
    for stages in 1 3; do
        slip=bench.echo
        [ "$stages" = 3 ] && slip=bench.a,bench.b,bench.c
        for c in 1 16 64; do
            line=$("$B/aigw-busbench" --bus "$BUS" --slip "$slip" --requests "$N" --concurrency "$c")
            echo "$line"
            results+=("$line")
        done
    done
    cleanup

    table="| stages | concurrency | requests | p50 µs | p99 µs | requests/s | bus messages/s |
|---|---|---|---|---|---|---|"
    for line in "${results[@]}"; do
        eval "$(echo "$line" | tr ' ' '\n' | sed 's/^/r_/')"
        table+=$'\n'"| $r_stages | $r_concurrency | $r_requests | $r_p50_us | $r_p99_us | $r_req_per_s | $r_bus_msgs_per_s |"
    done
    cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
    section="Measured $(date -u +%Y-%m-%d) on $(nproc) cores ($cpu), $(. /etc/os-release; echo "$PRETTY_NAME"), libzmq $(pkg-config --modversion libzmq), broker and workers as separate processes on loopback tcp, 200-byte bodies.
Command: \`make bench\` (tests/bench/run.sh, BENCH_REQUESTS=$N).

$table"
    /usr/bin/python3 - "$section" <<'PY'
import re, sys
path = "docs/PERFORMANCE.md"
text = open(path).read()
begin, end = "<!-- bus-bench:begin -->", "<!-- bus-bench:end -->"
new = begin + "\n" + sys.argv[1] + "\n" + end
text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda m: new, text, flags=re.S)
open(path, "w").write(text)
PY
    echo "bench: bus results written to docs/PERFORMANCE.md"
}

if [ -z "$ONLY" ] || [ "$ONLY" = bus ]; then
    bus_bench
fi
if [ -z "$ONLY" ] || [ "$ONLY" = e2e ]; then
    # inside throwaway Redis and PostgreSQL servers (durable settings), for
    # the aigw-rp layout
    PGTEST_DURABILITY= AIGW_BUILD=$B tests/harness/services.sh /usr/bin/python3 tests/bench/e2e.py
fi
if [ -z "$ONLY" ] || [ "$ONLY" = local ]; then
    AIGW_BUILD="$B" /usr/bin/python3 tests/bench/local.py
fi
