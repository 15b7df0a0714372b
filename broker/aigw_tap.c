//  --------------------------------------------------------------------------
//  aigw-tap — print live bus traffic from a broker's tap (PROTOCOL.md §7).
//
//  Subscribes to the broker's XPUB tap and prints one line per message:
//  text (ISO time, topic, rid, size, status) or, with --json, one JSON
//  object per line. stdout is flushed after every line, so it can be piped.
//  Sequence gaps (messages dropped at the tap's high-water mark) are
//  reported when subscribed to everything: seq counts every message the
//  broker publishes, so a --service subscription sees gaps by design.
//
//  Exit status: 0 after --count messages, --timeout-ms of silence, or a
//  signal; 2 on bad usage.

#include "aigw.h"

static void
s_usage (FILE *out)
{
    fprintf (out,
        "usage: aigw-tap [options]\n"
        "  --tap ENDPOINT    broker tap; env AIGW_TAP, default tcp://127.0.0.1:5556\n"
        "  --json            one JSON object per line: seq, time_us, topic, service,\n"
        "                    command, rid, size, status\n"
        "  --service S       only topics starting with S. (a prefix: 'model' matches\n"
        "                    model.tiny)\n"
        "  --command C       only this command (REQUEST, FORWARD, PARTIAL, FINAL, ...)\n"
        "  --rid HEX         only this request id (32 hex digits, dashes allowed)\n"
        "  --count N         exit after N printed messages\n"
        "  --timeout-ms T    exit after T ms without any message\n"
        "  -h, --help        this text\n");
}

static uint64_t
s_get (const byte *p, int bytes)
{
    uint64_t value = 0;
    for (int i = 0; i < bytes; i++)
        value = (value << 8) | p[i];
    return value;
}

//  Copy text into out keeping only characters safe in JSON and one line.
static void
s_clean (const char *text, size_t size, char *out, size_t limit)
{
    size_t used = 0;
    for (size_t i = 0; i < size && used + 1 < limit; i++) {
        char c = text[i];
        out[used++] = (c >= 0x20 && c < 0x7F && c != '"' && c != '\\') ? c : '?';
    }
    out[used] = 0;
}

