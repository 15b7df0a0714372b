//  --------------------------------------------------------------------------
//  gw_bridge — the model bridge stage (service "bridge"): takes requests
//  whose envelope carries a failover plan (ann.plan, STAGES.md §3), calls
//  the upstream OpenAI-compatible providers over HTTP with one libcurl multi
//  handle (keep-alive, HTTP/2 where ALPN offers it), fails over between the
//  plan's channels with a circuit breaker per channel (STAGES.md §4), and
//  answers with FINAL (non-stream) or PARTIAL* + FINAL (stream, SSE bytes
//  ready to send), honouring stream credit (curl_easy_pause) and CANCEL.
//
//  Start it with zactor_new (gw_bridge_actor, NULL); it signals when ready.
//  Commands on the pipe (string frames):
//
//    CONFIGURE key value   before CONNECT; replies a signal: 0 done, 1 unknown
//                          key or bad value. Keys: capacity (1..65535, default
//                          1024), breaker_failures (default 3),
//                          breaker_cooldown_ms (default 30000), maxconnects
//                          (idle upstream connections kept, default 256),
//                          connect_timeout_ms (default 5000), body_max (largest
//                          upstream response, default 32 MiB), event_max
//                          (largest SSE line/event, default 1 MiB), heartbeat
//                          and expiry (ms, the bus session's timers), billing
//                          (1 default: usage events; 0 none), spool_dir
//                          (var/spool), spool_max (100000), spool_fsync (0),
//                          billing_service ("billing"), disconnect ("cancel"
//                          or "drain"; may also be changed after CONNECT).
//    CONNECT endpoint      open the worker session on the broker at endpoint
//                          and register as "bridge" (not idempotent), and with
//                          billing on, the usage producer (gw_usage: its own
//                          client session and spool file); replies a signal:
//                          0 done, 1 failed (already connected, or the spool
//                          could not be created).
//    VERBOSE               log per-attempt decisions at info level.
//    STATS                 replies one string frame of key=value counters:
//                          inflight transfers held paused attempts retries
//                          cancels sockets pool breakers events event_errors
//                          refused, then "usage:" and gw_usage_stats.
//    $TERM                 end the actor (zactor_destroy sends it); transfers
//                          in flight are aborted.
//
//  curl_global_init must have run before the actor starts (the process main
//  calls it once).
//
//  Threading: everything runs on the actor's thread.

#ifndef GW_BRIDGE_H_INCLUDED
#define GW_BRIDGE_H_INCLUDED

#include <czmq.h>
#include <stdbool.h>

//  The bridge actor. args is unused (NULL).
void gw_bridge_actor (zsock_t *pipe, void *args);

//  Start the bridge configured from the environment (AIGW_BRIDGE_CAPACITY,
//  AIGW_BRIDGE_MAXCONNECTS, AIGW_BRIDGE_CONNECT_TIMEOUT_MS,
//  AIGW_BREAKER_FAILURES, AIGW_BREAKER_COOLDOWN_MS, AIGW_HEARTBEAT_MS,
//  AIGW_EXPIRY_MS, AIGW_BILLING, AIGW_SPOOL_MAX, AIGW_SPOOL_FSYNC,
//  AIGW_SPOOL_DIR, AIGW_DISCONNECT) and connect it to bus; verbose logs
//  every transfer. Returns the actor, or NULL after logging why. Call
//  curl_global_init first. Used by aigw-bridge and by aigw-gateway.
zactor_t *gw_bridge_launch (const char *bus, bool verbose);

//  Self test of this class (starts tests/mock_provider.py; run from the
//  repository root).
void gw_bridge_test (bool verbose);

#endif
