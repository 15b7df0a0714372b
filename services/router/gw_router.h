//  --------------------------------------------------------------------------
//  gw_router — the router stage (service "router", IDEMPOTENT): resolves the
//  request's model to a failover plan over the configured channels and
//  passes the request to the backend (proto/STAGES.md §2-3), or answers
//  GET /v1/models itself. Channel model lists that were not declared are
//  learnt from the providers' GET {base_url}/models by a helper thread, at
//  start and every refresh_s seconds, and never on the request path.
//
//  Start it with zactor_new (gw_router_actor, channels): the actor takes
//  ownership of the gw_channels_t (may be NULL = no channels). Commands on
//  the pipe (string frames):
//
//    CONNECT endpoint     register as "router" on the broker's bus and start
//                         discovery; replies a signal: 0 done, 1 bad endpoint.
//    CONFIGURE key value  before CONNECT: refresh_s (model list refresh,
//                         seconds, 1..86400, default 300), capacity (1..65535,
//                         default 1024), local_models (0/1: route "local/x"
//                         to service "model.x", list served local models,
//                         pass op "admin" to model.admin; STAGES.md §7.3),
//                         local_admin_groups (csv of groups that may change
//                         local models; empty = any key), seed (random
//                         generator, tests); replies a signal: 0 done, 1 bad.
//    VERBOSE              log every routing decision at debug level.
//    $TERM                end the actor.
//
//  Threading: the actor's thread owns the channels and the worker session;
//  discovery runs in a child actor and reports over its pipe.

#ifndef GW_ROUTER_H_INCLUDED
#define GW_ROUTER_H_INCLUDED

#include <czmq.h>
#include <stdbool.h>

//  The router actor; args is a gw_channels_t * handed over, or NULL.
void gw_router_actor (zsock_t *pipe, void *args);

//  Start the router stage configured from the environment (AIGW_CHANNELS_FILE,
//  TARGET_API_URL, TARGET_API_KEY, AIGW_TARGET_MODELS, AIGW_MODELS_REFRESH_S,
//  AIGW_ROUTER_CAPACITY, AIGW_LOCAL_MODELS, AIGW_LOCAL_ADMIN_GROUPS) and
//  connect it to bus. Returns the actor, or NULL after logging why. Call
//  curl_global_init first. Used by aigw-router and by aigw-gateway.
zactor_t *gw_router_launch (const char *bus);

//  Fetch the model ids the provider lists at GET {base_url}/models (OpenAI
//  list object), authenticating with key (may be NULL), within timeout_ms,
//  and append them to names (a list of strings with a destructor set).
//  Blocking: call it from a helper thread only. If abort_sock is not NULL,
//  input waiting on it aborts the transfer. Returns 0, or -1 with a reason
//  in error (HTTP status, transport error, or what was wrong in the body).
int gw_router_fetch_models (const char *base_url, const char *key, int timeout_ms,
    zsock_t *abort_sock, zlistx_t *names, char *error, size_t error_size);

//  Self test of this class.
void gw_router_test (bool verbose);

#endif
