//  --------------------------------------------------------------------------
//  aigw-testworker — a GWP/1 test worker on the gw_worker session, the C
//  twin of tests/integration/pyworker.py: same flags, same modes, same reply
//  body, so integration tests can mix C and Python workers freely.
//
//  Modes:
//    echo     FINAL 200 at once with the reply body below.
//    stream   --partials N PARTIALs ("chunk <i>"), --delay-ms apart, never
//             beyond the stream window (gw_worker_partial says GW_AGAIN and
//             we retry after CREDIT), then FINAL 200. A request without the
//             STREAM flag gets the FINAL only.
//    forward  append --label to the envelope annotation "path" (comma
//             separated) and FORWARD to the slip's next service; at the end
//             of the slip, answer as echo.
//    sleep    wait --delay-ms, then answer as echo.
//    hold     never answer (kill and cancel tests).
//
//  Reply body, msgpack:
//    {"worker": label, "service": service, "mode": mode, "pid": uint,
//     "path": [labels from ann "path" ..., label], "body": bin (request body)}
//
//  Every mode answers CANCEL with FINAL 499 after printing "cancelled <rid>".
//  stdout lines (flushed at once): "ready", "request <rid>", "cancelled <rid>",
//  "credit <rid> N". Logs go to stderr (gw_log).
//
//  Invariants: a job (a request answered later) holds the request message
//  until it is answered or the session forgets it (reconnect, cancel); the
//  loop never blocks longer than the next job or session timer. Rates: it is
//  also the benchmark stage (tests/bench), so echo and forward allocate only
//  the reply.

#include "aigw.h"
#include <getopt.h>

typedef enum {
    MODE_ECHO,
    MODE_STREAM,
    MODE_FORWARD,
    MODE_SLEEP,
    MODE_HOLD
} worker_mode_t;

static const char *s_mode_names[] = {"echo", "stream", "forward", "sleep", "hold"};

typedef struct {
    const char *bus;  //  broker endpoint
    const char *service;  //  service to serve
    uint32_t capacity;  //  READY capacity, 1..65535
    bool idempotent;  //  READY flag
    worker_mode_t mode;  //  what to do with a request
    uint32_t partials;  //  PARTIALs per stream request
    int delay_ms;  //  sleep / gap between PARTIALs
    char label[256];  //  worker label
    int heartbeat_ms;  //  session heartbeat
    int expiry_ms;  //  session expiry
    int reconnect_ms;  //  first reconnect back-off
} config_t;

typedef struct {
    gw_msg_t *request;  //  the REQUEST, owned
    int64_t due;  //  monotonic ms of the next step
    uint32_t sent;  //  PARTIALs sent so far
} job_t;

static void
s_say (const char *verb, const uint8_t rid[16], const char *extra)
{
    char hex[33];
    gw_rid_hex (rid, hex);
    printf ("%s %s%s%s\n", verb, hex, extra ? " " : "", extra ? extra : "");
    fflush (stdout);
}

static void
s_job_destroy (job_t **job_p)
{
    if (*job_p) {
        gw_msg_destroy (&(*job_p)->request);
        free (*job_p);
        *job_p = NULL;
    }
}

//  Reply body for a request (see the header). Returns a new frame.
static zframe_t *
s_reply_body (config_t *config, gw_msg_t *request)
{
    const char *path = NULL;
    gw_envelope_t *env = gw_envelope_new ();
    zframe_t *envelope = gw_msg_envelope (request);
    if (envelope &&
        gw_envelope_decode (env, zframe_data (envelope), zframe_size (envelope)) == 0)
        path = gw_envelope_ann_str (env, "path");

    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    msgpack_pack_map (&pk, 6);
    gw_mpack_str (&pk, "worker");
    gw_mpack_str (&pk, config->label);
    gw_mpack_str (&pk, "service");
    gw_mpack_str (&pk, config->service);
    gw_mpack_str (&pk, "mode");
    gw_mpack_str (&pk, s_mode_names[config->mode]);
    gw_mpack_str (&pk, "pid");
    msgpack_pack_uint64 (&pk, (uint64_t)getpid ());

    gw_mpack_str (&pk, "path");
    size_t count = 1;
    if (path && *path) {
        count++;
        for (const char *p = path; *p; p++)
            if (*p == ',')
                count++;
    }
    msgpack_pack_array (&pk, count);
    if (path && *path) {
        const char *start = path;
        while (true) {
            const char *comma = strchr (start, ',');
            size_t size = comma ? (size_t)(comma - start) : strlen (start);
            msgpack_pack_str (&pk, size);
            msgpack_pack_str_body (&pk, start, size);
            if (!comma)
                break;
            start = comma + 1;
        }
    }
    gw_mpack_str (&pk, config->label);

    gw_mpack_str (&pk, "body");
    zframe_t *body = gw_msg_body (request);
    size_t body_size = body ? zframe_size (body) : 0;
    msgpack_pack_bin (&pk, body_size);
    if (body_size)
        msgpack_pack_bin_body (&pk, zframe_data (body), body_size);

    zframe_t *frame = zframe_new (sbuf.data, sbuf.size);
    msgpack_sbuffer_destroy (&sbuf);
    gw_envelope_destroy (&env);
    return frame;
}

