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
//  The actor is gw_stage_actor with the router stage alone (so it takes
//  gw_stage's commands too: CONFIGURE heartbeat|expiry, RELOAD answers 0);
//  gw_router_stage adds the stage to a host shared with other stages
//  (aigw-gateway co-locates auth, ratelimit and router in one thread).
//
//  Threading: the actor's thread owns the channels and the worker session;
//  discovery runs in a child actor and reports over its pipe, which the
//  actor polls as one of the stage's own sockets, as it does the gw.services
//  client session. A request parked for a local-model refresh is answered
//  later on the session that received it (auth's, when co-located).

#ifndef GW_ROUTER_H_INCLUDED
#define GW_ROUTER_H_INCLUDED

#include <czmq.h>
#include <stdbool.h>

typedef struct _gw_channels_t gw_channels_t;
typedef struct _gw_stage_host_t gw_stage_host_t;

//  The router actor; args is a gw_channels_t * handed over, or NULL.
void gw_router_actor (zsock_t *pipe, void *args);

//  Add the router stage over channels (taken; NULL = none) to a gw_stage
//  host: how gw_router_actor runs it, and how aigw-gateway co-locates it.
//  Its settings are CONFIGURE commands to the host's actor (see above).
void gw_router_stage (gw_channels_t *channels, gw_stage_host_t *host);

//  The channel table from the environment (AIGW_CHANNELS_FILE,
//  TARGET_API_URL, TARGET_API_KEY, AIGW_TARGET_MODELS), each channel
//  logged. NULL after logging why (a bad channel file).
gw_channels_t *gw_router_channels_env (void);

//  Send the router's settings from the environment (AIGW_MODELS_REFRESH_S,
//  AIGW_LOCAL_MODELS, AIGW_LOCAL_ADMIN_GROUPS) to actor, which hosts the
//  router stage, before CONNECT. Returns 0, or -1 if one was refused.
int gw_router_configure_env (zactor_t *actor);

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
