//  --------------------------------------------------------------------------
//  gw_bridge — the model bridge stage (see gw_bridge.h for the commands).
//
//  Design note. One actor thread owns three things: the gw_worker session
//  (service "bridge", not idempotent: attempts have side effects upstream),
//  one libcurl multi handle driven through its socket API
//  (CURLMOPT_SOCKETFUNCTION / TIMERFUNCTION), and the table of requests in
//  flight (rid -> s_request_t). The loop zmq_polls the pipe, the worker
//  socket (fetched again every turn: it is replaced on reconnect) and the
//  raw fds curl asked for, then runs curl on the fds that are ready (and its
//  timer), reaps finished transfers, drains every message the worker has,
//  and every SWEEP_MS checks deadlines, first-byte timeouts and requests
//  the session forgot. Nothing blocks: a turn costs O(ready fds), plus the
//  O(sockets) poll set build.
//
//  Per request, an explicit state table (s_table):
//
//    state      event     action                                   next
//    ---------  --------  ---------------------------------------  ---------
//    attempt    sent      -  (first PARTIAL went out)              streaming
//    attempt    success   breaker ok, FINAL 200                    -
//    attempt    failed    abort, breaker fail, next channel or     attempt | -
//                         FINAL 502/504/429 when none is left
//    attempt    rejected  breaker ok, FINAL 4xx (provider error)   -
//    streaming  success   breaker ok, FINAL 200                    -
//    streaming  drain     breaker ok (transfer over, events held)  draining
//    streaming  failed    abort, breaker fail, FINAL 502           -
//    draining   success   FINAL 200 (held events flushed, [DONE])  -
//    draining   failed    FINAL 502 (flushed, no [DONE])           -
//    any        cancel    abort, release probe, FINAL 499          -
//    any        expired   abort, release probe, FINAL 504          -
//
//  "failed" is an upstream fault: connect error, timeout, HTTP 5xx or 429, a
//  stream that ends without [DONE] or with an error event. Once a PARTIAL
//  went out nothing is retried (the client has bytes of this attempt).
//
//  Streams: the write callback feeds a gw_sse parser and pulls events; each
//  event goes out as one PARTIAL holding its wire bytes ("data: <provider
//  JSON>\n\n", no re-encoding). The usage-only chunk (choices empty) is
//  recorded and dropped unless the client asked for it (ann.include_usage).
//  When the stream window is exhausted (gw_worker_partial says GW_AGAIN) the
//  event is held (the only copy made) and the next write callback returns
//  CURL_WRITEFUNC_PAUSE; CREDIT flushes the held event, pulls what the
//  parser still has and unpauses. So a slow client costs at most one held
//  event, the parser's unpulled bytes and curl's one paused buffer.
//
//  CANCEL or deadline: the easy handle is removed with FORBID_REUSE set and
//  cleaned up, so the upstream connection is closed (HTTP/1.1) or the stream
//  reset (HTTP/2) at once, and never returned to the pool. Except with
//  drain (AIGW_DISCONNECT, or the plan entry's "disconnect"): a CANCEL
//  during an attempt only sets client_gone (held event dropped, transfer
//  unpaused); the transfer runs on, sending no PARTIAL, and its end is the
//  usual success/failed event, answered FINAL 499 (no failover).
//
//  Money: every FINAL of a request with at least one attempt hands a usage
//  event (STAGES.md §6.2) to the gw_usage producer, which spools it and
//  sends it to billing until acknowledged. Admission refuses (503) while
//  events owed + requests in flight reach spool_max, so an event always
//  has room. The first PARTIAL carries an envelope with ann.headers and
//  ann.channel (PROTOCOL.md §2, frame 5), so the edge can send a stream's
//  response headers; FINAL envelopes are the request's (ann.headers kept).
//
//  Bounds (provider bytes are hostile too): response body body_max, error
//  bodies 64 KiB (truncated), SSE line and event event_max, plan 16 channels,
//  usage objects 8 KiB. Nothing asserts on input.
//
//  Rates: per request one envelope decode, one msgpack -> JSON pass over the
//  body (with the model swapped and stream_options forced while writing),
//  per streamed chunk two memchr per line, a memmem for "usage" and one
//  PARTIAL send.

#include "aigw.h"
#include <curl/curl.h>
#include "gw_bridge.h"
#include "gw_sse.h"
#include "gw_breaker.h"
#include "gw_usage.h"

#define PLAN_MAX 16  //  channels used from a plan
#define POOL_MAX 64  //  idle easy handles kept
#define ERROR_BODY_MAX (64 * 1024)  //  bytes kept of an upstream error body
#define USAGE_MAX 8192  //  bytes scanned for a usage object
#define SWEEP_MS 50  //  deadline / timeout sweep period
#define FAIL_MSG_MAX 320  //  bytes of the last failure's description
#define TIMEOUT_DEFAULT 60000  //  per-attempt timeout when the plan has none
#define JSON_DEPTH_MAX 64

//  --------------------------------------------------------------------------
//  Per-request state machine

typedef enum { S_ATTEMPT = 0, S_STREAMING, S_DRAINING, S_STATES } s_state_t;

typedef enum {
    E_SENT = 0,  //  a PARTIAL went out
    E_SUCCESS,  //  transfer complete and good (and nothing held)
    E_DRAIN,  //  stream transfer over, events still held for credit
    E_FAILED,  //  upstream fault (see the design note)
    E_REJECTED,  //  upstream 4xx other than 429: the caller's fault
    E_CANCEL,  //  CANCEL, or the session forgot the request
    E_EXPIRED,  //  request deadline passed
    E_EVENTS
} s_event_t;

#define A_ABORT 0x001  //  remove the transfer, close its connection
#define A_OK 0x002  //  breaker: success for the current channel
#define A_FAIL 0x004  //  breaker: failure (if the fault is the channel's)
#define A_RELEASE 0x008  //  breaker: no outcome, give the probe back
#define A_RETRY 0x010  //  next channel, or the final error
#define A_FINAL_OK 0x020  //  FINAL 200
#define A_FINAL_PASS 0x040  //  FINAL with the provider's 4xx and error
#define A_FINAL_502 0x080  //  FINAL 502, stream interrupted
#define A_FINAL_499 0x100  //  FINAL 499, cancelled
#define A_FINAL_504 0x200  //  FINAL 504, deadline

typedef struct {
    bool defined;  //  false: the event is ignored (logged) in this state
    unsigned actions;
    s_state_t next;
} s_transition_t;

static const s_transition_t s_table[S_STATES][E_EVENTS] = {
    [S_ATTEMPT] =
        {
            [E_SENT] = {true, 0, S_STREAMING},
            [E_SUCCESS] = {true, A_OK | A_FINAL_OK, S_ATTEMPT},
            [E_FAILED] = {true, A_ABORT | A_FAIL | A_RETRY, S_ATTEMPT},
            [E_REJECTED] = {true, A_OK | A_FINAL_PASS, S_ATTEMPT},
            [E_CANCEL] = {true, A_ABORT | A_RELEASE | A_FINAL_499, S_ATTEMPT},
            [E_EXPIRED] = {true, A_ABORT | A_RELEASE | A_FINAL_504, S_ATTEMPT},
        },
    [S_STREAMING] =
        {
            [E_SENT] = {true, 0, S_STREAMING},
            [E_SUCCESS] = {true, A_OK | A_FINAL_OK, S_STREAMING},
            [E_DRAIN] = {true, A_OK, S_DRAINING},
            [E_FAILED] = {true, A_ABORT | A_FAIL | A_FINAL_502, S_STREAMING},
            [E_CANCEL] = {true, A_ABORT | A_RELEASE | A_FINAL_499, S_STREAMING},
            [E_EXPIRED] = {true, A_ABORT | A_RELEASE | A_FINAL_504, S_STREAMING},
        },
    [S_DRAINING] =
        {
            [E_SENT] = {true, 0, S_DRAINING},
            [E_SUCCESS] = {true, A_FINAL_OK, S_DRAINING},
            [E_FAILED] = {true, A_FINAL_502, S_DRAINING},
            [E_CANCEL] = {true, A_FINAL_499, S_DRAINING},
            [E_EXPIRED] = {true, A_FINAL_504, S_DRAINING},
        },
};

static const char *s_state_names[] = {"attempt", "streaming", "draining"};
static const char *s_event_names[] = {
    "sent", "success", "drain", "failed", "rejected", "cancel", "expired"};

//  --------------------------------------------------------------------------
//  Structures

typedef enum { OP_CHAT = 0, OP_COMPLETIONS, OP_EMBEDDINGS } s_op_t;
static const char *s_op_paths[] = {"/chat/completions", "/completions", "/embeddings"};

typedef struct {
    char *id;  //  channel id (for the breaker, ann.channel, logs)
    char *url;  //  base + operation path
    char *auth;  //  "Authorization: Bearer <key>" header, or NULL
    char *model;  //  upstream model name
    uint32_t timeout_ms;  //  per-attempt timeout
    bool https;  //  base is https (HTTP/2 may be multiplexed)
    bool drain;  //  plan entry "disconnect": "drain"
} s_channel_t;

typedef struct {
    char *data;  //  bytes
    size_t size;  //  bytes used
    size_t cap;  //  bytes allocated
} s_buf_t;

typedef struct _s_bridge_t s_bridge_t;

typedef struct {
    uint8_t rid[16];  //  request id (hash key points here)
    s_bridge_t *bridge;  //  owning actor
    s_state_t state;  //  lifecycle state (s_table)
    bool finished;  //  FINAL sent: destroy after this event
    gw_envelope_t *envelope;  //  decoded request envelope (FINAL base)
    zframe_t *body;  //  request body, msgpack (owned)
    s_op_t op;  //  chat / completions / embeddings
    bool stream;  //  upstream streams, PARTIALs flow
    bool include_usage;  //  client asked for the usage chunk
    int64_t deadline;  //  unix ms, 0 = none
    int64_t t_in_us;  //  unix µs the request arrived
    s_channel_t channels[PLAN_MAX];  //  the plan, valid entries in order
    size_t channel_count;  //  entries used
    uint32_t tried;  //  bit i: channel i was attempted
    int channel;  //  index of the current attempt, -1 none
    uint32_t attempts;  //  upstream attempts made
    uint32_t attempts_429;  //  of which ended with HTTP 429
    //  Current transfer
    CURL *easy;  //  NULL between attempts
    struct curl_slist *headers;  //  request headers of the attempt
    msgpack_sbuffer upbody;  //  upstream JSON body of the attempt
    const char *upbody_model;  //  the model upbody was written for, or NULL
    char errbuf[CURL_ERROR_SIZE];  //  curl's error text
    long status;  //  HTTP status, 0 until known
    bool got_byte;  //  any response body byte arrived
    int64_t attempt_at;  //  mono ms the attempt started
    s_buf_t resp;  //  non-stream body, or error body
    gw_sse_t *sse;  //  stream parser (streams only)
    bool paused;  //  curl is paused (we returned PAUSE)
    char *held;  //  event waiting for credit, or NULL
    size_t held_size;  //  bytes in held
    bool done_seen;  //  data: [DONE] went out
    uint32_t partials;  //  PARTIALs sent
    bool abort_cancel;  //  a PARTIAL was refused: client gone
    bool aborted_by_us;  //  the write callback stopped the transfer
    bool client_gone;  //  CANCEL arrived and we drain: read on, send nothing
    uint64_t prompt_est;  //  prompt tokens estimate: request JSON bytes / 4
    uint64_t chunks;  //  content chunks streamed (completion estimate)
    //  Outcome bookkeeping
    bool has_usage;  //  usage seen
    uint64_t usage[4];  //  prompt, completion, total, cached prompt tokens
    bool fault;  //  last failure is the channel's fault
    bool last_timeout;  //  last failure was a timeout
    char fail_msg[FAIL_MSG_MAX];  //  last failure, for the final error
    zframe_t *last_error;  //  last provider error body (msgpack)
} s_request_t;

typedef struct {
    curl_socket_t fd;  //  socket curl watches
    int what;  //  CURL_POLL_IN / OUT / INOUT
    size_t index;  //  position in bridge->socks
} s_sock_t;

struct _s_bridge_t {
    zsock_t *pipe;  //  actor pipe
    bool terminated;  //  $TERM received
    bool verbose;  //  log attempts
    gw_worker_t *worker;  //  bus session, NULL until CONNECT
    gw_usage_t *usage;  //  usage event producer, NULL when billing is off
    CURLM *multi;  //  the multi handle
    zhashx_t *requests;  //  rid -> s_request_t (owned)
    gw_breaker_t *breakers;  //  per-channel breakers
    CURL *pool[POOL_MAX];  //  idle easy handles
    size_t pool_size;  //  entries used in pool
    gw_envelope_t *envelopes[POOL_MAX];  //  idle request envelopes (buffers kept)
    size_t envelope_count;  //  entries used in envelopes
    s_sock_t **socks;  //  sockets curl asked us to watch
    size_t sock_count;  //  entries used
    size_t sock_cap;  //  entries allocated
    zmq_pollitem_t *items;  //  poll set, rebuilt each turn
    size_t item_cap;  //  entries allocated
    int64_t timer_at;  //  mono ms curl wants its timeout, -1 none
    int64_t sweep_at;  //  mono ms of the next sweep
    int running;  //  transfers curl reports running
    //  Configuration
    uint32_t capacity;  //  READY capacity
    uint32_t breaker_failures;  //  failures in a row that open a breaker
    int64_t breaker_cooldown;  //  ms
    long maxconnects;  //  idle connections kept
    long connect_timeout;  //  ms, upper bound of the connect phase
    size_t body_max;  //  largest upstream body
    size_t event_max;  //  largest SSE line / event
    int heartbeat, expiry;  //  bus session timers (ms), 0 = default
    bool billing;  //  produce usage events (AIGW_BILLING)
    bool drain;  //  on client disconnect, drain every channel (AIGW_DISCONNECT)
    char *spool_dir;  //  AIGW_SPOOL_DIR
    size_t spool_max;  //  events spooled at most (AIGW_SPOOL_MAX)
    bool spool_fsync;  //  fsync every spool write (AIGW_SPOOL_FSYNC)
    char *billing_service;  //  service usage events go to
    //  Counters
    uint64_t n_attempts, n_retries, n_cancels, n_events, n_event_errors, n_refused;
};

//  --------------------------------------------------------------------------
//  Small helpers

static int
s_buf_append (s_buf_t *buf, const void *data, size_t size)
{
    if (buf->size + size > buf->cap) {
        size_t cap = buf->cap ? buf->cap : 1024;
        while (cap < buf->size + size)
            cap *= 2;
        char *grown = (char *)realloc (buf->data, cap);
        if (!grown)
            return -1;
        buf->data = grown;
        buf->cap = cap;
    }
    memcpy (buf->data + buf->size, data, size);
    buf->size += size;
    return 0;
}

static void
s_buf_reset (s_buf_t *buf)
{
    if (buf->cap > 65536) {
        free (buf->data);
        buf->data = NULL;
        buf->cap = 0;
    }
    buf->size = 0;
}

static bool
s_streq (const char *data, size_t size, const char *text)
{
    size_t len = strlen (text);
    return size == len && memcmp (data, text, len) == 0;
}

//  Copy of size bytes as a NUL-terminated string; NULL if it holds a control
//  character or NUL (header injection, log forging).
static char *
s_clean_strndup (const char *data, size_t size)
{
    for (size_t i = 0; i < size; i++)
        if ((unsigned char)data[i] < 0x20 || data[i] == 0x7f)
            return NULL;
    char *copy = (char *)malloc (size + 1);
    assert (copy);
    memcpy (copy, data, size);
    copy[size] = 0;
    return copy;
}