static void
s_answer (gw_worker_t *worker, config_t *config, gw_msg_t *request)
{
    zframe_t *body = s_reply_body (config, request);
    gw_worker_final (worker, gw_msg_rid (request), 200, NULL, &body);
    zframe_destroy (&body);  //  only if final refused it
}

static void
s_forward (gw_worker_t *worker, config_t *config, gw_msg_t *request)
{
    gw_envelope_t *env = gw_envelope_new ();
    zframe_t *envelope = gw_msg_envelope (request);
    if (!envelope ||
        gw_envelope_decode (env, zframe_data (envelope), zframe_size (envelope)) != 0) {
        gw_worker_error (worker, gw_msg_rid (request), 400, "invalid_request_error",
            "bad_envelope", "envelope is not valid");
        goto done;
    }
    if (!gw_envelope_next (env)) {
        s_answer (worker, config, request);
        goto done;
    }
    const char *prev = gw_envelope_ann_str (env, "path");
    char *path = prev && *prev ? zsys_sprintf ("%s,%s", prev, config->label)
                               : strdup (config->label);
    gw_envelope_set_ann_str (env, "path", path);
    zstr_free (&path);
    if (gw_worker_forward (worker, request, env) != 0)
        gw_worker_error (worker, gw_msg_rid (request), 500, "server_error",
            "forward_failed", "could not forward to the next service");
done:
    gw_envelope_destroy (&env);
}

static job_t *
s_job_find (zlist_t *jobs, const uint8_t *rid)
{
    for (job_t *job = (job_t *)zlist_first (jobs); job; job = (job_t *)zlist_next (jobs))
        if (memcmp (gw_msg_rid (job->request), rid, 16) == 0)
            return job;
    return NULL;
}

//  Run one job step; returns true when the job is finished.
static bool
s_job_run (gw_worker_t *worker, config_t *config, job_t *job, int64_t now)
{
    const uint8_t *rid = gw_msg_rid (job->request);
    if (gw_worker_cancelled (worker, rid))
        return true;  //  forgotten by the session (reconnect) or cancelled
    if (config->mode == MODE_SLEEP ||
        !(gw_msg_flags (job->request) & GW_REQUEST_STREAM)) {
        s_answer (worker, config, job->request);
        return true;
    }
    while (job->sent < config->partials && job->due <= now) {
        char chunk[32];
        int size = snprintf (chunk, sizeof chunk, "chunk %u", job->sent);
        int rc = gw_worker_partial (worker, rid, chunk, (size_t)size);
        if (rc == GW_AGAIN) {
            job->due = now + 5;  //  window exhausted: wait for CREDIT
            return false;
        }
        if (rc != GW_OK)
            return true;
        job->sent++;
        job->due = now + config->delay_ms;
        if (config->delay_ms)
            break;
    }
    if (job->sent >= config->partials) {
        s_answer (worker, config, job->request);
        return true;
    }
    return false;
}

static void
s_usage (void)
{
    fprintf (stderr,
        "usage: aigw-testworker --service S [--bus EP] [--capacity N] [--idempotent]\n"
        "       [--mode echo|stream|forward|sleep|hold] [--partials N] [--delay-ms N]\n"
        "       [--label L] [--heartbeat-ms N] [--expiry-ms N] [--reconnect-ms N] "
        "[-v]\n");
}

