//  --------------------------------------------------------------------------
//  gw_channels — the router's channel table and plan builder.
//
//  Design note. The table is loaded once at start (config is input: every
//  field is checked and a bad file is an error naming the field, never an
//  assertion) and kept sorted by priority, highest first, so a plan is one
//  pass over the channels: collect those serving the model, then order each
//  priority tier by weighted sampling without replacement (the first attempt
//  is channel i with probability weight_i / sum of the tier's weights, and
//  so on for the rest). A model is served by a channel if the channel
//  declared "*", lists the name, learnt the name from the provider
//  (discovery), or has the name as a model_map key; the upstream model is
//  the model_map value, else the client's name. Rates: one plan per request,
//  O(channels) with no allocation beyond the packer's buffer; the model list
//  (GET /v1/models) is rare and may allocate. Limits: GW_CHANNELS_MAX
//  channels, GW_CHANNELS_PLAN_MAX attempts per plan (the envelope is bounded
//  to 64 KiB), 4096 keys and 100 000 model names per channel.

#include "aigw.h"
#include "gw_channels.h"
#include <openssl/crypto.h>
#include <math.h>

#define KEYS_MAX 4096
#define KEY_BYTES_MAX 4096
#define MODELS_MAX 100000
#define ID_MAX 64
#define URL_MAX 2048
#define FILE_MAX (16 * 1024 * 1024)
#define WEIGHT_MAX 1000
#define PRIORITY_ABS 1000000
#define TIMEOUT_MAX 3600000  //  ms, one hour
#define TIMEOUT_DEF 600000  //  ms

typedef struct {
    char *id;  //  unique id, [A-Za-z0-9._:-]{1,64}
    char *type;  //  provider adapter, "openai"
    char *base_url;  //  e.g. https://api.openai.com/v1, no trailing '/'
    char **keys;  //  upstream key pool (heap strings)
    size_t key_count;  //  keys in the pool, 0..KEYS_MAX
    size_t key_next;  //  round-robin cursor into keys
    bool wildcard;  //  declared "*": passes any model through
    bool discovers;  //  declared no list: learns it from GET /models
    zhashx_t *models;  //  declared client-facing names (values unused)
    zhashx_t *discovered;  //  names learnt from the provider (values unused)
    zhashx_t *model_map;  //  client name -> upstream name (heap strings)
    uint32_t weight;  //  1..1000
    int32_t priority;  //  higher first, |priority| <= 1e6
    uint32_t timeout_ms;  //  per attempt, 1..3 600 000
    bool drain;  //  "disconnect": "drain" (else cancel), copied into the plan
} s_channel_t;

struct _gw_channels_t {
    s_channel_t **channels;  //  sorted by priority, highest first
    size_t size;  //  channels used
    uint64_t rng;  //  splitmix64 state
};

static char s_present[] = "";  //  value of set-like hash entries

//  --------------------------------------------------------------------------
//  Channel records

static s_channel_t *
s_channel_new (void)
{
    s_channel_t *self = (s_channel_t *)zmalloc (sizeof (s_channel_t));
    assert (self);
    self->weight = 1;
    self->timeout_ms = TIMEOUT_DEF;
    return self;
}

static void
s_channel_destroy (s_channel_t **self_p)
{
    s_channel_t *self = *self_p;
    if (!self)
        return;
    free (self->id);
    free (self->type);
    free (self->base_url);
    for (size_t i = 0; i < self->key_count; i++) {
        OPENSSL_cleanse (self->keys[i], strlen (self->keys[i]));
        free (self->keys[i]);
    }
    free (self->keys);
    zhashx_destroy (&self->models);
    zhashx_destroy (&self->discovered);
    zhashx_destroy (&self->model_map);
    free (self);
    *self_p = NULL;
}

static zhashx_t *
s_set_new (void)
{
    zhashx_t *set = zhashx_new ();
    assert (set);
    return set;
}

static zhashx_t *
s_map_new (void)
{
    zhashx_t *map = zhashx_new ();
    assert (map);
    zhashx_set_destructor (map, (zhashx_destructor_fn *)zstr_free);
    return map;
}

//  --------------------------------------------------------------------------
//  Validation helpers

bool
gw_channels_name_valid (const char *name, size_t size)
{
    if (!name || size == 0 || size > GW_CHANNELS_NAME_MAX)
        return false;
    for (size_t i = 0; i < size; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c < 0x20 || c == 0x7f || c == ',')
            return false;
    }
    return true;
}

static bool
s_id_valid (const char *id, size_t size)
{
    if (size == 0 || size > ID_MAX)
        return false;
    for (size_t i = 0; i < size; i++) {
        char c = id[i];
        if (!(isalnum ((unsigned char)c) || c == '.' || c == '_' || c == '-' || c == ':'))
            return false;
    }
    return true;
}

//  True if url is http(s)://host[...] with no whitespace or control bytes.
static bool
s_url_valid (const char *url, size_t size)
{
    if (size > URL_MAX)
        return false;
    size_t scheme = 0;
    if (size > 7 && strncasecmp (url, "http://", 7) == 0)
        scheme = 7;
    else if (size > 8 && strncasecmp (url, "https://", 8) == 0)
        scheme = 8;
    if (!scheme || url[scheme] == '/')
        return false;
    for (size_t i = 0; i < size; i++)
        if ((unsigned char)url[i] <= 0x20 || url[i] == 0x7f)
            return false;
    return true;
}

//  Read one STR value that holds no NUL byte. Returns 0, or -1 (reader left
//  past the value if it was well formed).
static int
s_read_str (gw_mreader_t *reader, gw_mvalue_t *value)
{
    if (gw_mreader_next (reader, value))
        return -1;
    if (value->type == GW_MP_STR && !memchr (value->ptr, 0, value->size))
        return 0;
    if (value->type == GW_MP_ARRAY || value->type == GW_MP_MAP) {
        //  Skip the elements so the caller's error is about the type.
        uint32_t items = value->type == GW_MP_MAP ? value->v.count * 2 : value->v.count;
        for (uint32_t i = 0; i < items; i++)
            if (gw_mreader_skip (reader, 32))
                break;
    }
    return -1;
}

