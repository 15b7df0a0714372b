//  --------------------------------------------------------------------------
//  gw_edge — the HTTP front of the gateway (aigw-edge): an OpenAI-compatible
//  HTTP/JSON server on civetweb that turns each request into one GWP/1
//  REQUEST (msgpack body, envelope per proto/STAGES.md) and each PARTIAL /
//  FINAL back into HTTP: JSON, SSE chunks, or an OpenAI error object.
//
//  Routes: POST /v1/chat/completions, POST /v1/completions,
//  POST /v1/embeddings, GET /v1/models, GET /v1/usage; the local-model routes
//  POST /local/chat/completions, /local/completions, /local/embeddings,
//  GET /local/models; model management GET /api/local/models and
//  /api/local/models/{id}/status (GET), start, stop, download (POST),
//  settings (PUT) (proto/STAGES.md §7.3); GET /health, GET /health/ready,
//  OPTIONS (CORS preflight) on any path.
//
//  Configuration comes from the environment when the object is created
//  (names below) and may be overridden with gw_edge_set before the start:
//
//    PORT                    listening port (8080; 0 = ephemeral)
//    AIGW_LISTEN             listening address (0.0.0.0)
//    AIGW_BUS                broker bus endpoint (tcp://127.0.0.1:5555)
//    AIGW_SLIP               routing slip, comma separated (auth,ratelimit,router)
//    AIGW_BODY_MAX           request body cap in bytes (32 MiB)
//    AIGW_DEADLINE_MS        request deadline from arrival (600000)
//    AIGW_STREAM_WINDOW      PARTIALs in flight per stream (64; 0 = no credit)
//    AIGW_EDGE_THREADS       civetweb handler threads (64)
//    AIGW_CORS_ORIGINS       "*" or a comma-separated list of origins (*)
//    AIGW_SECURITY_HEADERS   0 turns nosniff / no-referrer off (1)
//    AIGW_READY_SERVICES     services /health/ready requires (slip + bridge)
//    AIGW_SSE_KEEPALIVE_MS   SSE comment interval on an idle stream (500)
//    AIGW_REQUEST_TIMEOUT_MS civetweb socket read/write timeout (30000)
//    AIGW_KEEPALIVE_MS       idle HTTP keep-alive before close (5000)
//    AIGW_DRAIN_MS           on stop, time requests in flight get (10000)
//    LOG_LEVEL, LOG_FORMAT   logging (gw_log); an access line per request at debug
//
//  Threading: the public methods run on the owner's thread. Internally,
//  civetweb handler threads talk over inproc to one I/O actor that owns
//  the gw_client session (see gw_edge.c).

#ifndef GW_EDGE_H_INCLUDED
#define GW_EDGE_H_INCLUDED

#include <stdbool.h>

typedef struct _gw_edge_t gw_edge_t;

//  Create an edge configured from the environment. Nothing runs yet.
gw_edge_t *gw_edge_new (void);

//  Stop the HTTP server (about 2 s with civetweb once it has served a
//  request), then the I/O actor; requests still in flight are cancelled.
//  Idempotent; nulls the caller's reference.
void gw_edge_destroy (gw_edge_t **self_p);

//  Override one setting by its environment name (e.g. "AIGW_SLIP"), before
//  gw_edge_start. Returns 0, or -1 for an unknown name or a bad value (the
//  setting is unchanged then).
int gw_edge_set (gw_edge_t *self, const char *name, const char *value);

//  Start the I/O actor (connects to the bus; the connection is retried in
//  the background) and the HTTP server. Returns 0, or -1 if the server
//  could not listen (the error is logged). Call once.
int gw_edge_start (gw_edge_t *self);

//  The bound HTTP port (useful with PORT=0), or 0 before a successful start.
int gw_edge_port (gw_edge_t *self);

//  Self test of this class: broker, fake stage and edge in-process, driven
//  with libcurl.
void gw_edge_test (bool verbose);

#endif