int
main (int argc, char *argv[])
{
    const char *endpoint = gw_env ("AIGW_TAP", "tcp://127.0.0.1:5556");
    const char *service = NULL, *command = NULL;
    bool json = false, want_rid = false;
    uint8_t rid_filter[16];
    long count = -1, timeout = -1;
    for (int argn = 1; argn < argc; argn++) {
        const char *arg = argv[argn];
        const char *value = argn + 1 < argc ? argv[argn + 1] : NULL;
        if (streq (arg, "-h") || streq (arg, "--help")) {
            s_usage (stdout);
            return 0;
        }
        if (streq (arg, "--json")) {
            json = true;
            continue;
        }
        if (!value) {
            fprintf (stderr, "aigw-tap: unknown or incomplete option %s\n", arg);
            s_usage (stderr);
            return 2;
        }
        char *end = NULL;
        if (streq (arg, "--tap"))
            endpoint = value;
        else if (streq (arg, "--service"))
            service = value;
        else if (streq (arg, "--command"))
            command = value;
        else if (streq (arg, "--rid")) {
            if (gw_rid_parse (value, rid_filter)) {
                fprintf (stderr, "aigw-tap: bad request id %s\n", value);
                return 2;
            }
            want_rid = true;
        }
        else if (streq (arg, "--count") || streq (arg, "--timeout-ms")) {
            long number = strtol (value, &end, 10);
            if (!*value || *end || number < 0) {
                fprintf (stderr, "aigw-tap: bad number for %s: %s\n", arg, value);
                return 2;
            }
            if (streq (arg, "--count"))
                count = number;
            else
                timeout = number;
        }
        else {
            fprintf (stderr, "aigw-tap: unknown option %s\n", arg);
            s_usage (stderr);
            return 2;
        }
        argn++;
    }
    zsys_init ();
    zsys_catch_interrupts ();
    setvbuf (stdout, NULL, _IOLBF, 0);

    char prefix[GW_SERVICE_MAX + 2] = "";
    if (service) {
        size_t size = strlen (service);
        snprintf (prefix, sizeof (prefix), "%s%s", service,
            size && service[size - 1] == '.' ? "" : ".");
    }
    zsock_t *sub = zsock_new (ZMQ_SUB);
    assert (sub);
    zsock_set_linger (sub, 0);
    zsock_set_rcvhwm (sub, 100000);
    zsock_set_subscribe (sub, prefix);
    if (zsock_connect (sub, "%s", endpoint)) {
        fprintf (stderr, "aigw-tap: cannot connect to %s\n", endpoint);
        zsock_destroy (&sub);
        return 2;
    }
    zpoller_t *poller = zpoller_new (sub, NULL);
    assert (poller);
    uint64_t last_seq = 0;
    long printed = 0;
    while (!zsys_interrupted && (count < 0 || printed < count)) {
        void *which = zpoller_wait (poller, timeout < 0 ? -1 : (int)timeout);
        if (!which)
            break;  //  silence for timeout, or interrupted
        zmsg_t *msg = zmsg_recv (sub);
        if (!msg)
            break;
        zframe_t *topic = zmsg_first (msg);
        zframe_t *head = zmsg_next (msg);
        if (!topic || !head || zframe_size (head) != 40 || zframe_size (topic) > 140) {
            zmsg_destroy (&msg);
            continue;
        }
        const byte *h = zframe_data (head);
        uint64_t seq = s_get (h, 8);
        uint64_t time_us = s_get (h + 8, 8);
        uint32_t size = (uint32_t)s_get (h + 32, 4);
        uint16_t status = (uint16_t)s_get (h + 36, 2);
        if (!service && last_seq && seq > last_seq + 1) {
            uint64_t lost = seq - last_seq - 1;
            if (json)
                printf ("{\"gap\":%" PRIu64 ",\"message\":\"gap: %" PRIu64
                        " messages lost\"}\n",
                    lost, lost);
            else
                printf ("gap: %" PRIu64 " messages lost\n", lost);
        }
        last_seq = seq;
        char name[160];
        s_clean (
            (const char *)zframe_data (topic), zframe_size (topic), name, sizeof (name));
        //  topic = service.COMMAND; the service may itself contain dots.
        char *dot = strrchr (name, '.');
        const char *cmd = dot ? dot + 1 : "";
        char svc[160];
        snprintf (svc, sizeof (svc), "%.*s", dot ? (int)(dot - name) : (int)strlen (name),
            name);
        bool show = (!command || strcasecmp (command, cmd) == 0) &&
            (!want_rid || memcmp (h + 16, rid_filter, 16) == 0);
        if (show) {
            char rid[33];
            gw_rid_hex (h + 16, rid);
            if (json)
                printf ("{\"seq\":%" PRIu64 ",\"time_us\":%" PRIu64
                        ",\"topic\":\"%s\",\"service\":\"%s\",\"command\":\"%s\","
                        "\"rid\":\"%s\",\"size\":%u,\"status\":%u}\n",
                    seq, time_us, name, svc, cmd, rid, size, status);
            else {
                time_t secs = (time_t)(time_us / 1000000);
                struct tm tm;
                gmtime_r (&secs, &tm);
                char when[32];
                strftime (when, sizeof (when), "%Y-%m-%dT%H:%M:%S", &tm);
                printf ("%s.%06uZ %s %s %u %u\n", when, (unsigned)(time_us % 1000000),
                    name, rid, size, status);
            }
            printed++;
        }
        zmsg_destroy (&msg);
    }
    zpoller_destroy (&poller);
    zsock_destroy (&sub);
    return 0;
}
