//  --------------------------------------------------------------------------
//  gw_router — the router stage actor and model discovery.
//
//  Design note. The request path is one envelope decode, one pass over the
//  channel table (gw_channels_plan), one envelope annotation and one
//  FORWARD; nothing on it blocks. Model discovery (GET {base_url}/models
//  for channels that declared no list) runs in a child actor with blocking
//  libcurl easy transfers, so a slow provider never delays a request; the
//  child sends each result ("MODELS" id name..., or "FAILED" id reason) over
//  its pipe and the router's thread applies it, so the channel table has a
//  single owner and needs no lock. A failed refresh keeps the last list
//  learnt (a provider's brief outage does not make its models vanish); a
//  channel that never answered serves no model until it does.
//
//  Outcomes: op "models" -> FINAL 200 with the OpenAI list object; no model
//  -> 400; a model outside tenant.models -> 403 model_not_allowed; no
//  channel -> 404 model_not_found; otherwise ann.plan is written, the slip
//  past the cursor is replaced by "bridge" (or "model.<name>" for a local
//  model, when enabled) and the request is forwarded. A malformed envelope
//  gets 400, never an assertion.

#include "aigw.h"
#include "gw_router.h"
#include "gw_channels.h"
#include <curl/curl.h>
#include <openssl/crypto.h>

#define FETCH_BODY_MAX (8 * 1024 * 1024)
#define FETCH_NAMES_MAX 100000
#define FETCH_TIMEOUT 10000  //  ms per discovery transfer
#define LOCAL_PREFIX "local/"

//  --------------------------------------------------------------------------
//  Discovery: one blocking fetch

typedef struct {
    char *data;  //  response body so far
    size_t size;  //  bytes in data
    bool too_big;  //  body exceeded FETCH_BODY_MAX
    zsock_t *abort;  //  input here aborts the transfer, or NULL
} s_fetch_t;

static size_t
s_fetch_write (char *ptr, size_t size, size_t nmemb, void *userdata)
{
    s_fetch_t *fetch = (s_fetch_t *)userdata;
    size_t bytes = size * nmemb;
    if (fetch->size + bytes > FETCH_BODY_MAX) {
        fetch->too_big = true;
        return 0;
    }
    char *grown = (char *)realloc (fetch->data, fetch->size + bytes + 1);
    assert (grown);
    fetch->data = grown;
    memcpy (fetch->data + fetch->size, ptr, bytes);
    fetch->size += bytes;
    return bytes;
}

static int
s_fetch_progress (void *userdata, curl_off_t dltotal, curl_off_t dlnow,
    curl_off_t ultotal, curl_off_t ulnow)
{
    s_fetch_t *fetch = (s_fetch_t *)userdata;
    return fetch->abort && (zsock_events (fetch->abort) & ZMQ_POLLIN) ? 1 : 0;
}

//  Parse an OpenAI list object's data[].id into names.
static int
s_parse_model_list (
    const char *json, size_t size, zlistx_t *names, char *error, size_t error_size)
{
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    gw_json_limits_t limits = gw_json_limits_default ();
    limits.max_size = FETCH_BODY_MAX;
    limits.max_depth = 16;
    gw_json_error_t jerror;
    int rc = -1;
    if (gw_json_to_msgpack (json, size, &pk, &limits, &jerror)) {
        gw_fail (error, error_size, "body is not JSON (byte %zu: %s)", jerror.offset,
            jerror.message);
        goto done;
    }
    gw_mreader_t reader;
    gw_mreader_init (&reader, sbuf.data, sbuf.size);
    gw_mvalue_t value;
    gw_mreader_t peek = reader;
    if (gw_mreader_next (&peek, &value) || value.type != GW_MP_MAP ||
        gw_mreader_find (&reader, "data") != 0 || gw_mreader_next (&reader, &value) ||
        value.type != GW_MP_ARRAY) {
        gw_fail (
            error, error_size, "body is not an OpenAI list object (no \"data\" array)");
        goto done;
    }
    uint32_t count = value.v.count;
    for (uint32_t i = 0; i < count; i++) {
        peek = reader;
        if (gw_mreader_next (&peek, &value))
            goto malformed;
        if (value.type != GW_MP_MAP) {
            if (gw_mreader_skip (&reader, 16))
                goto malformed;
            continue;
        }
        //  Find "id" inside a copy, then skip the whole element.
        gw_mreader_t item = reader;
        if (gw_mreader_skip (&reader, 16))
            goto malformed;
        if (gw_mreader_find (&item, "id") == 0 && gw_mreader_next (&item, &value) == 0 &&
            value.type == GW_MP_STR && zlistx_size (names) < FETCH_NAMES_MAX &&
            gw_channels_name_valid (value.ptr, value.size)) {
            char *name = (char *)malloc (value.size + 1);
            assert (name);
            memcpy (name, value.ptr, value.size);
            name[value.size] = 0;
            zlistx_add_end (names, name);
            free (name);
        }
    }
    rc = 0;
    goto done;
malformed:
    gw_fail (error, error_size, "malformed model list");
done:
    msgpack_sbuffer_destroy (&sbuf);
    return rc;
}

