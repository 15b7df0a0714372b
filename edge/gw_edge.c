//  --------------------------------------------------------------------------
//  gw_edge — the HTTP front (aigw-edge).
//
//  Design note. civetweb runs a thread per connection (AIGW_EDGE_THREADS of
//  them). Every request enters through the begin_request callback, which
//  routes by exact path (nothing else of civetweb's request processing runs,
//  so CORS, errors and headers are ours). An API request is read with a cap,
//  transcoded JSON -> msgpack once, inspected with the bounded reader
//  (model, stream, stream_options.include_usage, messages), wrapped in an
//  envelope per proto/STAGES.md and sent as one GWP/1 REQUEST.
//
//  Threads and the bus. Handler threads never touch the broker connection:
//  each lazily opens its own inproc DEALER (kept in civetweb's per-thread
//  pointer, closed in exit_thread) to the ROUTER of ONE I/O actor, which
//  owns the gw_client session. Handler -> actor messages are GWP/1 frame
//  sets (REQUEST, CANCEL, CREDIT) encoded with gw_msg, so payload frames are
//  passed by reference, never copied; the actor keeps rid -> handler routing
//  id and sends each PARTIAL/FINAL from the session to the right thread.
//  The actor polls its pipe, its ROUTER and the session's socket (fetched
//  again each loop: it is replaced on reconnect), drains all ready input,
//  and ticks the session; it never blocks on a handler.
//
//  Responses are written raw: status line, headers and (small) body go out
//  in one mg_write, so a response is one TCP segment with tcp_nodelay. A
//  stream's headers go out with its first PARTIAL; each PARTIAL is one
//  HTTP chunk framed here (hex size CRLF data CRLF) in one mg_write; CREDIT
//  goes back every window/2 PARTIALs written. An idle stream gets an SSE
//  comment every AIGW_SSE_KEEPALIVE_MS so a vanished client shows up as a
//  failed write, which CANCELs (499) the request. A FINAL >= 400 after
//  PARTIALs becomes an SSE "error" event, never a silently truncated 200.
//
//  Invariants: every response carries X-Request-Id, CORS and (unless
//  disabled) security headers; every non-2xx body is an OpenAI error object
//  {"error":{"message","type","param","code"}}; each handler thread has at
//  most one request in flight, and drops bus messages for other rids
//  (late ones after a cancel). No per-request logging above debug level,
//  no per-token JSON work.
//
//  Failure: broker unreachable -> 503 at once (the session refuses sends);
//  broker lost mid-request -> the session's local 502; deadline -> 504 (the
//  session cancels with 504; handlers also give up EDGE_GRACE_MS later as a
//  safety net); body over the cap -> 413 and the connection is closed
//  without reading the rest.

#include "aigw.h"
#include "gw_edge.h"
#include "gw_broker.h"  //  selftest only
#include <civetweb.h>
#include <curl/curl.h>
#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <dirent.h>

#define EDGE_SLIP_MAX GW_ENVELOPE_SLIP_MAX
#define EDGE_READY_MAX 32
#define EDGE_RESPONSE_MAX (128 * 1024 * 1024)  //  largest FINAL/PARTIAL body accepted
#define EDGE_POLL_MS 100  //  longest handler wait between stop/peer checks
#define EDGE_PEER_CHECK_MS 200  //  requests waiting longer watch their client socket
#define EDGE_GRACE_MS 2000  //  handler safety margin past the deadline
#define EDGE_READY_TIMEOUT_MS 2000  //  deadline of the gw.services query
#define EDGE_INLINE_BODY (256 * 1024)  //  bodies up to this share the header write
#define EDGE_BUF_KEEP (1024 * 1024)  //  per-thread buffers above this are freed
#define EDGE_READ_STEP (64 * 1024)  //  mg_read size for bodies of unknown length
#define EDGE_RELEASE                                                                     \
    "edge.release"  //  handler -> I/O actor: a release item, never on the bus
#define EDGE_MODEL_MAX 256  //  longest model name accepted
#define EDGE_HEADERS_MAX 32  //  ann.headers entries passed on
#define EDGE_HEADER_VALUE_MAX 1024  //  longest ann.headers value passed on

//  --------------------------------------------------------------------------
//  Structures

struct _gw_edge_t {
    char *bus;  //  broker bus endpoint
    char *listen;  //  listening address
    int port;  //  listening port, 0 = ephemeral
    char *slip[EDGE_SLIP_MAX];  //  routing slip, owned strings
    size_t slip_size;  //  1..16
    bool ratelimit;  //  the slip has "ratelimit": release holds (s_release)
    char *ready[EDGE_READY_MAX];  //  services /health/ready requires, owned
    size_t ready_size;  //  0 = derived from the slip at start
    size_t body_max;  //  request body cap, bytes
    int64_t deadline_ms;  //  request deadline after arrival, ms
    uint32_t window;  //  stream window, PARTIALs; 0 = no credit
    int threads;  //  civetweb handler threads
    char *cors;  //  "*" or comma-separated allowed origins
    bool security;  //  send nosniff / no-referrer
    int sse_keepalive_ms;  //  SSE comment interval on an idle stream
    int request_timeout_ms;  //  civetweb socket timeout
    int keepalive_ms;  //  civetweb idle keep-alive
    int drain_ms;  //  time requests in flight get on stop
    int64_t slow_ms;  //  log requests slower than this with stage timings; 0 = off

    char io_endpoint[64];  //  inproc endpoint of the I/O actor
    zactor_t *io;  //  the I/O actor, NULL until started
    struct mg_context *ctx;  //  civetweb server, NULL until started
    int bound_port;  //  HTTP port after start
    int64_t stop_at;  //  mono ms when handlers give up; 0 = running (atomic)
    bool library;  //  mg_init_library was called
};

//  Per handler thread (civetweb's thread pointer).
typedef struct {
    gw_edge_t *edge;  //  the edge this thread serves
    zsock_t *dealer;  //  DEALER to the I/O actor, created on first use
    gw_msg_t *in;  //  receive buffer for PARTIAL/FINAL
    gw_msg_t *ctl;  //  send buffer for CANCEL/CREDIT
    gw_envelope_t *env;  //  decode buffer for FINAL envelopes
    char *body;  //  request body bytes
    size_t body_alloc;  //  bytes allocated for body
    msgpack_sbuffer pack;  //  request body as msgpack
    msgpack_sbuffer json;  //  response body as JSON
    msgpack_sbuffer out;  //  response bytes (head, chunks)
    msgpack_sbuffer extra;  //  extra response header lines
    time_t date_at;  //  second the cached Date is for
    char date[40];  //  cached Date value
    int client_fd;  //  socket s_client_fd last found, + 1 (0 = none)
} s_thread_t;

//  One request, on the handler's stack.
typedef struct {
    struct mg_connection *conn;  //  civetweb connection
    const struct mg_request_info *ri;  //  request line and headers
    s_thread_t *thread;  //  handler thread state
    gw_edge_t *edge;  //  configuration
    uint8_t rid[16];  //  request id on the bus
    char rid_text[40];  //  X-Request-Id sent back
    const char *origin;  //  Access-Control-Allow-Origin, or NULL
    bool vary_origin;  //  the origin depends on the request
    bool keep_alive;  //  connection stays open after
    bool chunked;  //  a stream uses chunked framing
    bool streaming;  //  stream headers are out
    bool partial_seen;  //  a PARTIAL arrived: the backend is answering
    bool client_gone;  //  a write failed
    int fd;  //  client socket: -2 not looked up yet, -1 not found
    bool cross_origin;  //  the request carries an Origin header
    int status;  //  status for the access log
    uint64_t bytes;  //  bytes written
    int64_t start_us;  //  arrival, unix µs
} s_req_t;

//  In-flight entry of the I/O actor.
typedef struct {
    uint8_t rid[16];  //  request id; the map key points here
    zframe_t *handler;  //  routing id of the handler thread's DEALER
} s_flight_t;

//  --------------------------------------------------------------------------
//  Small helpers

static void
s_add (msgpack_sbuffer *sb, const char *text)
{
    msgpack_sbuffer_write (sb, text, strlen (text));
}

//  Append the decimal digits of value (the response head is built for
//  every request: plain copies here, no printf).
static void
s_add_int (msgpack_sbuffer *sb, int64_t value)
{
    char digits[24];
    uint64_t magnitude = value < 0 ? 0 - (uint64_t)value : (uint64_t)value;
    msgpack_sbuffer_write (sb, digits, gw_json_format_u64 (digits, magnitude, value < 0));
}

//  Append "name: value\r\n".
static void
s_add_header (msgpack_sbuffer *sb, const char *name, size_t name_size, const char *value,
    size_t size)
{
    msgpack_sbuffer_write (sb, name, name_size);
    msgpack_sbuffer_write (sb, ": ", 2);
    msgpack_sbuffer_write (sb, value, size);
    msgpack_sbuffer_write (sb, "\r\n", 2);
}

static void s_addf (msgpack_sbuffer *sb, const char *format, ...)
    __attribute__ ((format (printf, 2, 3)));

static void
s_addf (msgpack_sbuffer *sb, const char *format, ...)
{
    char small[512];
    va_list args;
    va_start (args, format);
    int size = vsnprintf (small, sizeof (small), format, args);
    va_end (args);
    if (size < 0)
        return;
    if ((size_t)size < sizeof (small)) {
        msgpack_sbuffer_write (sb, small, (size_t)size);
        return;
    }
    char *big = (char *)malloc ((size_t)size + 1);
    assert (big);
    va_start (args, format);
    vsnprintf (big, (size_t)size + 1, format, args);
    va_end (args);
    msgpack_sbuffer_write (sb, big, (size_t)size);
    free (big);
}

//  Free a buffer that grew past EDGE_BUF_KEEP, else just empty it.
static void
s_sbuffer_trim (msgpack_sbuffer *sb)
{
    if (sb->alloc > EDGE_BUF_KEEP) {
        msgpack_sbuffer_destroy (sb);
        msgpack_sbuffer_init (sb);
    }
    else
        msgpack_sbuffer_clear (sb);
}

static void
s_uuid_text (const uint8_t rid[16], char out[37])
{
    char hex[33];
    gw_rid_hex (rid, hex);
    snprintf (
        out, 37, "%.8s-%.4s-%.4s-%.4s-%.12s", hex, hex + 8, hex + 12, hex + 16, hex + 20);
}