//  Printable-ASCII snippet of untrusted text, for error messages (they end up
//  in JSON and logs, so only safe characters).
static void
s_snippet (char *out, size_t out_max, const char *data, size_t size)
{
    size_t n = 0;
    for (size_t i = 0; i < size && n + 1 < out_max; i++) {
        unsigned char c = (unsigned char)data[i];
        out[n++] = (c >= 0x20 && c < 0x7f && c != '\\' && c != '"') ? (char)c : ' ';
    }
    out[n] = 0;
}

static const char *
s_skip_ws (const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

//  In JSON text, find the value of the last member named key: a "key" whose
//  opening quote is a real delimiter (not escaped) followed by ':'. In valid
//  JSON an unescaped quote always delimits a string, and a string followed by
//  ':' is a key, so text inside string values never matches. Returns a
//  pointer to the first byte of the value, or NULL.
static const char *
s_json_find_key (const char *json, size_t size, const char *key)
{
    size_t klen = strlen (key);
    const char *end = json + size;
    size_t span = size;
    while (span > 0) {
        const char *q = (const char *)memrchr (json, '"', span);
        if (!q)
            break;
        span = (size_t)(q - json);
        //  q is a closing quote candidate: "key" ends here
        if ((size_t)(q - json) < klen + 1 || q[-(ptrdiff_t)klen - 1] != '"' ||
            memcmp (q - klen, key, klen) != 0)
            continue;
        const char *open = q - klen - 1;
        size_t backslashes = 0;
        for (const char *b = open; b > json && b[-1] == '\\'; b--)
            backslashes++;
        if (backslashes % 2)
            continue;
        const char *v = s_skip_ws (q + 1, end);
        if (v < end && *v == ':') {
            v = s_skip_ws (v + 1, end);
            if (v < end)
                return v;
        }
    }
    return NULL;
}

//  True if a chat or completion chunk carries some text: a non-empty
//  "content" (chat) or "text" (legacy completions) string.
static bool
s_has_text (const char *json, size_t size)
{
    const char *end = json + size;
    const char *value = s_json_find_key (json, size, "content");
    if (!value)
        value = s_json_find_key (json, size, "text");
    return value && end - value >= 2 && value[0] == '"' && value[1] != '"';
}

//  End (one past) of the JSON object or array starting at p, scanning at most
//  max bytes; NULL if it does not close within them.
static const char *
s_json_container_end (const char *p, const char *end, size_t max)
{
    if (end - p > (ptrdiff_t)max)
        end = p + max;
    int depth = 0;
    bool in_string = false;
    for (; p < end; p++) {
        char c = *p;
        if (in_string) {
            if (c == '\\')
                p++;
            else if (c == '"')
                in_string = false;
        }
        else if (c == '"')
            in_string = true;
        else if (c == '{' || c == '[')
            depth++;
        else if (c == '}' || c == ']') {
            if (--depth == 0)
                return p + 1;
        }
    }
    return NULL;
}

//  Read a usage object (JSON text from p to end) into usage[4] (prompt,
//  completion, total, cached: prompt_tokens_details.cached_tokens). Returns
//  0, or -1 if there is none or it is malformed.
static int
s_usage_parse (const char *p, const char *end, uint64_t usage[4])
{
    const char *stop = s_json_container_end (p, end, USAGE_MAX);
    if (!stop || *p != '{')
        return -1;
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    int rc = -1;
    if (gw_json_to_msgpack (p, (size_t)(stop - p), &pk, NULL, NULL) == 0) {
        gw_mreader_t reader;
        gw_mreader_init (&reader, sbuf.data, sbuf.size);
        gw_mvalue_t map, key, value;
        if (gw_mreader_next (&reader, &map) == 0 && map.type == GW_MP_MAP) {
            usage[0] = usage[1] = usage[2] = usage[3] = 0;
            for (uint32_t i = 0; i < map.v.count; i++) {
                if (gw_mreader_next (&reader, &key) || key.type != GW_MP_STR)
                    break;
                const uint8_t *at = reader.pos;
                if (gw_mreader_next (&reader, &value))
                    break;
                if (value.type == GW_MP_UINT) {
                    if (gw_mvalue_streq (&key, "prompt_tokens") ||
                        gw_mvalue_streq (&key, "input_tokens"))
                        usage[0] = value.v.u;
                    else if (gw_mvalue_streq (&key, "completion_tokens") ||
                        gw_mvalue_streq (&key, "output_tokens"))
                        usage[1] = value.v.u;
                    else if (gw_mvalue_streq (&key, "total_tokens"))
                        usage[2] = value.v.u;
                }
                else if (value.type == GW_MP_MAP || value.type == GW_MP_ARRAY) {
                    reader.pos = at;
                    if (gw_mreader_skip (&reader, JSON_DEPTH_MAX))
                        break;
                    gw_mreader_t sub;
                    gw_mvalue_t cached;
                    gw_mreader_init (&sub, at, (size_t)(reader.pos - at));
                    if (value.type == GW_MP_MAP &&
                        (gw_mvalue_streq (&key, "prompt_tokens_details") ||
                            gw_mvalue_streq (&key, "input_tokens_details")) &&
                        gw_mreader_find (&sub, "cached_tokens") == 0 &&
                        gw_mreader_next (&sub, &cached) == 0 && cached.type == GW_MP_UINT)
                        usage[3] = cached.v.u;
                }
            }
            if (usage[2] == 0)
                usage[2] = usage[0] + usage[1];
            rc = reader.error ? -1 : 0;
        }
    }
    msgpack_sbuffer_destroy (&sbuf);
    return rc;
}

//  The provider's error body as an OpenAI error object (msgpack): passed
//  through when it is {"error": {...}}, otherwise synthesized. The message
//  (printable ASCII, for our own texts) goes to message_out.
static zframe_t *
s_error_from_provider (
    const char *data, size_t size, long status, char *message_out, size_t message_max)
{
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    zframe_t *frame = NULL;
    message_out[0] = 0;
    if (size > 0 && gw_json_to_msgpack (data, size, &pk, NULL, NULL) == 0) {
        gw_mreader_t reader;
        gw_mreader_init (&reader, sbuf.data, sbuf.size);
        if (gw_mreader_find (&reader, "error") == 0) {
            gw_mvalue_t value;
            const uint8_t *at = reader.pos;
            if (gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_MAP) {
                frame = zframe_new (sbuf.data, sbuf.size);
                reader.pos = at;
                if (gw_mreader_find (&reader, "message") == 0 &&
                    gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_STR)
                    s_snippet (message_out, message_max, value.ptr,
                        value.size > 200 ? 200 : value.size);
            }
        }
    }
    msgpack_sbuffer_destroy (&sbuf);
    if (!frame) {
        char snippet[160];
        s_snippet (snippet, sizeof (snippet), data, size);
        char text[256];
        snprintf (text, sizeof (text), "upstream returned HTTP %ld%s%s", status,
            snippet[0] ? ": " : "", snippet);
        snprintf (message_out, message_max, "%s", snippet);
        frame = gw_msg_error_body (
            status == 429 ? "rate_limit_error" : "upstream_error", NULL, text);
    }
    return frame;
}

//  --------------------------------------------------------------------------
//  Request body: msgpack -> JSON with the plan's model, "stream" set to what
//  the bridge does, and for streams stream_options.include_usage forced true
//  (dropped for non-streams: providers reject it there).

static int
s_write (msgpack_sbuffer *out, const char *text)
{
    return msgpack_sbuffer_write (out, text, strlen (text));
}

static int
s_body_json (s_request_t *req, const char *model, msgpack_sbuffer *out)
{
    gw_mreader_t reader;
    gw_mreader_init (&reader, zframe_data (req->body), zframe_size (req->body));
    gw_mvalue_t map, key;
    if (gw_mreader_next (&reader, &map) || map.type != GW_MP_MAP)
        return -1;
    bool streamable = req->op != OP_EMBEDDINGS;
    bool first = true, wrote_so = false, wrote_stream = false;
    s_write (out, "{");
    for (uint32_t i = 0; i < map.v.count; i++) {
        if (gw_mreader_next (&reader, &key) || key.type != GW_MP_STR)
            return -1;
        const uint8_t *at = reader.pos;
        if (gw_mreader_skip (&reader, JSON_DEPTH_MAX))
            return -1;
        size_t value_size = (size_t)(reader.pos - at);
        bool is_model = gw_mvalue_streq (&key, "model");
        bool is_stream = gw_mvalue_streq (&key, "stream");
        bool is_so = gw_mvalue_streq (&key, "stream_options");
        if (is_model || (is_so && !req->stream) || (is_stream && !streamable))
            continue;  //  written below, or dropped
        if (!first)
            s_write (out, ",");
        first = false;
        if (gw_json_escape (key.ptr, key.size, out))
            return -1;
        s_write (out, ":");
        if (is_stream) {
            s_write (out, req->stream ? "true" : "false");
            wrote_stream = true;
        }
        else if (is_so) {
            //  Copy the map's other members, force include_usage.
            s_write (out, "{\"include_usage\":true");
            gw_mreader_t sub;
            gw_mreader_init (&sub, at, value_size);
            gw_mvalue_t so;
            if (gw_mreader_next (&sub, &so) == 0 && so.type == GW_MP_MAP) {
                for (uint32_t j = 0; j < so.v.count; j++) {
                    if (gw_mreader_next (&sub, &key) || key.type != GW_MP_STR)
                        return -1;
                    const uint8_t *vat = sub.pos;
                    if (gw_mreader_skip (&sub, JSON_DEPTH_MAX))
                        return -1;
                    if (gw_mvalue_streq (&key, "include_usage"))
                        continue;
                    s_write (out, ",");
                    if (gw_json_escape (key.ptr, key.size, out))
                        return -1;
                    s_write (out, ":");
                    if (gw_json_from_msgpack (
                            vat, (size_t)(sub.pos - vat), out, JSON_DEPTH_MAX, NULL))
                        return -1;
                }
            }
            s_write (out, "}");
            wrote_so = true;
        }
        else if (gw_json_from_msgpack (at, value_size, out, JSON_DEPTH_MAX, NULL))
            return -1;
    }
    if (gw_mreader_left (&reader) != 0)
        return -1;  //  trailing bytes: not one msgpack object
    if (!first)
        s_write (out, ",");
    s_write (out, "\"model\":");
    if (gw_json_escape (model, strlen (model), out))
        return -1;
    if (req->stream && !wrote_stream)
        s_write (out, ",\"stream\":true");
    if (req->stream && !wrote_so)
        s_write (out, ",\"stream_options\":{\"include_usage\":true}");
    s_write (out, "}");
    return 0;
}

//  --------------------------------------------------------------------------
//  The plan (ann.plan, STAGES.md §3)

static void
s_channel_clear (s_channel_t *channel)
{
    free (channel->id);
    free (channel->url);
    free (channel->auth);
    free (channel->model);
    memset (channel, 0, sizeof (*channel));
}

//  Read one plan entry (a map) into channel. Returns 0 if it is usable.
static int
s_channel_read (gw_mreader_t *reader, uint32_t pairs, s_op_t op, s_channel_t *channel)
{
    const char *id = NULL, *base = NULL, *key = NULL, *model = NULL, *type = NULL;
    uint32_t id_size = 0, base_size = 0, key_size = 0, model_size = 0, type_size = 0;
    uint64_t timeout = 0;
    bool drain = false;
    for (uint32_t i = 0; i < pairs; i++) {
        gw_mvalue_t name, value;
        if (gw_mreader_next (reader, &name))
            return -1;
        const uint8_t *at = reader->pos;
        if (gw_mreader_next (reader, &value))
            return -1;
        if (value.type == GW_MP_MAP || value.type == GW_MP_ARRAY) {
            reader->pos = at;
            if (gw_mreader_skip (reader, GW_ENVELOPE_DEPTH_MAX))
                return -1;
            continue;
        }
        if (name.type != GW_MP_STR)
            continue;
        if (value.type == GW_MP_STR) {
            if (gw_mvalue_streq (&name, "id"))
                id = value.ptr, id_size = value.size;
            else if (gw_mvalue_streq (&name, "base"))
                base = value.ptr, base_size = value.size;
            else if (gw_mvalue_streq (&name, "key"))
                key = value.ptr, key_size = value.size;
            else if (gw_mvalue_streq (&name, "model"))
                model = value.ptr, model_size = value.size;
            else if (gw_mvalue_streq (&name, "type"))
                type = value.ptr, type_size = value.size;
        }
        else if (value.type == GW_MP_UINT && gw_mvalue_streq (&name, "timeout_ms"))
            timeout = value.v.u;
        if (value.type == GW_MP_STR && gw_mvalue_streq (&name, "disconnect"))
            drain = s_streq (value.ptr, value.size, "drain");
    }
    if (!id || id_size == 0 || id_size > 128 || !base || base_size > 2048 || !model ||
        model_size == 0 || model_size > 256 || key_size > 4096)
        return 1;
    if (type && !s_streq (type, type_size, "openai"))
        return 1;  //  only OpenAI-compatible upstreams for now
    bool https = base_size > 8 && strncasecmp (base, "https://", 8) == 0;
    if (!https && !(base_size > 7 && strncasecmp (base, "http://", 7) == 0))
        return 1;
    while (base_size > 0 && base[base_size - 1] == '/')
        base_size--;
    for (uint32_t i = 0; i < base_size; i++)
        if ((unsigned char)base[i] <= 0x20 || base[i] == 0x7f)
            return 1;
    channel->id = s_clean_strndup (id, id_size);
    channel->model = s_clean_strndup (model, model_size);
    char *key_text = key ? s_clean_strndup (key, key_size) : NULL;
    if (!channel->id || !channel->model || (key && !key_text)) {
        free (key_text);
        s_channel_clear (channel);
        return 1;
    }
    const char *path = s_op_paths[op];
    channel->url = (char *)malloc (base_size + strlen (path) + 1);
    assert (channel->url);
    memcpy (channel->url, base, base_size);
    strcpy (channel->url + base_size, path);
    if (key_text && key_text[0]) {
        channel->auth = (char *)malloc (key_size + 32);
        assert (channel->auth);
        sprintf (channel->auth, "Authorization: Bearer %s", key_text);
    }
    free (key_text);
    channel->https = https;
    channel->drain = drain;
    channel->timeout_ms =
        timeout > 0 && timeout < 86400000 ? (uint32_t)timeout : TIMEOUT_DEFAULT;
    return 0;
}

//  Parse the plan into req->channels. Returns the number of usable channels.
static size_t
s_plan_parse (s_request_t *req, const void *data, size_t size)
{
    gw_mreader_t reader;
    gw_mreader_init (&reader, data, size);
    gw_mvalue_t list;
    if (gw_mreader_next (&reader, &list) || list.type != GW_MP_ARRAY)
        return 0;
    for (uint32_t i = 0; i < list.v.count && req->channel_count < PLAN_MAX; i++) {
        const uint8_t *at = reader.pos;
        gw_mvalue_t entry;
        if (gw_mreader_next (&reader, &entry))
            break;
        if (entry.type != GW_MP_MAP) {
            reader.pos = at;
            if (gw_mreader_skip (&reader, GW_ENVELOPE_DEPTH_MAX))
                break;
            continue;
        }
        s_channel_t *channel = &req->channels[req->channel_count];
        int rc = s_channel_read (&reader, entry.v.count, req->op, channel);
        if (rc < 0)
            break;
        if (rc == 0)
            req->channel_count++;
    }
    return req->channel_count;
}

//  --------------------------------------------------------------------------
//  Requests

static void s_execute (s_request_t *req, s_event_t event);

//  A request's envelope comes from the bridge's idle ones when there are
//  any (a decode into one reuses its buffers) and goes back there.
static gw_envelope_t *
s_envelope_get (s_bridge_t *self)
{
    return self->envelope_count ? self->envelopes[--self->envelope_count]
                                : gw_envelope_new ();
}

static void
s_envelope_put (s_bridge_t *self, gw_envelope_t **env_p)
{
    if (*env_p && self->envelope_count < POOL_MAX) {
        self->envelopes[self->envelope_count++] = *env_p;
        *env_p = NULL;
    }
    gw_envelope_destroy (env_p);
}

static void
s_request_destroy (s_request_t **req_p)
{
    s_request_t *req = *req_p;
    if (!req)
        return;
    assert (!req->easy);
    for (size_t i = 0; i < req->channel_count; i++)
        s_channel_clear (&req->channels[i]);
    s_envelope_put (req->bridge, &req->envelope);
    zframe_destroy (&req->body);
    msgpack_sbuffer_destroy (&req->upbody);
    free (req->resp.data);
    gw_sse_destroy (&req->sse);
    free (req->held);
    zframe_destroy (&req->last_error);
    free (req);
    *req_p = NULL;
}

static void
s_request_free (void **item_p)
{
    s_request_destroy ((s_request_t **)item_p);
}

static const char *
s_channel_id (s_request_t *req)
{
    return req->channel >= 0 ? req->channels[req->channel].id : NULL;
}

//  Note the failure of the current attempt: fault = the channel's fault
//  (counts for its breaker), timeout = it timed out.
static void s_note_failure (s_request_t *req, bool fault, bool timeout,
    const char *format, ...) __attribute__ ((format (printf, 4, 5)));

static void
s_note_failure (s_request_t *req, bool fault, bool timeout, const char *format, ...)
{
    req->fault = fault;
    req->last_timeout = timeout;
    int n = snprintf (req->fail_msg, sizeof (req->fail_msg),
        "channel %s: ", s_channel_id (req) ? s_channel_id (req) : "-");
    if (n < 0 || (size_t)n >= sizeof (req->fail_msg))
        n = 0;
    va_list args;
    va_start (args, format);
    vsnprintf (req->fail_msg + n, sizeof (req->fail_msg) - (size_t)n, format, args);
    va_end (args);
}

//  FINAL envelope: the request's envelope with ann.channel, ann.attempts,
//  ann.usage, ann.ctype (json bodies) and the bridge's timing.
static zframe_t *
s_final_envelope (s_request_t *req, bool json_body)
{
    gw_envelope_t *env = req->envelope;
    //  The plan holds upstream keys: it does not travel back.
    gw_envelope_remove_ann (env, "plan");
    if (s_channel_id (req))
        gw_envelope_set_ann_str (env, "channel", s_channel_id (req));
    gw_envelope_set_ann_int (env, "attempts", req->attempts);
    if (json_body)
        gw_envelope_set_ann_str (env, "ctype", "json");
    if (req->has_usage) {
        char raw[64];
        msgpack_sbuffer sbuf;
        msgpack_sbuffer_init (&sbuf);
        msgpack_packer pk;
        msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
        msgpack_pack_map (&pk, 3);
        gw_mpack_str (&pk, "prompt_tokens");
        msgpack_pack_uint64 (&pk, req->usage[0]);
        gw_mpack_str (&pk, "completion_tokens");
        msgpack_pack_uint64 (&pk, req->usage[1]);
        gw_mpack_str (&pk, "total_tokens");
        msgpack_pack_uint64 (&pk, req->usage[2]);
        assert (sbuf.size <= sizeof (raw));
        gw_envelope_set_ann_raw (env, "usage", sbuf.data, sbuf.size);
        msgpack_sbuffer_destroy (&sbuf);
    }
    gw_envelope_timing_add (
        env, "bridge", (uint64_t)req->t_in_us, (uint64_t)gw_time_us ());
    zframe_t *frame = gw_envelope_encode (env);
    if (frame && zframe_size (frame) > GW_ENVELOPE_MAX)
        zframe_destroy (&frame);
    return frame;
}

//  An envelope with what a response needs before its FINAL: ann.headers
//  (copied from the request envelope: ratelimit's x-ratelimit-*) and
//  ann.channel. NULL when there is neither.
static zframe_t *
s_head_envelope (gw_envelope_t *request, const char *channel)
{
    size_t size = 0;
    const void *headers =
        request ? gw_envelope_ann_raw (request, "headers", &size) : NULL;
    if (!headers && !channel)
        return NULL;
    gw_envelope_t *env = gw_envelope_new ();
    if (headers)
        gw_envelope_set_ann_raw (env, "headers", headers, size);
    if (channel)
        gw_envelope_set_ann_str (env, "channel", channel);
    zframe_t *frame = gw_envelope_encode (env);
    gw_envelope_destroy (&env);
    return frame;
}

//  Error FINAL for a request that never reached the table (no attempt was
//  made), carrying ann.headers (STAGES.md §6.1) when env has them.
static void
s_error_env (s_bridge_t *self, const uint8_t *rid, gw_envelope_t *env, uint16_t status,
    const char *type, const char *code, const char *message)
{
    zframe_t *envelope = s_head_envelope (env, NULL);
    zframe_t *body = gw_msg_error_body (type, code, message);
    gw_worker_final (self->worker, rid, status, &envelope, &body);
}

//  The usage event of a request that reached a backend (STAGES.md §6.2),
//  into the spool. Usage: what the provider reported; else, when the client
//  went away (499), the deadline cut a stream (504), or a provider answered
//  200 without usage, the gateway's own count (prompt estimate + content
//  chunks streamed), marked estimated; else (the upstream failed) none.
static void
s_produce (s_request_t *req, uint16_t status)
{
    s_bridge_t *self = req->bridge;
    if (!self->usage || req->attempts == 0)
        return;
    uint64_t prompt = 0, completion = 0, cached = 0;
    bool estimated = false;
    if (req->has_usage) {
        prompt = req->usage[0];
        completion = req->usage[1];
        cached = req->usage[3];
    }
    else if (status == 200 || status == 499 || (status == 504 && req->partials)) {
        prompt = req->prompt_est;
        completion = req->chunks;
        estimated = true;
    }
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    gw_usage_event_pack (&sbuf, req->rid, req->envelope, s_channel_id (req), prompt,
        completion, cached, estimated, status);
    if (gw_usage_submit (self->usage, req->rid, sbuf.data, sbuf.size) == 0)
        self->n_events++;
    else {
        //  Cannot happen while admission keeps room (see s_on_request),
        //  except when the spool file cannot be written.
        char hex[33];
        gw_rid_hex (req->rid, hex);
        self->n_event_errors++;
        gw_error ("bridge: usage event of %s NOT spooled (status %u, %" PRIu64 "+%" PRIu64
                  " tokens): the spool is full or unwritable",
            hex, status, prompt, completion);
    }
    msgpack_sbuffer_destroy (&sbuf);
}

static void
s_final (s_request_t *req, uint16_t status, zframe_t *body, bool json_body)
{
    s_bridge_t *self = req->bridge;
    if (req->client_gone && status < 400) {
        //  Drained after a CANCEL: the broker drops this FINAL; the status
        //  is for the usage event and the log.
        status = 499;
        zframe_destroy (&body);
    }
    zframe_t *envelope = s_final_envelope (req, json_body);
    if (self->verbose || status >= 500)
        gw_log (status >= 500 ? GW_LOG_WARN : GW_LOG_INFO, NULL,
            "bridge: FINAL %u channel=%s attempts=%u partials=%u%s%s", status,
            s_channel_id (req) ? s_channel_id (req) : "-", req->attempts, req->partials,
            status >= 400 && req->fail_msg[0] ? " last=" : "",
            status >= 400 ? req->fail_msg : "");
    gw_worker_final (self->worker, req->rid, status, &envelope, &body);
    req->finished = true;
    s_produce (req, status);
}

static void
s_final_error (s_request_t *req, uint16_t status, const char *type, const char *code,
    const char *message)
{
    s_final (req, status, gw_msg_error_body (type, code, message), false);
}

//  --------------------------------------------------------------------------
//  Transfers

static size_t s_on_write (char *data, size_t size, size_t nmemb, void *userp);

//  Take the transfer off the multi handle. abort: the transfer is cut short —
//  its connection must be closed, and the handle is not reused.
static void
s_transfer_detach (s_request_t *req, bool abort)
{
    s_bridge_t *self = req->bridge;
    if (req->easy) {
        if (abort)
            curl_easy_setopt (req->easy, CURLOPT_FORBID_REUSE, 1L);
        curl_multi_remove_handle (self->multi, req->easy);
        if (!abort && self->pool_size < POOL_MAX) {
            curl_easy_reset (req->easy);
            self->pool[self->pool_size++] = req->easy;
        }
        else
            curl_easy_cleanup (req->easy);
        req->easy = NULL;
    }
    curl_slist_free_all (req->headers);
    req->headers = NULL;
    req->paused = false;
}

//  Start an attempt on channel index. Returns 0, or -1 (failure noted).
static int
s_attempt_start (s_request_t *req, int index)
{
    s_bridge_t *self = req->bridge;
    s_channel_t *channel = &req->channels[index];
    req->channel = index;
    req->tried |= 1u << index;
    req->attempts++;
    self->n_attempts++;
    if (req->attempts > 1)
        self->n_retries++;
    req->status = 0;
    req->got_byte = false;
    req->done_seen = false;
    req->has_usage = false;
    req->aborted_by_us = false;
    req->errbuf[0] = 0;
    s_buf_reset (&req->resp);
    if (req->sse)
        gw_sse_reset (req->sse);
    else if (req->stream)
        req->sse = gw_sse_new (self->event_max, self->event_max);
    //  The body depends on the model alone: the one written when the
    //  request came in serves every attempt on a channel with that model.
    if (!req->upbody_model || !channel->model ||
        !streq (req->upbody_model, channel->model)) {
        req->upbody.size = 0;
        req->upbody_model = NULL;
        if (s_body_json (req, channel->model, &req->upbody)) {
            s_note_failure (
                req, false, false, "request body could not be written as JSON");
            return -1;
        }
        req->upbody_model = channel->model;
    }
    CURL *easy = self->pool_size ? self->pool[--self->pool_size] : curl_easy_init ();
    if (!easy) {
        s_note_failure (req, false, false, "out of transfer handles");
        return -1;
    }
    req->headers = curl_slist_append (NULL, "Content-Type: application/json");
    req->headers = curl_slist_append (req->headers,
        req->stream ? "Accept: text/event-stream" : "Accept: application/json");
    req->headers = curl_slist_append (req->headers, "Expect:");
    if (channel->auth)
        req->headers = curl_slist_append (req->headers, channel->auth);

    int64_t timeout = channel->timeout_ms;
    int64_t remaining = req->deadline ? req->deadline - gw_time_ms () : 0;
    if (req->deadline && remaining < 1)
        remaining = 1;
    long connect =
        self->connect_timeout < timeout ? self->connect_timeout : (long)timeout;
    if (req->deadline && remaining < connect)
        connect = (long)remaining;
    curl_easy_setopt (easy, CURLOPT_URL, channel->url);
    curl_easy_setopt (easy, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt (easy, CURLOPT_POSTFIELDS, req->upbody.data);
    curl_easy_setopt (easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)req->upbody.size);
    curl_easy_setopt (easy, CURLOPT_HTTPHEADER, req->headers);
    curl_easy_setopt (easy, CURLOPT_WRITEFUNCTION, s_on_write);
    curl_easy_setopt (easy, CURLOPT_WRITEDATA, req);
    curl_easy_setopt (easy, CURLOPT_PRIVATE, req);
    curl_easy_setopt (easy, CURLOPT_ERRORBUFFER, req->errbuf);
    curl_easy_setopt (easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt (easy, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt (easy, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt (easy, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_2TLS);
    if (channel->https)
        curl_easy_setopt (easy, CURLOPT_PIPEWAIT, 1L);
    curl_easy_setopt (easy, CURLOPT_CONNECTTIMEOUT_MS, connect);
    if (req->stream) {
        //  A stream lasts as long as it lasts: bounded by the deadline, by
        //  the first-byte timeout (the sweep) and by an idle timeout.
        curl_easy_setopt (easy, CURLOPT_TIMEOUT_MS, (long)remaining);
        curl_easy_setopt (easy, CURLOPT_LOW_SPEED_LIMIT, 1L);
        curl_easy_setopt (
            easy, CURLOPT_LOW_SPEED_TIME, (long)(timeout >= 2000 ? timeout / 1000 : 1));
    }
    else
        curl_easy_setopt (easy, CURLOPT_TIMEOUT_MS,
            (long)(req->deadline && remaining < timeout ? remaining : timeout));
    req->easy = easy;
    req->attempt_at = gw_mono_ms ();
    CURLMcode rc = curl_multi_add_handle (self->multi, easy);
    if (rc != CURLM_OK) {
        s_note_failure (
            req, false, false, "transfer not started: %s", curl_multi_strerror (rc));
        s_transfer_detach (req, true);
        return -1;
    }
    if (self->verbose)
        gw_info ("bridge: attempt %u channel=%s url=%s stream=%d", req->attempts,
            channel->id, channel->url, req->stream);
    return 0;
}

//  Index of the next channel to try, or -1: the first untried channel whose
//  breaker allows it; if it is the first attempt and every channel is open,
//  the one whose cooldown ends first.
static int
s_channel_pick (s_request_t *req)
{
    s_bridge_t *self = req->bridge;
    int64_t now = gw_mono_ms ();
    for (size_t i = 0; i < req->channel_count; i++)
        if (!(req->tried & (1u << i)) &&
            gw_breaker_allow (self->breakers, req->channels[i].id, now))
            return (int)i;
    if (req->attempts > 0)
        return -1;
    int best = -1;
    int64_t best_until = 0;
    for (size_t i = 0; i < req->channel_count; i++) {
        int64_t until = gw_breaker_open_until (self->breakers, req->channels[i].id);
        if (!(req->tried & (1u << i)) && (best < 0 || until < best_until)) {
            best = (int)i;
            best_until = until;
        }
    }
    if (best >= 0)
        gw_breaker_force (self->breakers, req->channels[best].id, now);
    return best;
}

//  Start the next attempt; when no channel is left, send the final error.
static void
s_attempt_next (s_request_t *req)
{
    if (req->client_gone) {
        s_final (req, 499, NULL, false);  //  nobody waits for a failover
        return;
    }
    while (true) {
        if (req->deadline && gw_time_ms () >= req->deadline) {
            s_final_error (req, 504, "gateway_error", "deadline_exceeded",
                "request deadline passed before an upstream answered");
            return;
        }
        int index = s_channel_pick (req);
        if (index < 0)
            break;
        if (s_attempt_start (req, index) == 0)
            return;
        gw_breaker_release (
            req->bridge->breakers, req->channels[index].id, gw_mono_ms ());
    }
    char message[FAIL_MSG_MAX + 96];
    if (req->attempts == 0) {
        s_final_error (req, 503, "upstream_error", "no_channel",
            "no upstream channel of the plan is available");
        return;
    }
    if (req->attempts_429 == req->attempts && req->last_error) {
        zframe_t *body = req->last_error;
        req->last_error = NULL;
        s_final (req, 429, body, false);
        return;
    }
    snprintf (message, sizeof (message),
        "upstream request failed after %u attempt%s; last: %s", req->attempts,
        req->attempts == 1 ? "" : "s", req->fail_msg);
    if (req->last_timeout)
        s_final_error (req, 504, "upstream_error", "upstream_timeout", message);
    else
        s_final_error (req, 502, "upstream_error", "upstream_unavailable", message);
}

//  --------------------------------------------------------------------------
//  Streams

//  Send one SSE event as a PARTIAL; hold it if the window is exhausted.
//  Returns 0, or -1 if the session refused it (client gone).
//  Send one PARTIAL; the first carries an envelope with ann.headers and
//  ann.channel, so the client can send the stream's response headers.
static int
s_partial (s_request_t *req, const char *data, size_t size)
{
    s_bridge_t *self = req->bridge;
    if (req->partials > 0)
        return gw_worker_partial (self->worker, req->rid, data, size);
    zframe_t *envelope = s_head_envelope (req->envelope, s_channel_id (req));
    int rc = gw_worker_partial_env (self->worker, req->rid, data, size, &envelope);
    zframe_destroy (&envelope);
    return rc;
}

//  True if a client disconnect drains this request (AIGW_DISCONNECT=drain,
//  or the current channel's plan entry says "disconnect": "drain").
static bool
s_drains (s_request_t *req)
{
    return req->bridge->drain || (req->channel >= 0 && req->channels[req->channel].drain);
}

//  The client went away and the request drains: send nothing more, drop
//  what is held, let the transfer run to the provider's final usage.
static void
s_client_gone (s_request_t *req)
{
    if (req->client_gone)
        return;
    req->client_gone = true;
    req->bridge->n_cancels++;
    free (req->held);
    req->held = NULL;
    if (req->paused && req->easy) {
        req->paused = false;
        curl_easy_pause (req->easy, CURLPAUSE_CONT);
    }
}

static int
s_emit (s_request_t *req, const char *data, size_t size)
{
    if (req->client_gone)
        return 0;  //  draining for the usage: nobody reads
    int rc = s_partial (req, data, size);
    if (rc == GW_OK) {
        req->partials++;
        if (req->partials == 1)
            s_execute (req, E_SENT);
        return 0;
    }
    if (rc == GW_AGAIN) {
        req->held = (char *)malloc (size ? size : 1);
        assert (req->held);
        memcpy (req->held, data, size);
        req->held_size = size;
        return 0;
    }
    if (s_drains (req)) {
        s_client_gone (req);
        return 0;
    }
    req->abort_cancel = true;
    return -1;
}

//  True if the event's JSON is an error object: {"error": ...}
static bool
s_is_error_event (const char *data, size_t size)
{
    const char *end = data + size;
    const char *p = s_skip_ws (data, end);
    if (p >= end || *p != '{')
        return false;
    p = s_skip_ws (p + 1, end);
    return end - p >= 7 && memcmp (p, "\"error\"", 7) == 0;
}

//  One upstream event. Returns 0, or -1 to stop the transfer (noted).
static int
s_on_event (s_request_t *req, gw_sse_event_t *event)
{
    if (req->done_seen)
        return 0;  //  nothing after [DONE] is forwarded
    if (s_streq (event->data, event->size, "[DONE]")) {
        req->done_seen = true;
        return s_emit (req, "data: [DONE]\n\n", 14);
    }
    if (streq (event->name, "error") || s_is_error_event (event->data, event->size)) {
        char message[256];
        zframe_t *body = s_error_from_provider (
            event->data, event->size, 200, message, sizeof (message));
        zframe_destroy (&body);
        s_note_failure (req, true, false, "stream error event: %s", message);
        return -1;
    }
    //  Usage: only chunks that carry a usage object are looked at closely.
    if (event->size > 12 && memmem (event->data, event->size, "\"usage\"", 7)) {
        const char *end = event->data + event->size;
        const char *usage = s_json_find_key (event->data, event->size, "usage");
        if (usage && *usage == '{' && s_usage_parse (usage, end, req->usage) == 0) {
            req->has_usage = true;
            const char *choices = s_json_find_key (event->data, event->size, "choices");
            bool usage_only = false;
            if (choices && *choices == '[') {
                const char *p = s_skip_ws (choices + 1, end);
                usage_only = p < end && *p == ']';
            }
            if (usage_only && !req->include_usage)
                return 0;
        }
    }
    //  About one completion token per chunk that carries text: the role
    //  chunk ("content":"") and usage chunks carry none.
    if (s_has_text (event->data, event->size))
        req->chunks++;
    if (event->wire)
        return s_emit (req, event->wire, event->wire_size);
    //  Multi-line data: one "data:" line per line.
    s_buf_t wire = {NULL, 0, 0};
    const char *p = event->data, *end = event->data + event->size;
    while (true) {
        const char *nl = (const char *)memchr (p, '\n', (size_t)(end - p));
        const char *stop = nl ? nl : end;
        s_buf_append (&wire, "data: ", 6);
        s_buf_append (&wire, p, (size_t)(stop - p));
        s_buf_append (&wire, "\n", 1);
        if (!nl)
            break;
        p = nl + 1;
    }
    s_buf_append (&wire, "\n", 1);
    int rc = wire.data ? s_emit (req, wire.data, wire.size) : -1;
    free (wire.data);
    return rc;
}

//  Pull events from the parser while nothing is held. Returns 0, or -1 to
//  stop the transfer (noted, or abort_cancel set).
static int
s_pump (s_request_t *req)
{
    gw_sse_event_t event;
    while (!req->held) {
        int rc = gw_sse_next (req->sse, &event);
        if (rc == 0)
            break;
        if (rc < 0) {
            s_note_failure (req, true, false,
                "malformed event stream (line or event larger than %zu bytes)",
                req->bridge->event_max);
            return -1;
        }
        if (s_on_event (req, &event))
            return -1;
    }
    return 0;
}

static size_t
s_on_write (char *data, size_t size, size_t nmemb, void *userp)
{
    s_request_t *req = (s_request_t *)userp;
    size_t bytes = size * nmemb;
    if (req->status == 0) {
        long code = 0;
        curl_easy_getinfo (req->easy, CURLINFO_RESPONSE_CODE, &code);
        req->status = code;
    }
    req->got_byte = true;
    if (req->stream && req->status >= 200 && req->status < 300) {
        if (req->held) {
            req->paused = true;
            return CURL_WRITEFUNC_PAUSE;
        }
        if (gw_sse_feed (req->sse, data, bytes)) {
            s_note_failure (req, true, false, "event stream buffer overflow");
            req->aborted_by_us = true;
            return 0;
        }
        if (s_pump (req)) {
            req->aborted_by_us = true;
            return 0;
        }
        return bytes;
    }
    if (req->status >= 200 && req->status < 300) {
        if (req->resp.size + bytes > req->bridge->body_max) {
            s_note_failure (req, false, false, "response larger than %zu bytes",
                req->bridge->body_max);
            req->aborted_by_us = true;
            return 0;
        }
    }
    else if (req->resp.size + bytes > ERROR_BODY_MAX) {
        size_t room = ERROR_BODY_MAX - req->resp.size;
        if (room)
            s_buf_append (&req->resp, data, room);
        return bytes;  //  keep the head of an error body, drop the rest
    }
    if (s_buf_append (&req->resp, data, bytes)) {
        s_note_failure (req, false, false, "out of memory for the response");
        req->aborted_by_us = true;
        return 0;
    }
    return bytes;
}

//  CREDIT arrived (or a transfer ended with events held): flush what the
//  window allows, then unpause the transfer or finish a draining request.
static void
s_flush (s_request_t *req)
{
    if (!req->stream || !req->sse)
        return;
    if (req->held) {
        int rc = s_partial (req, req->held, req->held_size);
        if (rc == GW_AGAIN)
            return;
        free (req->held);
        req->held = NULL;
        if (rc != GW_OK) {
            s_execute (req, E_CANCEL);  //  drains, or ends with 499
            return;
        }
        req->partials++;
    }
    if (s_pump (req)) {
        s_execute (req, req->abort_cancel ? E_CANCEL : E_FAILED);
        return;
    }
    if (req->held)
        return;
    if (req->state == S_DRAINING) {
        if (!req->done_seen)
            s_note_failure (req, true, false, "stream ended without [DONE]");
        s_execute (req, req->done_seen ? E_SUCCESS : E_FAILED);
        return;
    }
    if (req->paused && req->easy) {
        req->paused = false;
        CURLcode rc = curl_easy_pause (req->easy, CURLPAUSE_CONT);
        if (rc != CURLE_OK) {
            if (!req->aborted_by_us)
                s_note_failure (req, true, false, "transfer could not resume: %s",
                    curl_easy_strerror (rc));
            s_execute (req, req->abort_cancel ? E_CANCEL : E_FAILED);
        }
    }
}

//  A transfer finished (curl says done).
static void
s_transfer_done (s_request_t *req, CURLcode result)
{
    long status = req->status;
    if (!status)
        curl_easy_getinfo (req->easy, CURLINFO_RESPONSE_CODE, &status);
    req->status = status;
    s_transfer_detach (req, result != CURLE_OK);
    if (req->abort_cancel) {
        s_execute (req, E_CANCEL);
        return;
    }
    if (result != CURLE_OK) {
        if (!req->aborted_by_us) {
            bool timeout = result == CURLE_OPERATION_TIMEDOUT;
            s_note_failure (req, true, timeout, "%s%s%s", curl_easy_strerror (result),
                req->errbuf[0] ? ": " : "", req->errbuf);
        }
        s_execute (req, E_FAILED);
        return;
    }
    bool ok = status >= 200 && status < 300;
    if (ok && req->stream) {
        gw_sse_end (req->sse);
        if (s_pump (req)) {
            s_execute (req, req->abort_cancel ? E_CANCEL : E_FAILED);
            return;
        }
        if (req->held)
            s_execute (req, E_DRAIN);
        else if (req->done_seen)
            s_execute (req, E_SUCCESS);
        else {
            s_note_failure (req, true, false, "stream ended without [DONE]");
            s_execute (req, E_FAILED);
        }
        return;
    }
    if (ok) {
        const char *usage = s_json_find_key (req->resp.data, req->resp.size, "usage");
        if (usage && *usage == '{' &&
            s_usage_parse (usage, req->resp.data + req->resp.size, req->usage) == 0)
            req->has_usage = true;
        s_execute (req, E_SUCCESS);
        return;
    }
    char message[256];
    zframe_destroy (&req->last_error);
    req->last_error = s_error_from_provider (
        req->resp.data, req->resp.size, status, message, sizeof (message));
    if (status == 429 || status >= 500 || status < 200 ||
        (status >= 300 && status < 400)) {
        if (status == 429)
            req->attempts_429++;
        s_note_failure (
            req, true, false, "HTTP %ld%s%s", status, message[0] ? ": " : "", message);
        s_execute (req, E_FAILED);
    }
    else
        s_execute (req, E_REJECTED);
}

//  --------------------------------------------------------------------------
//  The state machine

static void
s_execute (s_request_t *req, s_event_t event)
{
    s_bridge_t *self = req->bridge;
    const s_transition_t *t = &s_table[req->state][event];
    if (!t->defined) {
        gw_warn ("bridge: event %s ignored in state %s", s_event_names[event],
            s_state_names[req->state]);
        return;
    }
    if (event == E_CANCEL && req->state != S_DRAINING && req->easy && s_drains (req)) {
        s_client_gone (req);  //  read on to the provider's usage
        return;
    }
    unsigned actions = t->actions;
    const char *channel = s_channel_id (req);
    int64_t now = gw_mono_ms ();
    if (actions & A_ABORT)
        s_transfer_detach (req, true);
    if ((actions & A_OK) && channel)
        gw_breaker_success (self->breakers, channel, now);
    if ((actions & A_FAIL) && channel) {
        if (req->fault)
            gw_breaker_failure (self->breakers, channel, now);
        else
            gw_breaker_release (self->breakers, channel, now);
    }
    if ((actions & A_RELEASE) && channel)
        gw_breaker_release (self->breakers, channel, now);
    if (actions & A_FINAL_OK) {
        zframe_t *body = NULL;
        if (!req->stream)
            body = zframe_new (req->resp.data, req->resp.size);
        s_final (req, 200, body, !req->stream);
    }
    if (actions & A_FINAL_PASS) {
        zframe_t *body = req->last_error;
        req->last_error = NULL;
        s_final (req, (uint16_t)req->status, body, false);
    }
    if (actions & A_FINAL_502) {
        char message[FAIL_MSG_MAX + 64];
        snprintf (
            message, sizeof (message), "upstream stream interrupted: %s", req->fail_msg);
        s_final_error (req, 502, "upstream_error", "stream_interrupted", message);
    }
    if (actions & A_FINAL_499) {
        self->n_cancels++;
        s_final (req, 499, NULL, false);
    }
    if (actions & A_FINAL_504)
        s_final_error (
            req, 504, "gateway_error", "deadline_exceeded", "request deadline passed");
    if (actions & A_RETRY)
        s_attempt_next (req);
    req->state = t->next;
    if (req->finished) {
        s_transfer_detach (req, true);
        zhashx_delete (self->requests, req->rid);
    }
}

//  --------------------------------------------------------------------------
//  Bus input

static void
s_on_request (s_bridge_t *self, gw_msg_t *msg)
{
    const uint8_t *rid = gw_msg_rid (msg);
    zframe_t *env_frame = gw_msg_envelope (msg);
    gw_envelope_t *env = s_envelope_get (self);
    if (!env_frame ||
        gw_envelope_decode (env, zframe_data (env_frame), zframe_size (env_frame))) {
        s_envelope_put (self, &env);
        gw_worker_error (self->worker, rid, 400, "invalid_request_error", "bad_envelope",
            "the request envelope is missing or malformed");
        return;
    }
    const char *op = gw_envelope_ann_str (env, "op");
    s_op_t kind;
    if (op && streq (op, "chat"))
        kind = OP_CHAT;
    else if (op && streq (op, "completions"))
        kind = OP_COMPLETIONS;
    else if (op && streq (op, "embeddings"))
        kind = OP_EMBEDDINGS;
    else {
        s_error_env (self, rid, env, 400, "invalid_request_error",
            "unsupported_operation",
            "the bridge serves chat, completions and embeddings");
        s_envelope_put (self, &env);
        return;
    }
    if (self->usage &&
        gw_usage_pending (self->usage) + zhashx_size (self->requests) >=
            self->spool_max) {
        //  Backpressure: every request taken must be able to spool its
        //  usage event, and billing is not keeping up (or is down).
        self->n_refused++;
        s_error_env (self, rid, env, 503, "api_error", "usage_spool_full",
            "the gateway cannot record usage right now (billing is behind); retry later");
        s_envelope_put (self, &env);
        return;
    }
    s_request_t *req = (s_request_t *)zmalloc (sizeof (s_request_t));
    assert (req);
    memcpy (req->rid, rid, 16);
    req->bridge = self;
    req->envelope = env;
    req->op = kind;
    req->channel = -1;
    req->t_in_us = gw_time_us ();
    msgpack_sbuffer_init (&req->upbody);
    req->stream = kind != OP_EMBEDDINGS && gw_envelope_stream (env) &&
        (gw_msg_flags (msg) & GW_REQUEST_STREAM);
    size_t raw_size = 0;
    const uint8_t *raw =
        (const uint8_t *)gw_envelope_ann_raw (env, "include_usage", &raw_size);
    req->include_usage = raw && raw_size == 1 && raw[0] == 0xc3;
    req->deadline = (int64_t)gw_msg_deadline (msg);
    if (!req->deadline)
        req->deadline = (int64_t)gw_envelope_deadline (env);
    req->body = gw_msg_take_body (msg);
    const void *plan = gw_envelope_ann_raw (env, "plan", &raw_size);
    const char *problem = NULL;
    uint16_t status = 400;
    const char *code = "bad_request";
    if (!plan || s_plan_parse (req, plan, raw_size) == 0) {
        problem = "no usable upstream channel in the plan (ann.plan)";
        status = 500;
        code = "no_plan";
    }
    else if (!req->body) {
        problem = "the request body is empty";
    }
    else {
        //  Validate the body once: later attempts only change the model.
        if (s_body_json (req, req->channels[0].model, &req->upbody))
            problem = "the request body must be a JSON object";
        else
            req->upbody_model = req->channels[0].model;
        req->prompt_est = (req->upbody.size + 3) / 4;
    }
    if (!problem && req->deadline && gw_time_ms () >= req->deadline) {
        problem = "request deadline passed";
        status = 504;
        code = "deadline_exceeded";
    }
    if (problem) {
        s_error_env (self, rid, req->envelope, status,
            status == 400 ? "invalid_request_error" : "gateway_error", code, problem);
        s_request_destroy (&req);
        return;
    }
    zhashx_insert (self->requests, req->rid, req);
    s_attempt_next (req);
    if (req->finished)
        zhashx_delete (self->requests, req->rid);
}

static void
s_on_message (s_bridge_t *self, gw_msg_t *msg)
{
    int id = gw_msg_id (msg);
    if (id == GW_MSG_REQUEST) {
        s_on_request (self, msg);
        return;
    }
    s_request_t *req = (s_request_t *)zhashx_lookup (self->requests, gw_msg_rid (msg));
    if (!req) {
        if (id == GW_MSG_CANCEL)  //  answer anyway: the session frees its credit
            gw_worker_final (self->worker, gw_msg_rid (msg), 499, NULL, NULL);
        return;
    }
    if (id == GW_MSG_CANCEL)
        s_execute (req, E_CANCEL);
    else if (id == GW_MSG_CREDIT)
        s_flush (req);
}

//  Deadlines, first-byte timeouts of streams, requests the session forgot
//  (a reconnect abandons them).
static void
s_sweep (s_bridge_t *self)
{
    int64_t now = gw_time_ms ();
    int64_t mono = gw_mono_ms ();
    zlistx_t *due = NULL;
    s_request_t *req = (s_request_t *)zhashx_first (self->requests);
    while (req) {
        bool expired = req->deadline && now >= req->deadline;
        bool forgotten =
            !req->client_gone && gw_worker_cancelled (self->worker, req->rid);
        bool slow = req->stream && req->state == S_ATTEMPT && req->easy &&
            !req->got_byte &&
            mono - req->attempt_at >= req->channels[req->channel].timeout_ms;
        if (expired || forgotten || slow) {
            if (!due)
                due = zlistx_new ();
            zlistx_add_end (due, req);
        }
        req = (s_request_t *)zhashx_next (self->requests);
    }
    if (!due)
        return;
    req = (s_request_t *)zlistx_first (due);
    while (req) {
        if (req->deadline && now >= req->deadline)
            s_execute (req, E_EXPIRED);
        else if (!req->client_gone && gw_worker_cancelled (self->worker, req->rid))
            s_execute (req, E_CANCEL);
        else {
            s_note_failure (req, true, true, "no response within %u ms",
                req->channels[req->channel].timeout_ms);
            s_execute (req, E_FAILED);
        }
        req = (s_request_t *)zlistx_next (due);
    }
    zlistx_destroy (&due);
}

//  --------------------------------------------------------------------------
//  curl's socket and timer callbacks

static int
s_curl_socket (CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    s_bridge_t *self = (s_bridge_t *)userp;
    s_sock_t *sock = (s_sock_t *)socketp;
    if (what == CURL_POLL_REMOVE) {
        if (sock) {
            s_sock_t *last = self->socks[--self->sock_count];
            if (last != sock) {
                self->socks[sock->index] = last;
                last->index = sock->index;
            }
            free (sock);
        }
        return 0;
    }
    if (!sock) {
        if (self->sock_count == self->sock_cap) {
            size_t cap = self->sock_cap ? self->sock_cap * 2 : 64;
            s_sock_t **grown =
                (s_sock_t **)realloc (self->socks, cap * sizeof (s_sock_t *));
            assert (grown);
            self->socks = grown;
            self->sock_cap = cap;
        }
        sock = (s_sock_t *)zmalloc (sizeof (s_sock_t));
        assert (sock);
        sock->fd = fd;
        sock->index = self->sock_count;
        self->socks[self->sock_count++] = sock;
        curl_multi_assign (self->multi, fd, sock);
    }
    sock->what = what;
    return 0;
}

static int
s_curl_timer (CURLM *multi, long timeout_ms, void *userp)
{
    s_bridge_t *self = (s_bridge_t *)userp;
    self->timer_at = timeout_ms < 0 ? -1 : gw_mono_ms () + timeout_ms;
    return 0;
}

static void
s_reap (s_bridge_t *self)
{
    CURLMsg *info;
    int left;
    while ((info = curl_multi_info_read (self->multi, &left))) {
        if (info->msg != CURLMSG_DONE)
            continue;
        s_request_t *req = NULL;
        curl_easy_getinfo (info->easy_handle, CURLINFO_PRIVATE, (char **)&req);
        CURLcode result = info->data.result;
        if (req && req->easy == info->easy_handle)
            s_transfer_done (req, result);
        else  //  cannot happen: every easy handle we add belongs to a request
            curl_multi_remove_handle (self->multi, info->easy_handle);
    }
}

//  --------------------------------------------------------------------------
//  Actor

static s_bridge_t *
s_bridge_new (zsock_t *pipe)
{
    s_bridge_t *self = (s_bridge_t *)zmalloc (sizeof (s_bridge_t));
    assert (self);
    self->pipe = pipe;
    self->capacity = 1024;
    self->breaker_failures = 3;
    self->breaker_cooldown = 30000;
    self->maxconnects = 256;
    self->connect_timeout = 5000;
    self->body_max = GW_BODY_MAX_DEFAULT;
    self->event_max = 1024 * 1024;
    self->timer_at = -1;
    self->billing = true;
    self->spool_dir = strdup ("var/spool");
    self->spool_max = 100000;
    self->billing_service = strdup ("billing");
    self->requests = gw_rid_map_new (s_request_free);
    self->breakers = gw_breaker_new (self->breaker_failures, self->breaker_cooldown);
    self->multi = curl_multi_init ();
    assert (self->multi);
    curl_multi_setopt (self->multi, CURLMOPT_SOCKETFUNCTION, s_curl_socket);
    curl_multi_setopt (self->multi, CURLMOPT_SOCKETDATA, self);
    curl_multi_setopt (self->multi, CURLMOPT_TIMERFUNCTION, s_curl_timer);
    curl_multi_setopt (self->multi, CURLMOPT_TIMERDATA, self);
    curl_multi_setopt (self->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    curl_multi_setopt (self->multi, CURLMOPT_MAXCONNECTS, self->maxconnects);
    return self;
}

static void
s_bridge_destroy (s_bridge_t **self_p)
{
    s_bridge_t *self = *self_p;
    if (!self)
        return;
    s_request_t *req = (s_request_t *)zhashx_first (self->requests);
    while (req) {
        s_transfer_detach (req, true);
        req = (s_request_t *)zhashx_next (self->requests);
    }
    zhashx_destroy (&self->requests);
    while (self->pool_size)
        curl_easy_cleanup (self->pool[--self->pool_size]);
    while (self->envelope_count)
        gw_envelope_destroy (&self->envelopes[--self->envelope_count]);
    curl_multi_cleanup (self->multi);  //  closes sockets: REMOVE callbacks
    for (size_t i = 0; i < self->sock_count; i++)
        free (self->socks[i]);
    free (self->socks);
    free (self->items);
    gw_breaker_destroy (&self->breakers);
    gw_worker_destroy (&self->worker);
    gw_usage_destroy (&self->usage);
    free (self->spool_dir);
    free (self->billing_service);
    free (self);
    *self_p = NULL;
}

static int
s_configure (s_bridge_t *self, const char *key, const char *value)
{
    if (!key || !value || !*value)
        return -1;
    if (streq (key, "disconnect")) {
        if (!streq (value, "cancel") && !streq (value, "drain"))
            return -1;
        self->drain = streq (value, "drain");
        return 0;
    }
    if (streq (key, "spool_dir")) {
        if (strlen (value) > 512)
            return -1;
        free (self->spool_dir);
        self->spool_dir = strdup (value);
        return 0;
    }
    if (streq (key, "billing_service")) {
        if (!gw_msg_service_valid (value, strlen (value)))
            return -1;
        free (self->billing_service);
        self->billing_service = strdup (value);
        return 0;
    }
    char *end = NULL;
    long long number = strtoll (value, &end, 10);
    if (*end || number < 0)
        return -1;
    if (streq (key, "capacity") && number >= 1 && number <= 65535)
        self->capacity = (uint32_t)number;
    else if (streq (key, "breaker_failures") && number >= 1 && number <= 1000000) {
        self->breaker_failures = (uint32_t)number;
        gw_breaker_destroy (&self->breakers);
        self->breakers = gw_breaker_new (self->breaker_failures, self->breaker_cooldown);
    }
    else if (streq (key, "breaker_cooldown_ms") && number >= 1 && number <= 86400000) {
        self->breaker_cooldown = number;
        gw_breaker_destroy (&self->breakers);
        self->breakers = gw_breaker_new (self->breaker_failures, self->breaker_cooldown);
    }
    else if (streq (key, "maxconnects") && number >= 1 && number <= 100000) {
        self->maxconnects = (long)number;
        curl_multi_setopt (self->multi, CURLMOPT_MAXCONNECTS, self->maxconnects);
    }
    else if (streq (key, "connect_timeout_ms") && number >= 1 && number <= 600000)
        self->connect_timeout = (long)number;
    else if (streq (key, "body_max") && number >= 1024 && number <= (1LL << 32))
        self->body_max = (size_t)number;
    else if (streq (key, "event_max") && number >= 1024 && number <= (1LL << 28))
        self->event_max = (size_t)number;
    else if (streq (key, "heartbeat") && number >= 10 && number <= 60000)
        self->heartbeat = (int)number;
    else if (streq (key, "expiry") && number >= 20 && number <= 600000)
        self->expiry = (int)number;
    else if (streq (key, "billing") && number <= 1)
        self->billing = number == 1;
    else if (streq (key, "spool_max") && number >= 1 && number <= 10000000)
        self->spool_max = (size_t)number;
    else if (streq (key, "spool_fsync") && number <= 1)
        self->spool_fsync = number == 1;
    else
        return -1;
    return 0;
}

static void
s_pipe_command (s_bridge_t *self)
{
    zmsg_t *msg = zmsg_recv (self->pipe);
    if (!msg) {
        self->terminated = true;
        return;
    }
    char *command = zmsg_popstr (msg);
    char *arg1 = zmsg_popstr (msg);
    char *arg2 = zmsg_popstr (msg);
    if (!command)
        ;
    else if (streq (command, "$TERM"))
        self->terminated = true;
    else if (streq (command, "CONFIGURE"))
        zsock_signal (self->pipe, s_configure (self, arg1, arg2) ? 1 : 0);
    else if (streq (command, "CONNECT")) {
        if (!self->worker && arg1)
            self->worker = gw_worker_new (arg1, "bridge", self->capacity, 0);
        if (self->worker && self->heartbeat && self->expiry)
            gw_worker_set_heartbeat (self->worker, self->heartbeat, self->expiry);
        if (self->worker && self->billing && !self->usage) {
            //  Money must not be lost: no spool, no bridge.
            self->usage = gw_usage_new (
                arg1, self->billing_service, self->spool_dir, "bridge", self->spool_max);
            if (self->usage) {
                gw_usage_set_fsync (self->usage, self->spool_fsync);
                if (self->heartbeat && self->expiry)
                    gw_usage_set_heartbeat (self->usage, self->heartbeat, self->expiry);
            }
            else
                gw_worker_destroy (&self->worker);
        }
        zsock_signal (self->pipe, self->worker ? 0 : 1);
    }
    else if (streq (command, "VERBOSE"))
        self->verbose = true;
    else if (streq (command, "STATS")) {
        size_t held = 0, paused = 0;
        s_request_t *req = (s_request_t *)zhashx_first (self->requests);
        while (req) {
            held += req->held != NULL;
            paused += req->paused;
            req = (s_request_t *)zhashx_next (self->requests);
        }
        char usage[256] = "pending=0";
        if (self->usage)
            gw_usage_stats (self->usage, usage, sizeof (usage));
        zstr_sendf (self->pipe,
            "inflight=%zu transfers=%d held=%zu paused=%zu attempts=%" PRIu64
            " retries=%" PRIu64 " cancels=%" PRIu64 " sockets=%zu pool=%zu breakers=%zu"
            " events=%" PRIu64 " event_errors=%" PRIu64 " refused=%" PRIu64 " usage:%s",
            zhashx_size (self->requests), self->running, held, paused, self->n_attempts,
            self->n_retries, self->n_cancels, self->sock_count, self->pool_size,
            gw_breaker_size (self->breakers), self->n_events, self->n_event_errors,
            self->n_refused, usage);
    }
    else
        gw_warn ("bridge: unknown command %s", command);
    zstr_free (&command);
    zstr_free (&arg1);
    zstr_free (&arg2);
    zmsg_destroy (&msg);
}

//  Build the poll set: pipe, worker socket, curl's sockets. Returns count.
static size_t
s_poll_set (s_bridge_t *self)
{
    size_t need = self->sock_count + 3;
    if (need > self->item_cap) {
        size_t cap = self->item_cap ? self->item_cap : 64;
        while (cap < need)
            cap *= 2;
        zmq_pollitem_t *grown =
            (zmq_pollitem_t *)realloc (self->items, cap * sizeof (*grown));
        assert (grown);
        self->items = grown;
        self->item_cap = cap;
    }
    zmq_pollitem_t *items = self->items;
    items[0] = (zmq_pollitem_t){zsock_resolve (self->pipe), 0, ZMQ_POLLIN, 0};
    size_t count = 1;
    if (self->worker)
        items[count++] = (zmq_pollitem_t){
            zsock_resolve (gw_worker_socket (self->worker)), 0, ZMQ_POLLIN, 0};
    if (self->usage)
        items[count++] = (zmq_pollitem_t){
            zsock_resolve (gw_usage_socket (self->usage)), 0, ZMQ_POLLIN, 0};
    for (size_t i = 0; i < self->sock_count; i++) {
        s_sock_t *sock = self->socks[i];
        short events = 0;
        if (sock->what & CURL_POLL_IN)
            events |= ZMQ_POLLIN;
        if (sock->what & CURL_POLL_OUT)
            events |= ZMQ_POLLOUT;
        items[count++] = (zmq_pollitem_t){NULL, sock->fd, events, 0};
    }
    return count;
}

static long
s_poll_timeout (s_bridge_t *self, int64_t now)
{
    int64_t timeout = 1000;
    if (self->worker) {
        int worker = gw_worker_timeout (self->worker);
        if (worker < timeout)
            timeout = worker;
    }
    if (self->usage) {
        int usage = gw_usage_timeout (self->usage);
        if (usage < timeout)
            timeout = usage;
    }
    if (self->timer_at >= 0 && self->timer_at - now < timeout)
        timeout = self->timer_at - now;
    if (zhashx_size (self->requests) && self->sweep_at - now < timeout)
        timeout = self->sweep_at - now;
    return timeout < 0 ? 0 : (long)timeout;
}

void
gw_bridge_actor (zsock_t *pipe, void *args)
{
    gw_thread_name ("aigw-bridge");
    s_bridge_t *self = s_bridge_new (pipe);
    zsock_signal (pipe, 0);
    while (!self->terminated) {
        size_t count = s_poll_set (self);
        int first_sock = 1 + (self->worker != NULL) + (self->usage != NULL);
        int rc = zmq_poll (self->items, (int)count, s_poll_timeout (self, gw_mono_ms ()));
        if (rc < 0 && zmq_errno () != EINTR)
            break;  //  context terminated
        if (rc > 0 && (self->items[0].revents & ZMQ_POLLIN)) {
            s_pipe_command (self);
            if (self->terminated)
                break;
        }
        if (rc > 0) {
            for (size_t i = (size_t)first_sock; i < count; i++) {
                short revents = self->items[i].revents;
                if (!revents)
                    continue;
                int mask = 0;
                if (revents & ZMQ_POLLIN)
                    mask |= CURL_CSELECT_IN;
                if (revents & ZMQ_POLLOUT)
                    mask |= CURL_CSELECT_OUT;
                if (revents & ZMQ_POLLERR)
                    mask |= CURL_CSELECT_ERR;
                curl_multi_socket_action (
                    self->multi, self->items[i].fd, mask, &self->running);
            }
        }
        if (self->timer_at >= 0 && gw_mono_ms () >= self->timer_at) {
            self->timer_at = -1;
            curl_multi_socket_action (
                self->multi, CURL_SOCKET_TIMEOUT, 0, &self->running);
        }
        s_reap (self);
        if (self->worker) {
            gw_msg_t *msg;
            while ((msg = gw_worker_recv (self->worker))) {
                s_on_message (self, msg);
                gw_msg_destroy (&msg);
            }
            gw_worker_tick (self->worker);
            s_reap (self);
            if (self->usage)
                gw_usage_run (self->usage);
            int64_t now = gw_mono_ms ();
            if (now >= self->sweep_at) {
                self->sweep_at = now + SWEEP_MS;
                if (zhashx_size (self->requests))
                    s_sweep (self);
            }
        }
    }
    s_bridge_destroy (&self);
}

//  --------------------------------------------------------------------------
//  Start the bridge configured from the environment (aigw-bridge's
//  variables) and connect it to bus. NULL after logging why.

zactor_t *
gw_bridge_launch (const char *bus, bool verbose)
{
    zactor_t *bridge = zactor_new (gw_bridge_actor, NULL);
    assert (bridge);
    if (verbose)
        zstr_send (bridge, "VERBOSE");
    int rc = 0;
    rc |= gw_actor_configure_int (
        bridge, "capacity", gw_env_int ("AIGW_BRIDGE_CAPACITY", 1024, 1, 65535));
    rc |= gw_actor_configure_int (
        bridge, "maxconnects", gw_env_int ("AIGW_BRIDGE_MAXCONNECTS", 256, 1, 100000));
    rc |= gw_actor_configure_int (bridge, "connect_timeout_ms",
        gw_env_int ("AIGW_BRIDGE_CONNECT_TIMEOUT_MS", 5000, 1, 600000));
    rc |= gw_actor_configure_int (
        bridge, "breaker_failures", gw_env_int ("AIGW_BREAKER_FAILURES", 3, 1, 1000000));
    rc |= gw_actor_configure_int (bridge, "breaker_cooldown_ms",
        gw_env_int ("AIGW_BREAKER_COOLDOWN_MS", 30000, 1, 86400000));
    rc |= gw_actor_configure_session (bridge);
    rc |=
        gw_actor_configure_int (bridge, "billing", gw_env_int ("AIGW_BILLING", 1, 0, 1));
    rc |= gw_actor_configure_int (
        bridge, "spool_max", gw_env_int ("AIGW_SPOOL_MAX", 100000, 1, 10000000));
    rc |= gw_actor_configure_int (
        bridge, "spool_fsync", gw_env_int ("AIGW_SPOOL_FSYNC", 0, 0, 1));
    const char *names[] = {"spool_dir", "disconnect"};
    const char *values[] = {
        gw_env ("AIGW_SPOOL_DIR", "var/spool"), gw_env ("AIGW_DISCONNECT", "cancel")};
    for (int i = 0; i < 2; i++)
        rc |= gw_actor_configure (bridge, names[i], values[i]);
    if (rc) {
        zactor_destroy (&bridge);
        return NULL;
    }
    return gw_actor_connect (bridge, bus, "bridge");
}

//  --------------------------------------------------------------------------
//  Self test: unit checks of the JSON helpers, then broker actor + bridge
//  actor + gw_client + two mock providers (tests/mock_provider.py).

#include "gw_broker.h"
#include <sys/prctl.h>
#include <sys/wait.h>

typedef struct {
    pid_t pid;  //  mock process
    int port;  //  its port
    char port_file[96];  //  where it wrote the port
} s_mock_t;

static void
s_mock_start (s_mock_t *mock, int index)
{
    const char *script = "tests/mock_provider.py";
    if (access (script, R_OK))
        script = "../tests/mock_provider.py";
    assert (access (script, R_OK) == 0);  //  run the selftest from the repository root
    snprintf (mock->port_file, sizeof (mock->port_file),
        "/tmp/aigw-bridge-mock-%d-%d.port", (int)getpid (), index);
    unlink (mock->port_file);
    char *argv[] = {(char *)"/usr/bin/python3", (char *)script, (char *)"--port",
        (char *)"0", (char *)"--port-file", mock->port_file, (char *)"--api-key",
        (char *)"sk-test", NULL};
    //  fork + exec rather than posix_spawn: the mock must die with us even
    //  when an assertion aborts the test (PR_SET_PDEATHSIG).
    pid_t parent = getpid ();
    mock->pid = fork ();
    assert (mock->pid >= 0);
    if (mock->pid == 0) {
        prctl (PR_SET_PDEATHSIG, SIGTERM);
        if (getppid () != parent)
            _exit (1);
        int devnull = open ("/dev/null", O_WRONLY);
        if (devnull >= 0) {
            dup2 (devnull, STDOUT_FILENO);
            close (devnull);
        }
        execv (argv[0], argv);
        _exit (127);
    }
    mock->port = 0;
    for (int i = 0; i < 500 && !mock->port; i++) {
        FILE *file = fopen (mock->port_file, "r");
        if (file) {
            if (fscanf (file, "%d", &mock->port) != 1)
                mock->port = 0;
            fclose (file);
        }
        if (!mock->port)
            zclock_sleep (20);
    }
    assert (mock->port > 0);
}

static void
s_mock_stop (s_mock_t *mock)
{
    kill (mock->pid, SIGTERM);
    waitpid (mock->pid, NULL, 0);
    unlink (mock->port_file);
}

static size_t
s_test_write (char *data, size_t size, size_t nmemb, void *userp)
{
    s_buf_append ((s_buf_t *)userp, data, size * nmemb);
    return size * nmemb;
}

//  Blocking HTTP call to the mock's control API. Returns the body (caller
//  frees), NUL-terminated.
static char *
s_http (s_mock_t *mock, const char *path, const char *json)
{
    char url[128];
    snprintf (url, sizeof (url), "http://127.0.0.1:%d%s", mock->port, path);
    s_buf_t buf = {NULL, 0, 0};
    CURL *easy = curl_easy_init ();
    curl_easy_setopt (easy, CURLOPT_URL, url);
    curl_easy_setopt (easy, CURLOPT_WRITEFUNCTION, s_test_write);
    curl_easy_setopt (easy, CURLOPT_WRITEDATA, &buf);
    curl_easy_setopt (easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt (easy, CURLOPT_TIMEOUT_MS, 5000L);
    if (json)
        curl_easy_setopt (easy, CURLOPT_POSTFIELDS, json);
    CURLcode rc = curl_easy_perform (easy);
    assert (rc == CURLE_OK);
    curl_easy_cleanup (easy);
    s_buf_append (&buf, "", 1);
    return buf.data;
}

static void
s_mock_config (s_mock_t *mock, const char *json)
{
    free (s_http (mock, "/_mock/reset", "{}"));
    if (json)
        free (s_http (mock, "/_mock/config", json));
}

//  JSON text -> msgpack frame.
static zframe_t *
s_pack_json (const char *json)
{
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    int rc = gw_json_to_msgpack (json, strlen (json), &pk, NULL, NULL);
    assert (rc == 0);
    zframe_t *frame = zframe_new (sbuf.data, sbuf.size);
    msgpack_sbuffer_destroy (&sbuf);
    return frame;
}

typedef struct {
    const char *op;  //  ann.op
    const char *plan;  //  ann.plan as JSON
    const char *body;  //  request body as JSON
    bool stream;  //  stream flag (envelope + REQUEST)
    bool include_usage;  //  ann.include_usage
    uint32_t window;  //  stream window, 0 = unlimited
    int64_t deadline;  //  unix ms, 0 = now + 10 s
    bool limits;  //  tenant, ann.rl and ann.headers as ratelimit writes them
} s_call_t;

typedef struct {
    uint8_t rid[16];  //  request id (s_call)
    zlistx_t *partials;  //  payloads (char *, NUL-terminated)
    gw_envelope_t *head;  //  envelope of the first PARTIAL, or NULL
    uint16_t status;  //  FINAL status, 0 if none
    gw_envelope_t *envelope;  //  FINAL envelope
    char *body;  //  FINAL body: JSON text (json ctype or converted msgpack)
} s_result_t;

static void
s_result_clear (s_result_t *result)
{
    if (result->partials) {
        char *item = (char *)zlistx_first (result->partials);
        while (item) {
            free (item);
            item = (char *)zlistx_next (result->partials);
        }
        zlistx_destroy (&result->partials);
    }
    gw_envelope_destroy (&result->envelope);
    gw_envelope_destroy (&result->head);
    free (result->body);
    memset (result, 0, sizeof (*result));
}

static void
s_send_call (gw_client_t *client, const s_call_t *call, uint8_t rid[16])
{
    gw_rid_new (rid);
    gw_envelope_t *env = gw_envelope_new ();
    gw_envelope_set_rid (env, rid);
    gw_envelope_slip_append (env, "router");
    gw_envelope_slip_append (env, "bridge");
    gw_envelope_set_cursor (env, 1);
    gw_envelope_set_stream (env, call->stream);
    gw_envelope_set_ann_str (env, "op", call->op ? call->op : "chat");
    zframe_t *plan = s_pack_json (call->plan);
    assert (gw_envelope_set_ann_raw (
                env, "plan", zframe_data (plan), zframe_size (plan)) == 0);
    zframe_destroy (&plan);
    gw_envelope_set_ann_raw (
        env, "include_usage", call->include_usage ? "\xc3" : "\xc2", 1);
    if (call->limits) {
        gw_envelope_set_model (env, "alias");
        gw_envelope_set_tenant_str (env, "key", "ab12cd34");
        gw_envelope_set_tenant_str (env, "user", "alice");
        zframe_t *rl = s_pack_json ("{\"hold\":309,\"est_tokens\":106,\"lease\":true,"
                                    "\"scopes\":[\"key:ab12cd34\"]}");
        gw_envelope_set_ann_raw (env, "rl", zframe_data (rl), zframe_size (rl));
        zframe_destroy (&rl);
        zframe_t *headers = s_pack_json ("{\"x-ratelimit-remaining-requests\":\"9\"}");
        gw_envelope_set_ann_raw (
            env, "headers", zframe_data (headers), zframe_size (headers));
        zframe_destroy (&headers);
    }
    int64_t deadline = call->deadline ? call->deadline : gw_time_ms () + 10000;
    gw_envelope_set_deadline (env, (uint64_t)deadline);
    zframe_t *envelope = gw_envelope_encode (env);
    gw_envelope_destroy (&env);
    zframe_t *body = s_pack_json (call->body);
    gw_msg_t *msg = gw_msg_new (GW_MSG_REQUEST);
    gw_msg_set_rid (msg, rid);
    gw_msg_set_service (msg, "bridge");
    gw_msg_set_deadline (msg, (uint64_t)deadline);
    gw_msg_set_window (msg, call->window);
    gw_msg_set_flags (msg, call->stream ? GW_REQUEST_STREAM : 0);
    gw_msg_set_envelope (msg, &envelope);
    gw_msg_set_body (msg, &body);
    int rc = gw_client_send (client, &msg);
    assert (rc == 0);
}

//  Collect PARTIALs and the FINAL for the request, for at most timeout_ms
//  (stops at the FINAL).
static void
s_collect (gw_client_t *client, const uint8_t rid[16], s_result_t *result, int timeout_ms)
{
    if (!result->partials)
        result->partials = zlistx_new ();
    int64_t end = gw_mono_ms () + timeout_ms;
    while (!result->status) {
        int64_t left = end - gw_mono_ms ();
        if (left <= 0)
            break;
        gw_msg_t *msg = gw_client_wait (client, (int)left);
        if (!msg)
            continue;
        if (memcmp (gw_msg_rid (msg), rid, 16) == 0) {
            if (gw_msg_id (msg) == GW_MSG_PARTIAL) {
                zframe_t *head = gw_msg_envelope (msg);
                if (head && zlistx_size (result->partials) == 0) {
                    result->head = gw_envelope_new ();
                    assert (gw_envelope_decode (result->head, zframe_data (head),
                                zframe_size (head)) == 0);
                }
                else
                    assert (!head);  //  only the first PARTIAL has one
                zframe_t *payload = gw_msg_body (msg);
                zlistx_add_end (
                    result->partials, payload ? zframe_strdup (payload) : strdup (""));
            }
            else if (gw_msg_id (msg) == GW_MSG_FINAL) {
                result->status = gw_msg_status (msg);
                result->envelope = gw_envelope_new ();
                zframe_t *env = gw_msg_envelope (msg);
                if (env && zframe_size (env) &&
                    gw_envelope_decode (
                        result->envelope, zframe_data (env), zframe_size (env))) {
                    printf ("FINAL %u: bad envelope (%zu bytes)\n", result->status,
                        zframe_size (env));
                    assert (false);
                }
                zframe_t *body = gw_msg_body (msg);
                const char *ctype = gw_envelope_ann_str (result->envelope, "ctype");
                if (body && zframe_size (body) && ctype && streq (ctype, "json"))
                    result->body = zframe_strdup (body);
                else if (body && zframe_size (body)) {
                    msgpack_sbuffer sbuf;
                    msgpack_sbuffer_init (&sbuf);
                    assert (gw_json_from_msgpack (zframe_data (body), zframe_size (body),
                                &sbuf, 16, NULL) == 0);
                    msgpack_sbuffer_write (&sbuf, "", 1);
                    result->body = strdup (sbuf.data);
                    msgpack_sbuffer_destroy (&sbuf);
                }
                else
                    result->body = strdup ("");
            }
        }
        gw_msg_destroy (&msg);
    }
}

static void
s_call (gw_client_t *client, const s_call_t *call, s_result_t *result)
{
    uint8_t rid[16];
    s_send_call (client, call, rid);
    s_collect (client, rid, result, 8000);
    memcpy (result->rid, rid, 16);
    assert (result->status);
}

//  Fake billing: acknowledges every usage event (or answers 503 while told
//  to), keeps a summary per event rid; "GET <hex>" answers it ("" if none),
//  "MODE <status>" sets the answer.
static void
s_billing_actor (zsock_t *pipe, void *args)
{
    gw_worker_t *worker = gw_worker_new ((const char *)args, "billing.bt", 64, 0);
    assert (worker);
    zhashx_t *events = zhashx_new ();
    zhashx_set_destructor (events, (zhashx_destructor_fn *)zstr_free);
    int mode = 200;
    zsock_signal (pipe, 0);
    while (true) {
        zmq_pollitem_t items[] = {{zsock_resolve (pipe), 0, ZMQ_POLLIN, 0},
            {zsock_resolve (gw_worker_socket (worker)), 0, ZMQ_POLLIN, 0}};
        zmq_poll (items, 2, gw_worker_timeout (worker));
        if (items[0].revents & ZMQ_POLLIN) {
            char *command = NULL, *arg = NULL;
            zstr_recvx (pipe, &command, &arg, NULL);
            bool term = !command || streq (command, "$TERM");
            if (command && streq (command, "GET")) {
                const char *summary =
                    arg ? (const char *)zhashx_lookup (events, arg) : NULL;
                zstr_send (pipe, summary ? summary : "");
            }
            else if (command && streq (command, "MODE") && arg)
                mode = atoi (arg);
            zstr_free (&command);
            zstr_free (&arg);
            if (term)
                break;
        }
        gw_worker_tick (worker);
        gw_msg_t *msg;
        while ((msg = gw_worker_recv (worker))) {
            if (gw_msg_id (msg) == GW_MSG_REQUEST && mode != 200)
                gw_worker_error (
                    worker, gw_msg_rid (msg), (uint16_t)mode, NULL, NULL, "x");
            else if (gw_msg_id (msg) == GW_MSG_REQUEST) {
                zframe_t *body = gw_msg_body (msg);
                char hex[33] = "";
                uint64_t fields[3] = {0, 0, 0};  //  status, prompt, completion
                bool estimated = false;
                char channel[64] = "-", user[64] = "-";
                gw_mreader_t reader;
                gw_mvalue_t map, key, value;
                gw_mreader_init (&reader, zframe_data (body), zframe_size (body));
                assert (gw_mreader_next (&reader, &map) == 0 && map.type == GW_MP_MAP);
                for (uint32_t i = 0; i < map.v.count; i++) {
                    const uint8_t *at;
                    assert (gw_mreader_next (&reader, &key) == 0);
                    at = reader.pos;
                    assert (gw_mreader_next (&reader, &value) == 0);
                    if (value.type == GW_MP_ARRAY || value.type == GW_MP_MAP) {
                        reader.pos = at;
                        assert (gw_mreader_skip (&reader, 8) == 0);
                    }
                    if (gw_mvalue_streq (&key, "rid") && value.type == GW_MP_BIN)
                        gw_rid_hex ((const uint8_t *)value.ptr, hex);
                    else if (gw_mvalue_streq (&key, "status"))
                        fields[0] = value.v.u;
                    else if (gw_mvalue_streq (&key, "prompt_tokens"))
                        fields[1] = value.v.u;
                    else if (gw_mvalue_streq (&key, "completion_tokens"))
                        fields[2] = value.v.u;
                    else if (gw_mvalue_streq (&key, "estimated"))
                        estimated = value.v.b;
                    else if (gw_mvalue_streq (&key, "channel"))
                        snprintf (channel, sizeof (channel), "%.*s", (int)value.size,
                            value.ptr);
                    else if (gw_mvalue_streq (&key, "user"))
                        snprintf (
                            user, sizeof (user), "%.*s", (int)value.size, value.ptr);
                }
                char *summary = zsys_sprintf ("status=%" PRIu64 " prompt=%" PRIu64
                                              " completion=%" PRIu64
                                              " estimated=%d channel=%s user=%s",
                    fields[0], fields[1], fields[2], estimated, channel, user);
                zhashx_update (events, hex, summary);
                gw_worker_final (worker, gw_msg_rid (msg), 200, NULL, NULL);
            }
            gw_msg_destroy (&msg);
        }
    }
    zhashx_destroy (&events);
    gw_worker_destroy (&worker);
}

//  The fake billing's summary of the usage event of rid, waiting up to 3 s
//  for it (caller frees; "" if none came).
static char *
s_event_of (zactor_t *billing, const uint8_t rid[16])
{
    char hex[33];
    gw_rid_hex (rid, hex);
    int64_t end = gw_mono_ms () + 3000;
    while (true) {
        zstr_sendx (billing, "GET", hex, NULL);
        char *summary = zstr_recv (billing);
        if (*summary || gw_mono_ms () >= end)
            return summary;
        zstr_free (&summary);
        zclock_sleep (10);
    }
}

static uint64_t
s_usage_of (s_result_t *result, const char *key)
{
    size_t size = 0;
    const void *raw = gw_envelope_ann_raw (result->envelope, "usage", &size);
    assert (raw);
    gw_mreader_t reader;
    gw_mreader_init (&reader, raw, size);
    gw_mvalue_t value;
    assert (gw_mreader_find (&reader, key) == 0);
    assert (gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_UINT);
    return value.v.u;
}

static const char *
s_channel_of (s_result_t *result)
{
    const char *channel = gw_envelope_ann_str (result->envelope, "channel");
    return channel ? channel : "";
}

static char *
s_stats (zactor_t *bridge)
{
    zstr_send (bridge, "STATS");
    return zstr_recv (bridge);
}

static void
s_unit_tests (void)
{
    //  s_json_find_key: real keys only, last one wins, escapes respected
    const char *json =
        "{\"text\":\"say \\\"usage\\\": {\\\"x\\\":1}\",\"usage\" : {\"a\":1}}";
    const char *v = s_json_find_key (json, strlen (json), "usage");
    assert (v && *v == '{' && v[1] == '"');
    json = "{\"a\":\"\\\\\",\"usage\":null}";
    v = s_json_find_key (json, strlen (json), "usage");
    assert (v && *v == 'n');
    json = "{\"a\":\"x\\\"usage\\\":{}\"}";
    assert (s_json_find_key (json, strlen (json), "usage") == NULL);
    assert (s_json_find_key ("\"usage\"", 7, "usage") == NULL);
    assert (s_json_find_key ("", 0, "usage") == NULL);
    //  s_usage_parse
    uint64_t usage[4];
    json = "{\"prompt_tokens\":2,\"completion_tokens\":5,\"total_tokens\":7,"
           "\"details\":{\"cached\":[1,2]}} trailing";
    assert (s_usage_parse (json, json + strlen (json), usage) == 0);
    assert (usage[0] == 2 && usage[1] == 5 && usage[2] == 7 && usage[3] == 0);
    json = "{\"prompt_tokens\":20,\"prompt_tokens_details\":{\"audio_tokens\":0,"
           "\"cached_tokens\":12},\"completion_tokens\":1}";
    assert (s_usage_parse (json, json + strlen (json), usage) == 0);
    assert (usage[0] == 20 && usage[3] == 12 && usage[2] == 21);
    json = "{\"prompt_tokens\":3}";
    assert (s_usage_parse (json, json + strlen (json), usage) == 0);
    assert (usage[0] == 3 && usage[1] == 0 && usage[2] == 3);
    json = "{\"prompt_tokens\":3";
    assert (s_usage_parse (json, json + strlen (json), usage) == -1);
    //  Error events and provider errors
    assert (s_is_error_event (" { \"error\" : {}}", 16));
    assert (!s_is_error_event ("{\"id\":\"error\"}", 14));
    char message[128];
    json = "{\"error\":{\"message\":\"bad \\\"thing\\\"\",\"type\":\"x\"}}";
    zframe_t *frame =
        s_error_from_provider (json, strlen (json), 400, message, sizeof (message));
    assert (streq (message, "bad  thing "));
    zframe_destroy (&frame);
    frame =
        s_error_from_provider ("<html>oops</html>", 17, 502, message, sizeof (message));
    assert (frame);
    assert (streq (message, "<html>oops</html>"));
    zframe_destroy (&frame);
}

void
gw_bridge_test (bool verbose)
{
    printf (" * gw_bridge: ");
    s_unit_tests ();
    curl_global_init (CURL_GLOBAL_DEFAULT);

    s_mock_t mock_a = {0}, mock_b = {0};
    s_mock_start (&mock_a, 1);
    s_mock_start (&mock_b, 2);

    zactor_t *broker = zactor_new (gw_broker_actor, NULL);
    assert (broker);
    zstr_sendx (broker, "BIND", "tcp://127.0.0.1:*", NULL);
    char *endpoint = zstr_recv (broker);
    assert (endpoint && *endpoint);

    zactor_t *billing = zactor_new (s_billing_actor, endpoint);
    assert (billing);
    char spool[96];
    snprintf (spool, sizeof (spool), "/tmp/aigw-bridge-spool-%d", (int)getpid ());

    zactor_t *bridge = zactor_new (gw_bridge_actor, NULL);
    assert (bridge);
    if (verbose)
        zstr_send (bridge, "VERBOSE");
    zstr_sendx (bridge, "CONFIGURE", "spool_dir", spool, NULL);
    assert (zsock_wait (bridge) == 0);
    zstr_sendx (bridge, "CONFIGURE", "billing_service", "billing.bt", NULL);
    assert (zsock_wait (bridge) == 0);
    zstr_sendx (bridge, "CONFIGURE", "disconnect", "sometimes", NULL);
    assert (zsock_wait (bridge) == 1);
    zstr_sendx (bridge, "CONFIGURE", "breaker_cooldown_ms", "400", NULL);
    assert (zsock_wait (bridge) == 0);
    zstr_sendx (bridge, "CONFIGURE", "capacity", "64", NULL);
    assert (zsock_wait (bridge) == 0);
    zstr_sendx (bridge, "CONFIGURE", "nonsense", "1", NULL);
    assert (zsock_wait (bridge) == 1);
    zstr_sendx (bridge, "CONNECT", endpoint, NULL);
    assert (zsock_wait (bridge) == 0);

    gw_client_t *client = gw_client_new (endpoint);
    assert (client);

    char plan_a[512], plan_ab[1024], plan_dead_b[1024], plan_flaky[1024], plan_dead[512];
    char plan_nope[1024], plan_429[1024], plan_slow[512], plan_embed[512];
    const char *ch =
        "{\"id\":\"%s\",\"type\":\"openai\",\"base\":\"http://127.0.0.1:%d/v1/\","
        "\"key\":\"sk-test\",\"model\":\"%s\",\"timeout_ms\":%d}";
    char a[256], b[256];
    snprintf (a, sizeof (a), ch, "a", mock_a.port, "mock-gpt", 5000);
    snprintf (plan_a, sizeof (plan_a), "[%s]", a);
    snprintf (b, sizeof (b), ch, "b", mock_b.port, "mock-gpt", 5000);
    snprintf (plan_ab, sizeof (plan_ab), "[%s,%s]", a, b);
    snprintf (a, sizeof (a), ch, "dead", 1, "mock-gpt", 5000);
    snprintf (plan_dead_b, sizeof (plan_dead_b), "[%s,%s]", a, b);
    snprintf (a, sizeof (a), ch, "flaky", mock_a.port, "mock-gpt", 5000);
    snprintf (plan_flaky, sizeof (plan_flaky), "[%s,%s]", a, b);
    snprintf (a, sizeof (a), ch, "dead2", 1, "mock-gpt", 5000);
    snprintf (plan_dead, sizeof (plan_dead), "[%s]", a);
    snprintf (a, sizeof (a), ch, "wrong", mock_a.port, "nope", 5000);
    snprintf (plan_nope, sizeof (plan_nope), "[%s,%s]", a, b);
    snprintf (a, sizeof (a), ch, "r1", mock_a.port, "mock-gpt", 5000);
    snprintf (b, sizeof (b), ch, "r2", mock_a.port, "mock-gpt", 5000);
    snprintf (plan_429, sizeof (plan_429), "[%s,%s]", a, b);
    snprintf (a, sizeof (a), ch, "slow", mock_a.port, "mock-gpt", 300);
    snprintf (plan_slow, sizeof (plan_slow), "[%s]", a);
    snprintf (a, sizeof (a), ch, "emb", mock_a.port, "mock-embed", 5000);
    snprintf (plan_embed, sizeof (plan_embed), "[%s]", a);

    const char *chat = "{\"model\":\"alias\",\"messages\":[{\"role\":\"user\","
                       "\"content\":\"hello there world\"}]}";
    const char *chat_stream =
        "{\"model\":\"alias\",\"stream\":true,\"messages\":[{\"role\":"
        "\"user\",\"content\":\"hello there world\"}]}";
    const char *chat_stream_nu =
        "{\"model\":\"alias\",\"stream\":true,\"stream_options\":{\"include_usage\":"
        "false},"
        "\"messages\":[{\"role\":\"user\",\"content\":\"hello there world\"}]}";
    s_result_t result = {0};

    //  1. Non-stream: JSON passed through, usage, channel, attempts; the
    //  upstream request carries the key and the plan's model.
    s_mock_config (&mock_a, NULL);
    s_call (client, &(s_call_t){.plan = plan_a, .body = chat}, &result);
    assert (result.status == 200);
    assert (streq (gw_envelope_ann_str (result.envelope, "ctype"), "json"));
    assert (streq (s_channel_of (&result), "a"));
    assert (gw_envelope_ann_int (result.envelope, "attempts", 0) == 1);
    assert (gw_envelope_ann_raw (result.envelope, "plan", NULL) == NULL);
    assert (strstr (result.body, "\"object\":\"chat.completion\""));
    assert (s_usage_of (&result, "prompt_tokens") == 3);
    assert (s_usage_of (&result, "completion_tokens") == 5);
    assert (s_usage_of (&result, "total_tokens") == 8);
    char *stats = s_http (&mock_a, "/_mock/stats", NULL);
    assert (strstr (stats, "\"authorization\":\"Bearer sk-test\""));
    assert (strstr (stats, "\"model\":\"mock-gpt\""));
    assert (!strstr (stats, "\"model\":\"alias\""));
    assert (!strstr (stats, "stream_options"));
    free (stats);
    //  ... and its usage event went to billing, exact.
    char *event = s_event_of (billing, result.rid);
    if (verbose)
        printf ("\n   event: %s\n", event);
    assert (streq (
        event, "status=200 prompt=3 completion=5 estimated=0 channel=a user=anonymous"));
    zstr_free (&event);
    s_result_clear (&result);

    //  1b. Limits: the first PARTIAL carries ann.headers (ratelimit's) and
    //  ann.channel; so does the FINAL; the event names the user.
    s_mock_config (&mock_a, NULL);
    s_call (client,
        &(s_call_t){.plan = plan_a, .body = chat_stream, .stream = true, .limits = true},
        &result);
    assert (result.status == 200);
    assert (result.head);
    assert (streq (gw_envelope_ann_str (result.head, "channel"), "a"));
    assert (gw_envelope_ann_raw (result.head, "headers", NULL));
    assert (gw_envelope_ann_raw (result.envelope, "headers", NULL));
    event = s_event_of (billing, result.rid);
    assert (streq (
        event, "status=200 prompt=3 completion=5 estimated=0 channel=a user=alice"));
    zstr_free (&event);
    s_result_clear (&result);
    //  ... and an error before any attempt carries ann.headers, no event.
    s_call (client, &(s_call_t){.plan = "[{\"id\":\"x\"}]", .body = chat, .limits = true},
        &result);
    assert (result.status == 500);
    assert (gw_envelope_ann_raw (result.envelope, "headers", NULL));
    zclock_sleep (50);
    char hex[33];
    gw_rid_hex (result.rid, hex);
    zstr_sendx (billing, "GET", hex, NULL);
    event = zstr_recv (billing);
    assert (streq (event, ""));
    zstr_free (&event);
    s_result_clear (&result);

    //  1c. Billing refuses (503): the event is kept and resent until acked;
    //  a full spool refuses new requests with 503 (backpressure).
    zstr_sendx (billing, "MODE", "503", NULL);
    zstr_sendx (bridge, "CONFIGURE", "spool_max", "1", NULL);
    assert (zsock_wait (bridge) == 0);
    s_call (client, &(s_call_t){.plan = plan_a, .body = chat}, &result);
    assert (result.status == 200);
    uint8_t owed[16];
    memcpy (owed, result.rid, 16);
    s_result_clear (&result);
    zclock_sleep (300);
    char *bstats = s_stats (bridge);
    if (verbose)
        printf ("   (%s)\n", bstats);
    assert (strstr (bstats, "pending=1 "));
    zstr_free (&bstats);
    s_call (client, &(s_call_t){.plan = plan_a, .body = chat}, &result);
    assert (result.status == 503);
    assert (strstr (result.body, "usage_spool_full"));
    s_result_clear (&result);
    zstr_sendx (billing, "MODE", "200", NULL);
    event = s_event_of (billing, owed);
    assert (strstr (event, "status=200 "));
    zstr_free (&event);
    zstr_sendx (bridge, "CONFIGURE", "spool_max", "100000", NULL);
    assert (zsock_wait (bridge) == 0);

    //  2. Stream, client asked for usage: every event, then [DONE], FINAL 200.
    s_mock_config (&mock_a, NULL);
    s_call (client,
        &(s_call_t){
            .plan = plan_a, .body = chat_stream, .stream = true, .include_usage = true},
        &result);
    assert (result.status == 200);
    assert (
        zlistx_size (result.partials) == 9);  //  role, 5 tokens, finish, usage, [DONE]
    char *payload = (char *)zlistx_first (result.partials);
    assert (strncmp (payload, "data: {", 7) == 0);
    assert (strcmp (payload + strlen (payload) - 2, "\n\n") == 0);
    bool usage_chunk = false;
    while (payload) {
        if (strstr (payload, "\"choices\":[]"))
            usage_chunk = true;
        payload = (char *)zlistx_next (result.partials);
    }
    assert (usage_chunk);
    assert (streq ((char *)zlistx_last (result.partials), "data: [DONE]\n\n"));
    assert (s_usage_of (&result, "completion_tokens") == 5);
    assert (streq (result.body, ""));
    stats = s_http (&mock_a, "/_mock/stats", NULL);
    assert (strstr (stats, "\"stream_options\":{\"include_usage\":true}"));
    free (stats);
    s_result_clear (&result);

    //  3. Stream, client did not ask for usage: forced upstream, dropped here.
    s_mock_config (&mock_a, NULL);
    s_call (client, &(s_call_t){.plan = plan_a, .body = chat_stream_nu, .stream = true},
        &result);
    assert (result.status == 200);
    assert (zlistx_size (result.partials) == 8);
    payload = (char *)zlistx_first (result.partials);
    while (payload) {
        assert (!strstr (payload, "\"choices\":[]"));
        payload = (char *)zlistx_next (result.partials);
    }
    assert (s_usage_of (&result, "total_tokens") == 8);
    stats = s_http (&mock_a, "/_mock/stats", NULL);
    assert (strstr (stats, "\"include_usage\":true"));
    free (stats);
    s_result_clear (&result);

    //  4. Failover: a 500 on the first channel, the second answers.
    s_mock_config (&mock_a, "{\"status\":500,\"count\":1}");
    s_call (client, &(s_call_t){.plan = plan_ab, .body = chat}, &result);
    assert (result.status == 200);
    assert (streq (s_channel_of (&result), "b"));
    assert (gw_envelope_ann_int (result.envelope, "attempts", 0) == 2);
    s_result_clear (&result);
    //  ... where the second channel names another model, the body sent to
    //  it is written for that model (the first attempt's is reused only
    //  for the same model).
    {
        char a_gpt[256], b_mini[256], plan_ab_mini[1024];
        snprintf (a_gpt, sizeof (a_gpt), ch, "fo-a", mock_a.port, "mock-gpt", 5000);
        snprintf (
            b_mini, sizeof (b_mini), ch, "fo-b", mock_b.port, "mock-gpt-mini", 5000);
        snprintf (plan_ab_mini, sizeof (plan_ab_mini), "[%s,%s]", a_gpt, b_mini);
        free (s_http (&mock_b, "/_mock/reset", "{}"));
        s_mock_config (&mock_a, "{\"status\":500,\"count\":1}");
        s_call (client, &(s_call_t){.plan = plan_ab_mini, .body = chat}, &result);
        assert (result.status == 200);
        assert (streq (s_channel_of (&result), "fo-b"));
        char *b_stats = s_http (&mock_b, "/_mock/stats", NULL);
        assert (strstr (b_stats, "\"model\":\"mock-gpt-mini\""));
        assert (!strstr (b_stats, "\"model\":\"mock-gpt\""));
        free (b_stats);
        s_result_clear (&result);
    }
    //  ... and from a refused port, for a stream too.
    s_call (client, &(s_call_t){.plan = plan_dead_b, .body = chat_stream, .stream = true},
        &result);
    assert (result.status == 200);
    assert (streq (s_channel_of (&result), "b"));
    assert (gw_envelope_ann_int (result.envelope, "attempts", 0) == 2);
    assert (zlistx_size (result.partials) == 8);
    s_result_clear (&result);

    //  5. Breaker: three failures in a row open it; the channel is skipped
    //  until the cooldown; the half-open probe succeeds and closes it.
    s_mock_config (&mock_a, "{\"status\":500,\"count\":3}");
    for (int i = 0; i < 3; i++) {
        s_call (client, &(s_call_t){.plan = plan_flaky, .body = chat}, &result);
        assert (result.status == 200);
        assert (gw_envelope_ann_int (result.envelope, "attempts", 0) == 2);
        s_result_clear (&result);
    }
    s_call (client, &(s_call_t){.plan = plan_flaky, .body = chat}, &result);
    assert (result.status == 200);
    assert (streq (s_channel_of (&result), "b"));
    assert (gw_envelope_ann_int (result.envelope, "attempts", 0) == 1);
    s_result_clear (&result);
    stats = s_http (&mock_a, "/_mock/stats", NULL);
    assert (strstr (stats, "\"requests\":3"));  //  skipped: no fourth request
    free (stats);
    zclock_sleep (450);
    s_call (client, &(s_call_t){.plan = plan_flaky, .body = chat}, &result);
    assert (result.status == 200);
    assert (streq (s_channel_of (&result), "flaky"));
    assert (gw_envelope_ann_int (result.envelope, "attempts", 0) == 1);
    s_result_clear (&result);

    //  6. A stream that breaks after PARTIALs ends with FINAL 502.
    s_mock_config (&mock_a, "{\"break_after_chunks\":2}");
    s_call (client, &(s_call_t){.plan = plan_ab, .body = chat_stream, .stream = true},
        &result);
    assert (result.status == 502);
    assert (zlistx_size (result.partials) == 3);  //  role + 2 tokens, no failover
    assert (strstr (result.body, "stream_interrupted"));
    s_result_clear (&result);
    //  ... also when it ends with an error event instead of [DONE]
    s_mock_config (&mock_a, "{\"error_after_chunks\":1}");
    s_call (client, &(s_call_t){.plan = plan_ab, .body = chat_stream, .stream = true},
        &result);
    assert (result.status == 502);
    assert (zlistx_size (result.partials) == 2);
    s_result_clear (&result);

    //  7. A 4xx is the caller's: passed through, no failover.
    s_mock_config (&mock_a, NULL);
    s_call (client, &(s_call_t){.plan = plan_nope, .body = chat}, &result);
    assert (result.status == 404);
    assert (strstr (result.body, "model_not_found"));
    assert (gw_envelope_ann_int (result.envelope, "attempts", 0) == 1);
    s_result_clear (&result);

    //  8. Every channel fails: 502 naming the last failure; all 429: 429.
    s_call (client, &(s_call_t){.plan = plan_dead, .body = chat}, &result);
    assert (result.status == 502);
    assert (strstr (result.body, "dead2"));
    assert (strstr (result.body, "upstream_unavailable"));
    s_result_clear (&result);
    s_mock_config (&mock_a, "{\"status\":429,\"count\":2}");
    s_call (client, &(s_call_t){.plan = plan_429, .body = chat}, &result);
    assert (result.status == 429);
    assert (gw_envelope_ann_int (result.envelope, "attempts", 0) == 2);
    assert (strstr (result.body, "\"error\""));
    s_result_clear (&result);

    //  9. Timeouts: a hanging upstream gives 504, non-stream and stream.
    s_mock_config (&mock_a, "{\"hang\":true}");
    int64_t start = gw_mono_ms ();
    s_call (client, &(s_call_t){.plan = plan_slow, .body = chat}, &result);
    assert (result.status == 504);
    assert (strstr (result.body, "upstream_timeout"));
    s_result_clear (&result);
    s_call (client, &(s_call_t){.plan = plan_slow, .body = chat_stream, .stream = true},
        &result);
    assert (result.status == 504);
    s_result_clear (&result);
    assert (gw_mono_ms () - start < 2000);

    //  10. Embeddings: no stream keys, usage recorded.
    s_mock_config (&mock_a, NULL);
    s_call (client,
        &(s_call_t){.op = "embeddings",
            .plan = plan_embed,
            .body = "{\"model\":\"e\",\"input\":\"hello world\"}"},
        &result);
    assert (result.status == 200);
    assert (strstr (result.body, "\"embedding\""));
    assert (s_usage_of (&result, "prompt_tokens") == 2);
    stats = s_http (&mock_a, "/_mock/stats", NULL);
    assert (strstr (stats, "\"model\":\"mock-embed\""));
    assert (!strstr (stats, "\"stream\""));
    free (stats);
    s_result_clear (&result);

    //  11. CANCEL: the provider sees its connection closed within a second.
    s_mock_config (&mock_a, "{\"chunks\":50,\"chunk_delay_ms\":100}");
    uint8_t rid[16];
    s_send_call (
        client, &(s_call_t){.plan = plan_a, .body = chat_stream, .stream = true}, rid);
    result.partials = zlistx_new ();
    //  The role chunk, then at least two chunks with text.
    while (zlistx_size (result.partials) < 3 && !result.status)
        s_collect (client, rid, &result, 100);
    assert (!result.status);
    gw_client_cancel (client, rid, 499);
    start = gw_mono_ms ();
    bool seen = false;
    while (!seen && gw_mono_ms () - start < 1000) {
        stats = s_http (&mock_a, "/_mock/stats", NULL);
        seen = strstr (stats, "\"disconnects\":[{") != NULL;
        free (stats);
        if (!seen)
            zclock_sleep (10);
    }
    if (verbose)
        printf ("(cancel seen upstream in %" PRId64 " ms) ", gw_mono_ms () - start);
    assert (seen);
    s_result_clear (&result);
    zclock_sleep (50);
    bstats = s_stats (bridge);
    assert (strstr (bstats, "inflight=0 "));
    assert (strstr (bstats, "cancels=1 "));
    zstr_free (&bstats);
    //  ... billed with the gateway's estimate: prompt bytes / 4, one token
    //  per chunk that carried text (not the role chunk): at least 2.
    event = s_event_of (billing, rid);
    if (verbose)
        printf ("\n   cancel event: %s\n", event);
    assert (strstr (event, "status=499 prompt=") && strstr (event, "estimated=1 "));
    assert (!strstr (event, "completion=0 ") && !strstr (event, "completion=1 "));
    zstr_free (&event);

    //  11b. Drain (the channel's "disconnect": "drain"): the client goes, the
    //  bridge reads on to the provider's usage and bills it exactly.
    char plan_drain[512];
    snprintf (plan_drain, sizeof (plan_drain),
        "[{\"id\":\"dr\",\"base\":\"http://127.0.0.1:%d/v1\",\"key\":\"sk-test\","
        "\"model\":\"mock-gpt\",\"disconnect\":\"drain\"}]",
        mock_a.port);
    s_mock_config (&mock_a, "{\"chunks\":20,\"chunk_delay_ms\":20}");
    s_send_call (client,
        &(s_call_t){.plan = plan_drain, .body = chat_stream, .stream = true}, rid);
    result.partials = zlistx_new ();
    //  The role chunk, then at least two chunks with text.
    while (zlistx_size (result.partials) < 3 && !result.status)
        s_collect (client, rid, &result, 100);
    assert (!result.status);
    gw_client_cancel (client, rid, 499);
    event = s_event_of (billing, rid);
    if (verbose)
        printf ("   drain event: %s\n", event);
    assert (streq (event,
        "status=499 prompt=3 completion=20 estimated=0 channel=dr user=anonymous"));
    zstr_free (&event);
    stats = s_http (&mock_a, "/_mock/stats", NULL);
    assert (strstr (stats, "\"disconnects\":[]"));  //  read to the end
    free (stats);
    s_result_clear (&result);

    //  12. Credit: window 2 and no CREDIT: 2 PARTIALs, the transfer pauses
    //  (the provider cannot finish); CREDIT lets the rest through.
    s_mock_config (&mock_a, "{\"chunks\":3000}");
    s_send_call (client,
        &(s_call_t){.plan = plan_a, .body = chat_stream, .stream = true, .window = 2},
        rid);
    s_collect (client, rid, &result, 700);
    assert (zlistx_size (result.partials) == 2);
    assert (!result.status);
    bstats = s_stats (bridge);
    if (verbose)
        printf ("(%s) ", bstats);
    assert (strstr (bstats, "held=1 "));
    assert (strstr (bstats, "paused=1 "));
    zstr_free (&bstats);
    gw_client_credit (client, rid, 1000000);
    s_collect (client, rid, &result, 8000);
    assert (result.status == 200);
    assert (zlistx_size (result.partials) == 3003);  //  role, 3000, finish, [DONE]
    assert (streq ((char *)zlistx_last (result.partials), "data: [DONE]\n\n"));
    s_result_clear (&result);
    //  ... and a small stream that completes upstream while held drains.
    s_mock_config (&mock_a, NULL);
    s_send_call (client,
        &(s_call_t){.plan = plan_a, .body = chat_stream, .stream = true, .window = 1},
        rid);
    s_collect (client, rid, &result, 300);
    assert (zlistx_size (result.partials) == 1 && !result.status);
    for (int i = 0; i < 20 && !result.status; i++) {
        gw_client_credit (client, rid, 1);
        s_collect (client, rid, &result, 50);
    }
    assert (result.status == 200);
    assert (zlistx_size (result.partials) == 8);
    s_result_clear (&result);

    //  13. Malformed requests: no plan, bad body.
    s_call (client, &(s_call_t){.plan = "[{\"id\":\"x\"}]", .body = chat}, &result);
    assert (result.status == 500);
    s_result_clear (&result);
    s_call (client, &(s_call_t){.plan = plan_a, .body = "[1,2]"}, &result);
    assert (result.status == 400);
    s_result_clear (&result);

    bstats = s_stats (bridge);
    if (verbose)
        printf ("(%s) ", bstats);
    assert (strstr (bstats, "inflight=0 "));
    zstr_free (&bstats);
    //  The last acknowledgements may still be on their way on a busy machine.
    bool acked = false;
    for (int i = 0; i < 500 && !acked; i++) {
        bstats = s_stats (bridge);
        acked = strstr (bstats, "pending=0 ") != NULL;
        zstr_free (&bstats);
        if (!acked)
            zclock_sleep (10);
    }
    assert (acked);

    gw_client_destroy (&client);
    zactor_destroy (&bridge);
    zactor_destroy (&billing);
    zactor_destroy (&broker);
    assert (rmdir (spool) == 0);  //  every event acknowledged: no spool left
    zstr_free (&endpoint);
    s_mock_stop (&mock_a);
    s_mock_stop (&mock_b);
    curl_global_cleanup ();
    printf ("OK\n");
}
