//  --------------------------------------------------------------------------
//  gw_billing — the billing stage: pricing, batching, the ledger, settles.
//
//  Design note. Billing is the one stage whose answer is a promise about
//  durable state: FINAL 200 means "this usage is in the ledger and the
//  balance has moved". So the actor never answers before COMMIT, and since
//  recording is idempotent per request id (the ledger's primary key), the
//  stage registers IDEMPOTENT: if it dies with events in flight, the broker
//  re-dispatches them and the producer resends anything it has not seen
//  acknowledged, and the ledger ignores what it already has.
//
//  Batching. The actor drains every REQUEST that is ready, parses and
//  prices each, and holds them in a batch; the batch is committed in ONE
//  transaction when it reaches batch_max events or when its oldest event
//  has waited batch_wait_ms (default 2 ms). Under load the batch fills
//  while the previous COMMIT runs, so the number of transactions grows far
//  more slowly than the number of events (the STATS counter commits shows
//  it); idle, an event waits at most batch_wait_ms. After COMMIT every
//  event of the batch gets its FINAL, then its settle.
//
//  Failure. A malformed event (not a map, no rid, a wrong type, cached >
//  prompt, a cost beyond int64) is answered FINAL 400 at once and never
//  reaches the store: the producer must drop it (and log it). A batch the
//  store rejects as a whole (GW_STORE_FAILED) is retried one event per
//  transaction so one bad event cannot block the others; an event the store
//  still rejects is answered 500. A store that is unreachable answers 503
//  for the whole batch; the producer resends later. Settles are
//  fire-and-forget through a client session with a 5 s deadline and a
//  bounded number in flight: a missing ratelimit service (503 no_worker)
//  costs nothing but a counter; a lost settle is covered by the holds'
//  own expiry.
//
//  Rates: parsing and pricing an event is a few hundred ns; the store
//  costs one or two statements per event plus one COMMIT per batch.

#include "aigw.h"
#include "gw_store.h"
#include "gw_billing.h"
#include "gw_usage_batch.h"
#include "gw_broker.h"
#include <libpq-fe.h>

#define NAME_MAX_ GW_STORE_NAME_MAX
#define SCOPES_MAX 32
#define SCOPES_RAW_MAX 2048
#define MAP_KEYS_MAX 64
#define SETTLE_INFLIGHT_MAX 10000
#define SETTLE_DEADLINE_MS 5000
#define WARNED_MAX 1024  //  models remembered as "warned unpriced"
#define PRICE_FILE_MAX (16 * 1024 * 1024)

struct _gw_billing_t {
    gw_store_t *store;  //  the SQL store, owned
    zhashx_t *prices;  //  model -> gw_price_t *
    zhashx_t *groups;  //  group -> int64_t * (thousandths)
    zhashx_t *warned;  //  models already logged as unpriced
    int64_t multiplier;  //  global multiplier, thousandths
    uint64_t unpriced;  //  events priced without a price
};

//  --------------------------------------------------------------------------
//  Pricing

static void
s_free_item (void **item)
{
    free (*item);
    *item = NULL;
}

static zhashx_t *
s_table_new (void)
{
    zhashx_t *table = zhashx_new ();
    assert (table);
    zhashx_set_destructor (table, s_free_item);
    return table;
}

gw_billing_t *
gw_billing_new (gw_store_t **store_p)
{
    assert (store_p && *store_p);
    gw_billing_t *self = (gw_billing_t *)zmalloc (sizeof (gw_billing_t));
    assert (self);
    self->store = *store_p;
    *store_p = NULL;
    self->prices = s_table_new ();
    self->groups = s_table_new ();
    self->warned = zhashx_new ();
    assert (self->warned);
    self->multiplier = 1500;
    gw_billing_refresh (self);
    return self;
}

void
gw_billing_destroy (gw_billing_t **self_p)
{
    assert (self_p);
    gw_billing_t *self = *self_p;
    if (self) {
        gw_store_destroy (&self->store);
        zhashx_destroy (&self->prices);
        zhashx_destroy (&self->groups);
        zhashx_destroy (&self->warned);
        free (self);
        *self_p = NULL;
    }
}

int
gw_billing_set_multiplier (gw_billing_t *self, const char *text)
{
    assert (self);
    return gw_price_multiplier (text, &self->multiplier);
}

int64_t
gw_billing_multiplier (gw_billing_t *self)
{
    assert (self);
    return self->multiplier;
}

int
gw_billing_refresh (gw_billing_t *self)
{
    assert (self);
    zhashx_t *prices, *groups;
    if (gw_store_pricing (self->store, &prices, &groups)) {
        gw_warn ("billing: cannot reload prices and groups (keeping the last ones): %s",
            gw_store_error (self->store));
        return -1;
    }
    zhashx_destroy (&self->prices);
    zhashx_destroy (&self->groups);
    self->prices = prices;
    self->groups = groups;
    return 0;
}

int
gw_billing_price (gw_billing_t *self, const char *model, const char *group,
    int64_t prompt, int64_t completion, int64_t cached, int64_t *cost)
{
    assert (self);
    assert (cost);
    *cost = 0;
    if (prompt < 0 || completion < 0 || cached < 0 || cached > prompt ||
        prompt > GW_STORE_TOKENS_MAX || completion > GW_STORE_TOKENS_MAX)
        return -1;
    const gw_price_t *price = (const gw_price_t *)zhashx_lookup (self->prices, model);
    if (!price)
        price = (const gw_price_t *)zhashx_lookup (self->prices, "*");
    if (!price) {
        self->unpriced++;
        if (!zhashx_lookup (self->warned, model) &&
            zhashx_size (self->warned) < WARNED_MAX) {
            zhashx_insert (self->warned, model, (void *)1);
            gw_warn (
                "billing: model %s has no price (and no \"*\" price): billed 0", model);
        }
        return 1;
    }
    //  The one formula ratelimit prices its holds with, too (gw_price).
    const int64_t *group_milli = (const int64_t *)zhashx_lookup (self->groups, group);
    return gw_price_cost (price, self->multiplier, group_milli ? *group_milli : 1000,
        prompt, completion, cached, cost);
}

//  --------------------------------------------------------------------------
//  The price file

int
gw_billing_load_prices (
    gw_billing_t *self, const char *path, char *error, size_t error_size)
{
    assert (self);
    char dummy[8];
    if (!error || !error_size) {
        error = dummy;
        error_size = sizeof (dummy);
    }
    int count = -1;
    char *text = NULL;
    msgpack_sbuffer buffer;
    msgpack_sbuffer_init (&buffer);
    FILE *file = fopen (path, "rb");
    if (!file) {
        snprintf (error, error_size, "%s: %s", path, strerror (errno));
        goto done;
    }
    text = (char *)malloc (PRICE_FILE_MAX + 1);
    assert (text);
    size_t size = fread (text, 1, PRICE_FILE_MAX + 1, file);
    fclose (file);
    if (size > PRICE_FILE_MAX) {
        snprintf (error, error_size, "%s: larger than %d bytes", path, PRICE_FILE_MAX);
        goto done;
    }
    msgpack_packer packer;
    msgpack_packer_init (&packer, &buffer, msgpack_sbuffer_write);
    gw_json_error_t json_error;
    if (gw_json_to_msgpack (text, size, &packer, NULL, &json_error)) {
        snprintf (error, error_size, "%s: invalid JSON at byte %zu: %s", path,
            json_error.offset, json_error.message);
        goto done;
    }
    gw_mreader_t reader;
    gw_mreader_init (&reader, buffer.data, buffer.size);
    gw_mvalue_t value;
    if (gw_mreader_next (&reader, &value) || value.type != GW_MP_MAP) {
        snprintf (error, error_size,
            "%s: must hold a JSON object {\"model\": {\"input\": …, \"output\": …}}",
            path);
        goto done;
    }
    uint32_t models = value.v.count;
    //  Validate everything first, then write: a bad file changes nothing.
    gw_price_t *prices = (gw_price_t *)calloc (models ? models : 1, sizeof (gw_price_t));
    char **names = (char **)calloc (models ? models : 1, sizeof (char *));
    assert (prices && names);
    bool ok = true;
    for (uint32_t i = 0; ok && i < models; i++) {
        gw_mvalue_t key;
        if (gw_mreader_next (&reader, &key) || key.type != GW_MP_STR || key.size == 0 ||
            key.size > NAME_MAX_) {
            snprintf (error, error_size, "%s: model %u: name must be 1..%d bytes", path,
                i, NAME_MAX_);
            ok = false;
            break;
        }
        names[i] = strndup (key.ptr, key.size);
        assert (names[i]);
        if (gw_mreader_next (&reader, &value) || value.type != GW_MP_MAP) {
            snprintf (error, error_size, "%s: %s: must be an object", path, names[i]);
            ok = false;
            break;
        }
        bool has_input = false, has_output = false, has_cached = false;
        uint32_t fields = value.v.count;
        for (uint32_t f = 0; ok && f < fields; f++) {
            gw_mvalue_t field;
            if (gw_mreader_next (&reader, &field) || field.type != GW_MP_STR ||
                gw_mreader_next (&reader, &value)) {
                snprintf (error, error_size, "%s: %s: malformed field", path, names[i]);
                ok = false;
                break;
            }
            int64_t *target = NULL;
            if (gw_mvalue_streq (&field, "input")) {
                target = &prices[i].input;
                has_input = true;
            }
            else if (gw_mvalue_streq (&field, "output")) {
                target = &prices[i].output;
                has_output = true;
            }
            else if (gw_mvalue_streq (&field, "cached_input")) {
                target = &prices[i].cached_input;
                has_cached = true;
            }
            else {
                snprintf (error, error_size,
                    "%s: %s: unknown field \"%.*s\" (input, output, cached_input)", path,
                    names[i], (int)(field.size > 64 ? 64 : field.size), field.ptr);
                ok = false;
                break;
            }
            if (value.type == GW_MP_MAP || value.type == GW_MP_ARRAY ||
                gw_price_field (&value, target)) {
                snprintf (error, error_size,
                    "%s: %s.%.*s: must be a non-negative number of USD per 1M tokens "
                    "with at most 6 decimals",
                    path, names[i], (int)field.size, field.ptr);
                ok = false;
            }
        }
        if (ok && (!has_input || !has_output)) {
            snprintf (error, error_size, "%s: %s: needs \"input\" and \"output\"", path,
                names[i]);
            ok = false;
        }
        if (ok && !has_cached)
            prices[i].cached_input = prices[i].input;
    }
    if (ok) {
        count = 0;
        for (uint32_t i = 0; i < models; i++) {
            if (gw_store_price_set (self->store, names[i], &prices[i])) {
                snprintf (error, error_size, "%s: %s: %s", path, names[i],
                    gw_store_error (self->store));
                count = -1;
                break;
            }
            count++;
        }
    }
    for (uint32_t i = 0; i < models; i++)
        free (names[i]);
    free (names);
    free (prices);
    if (count >= 0)
        gw_billing_refresh (self);
done:
    free (text);
    msgpack_sbuffer_destroy (&buffer);
    return count;
}