int
gw_router_fetch_models (const char *base_url, const char *key, int timeout_ms,
    zsock_t *abort_sock, zlistx_t *names, char *error, size_t error_size)
{
    assert (base_url);
    assert (names);
    CURL *curl = curl_easy_init ();
    if (!curl)
        return gw_fail (error, error_size, "curl_easy_init failed");
    char *url = zsys_sprintf ("%s/models", base_url);
    char *auth = key && *key ? zsys_sprintf ("Authorization: Bearer %s", key) : NULL;
    struct curl_slist *headers = curl_slist_append (NULL, "Accept: application/json");
    if (auth)
        headers = curl_slist_append (headers, auth);
    s_fetch_t fetch = {NULL, 0, false, abort_sock};
    curl_easy_setopt (curl, CURLOPT_URL, url);
    curl_easy_setopt (curl, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt (curl, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt (curl, CURLOPT_TIMEOUT_MS, (long)timeout_ms);
    curl_easy_setopt (
        curl, CURLOPT_CONNECTTIMEOUT_MS, (long)(timeout_ms < 5000 ? timeout_ms : 5000));
    curl_easy_setopt (curl, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt (curl, CURLOPT_WRITEFUNCTION, s_fetch_write);
    curl_easy_setopt (curl, CURLOPT_WRITEDATA, &fetch);
    curl_easy_setopt (curl, CURLOPT_XFERINFOFUNCTION, s_fetch_progress);
    curl_easy_setopt (curl, CURLOPT_XFERINFODATA, &fetch);
    curl_easy_setopt (curl, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt (curl, CURLOPT_USERAGENT, "aigw-router/" AIGW_VERSION);
    CURLcode code = curl_easy_perform (curl);
    long status = 0;
    curl_easy_getinfo (curl, CURLINFO_RESPONSE_CODE, &status);
    int rc = -1;
    if (fetch.too_big)
        gw_fail (
            error, error_size, "GET %s: body larger than %d bytes", url, FETCH_BODY_MAX);
    else if (code != CURLE_OK)
        gw_fail (error, error_size, "GET %s: %s", url, curl_easy_strerror (code));
    else if (status != 200)
        gw_fail (error, error_size, "GET %s: HTTP status %ld", url, status);
    else {
        char detail[256];
        rc = s_parse_model_list (
            fetch.data ? fetch.data : "", fetch.size, names, detail, sizeof (detail));
        if (rc)
            gw_fail (error, error_size, "GET %s: %s", url, detail);
    }
    free (fetch.data);
    curl_slist_free_all (headers);
    if (auth) {
        OPENSSL_cleanse (auth, strlen (auth));
        zstr_free (&auth);
    }
    zstr_free (&url);
    curl_easy_cleanup (curl);
    return rc;
}

//  --------------------------------------------------------------------------
//  Discovery: the child actor

typedef struct {
    char *id;  //  channel id
    char *base_url;  //  base URL
    char *key;  //  first key of the pool, or NULL
} s_target_t;

typedef struct {
    s_target_t *targets;  //  channels to discover
    size_t count;  //  entries in targets
    int refresh_s;  //  seconds between rounds
} s_discovery_args_t;

static void
s_discovery_args_destroy (s_discovery_args_t **self_p)
{
    s_discovery_args_t *self = *self_p;
    if (!self)
        return;
    for (size_t i = 0; i < self->count; i++) {
        free (self->targets[i].id);
        free (self->targets[i].base_url);
        if (self->targets[i].key)
            OPENSSL_cleanse (self->targets[i].key, strlen (self->targets[i].key));
        free (self->targets[i].key);
    }
    free (self->targets);
    free (self);
    *self_p = NULL;
}

//  Runs in its own thread; owns args. Sends MODELS / FAILED to the router.
static void
s_discovery_actor (zsock_t *pipe, void *args)
{
    s_discovery_args_t *self = (s_discovery_args_t *)args;
    curl_global_init (CURL_GLOBAL_DEFAULT);  //  thread safe since libcurl 7.84
    zsock_signal (pipe, 0);
    int64_t next = gw_mono_ms ();
    bool terminated = false;
    while (!terminated) {
        int64_t wait = next - gw_mono_ms ();
        if (wait > 0) {
            zmq_pollitem_t item = {zsock_resolve (pipe), 0, ZMQ_POLLIN, 0};
            if (zmq_poll (&item, 1, (long)wait) < 0 && zmq_errno () != EINTR)
                break;  //  context terminated
        }
        if (zsock_events (pipe) & ZMQ_POLLIN) {
            char *command = zstr_recv (pipe);
            terminated = !command || streq (command, "$TERM");
            zstr_free (&command);
            continue;
        }
        if (gw_mono_ms () < next)
            continue;
        for (size_t i = 0; i < self->count && !terminated; i++) {
            s_target_t *target = &self->targets[i];
            zlistx_t *names = zlistx_new ();
            zlistx_set_destructor (names, (zlistx_destructor_fn *)zstr_free);
            zlistx_set_duplicator (names, (zlistx_duplicator_fn *)strdup);
            char error[512];
            int rc = gw_router_fetch_models (target->base_url, target->key, FETCH_TIMEOUT,
                pipe, names, error, sizeof (error));
            zmsg_t *msg = zmsg_new ();
            zmsg_addstr (msg, rc == 0 ? "MODELS" : "FAILED");
            zmsg_addstr (msg, target->id);
            if (rc == 0)
                for (char *name = (char *)zlistx_first (names); name;
                     name = (char *)zlistx_next (names))
                    zmsg_addstr (msg, name);
            else
                zmsg_addstr (msg, error);
            zlistx_destroy (&names);
            zmsg_send (&msg, pipe);
            if (zsock_events (pipe) & ZMQ_POLLIN)
                break;  //  probably $TERM: read it first
        }
        next = gw_mono_ms () + (int64_t)self->refresh_s * 1000;
    }
    s_discovery_args_destroy (&self);
    curl_global_cleanup ();
}

//  --------------------------------------------------------------------------
//  The router actor

typedef struct {
    gw_channels_t *channels;  //  channel table, owned
    gw_stage_t *current;  //  the request being handled: its context
    gw_worker_t *worker;  //  and the session holding it (gw_stage_session)
    zactor_t *discovery;  //  discovery child, NULL if nothing to discover
    gw_envelope_t *envelope;  //  reused for every request
    msgpack_sbuffer sbuf;  //  reused for plans and model lists
    int64_t created;  //  unix s, "created" of listed models
    int refresh_s;  //  discovery period, seconds
    bool local_models;  //  route local/<name> to model.<name>
    char *local_admin;  //  groups allowed to manage local models (csv), NULL = any
    gw_client_t *bus;  //  gw.services session, NULL unless local_models
    zhashx_t *local;  //  served local model names (of model.<name> services)
    zlistx_t *parked;  //  s_parked_t * for models not in local, awaiting a refresh
    int64_t local_next;  //  mono ms of the next gw.services query
    uint8_t local_rid[16];  //  rid of the query in flight
    bool local_asking;  //  a query is in flight
    bool local_known;  //  local came from a successful query
    bool verbose;  //  log decisions
} s_router_t;

//  A request waiting for a fresh local-model list, with its context: the
//  session holding it is the one that received it (with co-location,
//  auth's), and the answer or forward goes there.
typedef struct {
    gw_msg_t *request;  //  a copy, owned
    gw_stage_t *stage;  //  its context (gw_stage_dup), owned
} s_parked_t;

static void
s_parked_destroy (s_parked_t **self_p)
{
    s_parked_t *self = *self_p;
    if (self) {
        gw_msg_destroy (&self->request);
        gw_stage_destroy (&self->stage);
        free (self);
        *self_p = NULL;
    }
}

static void
s_start_discovery (s_router_t *self)
{
    s_discovery_args_t *args =
        (s_discovery_args_t *)zmalloc (sizeof (s_discovery_args_t));
    assert (args);
    size_t size = gw_channels_size (self->channels);
    args->targets = (s_target_t *)zmalloc ((size + 1) * sizeof (s_target_t));
    assert (args->targets);
    args->refresh_s = self->refresh_s;
    for (size_t i = 0; i < size; i++) {
        if (!gw_channels_discovers (self->channels, i))
            continue;
        s_target_t *target = &args->targets[args->count++];
        target->id = strdup (gw_channels_id (self->channels, i));
        target->base_url = strdup (gw_channels_base_url (self->channels, i));
        const char *key = gw_channels_key (self->channels, i);
        target->key = key ? strdup (key) : NULL;
    }
    if (args->count == 0) {
        s_discovery_args_destroy (&args);
        return;
    }
    gw_info ("router: discovering the models of %zu channel(s) every %d s", args->count,
        self->refresh_s);
    self->discovery = zactor_new (s_discovery_actor, args);
    assert (self->discovery);
}

static void
s_on_discovery (s_router_t *self)
{
    zmsg_t *msg = zmsg_recv (self->discovery);
    if (!msg)
        return;
    char *kind = zmsg_popstr (msg);
    char *id = zmsg_popstr (msg);
    if (kind && id && streq (kind, "MODELS")) {
        zlistx_t *names = zlistx_new ();
        zlistx_set_destructor (names, (zlistx_destructor_fn *)zstr_free);
        char *name;
        while ((name = zmsg_popstr (msg)))
            zlistx_add_end (names, name);
        int kept = gw_channels_set_discovered (self->channels, id, names);
        zlistx_destroy (&names);
        gw_info ("router: channel %s lists %d model(s)", id, kept);
    }
    else if (kind && id && streq (kind, "FAILED")) {
        char *reason = zmsg_popstr (msg);
        gw_warn ("router: channel %s: model discovery failed: %s (keeping the last list)",
            id, reason ? reason : "?");
        zstr_free (&reason);
    }
    zstr_free (&kind);
    zstr_free (&id);
    zmsg_destroy (&msg);
}

//  --------------------------------------------------------------------------
//  Local models (issue 5, proto/STAGES.md §7). With local_models on, the
//  router learns which local models are served from the broker's
//  gw.services (services "model.<name>", except the management services
//  "model.admin" and "model.admin.*") every LOCAL_REFRESH_MS, over its own
//  client session driven by the actor's poll loop, so it never blocks. The
//  list feeds GET /v1/models ("local/<name>", owned_by "local") and GET
//  /local/models ("<name>"), and decides requests: a served model is
//  forwarded to model.<name>; a name not in the list is parked until a
//  fresh answer (asked at once, at most LOCAL_QUERY_MS), then forwarded or
//  refused with 404 — so a model started a moment ago is found, and a
//  wrong name gets a 404 in milliseconds rather than the broker's 503 after
//  its grace. While the broker does not answer the query, requests are
//  forwarded unchecked (the broker answers 503 when nothing serves them).

#define LOCAL_REFRESH_MS 2000  //  gw.services period
#define LOCAL_QUERY_MS 1000  //  deadline of one query
#define LOCAL_PARKED_MAX 1024  //  requests waiting for a refresh
#define LOCAL_ADMIN "model.admin"  //  the management service

//  True if name (after "model.") names a model, not a management service.
static bool
s_local_is_model (const char *name, size_t size)
{
    if (size == 0 || (size == 5 && memcmp (name, "admin", 5) == 0))
        return false;
    return !(size > 6 && memcmp (name, "admin.", 6) == 0);
}

//  Replace the served list from a gw.services body. Returns 0, or -1 if the
//  body is malformed (the list is unchanged then).
static int
s_local_parse (s_router_t *self, const void *data, size_t size)
{
    gw_mreader_t reader;
    gw_mvalue_t value;
    gw_mreader_init (&reader, data, size);
    if (gw_mreader_find (&reader, "services") || gw_mreader_next (&reader, &value) ||
        value.type != GW_MP_ARRAY)
        return -1;
    zhashx_t *names = zhashx_new ();
    assert (names);
    uint32_t count = value.v.count;
    for (uint32_t i = 0; i < count; i++) {
        if (gw_mreader_next (&reader, &value) || value.type != GW_MP_MAP)
            goto malformed;
        uint32_t pairs = value.v.count;
        gw_mvalue_t name = {0};
        uint64_t workers = 0;
        for (uint32_t j = 0; j < pairs; j++) {
            gw_mvalue_t key;
            if (gw_mreader_next (&reader, &key) || key.type != GW_MP_STR)
                goto malformed;
            if (gw_mvalue_streq (&key, "name") || gw_mvalue_streq (&key, "workers")) {
                if (gw_mreader_next (&reader, &value))
                    goto malformed;
                if (gw_mvalue_streq (&key, "name") && value.type == GW_MP_STR)
                    name = value;
                else if (gw_mvalue_streq (&key, "workers") && value.type == GW_MP_UINT)
                    workers = value.v.u;
            }
            else if (gw_mreader_skip (&reader, GW_ENVELOPE_DEPTH_MAX))
                goto malformed;
        }
        if (name.type == GW_MP_STR && workers > 0 && name.size > 6 &&
            name.size <= GW_SERVICE_MAX && memcmp (name.ptr, "model.", 6) == 0 &&
            s_local_is_model (name.ptr + 6, name.size - 6) &&
            gw_msg_service_valid (name.ptr, name.size)) {
            char text[GW_SERVICE_MAX + 1];
            memcpy (text, name.ptr + 6, name.size - 6);
            text[name.size - 6] = 0;
            zhashx_update (names, text, (void *)"");
        }
    }
    zhashx_destroy (&self->local);
    self->local = names;
    return 0;
malformed:
    zhashx_destroy (&names);
    return -1;
}

//  Repack the model list in self->sbuf (count channel models, or nothing
//  when local_only) with the served local models appended, sorted, as
//  "local/<name>" (or "<name>" when local_only), filtered by allow (which
//  names them "local/<name>"). Returns the new count.
static size_t
s_local_models (s_router_t *self, const char *allow, bool local_only, size_t count)
{
    zlistx_t *names = zhashx_keys (self->local);
    assert (names);
    zlistx_set_comparator (names, (zlistx_comparator_fn *)strcmp);
    zlistx_sort (names);
    char full[GW_SERVICE_MAX + 8];
    size_t added = 0;
    for (char *name = (char *)zlistx_first (names); name;
         name = (char *)zlistx_next (names)) {
        snprintf (full, sizeof (full), LOCAL_PREFIX "%s", name);
        added += !(allow && *allow) || gw_channels_csv_has (allow, full);
    }
    //  The channel models already packed: the elements of "data", which
    //  is the last key of the list object.
    char *old = NULL;
    size_t old_size = 0;
    if (!local_only && count) {
        gw_mreader_t reader;
        gw_mvalue_t value;
        gw_mreader_init (&reader, self->sbuf.data, self->sbuf.size);
        if (gw_mreader_find (&reader, "data") == 0 &&
            gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_ARRAY) {
            old_size = (size_t)(reader.end - reader.pos);
            old = (char *)malloc (old_size + 1);
            assert (old);
            memcpy (old, reader.pos, old_size);
        }
        else
            count = 0;  //  cannot happen: we packed it
    }
    msgpack_sbuffer_clear (&self->sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &self->sbuf, msgpack_sbuffer_write);
    msgpack_pack_map (&pk, 2);
    gw_mpack_str (&pk, "object");
    gw_mpack_str (&pk, "list");
    gw_mpack_str (&pk, "data");
    msgpack_pack_array (&pk, count + added);
    if (old_size)
        msgpack_sbuffer_write (&self->sbuf, old, old_size);
    free (old);
    for (char *name = (char *)zlistx_first (names); name;
         name = (char *)zlistx_next (names)) {
        snprintf (full, sizeof (full), LOCAL_PREFIX "%s", name);
        if (allow && *allow && !gw_channels_csv_has (allow, full))
            continue;
        msgpack_pack_map (&pk, 4);
        gw_mpack_str (&pk, "id");
        gw_mpack_str (&pk, local_only ? name : full);
        gw_mpack_str (&pk, "object");
        gw_mpack_str (&pk, "model");
        gw_mpack_str (&pk, "created");
        msgpack_pack_int64 (&pk, self->created);
        gw_mpack_str (&pk, "owned_by");
        gw_mpack_str (&pk, "local");
    }
    zlistx_destroy (&names);
    return count + added;
}

static void
s_answer_models (s_router_t *self, gw_msg_t *request)
{
    const char *allow = gw_envelope_tenant_str (self->envelope, "models");
    const char *scope = gw_envelope_ann_str (self->envelope, "scope");
    bool local_only = scope && streq (scope, "local");
    if (local_only && !self->local_models) {
        gw_worker_error (self->worker, gw_msg_rid (request), 404, "invalid_request_error",
            "local_models_disabled",
            "Local models are not enabled on this gateway (AIGW_LOCAL_MODELS=1).");
        return;
    }
    msgpack_sbuffer_clear (&self->sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &self->sbuf, msgpack_sbuffer_write);
    size_t count = 0;
    if (!local_only)
        count = gw_channels_models (self->channels, allow, self->created, &pk);
    if (self->local_models)
        count = s_local_models (self, allow, local_only, count);
    zframe_t *body = zframe_new (self->sbuf.data, self->sbuf.size);
    if (self->verbose)
        gw_debug ("router: model list, %zu model(s)", count);
    gw_worker_final (self->worker, gw_msg_rid (request), 200, NULL, &body);
}

//  Error FINAL for the request whose envelope is in self->envelope, with
//  its ann.headers (ratelimit's x-ratelimit-*, STAGES.md §6.1).
static void
s_error (s_router_t *self, const uint8_t *rid, uint16_t status, const char *type,
    const char *code, const char *message)
{
    size_t size = 0;
    const void *headers = gw_envelope_ann_raw (self->envelope, "headers", &size);
    if (!headers) {
        gw_worker_error (self->worker, rid, status, type, code, message);
        return;
    }
    gw_envelope_t *env = gw_envelope_new ();
    gw_envelope_set_ann_raw (env, "headers", headers, size);
    zframe_t *envelope = gw_envelope_encode (env);
    gw_envelope_destroy (&env);
    zframe_t *body = gw_msg_error_body (type, code, message);
    gw_worker_final (self->worker, rid, status, &envelope, &body);
}

//  Replace the slip past the cursor with service and forward.
static void
s_forward (s_router_t *self, gw_msg_t *request, const char *service)
{
    gw_envelope_slip_truncate (self->envelope);
    if (gw_envelope_slip_append (self->envelope, service)) {
        gw_worker_error (self->worker, gw_msg_rid (request), 500, "server_error",
            "routing_failed",
            "The gateway could not route this request (routing slip full).");
        return;
    }
    if (gw_stage_forward (self->current, request, self->envelope) &&
        !gw_worker_cancelled (self->worker, gw_msg_rid (request)))
        gw_worker_error (self->worker, gw_msg_rid (request), 500, "server_error",
            "routing_failed", "The gateway could not forward this request.");
}

static void s_local_ask (s_router_t *self);

//  Route a request for the local model name (the model without "local/").
//  With may_park, a name not in the served list waits for a fresh one.
static void
s_local_route (s_router_t *self, gw_msg_t *request, const char *name, bool may_park)
{
    const uint8_t *rid = gw_msg_rid (request);
    char service[GW_SERVICE_MAX + 1];
    size_t size = strlen (name);
    int length = snprintf (service, sizeof (service), "model.%s", name);
    bool valid = length > 6 && length < (int)sizeof (service) &&
        gw_msg_service_valid (service, (size_t)length) && !strchr (name, '/') &&
        s_local_is_model (name, size);
    bool served = valid && zhashx_lookup (self->local, name);
    if (valid && !served && may_park && self->bus &&
        zlistx_size (self->parked) < LOCAL_PARKED_MAX) {
        s_parked_t *parked = (s_parked_t *)zmalloc (sizeof (s_parked_t));
        assert (parked);
        parked->request = gw_msg_dup (request);
        parked->stage = gw_stage_dup (self->current);
        zlistx_add_end (self->parked, parked);
        if (!self->local_asking)
            s_local_ask (self);
        return;
    }
    if (valid && (served || !self->local_known)) {
        if (self->verbose)
            gw_debug ("router: local/%s -> %s", name, service);
        s_forward (self, request, service);
        return;
    }
    char shown[208];
    char message[512];
    snprintf (message, sizeof (message),
        "The local model `%s` is not being served (start it with POST "
        "/api/local/models/{id}/start; GET /api/local/models lists them).",
        gw_clip (name, shown, sizeof (shown)));
    gw_worker_error (
        self->worker, rid, 404, "invalid_request_error", "model_not_found", message);
}

//  Decide every parked request with the list as it is now.
static void
s_local_resolve (s_router_t *self)
{
    gw_stage_t *outer = self->current;  //  resolving may run inside a request
    gw_worker_t *outer_worker = self->worker;
    while (zlistx_first (self->parked)) {
        s_parked_t *parked = (s_parked_t *)zlistx_detach_cur (self->parked);
        gw_msg_t *request = parked->request;
        self->current = parked->stage;
        self->worker = gw_stage_session (parked->stage);
        const uint8_t *rid = gw_msg_rid (request);
        zframe_t *frame = gw_msg_envelope (request);
        if (!gw_worker_cancelled (self->worker, rid) && frame &&
            gw_envelope_decode (
                self->envelope, zframe_data (frame), zframe_size (frame)) == 0) {
            const char *model = gw_envelope_model (self->envelope);
            if (model && strncmp (model, LOCAL_PREFIX, strlen (LOCAL_PREFIX)) == 0)
                s_local_route (self, request, model + strlen (LOCAL_PREFIX), false);
            else
                gw_worker_error (self->worker, rid, 500, "server_error", "routing_failed",
                    "The gateway could not route this request.");
        }
        s_parked_destroy (&parked);
    }
    self->current = outer;
    self->worker = outer_worker;
}

//  Send a gw.services query; if it cannot leave, decide the parked requests.
static void
s_local_ask (s_router_t *self)
{
    gw_msg_t *request = gw_msg_new (GW_MSG_REQUEST);
    gw_rid_new (self->local_rid);
    gw_msg_set_rid (request, self->local_rid);
    gw_msg_set_service (request, "gw.services");
    gw_msg_set_deadline (request, (uint64_t)(gw_time_ms () + LOCAL_QUERY_MS));
    zframe_t *body = zframe_new ("\x80", 1);
    gw_msg_set_body (request, &body);
    self->local_asking = gw_client_send (self->bus, &request) == 0;
    if (!self->local_asking) {
        self->local_known = false;
        self->local_next = gw_mono_ms () + LOCAL_REFRESH_MS / 4;
        s_local_resolve (self);
    }
}

//  Take the query's answer, run the client's timers, ask when due.
static void
s_local_tick (s_router_t *self)
{
    gw_msg_t *msg;
    while ((msg = gw_client_recv (self->bus))) {
        if (gw_msg_id (msg) == GW_MSG_FINAL && self->local_asking &&
            memcmp (gw_msg_rid (msg), self->local_rid, 16) == 0) {
            zframe_t *body = gw_msg_body (msg);
            bool ok = gw_msg_status (msg) == 200 && body &&
                s_local_parse (self, zframe_data (body), zframe_size (body)) == 0;
            if (!ok && self->local_known)
                gw_warn ("router: gw.services failed (status %d): local models are "
                         "forwarded unchecked until it answers",
                    gw_msg_status (msg));
            self->local_known = ok;
            self->local_asking = false;
            self->local_next = gw_mono_ms () + LOCAL_REFRESH_MS;
            s_local_resolve (self);
        }
        gw_msg_destroy (&msg);
    }
    gw_client_tick (self->bus);
    if (!self->local_asking && gw_mono_ms () >= self->local_next)
        s_local_ask (self);
}

//  ann.op "admin": model management, forwarded to model.admin. Reading
//  (list, status) needs an authenticated key; changing (start, stop,
//  download, settings) also a group in local_admin when that is set. A key
//  with a model allow-list manages only the local models on it.
static void
s_local_admin (s_router_t *self, gw_msg_t *request)
{
    const uint8_t *rid = gw_msg_rid (request);
    if (!self->local_models) {
        gw_worker_error (self->worker, rid, 404, "invalid_request_error",
            "local_models_disabled",
            "Local models are not enabled on this gateway (AIGW_LOCAL_MODELS=1).");
        return;
    }
    const char *model = gw_envelope_model (self->envelope);
    const char *allow = gw_envelope_tenant_str (self->envelope, "models");
    const char *action = gw_envelope_ann_str (self->envelope, "action");
    bool reads = action && (streq (action, "list") || streq (action, "status"));
    char shown[208];
    char message[512];
    if (model && *model && allow && *allow && !gw_channels_csv_has (allow, model)) {
        snprintf (message, sizeof (message),
            "This API key does not have access to the model `%s`.",
            gw_clip (model, shown, sizeof (shown)));
        gw_worker_error (self->worker, rid, 403, "invalid_request_error",
            "model_not_allowed", message);
        return;
    }
    const char *group = gw_envelope_tenant_str (self->envelope, "group");
    if (!reads && self->local_admin &&
        !(group && gw_channels_csv_has (self->local_admin, group))) {
        gw_worker_error (self->worker, rid, 403, "permission_error", "permission_denied",
            "Managing local models needs a key of an admin group "
            "(AIGW_LOCAL_ADMIN_GROUPS).");
        return;
    }
    if (self->verbose)
        gw_debug ("router: admin %s -> " LOCAL_ADMIN, action ? action : "?");
    s_forward (self, request, LOCAL_ADMIN);
}

static void
s_handle (s_router_t *self, gw_msg_t *request)
{
    const uint8_t *rid = gw_msg_rid (request);
    if (gw_stage_envelope (request, self->envelope)) {
        gw_worker_error (self->worker, rid, 400, "invalid_request_error",
            "invalid_envelope", "The request envelope could not be decoded.");
        return;
    }
    const char *op = gw_envelope_ann_str (self->envelope, "op");
    if (op && streq (op, "models")) {
        s_answer_models (self, request);
        return;
    }
    if (op && streq (op, "admin")) {
        s_local_admin (self, request);
        return;
    }
    if (op && streq (op, "usage")) {
        //  GET /v1/usage: billing answers for tenant.key (STAGES.md §6.2).
        s_forward (self, request, "billing");
        return;
    }
    const char *model = gw_envelope_model (self->envelope);
    const char *allow = gw_envelope_tenant_str (self->envelope, "models");
    char shown[208];
    char message[512];
    if (!model || !*model) {
        s_error (self, rid, 400, "invalid_request_error", "missing_model",
            "You must provide a model parameter.");
        return;
    }
    if (allow && *allow && !gw_channels_csv_has (allow, model)) {
        snprintf (message, sizeof (message),
            "This API key does not have access to the model `%s`.",
            gw_clip (model, shown, sizeof (shown)));
        s_error (self, rid, 403, "invalid_request_error", "model_not_allowed", message);
        return;
    }
    //  Local models (issue 5): "local/<name>" -> service model.<name>.
    if (self->local_models && strncmp (model, LOCAL_PREFIX, strlen (LOCAL_PREFIX)) == 0) {
        s_local_route (self, request, model + strlen (LOCAL_PREFIX), true);
        return;
    }
    msgpack_sbuffer_clear (&self->sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &self->sbuf, msgpack_sbuffer_write);
    int attempts = gw_channels_plan (self->channels, model, allow, &pk);
    if (attempts == 0) {
        snprintf (message, sizeof (message),
            "The model `%s` does not exist or you do not have access to it.",
            gw_clip (model, shown, sizeof (shown)));
        s_error (self, rid, 404, "invalid_request_error", "model_not_found", message);
        return;
    }
    if (gw_envelope_set_ann_raw (
            self->envelope, "plan", self->sbuf.data, self->sbuf.size)) {
        s_error (self, rid, 500, "server_error", "routing_failed",
            "The gateway could not write the routing plan.");
        return;
    }
    if (self->verbose)
        gw_debug ("router: %s -> %d attempt(s)", model, attempts);
    s_forward (self, request, "bridge");
}

//  --------------------------------------------------------------------------
//  The stage, as gw_stage_actor runs it (alone, or co-located with auth and
//  ratelimit in aigw-gateway). Besides its session it reads the discovery
//  child's pipe and the gw.services client's socket (both listed in
//  s_sockets), and answers parked requests from there, on the session that
//  holds each one.

static void
s_request (void *state, gw_stage_t *stage, gw_msg_t *request)
{
    s_router_t *self = (s_router_t *)state;
    gw_stage_t *outer = self->current;  //  a hand-off may come back here
    gw_worker_t *outer_worker = self->worker;
    self->current = stage;
    self->worker = gw_stage_session (stage);
    s_handle (self, request);
    self->current = outer;
    self->worker = outer_worker;
}

static int
s_command (void *state, const char *command, const char *key, const char *value)
{
    s_router_t *self = (s_router_t *)state;
    if (streq (command, "VERBOSE")) {
        self->verbose = true;
        return -1;
    }
    if (!streq (command, "CONFIGURE") || !key || !value)
        return -1;
    char *end = NULL;
    long long number = strtoll (value, &end, 10);
    bool valid = *value && end && *end == 0;
    if (streq (key, "local_admin_groups")) {
        //  A comma-separated list of groups; empty = any authenticated key.
        zstr_free (&self->local_admin);
        if (*value)
            self->local_admin = strdup (value);
        return 0;
    }
    if (streq (key, "refresh_s")) {
        if (!valid || number < 1 || number > 86400)
            return 1;
        self->refresh_s = (int)number;
        return 0;
    }
    if (streq (key, "local_models")) {
        if (!valid || (number != 0 && number != 1))
            return 1;
        self->local_models = number == 1;
        return 0;
    }
    if (streq (key, "seed")) {
        if (!valid)
            return 1;
        gw_channels_seed (self->channels, (uint64_t)number);
        return 0;
    }
    return -1;
}

//  CONNECT: the gw.services session (local models) and discovery.
static int
s_connect (void *state, const char *endpoint)
{
    s_router_t *self = (s_router_t *)state;
    if (self->local_models && !self->bus) {
        self->bus = gw_client_new (endpoint);
        if (self->bus)
            gw_info ("router: routing local/<name> to model.<name>; served models "
                     "learnt from gw.services every %d ms",
                LOCAL_REFRESH_MS);
    }
    if (!self->discovery)
        s_start_discovery (self);
    return 0;
}

static size_t
s_sockets (void *state, zsock_t **sockets, size_t max)
{
    s_router_t *self = (s_router_t *)state;
    size_t count = 0;
    if (self->discovery && count < max)
        sockets[count++] = zactor_sock (self->discovery);
    if (self->bus && count < max)
        sockets[count++] = gw_client_socket (self->bus);  //  replaced on reconnect
    return count;
}

static void
s_input (void *state, zsock_t *socket)
{
    s_router_t *self = (s_router_t *)state;
    if (self->discovery && socket == zactor_sock (self->discovery)) {
        while (zsock_events (socket) & ZMQ_POLLIN)
            s_on_discovery (self);
    }
    else if (self->bus)
        s_local_tick (self);
}

static void
s_tick (void *state)
{
    s_router_t *self = (s_router_t *)state;
    if (self->bus)
        s_local_tick (self);
}

//  The gw.services client's timers, and the next query when none is in
//  flight.
static long
s_timeout (void *state)
{
    s_router_t *self = (s_router_t *)state;
    if (!self->bus)
        return -1;
    long due = gw_client_timeout (self->bus);
    if (!self->local_asking) {
        int64_t next = self->local_next - gw_mono_ms ();
        due = next < due ? (next > 0 ? (long)next : 0) : due;
    }
    return due;
}

static void
s_stage_destroy (void **state_p)
{
    s_router_t *self = (s_router_t *)*state_p;
    if (self) {
        zlistx_destroy (&self->parked);
        zhashx_destroy (&self->local);
        gw_client_destroy (&self->bus);
        zstr_free (&self->local_admin);
        zactor_destroy (&self->discovery);
        gw_envelope_destroy (&self->envelope);
        msgpack_sbuffer_destroy (&self->sbuf);
        gw_channels_destroy (&self->channels);
        free (self);
        *state_p = NULL;
    }
}

static const gw_stage_class_t s_class = {.service = "router",
    .ready_flags = GW_READY_IDEMPOTENT,
    .request = s_request,
    .command = s_command,
    .tick = s_tick,
    .destroy = s_stage_destroy,
    .connect = s_connect,
    .sockets = s_sockets,
    .input = s_input,
    .timeout = s_timeout};

void
gw_router_stage (gw_channels_t *channels, gw_stage_host_t *host)
{
    assert (host);
    s_router_t *self = (s_router_t *)zmalloc (sizeof (s_router_t));
    assert (self);
    self->channels = channels ? channels : gw_channels_new ();
    self->envelope = gw_envelope_new ();
    msgpack_sbuffer_init (&self->sbuf);
    self->created = gw_time_ms () / 1000;
    self->refresh_s = 300;
    self->local = zhashx_new ();
    assert (self->local);
    self->parked = zlistx_new ();
    assert (self->parked);
    zlistx_set_destructor (self->parked, (zlistx_destructor_fn *)s_parked_destroy);
    gw_stage_host_add (host, &s_class, self);
}

void
gw_router_actor (zsock_t *pipe, void *args)
{
    gw_stage_host_t *host = gw_stage_host_new ();
    gw_router_stage ((gw_channels_t *)args, host);
    gw_stage_actor (pipe, host);
}

//  --------------------------------------------------------------------------
//  Start the router stage configured from the environment (aigw-router's
//  variables) and connect it to bus. NULL after logging why.

gw_channels_t *
gw_router_channels_env (void)
{
    gw_channels_t *channels = gw_channels_new ();
    char error[640];
    const char *file = gw_env ("AIGW_CHANNELS_FILE", NULL);
    if (file && gw_channels_load_file (channels, file, error, sizeof (error))) {
        gw_error ("router: AIGW_CHANNELS_FILE %s", error);
        gw_channels_destroy (&channels);
        return NULL;
    }
    const char *target = gw_env ("TARGET_API_URL", NULL);
    if (target &&
        gw_channels_add_default (channels, target, gw_env ("TARGET_API_KEY", NULL),
            gw_env ("AIGW_TARGET_MODELS", NULL), error, sizeof (error))) {
        gw_error ("router: %s", error);
        gw_channels_destroy (&channels);
        return NULL;
    }
    size_t count = gw_channels_size (channels);
    if (count == 0)
        gw_warn ("router: no channels (set AIGW_CHANNELS_FILE or TARGET_API_URL): every "
                 "model request gets 404");
    for (size_t i = 0; i < count; i++)
        gw_info ("router: channel %s -> %s%s", gw_channels_id (channels, i),
            gw_channels_base_url (channels, i),
            gw_channels_discovers (channels, i) ? " (models discovered)" : "");
    return channels;
}

int
gw_router_configure_env (zactor_t *actor)
{
    assert (actor);
    return gw_actor_configure_int (
               actor, "refresh_s", gw_env_int ("AIGW_MODELS_REFRESH_S", 300, 1, 86400)) |
        gw_actor_configure (actor, "local_models",
            streq (gw_env ("AIGW_LOCAL_MODELS", "0"), "1") ? "1" : "0") |
        gw_actor_configure (
            actor, "local_admin_groups", gw_env ("AIGW_LOCAL_ADMIN_GROUPS", ""));
}

zactor_t *
gw_router_launch (const char *bus)
{
    gw_channels_t *channels = gw_router_channels_env ();
    if (!channels)
        return NULL;
    zactor_t *actor = zactor_new (gw_router_actor, channels);  //  takes channels
    assert (actor);
    gw_actor_configure_int (
        actor, "capacity", gw_env_int ("AIGW_ROUTER_CAPACITY", 1024, 1, 65535));
    gw_router_configure_env (actor);
    gw_actor_configure_session (actor);
    return gw_actor_connect (actor, bus, "router");
}

//  --------------------------------------------------------------------------
//  Self test: discovery against a tiny civetweb provider, then the request
//  path end to end in-process: broker + auth + router + a fake bridge + a
//  client.

#include "gw_broker.h"
#include "../auth/gw_auth.h"
#include <civetweb.h>

static int
s_reply (struct mg_connection *conn, int status, const char *body)
{
    mg_printf (conn,
        "HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
        "Connection: close\r\n\r\n%s",
        status, strlen (body), body);
    return status;
}

static int
s_models_handler (struct mg_connection *conn, void *cbdata)
{
    const char *auth = mg_get_header (conn, "Authorization");
    if (!auth || !streq (auth, "Bearer disc-key"))
        return s_reply (conn, 401, "{\"error\":{\"message\":\"Incorrect API key\"}}");
    return s_reply (conn, 200,
        "{\"object\":\"list\",\"data\":[{\"id\":\"mock-gpt\",\"object\":\"model\"},"
        "{\"id\":\"mock-gpt-mini\",\"object\":\"model\"},{\"id\":\"mock-embed\"},"
        "{\"noid\":1},7,{\"id\":\"bad,name\"}]}");
}

static int
s_garbage_handler (struct mg_connection *conn, void *cbdata)
{
    return s_reply (conn, 200, "this is not json");
}

typedef struct {
    gw_client_t *client;  //  the edge stand-in
    gw_worker_t *bridge;  //  fake bridge: answers 200 with the envelope it got
    int bridged;  //  requests the bridge saw
} s_rig_t;

//  Send one request through auth,router; return its FINAL (caller destroys).
static gw_msg_t *
s_call (s_rig_t *rig, const char *op, const char *model, const char *credential)
{
    uint8_t rid[16];
    gw_rid_new (rid);
    gw_envelope_t *env = gw_envelope_new ();
    gw_envelope_set_rid (env, rid);
    gw_envelope_slip_append (env, "auth");
    gw_envelope_slip_append (env, "router");
    gw_envelope_set_deadline (env, (uint64_t)gw_time_ms () + 8000);
    if (model)
        gw_envelope_set_model (env, model);
    gw_envelope_set_ann_str (env, "op", op);
    if (credential)
        gw_envelope_set_ann_str (env, "credential", credential);
    zframe_t *frame = gw_envelope_encode (env);
    gw_envelope_destroy (&env);
    gw_msg_t *request = gw_msg_new (GW_MSG_REQUEST);
    gw_msg_set_rid (request, rid);
    gw_msg_set_service (request, "auth");
    gw_msg_set_deadline (request, (uint64_t)gw_time_ms () + 8000);
    gw_msg_set_envelope (request, &frame);
    zframe_t *body = zframe_new ("\x80", 1);
    gw_msg_set_body (request, &body);
    int rc = gw_client_send (rig->client, &request);
    assert (rc == 0);
    int64_t end = gw_mono_ms () + 10000;
    while (gw_mono_ms () < end) {
        gw_msg_t *msg;
        while ((msg = gw_worker_recv (rig->bridge))) {
            if (gw_msg_id (msg) == GW_MSG_REQUEST) {
                rig->bridged++;
                assert (gw_msg_body (msg) && zframe_size (gw_msg_body (msg)) == 1);
                zframe_t *echo = zframe_dup (gw_msg_envelope (msg));
                gw_worker_final (rig->bridge, gw_msg_rid (msg), 200, NULL, &echo);
            }
            gw_msg_destroy (&msg);
        }
        gw_worker_tick (rig->bridge);
        while ((msg = gw_client_recv (rig->client))) {
            if (gw_msg_id (msg) == GW_MSG_FINAL &&
                memcmp (gw_msg_rid (msg), rid, 16) == 0)
                return msg;
            gw_msg_destroy (&msg);
        }
        gw_client_tick (rig->client);
        zmq_pollitem_t items[2] = {
            {zsock_resolve (gw_worker_socket (rig->bridge)), 0, ZMQ_POLLIN, 0},
            {zsock_resolve (gw_client_socket (rig->client)), 0, ZMQ_POLLIN, 0}};
        zmq_poll (items, 2, 10);
    }
    assert (!"no FINAL within 10 s");
    return NULL;
}

//  The "code" of an OpenAI error body, or "" (copied into out).
static const char *
s_error_code (gw_msg_t *reply, char *out, size_t out_size)
{
    *out = 0;
    zframe_t *body = gw_msg_body (reply);
    if (!body)
        return out;
    gw_mreader_t reader;
    gw_mreader_init (&reader, zframe_data (body), zframe_size (body));
    gw_mvalue_t value;
    if (gw_mreader_find (&reader, "error") == 0 &&
        gw_mreader_find (&reader, "code") == 0 &&
        gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_STR)
        snprintf (out, out_size, "%.*s", (int)value.size, value.ptr);
    return out;
}

//  Field of attempt index in the plan of the envelope echoed by the bridge.
static const char *
s_plan_field (
    gw_envelope_t *env, size_t index, const char *field, char *out, size_t out_size)
{
    *out = 0;
    size_t size;
    const void *plan = gw_envelope_ann_raw (env, "plan", &size);
    if (!plan)
        return out;
    gw_mreader_t reader;
    gw_mreader_init (&reader, plan, size);
    gw_mvalue_t value;
    if (gw_mreader_next (&reader, &value) || value.type != GW_MP_ARRAY ||
        index >= value.v.count)
        return out;
    for (size_t i = 0; i < index; i++)
        gw_mreader_skip (&reader, 4);
    if (gw_mreader_find (&reader, field) == 0 && gw_mreader_next (&reader, &value) == 0 &&
        value.type == GW_MP_STR)
        snprintf (out, out_size, "%.*s", (int)value.size, value.ptr);
    return out;
}

static size_t
s_listed (gw_msg_t *reply, const char *wanted)
{
    zframe_t *body = gw_msg_body (reply);
    msgpack_sbuffer json;
    msgpack_sbuffer_init (&json);
    int rc =
        gw_json_from_msgpack (zframe_data (body), zframe_size (body), &json, 8, NULL);
    assert (rc == 0);
    msgpack_sbuffer_write (&json, "", 1);
    char needle[128];
    snprintf (needle, sizeof (needle), "{\"id\":\"%s\",\"object\":\"model\"", wanted);
    size_t found = strstr (json.data, needle) != NULL;
    assert (strstr (json.data, "{\"object\":\"list\",\"data\":["));
    msgpack_sbuffer_destroy (&json);
    return found;
}

void
gw_router_test (bool verbose)
{
    printf (" * gw_router: ");
    curl_global_init (CURL_GLOBAL_DEFAULT);

    //  A tiny provider on an ephemeral port.
    const char *options[] = {"listening_ports", "127.0.0.1:0", "num_threads", "2", NULL};
    struct mg_context *web = mg_start (NULL, NULL, options);
    assert (web);
    mg_set_request_handler (web, "/v1/models", s_models_handler, NULL);
    mg_set_request_handler (web, "/bad/models", s_garbage_handler, NULL);
    struct mg_server_port port;
    int ports = mg_get_server_ports (web, 1, &port);
    assert (ports == 1 && port.port > 0);
    char base[64], bad[64];
    snprintf (base, sizeof (base), "http://127.0.0.1:%d/v1", port.port);
    snprintf (bad, sizeof (bad), "http://127.0.0.1:%d/bad", port.port);

    //  Discovery, one fetch at a time.
    zlistx_t *names = zlistx_new ();
    zlistx_set_destructor (names, (zlistx_destructor_fn *)zstr_free);
    zlistx_set_duplicator (names, (zlistx_duplicator_fn *)strdup);
    char error[512];
    int rc = gw_router_fetch_models (
        base, "disc-key", 5000, NULL, names, error, sizeof (error));
    if (rc)
        printf ("%s\n", error);
    assert (rc == 0 && zlistx_size (names) == 3);
    assert (streq ((char *)zlistx_first (names), "mock-gpt"));
    zlistx_purge (names);
    assert (gw_router_fetch_models (
                base, "wrong", 5000, NULL, names, error, sizeof (error)) == -1);
    assert (strstr (error, "HTTP status 401") && zlistx_size (names) == 0);
    assert (gw_router_fetch_models (
                bad, NULL, 5000, NULL, names, error, sizeof (error)) == -1);
    assert (strstr (error, "not JSON"));
    assert (gw_router_fetch_models ("http://127.0.0.1:1/v1", NULL, 2000, NULL, names,
                error, sizeof (error)) == -1);
    if (verbose)
        printf ("\n    unreachable: %s", error);
    zlistx_destroy (&names);

    //  The request path end to end.
    zactor_t *broker = zactor_new (gw_broker_actor, NULL);
    assert (broker);
    zstr_sendx (broker, "BIND", "tcp://127.0.0.1:*", NULL);
    char *endpoint = zstr_recv (broker);
    assert (endpoint && *endpoint);

    gw_channels_t *channels = gw_channels_new ();
    char config[1024];
    snprintf (config, sizeof (config),
        "[{\"id\":\"a\",\"base_url\":\"http://a.test/v1\",\"keys\":[\"up-a\"],"
        "\"models\":[\"m\"],\"model_map\":{\"alias\":\"m-up\"}},"
        "{\"id\":\"b\",\"base_url\":\"http://b.test/"
        "v1\",\"models\":[\"m\"],\"priority\":-1},"
        "{\"id\":\"disc\",\"base_url\":\"%s\",\"key\":\"disc-key\"}]",
        base);
    rc = gw_channels_load (channels, config, strlen (config), error, sizeof (error));
    assert (rc == 0);
    zactor_t *router = zactor_new (gw_router_actor, channels);
    assert (router);
    if (verbose)
        zstr_send (router, "VERBOSE");
    zstr_sendx (router, "CONFIGURE", "refresh_s", "0", NULL);
    assert (zsock_wait (router) == 1);  //  out of range
    zstr_sendx (router, "CONFIGURE", "local_models", "1", NULL);
    assert (zsock_wait (router) == 0);
    zstr_sendx (router, "CONNECT", endpoint, NULL);
    assert (zsock_wait (router) == 0);

    gw_auth_t *auth = gw_auth_new ();
    assert (gw_auth_add_keys (auth, " sk-good ,") == 1);
    zactor_t *auth_actor = zactor_new (gw_auth_actor, auth);
    assert (auth_actor);
    zstr_sendx (auth_actor, "CONNECT", endpoint, NULL);
    assert (zsock_wait (auth_actor) == 0);

    s_rig_t rig = {0};
    rig.bridge = gw_worker_new (endpoint, "bridge", 16, GW_READY_IDEMPOTENT);
    rig.client = gw_client_new (endpoint);
    assert (rig.bridge && rig.client);
    char text[256];

    //  A good request reaches the bridge with a principal, a plan, and no
    //  credential.
    gw_msg_t *reply = s_call (&rig, "chat", "m", "Bearer sk-good");
    assert (gw_msg_status (reply) == 200 && rig.bridged == 1);
    gw_envelope_t *env = gw_envelope_new ();
    zframe_t *echo = gw_msg_body (reply);
    assert (gw_envelope_decode (env, zframe_data (echo), zframe_size (echo)) == 0);
    assert (streq (gw_envelope_tenant_str (env, "user"), "default"));
    assert (streq (gw_envelope_tenant_str (env, "group"), "default"));
    assert (strlen (gw_envelope_tenant_str (env, "key")) == 8);
    const char *credential = gw_envelope_ann_str (env, "credential");
    assert (!credential || !*credential);
    assert (gw_envelope_slip_size (env) == 3);
    assert (streq (gw_envelope_slip (env, 2), "bridge"));
    assert (gw_envelope_cursor (env) == 2);
    assert (streq (s_plan_field (env, 0, "id", text, sizeof (text)), "a"));
    assert (streq (s_plan_field (env, 0, "key", text, sizeof (text)), "up-a"));
    assert (
        streq (s_plan_field (env, 0, "base", text, sizeof (text)), "http://a.test/v1"));
    assert (streq (s_plan_field (env, 1, "id", text, sizeof (text)), "b"));
    gw_msg_destroy (&reply);

    //  model_map, and the x-api-key form (the bare key).
    reply = s_call (&rig, "chat", "alias", "sk-good");
    assert (gw_msg_status (reply) == 200);
    echo = gw_msg_body (reply);
    assert (gw_envelope_decode (env, zframe_data (echo), zframe_size (echo)) == 0);
    assert (streq (s_plan_field (env, 0, "model", text, sizeof (text)), "m-up"));
    gw_msg_destroy (&reply);

    //  Refusals: FINAL straight to the client, the bridge never sees them.
    int bridged = rig.bridged;
    reply = s_call (&rig, "chat", "m", NULL);
    assert (gw_msg_status (reply) == 401);
    assert (streq (s_error_code (reply, text, sizeof (text)), "missing_api_key"));
    gw_msg_destroy (&reply);
    reply = s_call (&rig, "chat", "m", "Bearer sk-bad");
    assert (gw_msg_status (reply) == 401);
    assert (streq (s_error_code (reply, text, sizeof (text)), "invalid_api_key"));
    gw_msg_destroy (&reply);
    reply = s_call (&rig, "chat", "no-such-model", "Bearer sk-good");
    assert (gw_msg_status (reply) == 404);
    assert (streq (s_error_code (reply, text, sizeof (text)), "model_not_found"));
    gw_msg_destroy (&reply);
    reply = s_call (&rig, "chat", NULL, "Bearer sk-good");
    assert (gw_msg_status (reply) == 400);
    gw_msg_destroy (&reply);
    assert (rig.bridged == bridged);

    //  Discovery reaches the router: the model list grows to include the
    //  provider's models, and they route to the discovering channel.
    bool listed = false;
    for (int attempt = 0; attempt < 100 && !listed; attempt++) {
        reply = s_call (&rig, "models", NULL, "Bearer sk-good");
        assert (gw_msg_status (reply) == 200);
        assert (s_listed (reply, "m") && s_listed (reply, "alias"));
        listed = s_listed (reply, "mock-gpt") && s_listed (reply, "mock-embed");
        gw_msg_destroy (&reply);
        if (!listed)
            zclock_sleep (50);
    }
    assert (listed);
    reply = s_call (&rig, "chat", "mock-gpt-mini", "Bearer sk-good");
    assert (gw_msg_status (reply) == 200);
    echo = gw_msg_body (reply);
    assert (gw_envelope_decode (env, zframe_data (echo), zframe_size (echo)) == 0);
    assert (streq (s_plan_field (env, 0, "id", text, sizeof (text)), "disc"));
    assert (streq (s_plan_field (env, 0, "base", text, sizeof (text)), base));
    gw_msg_destroy (&reply);

    //  Local models: a name no model.<name> worker serves is a 404 (the
    //  router asks gw.services first), as is the management service.
    zstr_sendx (broker, "CONFIGURE", "grace", "200", NULL);
    assert (zsock_wait (broker) == 0);
    reply = s_call (&rig, "chat", "local/tiny", "Bearer sk-good");
    assert (gw_msg_status (reply) == 404);
    assert (streq (s_error_code (reply, text, sizeof (text)), "model_not_found"));
    gw_msg_destroy (&reply);
    reply = s_call (&rig, "chat", "local/admin", "Bearer sk-good");
    assert (gw_msg_status (reply) == 404);
    gw_msg_destroy (&reply);
    //  A worker for model.tiny: found at once (not after the refresh
    //  period), forwarded there, and listed as local/tiny.
    gw_worker_t *bridge = rig.bridge;
    rig.bridge = gw_worker_new (endpoint, "model.tiny", 4, 0);
    assert (rig.bridge);
    bool served = false;
    for (int attempt = 0; attempt < 100 && !served; attempt++) {
        reply = s_call (&rig, "chat", "local/tiny", "Bearer sk-good");
        served = gw_msg_status (reply) == 200;
        if (served) {
            echo = gw_msg_body (reply);
            assert (
                gw_envelope_decode (env, zframe_data (echo), zframe_size (echo)) == 0);
            assert (streq (gw_envelope_slip (env, 2), "model.tiny"));
        }
        gw_msg_destroy (&reply);
        if (!served)
            zclock_sleep (20);
    }
    assert (served);
    reply = s_call (&rig, "models", NULL, "Bearer sk-good");
    assert (s_listed (reply, "local/tiny") && s_listed (reply, "m"));
    assert (!s_listed (reply, "local/admin"));
    gw_msg_destroy (&reply);
    gw_worker_destroy (&rig.bridge);
    rig.bridge = bridge;
    //  Management goes to model.admin (no worker here: the broker's 503).
    reply = s_call (&rig, "admin", NULL, "Bearer sk-good");
    assert (gw_msg_status (reply) == 503);
    gw_msg_destroy (&reply);

    //  Co-located (aigw-gateway's fuse): auth and router in one actor. A
    //  request reaches the router by a direct call, and one parked for a
    //  local-model refresh is answered later on auth's session, which
    //  holds it.
    zactor_destroy (&auth_actor);
    zactor_destroy (&router);
    channels = gw_channels_new ();
    rc = gw_channels_load (channels, config, strlen (config), error, sizeof (error));
    assert (rc == 0);
    auth = gw_auth_new ();
    assert (gw_auth_add_keys (auth, "sk-good") == 1);
    gw_stage_host_t *host = gw_stage_host_new ();
    gw_auth_stage (auth, host);
    gw_router_stage (channels, host);
    zactor_t *fused = zactor_new (gw_stage_actor, host);
    assert (fused);
    assert (gw_actor_configure (fused, "local_models", "1") == 0);
    assert (gw_actor_configure (fused, "refresh_s", "0") == -1);
    zstr_sendx (fused, "CONNECT", endpoint, NULL);
    assert (zsock_wait (fused) == 0);
    reply = s_call (&rig, "chat", "m", "Bearer sk-good");
    assert (gw_msg_status (reply) == 200);
    echo = gw_msg_body (reply);
    assert (gw_envelope_decode (env, zframe_data (echo), zframe_size (echo)) == 0);
    assert (streq (s_plan_field (env, 0, "id", text, sizeof (text)), "a"));
    assert (gw_envelope_timings (env) == 2);
    assert (streq (gw_envelope_timing (env, 0, NULL, NULL), "auth"));
    assert (streq (gw_envelope_timing (env, 1, NULL, NULL), "router"));
    gw_msg_destroy (&reply);
    int64_t started = gw_mono_ms ();
    reply = s_call (&rig, "chat", "local/nope", "Bearer sk-good");
    assert (gw_msg_status (reply) == 404);
    assert (streq (s_error_code (reply, text, sizeof (text)), "model_not_found"));
    assert (gw_mono_ms () - started < 2000);  //  not the deadline's 504
    gw_msg_destroy (&reply);
    bridge = rig.bridge;
    rig.bridge = gw_worker_new (endpoint, "model.tiny", 4, 0);
    assert (rig.bridge);
    served = false;
    for (int attempt = 0; attempt < 100 && !served; attempt++) {
        reply = s_call (&rig, "chat", "local/tiny", "Bearer sk-good");
        served = gw_msg_status (reply) == 200;
        gw_msg_destroy (&reply);
        if (!served)
            zclock_sleep (20);
    }
    assert (served);
    gw_worker_destroy (&rig.bridge);
    rig.bridge = bridge;
    zactor_destroy (&fused);

    gw_envelope_destroy (&env);
    gw_client_destroy (&rig.client);
    gw_worker_destroy (&rig.bridge);
    zactor_destroy (&broker);
    zstr_free (&endpoint);
    mg_stop (web);
    curl_global_cleanup ();
    printf ("OK\n");
}