//  Read an integer in [min, max]. Returns 0 or -1.
static int
s_read_int (gw_mreader_t *reader, int64_t min, int64_t max, int64_t *out)
{
    gw_mvalue_t value;
    if (gw_mreader_next (reader, &value))
        return -1;
    if (value.type == GW_MP_UINT && value.v.u <= (uint64_t)max &&
        (int64_t)value.v.u >= min) {
        *out = (int64_t)value.v.u;
        return 0;
    }
    if (value.type == GW_MP_INT && value.v.i >= min && value.v.i <= max) {
        *out = value.v.i;
        return 0;
    }
    return -1;
}

//  --------------------------------------------------------------------------
//  Parsing one channel object. The reader is at the map's header.

static int
s_parse_models (gw_mreader_t *reader, s_channel_t *ch, const char *where, char *error,
    size_t error_size)
{
    gw_mvalue_t value;
    gw_mreader_t peek = *reader;
    if (gw_mreader_next (&peek, &value))
        return gw_fail (error, error_size, "%s.models: malformed", where);
    if (value.type == GW_MP_STR) {
        if (s_read_str (reader, &value) || !gw_mvalue_streq (&value, "*"))
            return gw_fail (error, error_size,
                "%s.models: must be an array of model names or the string \"*\"", where);
        ch->wildcard = true;
        return 0;
    }
    if (value.type != GW_MP_ARRAY)
        return gw_fail (error, error_size,
            "%s.models: must be an array of model names or the string \"*\"", where);
    gw_mreader_next (reader, &value);
    uint32_t count = value.v.count;
    if (count > MODELS_MAX)
        return gw_fail (
            error, error_size, "%s.models: more than %d names", where, MODELS_MAX);
    ch->models = s_set_new ();
    for (uint32_t i = 0; i < count; i++) {
        if (s_read_str (reader, &value))
            return gw_fail (
                error, error_size, "%s.models[%u]: must be a string", where, i);
        if (gw_mvalue_streq (&value, "*")) {
            ch->wildcard = true;
            continue;
        }
        if (!gw_channels_name_valid (value.ptr, value.size))
            return gw_fail (error, error_size,
                "%s.models[%u]: must be 1 to %d bytes without commas or control "
                "characters",
                where, i, GW_CHANNELS_NAME_MAX);
        char *name = gw_strndup (value.ptr, value.size);
        zhashx_insert (ch->models, name, s_present);
        free (name);
    }
    if (ch->wildcard && zhashx_size (ch->models))
        return gw_fail (error, error_size,
            "%s.models: \"*\" passes every model through; give it alone", where);
    return 0;
}

static int
s_parse_model_map (gw_mreader_t *reader, s_channel_t *ch, const char *where, char *error,
    size_t error_size)
{
    gw_mvalue_t value;
    if (gw_mreader_next (reader, &value) || value.type != GW_MP_MAP)
        return gw_fail (error, error_size,
            "%s.model_map: must be an object of client name -> upstream name", where);
    uint32_t count = value.v.count;
    if (count > MODELS_MAX)
        return gw_fail (
            error, error_size, "%s.model_map: more than %d entries", where, MODELS_MAX);
    ch->model_map = s_map_new ();
    for (uint32_t i = 0; i < count; i++) {
        gw_mvalue_t key;
        if (s_read_str (reader, &key) || !gw_channels_name_valid (key.ptr, key.size) ||
            gw_mvalue_streq (&key, "*"))
            return gw_fail (error, error_size,
                "%s.model_map: each key must be a model name (not \"*\")", where);
        char *client = gw_strndup (key.ptr, key.size);
        if (s_read_str (reader, &value) ||
            !gw_channels_name_valid (value.ptr, value.size)) {
            gw_fail (error, error_size, "%s.model_map.%s: must be an upstream model name",
                where, client);
            free (client);
            return -1;
        }
        char *upstream = gw_strndup (value.ptr, value.size);
        zhashx_update (ch->model_map, client, upstream);
        free (client);
    }
    return 0;
}

static int
s_parse_keys (gw_mreader_t *reader, s_channel_t *ch, const char *where, char *error,
    size_t error_size)
{
    gw_mvalue_t value;
    if (gw_mreader_next (reader, &value) || value.type != GW_MP_ARRAY)
        return gw_fail (error, error_size, "%s.keys: must be an array of strings", where);
    uint32_t count = value.v.count;
    if (count > KEYS_MAX)
        return gw_fail (error, error_size, "%s.keys: more than %d keys", where, KEYS_MAX);
    ch->keys = (char **)zmalloc ((count ? count : 1) * sizeof (char *));
    assert (ch->keys);
    for (uint32_t i = 0; i < count; i++) {
        if (s_read_str (reader, &value) || value.size == 0 || value.size > KEY_BYTES_MAX)
            return gw_fail (
                error, error_size, "%s.keys[%u]: must be a non-empty string", where, i);
        for (uint32_t b = 0; b < value.size; b++)
            if ((unsigned char)value.ptr[b] < 0x20 || value.ptr[b] == 0x7f)
                return gw_fail (error, error_size,
                    "%s.keys[%u]: contains a control character", where, i);
        ch->keys[ch->key_count++] = gw_strndup (value.ptr, value.size);
    }
    return 0;
}