//  --------------------------------------------------------------------------
//  Usage events

typedef struct _s_request_t s_request_t;

typedef struct {
    uint8_t grid[16];  //  GWP request id to answer (single form)
    s_request_t *request;  //  the batch request it came in, NULL = single form
    uint32_t index;  //  its place in that batch
    gw_usage_event_t event;  //  strings point into the buffers below
    char key[NAME_MAX_ + 1];
    char user[NAME_MAX_ + 1];
    char group[NAME_MAX_ + 1];
    char model[NAME_MAX_ + 1];
    char channel[NAME_MAX_ + 1];
    uint64_t hold;  //  micro-units held by ratelimit
    uint64_t est_tokens;  //  tokens reserved by ratelimit
    bool lease;  //  a concurrency lease was taken
    uint8_t scopes[SCOPES_RAW_MAX];  //  raw msgpack array of str
    size_t scopes_size;  //  0 = none
} s_pending_t;

//  Copy a msgpack STR (or NIL as "") into out, validating length.
static int
s_copy_str (gw_mvalue_t *value, char *out, bool nil_ok)
{
    if (value->type == GW_MP_NIL && nil_ok) {
        out[0] = 0;
        return 0;
    }
    if (value->type != GW_MP_STR || value->size > NAME_MAX_ ||
        memchr (value->ptr, 0, value->size))
        return -1;
    memcpy (out, value->ptr, value->size);
    out[value->size] = 0;
    return gw_store_name_valid (out, true) ? 0 : -1;
}

static int
s_uint (gw_mvalue_t *value, uint64_t max, uint64_t *out)
{
    if (value->type != GW_MP_UINT || value->v.u > max)
        return -1;
    *out = value->v.u;
    return 0;
}

//  Parse a usage event body into pending. Returns 0, or -1 with the reason
//  in why (static text).
static int
s_parse_event (const uint8_t *data, size_t size, s_pending_t *pending, const char **why)
{
    gw_usage_event_t *event = &pending->event;
    memset (event, 0, sizeof (*event));
    pending->key[0] = pending->channel[0] = pending->user[0] = pending->model[0] = 0;
    strcpy (pending->group, "default");
    pending->hold = pending->est_tokens = 0;
    pending->lease = false;
    pending->scopes_size = 0;
    event->status = 200;
    event->ts = gw_time_ms ();
    bool has_rid = false;
    uint64_t number = 0;
    gw_mreader_t reader;
    gw_mreader_init (&reader, data, size);
    gw_mvalue_t value, key;
    *why = "the body must be a msgpack map";
    if (!data || !size || gw_mreader_next (&reader, &value) || value.type != GW_MP_MAP ||
        value.v.count > MAP_KEYS_MAX)
        return -1;
    uint32_t count = value.v.count;
    for (uint32_t i = 0; i < count; i++) {
        *why = "malformed map key";
        if (gw_mreader_next (&reader, &key) || key.type != GW_MP_STR)
            return -1;
        if (gw_mvalue_streq (&key, "scopes")) {
            size_t left = gw_mreader_left (&reader);
            const uint8_t *start = data + (size - left);
            *why = "scopes must be an array of at most 32 strings";
            if (gw_mreader_next (&reader, &value) || value.type != GW_MP_ARRAY ||
                value.v.count > SCOPES_MAX)
                return -1;
            for (uint32_t s = 0; s < value.v.count; s++) {
                gw_mvalue_t scope;
                if (gw_mreader_next (&reader, &scope) || scope.type != GW_MP_STR ||
                    scope.size > NAME_MAX_)
                    return -1;
            }
            size_t raw = left - gw_mreader_left (&reader);
            if (raw > SCOPES_RAW_MAX)
                return -1;
            memcpy (pending->scopes, start, raw);
            pending->scopes_size = raw;
            continue;
        }
        *why = "malformed value";
        if (gw_mreader_next (&reader, &value))
            return -1;
        if (value.type == GW_MP_ARRAY || value.type == GW_MP_MAP) {
            //  Unknown containers are skipped; known keys never hold one.
            uint32_t items = value.type == GW_MP_MAP ? value.v.count * 2 : value.v.count;
            for (uint32_t s = 0; s < items; s++)
                if (gw_mreader_skip (&reader, 8))
                    return -1;
            static const char *known[] = {"rid", "ts", "key", "user", "group", "model",
                "channel", "prompt_tokens", "completion_tokens", "cached_tokens",
                "estimated", "status", "hold", "est_tokens", "lease"};
            for (size_t k = 0; k < sizeof (known) / sizeof (known[0]); k++)
                if (gw_mvalue_streq (&key, known[k])) {
                    *why = "a field has the wrong type";
                    return -1;
                }
            continue;
        }
        int rc = 0;
        if (gw_mvalue_streq (&key, "rid")) {
            *why = "rid must be 16 bytes (bin)";
            rc = value.type == GW_MP_BIN && value.size == 16 ? 0 : -1;
            if (!rc) {
                memcpy (event->rid, value.ptr, 16);
                has_rid = true;
            }
        }
        else if (gw_mvalue_streq (&key, "ts")) {
            *why = "ts must be unix ms (uint)";
            rc = s_uint (&value, INT64_MAX, &number);
            event->ts = (int64_t)number;
        }
        else if (gw_mvalue_streq (&key, "key")) {
            *why = "key must be a UTF-8 string of at most 256 bytes";
            rc = s_copy_str (&value, pending->key, true);
        }
        else if (gw_mvalue_streq (&key, "user")) {
            *why = "user must be a UTF-8 string of at most 256 bytes";
            rc = s_copy_str (&value, pending->user, false);
        }
        else if (gw_mvalue_streq (&key, "group")) {
            *why = "group must be a UTF-8 string of at most 256 bytes";
            rc = s_copy_str (&value, pending->group, false);
        }
        else if (gw_mvalue_streq (&key, "model")) {
            *why = "model must be a UTF-8 string of at most 256 bytes";
            rc = s_copy_str (&value, pending->model, false);
        }
        else if (gw_mvalue_streq (&key, "channel")) {
            *why = "channel must be a UTF-8 string of at most 256 bytes";
            rc = s_copy_str (&value, pending->channel, true);
        }
        else if (gw_mvalue_streq (&key, "prompt_tokens")) {
            *why = "prompt_tokens must be a uint <= 10^12";
            rc = s_uint (&value, GW_STORE_TOKENS_MAX, &number);
            event->prompt_tokens = (int64_t)number;
        }
        else if (gw_mvalue_streq (&key, "completion_tokens")) {
            *why = "completion_tokens must be a uint <= 10^12";
            rc = s_uint (&value, GW_STORE_TOKENS_MAX, &number);
            event->completion_tokens = (int64_t)number;
        }
        else if (gw_mvalue_streq (&key, "cached_tokens")) {
            *why = "cached_tokens must be a uint <= 10^12";
            rc = s_uint (&value, GW_STORE_TOKENS_MAX, &number);
            event->cached_tokens = (int64_t)number;
        }
        else if (gw_mvalue_streq (&key, "estimated")) {
            *why = "estimated must be a bool";
            rc = value.type == GW_MP_BOOL ? 0 : -1;
            event->estimated = value.type == GW_MP_BOOL && value.v.b;
        }
        else if (gw_mvalue_streq (&key, "status")) {
            *why = "status must be a uint <= 999";
            rc = s_uint (&value, 999, &number);
            event->status = (int)number;
        }
        else if (gw_mvalue_streq (&key, "hold")) {
            *why = "hold must be a uint";
            rc = s_uint (&value, INT64_MAX, &pending->hold);
        }
        else if (gw_mvalue_streq (&key, "est_tokens")) {
            *why = "est_tokens must be a uint";
            rc = s_uint (&value, INT64_MAX, &pending->est_tokens);
        }
        else if (gw_mvalue_streq (&key, "lease")) {
            *why = "lease must be a bool";
            rc = value.type == GW_MP_BOOL ? 0 : -1;
            pending->lease = value.type == GW_MP_BOOL && value.v.b;
        }
        if (rc)
            return -1;
    }
    *why = "trailing bytes after the map";
    if (gw_mreader_left (&reader))
        return -1;
    *why = "rid is required";
    if (!has_rid)
        return -1;
    *why = "user is required";
    if (!pending->user[0])
        return -1;
    *why = "model is required";
    if (!pending->model[0])
        return -1;
    *why = "cached_tokens exceeds prompt_tokens";
    if (event->cached_tokens > event->prompt_tokens)
        return -1;
    return 0;
}

//  --------------------------------------------------------------------------
//  Actor

typedef struct {
    uint64_t events;  //  valid usage events received
    uint64_t recorded;  //  new ledger rows
    uint64_t duplicates;  //  events already in the ledger
    uint64_t rejected;  //  answered 400
    uint64_t failed;  //  answered 500 or 503
    uint64_t batch_requests;  //  requests in the batch form ({events: […]})
    uint64_t batches;  //  batches flushed
    uint64_t commits;  //  transactions committed
    uint64_t settles;  //  settle requests sent (one per committed batch)
    uint64_t settle_errors;  //  settle requests answered other than 200, or not sent
} s_stats_t;

typedef struct {
    zsock_t *pipe;  //  actor pipe
    gw_billing_t *billing;  //  owned
    gw_worker_t *worker;  //  session for "billing", NULL before CONNECT
    gw_client_t *client;  //  settle session, NULL before CONNECT or if disabled
    gw_envelope_t *envelope;  //  reused to read each request's envelope
    gw_usage_item_t items[GW_USAGE_BATCH_MAX];  //  items of the request at hand
    s_pending_t *batch;  //  batch_max entries
    gw_usage_event_t *events;  //  batch_max entries, for the store
    size_t count;  //  events in the batch
    int64_t first_ms;  //  mono ms when the batch's first event arrived
    uint32_t capacity;  //  READY capacity
    size_t batch_max;  //  events per transaction
    int batch_wait_ms;  //  longest wait of an event before its batch commits
    int refresh_ms;  //  price and group reload interval
    int heartbeat_ms;  //  bus session heartbeat, 0 = the session's default
    int expiry_ms;  //  bus session expiry, 0 = the session's default
    int64_t refreshed_ms;  //  mono ms of the last reload
    char settle[GW_SERVICE_MAX + 1];  //  settle service, "" = none
    int64_t settle_warned_ms;  //  mono ms of the last settle warning
    s_stats_t stats;
    bool verbose;  //  log every event
    bool terminated;  //  $TERM received
} s_actor_t;