int
main (int argc, char *argv[])
{
    gw_log_init ("testworker");
    config_t config = {.bus = gw_env ("AIGW_BUS", "tcp://127.0.0.1:5555"),
        .capacity = 1,
        .mode = MODE_ECHO,
        .partials = 5,
        .heartbeat_ms = 1000,
        .expiry_ms = 3000,
        .reconnect_ms = 1000};
    snprintf (config.label, sizeof config.label, "c:%d", (int)getpid ());

    static struct option options[] = {{"bus", required_argument, 0, 'b'},
        {"service", required_argument, 0, 's'}, {"capacity", required_argument, 0, 'c'},
        {"idempotent", no_argument, 0, 'i'}, {"mode", required_argument, 0, 'm'},
        {"partials", required_argument, 0, 'p'}, {"delay-ms", required_argument, 0, 'd'},
        {"label", required_argument, 0, 'l'}, {"heartbeat-ms", required_argument, 0, 'H'},
        {"expiry-ms", required_argument, 0, 'E'},
        {"reconnect-ms", required_argument, 0, 'R'}, {"verbose", no_argument, 0, 'v'},
        {0, 0, 0, 0}};
    int opt;
    while ((opt = getopt_long (argc, argv, "v", options, NULL)) != -1) {
        switch (opt) {
            case 'b':
                config.bus = optarg;
                break;
            case 's':
                config.service = optarg;
                break;
            case 'c':
                config.capacity = (uint32_t)atol (optarg);
                break;
            case 'i':
                config.idempotent = true;
                break;
            case 'm': {
                size_t i;
                for (i = 0; i < sizeof s_mode_names / sizeof s_mode_names[0]; i++)
                    if (streq (optarg, s_mode_names[i]))
                        break;
                if (i == sizeof s_mode_names / sizeof s_mode_names[0]) {
                    s_usage ();
                    return 2;
                }
                config.mode = (worker_mode_t)i;
                break;
            }
            case 'p':
                config.partials = (uint32_t)atol (optarg);
                break;
            case 'd':
                config.delay_ms = atoi (optarg);
                break;
            case 'l':
                snprintf (config.label, sizeof config.label, "%s", optarg);
                break;
            case 'H':
                config.heartbeat_ms = atoi (optarg);
                break;
            case 'E':
                config.expiry_ms = atoi (optarg);
                break;
            case 'R':
                config.reconnect_ms = atoi (optarg);
                break;
            case 'v':
                gw_log_configure (GW_LOG_DEBUG, "text");
                break;
            default:
                s_usage ();
                return 2;
        }
    }
    if (!config.service || config.capacity < 1 || config.capacity > 65535) {
        s_usage ();
        return 2;
    }

    gw_worker_t *worker = gw_worker_new (config.bus, config.service, config.capacity,
        config.idempotent ? GW_READY_IDEMPOTENT : 0);
    if (!worker) {
        fprintf (stderr, "aigw-testworker: cannot serve %s on %s\n", config.service,
            config.bus);
        return 1;
    }
    gw_worker_set_heartbeat (worker, config.heartbeat_ms, config.expiry_ms);
    gw_worker_set_reconnect (worker, config.reconnect_ms,
        config.reconnect_ms > 32000 ? config.reconnect_ms : 32000);
    gw_worker_set_label (worker, config.label);
    printf ("ready\n");
    fflush (stdout);

    zlist_t *jobs = zlist_new ();
    while (!zsys_interrupted) {
        int64_t now = gw_mono_ms ();
        int timeout = gw_worker_timeout (worker);
        for (job_t *job = (job_t *)zlist_first (jobs); job;
             job = (job_t *)zlist_next (jobs)) {
            int64_t left = job->due > now ? job->due - now : 0;
            if (left < timeout)
                timeout = (int)left;
        }
        gw_msg_t *msg = gw_worker_wait (worker, timeout);
        while (msg) {
            const uint8_t *rid = gw_msg_rid (msg);
            int id = gw_msg_id (msg);
            if (id == GW_MSG_REQUEST) {
                s_say ("request", rid, NULL);
                if (config.mode == MODE_ECHO)
                    s_answer (worker, &config, msg);
                else if (config.mode == MODE_FORWARD)
                    s_forward (worker, &config, msg);
                else if (config.mode == MODE_SLEEP || config.mode == MODE_STREAM) {
                    job_t *job = (job_t *)zmalloc (sizeof (job_t));
                    job->request = msg;
                    job->due = gw_mono_ms () + config.delay_ms;
                    zlist_append (jobs, job);
                    msg = NULL;
                }
                else {
                    //  hold: keep the request only as the session's record
                }
            }
            else if (id == GW_MSG_CANCEL) {
                s_say ("cancelled", rid, NULL);
                job_t *job = s_job_find (jobs, rid);
                if (job) {
                    zlist_remove (jobs, job);
                    s_job_destroy (&job);
                }
                gw_worker_error (
                    worker, rid, 499, "gateway_error", "cancelled", "cancelled");
            }
            else if (id == GW_MSG_CREDIT) {
                char text[16];
                snprintf (text, sizeof text, "%u", gw_msg_credit (msg));
                s_say ("credit", rid, text);
            }
            gw_msg_destroy (&msg);
            msg = gw_worker_recv (worker);
        }
        now = gw_mono_ms ();
        job_t *job = (job_t *)zlist_first (jobs);
        while (job) {
            job_t *next = (job_t *)zlist_next (jobs);
            if (job->due <= now && s_job_run (worker, &config, job, now)) {
                zlist_remove (jobs, job);
                s_job_destroy (&job);
            }
            job = next;
        }
    }
    while (zlist_size (jobs)) {
        job_t *job = (job_t *)zlist_pop (jobs);
        s_job_destroy (&job);
    }
    zlist_destroy (&jobs);
    gw_worker_destroy (&worker);
    return 0;
}
