//  --------------------------------------------------------------------------
//  gw_stage — one actor thread running one or more stages (see gw_stage.h).
//
//  Design note. Each hosted stage keeps its own gw_worker session, so it
//  stays a service of its own on the bus: replicas elsewhere, settle and
//  release requests, the broker's credit and expiry work as with separate
//  actors. Only the hand-off between two hosted stages changes: the first
//  one's forward becomes gw_worker_pass on the session that holds the
//  request and a call of the second one's request function, with that same
//  session. The broker sees one REQUEST and, at the end, the FORWARD or
//  FINAL of the last hosted stage; the envelope's timings still name every
//  stage. A chain of hand-offs is bounded by the slip (GW_ENVELOPE_SLIP_MAX).

#include "aigw.h"

#define STAGES_MAX 8
#define TICK_MS 500  //  longest sleep: the stages' ticks run at least this often

typedef struct {
    const gw_stage_class_t *cls;
    void *state;
    gw_worker_t *worker;  //  its session, NULL before CONNECT
} s_hosted_t;

struct _gw_stage_host_t {
    s_hosted_t stages[STAGES_MAX];
    size_t count;
};

//  A request callback's context: which hosted stage runs, on which session.
struct _gw_stage_t {
    gw_stage_host_t *host;
    size_t index;  //  the stage running now
    gw_worker_t *session;  //  the session holding the request
};

gw_stage_host_t *
gw_stage_host_new (void)
{
    gw_stage_host_t *self = (gw_stage_host_t *)zmalloc (sizeof (gw_stage_host_t));
    assert (self);
    return self;
}

void
gw_stage_host_destroy (gw_stage_host_t **self_p)
{
    assert (self_p);
    gw_stage_host_t *self = *self_p;
    if (self) {
        for (size_t i = 0; i < self->count; i++) {
            gw_worker_destroy (&self->stages[i].worker);
            self->stages[i].cls->destroy (&self->stages[i].state);
        }
        free (self);
        *self_p = NULL;
    }
}

void
gw_stage_host_add (gw_stage_host_t *self, const gw_stage_class_t *cls, void *state)
{
    assert (self);
    assert (cls && cls->service && cls->request && cls->destroy);
    assert (self->count < STAGES_MAX);
    for (size_t i = 0; i < self->count; i++)
        assert (!streq (self->stages[i].cls->service, cls->service));
    self->stages[self->count++] = (s_hosted_t){cls, state, NULL};
}

gw_worker_t *
gw_stage_session (gw_stage_t *stage)
{
    assert (stage);
    return stage->session;
}

int
gw_stage_forward (gw_stage_t *stage, gw_msg_t *request, gw_envelope_t *envelope)
{
    assert (stage);
    const char *next = gw_envelope_next (envelope);
    gw_stage_host_t *host = stage->host;
    for (size_t i = 0; next && i < host->count; i++) {
        if (!streq (host->stages[i].cls->service, next))
            continue;
        if (gw_worker_pass (stage->session, request, envelope))
            return -1;
        gw_stage_t hand = {host, i, stage->session};
        host->stages[i].cls->request (host->stages[i].state, &hand, request);
        return 0;
    }
    return gw_worker_forward (stage->session, request, envelope);
}

//  A pipe command to every stage: the worst answer of those concerned (0
//  if none is); VERBOSE has none.
static int
s_command_all (gw_stage_host_t *host, const char *command, const char *key,
    const char *value, bool *concerned)
{
    int answer = 0;
    *concerned = false;
    for (size_t i = 0; i < host->count; i++) {
        const gw_stage_class_t *cls = host->stages[i].cls;
        int rc =
            cls->command ? cls->command (host->stages[i].state, command, key, value) : -1;
        if (rc >= 0) {
            *concerned = true;
            answer = rc > answer ? rc : answer;
        }
    }
    return answer;
}