static void
s_answer (s_actor_t *self, s_pending_t *pending)
{
    msgpack_sbuffer buffer;
    msgpack_sbuffer_init (&buffer);
    msgpack_packer packer;
    msgpack_packer_init (&packer, &buffer, msgpack_sbuffer_write);
    msgpack_pack_map (&packer, 2);
    gw_mpack_str (&packer, "cost");
    msgpack_pack_uint64 (&packer, (uint64_t)pending->event.recorded_cost);
    gw_mpack_str (&packer, "duplicate");
    if (pending->event.duplicate)
        msgpack_pack_true (&packer);
    else
        msgpack_pack_false (&packer);
    zframe_t *body = zframe_new (buffer.data, buffer.size);
    msgpack_sbuffer_destroy (&buffer);
    gw_worker_final (self->worker, pending->grid, 200, NULL, &body);
}

//  A batch request ({events: […]}, STAGES.md §6.2): answered with ONE
//  FINAL, {results: […]} in item order, once every item has its result —
//  after the last COMMIT that holds one of its events. Its events may be
//  spread over several store batches (batch_max) and flushes.
typedef struct {
    uint16_t status;  //  200, 400, 500, 503; 0 = not yet known
    bool duplicate;  //  status 200: the rid was already in the ledger
    int64_t cost;  //  status 200: recorded cost, micro-units
    char error[160];  //  otherwise: why
} s_result_t;

struct _s_request_t {
    uint8_t grid[16];  //  GWP request id to answer
    uint32_t count;  //  items
    uint32_t left;  //  results still missing (+1 while the handler adds items)
    s_result_t results[];  //  count entries
};

//  One result of a batch is known; the FINAL leaves with the last one.
static void
s_request_result (s_actor_t *self, s_request_t *request, uint32_t index, uint16_t status,
    int64_t cost, bool duplicate, const char *error)
{
    if (index < request->count) {
        s_result_t *result = &request->results[index];
        result->status = status;
        result->cost = cost;
        result->duplicate = duplicate;
        snprintf (result->error, sizeof (result->error), "%s", error ? error : "");
    }
    assert (request->left > 0);
    if (--request->left)
        return;
    msgpack_sbuffer buffer;
    msgpack_sbuffer_init (&buffer);
    msgpack_packer packer;
    msgpack_packer_init (&packer, &buffer, msgpack_sbuffer_write);
    gw_usage_batch_pack_results (&packer, request->count);
    for (uint32_t i = 0; i < request->count; i++) {
        s_result_t *result = &request->results[i];
        if (result->status == 200)
            gw_usage_batch_pack_ok (&packer, (uint64_t)result->cost, result->duplicate);
        else
            gw_usage_batch_pack_error (&packer, result->status, result->error);
    }
    zframe_t *body = zframe_new (buffer.data, buffer.size);
    msgpack_sbuffer_destroy (&buffer);
    gw_worker_final (self->worker, request->grid, 200, NULL, &body);
    free (request);
}

//  A recorded event: its FINAL 200 (single form) or its batch result.
static void
s_recorded (s_actor_t *self, s_pending_t *pending)
{
    if (pending->request)
        s_request_result (self, pending->request, pending->index, 200,
            pending->event.recorded_cost, pending->event.duplicate, NULL);
    else
        s_answer (self, pending);
}

//  An event not recorded (500, 503): its FINAL error or its batch result.
static void
s_failed (s_actor_t *self, s_pending_t *pending, uint16_t status, const char *code,
    const char *message)
{
    if (pending->request)
        s_request_result (
            self, pending->request, pending->index, status, 0, false, message);
    else
        gw_worker_error (
            self->worker, pending->grid, status, "server_error", code, message);
}

//  Append the settle item of a recorded event (STAGES.md §6.3) to items:
//  {rid, scopes, hold, cost, tokens, est_tokens, lease}. False (nothing
//  appended) when nothing was reserved for the request.
static bool
s_settle_item (msgpack_packer *packer, s_pending_t *pending)
{
    if (pending->hold == 0 && !pending->lease && pending->scopes_size == 0)
        return false;
    gw_usage_event_t *event = &pending->event;
    msgpack_sbuffer *buffer = (msgpack_sbuffer *)packer->data;
    msgpack_pack_map (packer, 7);
    gw_mpack_str (packer, "rid");
    msgpack_pack_bin (packer, 16);
    msgpack_pack_bin_body (packer, event->rid, 16);
    gw_mpack_str (packer, "scopes");
    if (pending->scopes_size)
        msgpack_sbuffer_write (
            buffer, (const char *)pending->scopes, pending->scopes_size);
    else
        msgpack_pack_array (packer, 0);
    gw_mpack_str (packer, "hold");
    msgpack_pack_uint64 (packer, pending->hold);
    gw_mpack_str (packer, "cost");
    msgpack_pack_uint64 (packer, (uint64_t)event->recorded_cost);
    gw_mpack_str (packer, "tokens");
    msgpack_pack_uint64 (
        packer, (uint64_t)event->prompt_tokens + (uint64_t)event->completion_tokens);
    gw_mpack_str (packer, "est_tokens");
    msgpack_pack_uint64 (packer, pending->est_tokens);
    gw_mpack_str (packer, "lease");
    if (pending->lease)
        msgpack_pack_true (packer);
    else
        msgpack_pack_false (packer);
    return true;
}

//  Send the settles of a committed batch as one request, {settles: [items]}
//  (count items packed in items): one bus round trip per commit, not one
//  per event.
static void
s_settle_send (s_actor_t *self, msgpack_sbuffer *items, uint32_t count)
{
    if (!self->client || count == 0)
        return;
    if (gw_client_in_flight (self->client) >= SETTLE_INFLIGHT_MAX) {
        self->stats.settle_errors++;
        if (gw_mono_ms () - self->settle_warned_ms > 1000) {
            self->settle_warned_ms = gw_mono_ms ();
            gw_warn ("billing: %d settles in flight, dropping settles (holds expire on "
                     "their own)",
                SETTLE_INFLIGHT_MAX);
        }
        return;
    }
    if (gw_client_send_batch (self->client, self->settle, "settle", "settles",
            items->data, items->size, count, SETTLE_DEADLINE_MS) == 0)
        self->stats.settles++;
    else
        self->stats.settle_errors++;
}

//  Commit the batch and answer every event in it.
static void
s_flush (s_actor_t *self)
{
    if (self->count == 0)
        return;
    self->stats.batches++;
    for (size_t i = 0; i < self->count; i++) {
        s_pending_t *pending = &self->batch[i];
        gw_usage_event_t *event = &pending->event;
        event->key = pending->key;
        event->user = pending->user;
        event->group = pending->group;
        event->model = pending->model;
        event->channel = pending->channel;
        self->events[i] = *event;
    }
    gw_store_t *store = self->billing->store;
    int rc = gw_store_record_usage (store, self->events, self->count);
    if (rc == 0)
        self->stats.commits++;
    else if (rc == GW_STORE_FAILED && self->count > 1) {
        //  One bad event must not block the rest: one transaction each.
        gw_warn ("billing: batch of %zu rejected (%s); recording one at a time",
            self->count, gw_store_error (store));
    }
    msgpack_sbuffer settles;
    msgpack_sbuffer_init (&settles);
    msgpack_packer packer;
    msgpack_packer_init (&packer, &settles, msgpack_sbuffer_write);
    uint32_t settle_count = 0;
    for (size_t i = 0; i < self->count; i++) {
        s_pending_t *pending = &self->batch[i];
        int event_rc = rc;
        if (rc == GW_STORE_FAILED && self->count > 1) {
            event_rc = gw_store_record_usage (store, &self->events[i], 1);
            if (event_rc == 0)
                self->stats.commits++;
        }
        if (event_rc == 0) {
            pending->event.duplicate = self->events[i].duplicate;
            pending->event.recorded_cost = self->events[i].recorded_cost;
            if (pending->event.duplicate)
                self->stats.duplicates++;
            else
                self->stats.recorded++;
            s_recorded (self, pending);
            if (self->client && s_settle_item (&packer, pending))
                settle_count++;
            continue;
        }
        self->stats.failed++;
        if (event_rc == GW_STORE_UNAVAILABLE)
            s_failed (self, pending, 503, "store_unavailable", gw_store_error (store));
        else {
            gw_error ("billing: usage event not recorded: %s", gw_store_error (store));
            s_failed (self, pending, 500, "store_rejected", gw_store_error (store));
        }
    }
    s_settle_send (self, &settles, settle_count);
    msgpack_sbuffer_destroy (&settles);
    if (rc == GW_STORE_UNAVAILABLE)
        gw_error ("billing: store unavailable, %zu event(s) answered 503: %s",
            self->count, gw_store_error (store));
    self->count = 0;
}

//  Pack one usage sum as map entries (6 pairs, after the caller's header).
static void
s_pack_sum (msgpack_packer *packer, const gw_usage_sum_t *sum)
{
    gw_mpack_str (packer, "requests");
    msgpack_pack_uint64 (packer, (uint64_t)sum->requests);
    gw_mpack_str (packer, "prompt_tokens");
    msgpack_pack_uint64 (packer, (uint64_t)sum->prompt_tokens);
    gw_mpack_str (packer, "completion_tokens");
    msgpack_pack_uint64 (packer, (uint64_t)sum->completion_tokens);
    gw_mpack_str (packer, "cached_tokens");
    msgpack_pack_uint64 (packer, (uint64_t)sum->cached_tokens);
    gw_mpack_str (packer, "cost");
    msgpack_pack_uint64 (packer, (uint64_t)sum->cost);
}

