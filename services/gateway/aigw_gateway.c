//  --------------------------------------------------------------------------
//  aigw-gateway — co-location (DESIGN.md §8): the broker and the C stages
//  as actors of one process, talking over inproc://, each still registered
//  with the broker as its own service and speaking GWP/1 exactly as the
//  separate processes do. The broker also binds AIGW_BUS (and AIGW_TAP), so
//  Python model workers, aigw-tap and more replicas of any stage (separate
//  aigw-<stage> processes) join the same bus.
//
//  What it saves: an inproc hop wakes one thread, where a tcp or ipc hop
//  between processes also wakes libzmq's I/O thread on both sides and
//  crosses the kernel's socket layer (docs/PERFORMANCE.md). What it gives
//  up: a crash of any stage takes the others down with it, and a stage
//  cannot be restarted or scaled alone (run extra aigw-<stage> processes for
//  that). Separate processes (deploy/aigw.procs) stay the default.
//
//  auth, ratelimit and router run as one actor (gw_stage: one thread, a
//  direct call from auth to ratelimit to router instead of two trips through
//  the broker; each still its own service on the bus) unless AIGW_FUSE=0.
//  Whichever two or three of them AIGW_STAGES lists are fused. With Redis
//  (REDIS_URL or REDIS_ADDR), ratelimit waits for a Redis round trip per
//  call: fused, auth and the router would wait behind every one of them
//  (docs/PERFORMANCE.md: p99 at concurrency 64 ~800 ms fused, ~60 ms not),
//  so ratelimit keeps a thread of its own then, unless AIGW_FUSE=1. The fused
//  actor's sessions all take the capacity of its first stage in that order
//  (AIGW_AUTH_CAPACITY, else AIGW_RATELIMIT_CAPACITY, else
//  AIGW_ROUTER_CAPACITY): a request handed on inside the actor holds one
//  credit of the first stage's session only.
//
//  Environment: AIGW_STAGES (comma-separated, default
//  edge,auth,ratelimit,router,bridge,billing: which stages run inside),
//  AIGW_FUSE (default auto: fuse, except ratelimit with Redis; 1: fuse all;
//  0: none),
//  AIGW_BUS, AIGW_TAP, the broker's AIGW_HEARTBEAT_MS, AIGW_EXPIRY_MS,
//  AIGW_GRACE_MS, AIGW_QUEUE_MAX, AIGW_BODY_MAX (aigw-broker's options), and
//  every variable of the stages it runs.
//  SIGHUP reloads auth's keys file and ratelimit's limits and prices files;
//  SIGINT/SIGTERM stop it (the edge first, so requests in flight finish).

#include "aigw.h"
#include <curl/curl.h>
#include "gw_broker.h"
#include "gw_edge.h"
#include "gw_auth.h"
#include "gw_ratelimit.h"
#include "gw_router.h"
#include "gw_bridge.h"
#include "gw_billing.h"

#define INPROC_BUS "inproc://aigw-bus"

//  auth and ratelimit first: they take RELOAD
static const char *s_stages[] = {"auth", "ratelimit", "router", "bridge", "billing"};
#define STAGES (sizeof (s_stages) / sizeof (s_stages[0]))

static bool
s_listed (const char *list, const char *name)
{
    size_t size = strlen (name);
    for (const char *at = list; (at = strstr (at, name)); at += size)
        if ((at == list || at[-1] == ',') && (at[size] == ',' || at[size] == '\0'))
            return true;
    return false;
}

static zactor_t *
s_launch (const char *stage)
{
    if (streq (stage, "auth"))
        return gw_auth_launch (INPROC_BUS);
    if (streq (stage, "ratelimit"))
        return gw_ratelimit_launch (INPROC_BUS);
    if (streq (stage, "router"))
        return gw_router_launch (INPROC_BUS);
    if (streq (stage, "bridge"))
        return gw_bridge_launch (INPROC_BUS, false);
    return gw_billing_launch (INPROC_BUS, gw_env ("DATABASE_URL", "var/aigw.db"));
}

//  The stages that may share one actor, in s_stages order, with the
//  capacity variable of each.
static const char *s_fusable[][2] = {{"auth", "AIGW_AUTH_CAPACITY"},
    {"ratelimit", "AIGW_RATELIMIT_CAPACITY"}, {"router", "AIGW_ROUTER_CAPACITY"}};
#define FUSABLE (sizeof (s_fusable) / sizeof (s_fusable[0]))

//  True if stage may join the fused actor (AIGW_FUSE, above).
static bool
s_fusable_stage (const char *stage)
{
    const char *fuse = gw_env ("AIGW_FUSE", "auto");
    if (streq (fuse, "0"))
        return false;
    bool redis = *gw_env ("REDIS_URL", "") || *gw_env ("REDIS_ADDR", "");
    return !(streq (stage, "ratelimit") && redis && !streq (fuse, "1"));
}

//  True if stage is fused: it may be, and it is one of at least two such
//  stages in list.
static bool
s_fused (const char *list, const char *stage)
{
    size_t listed = 0;
    bool member = false;
    for (size_t i = 0; i < FUSABLE; i++)
        if (s_listed (list, s_fusable[i][0]) && s_fusable_stage (s_fusable[i][0])) {
            listed++;
            member |= streq (stage, s_fusable[i][0]);
        }
    return member && listed >= 2;
}