//  Parse the channel at the reader into *channel_p (NULL if it is disabled).
static int
s_parse_channel (gw_mreader_t *reader, size_t index, s_channel_t **channel_p, char *error,
    size_t error_size)
{
    char where[32];
    snprintf (where, sizeof (where), "channels[%zu]", index);
    gw_mvalue_t value;
    if (gw_mreader_next (reader, &value) || value.type != GW_MP_MAP)
        return gw_fail (error, error_size, "%s: must be an object", where);
    s_channel_t *ch = s_channel_new ();
    bool enabled = true, have_models = false, have_keys = false;
    int rc = -1;
    uint32_t pairs = value.v.count;
    for (uint32_t i = 0; i < pairs; i++) {
        gw_mvalue_t key;
        if (s_read_str (reader, &key)) {
            gw_fail (error, error_size, "%s: malformed field name", where);
            goto done;
        }
        char field[24] = "";
        if (key.size < sizeof (field))
            memcpy (field, key.ptr, key.size);
        if (streq (field, "id") || streq (field, "type") || streq (field, "base_url")) {
            char **target = streq (field, "id") ? &ch->id
                : streq (field, "type")         ? &ch->type
                                                : &ch->base_url;
            if (*target) {
                gw_fail (error, error_size, "%s.%s: given twice", where, field);
                goto done;
            }
            if (s_read_str (reader, &value)) {
                gw_fail (error, error_size, "%s.%s: must be a string", where, field);
                goto done;
            }
            if (streq (field, "id") && !s_id_valid (value.ptr, value.size)) {
                gw_fail (error, error_size,
                    "%s.id: must be 1 to %d characters of A-Z a-z 0-9 . _ : -", where,
                    ID_MAX);
                goto done;
            }
            if (streq (field, "type") && !gw_mvalue_streq (&value, "openai")) {
                gw_fail (error, error_size,
                    "%s.type: unsupported \"%.*s\" (supported: openai)", where,
                    (int)(value.size > 32 ? 32 : value.size), value.ptr);
                goto done;
            }
            if (streq (field, "base_url") && !s_url_valid (value.ptr, value.size)) {
                gw_fail (error, error_size,
                    "%s.base_url: must be an http:// or https:// URL without spaces",
                    where);
                goto done;
            }
            size_t size = value.size;
            if (streq (field, "base_url"))
                while (size && value.ptr[size - 1] == '/')
                    size--;
            *target = gw_strndup (value.ptr, size);
        }
        else if (streq (field, "keys") || streq (field, "key")) {
            if (have_keys) {
                gw_fail (error, error_size, "%s: give either key or keys, once", where);
                goto done;
            }
            have_keys = true;
            if (streq (field, "keys")) {
                if (s_parse_keys (reader, ch, where, error, error_size))
                    goto done;
            }
            else {
                if (s_read_str (reader, &value) || value.size == 0 ||
                    value.size > KEY_BYTES_MAX) {
                    gw_fail (
                        error, error_size, "%s.key: must be a non-empty string", where);
                    goto done;
                }
                ch->keys = (char **)zmalloc (sizeof (char *));
                assert (ch->keys);
                ch->keys[ch->key_count++] = gw_strndup (value.ptr, value.size);
            }
        }
        else if (streq (field, "models")) {
            if (have_models) {
                gw_fail (error, error_size, "%s.models: given twice", where);
                goto done;
            }
            have_models = true;
            if (s_parse_models (reader, ch, where, error, error_size))
                goto done;
        }
        else if (streq (field, "model_map")) {
            if (ch->model_map) {
                gw_fail (error, error_size, "%s.model_map: given twice", where);
                goto done;
            }
            if (s_parse_model_map (reader, ch, where, error, error_size))
                goto done;
        }
        else if (streq (field, "weight")) {
            int64_t number;
            if (s_read_int (reader, 1, WEIGHT_MAX, &number)) {
                gw_fail (error, error_size, "%s.weight: must be an integer from 1 to %d",
                    where, WEIGHT_MAX);
                goto done;
            }
            ch->weight = (uint32_t)number;
        }
        else if (streq (field, "priority")) {
            int64_t number;
            if (s_read_int (reader, -PRIORITY_ABS, PRIORITY_ABS, &number)) {
                gw_fail (error, error_size,
                    "%s.priority: must be an integer from %d to %d", where, -PRIORITY_ABS,
                    PRIORITY_ABS);
                goto done;
            }
            ch->priority = (int32_t)number;
        }
        else if (streq (field, "timeout_ms")) {
            int64_t number;
            if (s_read_int (reader, 1, TIMEOUT_MAX, &number)) {
                gw_fail (error, error_size,
                    "%s.timeout_ms: must be an integer from 1 to %d", where, TIMEOUT_MAX);
                goto done;
            }
            ch->timeout_ms = (uint32_t)number;
        }
        else if (streq (field, "disconnect")) {
            if (s_read_str (reader, &value) ||
                !(gw_mvalue_streq (&value, "cancel") ||
                    gw_mvalue_streq (&value, "drain"))) {
                gw_fail (error, error_size,
                    "%s.disconnect: must be \"cancel\" or \"drain\"", where);
                goto done;
            }
            ch->drain = gw_mvalue_streq (&value, "drain");
        }
        else if (streq (field, "enabled")) {
            if (gw_mreader_next (reader, &value) || value.type != GW_MP_BOOL) {
                gw_fail (error, error_size, "%s.enabled: must be true or false", where);
                goto done;
            }
            enabled = value.v.b;
        }
        else {
            gw_fail (error, error_size, "%s: unknown field \"%.*s\"", where,
                (int)(key.size > 40 ? 40 : key.size), key.ptr);
            goto done;
        }
    }
    if (!ch->id) {
        gw_fail (error, error_size, "%s.id: required", where);
        goto done;
    }
    if (!ch->base_url) {
        gw_fail (error, error_size, "%s (%s).base_url: required", where, ch->id);
        goto done;
    }
    if (!ch->type)
        ch->type = strdup ("openai");
    if (!ch->keys) {
        ch->keys = (char **)zmalloc (sizeof (char *));
        assert (ch->keys);
    }
    ch->discovers = !have_models;
    if (ch->discovers)
        ch->discovered = s_set_new ();
    rc = 0;
done:
    if (rc == 0 && enabled)
        *channel_p = ch;
    else {
        *channel_p = NULL;
        s_channel_destroy (&ch);
    }
    return rc;
}

//  --------------------------------------------------------------------------
//  Table

gw_channels_t *
gw_channels_new (void)
{
    gw_channels_t *self = (gw_channels_t *)zmalloc (sizeof (gw_channels_t));
    assert (self);
    uint8_t seed[16];
    gw_rid_new (seed);
    memcpy (&self->rng, seed, sizeof (self->rng));
    return self;
}

void
gw_channels_destroy (gw_channels_t **self_p)
{
    assert (self_p);
    gw_channels_t *self = *self_p;
    if (self) {
        for (size_t i = 0; i < self->size; i++)
            s_channel_destroy (&self->channels[i]);
        free (self->channels);
        free (self);
        *self_p = NULL;
    }
}

static s_channel_t *
s_find (gw_channels_t *self, const char *id)
{
    for (size_t i = 0; i < self->size; i++)
        if (streq (self->channels[i]->id, id))
            return self->channels[i];
    return NULL;
}