//  ann.op = "usage": the usage of the caller's key (tenant.key, written by
//  auth) over [from, to) ms, totals and per model (docs/BILLING.md).
static void
s_usage_query (s_actor_t *self, gw_msg_t *request)
{
    const uint8_t *grid = gw_msg_rid (request);
    const char *key = gw_envelope_tenant_str (self->envelope, "key");
    if (!key || !*key) {
        gw_worker_error (self->worker, grid, 401, "invalid_request_error",
            "missing_api_key", "A usage query needs an authenticated key.");
        return;
    }
    uint64_t from = 0, to = INT64_MAX;
    zframe_t *body = gw_msg_body (request);
    if (body && zframe_size (body)) {
        gw_mreader_t reader;
        gw_mreader_init (&reader, zframe_data (body), zframe_size (body));
        gw_mvalue_t value, name;
        int rc = gw_mreader_next (&reader, &value) || value.type != GW_MP_MAP ? -1 : 0;
        for (uint32_t i = 0; rc == 0 && i < value.v.count; i++) {
            rc = gw_mreader_next (&reader, &name) || name.type != GW_MP_STR ? -1 : 0;
            gw_mvalue_t field;
            if (!rc &&
                (gw_mvalue_streq (&name, "from") || gw_mvalue_streq (&name, "to"))) {
                rc = gw_mreader_next (&reader, &field) ||
                        s_uint (&field, INT64_MAX,
                            gw_mvalue_streq (&name, "from") ? &from : &to)
                    ? -1
                    : 0;
            }
            else if (!rc)
                rc = gw_mreader_skip (&reader, 8);
        }
        if (rc || from > to) {
            gw_worker_error (self->worker, grid, 400, "invalid_request_error",
                "invalid_usage_query",
                "A usage query body is {\"from\": unix ms, \"to\": unix ms}, from <= "
                "to.");
            return;
        }
    }
    gw_usage_sum_t total;
    size_t rows_max = 256;
    gw_usage_sum_t *rows = (gw_usage_sum_t *)malloc (rows_max * sizeof (gw_usage_sum_t));
    assert (rows);
    gw_store_t *store = self->billing->store;
    int models = gw_store_usage (
        store, GW_USAGE_BY_KEY, key, (int64_t)from, (int64_t)to, &total, rows, rows_max);
    if (models > (int)rows_max) {
        rows_max = (size_t)models;
        free (rows);
        rows = (gw_usage_sum_t *)malloc (rows_max * sizeof (gw_usage_sum_t));
        assert (rows);
        models = gw_store_usage (store, GW_USAGE_BY_KEY, key, (int64_t)from, (int64_t)to,
            &total, rows, rows_max);
    }
    if (models < 0) {
        gw_worker_error (self->worker, grid, models == GW_STORE_UNAVAILABLE ? 503 : 500,
            "server_error", "store_error", gw_store_error (store));
        free (rows);
        return;
    }
    if ((size_t)models > rows_max)
        models = (int)rows_max;  //  the ledger grew between the two queries
    msgpack_sbuffer buffer;
    msgpack_sbuffer_init (&buffer);
    msgpack_packer packer;
    msgpack_packer_init (&packer, &buffer, msgpack_sbuffer_write);
    msgpack_pack_map (&packer, 10);
    gw_mpack_str (&packer, "object");
    gw_mpack_str (&packer, "usage");
    gw_mpack_str (&packer, "key");
    gw_mpack_str (&packer, key);
    gw_mpack_str (&packer, "from");
    msgpack_pack_uint64 (&packer, from);
    gw_mpack_str (&packer, "to");
    msgpack_pack_uint64 (&packer, to);
    s_pack_sum (&packer, &total);
    gw_mpack_str (&packer, "models");
    msgpack_pack_array (&packer, (size_t)models);
    for (int i = 0; i < models; i++) {
        msgpack_pack_map (&packer, 6);
        gw_mpack_str (&packer, "model");
        gw_mpack_str (&packer, rows[i].model);
        s_pack_sum (&packer, &rows[i]);
    }
    free (rows);
    zframe_t *answer = zframe_new (buffer.data, buffer.size);
    msgpack_sbuffer_destroy (&buffer);
    gw_worker_final (self->worker, grid, 200, NULL, &answer);
}

//  Validate and price one event (size bytes at data) and add it to the
//  store batch: answered after COMMIT. A malformed event is answered at
//  once, 400: a FINAL of its own (request NULL, the single form) or its
//  result in request.
static void
s_take (s_actor_t *self, const uint8_t *grid, s_request_t *request, uint32_t index,
    const uint8_t *data, size_t size)
{
    s_pending_t *pending = &self->batch[self->count];
    const char *why = NULL;
    char message[160];
    if (s_parse_event (data, size, pending, &why))
        snprintf (message, sizeof (message), "Invalid usage event: %s.", why);
    else {
        int64_t cost = 0;
        gw_usage_event_t *event = &pending->event;
        if (gw_billing_price (self->billing, pending->model, pending->group,
                event->prompt_tokens, event->completion_tokens, event->cached_tokens,
                &cost) >= 0) {
            event->cost = cost;
            memcpy (pending->grid, grid, 16);
            pending->request = request;
            pending->index = index;
            self->stats.events++;
            if (self->verbose) {
                char hex[33];
                gw_rid_hex (event->rid, hex);
                gw_debug ("billing: event %s user=%s model=%s cost=%" PRId64, hex,
                    pending->user, pending->model, cost);
            }
            if (self->count++ == 0)
                self->first_ms = gw_mono_ms ();
            if (self->count >= self->batch_max)
                s_flush (self);
            return;
        }
        snprintf (message, sizeof (message),
            "Invalid usage event: the cost does not fit in 64 bits.");
    }
    self->stats.rejected++;
    if (self->verbose)
        gw_debug ("billing: rejected: %s", message);
    if (request)
        s_request_result (self, request, index, 400, 0, false, message);
    else
        gw_worker_error (self->worker, grid, 400, "invalid_request_error",
            "invalid_usage_event", message);
}

static void
s_handle (s_actor_t *self, gw_msg_t *request)
{
    const uint8_t *grid = gw_msg_rid (request);
    zframe_t *frame = gw_msg_envelope (request);
    if (frame && zframe_size (frame) &&
        gw_envelope_decode (self->envelope, zframe_data (frame), zframe_size (frame)) ==
            0) {
        const char *op = gw_envelope_ann_str (self->envelope, "op");
        if (op && streq (op, "usage")) {
            s_usage_query (self, request);
            return;
        }
    }
    zframe_t *body = gw_msg_body (request);
    const uint8_t *data = body ? zframe_data (body) : NULL;
    size_t size = body ? zframe_size (body) : 0;
    const char *why = NULL;
    int items = gw_usage_batch_decode (data, size, self->items, GW_USAGE_BATCH_MAX, &why);
    if (items < 0) {
        self->stats.rejected++;
        char message[160];
        snprintf (message, sizeof (message), "Invalid usage batch: %s.", why);
        gw_worker_error (self->worker, grid, 400, "invalid_request_error",
            "invalid_usage_batch", message);
        return;
    }
    if (items == 0) {
        s_take (self, grid, NULL, 0, data, size);
        return;
    }
    s_request_t *batch = (s_request_t *)calloc (
        1, sizeof (s_request_t) + (size_t)items * sizeof (s_result_t));
    assert (batch);
    memcpy (batch->grid, grid, 16);
    batch->count = (uint32_t)items;
    batch->left = (uint32_t)items + 1;  //  + 1: not answered while we add
    self->stats.batch_requests++;
    for (int i = 0; i < items; i++)
        s_take (self, grid, batch, (uint32_t)i, self->items[i].data, self->items[i].size);
    s_request_result (self, batch, UINT32_MAX, 0, 0, false, NULL);
}

static void
s_configure (s_actor_t *self, const char *key, const char *value)
{
    long number = value ? atol (value) : 0;
    int rc = 1;
    if (!key || !value)
        ;
    else if (streq (key, "capacity") && number >= 1 && number <= 65535 && !self->worker) {
        self->capacity = (uint32_t)number;
        rc = 0;
    }
    else if (streq (key, "batch_max") && number >= 1 && number <= 4096) {
        s_flush (self);
        free (self->batch);
        free (self->events);
        self->batch_max = (size_t)number;
        self->batch = (s_pending_t *)calloc (self->batch_max, sizeof (s_pending_t));
        self->events =
            (gw_usage_event_t *)calloc (self->batch_max, sizeof (gw_usage_event_t));
        assert (self->batch && self->events);
        rc = 0;
    }
    else if (streq (key, "batch_wait_ms") && number >= 0 && number <= 1000) {
        self->batch_wait_ms = (int)number;
        rc = 0;
    }
    else if (streq (key, "heartbeat") && number >= 10 && number <= 60000 &&
        !self->worker) {
        self->heartbeat_ms = (int)number;
        rc = 0;
    }
    else if (streq (key, "expiry") && number >= 20 && number <= 600000 && !self->worker) {
        self->expiry_ms = (int)number;
        rc = 0;
    }
    else if (streq (key, "refresh_ms") && number >= 100 && number <= 3600000) {
        self->refresh_ms = (int)number;
        rc = 0;
    }
    else if (streq (key, "settle") && !self->worker &&
        (streq (value, "-") || gw_msg_service_valid (value, strlen (value)))) {
        snprintf (
            self->settle, sizeof (self->settle), "%s", streq (value, "-") ? "" : value);
        rc = 0;
    }
    zsock_signal (self->pipe, (byte)rc);
}

static void
s_on_pipe (s_actor_t *self)
{
    zmsg_t *msg = zmsg_recv (self->pipe);
    if (!msg) {
        self->terminated = true;
        return;
    }
    char *command = zmsg_popstr (msg);
    if (!command || streq (command, "$TERM"))
        self->terminated = true;
    else if (streq (command, "VERBOSE"))
        self->verbose = true;
    else if (streq (command, "STATS")) {
        s_stats_t *s = &self->stats;
        zstr_sendf (self->pipe,
            "events=%" PRIu64 " recorded=%" PRIu64 " duplicates=%" PRIu64
            " rejected=%" PRIu64 " failed=%" PRIu64 " batches=%" PRIu64
            " commits=%" PRIu64 " settles=%" PRIu64 " settle_errors=%" PRIu64
            " unpriced=%" PRIu64 " batch_requests=%" PRIu64,
            s->events, s->recorded, s->duplicates, s->rejected, s->failed, s->batches,
            s->commits, s->settles, s->settle_errors, self->billing->unpriced,
            s->batch_requests);
    }
    else if (streq (command, "CONNECT")) {
        char *endpoint = zmsg_popstr (msg);
        if (!self->worker && endpoint) {
            self->worker =
                gw_worker_new (endpoint, "billing", self->capacity, GW_READY_IDEMPOTENT);
            if (self->worker && *self->settle)
                self->client = gw_client_new (endpoint);
            if (self->worker && self->heartbeat_ms && self->expiry_ms)
                gw_worker_set_heartbeat (
                    self->worker, self->heartbeat_ms, self->expiry_ms);
            if (self->client && self->heartbeat_ms && self->expiry_ms)
                gw_client_set_heartbeat (
                    self->client, self->heartbeat_ms, self->expiry_ms);
        }
        zsock_signal (self->pipe, self->worker ? 0 : 1);
        zstr_free (&endpoint);
    }
    else if (streq (command, "CONFIGURE")) {
        char *key = zmsg_popstr (msg);
        char *value = zmsg_popstr (msg);
        s_configure (self, key, value);
        zstr_free (&key);
        zstr_free (&value);
    }
    else
        gw_warn ("billing: unknown command %s", command);
    zstr_free (&command);
    zmsg_destroy (&msg);
}

//  Drain settle answers; count the ones that were not 200.
static void
s_drain_client (s_actor_t *self)
{
    gw_msg_t *msg;
    while ((msg = gw_client_recv (self->client))) {
        if (gw_msg_id (msg) == GW_MSG_FINAL && gw_msg_status (msg) != 200) {
            self->stats.settle_errors++;
            if (gw_mono_ms () - self->settle_warned_ms > 5000) {
                self->settle_warned_ms = gw_mono_ms ();
                gw_warn ("billing: settle to %s answered %u", self->settle,
                    gw_msg_status (msg));
            }
        }
        gw_msg_destroy (&msg);
    }
    gw_client_tick (self->client);
}