void
gw_stage_actor (zsock_t *pipe, void *args)
{
    gw_stage_host_t *host = (gw_stage_host_t *)args;
    assert (host && host->count > 0);
    char name[16];
    snprintf (name, sizeof (name), "aigw-%s", host->stages[0].cls->service);
    gw_thread_name (name);
    uint32_t capacity = 1024;
    int heartbeat = 0, expiry = 0;
    bool terminated = false;
    zsock_signal (pipe, 0);
    while (!terminated) {
        zmq_pollitem_t items[1 + STAGES_MAX];
        size_t count = 0;
        items[count++] = (zmq_pollitem_t){zsock_resolve (pipe), 0, ZMQ_POLLIN, 0};
        long timeout = TICK_MS;
        for (size_t i = 0; i < host->count; i++) {
            gw_worker_t *worker = host->stages[i].worker;
            if (!worker)
                continue;
            items[count++] = (zmq_pollitem_t){
                zsock_resolve (gw_worker_socket (worker)), 0, ZMQ_POLLIN, 0};
            long due = gw_worker_timeout (worker);
            timeout = due < timeout ? due : timeout;
        }
        if (zmq_poll (items, (int)count, timeout) < 0) {
            if (zmq_errno () == EINTR)
                continue;
            break;  //  the context is going away
        }
        if (items[0].revents & ZMQ_POLLIN) {
            char *command = NULL, *key = NULL, *value = NULL;
            if (zstr_recvx (pipe, &command, &key, &value, NULL) < 1 ||
                streq (command, "$TERM"))
                terminated = true;
            else if (streq (command, "CONNECT")) {
                bool ok = key != NULL;
                for (size_t i = 0; ok && i < host->count; i++) {
                    s_hosted_t *hosted = &host->stages[i];
                    if (!hosted->worker)
                        hosted->worker = gw_worker_new (key, hosted->cls->service,
                            capacity, hosted->cls->ready_flags);
                    ok = hosted->worker != NULL;
                    if (ok && heartbeat && expiry)
                        gw_worker_set_heartbeat (hosted->worker, heartbeat, expiry);
                }
                zsock_signal (pipe, ok ? 0 : 1);
            }
            else if (streq (command, "CONFIGURE")) {
                long number = value ? atol (value) : 0;
                int rc = 1;
                bool concerned = true;
                if (key && streq (key, "capacity") && number >= 1 && number <= 65535) {
                    capacity = (uint32_t)number;
                    rc = 0;
                }
                else if (key && streq (key, "heartbeat") && number >= 10 &&
                    number <= 60000) {
                    heartbeat = (int)number;
                    rc = 0;
                }
                else if (key && streq (key, "expiry") && number >= 20 &&
                    number <= 600000) {
                    expiry = (int)number;
                    rc = 0;
                }
                else if (key && !streq (key, "capacity") && !streq (key, "heartbeat") &&
                    !streq (key, "expiry")) {
                    rc = s_command_all (host, command, key, value, &concerned);
                    rc = concerned ? rc : 1;
                }
                zsock_signal (pipe, (byte)rc);
            }
            else if (streq (command, "RELOAD")) {
                bool concerned;
                zsock_signal (
                    pipe, (byte)s_command_all (host, command, NULL, NULL, &concerned));
            }
            else if (streq (command, "VERBOSE")) {
                bool concerned;
                s_command_all (host, command, NULL, NULL, &concerned);
            }
            else
                gw_warn ("%s: unknown command %s", host->stages[0].cls->service, command);
            zstr_free (&command);
            zstr_free (&key);
            zstr_free (&value);
            if (terminated)
                break;
        }
        for (size_t i = 0; i < host->count; i++) {
            s_hosted_t *hosted = &host->stages[i];
            if (hosted->cls->tick)
                hosted->cls->tick (hosted->state);
            if (!hosted->worker)
                continue;
            gw_msg_t *msg;
            while ((msg = gw_worker_recv (hosted->worker))) {
                if (gw_msg_id (msg) == GW_MSG_REQUEST) {
                    gw_stage_t stage = {host, i, hosted->worker};
                    hosted->cls->request (hosted->state, &stage, msg);
                }
                else if (gw_msg_id (msg) == GW_MSG_CANCEL)
                    gw_worker_final (hosted->worker, gw_msg_rid (msg), 499, NULL, NULL);
                gw_msg_destroy (&msg);
            }
            gw_worker_tick (hosted->worker);
        }
    }
    gw_stage_host_destroy (&host);
}

//  --------------------------------------------------------------------------
//  Self test
//
//  Two stages in one actor, "s1" and "s2", on a real broker (in-process,
//  inproc), and "s3" as a separate worker: s1 passes a request on along
//  its slip, s2 and s3 answer with the envelope they got.