//  Add channels (taking them) after checking ids; keep priority order
//  (stable: within a priority, configuration order).
static int
s_add (gw_channels_t *self, s_channel_t **added, size_t count, char *error,
    size_t error_size)
{
    if (self->size + count > GW_CHANNELS_MAX)
        return gw_fail (error, error_size, "more than %d channels", GW_CHANNELS_MAX);
    for (size_t i = 0; i < count; i++) {
        bool duplicate = s_find (self, added[i]->id) != NULL;
        for (size_t j = 0; j < i; j++)
            if (streq (added[j]->id, added[i]->id))
                duplicate = true;
        if (duplicate)
            return gw_fail (
                error, error_size, "channel id \"%s\" is used twice", added[i]->id);
    }
    self->channels = (s_channel_t **)realloc (
        self->channels, (self->size + count) * sizeof (s_channel_t *) + 1);
    assert (self->channels);
    for (size_t i = 0; i < count; i++) {
        s_channel_t *ch = added[i];
        size_t pos = self->size++;
        while (pos > 0 && self->channels[pos - 1]->priority < ch->priority) {
            self->channels[pos] = self->channels[pos - 1];
            pos--;
        }
        self->channels[pos] = ch;
        added[i] = NULL;
    }
    return 0;
}

int
gw_channels_load (
    gw_channels_t *self, const char *json, size_t size, char *error, size_t error_size)
{
    assert (self);
    if (!json)
        return gw_fail (error, error_size, "no text");
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    gw_json_limits_t limits = gw_json_limits_default ();
    limits.max_size = FILE_MAX;
    limits.max_depth = 8;
    gw_json_error_t jerror;
    s_channel_t **added = NULL;
    size_t count = 0;
    int rc = -1;
    if (gw_json_to_msgpack (json, size, &pk, &limits, &jerror)) {
        gw_fail (error, error_size, "invalid JSON at byte %zu: %s", jerror.offset,
            jerror.message);
        goto done;
    }
    gw_mreader_t reader;
    gw_mreader_init (&reader, sbuf.data, sbuf.size);
    gw_mvalue_t value;
    if (gw_mreader_next (&reader, &value) || value.type != GW_MP_ARRAY) {
        gw_fail (
            error, error_size, "channels: the file must hold a JSON array of channels");
        goto done;
    }
    if (value.v.count > GW_CHANNELS_MAX) {
        gw_fail (error, error_size, "channels: more than %d channels", GW_CHANNELS_MAX);
        goto done;
    }
    added = (s_channel_t **)zmalloc ((value.v.count + 1) * sizeof (s_channel_t *));
    assert (added);
    for (uint32_t i = 0; i < value.v.count; i++) {
        s_channel_t *ch = NULL;
        if (s_parse_channel (&reader, i, &ch, error, error_size))
            goto done;
        if (ch)
            added[count++] = ch;
    }
    rc = s_add (self, added, count, error, error_size);
done:
    if (added) {
        for (size_t i = 0; i < count; i++)
            s_channel_destroy (&added[i]);
        free (added);
    }
    //  The text holds upstream keys: do not leave copies in freed memory.
    if (sbuf.data)
        OPENSSL_cleanse (sbuf.data, sbuf.size);
    msgpack_sbuffer_destroy (&sbuf);
    return rc;
}

int
gw_channels_load_file (
    gw_channels_t *self, const char *path, char *error, size_t error_size)
{
    assert (self);
    char detail[512];
    FILE *file = fopen (path, "rb");
    if (!file)
        return gw_fail (error, error_size, "%s: %s", path, strerror (errno));
    char *text = (char *)malloc (FILE_MAX + 1);
    assert (text);
    size_t size = fread (text, 1, FILE_MAX + 1, file);
    bool failed = ferror (file);
    fclose (file);
    int rc;
    if (failed)
        rc = gw_fail (error, error_size, "%s: read error", path);
    else if (size > FILE_MAX)
        rc = gw_fail (error, error_size, "%s: larger than %d bytes", path, FILE_MAX);
    else {
        rc = gw_channels_load (self, text, size, detail, sizeof (detail));
        if (rc)
            gw_fail (error, error_size, "%s: %s", path, detail);
    }
    OPENSSL_cleanse (text, size < FILE_MAX ? size : FILE_MAX);
    free (text);
    return rc;
}

int
gw_channels_add_default (gw_channels_t *self, const char *base_url, const char *keys,
    const char *models, char *error, size_t error_size)
{
    assert (self);
    if (!base_url || !s_url_valid (base_url, strlen (base_url)))
        return gw_fail (error, error_size,
            "TARGET_API_URL: must be an http:// or https:// URL without spaces");
    s_channel_t *ch = s_channel_new ();
    ch->id = strdup ("default");
    ch->type = strdup ("openai");
    size_t size = strlen (base_url);
    while (size && base_url[size - 1] == '/')
        size--;
    const char *host = strstr (base_url, "://") + 3;
    bool has_path = memchr (host, '/', size - (size_t)(host - base_url)) != NULL;
    ch->base_url = (char *)malloc (size + 4);
    assert (ch->base_url);
    memcpy (ch->base_url, base_url, size);
    strcpy (ch->base_url + size, has_path ? "" : "/v1");

    ch->keys = (char **)zmalloc (KEYS_MAX * sizeof (char *));
    assert (ch->keys);
    for (const char *p = keys ? keys : ""; *p && ch->key_count < KEYS_MAX;) {
        const char *comma = strchr (p, ',');
        const char *end = comma ? comma : p + strlen (p);
        while (p < end && isspace ((unsigned char)*p))
            p++;
        const char *stop = end;
        while (stop > p && isspace ((unsigned char)stop[-1]))
            stop--;
        if (stop > p)
            ch->keys[ch->key_count++] = gw_strndup (p, (size_t)(stop - p));
        p = comma ? comma + 1 : end;
    }
    if (!models || !*models)
        ch->wildcard = true;
    else {
        ch->models = s_set_new ();
        for (const char *p = models; *p;) {
            const char *comma = strchr (p, ',');
            const char *end = comma ? comma : p + strlen (p);
            while (p < end && isspace ((unsigned char)*p))
                p++;
            const char *stop = end;
            while (stop > p && isspace ((unsigned char)stop[-1]))
                stop--;
            if (stop - p == 1 && *p == '*')
                ch->wildcard = true;
            else if (stop > p) {
                if (!gw_channels_name_valid (p, (size_t)(stop - p))) {
                    s_channel_destroy (&ch);
                    return gw_fail (error, error_size,
                        "AIGW_TARGET_MODELS: invalid model name \"%.*s\"",
                        (int)(stop - p > 40 ? 40 : stop - p), p);
                }
                char *name = gw_strndup (p, (size_t)(stop - p));
                zhashx_insert (ch->models, name, s_present);
                free (name);
            }
            p = comma ? comma + 1 : end;
        }
        if (ch->wildcard)
            zhashx_purge (ch->models);
    }
    int rc = s_add (self, &ch, 1, error, error_size);
    s_channel_destroy (&ch);
    return rc;
}