void
gw_billing_actor (zsock_t *pipe, void *args)
{
    gw_thread_name ("aigw-billing");
    assert (args);
    s_actor_t self;
    memset (&self, 0, sizeof (self));
    self.pipe = pipe;
    self.billing = (gw_billing_t *)args;
    self.capacity = 1024;
    self.batch_max = 256;
    self.batch_wait_ms = 2;
    self.refresh_ms = 5000;
    self.refreshed_ms = gw_mono_ms ();
    snprintf (self.settle, sizeof (self.settle), "ratelimit");
    self.batch = (s_pending_t *)calloc (self.batch_max, sizeof (s_pending_t));
    self.events = (gw_usage_event_t *)calloc (self.batch_max, sizeof (gw_usage_event_t));
    self.envelope = gw_envelope_new ();
    assert (self.batch && self.events && self.envelope);
    zsock_signal (pipe, 0);
    while (!self.terminated) {
        zmq_pollitem_t items[3];
        int count = 0;
        items[count++] = (zmq_pollitem_t){zsock_resolve (pipe), 0, ZMQ_POLLIN, 0};
        if (self.worker)
            items[count++] = (zmq_pollitem_t){
                zsock_resolve (gw_worker_socket (self.worker)), 0, ZMQ_POLLIN, 0};
        if (self.client)
            items[count++] = (zmq_pollitem_t){
                zsock_resolve (gw_client_socket (self.client)), 0, ZMQ_POLLIN, 0};
        int64_t now = gw_mono_ms ();
        long timeout = self.refresh_ms - (now - self.refreshed_ms);
        if (self.worker && gw_worker_timeout (self.worker) < timeout)
            timeout = gw_worker_timeout (self.worker);
        if (self.client && gw_client_timeout (self.client) < timeout)
            timeout = gw_client_timeout (self.client);
        if (self.count) {
            long wait = self.batch_wait_ms - (long)(now - self.first_ms);
            if (wait < timeout)
                timeout = wait;
        }
        if (timeout < 0)
            timeout = 0;
        if (zmq_poll (items, count, timeout) < 0) {
            if (zmq_errno () == EINTR)
                continue;  //  a signal: the main decides what it means
            break;  //  the context is going away
        }
        if (items[0].revents & ZMQ_POLLIN)
            s_on_pipe (&self);
        if (self.terminated)
            break;
        if (self.worker) {
            gw_msg_t *msg;
            while ((msg = gw_worker_recv (self.worker))) {
                if (gw_msg_id (msg) == GW_MSG_REQUEST)
                    s_handle (&self, msg);
                //  CANCEL: the event stays in its batch; its FINAL after
                //  COMMIT frees the credit (the broker does not relay it).
                gw_msg_destroy (&msg);
            }
            if (self.count && gw_mono_ms () - self.first_ms >= self.batch_wait_ms)
                s_flush (&self);
            gw_worker_tick (self.worker);
        }
        if (self.client)
            s_drain_client (&self);
        if (gw_mono_ms () - self.refreshed_ms >= self.refresh_ms) {
            gw_billing_refresh (self.billing);
            self.refreshed_ms = gw_mono_ms ();
        }
    }
    //  A clean stop commits and answers what it holds. (A killed process
    //  answers nothing: the broker re-dispatches, the producer resends.)
    if (self.worker)
        s_flush (&self);
    gw_client_destroy (&self.client);
    gw_worker_destroy (&self.worker);
    free (self.batch);
    free (self.events);
    gw_envelope_destroy (&self.envelope);
    gw_billing_destroy (&self.billing);
}

//  --------------------------------------------------------------------------
//  Start the billing stage configured from the environment (aigw-billing's
//  variables) and connect it to bus. NULL after logging why.

zactor_t *
gw_billing_launch (const char *bus, const char *url)
{
    char error[512];
    gw_store_t *store = gw_store_new (url, error, sizeof (error));
    if (!store) {
        gw_error ("billing: DATABASE_URL: %s", error);
        return NULL;
    }
    gw_info ("billing: store %s, schema version %d", gw_store_backend (store),
        gw_store_version (store));
    gw_billing_t *billing = gw_billing_new (&store);
    const char *multiplier = gw_env ("AIGW_PRICE_MULTIPLIER", "1.5");
    if (gw_billing_set_multiplier (billing, multiplier)) {
        gw_error ("billing: AIGW_PRICE_MULTIPLIER=%s: must be a decimal number 0..1000 "
                  "with at most 3 decimals",
            multiplier);
        gw_billing_destroy (&billing);
        return NULL;
    }
    const char *prices = gw_env ("AIGW_PRICES_FILE", NULL);
    if (prices) {
        int loaded = gw_billing_load_prices (billing, prices, error, sizeof (error));
        if (loaded < 0) {
            gw_error ("billing: AIGW_PRICES_FILE %s", error);
            gw_billing_destroy (&billing);
            return NULL;
        }
        gw_info ("billing: %d price(s) loaded from %s", loaded, prices);
    }
    gw_info ("billing: global price multiplier %s", multiplier);

    zactor_t *actor = zactor_new (gw_billing_actor, billing);  //  takes billing
    assert (actor);
    int rc =
        gw_actor_configure (actor, "settle", gw_env ("AIGW_BILLING_SETTLE", "ratelimit"));
    rc |= gw_actor_configure_int (
        actor, "capacity", gw_env_int ("AIGW_BILLING_CAPACITY", 1024, 1, 65535));
    rc |= gw_actor_configure_int (
        actor, "batch_max", gw_env_int ("AIGW_BILLING_BATCH_MAX", 256, 1, 4096));
    rc |= gw_actor_configure_int (
        actor, "batch_wait_ms", gw_env_int ("AIGW_BILLING_BATCH_WAIT_MS", 2, 0, 1000));
    rc |= gw_actor_configure_session (actor);
    if (rc) {
        gw_error (
            "billing: bad configuration (AIGW_BILLING_SETTLE must be a service name)");
        zactor_destroy (&actor);
        return NULL;
    }
    return gw_actor_connect (actor, bus, "billing");
}

//  --------------------------------------------------------------------------
//  Self test

//  A usage event body.
static zframe_t *
s_event_body (const uint8_t rid[16], const char *user, const char *group,
    const char *model, uint64_t prompt, uint64_t completion, uint64_t cached,
    uint64_t hold)
{
    msgpack_sbuffer buffer;
    msgpack_sbuffer_init (&buffer);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &buffer, msgpack_sbuffer_write);
    msgpack_pack_map (&pk, hold ? 14 : 11);
    gw_mpack_str (&pk, "rid");
    msgpack_pack_bin (&pk, 16);
    msgpack_pack_bin_body (&pk, rid, 16);
    gw_mpack_str (&pk, "ts");
    msgpack_pack_uint64 (&pk, (uint64_t)gw_time_ms ());
    gw_mpack_str (&pk, "key");
    gw_mpack_str (&pk, "k1234567");
    gw_mpack_str (&pk, "user");
    gw_mpack_str (&pk, user);
    gw_mpack_str (&pk, "group");
    gw_mpack_str (&pk, group);
    gw_mpack_str (&pk, "model");
    gw_mpack_str (&pk, model);
    gw_mpack_str (&pk, "channel");
    gw_mpack_str (&pk, "ch");
    gw_mpack_str (&pk, "prompt_tokens");
    msgpack_pack_uint64 (&pk, prompt);
    gw_mpack_str (&pk, "completion_tokens");
    msgpack_pack_uint64 (&pk, completion);
    gw_mpack_str (&pk, "cached_tokens");
    msgpack_pack_uint64 (&pk, cached);
    gw_mpack_str (&pk, "hold");
    msgpack_pack_uint64 (&pk, hold);
    if (hold) {
        gw_mpack_str (&pk, "scopes");
        msgpack_pack_array (&pk, 2);
        gw_mpack_str (&pk, "key:k1234567");
        gw_mpack_str (&pk, "user:alice");
        gw_mpack_str (&pk, "est_tokens");
        msgpack_pack_uint64 (&pk, 4096);
        gw_mpack_str (&pk, "lease");
        msgpack_pack_true (&pk);
    }
    zframe_t *frame = zframe_new (buffer.data, buffer.size);
    msgpack_sbuffer_destroy (&buffer);
    return frame;
}

//  Send a REQUEST to billing with body; returns its GWP rid in grid.
static void
s_send (gw_client_t *client, zframe_t **body_p, uint8_t grid[16])
{
    gw_rid_new (grid);
    gw_envelope_t *envelope = gw_envelope_new ();
    gw_envelope_set_rid (envelope, grid);
    gw_envelope_slip_append (envelope, "billing");
    zframe_t *frame = gw_envelope_encode (envelope);
    gw_envelope_destroy (&envelope);
    gw_msg_t *msg = gw_msg_new (GW_MSG_REQUEST);
    gw_msg_set_rid (msg, grid);
    gw_msg_set_service (msg, "billing");
    gw_msg_set_deadline (msg, (uint64_t)(gw_time_ms () + 10000));
    gw_msg_set_envelope (msg, &frame);
    gw_msg_set_body (msg, body_p);
    int rc = gw_client_send (client, &msg);
    assert (rc == 0);
}

typedef struct {
    uint8_t grid[16];  //  GWP rid
    int64_t want;  //  expected cost
    bool duplicate;  //  expected duplicate flag
    uint16_t status;  //  received status, 0 = none yet
    int64_t cost;  //  received
    bool got_duplicate;  //  received
} s_sent_t;

//  Read a FINAL body {"cost", "duplicate"}.
static void
s_read_answer (gw_msg_t *msg, int64_t *cost, bool *duplicate)
{
    zframe_t *body = gw_msg_body (msg);
    assert (body);
    gw_mreader_t reader;
    gw_mreader_init (&reader, zframe_data (body), zframe_size (body));
    gw_mvalue_t value;
    assert (gw_mreader_find (&reader, "cost") == 0);
    assert (gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_UINT);
    *cost = (int64_t)value.v.u;
    gw_mreader_init (&reader, zframe_data (body), zframe_size (body));
    assert (gw_mreader_find (&reader, "duplicate") == 0);
    assert (gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_BOOL);
    *duplicate = value.v.b;
}

//  Wait until every sent request has its FINAL.
static void
s_collect (gw_client_t *client, s_sent_t *sent, size_t count, int timeout_ms)
{
    size_t done = 0;
    for (size_t i = 0; i < count; i++)
        done += sent[i].status != 0;
    int64_t end = gw_mono_ms () + timeout_ms;
    while (done < count && gw_mono_ms () < end) {
        gw_msg_t *msg = gw_client_wait (client, 100);
        if (!msg)
            continue;
        if (gw_msg_id (msg) == GW_MSG_FINAL)
            for (size_t i = 0; i < count; i++)
                if (!sent[i].status && !memcmp (sent[i].grid, gw_msg_rid (msg), 16)) {
                    sent[i].status = gw_msg_status (msg);
                    if (sent[i].status == 200)
                        s_read_answer (msg, &sent[i].cost, &sent[i].got_duplicate);
                    done++;
                    break;
                }
        gw_msg_destroy (&msg);
    }
    assert (done == count);
}