#include "gw_broker.h"

typedef struct {
    char name[8];
    gw_envelope_t *envelope;
    int requests;  //  requests this stage handled
    int reloads;
    bool verbose;
} s_test_state_t;

static void
s_test_request (void *state, gw_stage_t *stage, gw_msg_t *request)
{
    s_test_state_t *self = (s_test_state_t *)state;
    self->requests++;
    zframe_t *frame = gw_msg_envelope (request);
    assert (frame &&
        gw_envelope_decode (self->envelope, zframe_data (frame), zframe_size (frame)) ==
            0);
    if (gw_envelope_next (self->envelope)) {
        gw_envelope_set_ann_str (self->envelope, self->name, "passed");
        assert (gw_stage_forward (stage, request, self->envelope) == 0);
        return;
    }
    zframe_t *echo = gw_envelope_encode (self->envelope);
    gw_worker_final (gw_stage_session (stage), gw_msg_rid (request), 200, NULL, &echo);
}

static int
s_test_command (void *state, const char *command, const char *key, const char *value)
{
    s_test_state_t *self = (s_test_state_t *)state;
    if (streq (command, "VERBOSE"))
        self->verbose = true;
    else if (streq (command, "RELOAD"))
        return ++self->reloads > 0 && streq (self->name, "s2") ? 1 : 0;
    else if (streq (command, "CONFIGURE") && key && streq (key, self->name))
        return value && streq (value, "ok") ? 0 : 1;
    return -1;
}

static void
s_test_destroy (void **state_p)
{
    s_test_state_t *self = (s_test_state_t *)*state_p;
    gw_envelope_destroy (&self->envelope);
    free (self);
    *state_p = NULL;
}

static s_test_state_t *
s_test_state (const char *name)
{
    s_test_state_t *self = (s_test_state_t *)zmalloc (sizeof (s_test_state_t));
    assert (self);
    snprintf (self->name, sizeof (self->name), "%s", name);
    self->envelope = gw_envelope_new ();
    return self;
}

//  Send a REQUEST along slip (comma-separated).
static void
s_test_send (gw_client_t *client, const char *slip)
{
    uint8_t rid[16];
    gw_rid_new (rid);
    gw_envelope_t *request_env = gw_envelope_new ();
    gw_envelope_set_rid (request_env, rid);
    char services[64];
    snprintf (services, sizeof (services), "%s", slip);
    char *first = NULL;
    for (char *name = strtok (services, ","); name; name = strtok (NULL, ",")) {
        gw_envelope_slip_append (request_env, name);
        if (!first)
            first = name;
    }
    gw_envelope_set_cursor (request_env, 0);
    gw_envelope_set_deadline (request_env, (uint64_t)gw_time_ms () + 5000);
    zframe_t *frame = gw_envelope_encode (request_env);
    gw_envelope_destroy (&request_env);
    gw_msg_t *msg = gw_msg_new (GW_MSG_REQUEST);
    gw_msg_set_rid (msg, rid);
    gw_msg_set_service (msg, first);
    gw_msg_set_deadline (msg, (uint64_t)gw_time_ms () + 5000);
    gw_msg_set_envelope (msg, &frame);
    assert (gw_client_send (client, &msg) == 0);
}

//  Send a REQUEST along slip and return its FINAL's status; a 200's body is
//  decoded into env (the answering stage's envelope).
static int
s_test_call (gw_client_t *client, const char *slip, gw_envelope_t *env)
{
    s_test_send (client, slip);
    int64_t until = gw_mono_ms () + 5000;
    int status = -1;
    while (status < 0 && gw_mono_ms () < until) {
        gw_msg_t *reply = gw_client_wait (client, 100);
        if (reply && gw_msg_id (reply) == GW_MSG_FINAL) {
            status = gw_msg_status (reply);
            zframe_t *body = gw_msg_body (reply);
            if (status == 200)
                assert (body &&
                    gw_envelope_decode (env, zframe_data (body), zframe_size (body)) ==
                        0);
        }
        gw_msg_destroy (&reply);
    }
    return status;
}