size_t
gw_channels_size (gw_channels_t *self)
{
    assert (self);
    return self->size;
}

const char *
gw_channels_id (gw_channels_t *self, size_t index)
{
    assert (self);
    return index < self->size ? self->channels[index]->id : NULL;
}

const char *
gw_channels_base_url (gw_channels_t *self, size_t index)
{
    assert (self);
    return index < self->size ? self->channels[index]->base_url : NULL;
}

const char *
gw_channels_key (gw_channels_t *self, size_t index)
{
    assert (self);
    if (index >= self->size || self->channels[index]->key_count == 0)
        return NULL;
    return self->channels[index]->keys[0];
}

bool
gw_channels_discovers (gw_channels_t *self, size_t index)
{
    assert (self);
    return index < self->size && self->channels[index]->discovers;
}

int
gw_channels_set_discovered (gw_channels_t *self, const char *id, zlistx_t *names)
{
    assert (self);
    s_channel_t *ch = id ? s_find (self, id) : NULL;
    if (!ch || !ch->discovers)
        return -1;
    zhashx_purge (ch->discovered);
    int kept = 0;
    const char *name = names ? (const char *)zlistx_first (names) : NULL;
    for (; name; name = (const char *)zlistx_next (names)) {
        if (kept >= MODELS_MAX || !gw_channels_name_valid (name, strlen (name)) ||
            streq (name, "*"))
            continue;
        if (zhashx_insert (ch->discovered, name, s_present) == 0)
            kept++;
    }
    return kept;
}

void
gw_channels_seed (gw_channels_t *self, uint64_t seed)
{
    assert (self);
    self->rng = seed;
}