static uint64_t
s_stat (zactor_t *actor, const char *name)
{
    zstr_send (actor, "STATS");
    char *stats = zstr_recv (actor);
    assert (stats);
    char pattern[64];
    snprintf (pattern, sizeof (pattern), " %s=", name);
    char *padded = zsys_sprintf (" %s", stats);
    char *at = strstr (padded, pattern);
    assert (at);
    uint64_t value = strtoull (at + strlen (pattern), NULL, 10);
    zstr_free (&padded);
    zstr_free (&stats);
    return value;
}

static void
s_write_file (const char *path, const char *text)
{
    FILE *file = fopen (path, "w");
    assert (file);
    fputs (text, file);
    fclose (file);
}

//  Pricing without a bus.
static void
s_test_pricing (const char *url, bool verbose)
{
    char error[512];
    gw_store_t *store = gw_store_new (url, error, sizeof (error));
    assert (store);
    gw_price_t price = {2500000, 10000000, 1250000};  //  $2.50 / $10 / $1.25 per 1M
    assert (gw_store_price_set (store, "gpt-4o", &price) == 0);
    price = (gw_price_t){1, 0, 0};  //  one micro-unit per 1M tokens
    assert (gw_store_price_set (store, "tiny", &price) == 0);
    assert (gw_store_group_set (store, "vip", 800) == 0);
    assert (gw_store_group_set (store, "odd", 333) == 0);
    gw_billing_t *billing = gw_billing_new (&store);
    assert (billing && !store);
    assert (gw_billing_multiplier (billing) == 1500);
    int64_t cost = -1;
    //  1000 in × $2.50/1M + 500 out × $10/1M = $0.0075; × 1.5 = $0.01125.
    assert (gw_billing_price (billing, "gpt-4o", "default", 1000, 500, 0, &cost) == 0);
    assert (cost == 11250);
    //  Unknown group = 1.0; group vip 0.8: $0.009.
    assert (gw_billing_price (billing, "gpt-4o", "nogroup", 1000, 500, 0, &cost) == 0);
    assert (cost == 11250);
    assert (gw_billing_price (billing, "gpt-4o", "vip", 1000, 500, 0, &cost) == 0);
    assert (cost == 9000);
    //  Cached prompt tokens at the cached price: 600 fresh + 400 cached.
    //  600×2.5 + 400×1.25 + 500×10 = 1500 + 500 + 5000 = 7000 µ$ × 1.5 = 10500.
    assert (gw_billing_price (billing, "gpt-4o", "default", 1000, 500, 400, &cost) == 0);
    assert (cost == 10500);
    assert (gw_billing_price (billing, "gpt-4o", "default", 10, 0, 11, &cost) == -1);
    //  Rounding half up, once, at the end: 1 µ$/1M tokens, multiplier 1.
    assert (gw_billing_set_multiplier (billing, "1") == 0);
    assert (gw_billing_price (billing, "tiny", "default", 500000, 0, 0, &cost) == 0);
    assert (cost == 1);  //  0.5 -> 1
    assert (gw_billing_price (billing, "tiny", "default", 499999, 0, 0, &cost) == 0);
    assert (cost == 0);  //  0.499999 -> 0
    assert (gw_billing_price (billing, "tiny", "default", 1500000, 0, 0, &cost) == 0);
    assert (cost == 2);  //  1.5 -> 2
    assert (gw_billing_price (billing, "tiny", "default", 2499999, 0, 0, &cost) == 0);
    assert (cost == 2);
    //  One rounding at the end, not per factor: 1 µ$ × 1.5 × 0.333 = 0.4995
    //  -> 0 (per factor: 1.5 -> 2, × 0.333 = 0.666 -> 1); 1.5 µ$ × 1.5 ×
    //  0.333 = 0.74925 -> 1.
    assert (gw_billing_set_multiplier (billing, "1.5") == 0);
    assert (gw_billing_price (billing, "tiny", "odd", 1500000, 0, 0, &cost) == 0);
    assert (cost == 1);
    assert (gw_billing_price (billing, "tiny", "odd", 1000000, 0, 0, &cost) == 0);
    assert (cost == 0);  //  0.4995 -> 0
    assert (gw_billing_set_multiplier (billing, "1.2345") == -1);
    assert (gw_billing_set_multiplier (billing, "abc") == -1);
    assert (gw_billing_multiplier (billing) == 1500);
    //  Largest inputs stay exact or fail; never wrap.
    assert (gw_billing_price (billing, "gpt-4o", "default", GW_STORE_TOKENS_MAX,
                GW_STORE_TOKENS_MAX, 0, &cost) == 0);
    assert (cost == (int64_t)(1000000LL * 12500000LL * 15 / 10));
    assert (gw_billing_price (billing, "gpt-4o", "default", GW_STORE_TOKENS_MAX + 1, 0, 0,
                &cost) == -1);
    //  No price: billed 0, counted; "*" is the fallback price.
    assert (gw_billing_price (billing, "mystery", "default", 100, 100, 0, &cost) == 1);
    assert (cost == 0 && billing->unpriced == 1);

    //  The price file: numbers or decimal strings, USD per 1M tokens.
    char path[128];
    snprintf (path, sizeof (path), "/tmp/aigw-prices-%d.json", getpid ());
    s_write_file (path,
        "{\"gpt-4o-mini\": {\"input\": 0.15, \"output\": \"0.60\", \"cached_input\": "
        "0.075},"
        " \"big\": {\"input\": 15, \"output\": 75},"
        " \"*\": {\"input\": \"1\", \"output\": 2}}");
    int loaded = gw_billing_load_prices (billing, path, error, sizeof (error));
    if (loaded < 0)
        printf ("%s\n", error);
    assert (loaded == 3);
    gw_price_t got;
    assert (gw_store_price_get (billing->store, "gpt-4o-mini", &got) == 0);
    assert (got.input == 150000 && got.output == 600000 && got.cached_input == 75000);
    assert (gw_store_price_get (billing->store, "big", &got) == 0);
    assert (
        got.input == 15000000 && got.output == 75000000 && got.cached_input == 15000000);
    //  The "*" price applies to unknown models: 1M in × $1 + 1M out × $2 = $3 × 1.5.
    assert (gw_billing_price (
                billing, "mystery", "default", 1000000, 1000000, 0, &cost) == 0);
    assert (cost == 4500000);
    const char *bad[][2] = {
        {"[]", "must hold a JSON object"},
        {"{\"m\": {\"input\": 1}}", "m: needs \"input\" and \"output\""},
        {"{\"m\": {\"input\": 1, \"output\": -1}}", "m.output"},
        {"{\"m\": {\"input\": 0.0000001, \"output\": 1}}", "m.input"},
        {"{\"m\": {\"input\": \"1.2.3\", \"output\": 1}}", "m.input"},
        {"{\"m\": {\"input\": 1, \"output\": 1, \"cache\": 1}}",
            "unknown field \"cache\""},
        {"{\"m\": 5}", "m: must be an object"},
        {"{\"m\": {\"input\": 1, \"output\": [1]}}", "m.output"},
        {"{\"m\": {\"input\": 1e300, \"output\": 1}}", "m.input"},
        {"{\"m\": ", "invalid JSON"},
    };
    for (size_t i = 0; i < sizeof (bad) / sizeof (bad[0]); i++) {
        s_write_file (path, bad[i][0]);
        int rc = gw_billing_load_prices (billing, path, error, sizeof (error));
        if (verbose || rc != -1 || !strstr (error, bad[i][1]))
            printf ("\n    %s -> %s", bad[i][0], rc == -1 ? error : "accepted");
        assert (rc == -1 && strstr (error, bad[i][1]));
    }
    assert (gw_store_price_get (billing->store, "m", &got) == 1);  //  nothing written
    unlink (path);
    assert (gw_billing_load_prices (
                billing, "/nonexistent/p.json", error, sizeof (error)) == -1);
    gw_billing_destroy (&billing);
}

//  A stand-in ratelimit worker: collects settle bodies.
typedef struct {
    gw_worker_t *worker;
    size_t settles;  //  settle items received
    size_t requests;  //  settle requests received (a batch each)
    bool body_ok;  //  every body was {settles: [items with the §6.3 fields]}
} s_ratelimit_t;

//  Check one settle body {settles: [items]}; returns the items, or -1.
static int
s_ratelimit_items (zframe_t *body)
{
    gw_mreader_t reader;
    gw_mreader_init (&reader, zframe_data (body), zframe_size (body));
    gw_mvalue_t array;
    if (gw_mreader_find (&reader, "settles") != 0 ||
        gw_mreader_next (&reader, &array) != 0 || array.type != GW_MP_ARRAY ||
        array.v.count == 0)
        return -1;
    const char *fields[] = {
        "rid", "scopes", "hold", "cost", "tokens", "est_tokens", "lease"};
    for (uint32_t i = 0; i < array.v.count; i++) {
        for (size_t f = 0; f < 7; f++) {
            gw_mreader_t item = reader;
            if (gw_mreader_find (&item, fields[f]) != 0)
                return -1;
        }
        if (gw_mreader_skip (&reader, 8) != 0)
            return -1;
    }
    return (int)array.v.count;
}

static void
s_ratelimit_poll (s_ratelimit_t *rl)
{
    gw_msg_t *msg;
    while ((msg = gw_worker_recv (rl->worker))) {
        if (gw_msg_id (msg) == GW_MSG_REQUEST) {
            gw_envelope_t *envelope = gw_envelope_new ();
            zframe_t *frame = gw_msg_envelope (msg);
            bool ok = frame &&
                gw_envelope_decode (envelope, zframe_data (frame), zframe_size (frame)) ==
                    0;
            ok = ok && gw_envelope_ann_str (envelope, "op") &&
                streq (gw_envelope_ann_str (envelope, "op"), "settle");
            gw_envelope_destroy (&envelope);
            int items = s_ratelimit_items (gw_msg_body (msg));
            if (!ok || items < 0)
                rl->body_ok = false;
            else
                rl->settles += (size_t)items;
            rl->requests++;
            gw_worker_final (rl->worker, gw_msg_rid (msg), 200, NULL, NULL);
        }
        gw_msg_destroy (&msg);
    }
    gw_worker_tick (rl->worker);
}