void
gw_stage_test (bool verbose)
{
    printf (" * gw_stage: ");
    zactor_t *broker = zactor_new (gw_broker_actor, NULL);
    assert (broker);
    zstr_sendx (broker, "BIND", "inproc://gw-stage-test", NULL);
    char *endpoint = zstr_recv (broker);
    assert (endpoint && *endpoint);

    static const gw_stage_class_t s1_class = {
        "s1", GW_READY_IDEMPOTENT, s_test_request, s_test_command, NULL, s_test_destroy};
    static const gw_stage_class_t s2_class = {
        "s2", GW_READY_IDEMPOTENT, s_test_request, s_test_command, NULL, s_test_destroy};
    s_test_state_t *s1 = s_test_state ("s1");
    s_test_state_t *s2 = s_test_state ("s2");
    gw_stage_host_t *host = gw_stage_host_new ();
    gw_stage_host_add (host, &s1_class, s1);
    gw_stage_host_add (host, &s2_class, s2);
    zactor_t *actor = zactor_new (gw_stage_actor, host);
    assert (actor);
    assert (gw_actor_configure (actor, "capacity", "0") == -1);
    assert (gw_actor_configure (actor, "capacity", "8") == 0);
    assert (gw_actor_configure (actor, "s2", "ok") == 0);  //  a stage's own key
    assert (gw_actor_configure (actor, "s2", "no") == -1);
    assert (gw_actor_configure (actor, "nobody", "1") == -1);
    zstr_send (actor, "VERBOSE");
    zstr_send (actor, "RELOAD");
    assert (zsock_wait (actor) == 1);  //  s2 refused
    assert (s1->reloads == 1 && s2->reloads == 1 && s1->verbose && s2->verbose);
    zstr_sendx (actor, "CONNECT", endpoint, NULL);
    assert (zsock_wait (actor) == 0);

    gw_worker_t *s3 = gw_worker_new (endpoint, "s3", 8, GW_READY_IDEMPOTENT);
    gw_client_t *client = gw_client_new (endpoint);
    assert (s3 && client);
    gw_envelope_t *env = gw_envelope_new ();

    //  s1 -> s2: handed over in the thread, answered by s2 on s1's session;
    //  both timings in the envelope, under their own names.
    assert (s_test_call (client, "s1,s2", env) == 200);
    assert (s1->requests == 1 && s2->requests == 1);
    assert (streq (gw_envelope_ann_str (env, "s1"), "passed"));
    assert (gw_envelope_timings (env) == 1);
    assert (streq (gw_envelope_timing (env, 0, NULL, NULL), "s1"));
    assert (gw_envelope_cursor (env) == 1);

    //  s2 on its own: its own session.
    assert (s_test_call (client, "s2", env) == 200);
    assert (s2->requests == 2 && gw_envelope_timings (env) == 0);

    //  s1 -> s3: not hosted, so FORWARDed through the broker.
    int64_t until = gw_mono_ms () + 5000;
    s_test_send (client, "s1,s3");
    gw_msg_t *got = NULL;
    while (!got && gw_mono_ms () < until)
        got = gw_worker_wait (s3, 100);
    assert (got && gw_msg_id (got) == GW_MSG_REQUEST);
    zframe_t *forwarded = gw_msg_envelope (got);
    assert (
        gw_envelope_decode (env, zframe_data (forwarded), zframe_size (forwarded)) == 0);
    assert (streq (gw_envelope_ann_str (env, "s1"), "passed"));
    assert (gw_worker_final (s3, gw_msg_rid (got), 204, NULL, NULL) == 0);
    gw_msg_destroy (&got);
    int status = -1;
    while (status < 0 && gw_mono_ms () < until) {
        gw_msg_t *reply = gw_client_wait (client, 100);
        if (reply && gw_msg_id (reply) == GW_MSG_FINAL)
            status = gw_msg_status (reply);
        gw_msg_destroy (&reply);
    }
    assert (status == 204 && s1->requests == 2);
    if (verbose)
        printf ("\n    s1 %d, s2 %d requests", s1->requests, s2->requests);

    gw_envelope_destroy (&env);
    gw_client_destroy (&client);
    gw_worker_destroy (&s3);
    zactor_destroy (&actor);  //  takes the host and the states
    zstr_free (&endpoint);
    zactor_destroy (&broker);
    printf ("OK\n");
}