//  The fused stages of list as one actor (gw_stage): one thread, and a
//  request that one passes to the next goes there by a direct call instead
//  of a trip through the broker; each stays a service of its own on the
//  bus.
static zactor_t *
s_launch_fused (const char *list)
{
    gw_stage_host_t *host = gw_stage_host_new ();
    char name[64] = "";
    const char *capacity = s_fusable[0][1];  //  the first fused stage's
    for (size_t i = 0; i < FUSABLE; i++) {
        const char *stage = s_fusable[i][0];
        if (!s_listed (list, stage) || !s_fusable_stage (stage))
            continue;
        if (streq (stage, "auth")) {
            gw_auth_t *auth = gw_auth_new_env ();
            if (!auth)
                goto failed;
            gw_auth_stage (auth, host);
        }
        else if (streq (stage, "ratelimit")) {
            gw_ratelimit_t *ratelimit = gw_ratelimit_new_env ();
            if (!ratelimit)
                goto failed;
            gw_ratelimit_stage (ratelimit, host);
        }
        else {
            gw_channels_t *channels = gw_router_channels_env ();
            if (!channels)
                goto failed;
            gw_router_stage (channels, host);
        }
        if (!*name)
            capacity = s_fusable[i][1];
        snprintf (name + strlen (name), sizeof (name) - strlen (name), "%s%s",
            *name ? "+" : "", stage);
    }
    zactor_t *actor = zactor_new (gw_stage_actor, host);  //  takes the host
    assert (actor);
    gw_actor_configure_int (actor, "capacity", gw_env_int (capacity, 1024, 1, 65535));
    gw_actor_configure_session (actor);
    if (s_listed (list, "router"))
        gw_router_configure_env (actor);
    return gw_actor_connect (actor, INPROC_BUS, name);
failed:
    gw_stage_host_destroy (&host);
    return NULL;
}

//  Bind the broker to endpoint; 0 or -1 after logging.
static int
s_bind (zactor_t *broker, const char *command, const char *endpoint)
{
    zstr_sendx (broker, command, endpoint, NULL);
    char *bound = zstr_recv (broker);
    int rc = bound && *bound ? 0 : -1;
    if (rc)
        gw_error ("gateway: cannot bind %s %s", command, endpoint);
    zstr_free (&bound);
    return rc;
}

int
main (int argc, char *argv[])
{
    if (argc > 1) {
        fprintf (stderr,
            "usage: aigw-gateway   (broker and stages in one process; configured from\n"
            "the environment: AIGW_STAGES, AIGW_BUS, AIGW_TAP and the stages' "
            "variables)\n");
        return streq (argv[1], "--help") ? 0 : 2;
    }
    gw_log_init ("gateway");
    const char *list =
        gw_env ("AIGW_STAGES", "edge,auth,ratelimit,router,bridge,billing");
    for (const char *at = list; *at;) {
        size_t size = strcspn (at, ",");
        bool known = size == 4 && memcmp (at, "edge", 4) == 0;
        for (size_t i = 0; i < STAGES; i++)
            known |= size == strlen (s_stages[i]) && memcmp (at, s_stages[i], size) == 0;
        if (!known) {
            fprintf (stderr, "aigw-gateway: AIGW_STAGES: unknown stage '%.*s' in %s\n",
                (int)size, at, list);
            return 2;
        }
        at += size + (at[size] == ',');
    }
    gw_signals_block ();
    if (curl_global_init (CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        gw_error ("gateway: curl_global_init failed");
        return 1;
    }
    zsys_init ();

    int status = 1;
    zactor_t *actors[STAGES] = {NULL};
    gw_edge_t *edge = NULL;
    zactor_t *broker = zactor_new (gw_broker_actor, NULL);
    assert (broker);
    //  The broker's settings (aigw-broker's options) from the environment.
    const char *settings[][2] = {{"heartbeat", "AIGW_HEARTBEAT_MS"},
        {"expiry", "AIGW_EXPIRY_MS"}, {"grace", "AIGW_GRACE_MS"},
        {"queue_max", "AIGW_QUEUE_MAX"}, {"body_max", "AIGW_BODY_MAX"}};
    for (size_t i = 0; i < sizeof (settings) / sizeof (settings[0]); i++) {
        const char *value = gw_env (settings[i][1], NULL);
        if (value && gw_actor_configure (broker, settings[i][0], value))
            goto done;
    }
    if (s_bind (broker, "BIND", INPROC_BUS) ||
        s_bind (broker, "BIND", gw_env ("AIGW_BUS", "tcp://127.0.0.1:5555")) ||
        s_bind (broker, "TAP", gw_env ("AIGW_TAP", "tcp://127.0.0.1:5556")))
        goto done;
    //  auth, ratelimit and router share a thread (AIGW_FUSE, above): the
    //  actor takes the slot of the first of them (auth's or ratelimit's
    //  slot gets SIGHUP's RELOAD).
    bool fused = false;
    for (size_t i = 0; i < STAGES; i++) {
        if (!s_listed (list, s_stages[i]))
            continue;
        if (s_fused (list, s_stages[i])) {
            if (fused)
                continue;
            fused = true;
            actors[i] = s_launch_fused (list);
        }
        else
            actors[i] = s_launch (s_stages[i]);
        if (!actors[i])
            goto done;
    }
    if (s_listed (list, "edge")) {
        edge = gw_edge_new ();
        if (gw_edge_set (edge, "AIGW_BUS", INPROC_BUS) || gw_edge_start (edge))
            goto done;
    }
    gw_info ("gateway: %s in one process; bus %s", list,
        gw_env ("AIGW_BUS", "tcp://127.0.0.1:5555"));
    gw_signals_wait (actors, 2);  //  SIGHUP: RELOAD to auth and ratelimit (or both)
    gw_info ("gateway: stopping");
    status = 0;
done:
    gw_edge_destroy (&edge);  //  first: requests in flight finish
    for (size_t i = 0; i < STAGES; i++)
        zactor_destroy (&actors[i]);
    zactor_destroy (&broker);
    curl_global_cleanup ();
    return status;
}