static void
s_test_bus (const char *url, bool verbose)
{
    char error[512];
    zactor_t *broker = zactor_new (gw_broker_actor, NULL);
    assert (broker);
    zstr_sendx (broker, "CONFIGURE", "grace", "300", NULL);
    assert (zsock_wait (broker) == 0);
    zstr_sendx (broker, "BIND", "tcp://127.0.0.1:*", NULL);
    char *endpoint = zstr_recv (broker);
    assert (endpoint && *endpoint);

    gw_store_t *store = gw_store_new (url, error, sizeof (error));
    if (!store)
        printf ("%s\n", error);
    assert (store);
    gw_price_t price = {2500000, 10000000, 1250000};
    assert (gw_store_price_set (store, "gpt-4o", &price) == 0);
    assert (gw_store_group_set (store, "vip", 800) == 0);
    gw_store_t *reader =
        gw_store_new (url, error, sizeof (error));  //  to check the ledger
    assert (reader);
    gw_billing_t *billing = gw_billing_new (&store);
    zactor_t *actor = zactor_new (gw_billing_actor, billing);
    assert (actor);
    if (verbose)
        zstr_send (actor, "VERBOSE");
    zstr_sendx (actor, "CONFIGURE", "batch_max", "64", NULL);
    assert (zsock_wait (actor) == 0);
    zstr_sendx (actor, "CONFIGURE", "batch_wait_ms", "5", NULL);
    assert (zsock_wait (actor) == 0);
    zstr_sendx (actor, "CONFIGURE", "capacity", "0", NULL);
    assert (zsock_wait (actor) == 1);
    zstr_sendx (actor, "CONFIGURE", "nonsense", "1", NULL);
    assert (zsock_wait (actor) == 1);
    zstr_sendx (actor, "CONNECT", endpoint, NULL);
    assert (zsock_wait (actor) == 0);

    s_ratelimit_t rl = {
        gw_worker_new (endpoint, "ratelimit", 1000, GW_READY_IDEMPOTENT), 0, 0, true};
    assert (rl.worker);
    gw_client_t *client = gw_client_new (endpoint);
    assert (client);

    //  A burst of events: every one recorded once, priced exactly, in far
    //  fewer transactions than events.
    enum { BURST = 400, DUPS = 100 };
    s_sent_t *sent = (s_sent_t *)calloc (BURST + DUPS, sizeof (s_sent_t));
    uint8_t (*rids)[16] = calloc (BURST, 16);
    assert (sent && rids);
    int64_t total = 0;
    for (size_t i = 0; i < BURST; i++) {
        gw_rid_new (rids[i]);
        uint64_t prompt = 1000 + i, completion = 500 + (i % 13), cached = i % 3 ? 0 : 100;
        const char *group = i % 2 ? "vip" : "default";
        assert (gw_billing_price (billing, "gpt-4o", group, (int64_t)prompt,
                    (int64_t)completion, (int64_t)cached, &sent[i].want) == 0);
        total += sent[i].want;
        zframe_t *body = s_event_body (rids[i], i % 2 ? "bob" : "alice", group, "gpt-4o",
            prompt, completion, cached, i % 4 == 0 ? 1000 : 0);
        s_send (client, &body, sent[i].grid);
    }
    int64_t start = gw_mono_ms ();
    while (gw_mono_ms () - start < 200 && rl.settles < BURST / 4) {
        s_ratelimit_poll (&rl);
        zclock_sleep (5);
    }
    s_collect (client, sent, BURST, 10000);
    for (size_t i = 0; i < BURST; i++) {
        assert (sent[i].status == 200);
        assert (!sent[i].got_duplicate && sent[i].cost == sent[i].want);
    }
    uint64_t commits = s_stat (actor, "commits");
    if (verbose)
        printf ("\n    %d events in %" PRIu64 " transactions", BURST, commits);
    assert (commits >= 1 && commits <= BURST / 5);
    assert (s_stat (actor, "recorded") == BURST);

    //  Resent events (the producer's spool) are acknowledged as duplicates
    //  with their first cost, and change nothing.
    for (size_t i = 0; i < DUPS; i++) {
        s_sent_t *dup = &sent[BURST + i];
        dup->want = sent[i * 3].want;
        uint64_t prompt = 1000 + i * 3;
        zframe_t *body = s_event_body (rids[i * 3], "alice", "default", "gpt-4o", prompt,
            1, 0, 0);  //  different usage: ignored, the first one stands
        s_send (client, &body, dup->grid);
    }
    s_collect (client, sent + BURST, DUPS, 10000);
    for (size_t i = 0; i < DUPS; i++) {
        assert (sent[BURST + i].status == 200 && sent[BURST + i].got_duplicate);
        assert (sent[BURST + i].cost == sent[BURST + i].want);
    }
    assert (s_stat (actor, "duplicates") == DUPS);
    gw_usage_sum_t sum_alice, sum_bob;
    assert (gw_store_usage (reader, GW_USAGE_BY_USER, "alice", 0, INT64_MAX, &sum_alice,
                NULL, 0) == 1);
    assert (gw_store_usage (
                reader, GW_USAGE_BY_USER, "bob", 0, INT64_MAX, &sum_bob, NULL, 0) == 1);
    assert (sum_alice.requests + sum_bob.requests == BURST);
    assert (sum_alice.cost + sum_bob.cost == total);
    int64_t alice = 0, bob = 0;
    assert (gw_store_user_get (reader, "alice", NULL, 0, &alice) == 0);
    assert (gw_store_user_get (reader, "bob", NULL, 0, &bob) == 0);
    assert (alice == -sum_alice.cost && bob == -sum_bob.cost);

    //  ann.op = "usage": the caller's key's usage, totals and per model.
    {
        uint8_t qrid[16];
        gw_rid_new (qrid);
        gw_envelope_t *envelope = gw_envelope_new ();
        gw_envelope_set_rid (envelope, qrid);
        gw_envelope_slip_append (envelope, "billing");
        gw_envelope_set_ann_str (envelope, "op", "usage");
        gw_envelope_set_tenant_str (envelope, "key", "k1234567");
        zframe_t *frame = gw_envelope_encode (envelope);
        gw_msg_t *msg = gw_msg_new (GW_MSG_REQUEST);
        gw_msg_set_rid (msg, qrid);
        gw_msg_set_service (msg, "billing");
        gw_msg_set_envelope (msg, &frame);
        assert (gw_client_send (client, &msg) == 0);
        gw_msg_t *answer = gw_client_wait (client, 5000);
        assert (answer && gw_msg_status (answer) == 200);
        zframe_t *body = gw_msg_body (answer);
        gw_mreader_t mr;
        gw_mvalue_t value;
        gw_mreader_init (&mr, zframe_data (body), zframe_size (body));
        assert (gw_mreader_find (&mr, "cost") == 0);
        assert (gw_mreader_next (&mr, &value) == 0 && value.v.u == (uint64_t)total);
        gw_mreader_init (&mr, zframe_data (body), zframe_size (body));
        assert (gw_mreader_find (&mr, "requests") == 0);
        assert (gw_mreader_next (&mr, &value) == 0 && value.v.u == BURST);
        gw_mreader_init (&mr, zframe_data (body), zframe_size (body));
        assert (gw_mreader_find (&mr, "models") == 0);
        assert (gw_mreader_next (&mr, &value) == 0 && value.type == GW_MP_ARRAY);
        assert (value.v.count == 1);
        gw_msg_destroy (&answer);
        //  A time range in the future is empty; a bad range is 400; no key 401.
        const uint64_t ranges[][2] = {{INT64_MAX - 1, INT64_MAX}, {5, 4}, {0, 0}, {0, 1}};
        const int want[] = {200, 400, 400, 401};
        for (int i = 0; i < 4; i++) {
            gw_rid_new (qrid);
            gw_envelope_set_rid (envelope, qrid);
            if (i == 3)
                gw_envelope_set_tenant_str (envelope, "key", "");
            frame = gw_envelope_encode (envelope);
            msgpack_sbuffer qbuf;
            msgpack_sbuffer_init (&qbuf);
            msgpack_packer qpk;
            msgpack_packer_init (&qpk, &qbuf, msgpack_sbuffer_write);
            msgpack_pack_map (&qpk, 2);
            gw_mpack_str (&qpk, "from");
            msgpack_pack_uint64 (&qpk, ranges[i][0]);
            gw_mpack_str (&qpk, "to");
            if (i == 2)
                gw_mpack_str (&qpk, "x");  //  wrong type
            else
                msgpack_pack_uint64 (&qpk, ranges[i][1]);
            zframe_t *query = zframe_new (qbuf.data, qbuf.size);
            msgpack_sbuffer_destroy (&qbuf);
            msg = gw_msg_new (GW_MSG_REQUEST);
            gw_msg_set_rid (msg, qrid);
            gw_msg_set_service (msg, "billing");
            gw_msg_set_envelope (msg, &frame);
            gw_msg_set_body (msg, &query);
            assert (gw_client_send (client, &msg) == 0);
            answer = gw_client_wait (client, 5000);
            assert (answer);
            if (gw_msg_status (answer) != want[i])
                printf ("\n    usage case %d: %u", i, gw_msg_status (answer));
            assert (gw_msg_status (answer) == want[i]);
            if (i == 0) {
                body = gw_msg_body (answer);
                gw_mreader_init (&mr, zframe_data (body), zframe_size (body));
                assert (gw_mreader_find (&mr, "requests") == 0);
                assert (gw_mreader_next (&mr, &value) == 0 && value.v.u == 0);
            }
            gw_msg_destroy (&answer);
        }
        gw_envelope_destroy (&envelope);
    }

    //  Settles: one item per event that had a hold (and again for its
    //  duplicates, harmlessly), each with the §6.3 fields, sent as one
    //  request per committed batch.
    start = gw_mono_ms ();
    while (gw_mono_ms () - start < 3000 && rl.settles < BURST / 4) {
        s_ratelimit_poll (&rl);
        zclock_sleep (5);
    }
    for (int i = 0; i < 10; i++) {  //  and no more than that
        s_ratelimit_poll (&rl);
        zclock_sleep (5);
    }
    if (verbose)
        printf ("\n    settles received: %zu", rl.settles);
    //  Resends of rids i*3 with hold 0 carry no scopes: no settle for them.
    assert (rl.settles == BURST / 4);
    assert (rl.body_ok);
    if (verbose)
        printf ("\n    in %zu settle requests", rl.requests);
    assert (rl.requests >= 1 && rl.requests < rl.settles);

    //  Bad events: 400, never a crash, nothing recorded.
    uint8_t rid[16];
    gw_rid_new (rid);
    msgpack_sbuffer buffer;
    msgpack_sbuffer_init (&buffer);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &buffer, msgpack_sbuffer_write);
    msgpack_pack_map (&pk, 2);  //  no rid
    gw_mpack_str (&pk, "user");
    gw_mpack_str (&pk, "alice");
    gw_mpack_str (&pk, "model");
    gw_mpack_str (&pk, "gpt-4o");
    size_t no_rid = buffer.size;
    msgpack_pack_map (&pk, 3);  //  wrong type
    gw_mpack_str (&pk, "rid");
    msgpack_pack_bin (&pk, 16);
    msgpack_pack_bin_body (&pk, rid, 16);
    gw_mpack_str (&pk, "user");
    msgpack_pack_uint64 (&pk, 5);
    gw_mpack_str (&pk, "model");
    gw_mpack_str (&pk, "gpt-4o");
    size_t wrong_type = buffer.size;
    zframe_t *bodies[9];
    bodies[0] = zframe_new (buffer.data, no_rid);
    bodies[1] = zframe_new (buffer.data + no_rid, wrong_type - no_rid);
    bodies[2] = zframe_new ("\x93\x01\x02\x03", 4);  //  an array
    bodies[3] = zframe_new ("", 0);
    bodies[4] = zframe_new ("\xdf\xff\xff\xff\xff", 5);  //  map32 of 4G entries
    bodies[5] = s_event_body (rid, "alice", "default", "gpt-4o", 10, 10, 11, 0);
    bodies[6] = s_event_body (rid, "", "default", "gpt-4o", 10, 10, 0, 0);
    bodies[8] = s_event_body (rid, "bad\xff", "default", "gpt-4o", 10, 10, 0, 0);
    bodies[7] = zframe_new ("\x81\xa3rid\xc4\x0f"
                            "123456789012345",
        22);  //  rid of 15
    s_sent_t bad[9];
    memset (bad, 0, sizeof (bad));
    for (int i = 0; i < 9; i++)
        s_send (client, &bodies[i], bad[i].grid);
    msgpack_sbuffer_destroy (&buffer);
    s_collect (client, bad, 9, 5000);
    for (int i = 0; i < 9; i++) {
        if (bad[i].status != 400)
            printf ("\n    bad body %d: status %u", i, bad[i].status);
        assert (bad[i].status == 400);
    }
    assert (s_stat (actor, "rejected") == 9);
    //  Random bodies never crash it.
    for (int round = 0; round < 200; round++) {
        uint8_t noise[48];
        gw_rid_new (noise);
        gw_rid_new (noise + 16);
        gw_rid_new (noise + 32);
        noise[0] = (uint8_t)(0x80 | (round % 16));
        zframe_t *body = zframe_new (noise, (size_t)(round % 48));
        s_sent_t one;
        memset (&one, 0, sizeof (one));
        s_send (client, &body, one.grid);
        s_collect (client, &one, 1, 5000);
        assert (one.status == 400);
    }
    assert (gw_store_usage (reader, GW_USAGE_BY_USER, "alice", 0, INT64_MAX, &sum_alice,
                NULL, 0) == 1);
    assert (sum_alice.requests + sum_bob.requests == BURST);

    //  Batches ({events: […]}, STAGES.md §6.2): one FINAL with a result per
    //  event in order; a bad event is refused alone; a batch larger than
    //  batch_max (64) spans several transactions and is answered after the
    //  last; a resent batch records nothing twice.
    {
        enum { N = 100, BAD = 37, DUP = 50 };
        msgpack_sbuffer bbuf;
        msgpack_sbuffer_init (&bbuf);
        msgpack_packer bpk;
        msgpack_packer_init (&bpk, &bbuf, msgpack_sbuffer_write);
        gw_usage_batch_pack_head (&bpk, N);
        int64_t want[N];
        int64_t batch_total = 0;
        for (int i = 0; i < N; i++) {
            uint8_t fresh[16];
            gw_rid_new (fresh);
            uint64_t prompt = 100 + (uint64_t)i, cached = i == BAD ? prompt + 1 : 0;
            zframe_t *body = i == DUP
                ? s_event_body (rids[0], "alice", "default", "gpt-4o", 1, 1, 0, 0)
                : s_event_body (fresh, "dave", "default", "gpt-4o", prompt, 7, cached, 0);
            msgpack_sbuffer_write (
                &bbuf, (const char *)zframe_data (body), zframe_size (body));
            zframe_destroy (&body);
            want[i] = sent[0].want;  //  the duplicate's first cost
            if (i != DUP && i != BAD) {
                assert (gw_billing_price (billing, "gpt-4o", "default", (int64_t)prompt,
                            7, 0, &want[i]) == 0);
                batch_total += want[i];
            }
        }
        uint64_t recorded = s_stat (actor, "recorded");
        for (int round = 0; round < 2; round++) {
            zframe_t *body = zframe_new (bbuf.data, bbuf.size);
            uint8_t grid[16];
            s_send (client, &body, grid);
            gw_msg_t *answer = gw_client_wait (client, 5000);
            assert (answer && gw_msg_id (answer) == GW_MSG_FINAL);
            assert (memcmp (gw_msg_rid (answer), grid, 16) == 0);
            assert (gw_msg_status (answer) == 200);
            uint16_t status[N];
            uint64_t cost[N];
            zframe_t *results = gw_msg_body (answer);
            assert (gw_usage_batch_results (zframe_data (results), zframe_size (results),
                        status, cost, N) == 0);
            for (int i = 0; i < N; i++) {
                assert (status[i] == (i == BAD ? 400 : 200));
                if (i != BAD)
                    assert (cost[i] == (uint64_t)want[i]);
            }
            gw_msg_destroy (&answer);
            //  Once: N - 2 new rows (the first round), none in the second.
            assert (s_stat (actor, "recorded") == recorded + N - 2);
        }
        gw_usage_sum_t sum_dave;
        assert (gw_store_usage (reader, GW_USAGE_BY_USER, "dave", 0, INT64_MAX, &sum_dave,
                    NULL, 0) == 1);
        assert (sum_dave.requests == N - 2 && sum_dave.cost == batch_total);
        assert (s_stat (actor, "batch_requests") == 2);
        //  Malformed containers: 400 for the whole request, nothing recorded.
        const char *containers[] = {
            "\x81\xa6"
            "events\xa1x",  //  not an array
            "\x81\xa6"
            "events\x90",  //  empty
            "\x81\xa6"
            "events\x92\x80",  //  two declared, one there
            "\x81\xa6"
            "events\x91\x80\xc0",  //  trailing bytes
            "\x81\xa6"
            "events\xdd\xff\xff\xff\xff",  //  array32 of 4G
        };
        const size_t sizes[] = {10, 9, 10, 11, 13};
        for (int i = 0; i < 5; i++) {
            zframe_t *body = zframe_new (containers[i], sizes[i]);
            s_sent_t one;
            memset (&one, 0, sizeof (one));
            s_send (client, &body, one.grid);
            s_collect (client, &one, 1, 5000);
            assert (one.status == 400);
        }
        //  A batch of one bad item: a result, not a crash.
        zframe_t *body = zframe_new ("\x81\xa6"
                                     "events\x91\x80",
            10);
        uint8_t grid[16];
        s_send (client, &body, grid);
        gw_msg_t *answer = gw_client_wait (client, 5000);
        assert (answer && gw_msg_status (answer) == 200);
        uint16_t status[1];
        zframe_t *results = gw_msg_body (answer);
        assert (gw_usage_batch_results (
                    zframe_data (results), zframe_size (results), status, NULL, 1) == 0);
        assert (status[0] == 400);
        gw_msg_destroy (&answer);
        assert (s_stat (actor, "recorded") == recorded + N - 2);
        msgpack_sbuffer_destroy (&bbuf);
    }

    //  Without a ratelimit service, settles fail (503 after grace) and
    //  billing goes on answering.
    gw_worker_destroy (&rl.worker);
    uint64_t errors = s_stat (actor, "settle_errors");
    s_sent_t late[4];
    memset (late, 0, sizeof (late));
    for (int i = 0; i < 4; i++) {
        uint8_t fresh[16];
        gw_rid_new (fresh);
        zframe_t *body =
            s_event_body (fresh, "carol", "default", "gpt-4o", 10, 10, 0, 500);
        s_send (client, &body, late[i].grid);
    }
    start = gw_mono_ms ();
    s_collect (client, late, 4, 5000);
    assert (gw_mono_ms () - start < 1000);  //  not held up by the missing service
    for (int i = 0; i < 4; i++)
        assert (late[i].status == 200 && !late[i].got_duplicate);
    //  The four were committed in one to four batches, one settle each.
    start = gw_mono_ms ();
    while (s_stat (actor, "settle_errors") < errors + 1 && gw_mono_ms () - start < 3000)
        zclock_sleep (20);
    zclock_sleep (400);  //  a later batch's settle would have failed by now (grace 300)
    uint64_t failed = s_stat (actor, "settle_errors") - errors;
    assert (failed >= 1 && failed <= 4);

    gw_client_destroy (&client);
    zactor_destroy (&actor);
    gw_store_destroy (&reader);
    free (sent);
    free (rids);
    zstr_free (&endpoint);
    zactor_destroy (&broker);
}