//  splitmix64: fast, good enough for load spreading, not for secrets.
static uint64_t
s_random (gw_channels_t *self)
{
    uint64_t z = (self->rng += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

bool
gw_channels_csv_has (const char *list, const char *name)
{
    if (!list || !name)
        return false;
    size_t size = strlen (name);
    const char *p = list;
    while (*p) {
        const char *comma = strchr (p, ',');
        const char *end = comma ? comma : p + strlen (p);
        while (p < end && (*p == ' ' || *p == '\t'))
            p++;
        const char *stop = end;
        while (stop > p && (stop[-1] == ' ' || stop[-1] == '\t'))
            stop--;
        if ((size_t)(stop - p) == size && memcmp (p, name, size) == 0)
            return true;
        if (!comma)
            break;
        p = comma + 1;
    }
    return false;
}

static bool
s_serves (s_channel_t *ch, const char *model)
{
    return ch->wildcard || (ch->models && zhashx_lookup (ch->models, model)) ||
        (ch->discovered && zhashx_lookup (ch->discovered, model)) ||
        (ch->model_map && zhashx_lookup (ch->model_map, model));
}

int
gw_channels_plan (
    gw_channels_t *self, const char *model, const char *allow, msgpack_packer *pk)
{
    assert (self);
    assert (pk);
    if (!model || !gw_channels_name_valid (model, strlen (model)))
        return 0;
    if (allow && *allow && !gw_channels_csv_has (allow, model))
        return 0;
    s_channel_t *chosen[GW_CHANNELS_MAX];
    size_t count = 0;
    for (size_t i = 0; i < self->size; i++)
        if (s_serves (self->channels[i], model))
            chosen[count++] = self->channels[i];
    if (count == 0)
        return 0;
    //  Each tier (equal priority, adjacent since the table is sorted):
    //  weighted sampling without replacement.
    for (size_t start = 0; start < count;) {
        size_t end = start;
        uint64_t total = 0;
        while (end < count && chosen[end]->priority == chosen[start]->priority)
            total += chosen[end++]->weight;
        for (size_t k = start; k + 1 < end; k++) {
            uint64_t draw = s_random (self) % total;
            size_t pick = k;
            for (size_t j = k; j < end; j++) {
                if (draw < chosen[j]->weight) {
                    pick = j;
                    break;
                }
                draw -= chosen[j]->weight;
            }
            s_channel_t *swap = chosen[k];
            chosen[k] = chosen[pick];
            chosen[pick] = swap;
            total -= chosen[k]->weight;
        }
        start = end;
    }
    if (count > GW_CHANNELS_PLAN_MAX)
        count = GW_CHANNELS_PLAN_MAX;
    msgpack_pack_array (pk, count);
    for (size_t i = 0; i < count; i++) {
        s_channel_t *ch = chosen[i];
        const char *upstream =
            ch->model_map ? (const char *)zhashx_lookup (ch->model_map, model) : NULL;
        const char *key = "";
        if (ch->key_count) {
            key = ch->keys[ch->key_next % ch->key_count];
            ch->key_next++;
        }
        msgpack_pack_map (pk, ch->drain ? 7 : 6);
        gw_mpack_str (pk, "id");
        gw_mpack_str (pk, ch->id);
        gw_mpack_str (pk, "type");
        gw_mpack_str (pk, ch->type);
        gw_mpack_str (pk, "base");
        gw_mpack_str (pk, ch->base_url);
        gw_mpack_str (pk, "key");
        gw_mpack_str (pk, key);
        gw_mpack_str (pk, "model");
        gw_mpack_str (pk, upstream ? upstream : model);
        gw_mpack_str (pk, "timeout_ms");
        msgpack_pack_uint32 (pk, ch->timeout_ms);
        if (ch->drain) {
            gw_mpack_str (pk, "disconnect");
            gw_mpack_str (pk, "drain");
        }
    }
    return (int)count;
}

static void
s_collect (zhashx_t *names, zhashx_t *seen, const char *owner, const char *allow)
{
    if (!names)
        return;
    for (void *item = zhashx_first (names); item; item = zhashx_next (names)) {
        const char *name = (const char *)zhashx_cursor (names);
        if (allow && *allow && !gw_channels_csv_has (allow, name))
            continue;
        zhashx_insert (seen, name, (void *)owner);
    }
}

static int
s_compare_names (const void *a, const void *b)
{
    return strcmp (*(const char *const *)a, *(const char *const *)b);
}

size_t
gw_channels_models (
    gw_channels_t *self, const char *allow, int64_t created, msgpack_packer *pk)
{
    assert (self);
    assert (pk);
    zhashx_t *seen = zhashx_new ();
    assert (seen);
    //  Highest priority first, and insert keeps the first owner.
    for (size_t i = 0; i < self->size; i++) {
        s_channel_t *ch = self->channels[i];
        s_collect (ch->models, seen, ch->id, allow);
        s_collect (ch->discovered, seen, ch->id, allow);
        s_collect (ch->model_map, seen, ch->id, allow);
    }
    size_t count = zhashx_size (seen);
    const char **names = (const char **)zmalloc ((count + 1) * sizeof (char *));
    assert (names);
    size_t n = 0;
    for (void *item = zhashx_first (seen); item && n < count; item = zhashx_next (seen))
        names[n++] = (const char *)zhashx_cursor (seen);
    qsort (names, n, sizeof (char *), s_compare_names);

    msgpack_pack_map (pk, 2);
    gw_mpack_str (pk, "object");
    gw_mpack_str (pk, "list");
    gw_mpack_str (pk, "data");
    msgpack_pack_array (pk, n);
    for (size_t i = 0; i < n; i++) {
        msgpack_pack_map (pk, 4);
        gw_mpack_str (pk, "id");
        gw_mpack_str (pk, names[i]);
        gw_mpack_str (pk, "object");
        gw_mpack_str (pk, "model");
        gw_mpack_str (pk, "created");
        msgpack_pack_int64 (pk, created);
        gw_mpack_str (pk, "owned_by");
        gw_mpack_str (pk, (const char *)zhashx_lookup (seen, names[i]));
    }
    free (names);
    zhashx_destroy (&seen);
    return n;
}

//  --------------------------------------------------------------------------
//  Self test

//  Field of attempt index of a packed plan, copied into out.
static bool
s_plan_field (const char *data, size_t size, size_t index, const char *field, char *out,
    size_t out_size)
{
    gw_mreader_t reader;
    gw_mreader_init (&reader, data, size);
    gw_mvalue_t value;
    if (gw_mreader_next (&reader, &value) || value.type != GW_MP_ARRAY ||
        index >= value.v.count)
        return false;
    for (size_t i = 0; i < index; i++)
        if (gw_mreader_skip (&reader, 4))
            return false;
    if (gw_mreader_find (&reader, field) != 0 || gw_mreader_next (&reader, &value))
        return false;
    if (value.type == GW_MP_UINT)
        snprintf (out, out_size, "%" PRIu64, value.v.u);
    else if (value.type == GW_MP_STR)
        snprintf (out, out_size, "%.*s", (int)value.size, value.ptr);
    else
        return false;
    return true;
}

static int
s_plan (gw_channels_t *self, const char *model, const char *allow, msgpack_sbuffer *sbuf)
{
    msgpack_sbuffer_clear (sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, sbuf, msgpack_sbuffer_write);
    return gw_channels_plan (self, model, allow, &pk);
}

static void
s_expect_error (const char *json, const char *expected, bool verbose)
{
    gw_channels_t *channels = gw_channels_new ();
    char error[256] = "";
    int rc = gw_channels_load (channels, json, strlen (json), error, sizeof (error));
    if (verbose || rc == 0 || !strstr (error, expected))
        printf ("\n    %s -> %s", json, rc ? error : "accepted");
    assert (rc == -1);
    assert (strstr (error, expected));
    assert (gw_channels_size (channels) == 0);
    gw_channels_destroy (&channels);
}

void
gw_channels_test (bool verbose)
{
    printf (" * gw_channels: ");
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    char field[256];
    char error[256];

    //  A good configuration: priorities, weights, map, wildcard, discovery.
    const char *config =
        "[\n"
        " {\"id\":\"a\",\"type\":\"openai\",\"base_url\":\"http://a.test/v1/\","
        "  \"keys\":[\"ka1\",\"ka2\"],\"models\":[\"gpt-4o\",\"m\"],"
        "  \"weight\":1},\n"
        " {\"id\":\"b\",\"base_url\":\"https://b.test/v1\",\"key\":\"kb\","
        "  \"models\":[\"m\"],\"model_map\":{\"gpt-4o\":\"gpt-4o-2024\"},"
        "  \"weight\":3,\"timeout_ms\":1234,\"disconnect\":\"drain\"},\n"
        " {\"id\":\"c\",\"base_url\":\"http://c.test/v1\",\"models\":[\"m\"],"
        "  \"weight\":6},\n"
        " {\"id\":\"hi\",\"base_url\":\"http://hi.test/v1\","
        "  \"models\":[\"tiered\"],\"priority\":10},\n"
        " {\"id\":\"lo\",\"base_url\":\"http://lo.test/v1\","
        "  \"models\":[\"tiered\"],\"weight\":1000,\"priority\":-1},\n"
        " {\"id\":\"any\",\"base_url\":\"http://any.test/v1\",\"models\":\"*\","
        "  \"priority\":-5},\n"
        " {\"id\":\"disc\",\"base_url\":\"http://disc.test/v1\","
        "  \"priority\":-2},\n"
        " {\"id\":\"off\",\"base_url\":\"http://off.test/v1\","
        "  \"models\":[\"m\"],\"enabled\":false}\n"
        "]";
    gw_channels_t *channels = gw_channels_new ();
    int rc = gw_channels_load (channels, config, strlen (config), error, sizeof (error));
    if (rc)
        printf ("%s\n", error);
    assert (rc == 0);
    assert (gw_channels_size (channels) == 7);  //  "off" is disabled
    assert (streq (gw_channels_id (channels, 0), "hi"));
    assert (streq (gw_channels_id (channels, 6), "any"));
    assert (gw_channels_id (channels, 7) == NULL);
    for (size_t i = 0; i < gw_channels_size (channels); i++) {
        const char *id = gw_channels_id (channels, i);
        assert (gw_channels_discovers (channels, i) == streq (id, "disc"));
        if (streq (id, "a")) {
            assert (streq (gw_channels_base_url (channels, i), "http://a.test/v1"));
            assert (streq (gw_channels_key (channels, i), "ka1"));
        }
        if (streq (id, "c"))
            assert (gw_channels_key (channels, i) == NULL);
    }

    //  Weighted choice: over 2,000 seeded draws the first attempt follows
    //  the weights 1:3:6 within 5 percentage points. "any" (priority -5)
    //  also serves "m" but comes last.
    gw_channels_seed (channels, 42);
    int first[3] = {0, 0, 0};
    const int draws = 2000;
    for (int i = 0; i < draws; i++) {
        assert (s_plan (channels, "m", NULL, &sbuf) == 4);
        assert (s_plan_field (sbuf.data, sbuf.size, 0, "id", field, sizeof (field)));
        assert (strlen (field) == 1 && field[0] >= 'a' && field[0] <= 'c');
        first[field[0] - 'a']++;
        assert (s_plan_field (sbuf.data, sbuf.size, 3, "id", field, sizeof (field)));
        assert (streq (field, "any"));
    }
    const double expected[3] = {0.1, 0.3, 0.6};
    for (int i = 0; i < 3; i++) {
        double share = (double)first[i] / draws;
        if (verbose)
            printf ("\n    channel %c: %.3f of first choices (weight share %.3f)",
                'a' + i, share, expected[i]);
        assert (fabs (share - expected[i]) <= 0.05);
    }
    //  Priority tiers: "hi" always first however heavy "lo" is.
    for (int i = 0; i < 200; i++) {
        assert (s_plan (channels, "tiered", NULL, &sbuf) == 3);
        assert (s_plan_field (sbuf.data, sbuf.size, 0, "id", field, sizeof (field)));
        assert (streq (field, "hi"));
        assert (s_plan_field (sbuf.data, sbuf.size, 1, "id", field, sizeof (field)));
        assert (streq (field, "lo"));
    }
    //  model_map: b serves gpt-4o as gpt-4o-2024; a serves it unmapped.
    bool saw_b = false;
    for (int i = 0; i < 50; i++) {
        assert (s_plan (channels, "gpt-4o", NULL, &sbuf) == 3);
        for (size_t k = 0; k < 3; k++) {
            char model[64];
            assert (s_plan_field (sbuf.data, sbuf.size, k, "id", field, sizeof (field)));
            assert (
                s_plan_field (sbuf.data, sbuf.size, k, "model", model, sizeof (model)));
            if (streq (field, "b")) {
                saw_b = true;
                assert (streq (model, "gpt-4o-2024"));
                assert (s_plan_field (
                    sbuf.data, sbuf.size, k, "timeout_ms", model, sizeof (model)));
                assert (streq (model, "1234"));
                assert (
                    s_plan_field (sbuf.data, sbuf.size, k, "key", model, sizeof (model)));
                assert (streq (model, "kb"));
                assert (s_plan_field (
                    sbuf.data, sbuf.size, k, "disconnect", model, sizeof (model)));
                assert (streq (model, "drain"));
            }
            else
                assert (streq (model, "gpt-4o"));
        }
    }
    assert (saw_b);
    //  Key pool, round robin: channel a alternates ka1, ka2.
    char last[8] = "";
    int switches = 0;
    for (int i = 0; i < 20; i++) {
        assert (s_plan (channels, "gpt-4o", "gpt-4o", &sbuf) == 3);
        for (size_t k = 0; k < 3; k++) {
            assert (s_plan_field (sbuf.data, sbuf.size, k, "id", field, sizeof (field)));
            if (streq (field, "a")) {
                assert (
                    s_plan_field (sbuf.data, sbuf.size, k, "key", field, sizeof (field)));
                assert (streq (field, "ka1") || streq (field, "ka2"));
                if (*last)
                    assert (!streq (field, last));
                switches++;
                strcpy (last, field);
            }
        }
    }
    assert (switches == 20);
    //  "*" passes any model; the allow-list filters; a bad name never plans.
    assert (s_plan (channels, "something-else", NULL, &sbuf) == 1);
    assert (s_plan_field (sbuf.data, sbuf.size, 0, "id", field, sizeof (field)));
    assert (streq (field, "any"));
    assert (s_plan (channels, "something-else", "m, gpt-4o", &sbuf) == 0);
    assert (s_plan (channels, "m", " gpt-4o ,m", &sbuf) == 4);
    assert (s_plan (channels, "", NULL, &sbuf) == 0);
    assert (s_plan (channels, "a,b", NULL, &sbuf) == 0);
    assert (s_plan (channels, NULL, NULL, &sbuf) == 0);

    //  Discovery: "disc" serves what it learnt, no more, and a new list
    //  replaces the old one.
    zlistx_t *names = zlistx_new ();
    zlistx_add_end (names, "mock-gpt");
    zlistx_add_end (names, "bad,name");
    zlistx_add_end (names, "*");
    assert (gw_channels_set_discovered (channels, "disc", names) == 1);
    assert (gw_channels_set_discovered (channels, "a", names) == -1);
    assert (gw_channels_set_discovered (channels, "nope", names) == -1);
    zlistx_destroy (&names);
    assert (s_plan (channels, "mock-gpt", NULL, &sbuf) == 2);
    assert (s_plan_field (sbuf.data, sbuf.size, 0, "id", field, sizeof (field)));
    assert (streq (field, "disc"));

    //  The model list: union, deduplicated, sorted, no "*", owner = highest
    //  priority channel, filtered by the allow-list.
    msgpack_sbuffer_clear (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    assert (gw_channels_models (channels, NULL, 1700000000, &pk) == 4);
    msgpack_sbuffer json;
    msgpack_sbuffer_init (&json);
    assert (gw_json_from_msgpack (sbuf.data, sbuf.size, &json, 8, NULL) == 0);
    msgpack_sbuffer_write (&json, "", 1);
    if (verbose)
        printf ("\n    %s", json.data);
    assert (streq (json.data,
        "{\"object\":\"list\",\"data\":["
        "{\"id\":\"gpt-4o\",\"object\":\"model\",\"created\":1700000000,\"owned_by\":"
        "\"a\"},"
        "{\"id\":\"m\",\"object\":\"model\",\"created\":1700000000,\"owned_by\":\"a\"},"
        "{\"id\":\"mock-gpt\",\"object\":\"model\",\"created\":1700000000,"
        "\"owned_by\":\"disc\"},"
        "{\"id\":\"tiered\",\"object\":\"model\",\"created\":1700000000,"
        "\"owned_by\":\"hi\"}]}"));
    msgpack_sbuffer_clear (&sbuf);
    assert (gw_channels_models (channels, "tiered,nothing", 1, &pk) == 1);
    msgpack_sbuffer_destroy (&json);

    //  Loading more channels: a duplicate id is refused, nothing added.
    const char *dup = "[{\"id\":\"x\",\"base_url\":\"http://x/v1\",\"models\":\"*\"},"
                      "{\"id\":\"a\",\"base_url\":\"http://y/v1\",\"models\":\"*\"}]";
    assert (gw_channels_load (channels, dup, strlen (dup), error, sizeof (error)) == -1);
    assert (strstr (error, "\"a\" is used twice"));
    assert (gw_channels_size (channels) == 7);
    gw_channels_destroy (&channels);

    //  The default channel from TARGET_API_URL.
    channels = gw_channels_new ();
    assert (gw_channels_add_default (channels, "http://127.0.0.1:9/", "k1, k2", NULL,
                error, sizeof (error)) == 0);
    assert (streq (gw_channels_base_url (channels, 0), "http://127.0.0.1:9/v1"));
    assert (streq (gw_channels_key (channels, 0), "k1"));
    assert (!gw_channels_discovers (channels, 0));
    assert (s_plan (channels, "whatever", NULL, &sbuf) == 1);
    assert (gw_channels_add_default (channels, "http://x/v1", NULL, NULL, error,
                sizeof (error)) == -1);  //  "default" twice
    gw_channels_destroy (&channels);
    channels = gw_channels_new ();
    assert (gw_channels_add_default (channels, "https://api.example.com/openai/v1", NULL,
                "a, b", error, sizeof (error)) == 0);
    assert (
        streq (gw_channels_base_url (channels, 0), "https://api.example.com/openai/v1"));
    assert (s_plan (channels, "b", NULL, &sbuf) == 1);
    assert (s_plan (channels, "c", NULL, &sbuf) == 0);
    assert (gw_channels_add_default (
                channels, "ftp://x", NULL, NULL, error, sizeof (error)) == -1);
    assert (strstr (error, "TARGET_API_URL"));
    gw_channels_destroy (&channels);

    //  Files: a missing file names the path.
    channels = gw_channels_new ();
    assert (gw_channels_load_file (
                channels, "/nonexistent/channels.json", error, sizeof (error)) == -1);
    assert (strstr (error, "/nonexistent/channels.json"));
    gw_channels_destroy (&channels);

    //  Bad configurations: a clear error naming the field, never a crash.
    s_expect_error ("", "invalid JSON", verbose);
    s_expect_error ("[{\"id\":\"a\",}]", "invalid JSON at byte", verbose);
    s_expect_error ("{\"id\":\"a\"}", "must hold a JSON array", verbose);
    s_expect_error ("[1]", "channels[0]: must be an object", verbose);
    s_expect_error (
        "[{\"base_url\":\"http://x/v1\"}]", "channels[0].id: required", verbose);
    s_expect_error (
        "[{\"id\":\"a b\",\"base_url\":\"http://x\"}]", "channels[0].id:", verbose);
    s_expect_error ("[{\"id\":7}]", "channels[0].id: must be a string", verbose);
    s_expect_error ("[{\"id\":\"a\"}]", "channels[0] (a).base_url: required", verbose);
    s_expect_error (
        "[{\"id\":\"a\",\"base_url\":\"x.test\"}]", "channels[0].base_url", verbose);
    s_expect_error ("[{\"id\":\"a\",\"type\":\"grpc\",\"base_url\":\"http://x\"}]",
        "channels[0].type: unsupported \"grpc\"", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"weight\":0}]",
        "channels[0].weight: must be an integer from 1 to 1000", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"weight\":1001}]",
        "channels[0].weight", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"weight\":1.5}]",
        "channels[0].weight", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"weight\":\"2\"}]",
        "channels[0].weight", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"priority\":\"high\"}]",
        "channels[0].priority", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"disconnect\":\"wait\"}]",
        "channels[0].disconnect", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"timeout_ms\":-1}]",
        "channels[0].timeout_ms", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"models\":\"gpt-4o\"}]",
        "channels[0].models: must be an array", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"models\":[\"*\",\"b\"]}]",
        "give it alone", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"models\":[\"ok\",3]}]",
        "channels[0].models[1]: must be a string", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"models\":[\"\"]}]",
        "channels[0].models[0]", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"models\":{\"a\":1}}]",
        "channels[0].models: must be an array", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"keys\":\"k\"}]",
        "channels[0].keys: must be an array", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"keys\":[\"\"]}]",
        "channels[0].keys[0]", verbose);
    s_expect_error (
        "[{\"id\":\"a\",\"base_url\":\"http://x\",\"keys\":[\"k\"],\"key\":\"k\"}]",
        "either key or keys", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"model_map\":[\"a\"]}]",
        "channels[0].model_map: must be an object", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"model_map\":{\"a\":1}}]",
        "channels[0].model_map.a: must be an upstream model name", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"enabled\":1}]",
        "channels[0].enabled", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\",\"modles\":[\"m\"]}]",
        "channels[0]: unknown field \"modles\"", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\"},"
                    "{\"id\":\"b\",\"base_url\":\"http://x\",\"weight\":-3}]",
        "channels[1].weight", verbose);
    s_expect_error ("[{\"id\":\"a\",\"base_url\":\"http://x\"},"
                    "{\"id\":\"a\",\"base_url\":\"http://y\"}]",
        "\"a\" is used twice", verbose);
    s_expect_error ("[{\"id\":\"a\",\"id\":\"b\",\"base_url\":\"http://x\"}]",
        "channels[0].id: given twice", verbose);
    //  Random bytes never crash the parser.
    for (int round = 0; round < 2000; round++) {
        char noise[64];
        size_t size = (size_t)(s_random (&(gw_channels_t){.rng = (uint64_t)round}) % 64);
        gw_channels_t seeded = {.rng = (uint64_t)round * 7919};
        for (size_t i = 0; i < size; i++)
            noise[i] =
                "[]{}\",:0123456789idbase_urlmodels*ktrue"[s_random (&seeded) % 40];
        channels = gw_channels_new ();
        gw_channels_load (channels, noise, size, error, sizeof (error));
        gw_channels_destroy (&channels);
    }
    msgpack_sbuffer_destroy (&sbuf);
    printf ("OK\n");
}
