//  --------------------------------------------------------------------------
//  aigw-busbench — microbenchmark of the bus: round-trip latency and
//  messages/s of requests through a running broker and 1 or 3 stages.
//
//  It is a benchmark, not a test: tests/bench/run.sh starts a broker and
//  workers (aigw-testworker in forward/echo modes) and runs this for each
//  configuration, then records the results in docs/PERFORMANCE.md.
//
//  Usage: aigw-busbench --bus EP --slip a,b,c [--requests N]
//                       [--concurrency C] [--body-bytes B] [--warmup N]
//  Prints one line of key=value results.

#include "aigw.h"

static int
s_cmp_i64 (const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

typedef struct {
    int64_t sent_us;  //  when the request went out
    bool used;  //  slot in flight
    uint8_t rid[16];  //  its request id
} slot_t;

int
main (int argc, char *argv[])
{
    const char *bus = gw_env ("AIGW_BUS", "tcp://127.0.0.1:5555");
    const char *slip_arg = "bench.echo";
    long requests = 20000, concurrency = 1, body_bytes = 200, warmup = 1000;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!value) {
            fprintf (stderr, "aigw-busbench: %s needs a value\n", arg);
            return 2;
        }
        if (streq (arg, "--bus"))
            bus = value;
        else if (streq (arg, "--slip"))
            slip_arg = value;
        else if (streq (arg, "--requests"))
            requests = atol (value);
        else if (streq (arg, "--concurrency"))
            concurrency = atol (value);
        else if (streq (arg, "--body-bytes"))
            body_bytes = atol (value);
        else if (streq (arg, "--warmup"))
            warmup = atol (value);
        else {
            fprintf (stderr,
                "usage: aigw-busbench --bus EP --slip a,b,c [--requests N] "
                "[--concurrency C] [--body-bytes B] [--warmup N]\n");
            return 2;
        }
        i++;
    }
    if (requests < 1 || concurrency < 1 || concurrency > 4096 || body_bytes < 0 ||
        warmup < 0)
        return 2;
    gw_log_init ("busbench");

    //  The envelope carries the slip; the first service is the target.
    gw_envelope_t *env = gw_envelope_new ();
    char *slip_copy = strdup (slip_arg);
    size_t stages = 0;
    for (char *tok = strtok (slip_copy, ","); tok; tok = strtok (NULL, ",")) {
        if (gw_envelope_slip_append (env, tok)) {
            fprintf (stderr, "aigw-busbench: bad service %s\n", tok);
            return 2;
        }
        stages++;
    }
    free (slip_copy);
    if (stages == 0)
        return 2;
    const char *first = gw_envelope_slip (env, 0);

    //  Body: a msgpack bin of body_bytes, like a small chat request.
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    char *blob = (char *)calloc (1, (size_t)body_bytes + 1);
    msgpack_pack_map (&pk, 1);
    gw_mpack_str (&pk, "prompt");
    msgpack_pack_str (&pk, (size_t)body_bytes);
    msgpack_pack_str_body (&pk, blob, (size_t)body_bytes);
    free (blob);

    gw_client_t *client = gw_client_new (bus);
    if (!client) {
        fprintf (stderr, "aigw-busbench: cannot connect %s\n", bus);
        return 1;
    }
    long total = requests + warmup;
    int64_t *latency = (int64_t *)calloc ((size_t)requests, sizeof (int64_t));
    slot_t *slots = (slot_t *)calloc ((size_t)concurrency, sizeof (slot_t));
    long sent = 0, done = 0, failed = 0, measured = 0;
    int64_t start_us = 0;

    while (done < total && !zsys_interrupted) {
        //  Keep `concurrency` requests in flight.
        for (long s = 0; s < concurrency && sent < total; s++) {
            if (slots[s].used)
                continue;
            gw_msg_t *req = gw_msg_new (GW_MSG_REQUEST);
            gw_rid_new (slots[s].rid);
            gw_msg_set_rid (req, slots[s].rid);
            gw_msg_set_service (req, first);
            gw_msg_set_deadline (req, (uint64_t)gw_time_ms () + 30000);
            gw_envelope_set_rid (env, slots[s].rid);
            zframe_t *env_frame = gw_envelope_encode (env);
            zframe_t *body = zframe_new (sbuf.data, sbuf.size);
            gw_msg_set_envelope (req, &env_frame);
            gw_msg_set_body (req, &body);
            slots[s].sent_us = gw_time_us ();
            if (gw_client_send (client, &req)) {
                gw_msg_destroy (&req);
                fprintf (stderr, "aigw-busbench: send failed\n");
                return 1;
            }
            slots[s].used = true;
            if (sent == warmup)
                start_us = gw_time_us ();
            sent++;
        }
        gw_msg_t *reply = gw_client_wait (client, 5000);
        if (!reply) {
            fprintf (stderr, "aigw-busbench: no reply within 5 s (done=%ld)\n", done);
            return 1;
        }
        if (gw_msg_id (reply) == GW_MSG_FINAL) {
            for (long s = 0; s < concurrency; s++) {
                if (slots[s].used && memcmp (slots[s].rid, gw_msg_rid (reply), 16) == 0) {
                    slots[s].used = false;
                    if (done >= warmup && measured < requests)
                        latency[measured++] = gw_time_us () - slots[s].sent_us;
                    break;
                }
            }
            if (gw_msg_status (reply) != 200)
                failed++;
            done++;
        }
        gw_msg_destroy (&reply);
    }
    int64_t elapsed_us = gw_time_us () - start_us;
    qsort (latency, (size_t)measured, sizeof (int64_t), s_cmp_i64);
    int64_t p50 = measured ? latency[measured / 2] : 0;
    int64_t p99 = measured ? latency[(measured * 99) / 100] : 0;
    double rps = elapsed_us > 0 ? (double)measured * 1e6 / (double)elapsed_us : 0;
    //  Messages through the broker per request: REQUEST in, one FORWARD per
    //  extra stage, FINAL out — each counted on both of its hops.
    double msgs = rps * (double)(2 * (stages + 1));
    printf ("stages=%zu concurrency=%ld requests=%ld failed=%ld p50_us=%" PRId64
            " p99_us=%" PRId64 " req_per_s=%.0f bus_msgs_per_s=%.0f\n",
        stages, concurrency, measured, failed, p50, p99, rps, msgs);
    free (latency);
    free (slots);
    msgpack_sbuffer_destroy (&sbuf);
    gw_envelope_destroy (&env);
    gw_client_destroy (&client);
    return failed ? 1 : 0;
}