void
gw_billing_test (bool verbose)
{
    printf (" * gw_billing: ");
    char dir[] = "/tmp/aigw-billing-XXXXXX";
    assert (mkdtemp (dir));
    char *url = zsys_sprintf ("sqlite://%s/pricing.db", dir);
    s_test_pricing (url, verbose);
    zstr_free (&url);
    url = zsys_sprintf ("sqlite://%s/bus.db", dir);
    s_test_bus (url, verbose);
    zstr_free (&url);
    char command[128];
    snprintf (command, sizeof (command), "rm -rf %s", dir);
    assert (system (command) == 0);

    const char *pg = getenv ("AIGW_TEST_PG_URL");
    if (pg && *pg) {
        //  A fresh database beside the one the URL names.
        PGconn *conn = PQconnectdb (pg);
        assert (conn && PQstatus (conn) == CONNECTION_OK);
        uint8_t random[16];
        gw_rid_new (random);
        char hex[33], name[64], sql[128];
        gw_rid_hex (random, hex);
        snprintf (name, sizeof (name), "aigw_billing_%.12s", hex);
        snprintf (sql, sizeof (sql), "CREATE DATABASE %s", name);
        PGresult *result = PQexec (conn, sql);
        assert (PQresultStatus (result) == PGRES_COMMAND_OK);
        PQclear (result);
        const char *query = strchr (pg, '?');
        size_t end = query ? (size_t)(query - pg) : strlen (pg);
        size_t slash = end;
        while (slash > 0 && pg[slash - 1] != '/')
            slash--;
        url = zsys_sprintf ("%.*s%s%s", (int)slash, pg, name, query ? query : "");
        if (verbose)
            printf ("\n    postgres: %s", url);
        s_test_pricing (url, verbose);
        s_test_bus (url, verbose);
        zstr_free (&url);
        snprintf (sql, sizeof (sql), "DROP DATABASE %s WITH (FORCE)", name);
        PQclear (PQexec (conn, sql));
        PQfinish (conn);
    }
    else {
        const char *require = getenv ("AIGW_REQUIRE_SERVICES");
        if (require && streq (require, "1")) {
            printf ("AIGW_REQUIRE_SERVICES=1 but AIGW_TEST_PG_URL is not set\n");
            assert (false);
        }
        printf ("(PostgreSQL skipped: AIGW_TEST_PG_URL not set) ");
    }
    printf ("OK\n");
}