static bool
s_lower_hex (const char *text, size_t size, bool nonzero)
{
    bool any = false;
    for (size_t i = 0; i < size; i++) {
        char c = text[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return false;
        any |= c != '0';
    }
    return any || !nonzero;
}

//  Trace id from a W3C traceparent ("00-<32 hex>-<16 hex>-<2 hex>"), or
//  random when absent or malformed. out gets 32 lowercase hex digits.
static void
s_trace_id (const char *traceparent, char out[33])
{
    if (traceparent) {
        size_t len = strlen (traceparent);
        const char *t = traceparent;
        if (len >= 55 && s_lower_hex (t, 2, false) && memcmp (t, "ff", 2) != 0 &&
            t[2] == '-' && s_lower_hex (t + 3, 32, true) && t[35] == '-' &&
            s_lower_hex (t + 36, 16, true) && t[52] == '-' &&
            s_lower_hex (t + 53, 2, false) &&
            (len == 55 ? true : (memcmp (t, "00", 2) != 0 && t[55] == '-'))) {
            memcpy (out, t + 3, 32);
            out[32] = 0;
            return;
        }
    }
    uint8_t random[16];
    gw_rid_new (random);
    gw_rid_hex (random, out);
}

//  Split a comma-separated list into owned strings (trimmed, no empties).
//  Each must be a valid service name if services is true. Returns the
//  count, or -1 (nothing kept) if the list is empty, too long or invalid.
static int
s_list_parse (const char *text, char **items, size_t max, bool services)
{
    size_t count = 0;
    const char *p = text;
    while (*p) {
        while (*p == ' ' || *p == ',')
            p++;
        if (!*p)
            break;
        const char *start = p;
        while (*p && *p != ',')
            p++;
        const char *end = p;
        while (end > start && end[-1] == ' ')
            end--;
        size_t size = (size_t)(end - start);
        if (count == max || (services && !gw_msg_service_valid (start, size)))
            goto fail;
        items[count] = strndup (start, size);
        assert (items[count]);
        count++;
    }
    if (count == 0)
        return -1;
    return (int)count;
fail:
    while (count)
        free (items[--count]);
    return -1;
}

static void
s_list_free (char **items, size_t *count)
{
    while (*count)
        free (items[--*count]);
}

//  Default error type for a status (OpenAI's vocabulary).
static const char *
s_status_type (int status)
{
    switch (status) {
        case 401:
            return "authentication_error";
        case 403:
            return "permission_error";
        case 429:
            return "rate_limit_error";
        default:
            return status >= 500 ? "api_error" : "invalid_request_error";
    }
}

//  Append {"error":{"message","type","param","code"}} to out. param and
//  code may be NULL (JSON null). A message that is not valid UTF-8 is
//  replaced.
static void
s_error_json (msgpack_sbuffer *out, const char *message, size_t message_size,
    const char *type, const char *param, const char *code)
{
    s_add (out, "{\"error\":{\"message\":");
    size_t mark = out->size;
    if (gw_json_escape (message, message_size, out)) {
        out->size = mark;
        s_add (out, "\"(error message not valid UTF-8)\"");
    }
    s_add (out, ",\"type\":");
    gw_json_escape (type, strlen (type), out);
    s_add (out, ",\"param\":");
    if (param)
        gw_json_escape (param, strlen (param), out);
    else
        s_add (out, "null");
    s_add (out, ",\"code\":");
    if (code)
        gw_json_escape (code, strlen (code), out);
    else
        s_add (out, "null");
    s_add (out, "}}");
}

//  Rebuild a stage's msgpack error body as the OpenAI error object JSON.
//  Takes message, type, param and code from {"error":{...}} when present;
//  anything missing or malformed is synthesized from the status.
static void
s_error_from_body (msgpack_sbuffer *out, int status, const void *data, size_t size)
{
    const char *message = NULL, *type = NULL, *param = NULL, *code = NULL;
    size_t message_size = 0, type_size = 0, param_size = 0, code_size = 0;
    char code_number[24];
    gw_mreader_t reader;
    gw_mvalue_t value;
    gw_mreader_init (&reader, data, size);
    if (size && gw_mreader_find (&reader, "error") == 0 &&
        gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_MAP) {
        uint32_t pairs = value.v.count;
        for (uint32_t i = 0; i < pairs; i++) {
            gw_mvalue_t key, item;
            if (gw_mreader_next (&reader, &key) || key.type != GW_MP_STR)
                break;
            if (gw_mreader_next (&reader, &item))
                break;
            if (item.type == GW_MP_ARRAY || item.type == GW_MP_MAP) {
                //  skip the container's elements
                uint32_t count = item.type == GW_MP_MAP ? item.v.count * 2 : item.v.count;
                bool bad = false;
                for (uint32_t j = 0; j < count && !bad; j++)
                    bad = gw_mreader_skip (&reader, GW_ENVELOPE_DEPTH_MAX) != 0;
                if (bad)
                    break;
                continue;
            }
            if (item.type == GW_MP_STR) {
                if (gw_mvalue_streq (&key, "message"))
                    message = item.ptr, message_size = item.size;
                else if (gw_mvalue_streq (&key, "type"))
                    type = item.ptr, type_size = item.size;
                else if (gw_mvalue_streq (&key, "param"))
                    param = item.ptr, param_size = item.size;
                else if (gw_mvalue_streq (&key, "code"))
                    code = item.ptr, code_size = item.size;
            }
            else if ((item.type == GW_MP_UINT || item.type == GW_MP_INT) &&
                gw_mvalue_streq (&key, "code")) {
                if (item.type == GW_MP_UINT)
                    snprintf (code_number, sizeof (code_number), "%" PRIu64, item.v.u);
                else
                    snprintf (code_number, sizeof (code_number), "%" PRId64, item.v.i);
                code = code_number;
                code_size = strlen (code_number);
            }
        }
    }
    char fallback[64];
    if (!message) {
        snprintf (
            fallback, sizeof (fallback), "upstream stage failed with status %d", status);
        message = fallback;
        message_size = strlen (fallback);
    }
    if (!type) {
        type = s_status_type (status);
        type_size = strlen (type);
    }
    s_add (out, "{\"error\":{\"message\":");
    size_t mark = out->size;
    if (gw_json_escape (message, message_size, out)) {
        out->size = mark;
        s_add (out, "\"(error message not valid UTF-8)\"");
    }
    s_add (out, ",\"type\":");
    gw_json_escape (type, type_size, out);
    s_add (out, ",\"param\":");
    if (param)
        gw_json_escape (param, param_size, out);
    else
        s_add (out, "null");
    s_add (out, ",\"code\":");
    if (code)
        gw_json_escape (code, code_size, out);
    else
        s_add (out, "null");
    s_add (out, "}}");
}

//  --------------------------------------------------------------------------
//  Writing responses

static const char *
s_date (s_thread_t *thread)
{
    time_t now = time (NULL);
    if (now != thread->date_at) {
        struct tm tm;
        gmtime_r (&now, &tm);
        strftime (thread->date, sizeof (thread->date), "%a, %d %b %Y %H:%M:%S GMT", &tm);
        thread->date_at = now;
    }
    return thread->date;
}

static int
s_write (s_req_t *req, const void *data, size_t size)
{
    if (req->client_gone)
        return -1;
    int rc = mg_write (req->conn, data, size);
    if (rc < 0 || (size_t)rc != size) {
        req->client_gone = true;
        return -1;
    }
    req->bytes += size;
    return 0;
}

//  Close the connection after this response.
static void
s_close_after (s_req_t *req)
{
    if (req->keep_alive) {
        req->keep_alive = false;
        mg_disable_connection_keep_alive (req->conn);
    }
}

//  Append the status line and headers to out. length >= 0: Content-Length;
//  -1: chunked if req->chunked; -2: no length (204, or ends at close).
static void
s_head (
    s_req_t *req, msgpack_sbuffer *out, int status, const char *ctype, long long length)
{
    gw_edge_t *edge = req->edge;
    s_add (out, "HTTP/1.1 ");
    s_add_int (out, status);
    s_add (out, " ");
    s_add (out, mg_get_response_code_text (req->conn, status));
    s_add (out, "\r\nDate: ");
    s_add (out, s_date (req->thread));
    s_add (out, "\r\n");
    if (ctype) {
        s_add (out, "Content-Type: ");
        s_add (out, ctype);
        s_add (out, "\r\n");
    }
    if (length >= 0) {
        s_add (out, "Content-Length: ");
        s_add_int (out, length);
        s_add (out, "\r\n");
    }
    else if (length == -1 && req->chunked)
        s_add (out, "Transfer-Encoding: chunked\r\n");
    s_add (out, "X-Request-Id: ");
    s_add (out, req->rid_text);
    s_add (out, "\r\n");
    if (req->origin)
        s_addf (out, "Access-Control-Allow-Origin: %s\r\n", req->origin);
    if (req->origin && req->cross_origin) {
        s_add (out,
            "Access-Control-Expose-Headers: X-Request-Id, x-aigw-channel, Retry-After, "
            "x-ratelimit-limit-requests, x-ratelimit-limit-tokens, "
            "x-ratelimit-remaining-requests, x-ratelimit-remaining-tokens, "
            "x-ratelimit-reset-requests, x-ratelimit-reset-tokens\r\n");
    }
    if (req->vary_origin)
        s_add (out, "Vary: Origin\r\n");
    if (edge->security)
        s_add (
            out, "X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n");
    if (req->thread->extra.size)
        msgpack_sbuffer_write (out, req->thread->extra.data, req->thread->extra.size);
    s_add (out,
        req->keep_alive ? "Connection: keep-alive\r\n\r\n" : "Connection: close\r\n\r\n");
}

//  A complete response (not a stream). Returns 0, or -1 if the write failed.
static int
s_respond (s_req_t *req, int status, const char *ctype, const void *body, size_t size)
{
    msgpack_sbuffer *out = &req->thread->out;
    msgpack_sbuffer_clear (out);
    s_head (req, out, status, ctype, (long long)size);
    req->status = status;
    if (size <= EDGE_INLINE_BODY) {
        if (size)
            msgpack_sbuffer_write (out, (const char *)body, size);
        return s_write (req, out->data, out->size);
    }
    if (s_write (req, out->data, out->size))
        return -1;
    return s_write (req, body, size);
}

//  Append one stream chunk (framed when chunked) to out.
static void
s_chunk_add (s_req_t *req, msgpack_sbuffer *out, const void *data, size_t size)
{
    if (req->chunked)
        s_addf (out, "%zx\r\n", size);
    msgpack_sbuffer_write (out, (const char *)data, size);
    if (req->chunked)
        s_add (out, "\r\n");
}

//  Write one stream chunk; the first one carries the response head.
static int
s_chunk (s_req_t *req, const void *data, size_t size)
{
    msgpack_sbuffer *out = &req->thread->out;
    msgpack_sbuffer_clear (out);
    if (!req->streaming) {
        //  HTTP/1.0 has no chunked framing: the body ends at close.
        req->chunked = streq (req->ri->http_version ? req->ri->http_version : "", "1.1");
        if (!req->chunked)
            s_close_after (req);
        //  extra holds the headers of the first PARTIAL's envelope, if any.
        s_add (
            &req->thread->extra, "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n");
        s_head (req, out, 200, "text/event-stream", req->chunked ? -1 : -2);
        req->thread->extra.size = 0;
        req->streaming = true;
        req->status = 200;
    }
    s_chunk_add (req, out, data, size);
    return s_write (req, out->data, out->size);
}

//  End a stream: an optional SSE error event (JSON in thread->json), then
//  the terminating chunk, in one write.
static int
s_stream_end (s_req_t *req, bool error)
{
    msgpack_sbuffer *out = &req->thread->out;
    msgpack_sbuffer_clear (out);
    if (error) {
        msgpack_sbuffer *json = &req->thread->json;
        size_t size = strlen ("event: error\ndata: ") + json->size + 2;
        if (req->chunked)
            s_addf (out, "%zx\r\n", size);
        s_add (out, "event: error\ndata: ");
        msgpack_sbuffer_write (out, json->data, json->size);
        s_add (out, "\n\n");
        if (req->chunked)
            s_add (out, "\r\n");
    }
    if (req->chunked)
        s_add (out, "0\r\n\r\n");
    if (out->size == 0)
        return 0;
    return s_write (req, out->data, out->size);
}

//  Answer with an OpenAI error: a JSON response, or an SSE error event if
//  the stream has started. Returns 0 or -1 (write failed).
static int s_error (s_req_t *req, int status, const char *type, const char *param,
    const char *code, const char *format, ...) __attribute__ ((format (printf, 6, 7)));

static int
s_error (s_req_t *req, int status, const char *type, const char *param, const char *code,
    const char *format, ...)
{
    char message[512];
    va_list args;
    va_start (args, format);
    vsnprintf (message, sizeof (message), format, args);
    va_end (args);
    msgpack_sbuffer *json = &req->thread->json;
    msgpack_sbuffer_clear (json);
    s_error_json (json, message, strlen (message), type, param, code);
    if (req->streaming)
        return s_stream_end (req, true);
    return s_respond (req, status, "application/json", json->data, json->size);
}

//  --------------------------------------------------------------------------
//  Requests: setup

//  True if origin is one of the comma-separated origins in list (exact
//  match, surrounding spaces ignored).
static bool
s_origin_allowed (const char *list, const char *origin)
{
    if (!origin || !*origin)
        return false;
    size_t size = strlen (origin);
    for (const char *p = list; *p;) {
        const char *end = strchr (p, ',');
        size_t len = end ? (size_t)(end - p) : strlen (p);
        const char *entry = p;
        while (len && *entry == ' ')
            entry++, len--;
        while (len && entry[len - 1] == ' ')
            len--;
        if (len == size && memcmp (entry, origin, size) == 0)
            return true;
        p = end ? end + 1 : p + strlen (p);
    }
    return false;
}

static void
s_req_init (s_req_t *req, struct mg_connection *conn, s_thread_t *thread)
{
    memset (req, 0, sizeof (*req));
    req->conn = conn;
    req->thread = thread;
    req->edge = thread->edge;
    req->ri = mg_get_request_info (conn);
    req->start_us = gw_time_us ();
    req->status = 500;
    req->fd = -2;
    thread->extra.size = 0;

    const char *xrid = mg_get_header (conn, "X-Request-Id");
    if (xrid && gw_rid_parse (xrid, req->rid) == 0)
        snprintf (req->rid_text, sizeof (req->rid_text), "%s", xrid);
    else {
        gw_rid_new (req->rid);
        s_uuid_text (req->rid, req->rid_text);
    }

    const char *version =
        req->ri && req->ri->http_version ? req->ri->http_version : "1.0";
    const char *connection = mg_get_header (conn, "Connection");
    if (connection && strcasestr (connection, "close"))
        req->keep_alive = false;
    else if (connection && strcasestr (connection, "keep-alive"))
        req->keep_alive = true;
    else
        req->keep_alive = streq (version, "1.1");
    if (!req->keep_alive)
        mg_disable_connection_keep_alive (conn);

    req->cross_origin = mg_get_header (conn, "Origin") != NULL;
    const char *cors = req->edge->cors;
    if (streq (cors, "*"))
        req->origin = "*";
    else {
        req->vary_origin = true;
        const char *origin = mg_get_header (conn, "Origin");
        if (s_origin_allowed (cors, origin))
            req->origin = origin;
    }
}

//  Read the request body into thread->body with the cap. Returns 0 (size
//  in *size_p), or -1 after answering (413, 400).
static int
s_read_body (s_req_t *req, size_t *size_p)
{
    s_thread_t *thread = req->thread;
    size_t cap = req->edge->body_max;
    long long length = req->ri->content_length;
    const char *te = mg_get_header (req->conn, "Transfer-Encoding");
    bool chunked = te && strcasestr (te, "chunked");
    *size_p = 0;
    if (length > (long long)cap) {
        s_close_after (req);  //  the body stays unread
        s_error (req, 413, "invalid_request_error", NULL, "request_too_large",
            "request body of %lld bytes exceeds the limit of %zu bytes", length, cap);
        return -1;
    }
    if (length < 0 && !chunked) {
        //  No Content-Length, not chunked: an empty body (RFC 9112 6.3).
        s_close_after (req);
        return 0;
    }
    //  civetweb does not answer "Expect: 100-continue" itself; without this,
    //  such clients (curl above 1 MiB) wait a second before sending.
    const char *expect = mg_get_header (req->conn, "Expect");
    if (expect && strcasecmp (expect, "100-continue") == 0 && length != 0)
        s_write (req, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    size_t want = length >= 0 ? (size_t)length : cap + 1;
    size_t size = 0;
    while (size < want) {
        size_t step = want - size;
        if (length < 0 && step > EDGE_READ_STEP)
            step = EDGE_READ_STEP;
        if (size + step + 1 > thread->body_alloc) {
            size_t alloc = thread->body_alloc ? thread->body_alloc : 16384;
            while (alloc < size + step + 1)
                alloc *= 2;
            thread->body = (char *)realloc (thread->body, alloc);
            assert (thread->body);
            thread->body_alloc = alloc;
        }
        int got = mg_read (req->conn, thread->body + size, step);
        if (got <= 0)
            break;
        size += (size_t)got;
    }
    if (size > cap) {
        s_close_after (req);
        s_error (req, 413, "invalid_request_error", NULL, "request_too_large",
            "request body exceeds the limit of %zu bytes", cap);
        return -1;
    }
    if (length >= 0 && size < (size_t)length) {
        s_close_after (req);
        s_error (req, 400, "invalid_request_error", NULL, "incomplete_body",
            "request body ended after %zu of %lld bytes", size, length);
        return -1;
    }
    *size_p = size;
    return 0;
}

//  What the edge reads from a request body.
typedef struct {
    char model[EDGE_MODEL_MAX + 1];  //  "model", NUL-terminated
    bool stream;  //  "stream"
    bool include_usage;  //  "stream_options.include_usage"
} s_fields_t;

//  Check the transcoded body and read its fields. Returns 0, or -1 after
//  answering 400.
static int
s_inspect (
    s_req_t *req, const char *op, const char *data, size_t size, s_fields_t *fields)
{
    gw_mreader_t reader;
    gw_mvalue_t value;
    gw_mreader_init (&reader, data, size);
    if (gw_mreader_next (&reader, &value) || value.type != GW_MP_MAP) {
        s_error (req, 400, "invalid_request_error", NULL, "invalid_type",
            "the request body must be a JSON object");
        return -1;
    }
    gw_mreader_init (&reader, data, size);
    int rc = gw_mreader_find (&reader, "model");
    if (rc == 1) {
        s_error (req, 400, "invalid_request_error", "model", "missing_required_parameter",
            "you must provide a model parameter");
        return -1;
    }
    if (rc || gw_mreader_next (&reader, &value) || value.type != GW_MP_STR ||
        value.size == 0 || value.size > EDGE_MODEL_MAX ||
        memchr (value.ptr, 0, value.size)) {
        s_error (req, 400, "invalid_request_error", "model", "invalid_type",
            "model must be a non-empty string of at most %d bytes", EDGE_MODEL_MAX);
        return -1;
    }
    memcpy (fields->model, value.ptr, value.size);
    fields->model[value.size] = 0;

    bool streams = streq (op, "chat") || streq (op, "completions");
    gw_mreader_init (&reader, data, size);
    rc = gw_mreader_find (&reader, "stream");
    if (rc == 0) {
        if (gw_mreader_next (&reader, &value) ||
            (value.type != GW_MP_BOOL && value.type != GW_MP_NIL)) {
            s_error (req, 400, "invalid_request_error", "stream", "invalid_type",
                "stream must be a boolean");
            return -1;
        }
        fields->stream = streams && value.type == GW_MP_BOOL && value.v.b;
    }
    gw_mreader_init (&reader, data, size);
    if (fields->stream && gw_mreader_find (&reader, "stream_options") == 0) {
        gw_mreader_t peek = reader;
        if (gw_mreader_next (&peek, &value) == 0 && value.type == GW_MP_MAP &&
            gw_mreader_find (&reader, "include_usage") == 0 &&
            gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_BOOL)
            fields->include_usage = value.v.b;
    }
    if (streq (op, "chat")) {
        gw_mreader_init (&reader, data, size);
        rc = gw_mreader_find (&reader, "messages");
        if (rc == 1) {
            s_error (req, 400, "invalid_request_error", "messages",
                "missing_required_parameter", "you must provide a messages parameter");
            return -1;
        }
        if (rc || gw_mreader_next (&reader, &value) || value.type != GW_MP_ARRAY) {
            s_error (req, 400, "invalid_request_error", "messages", "invalid_type",
                "messages must be an array");
            return -1;
        }
    }
    return 0;
}

//  --------------------------------------------------------------------------
//  Requests: the exchange with the I/O actor

static zsock_t *
s_dealer (s_thread_t *thread)
{
    if (!thread->dealer) {
        thread->dealer = zsock_new (ZMQ_DEALER);
        assert (thread->dealer);
        zsock_set_sndhwm (thread->dealer, 100000);
        zsock_set_rcvhwm (thread->dealer, 100000);
        zsock_set_rcvtimeo (thread->dealer, 0);
        zsock_set_sndtimeo (thread->dealer, 1000);
        zsock_set_linger (thread->dealer, 0);
        int rc = zsock_connect (thread->dealer, "%s", thread->edge->io_endpoint);
        assert (rc == 0);
    }
    return thread->dealer;
}

//  Send a CANCEL or CREDIT for the request to the I/O actor.
static void
s_control (s_req_t *req, int id, uint32_t value)
{
    gw_msg_t *ctl = req->thread->ctl;
    gw_msg_set_id (ctl, id);
    gw_msg_set_rid (ctl, req->rid);
    if (id == GW_MSG_CANCEL)
        gw_msg_set_status (ctl, (uint16_t)value);
    else
        gw_msg_set_credit (ctl, value);
    gw_msg_send (ctl, s_dealer (req->thread));
}

//  True if fd is the socket of req's connection: its peer is the
//  request's address and port, its local port our listening port. A
//  connected TCP socket is the only one with its address pair, so a match
//  is exact.
static bool
s_client_fd_is (s_req_t *req, int fd)
{
    struct stat st;
    if (fd <= 2 || fstat (fd, &st) || !S_ISSOCK (st.st_mode))
        return false;
    struct sockaddr_storage peer, local;
    socklen_t peer_size = sizeof (peer), local_size = sizeof (local);
    if (getpeername (fd, (struct sockaddr *)&peer, &peer_size) ||
        getsockname (fd, (struct sockaddr *)&local, &local_size) ||
        peer.ss_family != AF_INET || local.ss_family != AF_INET)
        return false;
    struct sockaddr_in *p4 = (struct sockaddr_in *)&peer;
    struct sockaddr_in *l4 = (struct sockaddr_in *)&local;
    char addr[INET_ADDRSTRLEN];
    return ntohs (p4->sin_port) == req->ri->remote_port &&
        ntohs (l4->sin_port) == req->ri->server_port &&
        inet_ntop (AF_INET, &p4->sin_addr, addr, sizeof (addr)) &&
        streq (addr, req->ri->remote_addr);
}

//  Find the client's socket. civetweb 1.15 does not expose it, so match
//  the open sockets of this process against the request's peer address and
//  our listening port: first the socket this handler thread found last (a
//  keep-alive connection stays on one thread), else one pass over
//  /proc/self/fd. Done only for requests that wait longer than
//  EDGE_PEER_CHECK_MS, never on the fast path. Returns the fd or -1.
static int
s_client_fd (s_req_t *req)
{
    s_thread_t *thread = req->thread;
    if (thread->client_fd && s_client_fd_is (req, thread->client_fd - 1))
        return thread->client_fd - 1;
    DIR *dir = opendir ("/proc/self/fd");
    if (!dir)
        return -1;
    int found = -1;
    struct dirent *entry;
    while (found < 0 && (entry = readdir (dir))) {
        int fd = atoi (entry->d_name);
        if (fd != dirfd (dir) && s_client_fd_is (req, fd))
            found = fd;
    }
    closedir (dir);
    thread->client_fd = found + 1;
    return found;
}

//  True if the client has closed its connection (or it failed), seen
//  without writing: a client that goes away before the first byte of the
//  answer, or while a stream is silent, is noticed within EDGE_POLL_MS.
static bool
s_client_closed (s_req_t *req)
{
    if (req->fd == -2)
        req->fd = s_client_fd (req);
    if (req->fd < 0)
        return false;
    struct pollfd item = {req->fd, POLLRDHUP, 0};
    return poll (&item, 1, 0) > 0 && (item.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

static void s_final_headers (s_req_t *req, gw_envelope_t *env, int status);

//  Send the REQUEST (consumed) and wait for its FINAL, writing PARTIALs as
//  they come. The first PARTIAL's envelope (PROTOCOL.md §2, frame 5), when
//  there is one, gives the stream's response headers (ann.headers,
//  ann.channel), as the FINAL envelope does for other responses. Returns 0 with the FINAL in thread->in, or -1 when the
//  exchange ended without one (client gone, shutdown, local timeout; the
//  answer, if any, is written).
static int
s_exchange (s_req_t *req, gw_msg_t **request_p, bool stream)
{
    s_thread_t *thread = req->thread;
    gw_edge_t *edge = req->edge;
    zsock_t *dealer = s_dealer (thread);
    uint64_t deadline = gw_msg_deadline (*request_p);

    //  Anything left over from an earlier request on this thread (a late
    //  PARTIAL or FINAL after a cancel) is read and skipped below, by rid.
    int rc = gw_msg_send (*request_p, dealer);
    gw_msg_destroy (request_p);
    if (rc) {
        s_error (req, 503, "api_error", NULL, "edge_busy", "the gateway is overloaded");
        return -1;
    }

    int64_t now = gw_mono_ms ();
    int64_t give_up = now + (int64_t)deadline - gw_time_ms () + EDGE_GRACE_MS;
    int64_t last_write = now;
    uint32_t step = edge->window ? (edge->window / 2 ? edge->window / 2 : 1) : 0;
    uint32_t unacked = 0;
    //  Each message is read with a blocking receive that times out when
    //  the next check is due: no zmq_poll, whose readiness checks before
    //  and after sleeping cost libzmq two mailbox probes (getpid + poll)
    //  each (docs/PERFORMANCE.md); the checks run every EDGE_POLL_MS.
    void *handle = zsock_resolve (dealer);
    int64_t check_at = now + EDGE_POLL_MS;
    while (true) {
        now = gw_mono_ms ();
        int64_t wait = check_at - now;
        if (req->streaming && last_write + edge->sse_keepalive_ms - now < wait)
            wait = last_write + edge->sse_keepalive_ms - now;
        if (give_up - now < wait)
            wait = give_up - now;
        if (wait < 0)
            wait = 0;
        int timeout = (int)wait;
        zmq_setsockopt (handle, ZMQ_RCVTIMEO, &timeout, sizeof (timeout));
        rc = gw_msg_recv (thread->in, dealer);
        if (rc == GW_MSG_OK && gw_msg_has_rid (thread->in) &&
            memcmp (gw_msg_rid (thread->in), req->rid, 16) == 0) {
            int id = gw_msg_id (thread->in);
            if (id == GW_MSG_FINAL)
                return 0;
            if (id == GW_MSG_PARTIAL && stream) {
                if (!req->partial_seen && !req->streaming) {
                    thread->extra.size = 0;
                    zframe_t *head = gw_msg_envelope (thread->in);
                    if (head &&
                        gw_envelope_decode (
                            thread->env, zframe_data (head), zframe_size (head)) == 0)
                        s_final_headers (req, thread->env, 200);
                }
                req->partial_seen = true;
                zframe_t *payload = gw_msg_body (thread->in);
                size_t size = payload ? zframe_size (payload) : 0;
                //  An empty chunk would end the HTTP body: skip it.
                if (size && s_chunk (req, zframe_data (payload), size)) {
                    s_control (req, GW_MSG_CANCEL, 499);
                    req->status = 499;
                    return -1;
                }
                last_write = gw_mono_ms ();
                if (step && ++unacked >= step) {
                    s_control (req, GW_MSG_CREDIT, unacked);
                    unacked = 0;
                }
            }
        }
        //  Other messages are late ones of an earlier request: skipped.
        now = gw_mono_ms ();
        if (rc != GW_MSG_NONE && now < check_at && now < give_up &&
            !(req->streaming && now - last_write >= edge->sse_keepalive_ms))
            continue;  //  a message, and no check due yet
        check_at = now + EDGE_POLL_MS;
        int64_t stop_at = __atomic_load_n (&edge->stop_at, __ATOMIC_RELAXED);
        if (stop_at && now >= stop_at) {
            s_control (req, GW_MSG_CANCEL, 499);
            s_close_after (req);
            s_error (req, 503, "api_error", NULL, "shutting_down",
                "the gateway is shutting down");
            return -1;
        }
        if (gw_time_us () - req->start_us >= EDGE_PEER_CHECK_MS * 1000 &&
            s_client_closed (req)) {
            s_control (req, GW_MSG_CANCEL, 499);
            req->status = 499;
            req->client_gone = true;
            return -1;
        }
        if (req->streaming && now - last_write >= edge->sse_keepalive_ms) {
            if (s_chunk (req, ": keep-alive\n\n", 14)) {
                s_control (req, GW_MSG_CANCEL, 499);
                req->status = 499;
                return -1;
            }
            last_write = now;
        }
        if (now >= give_up) {
            s_control (req, GW_MSG_CANCEL, 504);
            s_error (req, 504, "api_error", NULL, "deadline_exceeded",
                "the request deadline passed");
            return -1;
        }
    }
}

//  The usage the backend reported (ann.usage, STAGES.md §2), as headers a
//  client can read without parsing the body: x-aigw-prompt-tokens,
//  x-aigw-completion-tokens, x-aigw-total-tokens.
static void
s_usage_headers (msgpack_sbuffer *extra, gw_envelope_t *env)
{
    size_t size = 0;
    const void *raw = gw_envelope_ann_raw (env, "usage", &size);
    if (!raw)
        return;
    static const char *fields[] = {"prompt_tokens", "completion_tokens", "total_tokens"};
    static const char *names[] = {"prompt", "completion", "total"};
    for (int i = 0; i < 3; i++) {
        gw_mreader_t reader;
        gw_mvalue_t value;
        gw_mreader_init (&reader, raw, size);
        if (gw_mreader_find (&reader, fields[i]) == 0 &&
            gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_UINT &&
            value.v.u <= INT64_MAX) {
            s_add (extra, "x-aigw-");
            s_add (extra, names[i]);
            s_add (extra, "-tokens: ");
            s_add_int (extra, (int64_t)value.v.u);
            s_add (extra, "\r\n");
        }
    }
}

//  Collect extra response headers from a FINAL envelope into thread->extra:
//  x-aigw-channel, Retry-After (429/503), and ann.headers (str -> str).
static void
s_final_headers (s_req_t *req, gw_envelope_t *env, int status)
{
    msgpack_sbuffer *extra = &req->thread->extra;
    extra->size = 0;
    const char *channel = gw_envelope_ann_str (env, "channel");
    if (channel && *channel && strlen (channel) <= 256 && !strpbrk (channel, "\r\n"))
        s_add_header (extra, "x-aigw-channel", 14, channel, strlen (channel));
    int64_t retry = gw_envelope_ann_int (env, "retry_after", -1);
    if (retry >= 0 && (status == 429 || status == 503))
        s_addf (extra, "Retry-After: %" PRId64 "\r\n", retry);
    s_usage_headers (extra, env);
    size_t size = 0;
    const void *raw = gw_envelope_ann_raw (env, "headers", &size);
    if (!raw)
        return;
    gw_mreader_t reader;
    gw_mvalue_t value;
    gw_mreader_init (&reader, raw, size);
    if (gw_mreader_next (&reader, &value) || value.type != GW_MP_MAP)
        return;
    uint32_t pairs = value.v.count;
    for (uint32_t i = 0; i < pairs && i < EDGE_HEADERS_MAX; i++) {
        gw_mvalue_t name;
        if (gw_mreader_next (&reader, &name) || gw_mreader_next (&reader, &value))
            return;
        if (name.type != GW_MP_STR || value.type != GW_MP_STR || name.size == 0 ||
            name.size > 64 || value.size > EDGE_HEADER_VALUE_MAX)
            continue;
        //  Names: RFC 9110 tokens; values: visible ASCII and spaces only
        //  (no CR/LF: no header injection). Framing headers stay ours.
        bool ok = true;
        for (uint32_t j = 0; j < name.size && ok; j++)
            ok = isalnum ((unsigned char)name.ptr[j]) ||
                strchr ("!#$%&'*+-.^_`|~", name.ptr[j]);
        for (uint32_t j = 0; j < value.size && ok; j++)
            ok = (value.ptr[j] >= 0x20 && value.ptr[j] < 0x7F) || value.ptr[j] == '\t';
        static const char *reserved[] = {"content-length", "content-type",
            "transfer-encoding", "connection", "date", "x-request-id", "keep-alive",
            "upgrade", "trailer", NULL};
        for (int j = 0; reserved[j] && ok; j++)
            ok = !(strlen (reserved[j]) == name.size &&
                strncasecmp (reserved[j], name.ptr, name.size) == 0);
        if (ok)
            s_add_header (extra, name.ptr, name.size, value.ptr, value.size);
    }
}

//  Answer from the FINAL in thread->in (its envelope decoded in thread->env).
static void
s_finish (s_req_t *req)
{
    s_thread_t *thread = req->thread;
    gw_msg_t *final = thread->in;
    int status = gw_msg_status (final);
    gw_envelope_t *env = thread->env;  //  decoded by s_dispatch
    zframe_t *body = gw_msg_body (final);
    const char *data = body ? (const char *)zframe_data (body) : "";
    size_t size = body ? zframe_size (body) : 0;
    msgpack_sbuffer *json = &thread->json;
    msgpack_sbuffer_clear (json);

    if (req->streaming) {
        if (status >= 200 && status <= 299)
            s_stream_end (req, false);
        else {
            s_error_from_body (json, status >= 400 ? status : 502, data, size);
            s_stream_end (req, true);
        }
        return;
    }
    s_final_headers (req, env, status);
    if (status >= 200 && status <= 299) {
        const char *ctype = gw_envelope_ann_str (env, "ctype");
        if (size && ctype && streq (ctype, "json")) {
            s_respond (req, status, "application/json", data, size);
            return;
        }
        gw_json_error_t error;
        if (size && gw_json_from_msgpack (data, size, json, 64, &error) == 0) {
            s_respond (req, status, "application/json", json->data, json->size);
            return;
        }
        thread->extra.size = 0;
        s_error (req, 502, "api_error", NULL, "bad_gateway",
            "the upstream stage returned a body that is not valid JSON: %s",
            size ? error.message : "empty body");
        return;
    }
    if (status < 400 || status > 599) {
        thread->extra.size = 0;
        s_error (req, 502, "api_error", NULL, "bad_gateway",
            "the upstream stage returned status %d", status);
        return;
    }
    s_error_from_body (json, status, data, size);
    s_respond (req, status, "application/json", json->data, json->size);
}

//  --------------------------------------------------------------------------
//  Routes

typedef struct s_route_t s_route_t;
typedef void (s_handler_fn) (s_req_t *req, const s_route_t *route);

struct s_route_t {
    const char *path;  //  exact path
    const char *method;  //  the one method allowed
    const char *op;  //  ann.op, NULL for local routes
    s_handler_fn *handler;
    bool local;  //  a /local/ route: ann.scope "local", models are local/<name>
};

//  At the end of a generating request, tell ratelimit (STAGES.md §6.3).
//  A request that never reached a backend — its FINAL (decoded in
//  thread->env) has no ann.channel, ann.usage or ann.attempts (a later
//  stage refused it), or it ended without a FINAL (client gone, deadline,
//  shutdown) before any PARTIAL came — is released: hold and lease given
//  back. One that reached a backend only ends its concurrency lease
//  ("lease_only"): the lease is released at FINAL, the hold is settled by
//  billing with the actual usage. The handler thread hands the item {rid,
//  lease_only} to the I/O actor (REQUEST for EDGE_RELEASE, never on the
//  bus, never answered); the actor sends the items that arrive one after
//  another as one REQUEST ratelimit, ann.op "release", body {releases:
//  [items]}, before it forwards the next request and at the end of each
//  turn of its loop, and drops its FINAL. A rid ratelimit holds nothing for
//  is a no-op.
static void
s_release (s_req_t *req, const char *op, bool finished)
{
    if (!req->edge->ratelimit ||
        !(streq (op, "chat") || streq (op, "completions") || streq (op, "embeddings")))
        return;
    gw_envelope_t *env = req->thread->env;
    bool reached = finished ? (gw_envelope_ann_str (env, "channel") ||
                                  gw_envelope_ann_raw (env, "usage", NULL) ||
                                  gw_envelope_ann_int (env, "attempts", 0) > 0)
                            : req->partial_seen;
    //  {rid: bin 16, lease_only: bool}
    uint8_t body[7 + 16 + 12] = {0x82, 0xa3, 'r', 'i', 'd', 0xc4, 16};
    memcpy (body + 7, req->rid, 16);
    memcpy (body + 23, "\xaalease_only", 11);
    body[34] = reached ? 0xc3 : 0xc2;
    zframe_t *frame = zframe_new (body, sizeof (body));
    uint8_t rid[16];
    gw_rid_new (rid);
    gw_msg_t *msg = gw_msg_new (GW_MSG_REQUEST);
    gw_msg_set_rid (msg, rid);
    gw_msg_set_service (msg, EDGE_RELEASE);
    gw_msg_set_body (msg, &frame);
    gw_msg_send (msg, s_dealer (req->thread));
    gw_msg_destroy (&msg);
}

//  Send one request down the slip (envelope per proto/STAGES.md: ann.op op,
//  and model, ann.scope, ann.action when not NULL), wait for its FINAL and
//  answer. Takes ownership of *body_p.
static void
s_dispatch (s_req_t *req, const char *op, const char *model, bool stream,
    bool include_usage, const char *scope, const char *action, zframe_t **body_p)
{
    gw_edge_t *edge = req->edge;
    uint64_t deadline = (uint64_t)(gw_time_ms () + edge->deadline_ms);
    char trace[33];
    s_trace_id (mg_get_header (req->conn, "traceparent"), trace);

    //  Built in the thread's envelope, which then waits for the FINAL's.
    gw_envelope_t *env = req->thread->env;
    gw_envelope_clear (env);
    gw_envelope_set_rid (env, req->rid);
    for (size_t i = 0; i < edge->slip_size; i++)
        gw_envelope_slip_append (env, edge->slip[i]);
    gw_envelope_set_cursor (env, 0);
    gw_envelope_set_deadline (env, deadline);
    gw_envelope_set_stream (env, stream);
    if (model && *model)
        gw_envelope_set_model (env, model);
    gw_envelope_set_trace (env, trace);
    gw_envelope_set_ann_str (env, "op", op);
    if (scope)
        gw_envelope_set_ann_str (env, "scope", scope);
    if (action)
        gw_envelope_set_ann_str (env, "action", action);
    const char *credential = NULL;
    const char *authorization = mg_get_header (req->conn, "Authorization");
    if (authorization && strncasecmp (authorization, "Bearer ", 7) == 0) {
        credential = authorization + 7;
        while (*credential == ' ')
            credential++;
    }
    if (!credential || !*credential)
        credential = mg_get_header (req->conn, "x-api-key");
    if (credential && *credential)
        gw_envelope_set_ann_str (env, "credential", credential);
    gw_envelope_set_ann_str (env, "ip", req->ri->remote_addr);
    gw_envelope_set_ann_str (env, "path", req->ri->local_uri ? req->ri->local_uri : "");
    if (include_usage)
        gw_envelope_set_ann_raw (env, "include_usage", "\xc3", 1);
    zframe_t *envelope = gw_envelope_encode (env);
    gw_envelope_clear (env);

    gw_msg_t *request = gw_msg_new (GW_MSG_REQUEST);
    gw_msg_set_rid (request, req->rid);
    gw_msg_set_service (request, edge->slip[0]);
    gw_msg_set_deadline (request, deadline);
    gw_msg_set_window (request, stream ? edge->window : 0);
    gw_msg_set_flags (request, stream ? GW_REQUEST_STREAM : 0);
    gw_msg_set_envelope (request, &envelope);
    gw_msg_set_body (request, body_p);
    bool finished = s_exchange (req, &request, stream) == 0;
    if (finished) {
        //  The FINAL's envelope, for s_release and s_finish.
        zframe_t *final_env = gw_msg_envelope (req->thread->in);
        if (!final_env || zframe_size (final_env) == 0 ||
            gw_envelope_decode (
                req->thread->env, zframe_data (final_env), zframe_size (final_env)))
            gw_envelope_decode (req->thread->env, "\x80", 1);  //  empty
    }
    //  The release is handed over before the response's end is written, so
    //  it reaches ratelimit before anything the client sends after it.
    s_release (req, op, finished);
    if (finished)
        s_finish (req);
}

static void
s_handle_api (s_req_t *req, const s_route_t *route)
{
    s_thread_t *thread = req->thread;
    gw_edge_t *edge = req->edge;
    s_fields_t fields = {{0}, false, false};
    zframe_t *body = NULL;

    if (streq (route->method, "POST")) {
        size_t size;
        if (s_read_body (req, &size))
            return;
        msgpack_sbuffer *pack = &thread->pack;
        msgpack_sbuffer_clear (pack);
        msgpack_packer pk;
        msgpack_packer_init (&pk, pack, msgpack_sbuffer_write);
        gw_json_limits_t limits = gw_json_limits_default ();
        limits.max_size = edge->body_max;
        gw_json_error_t error;
        if (gw_json_to_msgpack (
                thread->body ? thread->body : "", size, &pk, &limits, &error)) {
            s_error (req, 400, "invalid_request_error", NULL, "invalid_json",
                "invalid JSON body: %s at byte %zu", error.message, error.offset);
            return;
        }
        if (s_inspect (req, route->op, pack->data, pack->size, &fields))
            return;
        body = zframe_new (pack->data, pack->size);
    }
    else
        body = zframe_new ("\x80", 1);  //  empty map

    //  On a /local/ route every model is a local model: "tiny" is
    //  "local/tiny" for the stages behind (limits, routing, billing).
    char model[EDGE_MODEL_MAX + sizeof ("local/")];
    snprintf (model, sizeof (model), "%s%s",
        route->local && *fields.model && strncmp (fields.model, "local/", 6) != 0
            ? "local/"
            : "",
        fields.model);
    s_dispatch (req, route->op, model, fields.stream, fields.include_usage,
        route->local ? "local" : NULL, NULL, &body);
}

//  A time bound of GET /v1/usage: unix seconds (digits), or ISO 8601 in UTC:
//  "YYYY-MM-DD" (midnight) or "YYYY-MM-DDTHH:MM:SS[Z]". Returns 0 with *ms
//  (unix ms), or -1.
static int
s_usage_time (const char *text, uint64_t *ms)
{
    size_t len = strlen (text);
    if (len > 0 && len <= 12 && strspn (text, "0123456789") == len) {
        *ms = strtoull (text, NULL, 10) * 1000;
        return 0;
    }
    struct tm tm;
    memset (&tm, 0, sizeof (tm));
    const char *end = strptime (text, "%Y-%m-%d", &tm);
    if (!end)
        return -1;
    if (*end == 'T' || *end == ' ') {
        end = strptime (end + 1, "%H:%M:%S", &tm);
        if (!end)
            return -1;
        if (*end == 'Z')
            end++;
    }
    time_t t = timegm (&tm);
    if (*end || t < 0)
        return -1;
    *ms = (uint64_t)t * 1000;
    return 0;
}

//  GET /v1/usage[?from=..&to=..]: the caller's key's usage, answered by
//  billing (docs/API.md). The range goes as {from, to} in unix ms.
static void
s_handle_usage (s_req_t *req, const s_route_t *route)
{
    const char *query = req->ri->query_string;
    const char *names[2] = {"from", "to"};
    uint64_t bounds[2] = {0, 0};
    bool have[2] = {false, false};
    for (int i = 0; i < 2; i++) {
        char value[64];
        int n = query
            ? mg_get_var (query, strlen (query), names[i], value, sizeof (value))
            : -1;
        if (n == -1)
            continue;
        if (n < 0 || s_usage_time (value, &bounds[i])) {
            s_error (req, 400, "invalid_request_error", names[i], "invalid_value",
                "%s must be unix seconds or an ISO 8601 UTC date (YYYY-MM-DD or "
                "YYYY-MM-DDTHH:MM:SSZ)",
                names[i]);
            return;
        }
        have[i] = true;
    }
    if (have[0] && have[1] && bounds[0] > bounds[1]) {
        s_error (req, 400, "invalid_request_error", "from", "invalid_value",
            "from must not be after to");
        return;
    }
    msgpack_sbuffer *pack = &req->thread->pack;
    msgpack_sbuffer_clear (pack);
    msgpack_packer pk;
    msgpack_packer_init (&pk, pack, msgpack_sbuffer_write);
    msgpack_pack_map (&pk, have[0] + have[1]);
    for (int i = 0; i < 2; i++)
        if (have[i]) {
            gw_mpack_str (&pk, names[i]);
            msgpack_pack_uint64 (&pk, bounds[i]);
        }
    zframe_t *body = zframe_new (pack->data, pack->size);
    s_dispatch (req, "usage", NULL, false, false, NULL, NULL, &body);
}

static void
s_handle_health (s_req_t *req, const s_route_t *route)
{
    static const char ok[] = "{\"status\":\"ok\"}";
    s_respond (req, 200, "application/json", ok, sizeof (ok) - 1);
}

//  Add workers per required service from a gw.services body to workers[].
//  Returns 0, or -1 if the body is malformed.
static int
s_ready_parse (gw_edge_t *edge, const void *data, size_t size, uint64_t *workers)
{
    gw_mreader_t reader;
    gw_mvalue_t value;
    gw_mreader_init (&reader, data, size);
    if (gw_mreader_find (&reader, "services") || gw_mreader_next (&reader, &value) ||
        value.type != GW_MP_ARRAY)
        return -1;
    uint32_t count = value.v.count;
    for (uint32_t i = 0; i < count; i++) {
        if (gw_mreader_next (&reader, &value) || value.type != GW_MP_MAP)
            return -1;
        uint32_t pairs = value.v.count;
        gw_mvalue_t name = {0};
        uint64_t found = 0;
        for (uint32_t j = 0; j < pairs; j++) {
            gw_mvalue_t key;
            if (gw_mreader_next (&reader, &key) || key.type != GW_MP_STR)
                return -1;
            if (gw_mvalue_streq (&key, "name") || gw_mvalue_streq (&key, "workers")) {
                if (gw_mreader_next (&reader, &value))
                    return -1;
                if (gw_mvalue_streq (&key, "name") && value.type == GW_MP_STR)
                    name = value;
                else if (gw_mvalue_streq (&key, "workers") && value.type == GW_MP_UINT)
                    found = value.v.u;
            }
            else if (gw_mreader_skip (&reader, GW_ENVELOPE_DEPTH_MAX))
                return -1;
        }
        for (size_t k = 0; name.type == GW_MP_STR && k < edge->ready_size; k++)
            if (strlen (edge->ready[k]) == name.size &&
                memcmp (edge->ready[k], name.ptr, name.size) == 0)
                workers[k] += found;
    }
    return 0;
}

static void
s_handle_ready (s_req_t *req, const s_route_t *route)
{
    gw_edge_t *edge = req->edge;
    int64_t timeout = edge->deadline_ms < EDGE_READY_TIMEOUT_MS ? edge->deadline_ms
                                                                : EDGE_READY_TIMEOUT_MS;
    gw_msg_t *request = gw_msg_new (GW_MSG_REQUEST);
    gw_msg_set_rid (request, req->rid);
    gw_msg_set_service (request, "gw.services");
    gw_msg_set_deadline (request, (uint64_t)(gw_time_ms () + timeout));
    zframe_t *body = zframe_new ("\x80", 1);
    gw_msg_set_body (request, &body);
    if (s_exchange (req, &request, false))
        return;

    gw_msg_t *final = req->thread->in;
    uint64_t workers[EDGE_READY_MAX] = {0};
    zframe_t *frame = gw_msg_body (final);
    bool answered = gw_msg_status (final) == 200 && frame &&
        s_ready_parse (edge, zframe_data (frame), zframe_size (frame), workers) == 0;
    msgpack_sbuffer *json = &req->thread->json;
    msgpack_sbuffer_clear (json);
    char message[256] = "";
    size_t missing = 0;
    for (size_t k = 0; k < edge->ready_size; k++)
        if (!workers[k]) {
            size_t used = strlen (message);
            snprintf (message + used, sizeof (message) - used, "%s%s",
                missing ? ", " : "", edge->ready[k]);
            missing++;
        }
    if (answered && !missing) {
        s_add (json, "{\"status\":\"ready\",\"services\":{");
        for (size_t k = 0; k < edge->ready_size; k++)
            s_addf (json, "%s\"%s\":%" PRIu64, k ? "," : "", edge->ready[k], workers[k]);
        s_add (json, "}}");
        s_respond (req, 200, "application/json", json->data, json->size);
        return;
    }
    char text[320];
    if (answered)
        snprintf (text, sizeof (text), "not ready: no worker for %s", message);
    else
        snprintf (text, sizeof (text), "not ready: the broker did not answer (status %d)",
            gw_msg_status (final));
    s_error_json (json, text, strlen (text), "api_error", NULL, "not_ready");
    json->size--;  //  reopen the top-level object
    s_add (json, ",\"status\":\"not_ready\",\"missing\":[");
    missing = 0;
    for (size_t k = 0; k < edge->ready_size; k++)
        if (!workers[k])
            s_addf (json, "%s\"%s\"", missing++ ? "," : "", edge->ready[k]);
    s_add (json, "]}");
    s_respond (req, 503, "application/json", json->data, json->size);
}

//  Model management (proto/STAGES.md §7.2): /api/local/models[/{id}/action]
//  goes down the slip as ann.op "admin" with ann.action, and the router
//  passes it to the model.admin service; the body is {action, model, ...}.

#define EDGE_ADMIN_PREFIX "/api/local/models/"
#define EDGE_ID_MAX 100  //  longest model id (python/aigw_models/catalog.py)

//  The management actions on /api/local/models/{id}/<action>.
static const struct {
    const char *action;  //  path segment and action name
    const char *method;  //  the one method allowed
} s_admin_actions[] = {
    {"status", "GET"},
    {"start", "POST"},
    {"stop", "POST"},
    {"download", "POST"},
    {"settings", "PUT"},
};

//  True if id is a model id: 1..EDGE_ID_MAX of [A-Za-z0-9._:-], not
//  starting with a dot and without "..", so "model.<id>" is a service name
//  and "MODEL_PATH/<id>" a plain folder.
static bool
s_model_id_valid (const char *id, size_t size)
{
    if (size < 1 || size > EDGE_ID_MAX || id[0] == '.')
        return false;
    for (size_t i = 0; i < size; i++) {
        char c = id[i];
        if (!(isalnum ((unsigned char)c) || c == '.' || c == '_' || c == ':' || c == '-'))
            return false;
        if (c == '.' && i + 1 < size && id[i + 1] == '.')
            return false;
    }
    return true;
}

//  Answer an admin request: action on model id (NULL for list). With
//  with_body, the JSON body (an object) is read and merged: download takes
//  its fields (url, name, sha256 or files), settings takes it whole as
//  "settings" (no body = read the settings).
static void
s_admin (s_req_t *req, const char *action, const char *id)
{
    s_thread_t *thread = req->thread;
    bool reads =
        streq (req->ri->request_method, "POST") || streq (req->ri->request_method, "PUT");
    const char *data = NULL;
    size_t data_size = 0;
    if (reads) {
        size_t size;
        if (s_read_body (req, &size))
            return;
        bool merge = streq (action, "download") || streq (action, "settings");
        if (merge && size) {
            msgpack_sbuffer *pack = &thread->pack;
            msgpack_sbuffer_clear (pack);
            msgpack_packer pk;
            msgpack_packer_init (&pk, pack, msgpack_sbuffer_write);
            gw_json_limits_t limits = gw_json_limits_default ();
            limits.max_size = req->edge->body_max;
            gw_json_error_t error;
            if (gw_json_to_msgpack (thread->body, size, &pk, &limits, &error)) {
                s_error (req, 400, "invalid_request_error", NULL, "invalid_json",
                    "invalid JSON body: %s at byte %zu", error.message, error.offset);
                return;
            }
            gw_mreader_t reader;
            gw_mvalue_t value;
            gw_mreader_init (&reader, pack->data, pack->size);
            if (gw_mreader_next (&reader, &value) || value.type != GW_MP_MAP) {
                s_error (req, 400, "invalid_request_error", NULL, "invalid_type",
                    "the request body must be a JSON object");
                return;
            }
            data = pack->data;
            data_size = pack->size;
        }
    }
    msgpack_sbuffer *out = &thread->out;
    msgpack_sbuffer_clear (out);
    msgpack_packer pk;
    msgpack_packer_init (&pk, out, msgpack_sbuffer_write);
    if (data && streq (action, "download")) {
        //  {action, model} + the body's other pairs, copied as they are.
        gw_mreader_t reader;
        gw_mvalue_t value, key;
        gw_mreader_init (&reader, data, data_size);
        gw_mreader_next (&reader, &value);
        uint32_t pairs = value.v.count, kept = 0;
        gw_mreader_t scan = reader;
        for (uint32_t i = 0; i < pairs; i++) {
            if (gw_mreader_next (&scan, &key) ||
                gw_mreader_skip (&scan, GW_ENVELOPE_DEPTH_MAX * 4)) {
                s_error (req, 400, "invalid_request_error", NULL, "invalid_json",
                    "the request body is nested too deeply");
                return;
            }
            kept += !(key.type == GW_MP_STR &&
                (gw_mvalue_streq (&key, "action") || gw_mvalue_streq (&key, "model")));
        }
        msgpack_pack_map (&pk, 2 + kept);
        gw_mpack_str (&pk, "action");
        gw_mpack_str (&pk, action);
        gw_mpack_str (&pk, "model");
        gw_mpack_str (&pk, id);
        for (uint32_t i = 0; i < pairs; i++) {
            const uint8_t *start = reader.pos;
            gw_mreader_next (&reader, &key);
            gw_mreader_skip (&reader, GW_ENVELOPE_DEPTH_MAX * 4);
            if (!(key.type == GW_MP_STR &&
                    (gw_mvalue_streq (&key, "action") ||
                        gw_mvalue_streq (&key, "model"))))
                msgpack_sbuffer_write (out, (const char *)start, reader.pos - start);
        }
    }
    else {
        bool settings = data && streq (action, "settings");
        msgpack_pack_map (&pk, (id ? 2 : 1) + (settings ? 1 : 0));
        gw_mpack_str (&pk, "action");
        gw_mpack_str (&pk, action);
        if (id) {
            gw_mpack_str (&pk, "model");
            gw_mpack_str (&pk, id);
        }
        if (settings) {
            gw_mpack_str (&pk, "settings");
            msgpack_sbuffer_write (out, data, data_size);
        }
    }
    zframe_t *body = zframe_new (out->data, out->size);
    char model[EDGE_ID_MAX + sizeof ("local/")];
    if (id)
        snprintf (model, sizeof (model), "local/%s", id);
    s_dispatch (req, "admin", id ? model : NULL, false, false, NULL, action, &body);
}

//  GET /api/local/models: the management list.
static void
s_handle_admin_list (s_req_t *req, const s_route_t *route)
{
    s_admin (req, "list", NULL);
}

//  /api/local/models/{id}/<action>. Returns false if path is not one of
//  them (the caller answers 404), true once answered (400 for a bad id,
//  405 for a wrong method, or the management reply).
static bool
s_admin_route (s_req_t *req, const char *method, const char *path)
{
    size_t prefix = strlen (EDGE_ADMIN_PREFIX);
    if (strncmp (path, EDGE_ADMIN_PREFIX, prefix) != 0)
        return false;
    const char *id = path + prefix;
    const char *slash = strchr (id, '/');
    if (!slash || strchr (slash + 1, '/'))
        return false;
    const char *action = slash + 1;
    for (size_t i = 0; i < sizeof (s_admin_actions) / sizeof (s_admin_actions[0]); i++) {
        if (!streq (s_admin_actions[i].action, action))
            continue;
        const char *allowed = s_admin_actions[i].method;
        if (!streq (allowed, method)) {
            s_addf (&req->thread->extra, "Allow: %s, OPTIONS\r\n", allowed);
            s_error (req, 405, "invalid_request_error", NULL, "method_not_allowed",
                "method %s is not allowed for %s (use %s)", method, path, allowed);
            return true;
        }
        size_t size = (size_t)(slash - id);
        if (!s_model_id_valid (id, size)) {
            s_error (req, 400, "invalid_request_error", "id", "invalid_model_id",
                "the model id in the path must be 1 to %d characters of A-Z a-z 0-9 . _ "
                ": "
                "- (not starting with a dot, no \"..\")",
                EDGE_ID_MAX);
            return true;
        }
        char text[EDGE_ID_MAX + 1];
        memcpy (text, id, size);
        text[size] = 0;
        s_admin (req, action, text);
        return true;
    }
    return false;
}

static const s_route_t s_routes[] = {
    {"/v1/chat/completions", "POST", "chat", s_handle_api, false},
    {"/v1/completions", "POST", "completions", s_handle_api, false},
    {"/v1/embeddings", "POST", "embeddings", s_handle_api, false},
    {"/v1/models", "GET", "models", s_handle_api, false},
    {"/v1/usage", "GET", "usage", s_handle_usage, false},
    {"/local/chat/completions", "POST", "chat", s_handle_api, true},
    {"/local/completions", "POST", "completions", s_handle_api, true},
    {"/local/embeddings", "POST", "embeddings", s_handle_api, true},
    {"/local/models", "GET", "models", s_handle_api, true},
    {"/api/local/models", "GET", "admin", s_handle_admin_list, false},
    {"/health", "GET", NULL, s_handle_health, false},
    {"/health/ready", "GET", NULL, s_handle_ready, false},
};

static void
s_preflight (s_req_t *req)
{
    msgpack_sbuffer *extra = &req->thread->extra;
    extra->size = 0;
    s_add (extra,
        "Access-Control-Allow-Methods: GET, POST, PUT, OPTIONS\r\n"
        "Access-Control-Allow-Headers: Authorization, Content-Type, x-api-key, "
        "X-Request-Id, traceparent, tracestate");
    //  Also allow what the browser asks for (SDKs send their own headers),
    //  if it is a plain list of header names.
    const char *asked = mg_get_header (req->conn, "Access-Control-Request-Headers");
    if (asked && strlen (asked) <= 1024) {
        bool ok = true;
        for (const char *p = asked; *p && ok; p++)
            ok = isalnum ((unsigned char)*p) || strchr ("-_, ", *p);
        if (ok && *asked)
            s_addf (extra, ", %s", asked);
    }
    s_add (extra, "\r\nAccess-Control-Max-Age: 600\r\n");
    msgpack_sbuffer *out = &req->thread->out;
    msgpack_sbuffer_clear (out);
    s_head (req, out, 204, NULL, -2);
    req->status = 204;
    s_write (req, out->data, out->size);
}

static void
s_route (s_req_t *req)
{
    const char *method = req->ri->request_method ? req->ri->request_method : "";
    const char *path = req->ri->local_uri ? req->ri->local_uri : "";
    //  Only the API routes read a body: keep-alive after an unread one would
    //  make civetweb read and discard it, so close instead.
    const char *te = mg_get_header (req->conn, "Transfer-Encoding");
    bool has_body = req->ri->content_length > 0 || (te && strcasestr (te, "chunked"));
    bool reads_body = false;
    for (size_t i = 0; i < sizeof (s_routes) / sizeof (s_routes[0]); i++)
        if (streq (s_routes[i].path, path) && streq (s_routes[i].method, method))
            reads_body = streq (method, "POST");
    if (strncmp (path, EDGE_ADMIN_PREFIX, strlen (EDGE_ADMIN_PREFIX)) == 0)
        reads_body = streq (method, "POST") || streq (method, "PUT");
    if (has_body && !reads_body)
        s_close_after (req);
    if (streq (method, "OPTIONS")) {
        s_preflight (req);
        return;
    }
    for (size_t i = 0; i < sizeof (s_routes) / sizeof (s_routes[0]); i++) {
        const s_route_t *route = &s_routes[i];
        if (!streq (route->path, path))
            continue;
        if (streq (route->method, method)) {
            route->handler (req, route);
            return;
        }
        s_addf (&req->thread->extra, "Allow: %s, OPTIONS\r\n", route->method);
        s_error (req, 405, "invalid_request_error", NULL, "method_not_allowed",
            "method %s is not allowed for %s (use %s)", method, path, route->method);
        return;
    }
    if (s_admin_route (req, method, path))
        return;
    s_error (req, 404, "invalid_request_error", NULL, "unknown_url",
        "Invalid URL (%s %s)", method, path);
}

//  --------------------------------------------------------------------------
//  civetweb callbacks

static void
s_thread_reset (s_thread_t *thread)
{
    //  Let go of the last FINAL's frames (bodies can be large).
    zframe_t *frame = gw_msg_take_body (thread->in);
    zframe_destroy (&frame);
    frame = gw_msg_take_envelope (thread->in);
    zframe_destroy (&frame);
    thread->extra.size = 0;
    s_sbuffer_trim (&thread->pack);
    s_sbuffer_trim (&thread->json);
    s_sbuffer_trim (&thread->out);
    if (thread->body_alloc > EDGE_BUF_KEEP) {
        free (thread->body);
        thread->body = NULL;
        thread->body_alloc = 0;
    }
}

//  A request slower than AIGW_SLOW_REQUEST_MS: one warning with where the
//  time went, from the stage timings its FINAL carried (each stage's
//  arrival and hand-off, in ms after the edge received the request), e.g.
//  "slow request 112.4 ms status=200 rid=... auth 0.21-0.25 ratelimit
//  0.26-0.30 router 0.31-0.33 bridge 0.35-111.9".
static void
s_slow_log (s_req_t *req, int64_t took_us)
{
    char stages[512] = "";
    size_t used = 0;
    gw_envelope_t *env = req->thread->env;
    if (memcmp (gw_envelope_rid (env), req->rid, 16) == 0) {
        for (size_t i = 0; i < gw_envelope_timings (env) && used < sizeof (stages); i++) {
            uint64_t t_in = 0, t_out = 0;
            const char *service = gw_envelope_timing (env, i, &t_in, &t_out);
            int n = snprintf (stages + used, sizeof (stages) - used, " %s %.2f-%.2f",
                service, ((double)t_in - (double)req->start_us) / 1000.0,
                ((double)t_out - (double)req->start_us) / 1000.0);
            if (n < 0)
                break;
            used += (size_t)n;
        }
    }
    gw_log (GW_LOG_WARN, NULL, "slow request %.1f ms status=%d rid=%s%s",
        (double)took_us / 1000.0, req->status, req->rid_text,
        *stages ? stages : " (no stage timings)");
}

static void
s_access_log (s_req_t *req)
{
    int64_t slow_ms = req->edge->slow_ms;
    if (slow_ms && req->ri && gw_time_us () - req->start_us >= slow_ms * 1000)
        s_slow_log (req, gw_time_us () - req->start_us);
    if (gw_log_enabled (GW_LOG_DEBUG))
        gw_log (GW_LOG_DEBUG, NULL,
            "access %s %s %d %" PRIu64 " bytes %" PRId64 " us rid=%s",
            req->ri && req->ri->request_method ? req->ri->request_method : "-",
            req->ri && req->ri->local_uri ? req->ri->local_uri : "-", req->status,
            req->bytes, gw_time_us () - req->start_us, req->rid_text);
}

static int
s_begin_request (struct mg_connection *conn)
{
    s_thread_t *thread = (s_thread_t *)mg_get_thread_pointer (conn);
    assert (thread);
    s_req_t req;
    s_req_init (&req, conn, thread);
    s_route (&req);
    s_access_log (&req);
    s_thread_reset (thread);
    return req.status > 0 && req.status < 1000 ? req.status : 500;
}

//  Errors civetweb itself answers (malformed request line, headers too
//  large, ...): the OpenAI error shape too.
static int
s_http_error (struct mg_connection *conn, int status, const char *errmsg)
{
    s_thread_t *thread = (s_thread_t *)mg_get_thread_pointer (conn);
    if (!thread)
        return 1;  //  not a handler thread: civetweb's own page
    s_req_t req;
    s_req_init (&req, conn, thread);
    s_close_after (&req);
    s_error (&req, status, s_status_type (status), NULL, NULL, "%s",
        errmsg && *errmsg ? errmsg : mg_get_response_code_text (conn, status));
    s_access_log (&req);
    s_thread_reset (thread);
    return 0;
}

static int
s_log_message (const struct mg_connection *conn, const char *message)
{
    gw_warn ("civetweb: %s", message);
    return 1;
}

static void *
s_init_thread (const struct mg_context *ctx, int thread_type)
{
    if (thread_type != 1)
        return NULL;
    s_thread_t *thread = (s_thread_t *)zmalloc (sizeof (s_thread_t));
    assert (thread);
    thread->edge = (gw_edge_t *)mg_get_user_data (ctx);
    thread->in = gw_msg_new (0);
    gw_msg_set_body_max (thread->in, EDGE_RESPONSE_MAX);
    thread->ctl = gw_msg_new (GW_MSG_CANCEL);
    thread->env = gw_envelope_new ();
    msgpack_sbuffer_init (&thread->pack);
    msgpack_sbuffer_init (&thread->json);
    msgpack_sbuffer_init (&thread->out);
    msgpack_sbuffer_init (&thread->extra);
    return thread;
}

static void
s_exit_thread (const struct mg_context *ctx, int thread_type, void *pointer)
{
    s_thread_t *thread = (s_thread_t *)pointer;
    if (!thread)
        return;
    zsock_destroy (&thread->dealer);
    gw_msg_destroy (&thread->in);
    gw_msg_destroy (&thread->ctl);
    gw_envelope_destroy (&thread->env);
    free (thread->body);
    msgpack_sbuffer_destroy (&thread->pack);
    msgpack_sbuffer_destroy (&thread->json);
    msgpack_sbuffer_destroy (&thread->out);
    msgpack_sbuffer_destroy (&thread->extra);
    free (thread);
}

//  --------------------------------------------------------------------------
//  The I/O actor: owns the gw_client session

static void
s_flight_free (void **item_p)
{
    s_flight_t *flight = (s_flight_t *)*item_p;
    if (flight) {
        zframe_destroy (&flight->handler);
        free (flight);
        *item_p = NULL;
    }
}

//  Answer a handler with a locally made FINAL.
static void
s_io_reply (zsock_t *router, zframe_t *handler, const uint8_t rid[16], uint16_t status,
    const char *type, const char *code, const char *message)
{
    gw_msg_t *final = gw_msg_new (GW_MSG_FINAL);
    gw_msg_set_routing_id (final, handler);
    gw_msg_set_rid (final, rid);
    gw_msg_set_status (final, status);
    zframe_t *body = gw_msg_error_body (type, code, message);
    gw_msg_set_body (final, &body);
    gw_msg_send (final, router);
    gw_msg_destroy (&final);
}

//  Send count release items (packed in items) as one REQUEST ratelimit,
//  ann.op "release", body {releases: [items]} (STAGES.md §6.3). Not sent
//  (no bus): the holds and leases expire by themselves.
static void
s_io_release (gw_client_t *client, msgpack_sbuffer *items, uint32_t count)
{
    gw_client_send_batch (client, "ratelimit", "release", "releases", items->data,
        items->size, count, 5000);
}

static void
s_io_actor (zsock_t *pipe, void *args)
{
    gw_thread_name ("aigw-edge-io");
    gw_edge_t *edge = (gw_edge_t *)args;
    zsock_t *router = zsock_new (ZMQ_ROUTER);
    assert (router);
    zsock_set_router_mandatory (router, 1);
    zsock_set_sndhwm (router, 100000);
    zsock_set_rcvhwm (router, 100000);
    zsock_set_sndtimeo (router, 0);
    zsock_set_rcvtimeo (router, 0);
    zsock_set_linger (router, 0);
    int rc = zsock_bind (router, "%s", edge->io_endpoint);
    assert (rc == 0);
    gw_client_t *client = gw_client_new (edge->bus);
    assert (client);  //  the endpoint was checked when configured
    gw_client_set_body_max (client, EDGE_RESPONSE_MAX);
    zhashx_t *flights = gw_rid_map_new (s_flight_free);
    size_t request_max = edge->body_max * 3 + 1024 * 1024;  //  msgpack may outgrow JSON
    gw_msg_t *in = NULL;
    msgpack_sbuffer releases;  //  release items of this turn, packed
    msgpack_sbuffer_init (&releases);
    uint32_t released = 0;
    zsock_signal (pipe, 0);

    while (true) {
        zmq_pollitem_t items[] = {{zsock_resolve (pipe), 0, ZMQ_POLLIN, 0},
            {zsock_resolve (router), 0, ZMQ_POLLIN, 0},
            {zsock_resolve (gw_client_socket (client)), 0, ZMQ_POLLIN, 0}};
        int timeout = gw_client_timeout (client);
        if (timeout < 0)
            timeout = 0;
        if (zmq_poll (items, 3, timeout) < 0 && zmq_errno () == ETERM)
            break;
        if (items[0].revents & ZMQ_POLLIN) {
            char *command = zstr_recv (pipe);
            bool term = !command || streq (command, "$TERM");
            zstr_free (&command);
            if (term)
                break;
        }
        //  Handlers: REQUEST, CANCEL, CREDIT.
        while (true) {
            if (!in) {
                in = gw_msg_new (0);
                gw_msg_set_body_max (in, request_max);
            }
            rc = gw_msg_recv (in, router);
            if (rc == GW_MSG_NONE)
                break;
            if (rc != GW_MSG_OK || !gw_msg_has_rid (in))
                continue;
            const uint8_t *rid = gw_msg_rid (in);
            int id = gw_msg_id (in);
            if (id == GW_MSG_REQUEST && streq (gw_msg_service (in), EDGE_RELEASE)) {
                zframe_t *item = gw_msg_body (in);
                if (item && zframe_size (item) > 0 && zframe_size (item) <= 256) {
                    msgpack_sbuffer_write (
                        &releases, (const char *)zframe_data (item), zframe_size (item));
                    released++;
                }
                continue;
            }
            if (id == GW_MSG_REQUEST && released) {
                //  Releases leave before any later request: a client that
                //  got its response (the release was handed over before
                //  it was written) and sends again is never refused for a
                //  lease it no longer holds.
                s_io_release (client, &releases, released);
                msgpack_sbuffer_clear (&releases);
                released = 0;
            }
            if (id == GW_MSG_REQUEST) {
                zframe_t *handler = zframe_dup (gw_msg_routing_id (in));
                if (zhashx_lookup (flights, rid)) {
                    s_io_reply (router, handler, rid, 409, "invalid_request_error",
                        "duplicate_request_id",
                        "a request with this X-Request-Id is in flight");
                    zframe_destroy (&handler);
                    continue;
                }
                s_flight_t *flight = (s_flight_t *)zmalloc (sizeof (s_flight_t));
                assert (flight);
                memcpy (flight->rid, rid, 16);
                flight->handler = handler;
                gw_msg_set_routing_id (in, NULL);
                if (gw_client_send (client, &in) == 0)
                    zhashx_insert (flights, flight->rid, flight);
                else {
                    s_io_reply (router, handler, flight->rid, 503, "api_error",
                        "broker_unavailable", "the gateway is not connected to its bus");
                    s_flight_free ((void **)&flight);
                }
            }
            else if (id == GW_MSG_CANCEL) {
                gw_client_cancel (client, rid, gw_msg_status (in));
                zhashx_delete (flights, rid);
            }
            else if (id == GW_MSG_CREDIT)
                gw_client_credit (client, rid, gw_msg_credit (in));
        }
        if (released) {
            s_io_release (client, &releases, released);
            msgpack_sbuffer_clear (&releases);
            released = 0;
        }
        //  The bus: PARTIAL and FINAL to their handler threads (a FINAL
        //  for no flight, a release's, is dropped).
        gw_client_tick (client);
        gw_msg_t *msg;
        while ((msg = gw_client_recv (client))) {
            s_flight_t *flight = (s_flight_t *)zhashx_lookup (flights, gw_msg_rid (msg));
            if (flight) {
                gw_msg_set_routing_id (msg, flight->handler);
                gw_msg_send (msg, router);
                if (gw_msg_id (msg) == GW_MSG_FINAL)
                    zhashx_delete (flights, flight->rid);
            }
            gw_msg_destroy (&msg);
        }
    }
    if (released)
        s_io_release (client, &releases, released);
    msgpack_sbuffer_destroy (&releases);
    gw_msg_destroy (&in);
    zhashx_destroy (&flights);
    gw_client_destroy (&client);
    zsock_destroy (&router);
}

//  --------------------------------------------------------------------------
//  Public API

static int
s_set_int (const char *value, int64_t min, int64_t max, int64_t *out)
{
    char *end = NULL;
    errno = 0;
    long long n = strtoll (value, &end, 10);
    if (errno || end == value || *end || n < min || n > max)
        return -1;
    *out = n;
    return 0;
}

int
gw_edge_set (gw_edge_t *self, const char *name, const char *value)
{
    assert (self);
    if (!name || !value || self->ctx)
        return -1;
    int64_t n = 0;
    if (streq (name, "PORT")) {
        if (s_set_int (value, 0, 65535, &n))
            return -1;
        self->port = (int)n;
    }
    else if (streq (name, "AIGW_LISTEN")) {
        //  civetweb has no IPv6 here: a dotted IPv4 address.
        struct in_addr addr;
        if (inet_pton (AF_INET, value, &addr) != 1)
            return -1;
        free (self->listen);
        self->listen = strdup (value);
    }
    else if (streq (name, "AIGW_BUS")) {
        if (!*value || strlen (value) > 255)
            return -1;
        free (self->bus);
        self->bus = strdup (value);
    }
    else if (streq (name, "AIGW_SLIP")) {
        char *items[EDGE_SLIP_MAX];
        int count = s_list_parse (value, items, EDGE_SLIP_MAX, true);
        if (count < 0)
            return -1;
        s_list_free (self->slip, &self->slip_size);
        memcpy (self->slip, items, sizeof (char *) * (size_t)count);
        self->slip_size = (size_t)count;
        self->ratelimit = false;
        for (int i = 0; i < count; i++)
            self->ratelimit |= streq (items[i], "ratelimit");
    }
    else if (streq (name, "AIGW_READY_SERVICES")) {
        char *items[EDGE_READY_MAX];
        int count = s_list_parse (value, items, EDGE_READY_MAX, true);
        if (count < 0)
            return -1;
        s_list_free (self->ready, &self->ready_size);
        memcpy (self->ready, items, sizeof (char *) * (size_t)count);
        self->ready_size = (size_t)count;
    }
    else if (streq (name, "AIGW_BODY_MAX")) {
        if (s_set_int (value, 2, 1024LL * 1024 * 1024, &n))
            return -1;
        self->body_max = (size_t)n;
    }
    else if (streq (name, "AIGW_DEADLINE_MS")) {
        if (s_set_int (value, 1, 24LL * 3600 * 1000, &n))
            return -1;
        self->deadline_ms = n;
    }
    else if (streq (name, "AIGW_STREAM_WINDOW")) {
        if (s_set_int (value, 0, 0x7FFFFFFF, &n))
            return -1;
        self->window = (uint32_t)n;
    }
    else if (streq (name, "AIGW_EDGE_THREADS")) {
        if (s_set_int (value, 1, 4096, &n))
            return -1;
        self->threads = (int)n;
    }
    else if (streq (name, "AIGW_CORS_ORIGINS")) {
        if (!*value || strlen (value) > 4096 || strpbrk (value, "\r\n"))
            return -1;
        free (self->cors);
        self->cors = strdup (value);
    }
    else if (streq (name, "AIGW_SECURITY_HEADERS")) {
        if (s_set_int (value, 0, 1, &n))
            return -1;
        self->security = n == 1;
    }
    else if (streq (name, "AIGW_SSE_KEEPALIVE_MS")) {
        if (s_set_int (value, 10, 3600000, &n))
            return -1;
        self->sse_keepalive_ms = (int)n;
    }
    else if (streq (name, "AIGW_REQUEST_TIMEOUT_MS")) {
        if (s_set_int (value, 100, 3600000, &n))
            return -1;
        self->request_timeout_ms = (int)n;
    }
    else if (streq (name, "AIGW_KEEPALIVE_MS")) {
        if (s_set_int (value, 0, 3600000, &n))
            return -1;
        self->keepalive_ms = (int)n;
    }
    else if (streq (name, "AIGW_DRAIN_MS")) {
        if (s_set_int (value, 0, 3600000, &n))
            return -1;
        self->drain_ms = (int)n;
    }
    else if (streq (name, "AIGW_SLOW_REQUEST_MS")) {
        if (s_set_int (value, 0, 3600000, &n))
            return -1;
        self->slow_ms = n;
    }
    else
        return -1;
    return 0;
}

static const char *s_settings[] = {"PORT", "AIGW_LISTEN", "AIGW_BUS", "AIGW_SLIP",
    "AIGW_READY_SERVICES", "AIGW_BODY_MAX", "AIGW_DEADLINE_MS", "AIGW_STREAM_WINDOW",
    "AIGW_EDGE_THREADS", "AIGW_CORS_ORIGINS", "AIGW_SECURITY_HEADERS",
    "AIGW_SSE_KEEPALIVE_MS", "AIGW_REQUEST_TIMEOUT_MS", "AIGW_KEEPALIVE_MS",
    "AIGW_DRAIN_MS", "AIGW_SLOW_REQUEST_MS", NULL};

gw_edge_t *
gw_edge_new (void)
{
    gw_edge_t *self = (gw_edge_t *)zmalloc (sizeof (gw_edge_t));
    assert (self);
    self->bus = strdup ("tcp://127.0.0.1:5555");
    self->listen = strdup ("0.0.0.0");
    self->port = 8080;
    self->body_max = 32 * 1024 * 1024;
    self->deadline_ms = 600000;
    self->window = 64;
    self->threads = 64;
    self->cors = strdup ("*");
    self->security = true;
    self->sse_keepalive_ms = 500;
    self->request_timeout_ms = 30000;
    self->keepalive_ms = 5000;
    self->drain_ms = 10000;
    int rc = gw_edge_set (self, "AIGW_SLIP", "auth,ratelimit,router");
    assert (rc == 0);
    for (int i = 0; s_settings[i]; i++) {
        const char *value = getenv (s_settings[i]);
        if (value && *value && gw_edge_set (self, s_settings[i], value))
            gw_warn ("edge: ignoring invalid %s=%s", s_settings[i], value);
    }
    snprintf (self->io_endpoint, sizeof (self->io_endpoint), "inproc://gw-edge-io-%p",
        (void *)self);
    return self;
}

void
gw_edge_destroy (gw_edge_t **self_p)
{
    assert (self_p);
    if (*self_p) {
        gw_edge_t *self = *self_p;
        if (self->ctx) {
            //  Requests in flight get drain_ms to finish, then handlers give up.
            __atomic_store_n (
                &self->stop_at, gw_mono_ms () + self->drain_ms, __ATOMIC_RELAXED);
            mg_stop (self->ctx);
            self->ctx = NULL;
        }
        zactor_destroy (&self->io);
        if (self->library)
            mg_exit_library ();
        s_list_free (self->slip, &self->slip_size);
        s_list_free (self->ready, &self->ready_size);
        free (self->bus);
        free (self->listen);
        free (self->cors);
        free (self);
        *self_p = NULL;
    }
}

int
gw_edge_start (gw_edge_t *self)
{
    assert (self);
    assert (!self->io);
    if (self->ready_size == 0) {
        //  Default: every slip service plus the bridge.
        for (size_t i = 0; i < self->slip_size && self->ready_size < EDGE_READY_MAX - 1;
             i++)
            self->ready[self->ready_size++] = strdup (self->slip[i]);
        bool bridge = false;
        for (size_t i = 0; i < self->ready_size; i++)
            bridge |= streq (self->ready[i], "bridge");
        if (!bridge)
            self->ready[self->ready_size++] = strdup ("bridge");
    }
    self->io = zactor_new (s_io_actor, self);
    assert (self->io);

    mg_init_library (0);
    self->library = true;
    char ports[64], threads[16], request_timeout[16], keepalive[16];
    snprintf (ports, sizeof (ports), "%s:%d", self->listen, self->port);
    snprintf (threads, sizeof (threads), "%d", self->threads);
    snprintf (request_timeout, sizeof (request_timeout), "%d", self->request_timeout_ms);
    snprintf (keepalive, sizeof (keepalive), "%d", self->keepalive_ms);
    const char *options[] = {"listening_ports", ports, "num_threads", threads,
        "tcp_nodelay", "1", "request_timeout_ms", request_timeout, "enable_keep_alive",
        "yes", "keep_alive_timeout_ms", keepalive, "access_control_allow_origin", "",
        "access_control_allow_methods", "", NULL};
    struct mg_callbacks callbacks;
    memset (&callbacks, 0, sizeof (callbacks));
    callbacks.begin_request = s_begin_request;
    callbacks.http_error = s_http_error;
    callbacks.log_message = s_log_message;
    callbacks.init_thread = s_init_thread;
    callbacks.exit_thread = s_exit_thread;
    self->ctx = mg_start (&callbacks, self, options);
    if (!self->ctx) {
        gw_error ("edge: cannot listen on %s", ports);
        return -1;
    }
    struct mg_server_port server_ports[4];
    memset (server_ports, 0, sizeof (server_ports));
    int count = mg_get_server_ports (self->ctx, 4, server_ports);
    self->bound_port = count > 0 ? server_ports[0].port : self->port;
    gw_info ("edge: listening on %s:%d, bus %s, slip %s%s", self->listen,
        self->bound_port, self->bus, self->slip[0], self->slip_size > 1 ? ",..." : "");
    return 0;
}

int
gw_edge_port (gw_edge_t *self)
{
    assert (self);
    return self->ctx ? self->bound_port : 0;
}

//  --------------------------------------------------------------------------
//  Self test

//  --------------------------------------------------------------------------
//  Self test: broker, a fake stage and the edge in-process, driven with
//  libcurl (and raw sockets where libcurl would hide what is tested).

static int s_fake_cancels;  //  CANCELs the fake stage saw (atomic)
static int s_fake_cancel_reason;  //  reason of the last one (atomic)

static const char *s_test_json =
    "{\"id\":\"cmpl-1\",\"object\":\"chat.completion\",\"n\":[1, 2.5]}";

static zframe_t *
s_test_envelope (
    const char *ctype, const char *channel, int64_t retry_after, bool headers)
{
    gw_envelope_t *env = gw_envelope_new ();
    if (ctype)
        gw_envelope_set_ann_str (env, "ctype", ctype);
    if (channel)
        gw_envelope_set_ann_str (env, "channel", channel);
    if (retry_after >= 0)
        gw_envelope_set_ann_int (env, "retry_after", retry_after);
    if (headers) {
        msgpack_sbuffer sbuf;
        msgpack_sbuffer_init (&sbuf);
        msgpack_packer pk;
        msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
        msgpack_pack_map (&pk, 3);
        gw_mpack_str (&pk, "x-ratelimit-remaining-requests");
        gw_mpack_str (&pk, "0");
        gw_mpack_str (&pk, "x-evil");
        gw_mpack_str (&pk, "a\r\nSet-Cookie: b");
        gw_mpack_str (&pk, "content-length");
        gw_mpack_str (&pk, "5");
        gw_envelope_set_ann_raw (env, "headers", sbuf.data, sbuf.size);
        msgpack_sbuffer_destroy (&sbuf);
    }
    zframe_t *frame = gw_envelope_encode (env);
    gw_envelope_destroy (&env);
    return frame;
}

//  Wait (up to 5 s) for the CANCEL of rid, count it, answer FINAL 499.
static void
s_fake_await_cancel (gw_worker_t *worker, const uint8_t rid[16])
{
    int64_t until = gw_mono_ms () + 5000;
    while (gw_mono_ms () < until) {
        gw_msg_t *msg = gw_worker_wait (worker, 50);
        if (msg && gw_msg_id (msg) == GW_MSG_CANCEL &&
            memcmp (gw_msg_rid (msg), rid, 16) == 0) {
            __atomic_store_n (
                &s_fake_cancel_reason, gw_msg_status (msg), __ATOMIC_SEQ_CST);
            __atomic_add_fetch (&s_fake_cancels, 1, __ATOMIC_SEQ_CST);
            gw_worker_final (worker, rid, 499, NULL, NULL);
            gw_msg_destroy (&msg);
            return;
        }
        gw_msg_destroy (&msg);
    }
}

//  Send one PARTIAL, waiting for stream credit if needed. 0 or -1.
static int
s_fake_partial (gw_worker_t *worker, const uint8_t rid[16], const char *text)
{
    int64_t until = gw_mono_ms () + 5000;
    while (gw_mono_ms () < until) {
        int rc = gw_worker_partial (worker, rid, text, strlen (text));
        if (rc != GW_AGAIN)
            return rc == GW_OK ? 0 : -1;
        gw_msg_t *msg = gw_worker_wait (worker, 20);
        gw_msg_destroy (&msg);
    }
    return -1;
}

static void
s_pack_opt (msgpack_packer *pk, const char *text)
{
    if (text)
        gw_mpack_str (pk, text);
    else
        msgpack_pack_nil (pk);
}

//  The fake stage's behaviour, by requested model.
static void
s_fake_handle (gw_worker_t *worker, gw_msg_t *request)
{
    uint8_t rid[16];
    memcpy (rid, gw_msg_rid (request), 16);
    gw_envelope_t *env = gw_envelope_new ();
    zframe_t *frame = gw_msg_envelope (request);
    if (!frame || gw_envelope_decode (env, zframe_data (frame), zframe_size (frame))) {
        gw_worker_error (worker, rid, 500, "api_error", "bad_envelope", "bad envelope");
        gw_envelope_destroy (&env);
        return;
    }
    const char *model = gw_envelope_model (env) ? gw_envelope_model (env) : "";
    const char *op = gw_envelope_ann_str (env, "op");
    char text[64];
    if (op && streq (op, "usage")) {
        //  GET /v1/usage: answer with the query body the edge built.
        zframe_t *body = zframe_dup (gw_msg_body (request));
        gw_worker_final (worker, rid, 200, NULL, &body);
    }
    else if (streq (model, "streamhead")) {
        //  The first PARTIAL carries the response headers (frame 5).
        zframe_t *head = s_test_envelope (NULL, "ch-9", -1, true);
        if (gw_worker_partial_env (worker, rid, "data: {\"i\":0}\n\n", 15, &head) ==
            GW_OK)
            s_fake_partial (worker, rid, "data: [DONE]\n\n");
        zframe_destroy (&head);
        gw_worker_final (worker, rid, 200, NULL, NULL);
    }
    else if (streq (model, "json")) {
        zframe_t *envelope = s_test_envelope ("json", "ch-1", -1, false);
        zframe_t *body = zframe_new (s_test_json, strlen (s_test_json));
        gw_worker_final (worker, rid, 200, &envelope, &body);
    }
    else if (streq (model, "stream") || streq (model, "streamerr")) {
        bool ok = streq (model, "stream");
        int rc = 0;
        for (int i = 0; i < (ok ? 10 : 2) && rc == 0; i++) {
            snprintf (text, sizeof (text), "data: {\"i\":%d}\n\n", i);
            rc = s_fake_partial (worker, rid, text);
        }
        if (ok && rc == 0)
            rc = s_fake_partial (worker, rid, "data: [DONE]\n\n");
        if (ok)
            gw_worker_final (worker, rid, 200, NULL, NULL);
        else
            gw_worker_error (
                worker, rid, 502, "api_error", "upstream_failed", "upstream broke");
    }
    else if (streq (model, "err429")) {
        zframe_t *envelope = s_test_envelope (NULL, NULL, 7, true);
        zframe_t *body =
            gw_msg_error_body ("rate_limit_error", "rate_limit_exceeded", "slow down");
        gw_worker_final (worker, rid, 429, &envelope, &body);
    }
    else if (streq (model, "garbage")) {
        zframe_t *body = zframe_new ("\x2a", 1);
        gw_worker_final (worker, rid, 500, NULL, &body);
    }
    else if (streq (model, "hold"))
        s_fake_await_cancel (worker, rid);
    else if (streq (model, "holdstream")) {
        s_fake_partial (worker, rid, "data: {\"i\":0}\n\n");
        s_fake_await_cancel (worker, rid);
    }
    else {
        //  Echo what the edge sent, as a msgpack map.
        msgpack_sbuffer sbuf;
        msgpack_sbuffer_init (&sbuf);
        msgpack_packer pk;
        msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
        char hex[33];
        gw_rid_hex (rid, hex);
        size_t size = 0;
        const uint8_t *usage =
            (const uint8_t *)gw_envelope_ann_raw (env, "include_usage", &size);
        msgpack_pack_map (&pk, 14);
        gw_mpack_str (&pk, "op");
        s_pack_opt (&pk, gw_envelope_ann_str (env, "op"));
        gw_mpack_str (&pk, "credential");
        s_pack_opt (&pk, gw_envelope_ann_str (env, "credential"));
        gw_mpack_str (&pk, "path");
        s_pack_opt (&pk, gw_envelope_ann_str (env, "path"));
        gw_mpack_str (&pk, "ip");
        s_pack_opt (&pk, gw_envelope_ann_str (env, "ip"));
        gw_mpack_str (&pk, "include_usage");
        if (usage && size == 1 && usage[0] == 0xc3)
            msgpack_pack_true (&pk);
        else
            msgpack_pack_false (&pk);
        gw_mpack_str (&pk, "trace");
        s_pack_opt (&pk, gw_envelope_trace (env));
        gw_mpack_str (&pk, "stream");
        if (gw_envelope_stream (env))
            msgpack_pack_true (&pk);
        else
            msgpack_pack_false (&pk);
        gw_mpack_str (&pk, "model");
        s_pack_opt (&pk, gw_envelope_model (env));
        gw_mpack_str (&pk, "rid");
        gw_mpack_str (&pk, hex);
        gw_mpack_str (&pk, "window");
        msgpack_pack_uint32 (&pk, gw_msg_window (request));
        gw_mpack_str (&pk, "flags");
        msgpack_pack_uint32 (&pk, gw_msg_flags (request));
        gw_mpack_str (&pk, "slip0");
        s_pack_opt (&pk, gw_envelope_slip (env, 0));
        gw_mpack_str (&pk, "deadline_ok");
        int64_t left = (int64_t)gw_envelope_deadline (env) - gw_time_ms ();
        if (left > 0 && left <= 1500 &&
            gw_envelope_deadline (env) == gw_msg_deadline (request))
            msgpack_pack_true (&pk);
        else
            msgpack_pack_false (&pk);
        gw_mpack_str (&pk, "score");
        msgpack_pack_double (&pk, 0.25);
        zframe_t *body = zframe_new (sbuf.data, sbuf.size);
        msgpack_sbuffer_destroy (&sbuf);
        gw_worker_final (worker, rid, 200, NULL, &body);
    }
    gw_envelope_destroy (&env);
}

static void
s_fake_actor (zsock_t *pipe, void *args)
{
    gw_worker_t *worker = gw_worker_new ((const char *)args, "fake", 16, 0);
    assert (worker);
    zsock_signal (pipe, 0);
    while (true) {
        zmq_pollitem_t items[] = {{zsock_resolve (pipe), 0, ZMQ_POLLIN, 0},
            {zsock_resolve (gw_worker_socket (worker)), 0, ZMQ_POLLIN, 0}};
        zmq_poll (items, 2, gw_worker_timeout (worker));
        if (items[0].revents & ZMQ_POLLIN) {
            char *command = zstr_recv (pipe);
            bool term = !command || streq (command, "$TERM");
            zstr_free (&command);
            if (term)
                break;
        }
        gw_worker_tick (worker);
        gw_msg_t *msg;
        while ((msg = gw_worker_recv (worker))) {
            if (gw_msg_id (msg) == GW_MSG_REQUEST)
                s_fake_handle (worker, msg);
            gw_msg_destroy (&msg);
        }
    }
    gw_worker_destroy (&worker);
}

//  An HTTP exchange as the test sees it.
typedef struct {
    long status;  //  HTTP status, 0 if the transfer failed
    CURLcode result;  //  libcurl's result
    msgpack_sbuffer body;  //  response body (raw chunks if asked)
    msgpack_sbuffer head;  //  response header lines
    int abort_after;  //  abort after this many body callbacks (0 = never)
    int writes;  //  body callbacks so far
} s_resp_t;

static size_t
s_curl_body (char *data, size_t size, size_t count, void *arg)
{
    s_resp_t *resp = (s_resp_t *)arg;
    msgpack_sbuffer_write (&resp->body, data, size * count);
    if (resp->abort_after && ++resp->writes >= resp->abort_after)
        return 0;
    return size * count;
}

static size_t
s_curl_head (char *data, size_t size, size_t count, void *arg)
{
    s_resp_t *resp = (s_resp_t *)arg;
    msgpack_sbuffer_write (&resp->head, data, size * count);
    return size * count;
}

//  One request; headers is NULL or a NULL-terminated list of "Name: value".
//  raw keeps the chunked framing in the body. Returns the status.
static long
s_http (int port, const char *method, const char *path, const char **headers,
    const char *body, bool raw, s_resp_t *resp)
{
    msgpack_sbuffer_clear (&resp->body);
    msgpack_sbuffer_clear (&resp->head);
    resp->writes = 0;
    CURL *curl = curl_easy_init ();
    assert (curl);
    char url[512];
    snprintf (url, sizeof (url), "http://127.0.0.1:%d%s", port, path);
    curl_easy_setopt (curl, CURLOPT_URL, url);
    curl_easy_setopt (curl, CURLOPT_CUSTOMREQUEST, method);
    if (body) {
        curl_easy_setopt (curl, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt (curl, CURLOPT_POSTFIELDSIZE, (long)strlen (body));
    }
    struct curl_slist *list = curl_slist_append (NULL, "Expect:");
    for (int i = 0; headers && headers[i]; i++)
        list = curl_slist_append (list, headers[i]);
    curl_easy_setopt (curl, CURLOPT_HTTPHEADER, list);
    curl_easy_setopt (curl, CURLOPT_WRITEFUNCTION, s_curl_body);
    curl_easy_setopt (curl, CURLOPT_WRITEDATA, resp);
    curl_easy_setopt (curl, CURLOPT_HEADERFUNCTION, s_curl_head);
    curl_easy_setopt (curl, CURLOPT_HEADERDATA, resp);
    curl_easy_setopt (curl, CURLOPT_TIMEOUT_MS, 10000L);
    curl_easy_setopt (curl, CURLOPT_NOSIGNAL, 1L);
    if (raw)
        curl_easy_setopt (curl, CURLOPT_HTTP_TRANSFER_DECODING, 0L);
    resp->result = curl_easy_perform (curl);
    resp->status = 0;
    curl_easy_getinfo (curl, CURLINFO_RESPONSE_CODE, &resp->status);
    curl_slist_free_all (list);
    curl_easy_cleanup (curl);
    return resp->status;
}

//  A response header's value (case-insensitive name), or NULL.
static const char *
s_resp_header (s_resp_t *resp, const char *name, char *value, size_t max)
{
    size_t nlen = strlen (name);
    const char *p = resp->head.data, *end = resp->head.data + resp->head.size;
    while (p && p < end) {
        const char *eol = (const char *)memchr (p, '\n', (size_t)(end - p));
        if (!eol)
            eol = end;
        if ((size_t)(eol - p) > nlen && strncasecmp (p, name, nlen) == 0 &&
            p[nlen] == ':') {
            const char *v = p + nlen + 1;
            while (v < eol && *v == ' ')
                v++;
            size_t len = (size_t)(eol - v);
            if (len && v[len - 1] == '\r')
                len--;
            if (len >= max)
                len = max - 1;
            memcpy (value, v, len);
            value[len] = 0;
            return value;
        }
        p = eol + 1;
    }
    return NULL;
}

//  Top-level member key of a JSON body, through msgpack. Returns 0 or -1.
static int
s_member (s_resp_t *resp, msgpack_sbuffer *pack, const char *key, gw_mvalue_t *value)
{
    msgpack_sbuffer_clear (pack);
    msgpack_packer pk;
    msgpack_packer_init (&pk, pack, msgpack_sbuffer_write);
    if (gw_json_to_msgpack (resp->body.data, resp->body.size, &pk, NULL, NULL))
        return -1;
    gw_mreader_t reader;
    gw_mreader_init (&reader, pack->data, pack->size);
    if (gw_mreader_find (&reader, key) || gw_mreader_next (&reader, value))
        return -1;
    return 0;
}

static bool
s_member_str (s_resp_t *resp, const char *key, const char *expected)
{
    msgpack_sbuffer pack;
    msgpack_sbuffer_init (&pack);
    gw_mvalue_t value;
    bool ok = s_member (resp, &pack, key, &value) == 0 &&
        (expected ? gw_mvalue_streq (&value, expected) : value.type == GW_MP_NIL);
    msgpack_sbuffer_destroy (&pack);
    return ok;
}

static bool
s_member_bool (s_resp_t *resp, const char *key, bool expected)
{
    msgpack_sbuffer pack;
    msgpack_sbuffer_init (&pack);
    gw_mvalue_t value;
    bool ok = s_member (resp, &pack, key, &value) == 0 && value.type == GW_MP_BOOL &&
        value.v.b == expected;
    msgpack_sbuffer_destroy (&pack);
    return ok;
}

static bool
s_member_uint (s_resp_t *resp, const char *key, uint64_t expected)
{
    msgpack_sbuffer pack;
    msgpack_sbuffer_init (&pack);
    gw_mvalue_t value;
    bool ok = s_member (resp, &pack, key, &value) == 0 && value.type == GW_MP_UINT &&
        value.v.u == expected;
    msgpack_sbuffer_destroy (&pack);
    return ok;
}

//  True if data (JSON) is exactly {"error":{"message":str,"type":str,
//  "param":str|null,"code":str|null}} plus optional top-level members;
//  param_expected, if not NULL, must equal param.
static bool
s_is_error (const char *data, size_t size, const char *param_expected)
{
    msgpack_sbuffer pack;
    msgpack_sbuffer_init (&pack);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &pack, msgpack_sbuffer_write);
    bool ok = false;
    gw_mreader_t reader;
    gw_mvalue_t value;
    if (gw_json_to_msgpack (data, size, &pk, NULL, NULL))
        goto done;
    gw_mreader_init (&reader, pack.data, pack.size);
    if (gw_mreader_find (&reader, "error") || gw_mreader_next (&reader, &value) ||
        value.type != GW_MP_MAP || value.v.count != 4)
        goto done;
    int seen = 0;
    for (int i = 0; i < 4; i++) {
        gw_mvalue_t key;
        if (gw_mreader_next (&reader, &key) || gw_mreader_next (&reader, &value))
            goto done;
        bool str = value.type == GW_MP_STR, nil = value.type == GW_MP_NIL;
        if (gw_mvalue_streq (&key, "message") && str && value.size)
            seen |= 1;
        if (gw_mvalue_streq (&key, "type") && str && value.size)
            seen |= 2;
        if (gw_mvalue_streq (&key, "param") && (str || nil)) {
            if (!param_expected || (str && gw_mvalue_streq (&value, param_expected)))
                seen |= 4;
        }
        if (gw_mvalue_streq (&key, "code") && (str || nil))
            seen |= 8;
    }
    ok = seen == 15;
done:
    msgpack_sbuffer_destroy (&pack);
    return ok;
}

static bool
s_resp_is_error (s_resp_t *resp, const char *param_expected)
{
    return s_is_error (resp->body.data, resp->body.size, param_expected);
}

//  Raw HTTP: send request on a fresh connection, read until the peer closes
//  or timeout_ms passes. Returns the bytes read into reply (NUL-terminated).
static size_t
s_raw (int port, const char *request, size_t size, char *reply, size_t max,
    int timeout_ms, bool *closed)
{
    int fd = socket (AF_INET, SOCK_STREAM, 0);
    assert (fd >= 0);
    struct sockaddr_in addr;
    memset (&addr, 0, sizeof (addr));
    addr.sin_family = AF_INET;
    addr.sin_port = htons ((uint16_t)port);
    addr.sin_addr.s_addr = htonl (INADDR_LOOPBACK);
    int rc = connect (fd, (struct sockaddr *)&addr, sizeof (addr));
    assert (rc == 0);
    for (size_t sent = 0; sent < size;) {
        ssize_t n = send (fd, request + sent, size - sent, MSG_NOSIGNAL);
        if (n <= 0)
            break;
        sent += (size_t)n;
    }
    int64_t until = gw_mono_ms () + timeout_ms;
    size_t got = 0;
    *closed = false;
    while (got < max - 1) {
        struct pollfd item = {fd, POLLIN, 0};
        int64_t left = until - gw_mono_ms ();
        if (left <= 0 || poll (&item, 1, (int)left) <= 0)
            break;
        ssize_t n = recv (fd, reply + got, max - 1 - got, 0);
        if (n <= 0) {
            *closed = true;
            break;
        }
        got += (size_t)n;
    }
    reply[got] = 0;
    close (fd);
    return got;
}

static int s_hold_port;  //  the edge's port, for s_hold_request
static long s_hold_status;  //  what s_hold_request got
static bool s_hold_error;  //  its body was an OpenAI error

//  A request that runs into its deadline, on its own thread.
static void *
s_hold_request (void *args)
{
    s_resp_t resp;
    memset (&resp, 0, sizeof (resp));
    msgpack_sbuffer_init (&resp.body);
    msgpack_sbuffer_init (&resp.head);
    const char *headers[] = {"X-Request-Id: 5f2b1c9e-0000-4000-8000-00000000abcd", NULL};
    s_hold_status = s_http (s_hold_port, "POST", "/v1/chat/completions", headers,
        "{\"model\":\"hold\",\"messages\":[]}", false, &resp);
    s_hold_error = s_resp_is_error (&resp, NULL);
    msgpack_sbuffer_destroy (&resp.body);
    msgpack_sbuffer_destroy (&resp.head);
    return NULL;
}

void
gw_edge_test (bool verbose)
{
    printf (" * gw_edge: ");
    if (verbose)
        printf ("\n");
    curl_global_init (CURL_GLOBAL_DEFAULT);
    char value[256];
    s_resp_t resp;
    memset (&resp, 0, sizeof (resp));
    msgpack_sbuffer_init (&resp.body);
    msgpack_sbuffer_init (&resp.head);

    //  Unit checks of the pure helpers.
    char trace[33];
    s_trace_id ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", trace);
    assert (streq (trace, "4bf92f3577b34da6a3ce929d0e0e4736"));
    s_trace_id ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", trace);
    assert (strlen (trace) == 32 && !streq (trace, "00000000000000000000000000000000"));
    s_trace_id ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", trace);
    assert (!streq (trace, "4bf92f3577b34da6a3ce929d0e0e4736"));
    char *items[4];
    assert (s_list_parse (" auth , router,", items, 4, true) == 2);
    assert (streq (items[0], "auth") && streq (items[1], "router"));
    size_t count = 2;
    s_list_free (items, &count);
    assert (s_list_parse ("a b", items, 4, true) == -1);
    assert (s_list_parse ("", items, 4, true) == -1);
    assert (
        s_origin_allowed ("https://a.example, https://b.example", "https://b.example"));
    assert (
        s_origin_allowed ("https://a.example,https://b.example", "https://a.example"));
    assert (!s_origin_allowed ("https://a.example", "https://a.example.evil"));
    assert (!s_origin_allowed ("https://a.example", "https://a.exampl"));
    assert (!s_origin_allowed ("https://a.example", NULL));

    //  Broker, then the edge (its gw.services query answers 503 until the
    //  fake stage registers).
    zactor_t *broker = zactor_new (gw_broker_actor, NULL);
    assert (broker);
    zstr_sendx (broker, "BIND", "tcp://127.0.0.1:*", NULL);
    char *endpoint = zstr_recv (broker);
    assert (endpoint && *endpoint);

    gw_edge_t *edge = gw_edge_new ();
    assert (gw_edge_set (edge, "AIGW_LISTEN", "::1") == -1);
    assert (gw_edge_set (edge, "AIGW_SLIP", "bad service") == -1);
    assert (gw_edge_set (edge, "NOPE", "1") == -1);
    assert (gw_edge_set (edge, "AIGW_LISTEN", "127.0.0.1") == 0);
    assert (gw_edge_set (edge, "PORT", "0") == 0);
    assert (gw_edge_set (edge, "AIGW_BUS", endpoint) == 0);
    assert (gw_edge_set (edge, "AIGW_SLIP", "fake") == 0);
    assert (gw_edge_set (edge, "AIGW_READY_SERVICES", "fake") == 0);
    assert (gw_edge_set (edge, "AIGW_DEADLINE_MS", "1500") == 0);
    assert (gw_edge_set (edge, "AIGW_STREAM_WINDOW", "4") == 0);
    assert (gw_edge_set (edge, "AIGW_SSE_KEEPALIVE_MS", "100") == 0);
    assert (gw_edge_set (edge, "AIGW_BODY_MAX", "65536") == 0);
    assert (gw_edge_set (edge, "AIGW_EDGE_THREADS", "8") == 0);
    assert (gw_edge_set (edge, "AIGW_DRAIN_MS", "0") == 0);
    assert (gw_edge_start (edge) == 0);
    int port = gw_edge_port (edge);
    assert (port > 0);
    if (verbose)
        printf ("   edge on port %d, bus %s\n", port, endpoint);

    //  Liveness, and the headers every response carries.
    assert (s_http (port, "GET", "/health", NULL, NULL, false, &resp) == 200);
    assert (
        resp.body.size == 15 && memcmp (resp.body.data, "{\"status\":\"ok\"}", 15) == 0);
    assert (s_resp_header (&resp, "X-Content-Type-Options", value, sizeof (value)) &&
        streq (value, "nosniff"));
    assert (s_resp_header (&resp, "Referrer-Policy", value, sizeof (value)) &&
        streq (value, "no-referrer"));
    assert (s_resp_header (&resp, "Access-Control-Allow-Origin", value, sizeof (value)) &&
        streq (value, "*"));
    assert (
        !s_resp_header (&resp, "Access-Control-Expose-Headers", value, sizeof (value)));
    assert (s_resp_header (&resp, "X-Request-Id", value, sizeof (value)));
    uint8_t rid[16];
    assert (strlen (value) == 36 && value[8] == '-' && value[23] == '-' &&
        gw_rid_parse (value, rid) == 0);
    char first_rid[256];
    snprintf (first_rid, sizeof (first_rid), "%s", value);

    //  Not ready: the broker answers, but no worker serves "fake" yet.
    int64_t until = gw_mono_ms () + 5000;
    while (true) {
        assert (s_http (port, "GET", "/health/ready", NULL, NULL, false, &resp) == 503);
        assert (s_resp_is_error (&resp, NULL));
        if (memmem (resp.body.data, resp.body.size, "\"missing\":[\"fake\"]", 18) &&
            memmem (resp.body.data, resp.body.size, "no worker for fake", 18))
            break;
        assert (gw_mono_ms () < until);
        zclock_sleep (50);
    }
    zactor_t *fake = zactor_new (s_fake_actor, endpoint);
    until = gw_mono_ms () + 5000;
    while (s_http (port, "GET", "/health/ready", NULL, NULL, false, &resp) != 200) {
        assert (resp.status == 503 && s_resp_is_error (&resp, NULL));
        assert (gw_mono_ms () < until);
        zclock_sleep (50);
    }
    assert (memmem (resp.body.data, resp.body.size, "\"fake\":1", 8));
    if (verbose)
        printf ("   ready\n");

    //  FINAL 200, ctype json: the body bytes as they are, and the channel.
    const char *chat_json = "{\"model\":\"json\",\"messages\":[]}";
    assert (s_http (port, "POST", "/v1/chat/completions", NULL, chat_json, false,
                &resp) == 200);
    assert (resp.body.size == strlen (s_test_json) &&
        memcmp (resp.body.data, s_test_json, resp.body.size) == 0);
    assert (s_resp_header (&resp, "x-aigw-channel", value, sizeof (value)) &&
        streq (value, "ch-1"));
    assert (s_resp_header (&resp, "Content-Type", value, sizeof (value)) &&
        streq (value, "application/json"));

    //  FINAL 200 msgpack -> JSON, and what the envelope carried.
    const char *echo_headers[] = {"Authorization: Bearer sk-test",
        "Origin: https://app.example",
        "X-Request-Id: 123e4567-e89b-42d3-a456-426614174000",
        "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", NULL};
    const char *echo_json =
        "{\"model\":\"echo\",\"messages\":[{\"role\":\"user\",\"content\":"
        "\"hi\"}],\"stream\":false}";
    assert (s_http (port, "POST", "/v1/chat/completions", echo_headers, echo_json, false,
                &resp) == 200);
    assert (s_member_str (&resp, "op", "chat"));
    assert (s_member_str (&resp, "credential", "sk-test"));
    assert (s_member_str (&resp, "path", "/v1/chat/completions"));
    assert (s_member_str (&resp, "ip", "127.0.0.1"));
    assert (s_member_str (&resp, "model", "echo"));
    assert (s_member_str (&resp, "trace", "4bf92f3577b34da6a3ce929d0e0e4736"));
    assert (s_member_str (&resp, "rid", "123e4567e89b42d3a456426614174000"));
    assert (s_member_str (&resp, "slip0", "fake"));
    assert (s_member_bool (&resp, "stream", false));
    assert (s_member_bool (&resp, "include_usage", false));
    assert (s_member_bool (&resp, "deadline_ok", true));
    assert (s_member_uint (&resp, "window", 0) && s_member_uint (&resp, "flags", 0));
    assert (memmem (resp.body.data, resp.body.size, "\"score\":0.25", 12));
    assert (s_resp_header (&resp, "X-Request-Id", value, sizeof (value)) &&
        streq (value, "123e4567-e89b-42d3-a456-426614174000"));
    assert (
        s_resp_header (&resp, "Access-Control-Expose-Headers", value, sizeof (value)) &&
        strstr (value, "X-Request-Id") && strstr (value, "Retry-After"));

    //  x-api-key, a 32-hex X-Request-Id, include_usage, and a stream request
    //  answered by a FINAL alone (a normal JSON response).
    const char *key_headers[] = {
        "x-api-key: sk-key", "X-Request-Id: 0123456789abcdef0123456789ABCDEF", NULL};
    const char *usage_json = "{\"model\":\"echo\",\"messages\":[],\"stream\":true,"
                             "\"stream_options\":{\"include_usage\":true}}";
    assert (s_http (port, "POST", "/v1/chat/completions", key_headers, usage_json, false,
                &resp) == 200);
    assert (s_member_str (&resp, "credential", "sk-key"));
    assert (s_member_str (&resp, "rid", "0123456789abcdef0123456789abcdef"));
    assert (s_member_bool (&resp, "stream", true));
    assert (s_member_bool (&resp, "include_usage", true));
    assert (s_member_uint (&resp, "window", 4) && s_member_uint (&resp, "flags", 1));
    assert (s_resp_header (&resp, "X-Request-Id", value, sizeof (value)) &&
        streq (value, "0123456789abcdef0123456789ABCDEF"));

    //  Other operations.
    assert (s_http (port, "GET", "/v1/models", NULL, NULL, false, &resp) == 200);
    assert (s_member_str (&resp, "op", "models") && s_member_str (&resp, "model", NULL));
    assert (s_member_str (&resp, "credential", NULL));
    assert (
        s_http (port, "POST", "/v1/embeddings", NULL,
            "{\"model\":\"echo\",\"input\":\"x\",\"stream\":true}", false, &resp) == 200);
    assert (s_member_str (&resp, "op", "embeddings") &&
        s_member_bool (&resp, "stream", false));
    assert (s_http (port, "POST", "/v1/completions", NULL,
                "{\"model\":\"echo\",\"prompt\":\"x\"}", false, &resp) == 200);
    assert (s_member_str (&resp, "op", "completions"));
    //  An invalid X-Request-Id is replaced by a generated one.
    const char *bad_rid[] = {"X-Request-Id: not-an-id", NULL};
    assert (s_http (port, "GET", "/v1/models", bad_rid, NULL, false, &resp) == 200);
    assert (s_resp_header (&resp, "X-Request-Id", value, sizeof (value)) &&
        strlen (value) == 36 && gw_rid_parse (value, rid) == 0 &&
        !streq (value, first_rid));
    if (verbose)
        printf ("   JSON responses and envelope OK\n");

    //  A stream: several PARTIALs (window 4, so credit must flow), each one
    //  HTTP chunk, then the terminating chunk.
    const char *stream_json = "{\"model\":\"stream\",\"messages\":[],\"stream\":true}";
    assert (s_http (port, "POST", "/v1/chat/completions", NULL, stream_json, true,
                &resp) == 200);
    assert (resp.result == CURLE_OK);
    assert (s_resp_header (&resp, "Content-Type", value, sizeof (value)) &&
        streq (value, "text/event-stream"));
    assert (s_resp_header (&resp, "Cache-Control", value, sizeof (value)) &&
        streq (value, "no-cache"));
    assert (s_resp_header (&resp, "X-Accel-Buffering", value, sizeof (value)) &&
        streq (value, "no"));
    assert (s_resp_header (&resp, "Transfer-Encoding", value, sizeof (value)) &&
        streq (value, "chunked"));
    assert (s_resp_header (&resp, "X-Request-Id", value, sizeof (value)));
    msgpack_sbuffer expect, got;
    msgpack_sbuffer_init (&expect);
    msgpack_sbuffer_init (&got);
    char event[64];
    for (int i = 0; i < 10; i++) {
        snprintf (event, sizeof (event), "data: {\"i\":%d}\n\n", i);
        s_addf (&expect, "%zx\r\n%s\r\n", strlen (event), event);
    }
    s_add (&expect, "e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n");
    //  Keep-alive comments may appear between chunks under load: drop them.
    const char *keepalive = "e\r\n: keep-alive\n\n\r\n";
    for (size_t at = 0; at < resp.body.size;) {
        if (resp.body.size - at >= 19 && memcmp (resp.body.data + at, keepalive, 19) == 0)
            at += 19;
        else
            msgpack_sbuffer_write (&got, resp.body.data + at++, 1);
    }
    assert (got.size == expect.size && memcmp (got.data, expect.data, got.size) == 0);

    //  A stream whose first PARTIAL carries an envelope: its ann.headers
    //  (sanitized) and ann.channel are the stream's response headers.
    const char *head_json = "{\"model\":\"streamhead\",\"messages\":[],\"stream\":true}";
    assert (s_http (port, "POST", "/v1/chat/completions", NULL, head_json, false,
                &resp) == 200);
    assert (s_resp_header (&resp, "x-aigw-channel", value, sizeof (value)) &&
        streq (value, "ch-9"));
    assert (
        s_resp_header (&resp, "x-ratelimit-remaining-requests", value, sizeof (value)) &&
        streq (value, "0"));
    assert (!s_resp_header (&resp, "x-evil", value, sizeof (value)));
    assert (!s_resp_header (&resp, "Set-Cookie", value, sizeof (value)));
    assert (!s_resp_header (&resp, "Content-Length", value, sizeof (value)));
    assert (s_resp_header (&resp, "Content-Type", value, sizeof (value)) &&
        streq (value, "text/event-stream"));
    assert (
        memmem (resp.body.data, resp.body.size, "data: {\"i\":0}\n\ndata: [DONE]", 27));
    //  ... and a stream without one has none of them.
    assert (s_http (port, "POST", "/v1/chat/completions", NULL, stream_json, false,
                &resp) == 200);
    assert (!s_resp_header (&resp, "x-aigw-channel", value, sizeof (value)));

    //  GET /v1/usage: the range (unix seconds or ISO dates) goes to the
    //  slip as {from, to} in unix ms, op "usage"; bad bounds are 400s.
    assert (s_http (port, "GET", "/v1/usage?from=1700000000&to=2024-01-02", NULL, NULL,
                false, &resp) == 200);
    msgpack_sbuffer_write (&resp.body, "", 1);
    assert (strstr (resp.body.data, "\"from\":1700000000000"));
    assert (strstr (resp.body.data, "\"to\":1704153600000"));
    assert (s_http (port, "GET", "/v1/usage?from=2024-01-02T00%3A00%3A01Z", NULL, NULL,
                false, &resp) == 200);
    msgpack_sbuffer_write (&resp.body, "", 1);
    assert (streq (resp.body.data, "{\"from\":1704153601000}"));
    assert (s_http (port, "GET", "/v1/usage?from=yesterday", NULL, NULL, false, &resp) ==
        400);
    assert (s_http (port, "GET", "/v1/usage?from=2000&to=1000", NULL, NULL, false,
                &resp) == 400);
    assert (s_http (port, "POST", "/v1/usage", NULL, "{}", false, &resp) == 405);

    //  An error FINAL after PARTIALs: an SSE error event, then the end.
    const char *streamerr_json =
        "{\"model\":\"streamerr\",\"messages\":[],\"stream\":true}";
    assert (s_http (port, "POST", "/v1/chat/completions", NULL, streamerr_json, false,
                &resp) == 200);
    assert (resp.result == CURLE_OK);
    const char *error_event =
        (const char *)memmem (resp.body.data, resp.body.size, "event: error\ndata: ", 19);
    assert (error_event);
    assert (memmem (resp.body.data, resp.body.size, "data: {\"i\":1}\n\n", 15));
    const char *error_data = error_event + 19;
    size_t error_size = (size_t)(resp.body.data + resp.body.size - error_data);
    assert (error_size > 2 && memcmp (error_data + error_size - 2, "\n\n", 2) == 0);
    assert (s_is_error (error_data, error_size - 2, NULL));
    assert (memmem (error_data, error_size, "upstream broke", 14));

    //  A stream request whose first message is an error FINAL: plain JSON
    //  error, with Retry-After and the stage's headers (sanitized).
    const char *err_json = "{\"model\":\"err429\",\"messages\":[],\"stream\":true}";
    assert (s_http (port, "POST", "/v1/chat/completions", NULL, err_json, false, &resp) ==
        429);
    assert (s_resp_is_error (&resp, NULL));
    assert (s_resp_header (&resp, "Content-Type", value, sizeof (value)) &&
        streq (value, "application/json"));
    assert (s_resp_header (&resp, "Retry-After", value, sizeof (value)) &&
        streq (value, "7"));
    assert (
        s_resp_header (&resp, "x-ratelimit-remaining-requests", value, sizeof (value)) &&
        streq (value, "0"));
    assert (!s_resp_header (&resp, "x-evil", value, sizeof (value)));
    assert (!s_resp_header (&resp, "Set-Cookie", value, sizeof (value)));
    assert (
        memmem (resp.body.data, resp.body.size, "\"code\":\"rate_limit_exceeded\"", 28));
    //  A FINAL whose body is not an error object: one is synthesized.
    assert (s_http (port, "POST", "/v1/completions", NULL, "{\"model\":\"garbage\"}",
                false, &resp) == 500);
    assert (s_resp_is_error (&resp, NULL));
    if (verbose)
        printf ("   streams and stage errors OK\n");

    //  400: malformed JSON (JSONTestSuite-like), non-objects, bad fields.
    const char *malformed[] = {"{", "[1,2", "{\"model\":}", "nul", "{\"a\":1,}",
        "\"\\u00zz\"", "\xff", "", "{} x", "{'model':'x'}", "[\"unclosed",
        "{\"model\":\"x\"", "{\"a\" 1}", "[1,]", "{\"a\":01}", "\"\xed\xa0\x80\"", NULL};
    for (int i = 0; malformed[i]; i++) {
        assert (s_http (port, "POST", "/v1/chat/completions", NULL, malformed[i], false,
                    &resp) == 400);
        assert (s_resp_is_error (&resp, NULL));
        assert (memmem (resp.body.data, resp.body.size, "\"code\":\"invalid_json\"", 21));
    }
    const char *not_object[] = {
        "[]", "1", "\"str\"", "null", "true", "[{\"model\":\"x\"}]", NULL};
    for (int i = 0; not_object[i]; i++) {
        assert (s_http (port, "POST", "/v1/chat/completions", NULL, not_object[i], false,
                    &resp) == 400);
        assert (s_resp_is_error (&resp, NULL));
        assert (memmem (resp.body.data, resp.body.size, "JSON object", 11));
    }
    struct {
        const char *body;
        const char *param;
    } invalid[] = {{"{}", "model"}, {"{\"messages\":[]}", "model"},
        {"{\"model\":5,\"messages\":[]}", "model"},
        {"{\"model\":\"\",\"messages\":[]}", "model"},
        {"{\"model\":null,\"messages\":[]}", "model"},
        {"{\"model\":\"echo\"}", "messages"},
        {"{\"model\":\"echo\",\"messages\":\"hi\"}", "messages"},
        {"{\"model\":\"echo\",\"messages\":[],\"stream\":\"yes\"}", "stream"},
        {"{\"model\":\"echo\",\"messages\":[],\"stream\":1}", "stream"}, {NULL, NULL}};
    for (int i = 0; invalid[i].body; i++) {
        assert (s_http (port, "POST", "/v1/chat/completions", NULL, invalid[i].body,
                    false, &resp) == 400);
        assert (s_resp_is_error (&resp, invalid[i].param));
    }

    //  Routing: 404, 405, CORS preflight.
    assert (s_http (port, "GET", "/v2/nothing", NULL, NULL, false, &resp) == 404);
    assert (s_resp_is_error (&resp, NULL));
    assert (s_resp_header (&resp, "X-Request-Id", value, sizeof (value)));
    assert (s_http (port, "POST", "/v1/chat", NULL, "{}", false, &resp) == 404);
    assert (s_resp_is_error (&resp, NULL));
    assert (
        s_http (port, "GET", "/v1/chat/completions", NULL, NULL, false, &resp) == 405);
    assert (s_resp_is_error (&resp, NULL));
    assert (
        s_resp_header (&resp, "Allow", value, sizeof (value)) && strstr (value, "POST"));
    assert (s_http (port, "DELETE", "/health", NULL, NULL, false, &resp) == 405);
    assert (s_resp_is_error (&resp, NULL));
    const char *preflight[] = {"Origin: https://app.example",
        "Access-Control-Request-Method: POST",
        "Access-Control-Request-Headers: content-type, x-stainless-os", NULL};
    assert (s_http (port, "OPTIONS", "/v1/chat/completions", preflight, NULL, false,
                &resp) == 204);
    assert (resp.body.size == 0);
    assert (s_resp_header (&resp, "Access-Control-Allow-Origin", value, sizeof (value)) &&
        streq (value, "*"));
    assert (
        s_resp_header (&resp, "Access-Control-Allow-Methods", value, sizeof (value)) &&
        strstr (value, "POST") && strstr (value, "GET"));
    assert (s_resp_header (&resp, "Access-Control-Allow-Headers", value, sizeof (value)));
    assert (strstr (value, "Authorization") && strstr (value, "Content-Type") &&
        strstr (value, "x-api-key") && strstr (value, "X-Request-Id") &&
        strstr (value, "x-stainless-os"));
    assert (s_resp_header (&resp, "X-Request-Id", value, sizeof (value)));

    //  Keep-alive: a second request reuses the connection.
    {
        CURL *curl = curl_easy_init ();
        char url[128];
        snprintf (url, sizeof (url), "http://127.0.0.1:%d/health", port);
        curl_easy_setopt (curl, CURLOPT_URL, url);
        curl_easy_setopt (curl, CURLOPT_WRITEFUNCTION, s_curl_body);
        curl_easy_setopt (curl, CURLOPT_WRITEDATA, &resp);
        assert (curl_easy_perform (curl) == CURLE_OK);
        assert (curl_easy_perform (curl) == CURLE_OK);
        long connects = -1;
        curl_easy_getinfo (curl, CURLINFO_NUM_CONNECTS, &connects);
        assert (connects == 0);
        curl_easy_cleanup (curl);
    }
    if (verbose)
        printf ("   400/404/405/CORS/keep-alive OK\n");

    //  413: Content-Length over the cap, answered without reading the body
    //  (only the head is sent), and the connection is closed.
    char reply[4096];
    bool closed = false;
    const char *big =
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
        "Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n";
    int64_t start = gw_mono_ms ();
    size_t size = s_raw (port, big, strlen (big), reply, sizeof (reply), 3000, &closed);
    assert (size > 12 && memcmp (reply, "HTTP/1.1 413", 12) == 0);
    assert (closed && gw_mono_ms () - start < 2000);
    assert (strstr (reply, "Connection: close"));
    assert (strstr (reply, "X-Request-Id: "));
    char *json = strstr (reply, "\r\n\r\n");
    assert (json && s_is_error (json + 4, strlen (json + 4), NULL));
    //  413 while counting a chunked body.
    msgpack_sbuffer chunked;
    msgpack_sbuffer_init (&chunked);
    s_add (&chunked,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
        "Transfer-Encoding: chunked\r\n\r\n");
    for (int i = 0; i < 2; i++) {
        s_add (&chunked, "8001\r\n");  //  2 x 32769 bytes > 65536
        for (int j = 0; j < 0x8001; j++)
            msgpack_sbuffer_write (&chunked, " ", 1);
        if (i == 0)
            s_add (&chunked, "\r\n");
    }
    size = s_raw (port, chunked.data, chunked.size, reply, sizeof (reply), 3000, &closed);
    assert (size > 12 && memcmp (reply, "HTTP/1.1 413", 12) == 0);
    assert (closed);
    msgpack_sbuffer_destroy (&chunked);
    //  A chunked body under the cap is fine.
    const char *small =
        "POST /v1/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
        "9\r\n{\"model\":\r\n9\r\n\"echo\"}  \r\n0\r\n\r\n";
    size = s_raw (port, small, strlen (small), reply, sizeof (reply), 3000, &closed);
    if (verbose)
        printf ("   chunked: %s\n", reply);
    assert (size > 12 && memcmp (reply, "HTTP/1.1 200", 12) == 0);
    assert (strstr (reply, "\"op\":\"completions\""));
    //  Expect: 100-continue is answered before the body is read.
    {
        const char *body = "{\"model\":\"echo\"}";
        char head[256];
        snprintf (head, sizeof (head),
            "POST /v1/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            "Expect: 100-continue\r\nContent-Length: %zu\r\n\r\n",
            strlen (body));
        int fd = socket (AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in addr;
        memset (&addr, 0, sizeof (addr));
        addr.sin_family = AF_INET;
        addr.sin_port = htons ((uint16_t)port);
        addr.sin_addr.s_addr = htonl (INADDR_LOOPBACK);
        assert (connect (fd, (struct sockaddr *)&addr, sizeof (addr)) == 0);
        assert (send (fd, head, strlen (head), MSG_NOSIGNAL) == (ssize_t)strlen (head));
        struct pollfd item = {fd, POLLIN, 0};
        assert (poll (&item, 1, 500) == 1);
        ssize_t n = recv (fd, reply, sizeof (reply) - 1, 0);
        assert (n >= 25 && memcmp (reply, "HTTP/1.1 100 Continue\r\n\r\n", 25) == 0);
        assert (send (fd, body, strlen (body), MSG_NOSIGNAL) == (ssize_t)strlen (body));
        size = 0;
        while (size < sizeof (reply) - 1 && poll (&item, 1, 2000) == 1) {
            n = recv (fd, reply + size, sizeof (reply) - 1 - size, 0);
            if (n <= 0)
                break;
            size += (size_t)n;
        }
        reply[size] = 0;
        close (fd);
        assert (
            strstr (reply, "HTTP/1.1 200") && strstr (reply, "\"op\":\"completions\""));
    }
    //  A request civetweb itself rejects still gets the OpenAI error shape.
    const char *garbage = "GET /health HTTP/9.9\r\nHost: t\r\n\r\n";
    size = s_raw (port, garbage, strlen (garbage), reply, sizeof (reply), 3000, &closed);
    if (verbose)
        printf ("   civetweb-level error: %.12s\n", reply);
    if (size > 12 && memcmp (reply, "HTTP/1.1 200", 12) != 0) {
        json = strstr (reply, "\r\n\r\n");
        assert (json && s_is_error (json + 4, strlen (json + 4), NULL));
    }
    if (verbose)
        printf ("   413 OK\n");

    //  The client disconnects mid-stream: the stage gets CANCEL 499.
    const char *hold_json = "{\"model\":\"holdstream\",\"messages\":[],\"stream\":true}";
    resp.abort_after = 1;
    s_http (port, "POST", "/v1/chat/completions", NULL, hold_json, false, &resp);
    resp.abort_after = 0;
    assert (resp.result == CURLE_WRITE_ERROR);
    until = gw_mono_ms () + 3000;
    while (
        __atomic_load_n (&s_fake_cancels, __ATOMIC_SEQ_CST) < 1 && gw_mono_ms () < until)
        zclock_sleep (20);
    assert (__atomic_load_n (&s_fake_cancels, __ATOMIC_SEQ_CST) == 1);
    assert (__atomic_load_n (&s_fake_cancel_reason, __ATOMIC_SEQ_CST) == 499);

    //  The deadline passes: 504, and the stage gets CANCEL 504. Meanwhile a
    //  second request with the same X-Request-Id is refused with 409.
    s_hold_port = port;
    start = gw_mono_ms ();
    pthread_t holder;
    pthread_create (&holder, NULL, s_hold_request, NULL);
    zclock_sleep (300);
    const char *same_rid[] = {"X-Request-Id: 5f2b1c9e-0000-4000-8000-00000000abcd", NULL};
    assert (s_http (port, "POST", "/v1/chat/completions", same_rid, chat_json, false,
                &resp) == 409);
    assert (s_resp_is_error (&resp, NULL));
    pthread_join (holder, NULL);
    assert (s_hold_status == 504 && s_hold_error);
    assert (gw_mono_ms () - start >= 1000 && gw_mono_ms () - start < 3500);
    //  A body sent to a route that does not read one: answered, then closed.
    assert (s_http (port, "POST", "/health", NULL, "{\"x\":1}", false, &resp) == 405);
    assert (s_resp_header (&resp, "Connection", value, sizeof (value)) &&
        streq (value, "close"));
    until = gw_mono_ms () + 3000;
    while (
        __atomic_load_n (&s_fake_cancels, __ATOMIC_SEQ_CST) < 2 && gw_mono_ms () < until)
        zclock_sleep (20);
    assert (__atomic_load_n (&s_fake_cancels, __ATOMIC_SEQ_CST) == 2);
    assert (__atomic_load_n (&s_fake_cancel_reason, __ATOMIC_SEQ_CST) == 504);
    if (verbose)
        printf ("   disconnect and deadline OK\n");

    //  The edge still serves after all that.
    assert (s_http (port, "POST", "/v1/chat/completions", NULL, chat_json, false,
                &resp) == 200);

    gw_edge_destroy (&edge);
    assert (edge == NULL);
    gw_edge_destroy (&edge);  //  idempotent
    zactor_destroy (&fake);
    zactor_destroy (&broker);
    zstr_free (&endpoint);
    msgpack_sbuffer_destroy (&expect);
    msgpack_sbuffer_destroy (&got);
    msgpack_sbuffer_destroy (&resp.body);
    msgpack_sbuffer_destroy (&resp.head);
    curl_global_cleanup ();
    printf ("OK\n");
}
