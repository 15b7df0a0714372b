//  --------------------------------------------------------------------------
//  gw_ratelimit — the ratelimit stage: configuration, estimate, admission,
//  settle/release, and the actor.
//
//  Design note. Configuration (limits per scope kind and per entity,
//  prices) is loaded from two JSON files into hash tables and replaced
//  wholesale on a successful reload, so a request sees either the old or
//  the new configuration; a failed reload keeps the last good one and logs
//  why. The limits of an entity are resolved at load time (entity fields
//  over the kind's defaults), so the request path does at most five hash
//  lookups, one bounded pass over the body, and ONE limiter call — one
//  Redis round trip on the distributed back end, the largest cost here.
//  Nothing here asserts on input: envelopes, bodies and files are input.
//
//  Estimate: prompt tokens = ceil (B / 3), where B is the bytes of every
//  string under messages, prompt, input, tools, functions, system and
//  instructions, except the values of image_url, input_audio and file.
//  Three bytes per token overestimates English (about four per token) and
//  roughly matches CJK text (three bytes per character), so a hold rarely
//  falls short of the actual cost. Output = max_completion_tokens, else
//  max_tokens, else max_output_tokens, else AIGW_DEFAULT_MAX_TOKENS (0 for
//  embeddings), times n (1..128). Those tokens are priced by gw_price_cost,
//  billing's own formula, with the model's prices, the global multiplier and
//  the multiplier of the request's group (read from billing's store, like
//  the balances): the hold is exactly what billing will charge if the
//  request uses every token it reserved, so holds in flight can never let a
//  budget be overshot.

#include "aigw.h"
#include "gw_ratelimit.h"
#include "gw_store.h"
#include <sys/stat.h>

#define KINDS 5
#define FIELDS 17  //  uint64 fields of gw_limits_t
#define FILE_MAX (16 * 1024 * 1024)
#define ENTRIES_MAX 1000000
#define NAME_MAX_ 256
#define CHECK_MS 500
#define DEPTH_MAX 16
#define LEASE_DEFAULT_MS 600000  //  no deadline: 10 minutes
#define LEASE_MAX_MS 3600000

static_assert (sizeof (gw_limits_t) == FIELDS * sizeof (uint64_t), "gw_limits_t layout");

static const char *s_kinds[KINDS] = {"key", "user", "group", "model", "ip"};
static const char *s_plurals[KINDS] = {"keys", "users", "groups", "models", "ips"};
static const char *s_fields[FIELDS] = {"rpm", "burst", "tpm", "concurrency",
    "requests_per_minute", "requests_per_hour", "requests_per_day", "requests_per_month",
    "tokens_per_minute", "tokens_per_hour", "tokens_per_day", "tokens_per_month",
    "cost_per_minute", "cost_per_hour", "cost_per_day", "cost_per_month", "budget"};

typedef struct {
    gw_limits_t defaults[KINDS];  //  per kind, resolved
    zhashx_t *entries[KINDS];  //  name -> gw_limits_t, resolved
} s_config_t;

//  One user's balance, as last read from the store (docs/LIMITS.md
//  "Balance"): the dynamic budget limit of scope user:<name>.
typedef struct {
    int64_t balance;  //  B, micro-units, at the last read
    uint64_t limit;  //  L = B + S (S = cost settled on the scope at the read)
    char scope[GW_LIMITER_SCOPE_MAX + 1];  //  "user:<name>"
} s_balance_t;

#define BALANCE_USERS_MAX 1000000

typedef struct {
    char *path;  //  watched file, or NULL
    struct timespec mtime;  //  at the last load attempt
    off_t size;  //  idem
    ino_t inode;  //  idem
} s_watch_t;

struct _gw_ratelimit_t {
    gw_limiter_t *limiter;  //  the engine, owned
    gw_limits_t base[KINDS];  //  defaults before the file (environment, API)
    s_config_t *config;  //  current limits
    zhashx_t *prices;  //  model -> gw_price_t
    uint64_t default_max_tokens;  //  AIGW_DEFAULT_MAX_TOKENS
    int64_t multiplier;  //  global price multiplier, thousandths (1.5 = 1500)
    s_watch_t limits_file;  //  AIGW_LIMITS_FILE
    s_watch_t prices_file;  //  AIGW_PRICES_FILE
    int64_t checked_at;  //  mono ms of the last stat
    bool verbose;  //  log decisions
    //  Billing's store (DATABASE_URL): group multipliers and balances
    char *store_url;  //  NULL while neither reads it
    gw_store_t *store;  //  opened lazily, NULL while unavailable
    int64_t store_retry_at;  //  mono ms: next attempt to open the store
    bool store_down;  //  in an outage (logged once)
    int64_t store_failures;  //  reads failed during the outage
    //  Group multipliers of holds, off unless groups_on
    bool groups_on;  //  read from the store (else every group is 1.0)
    int groups_refresh_ms;  //  AIGW_GROUPS_REFRESH_MS
    int64_t groups_read_at;  //  mono ms of the last successful read
    zhashx_t *groups;  //  group -> int64_t thousandths; NULL until read
    zhashx_t *store_prices;  //  model -> gw_price_t, read with groups; NULL until read
    //  Balance enforcement (AIGW_ENFORCE_BALANCE), off unless balance_on
    bool balance_on;  //  enforce every user's balance
    int balance_refresh_ms;  //  AIGW_BALANCE_REFRESH_MS
    int64_t balance_refreshed_at;  //  mono ms of the last refresh
    zhashx_t *balances;  //  user name -> s_balance_t
};

//  --------------------------------------------------------------------------
//  Configuration

static int s_fail (char *error, size_t error_size, const char *format, ...)
    __attribute__ ((format (printf, 3, 4)));

static int
s_fail (char *error, size_t error_size, const char *format, ...)
{
    if (error && error_size) {
        va_list args;
        va_start (args, format);
        vsnprintf (error, error_size, format, args);
        va_end (args);
    }
    return -1;
}

static void
s_config_destroy (s_config_t **self_p)
{
    s_config_t *self = *self_p;
    if (self) {
        for (int k = 0; k < KINDS; k++)
            zhashx_destroy (&self->entries[k]);
        free (self);
        *self_p = NULL;
    }
}

static s_config_t *
s_config_new (const gw_limits_t *base)
{
    s_config_t *self = (s_config_t *)zmalloc (sizeof (s_config_t));
    assert (self);
    for (int k = 0; k < KINDS; k++) {
        self->defaults[k] = base[k];
        self->entries[k] = zhashx_new ();
        assert (self->entries[k]);
        zhashx_set_destructor (self->entries[k], (zhashx_destructor_fn *)zstr_free);
    }
    return self;
}

gw_ratelimit_t *
gw_ratelimit_new (gw_limiter_t **limiter_p)
{
    assert (limiter_p && *limiter_p);
    gw_ratelimit_t *self = (gw_ratelimit_t *)zmalloc (sizeof (gw_ratelimit_t));
    assert (self);
    self->limiter = *limiter_p;
    *limiter_p = NULL;
    self->config = s_config_new (self->base);
    self->prices = zhashx_new ();
    assert (self->prices);
    zhashx_set_destructor (self->prices, (zhashx_destructor_fn *)zstr_free);
    self->default_max_tokens = 4096;
    self->multiplier = 1500;
    return self;
}

void
gw_ratelimit_destroy (gw_ratelimit_t **self_p)
{
    assert (self_p);
    gw_ratelimit_t *self = *self_p;
    if (self) {
        gw_limiter_destroy (&self->limiter);
        s_config_destroy (&self->config);
        zhashx_destroy (&self->prices);
        free (self->limits_file.path);
        free (self->prices_file.path);
        gw_store_destroy (&self->store);
        zhashx_destroy (&self->balances);
        zhashx_destroy (&self->groups);
        zhashx_destroy (&self->store_prices);
        free (self->store_url);
        free (self);
        *self_p = NULL;
    }
}

gw_limiter_t *
gw_ratelimit_limiter (gw_ratelimit_t *self)
{
    assert (self);
    return self->limiter;
}

static int
s_kind (const char *name, size_t size, const char *const *names)
{
    for (int k = 0; k < KINDS; k++)
        if (strlen (names[k]) == size && memcmp (names[k], name, size) == 0)
            return k;
    return -1;
}

int
gw_ratelimit_set_defaults (
    gw_ratelimit_t *self, const char *kind, const gw_limits_t *limits)
{
    assert (self);
    assert (kind && limits);
    int k = s_kind (kind, strlen (kind), s_kinds);
    if (k < 0)
        return -1;
    self->base[k] = *limits;
    //  Re-resolve: entries keep their own fields only if reloaded, so
    //  apply to the defaults and to a config without a file.
    if (!self->limits_file.path) {
        s_config_t *config = s_config_new (self->base);
        s_config_destroy (&self->config);
        self->config = config;
    }
    return 0;
}

//  A JSON file as msgpack (caller frees *data). Returns 0 or -1.
static int
s_read_json (const char *path, s_watch_t *watch, msgpack_sbuffer *sbuf, char *error,
    size_t error_size)
{
    struct stat info;
    if (stat (path, &info))
        return s_fail (error, error_size, "%s: %s", path, strerror (errno));
    if (watch) {
        watch->mtime = info.st_mtim;
        watch->size = info.st_size;
        watch->inode = info.st_ino;
    }
    FILE *file = fopen (path, "rb");
    if (!file)
        return s_fail (error, error_size, "%s: %s", path, strerror (errno));
    char *text = (char *)malloc (FILE_MAX + 1);
    assert (text);
    size_t size = fread (text, 1, FILE_MAX + 1, file);
    bool failed = ferror (file);
    fclose (file);
    int rc = -1;
    if (failed)
        s_fail (error, error_size, "%s: read error", path);
    else if (size > FILE_MAX)
        s_fail (error, error_size, "%s: larger than %d bytes", path, FILE_MAX);
    else {
        msgpack_packer pk;
        msgpack_packer_init (&pk, sbuf, msgpack_sbuffer_write);
        gw_json_limits_t limits = gw_json_limits_default ();
        limits.max_size = FILE_MAX;
        limits.max_depth = 8;
        gw_json_error_t jerror;
        if (gw_json_to_msgpack (text, size, &pk, &limits, &jerror))
            s_fail (error, error_size, "%s: invalid JSON at byte %zu: %s", path,
                jerror.offset, jerror.message);
        else
            rc = 0;
    }
    free (text);
    return rc;
}

static bool
s_name_valid (const gw_mvalue_t *value)
{
    if (value->type != GW_MP_STR || value->size == 0 || value->size > NAME_MAX_)
        return false;
    for (uint32_t i = 0; i < value->size; i++)
        if ((unsigned char)value->ptr[i] < 0x20 || value->ptr[i] == 0x7f)
            return false;
    return true;
}

//  Parse a limits object into fields, marking present ones. where names
//  the object in errors.
static int
s_parse_limits (gw_mreader_t *reader, uint64_t *fields, uint32_t *present,
    const char *where, char *error, size_t error_size)
{
    gw_mvalue_t value, name;
    if (gw_mreader_next (reader, &value) || value.type != GW_MP_MAP)
        return s_fail (error, error_size, "%s: must be an object", where);
    for (uint32_t i = 0; i < value.v.count; i++) {
        if (gw_mreader_next (reader, &name) || name.type != GW_MP_STR)
            return s_fail (error, error_size, "%s: malformed field name", where);
        int field = -1;
        for (int f = 0; f < FIELDS; f++)
            if (gw_mvalue_streq (&name, s_fields[f]))
                field = f;
        if (field < 0)
            return s_fail (error, error_size, "%s: unknown field \"%.*s\"", where,
                (int)(name.size > 40 ? 40 : name.size), name.ptr);
        gw_mvalue_t number;
        if (gw_mreader_next (reader, &number) || number.type != GW_MP_UINT ||
            number.v.u > ((uint64_t)1 << 53))
            return s_fail (error, error_size,
                "%s.%s: must be a whole number from 0 to 2^53 (0 = unlimited)", where,
                s_fields[field]);
        fields[field] = number.v.u;
        *present |= 1u << field;
    }
    return 0;
}

static void
s_merge (gw_limits_t *out, const gw_limits_t *defaults, const uint64_t *fields,
    uint32_t present)
{
    uint64_t *target = (uint64_t *)out;
    memcpy (out, defaults, sizeof (*out));
    for (int f = 0; f < FIELDS; f++)
        if (present & (1u << f))
            target[f] = fields[f];
}

static s_config_t *
s_parse_limits_file (
    gw_ratelimit_t *self, const void *data, size_t size, char *error, size_t error_size)
{
    gw_mreader_t reader;
    gw_mreader_init (&reader, data, size);
    gw_mvalue_t value, name;
    if (gw_mreader_next (&reader, &value) || value.type != GW_MP_MAP) {
        s_fail (error, error_size, "the file must hold a JSON object");
        return NULL;
    }
    s_config_t *config = s_config_new (self->base);
    //  Entities are kept as (fields, present) until the defaults are known.
    typedef struct {
        int kind;
        char *name;
        uint64_t fields[FIELDS];
        uint32_t present;
    } s_pending_t;
    zlistx_t *pending = zlistx_new ();
    assert (pending);
    zlistx_set_destructor (pending, NULL);
    uint32_t default_present[KINDS] = {0};
    uint64_t default_fields[KINDS][FIELDS];
    memset (default_fields, 0, sizeof (default_fields));
    bool ok = false;
    char where[NAME_MAX_ + 64];
    size_t entries = 0;
    for (uint32_t i = 0; i < value.v.count; i++) {
        if (gw_mreader_next (&reader, &name) || name.type != GW_MP_STR) {
            s_fail (error, error_size, "malformed member name");
            goto done;
        }
        bool defaults = gw_mvalue_streq (&name, "defaults");
        int kind = defaults ? -1 : s_kind (name.ptr, name.size, s_plurals);
        if (!defaults && kind < 0) {
            s_fail (error, error_size,
                "unknown member \"%.*s\" (expected defaults, keys, users, groups, "
                "models, ips)",
                (int)(name.size > 40 ? 40 : name.size), name.ptr);
            goto done;
        }
        gw_mvalue_t map;
        if (gw_mreader_next (&reader, &map) || map.type != GW_MP_MAP) {
            s_fail (error, error_size, "%s: must be an object",
                defaults ? "defaults" : s_plurals[kind]);
            goto done;
        }
        for (uint32_t j = 0; j < map.v.count; j++) {
            gw_mvalue_t entity;
            if (gw_mreader_next (&reader, &entity) || !s_name_valid (&entity)) {
                s_fail (error, error_size, "%s: names must be 1 to %d characters",
                    defaults ? "defaults" : s_plurals[kind], NAME_MAX_);
                goto done;
            }
            snprintf (where, sizeof (where), "%s.%.*s",
                defaults ? "defaults" : s_plurals[kind], (int)entity.size, entity.ptr);
            if (defaults) {
                int k = s_kind (entity.ptr, entity.size, s_kinds);
                if (k < 0) {
                    s_fail (error, error_size,
                        "%s: unknown kind (expected key, user, group, model, ip)", where);
                    goto done;
                }
                if (s_parse_limits (&reader, default_fields[k], &default_present[k],
                        where, error, error_size))
                    goto done;
                continue;
            }
            if (++entries > ENTRIES_MAX) {
                s_fail (error, error_size, "more than %d entries", ENTRIES_MAX);
                goto done;
            }
            s_pending_t *item = (s_pending_t *)zmalloc (sizeof (s_pending_t));
            assert (item);
            item->kind = kind;
            item->name = (char *)zmalloc (entity.size + 1);
            assert (item->name);
            memcpy (item->name, entity.ptr, entity.size);
            zlistx_add_end (pending, item);
            if (s_parse_limits (
                    &reader, item->fields, &item->present, where, error, error_size))
                goto done;
        }
    }
    for (int k = 0; k < KINDS; k++)
        s_merge (
            &config->defaults[k], &self->base[k], default_fields[k], default_present[k]);
    for (s_pending_t *item = (s_pending_t *)zlistx_first (pending); item;
         item = (s_pending_t *)zlistx_next (pending)) {
        gw_limits_t *limits = (gw_limits_t *)zmalloc (sizeof (gw_limits_t));
        assert (limits);
        s_merge (limits, &config->defaults[item->kind], item->fields, item->present);
        if (zhashx_insert (config->entries[item->kind], item->name, limits)) {
            free (limits);
            s_fail (error, error_size, "%s.%s: listed twice", s_plurals[item->kind],
                item->name);
            goto done;
        }
    }
    ok = true;
done:
    for (s_pending_t *item = (s_pending_t *)zlistx_first (pending); item;
         item = (s_pending_t *)zlistx_next (pending)) {
        free (item->name);
        free (item);
    }
    zlistx_destroy (&pending);
    if (!ok)
        s_config_destroy (&config);
    return config;
}

static int
s_load_limits (gw_ratelimit_t *self, char *error, size_t error_size)
{
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    int rc = s_read_json (
        self->limits_file.path, &self->limits_file, &sbuf, error, error_size);
    if (rc == 0) {
        char detail[384];
        s_config_t *config =
            s_parse_limits_file (self, sbuf.data, sbuf.size, detail, sizeof (detail));
        if (config) {
            s_config_destroy (&self->config);
            self->config = config;
        }
        else
            rc = s_fail (error, error_size, "%s: %s", self->limits_file.path, detail);
    }
    msgpack_sbuffer_destroy (&sbuf);
    return rc;
}

int
gw_ratelimit_set_limits_file (
    gw_ratelimit_t *self, const char *path, char *error, size_t error_size)
{
    assert (self);
    assert (path);
    free (self->limits_file.path);
    self->limits_file.path = strdup (path);
    self->checked_at = gw_mono_ms ();
    return s_load_limits (self, error, error_size);
}

static int
s_load_prices (gw_ratelimit_t *self, char *error, size_t error_size)
{
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    const char *path = self->prices_file.path;
    int rc = s_read_json (path, &self->prices_file, &sbuf, error, error_size);
    zhashx_t *prices = NULL;
    if (rc)
        goto done;
    rc = -1;
    gw_mreader_t reader;
    gw_mreader_init (&reader, sbuf.data, sbuf.size);
    gw_mvalue_t value, name, field, number;
    if (gw_mreader_next (&reader, &value) || value.type != GW_MP_MAP) {
        s_fail (error, error_size, "%s: the file must hold a JSON object", path);
        goto done;
    }
    prices = zhashx_new ();
    assert (prices);
    zhashx_set_destructor (prices, (zhashx_destructor_fn *)zstr_free);
    for (uint32_t i = 0; i < value.v.count; i++) {
        gw_mvalue_t map;
        if (gw_mreader_next (&reader, &name) || !s_name_valid (&name) ||
            gw_mreader_next (&reader, &map) || map.type != GW_MP_MAP) {
            s_fail (error, error_size,
                "%s: entry %u: expected \"model\": {\"input\": …, \"output\": …}", path,
                i);
            goto done;
        }
        gw_price_t *price = (gw_price_t *)zmalloc (sizeof (gw_price_t));
        assert (price);
        char model[NAME_MAX_ + 1];
        memcpy (model, name.ptr, name.size);
        model[name.size] = 0;
        if (zhashx_insert (prices, model, price)) {
            free (price);
            s_fail (error, error_size, "%s: %s listed twice", path, model);
            goto done;
        }
        bool have_input = false, have_cached = false;
        for (uint32_t j = 0; j < map.v.count; j++) {
            if (gw_mreader_next (&reader, &field) || field.type != GW_MP_STR) {
                s_fail (error, error_size, "%s: %s: malformed field", path, model);
                goto done;
            }
            //  Unknown fields (descriptions, currency…) are ignored.
            int64_t *target = gw_mvalue_streq (&field, "input") ? &price->input
                : gw_mvalue_streq (&field, "output")            ? &price->output
                : gw_mvalue_streq (&field, "cached_input")      ? &price->cached_input
                                                                : NULL;
            if (!target) {
                if (gw_mreader_skip (&reader, DEPTH_MAX)) {
                    s_fail (error, error_size, "%s: %s: malformed value", path, model);
                    goto done;
                }
                continue;
            }
            //  USD per 1M tokens (docs/BILLING.md "Price file"): a JSON
            //  number or a decimal string, at most 6 decimals, read exactly
            //  as billing reads the same file.
            if (gw_mreader_next (&reader, &number) || gw_price_field (&number, target)) {
                s_fail (error, error_size,
                    "%s: %s.%.*s: must be USD per 1M tokens, 0 to 1000000, at most 6 "
                    "decimals (a number or a decimal string)",
                    path, model, (int)field.size, field.ptr);
                goto done;
            }
            if (target == &price->input)
                have_input = true;
            if (target == &price->cached_input)
                have_cached = true;
        }
        if (have_input && !have_cached)
            price->cached_input = price->input;
    }
    zhashx_destroy (&self->prices);
    self->prices = prices;
    prices = NULL;
    rc = 0;
done:
    zhashx_destroy (&prices);
    msgpack_sbuffer_destroy (&sbuf);
    return rc;
}

int
gw_ratelimit_set_prices_file (
    gw_ratelimit_t *self, const char *path, char *error, size_t error_size)
{
    assert (self);
    assert (path);
    free (self->prices_file.path);
    self->prices_file.path = strdup (path);
    self->checked_at = gw_mono_ms ();
    return s_load_prices (self, error, error_size);
}

static bool
s_changed (s_watch_t *watch)
{
    struct stat info;
    if (!watch->path || stat (watch->path, &info))
        return false;
    return info.st_mtim.tv_sec != watch->mtime.tv_sec ||
        info.st_mtim.tv_nsec != watch->mtime.tv_nsec || info.st_size != watch->size ||
        info.st_ino != watch->inode;
}

int
gw_ratelimit_refresh (gw_ratelimit_t *self, bool force, int interval_ms)
{
    assert (self);
    int64_t now = gw_mono_ms ();
    if (!force && now - self->checked_at < interval_ms)
        return 0;
    self->checked_at = now;
    int rc = 0;
    char error[512];
    if (self->limits_file.path && (force || s_changed (&self->limits_file))) {
        if (s_load_limits (self, error, sizeof (error))) {
            gw_error ("ratelimit: reloading limits failed: %s (keeping the last good "
                      "limits)",
                error);
            rc = -1;
        }
        else {
            gw_info ("ratelimit: limits file %s loaded", self->limits_file.path);
            rc = 1;
        }
    }
    if (self->prices_file.path && (force || s_changed (&self->prices_file))) {
        if (s_load_prices (self, error, sizeof (error))) {
            gw_error ("ratelimit: reloading prices failed: %s (keeping the last good "
                      "prices)",
                error);
            rc = -1;
        }
        else {
            gw_info ("ratelimit: prices file %s loaded, %zu model(s)",
                self->prices_file.path, zhashx_size (self->prices));
            if (rc == 0)
                rc = 1;
        }
    }
    return rc;
}

//  A refresh interval from the environment: min..3600000 ms. 0 or -1.
static int
s_env_ms (const char *name, long fallback, long min, long *value)
{
    const char *text = gw_env (name, NULL);
    if (!text) {
        *value = fallback;
        return 0;
    }
    char *end;
    errno = 0;
    *value = strtol (text, &end, 10);
    if (!isdigit ((unsigned char)*text) || *end || errno || *value < min ||
        *value > 3600000)
        return -1;
    return 0;
}

int
gw_ratelimit_configure_env (gw_ratelimit_t *self, char *error, size_t error_size)
{
    assert (self);
    gw_limits_t key = self->base[0];
    const char *names[] = {"RATE_LIMIT_REQUESTS_PER_MINUTE", "RATE_LIMIT_BURST",
        "AIGW_TPM", "AIGW_MAX_CONCURRENT", "AIGW_DEFAULT_MAX_TOKENS"};
    uint64_t *targets[] = {
        &key.rpm, &key.burst, &key.tpm, &key.concurrency, &self->default_max_tokens};
    for (int i = 0; i < 5; i++) {
        const char *text = gw_env (names[i], NULL);
        if (!text)
            continue;
        char *end;
        errno = 0;
        unsigned long long value = strtoull (text, &end, 10);
        if (!isdigit ((unsigned char)*text) || *end || errno ||
            value > ((uint64_t)1 << 53))
            return s_fail (
                error, error_size, "%s must be a whole number (0 = unlimited)", names[i]);
        *targets[i] = value;
    }
    gw_ratelimit_set_defaults (self, "key", &key);
    const char *multiplier = gw_env ("AIGW_PRICE_MULTIPLIER", NULL);
    if (multiplier && gw_price_multiplier (multiplier, &self->multiplier))
        return s_fail (error, error_size,
            "AIGW_PRICE_MULTIPLIER must be a decimal number like 1.5 (at most 3 "
            "decimals, at most 1000), as billing's");
    const char *limits = gw_env ("AIGW_LIMITS_FILE", NULL);
    if (limits && gw_ratelimit_set_limits_file (self, limits, error, error_size))
        return -1;
    const char *prices = gw_env ("AIGW_PRICES_FILE", NULL);
    if (prices && gw_ratelimit_set_prices_file (self, prices, error, error_size))
        return -1;
    const char *store = gw_env ("DATABASE_URL", "var/aigw.db");
    const char *groups = gw_env ("AIGW_GROUP_MULTIPLIERS", "1");
    if (!streq (groups, "0") && !streq (groups, "1"))
        return s_fail (error, error_size, "AIGW_GROUP_MULTIPLIERS must be 0 or 1");
    //  Prices and multipliers from the store, as billing prices: always, so
    //  a price set with aigw-admin (or in SQL) is held as it is billed.
    if (streq (groups, "1")) {
        long value;
        if (s_env_ms ("AIGW_GROUPS_REFRESH_MS", 5000, 100, &value))
            return s_fail (error, error_size,
                "AIGW_GROUPS_REFRESH_MS must be a whole number 100..3600000");
        gw_ratelimit_set_groups (self, store, (int)value);
    }
    const char *enforce = gw_env ("AIGW_ENFORCE_BALANCE", "0");
    if (!streq (enforce, "0") && !streq (enforce, "1"))
        return s_fail (error, error_size, "AIGW_ENFORCE_BALANCE must be 0 or 1");
    if (streq (enforce, "1")) {
        long value;
        if (s_env_ms ("AIGW_BALANCE_REFRESH_MS", 1000, 10, &value))
            return s_fail (error, error_size,
                "AIGW_BALANCE_REFRESH_MS must be a whole number 10..3600000");
        gw_ratelimit_set_balance (self, store, (int)value);
    }
    return 0;
}

//  --------------------------------------------------------------------------
//  Billing's store: group multipliers and balances

//  Use the store at url (NULL: none, when neither reader needs it). A new
//  url closes the old store and forgets what was read from it.
static void
s_store_use (gw_ratelimit_t *self, const char *url)
{
    if (url && self->store_url && streq (url, self->store_url))
        return;
    free (self->store_url);
    self->store_url = url ? strdup (url) : NULL;
    gw_store_destroy (&self->store);
    self->store_retry_at = 0;
    self->store_down = false;
    zhashx_destroy (&self->groups);
    zhashx_destroy (&self->store_prices);
    if (self->balances)
        zhashx_purge (self->balances);
}

void
gw_ratelimit_set_groups (gw_ratelimit_t *self, const char *url, int refresh_ms)
{
    assert (self);
    self->groups_on = url != NULL;
    zhashx_destroy (&self->groups);
    zhashx_destroy (&self->store_prices);
    if (url) {
        s_store_use (self, url);
        self->groups_refresh_ms = refresh_ms > 0 ? refresh_ms : 5000;
    }
    else if (!self->balance_on)
        s_store_use (self, NULL);
}

void
gw_ratelimit_set_balance (gw_ratelimit_t *self, const char *url, int refresh_ms)
{
    assert (self);
    self->balance_on = url != NULL;
    zhashx_destroy (&self->balances);
    if (!url) {
        if (!self->groups_on)
            s_store_use (self, NULL);
        return;
    }
    s_store_use (self, url);
    self->balance_refresh_ms = refresh_ms > 0 ? refresh_ms : 1000;
    self->balances = zhashx_new ();
    assert (self->balances);
    zhashx_set_destructor (self->balances, (zhashx_destructor_fn *)zstr_free);
}

static void
s_store_outage (gw_ratelimit_t *self, const char *why)
{
    gw_store_destroy (&self->store);
    self->store_retry_at = gw_mono_ms () + 1000;
    self->store_failures++;
    if (!self->store_down) {
        self->store_down = true;
        self->store_failures = 1;
        gw_warn ("ratelimit: store unavailable (%s): failing %s for users whose "
                 "balance, and groups whose multiplier, is not known yet",
            why,
            gw_limiter_fail_open (self->limiter)
                ? "OPEN (admitted without a balance check, held at multiplier 1.0)"
                : "CLOSED (refused with 429)");
    }
}

//  The store, opened on demand; NULL while unavailable (retried each second).
static gw_store_t *
s_store (gw_ratelimit_t *self)
{
    if (!self->store && gw_mono_ms () >= self->store_retry_at) {
        char error[256] = "";
        self->store = gw_store_new (self->store_url, error, sizeof (error));
        if (!self->store)
            s_store_outage (self, error);
    }
    return self->store;
}

//  A read from the store succeeded: end the outage, if any (logged).
static void
s_store_ok (gw_ratelimit_t *self)
{
    if (self->store_down) {
        gw_info ("ratelimit: store available again (%" PRId64
                 " read(s) failed meanwhile)",
            self->store_failures);
        self->store_down = false;
    }
}

//  Read user's balance B and the settled cost S of its scope (S first, so a
//  cost committed and settled between the two reads is counted, never
//  missed) and set its limit L = B + S. Returns 0, or -1 if the store or
//  the limiter is unavailable (entry unchanged).
static int
s_balance_read (gw_ratelimit_t *self, const char *user, s_balance_t *entry)
{
    uint64_t settled = 0;
    if (gw_limiter_budget_settled (self->limiter, entry->scope, &settled))
        return -1;
    gw_store_t *store = s_store (self);
    if (!store)
        return -1;
    int64_t balance = 0;
    int rc = gw_store_user_get (store, user, NULL, 0, &balance);
    if (rc == 1)
        balance = 0;  //  no such user: nothing to spend
    else if (rc != 0) {
        char why[256];
        snprintf (why, sizeof (why), "%s", gw_store_error (store));
        s_store_outage (self, why);
        return -1;
    }
    s_store_ok (self);
    entry->balance = balance;
    entry->limit = balance > 0 ? (uint64_t)balance + settled : 0;
    return 0;
}

//  Refresh every user seen, at most every balance_refresh_ms.
static void
s_balance_refresh (gw_ratelimit_t *self)
{
    int64_t now = gw_mono_ms ();
    if (now - self->balance_refreshed_at < self->balance_refresh_ms &&
        now >= self->balance_refreshed_at)
        return;
    self->balance_refreshed_at = now;
    for (s_balance_t *entry = (s_balance_t *)zhashx_first (self->balances); entry;
         entry = (s_balance_t *)zhashx_next (self->balances)) {
        const char *user = (const char *)zhashx_cursor (self->balances);
        if (s_balance_read (self, user, entry))
            break;  //  keep the last limits (still conservative), retry later
    }
}

//  The balance entry of user, read synchronously on first sight; NULL if
//  it is not known and cannot be read now.
static s_balance_t *
s_balance (gw_ratelimit_t *self, const char *user, const char *scope)
{
    s_balance_refresh (self);
    s_balance_t *entry = (s_balance_t *)zhashx_lookup (self->balances, user);
    if (entry)
        return entry;
    entry = (s_balance_t *)zmalloc (sizeof (s_balance_t));
    assert (entry);
    size_t length = strnlen (scope, sizeof (entry->scope) - 1);
    memcpy (entry->scope, scope, length);  //  zmalloc'd: terminated
    if (s_balance_read (self, user, entry)) {
        free (entry);
        return NULL;
    }
    if (zhashx_size (self->balances) >= BALANCE_USERS_MAX)
        zhashx_purge (self->balances);  //  re-read on next sight
    zhashx_insert (self->balances, user, entry);
    return entry;
}

//  --------------------------------------------------------------------------
//  Prices and group multipliers from the store (docs/LIMITS.md "Estimate")

//  Re-read the multiplier of every group and every model's price (two
//  small queries) when the last read is groups_refresh_ms old, as billing
//  re-reads them; on failure the last tables stay in force.
static void
s_groups_refresh (gw_ratelimit_t *self)
{
    int64_t now = gw_mono_ms ();
    if (self->groups && now - self->groups_read_at < self->groups_refresh_ms &&
        now >= self->groups_read_at)
        return;
    gw_store_t *store = s_store (self);
    if (!store)
        return;
    zhashx_t *prices, *groups;
    if (gw_store_pricing (store, &prices, &groups)) {
        char why[256];
        snprintf (why, sizeof (why), "%s", gw_store_error (store));
        s_store_outage (self, why);
        return;
    }
    s_store_ok (self);
    zhashx_destroy (&self->groups);
    zhashx_destroy (&self->store_prices);
    self->groups = groups;
    self->store_prices = prices;
    self->groups_read_at = now;
}

//  The price of model as billing finds it: the store's (what billing
//  prices with; AIGW_PRICES_FILE is loaded into it at billing's start),
//  else the prices file's, the model's own before "*". NULL: unpriced.
static const gw_price_t *
s_price (gw_ratelimit_t *self, const char *model)
{
    if (self->groups_on)
        s_groups_refresh (self);
    const char *names[] = {model, "*"};
    for (int i = 0; i < 2; i++) {
        if (!names[i])
            continue;
        const gw_price_t *price = self->store_prices
            ? (const gw_price_t *)zhashx_lookup (self->store_prices, names[i])
            : NULL;
        if (!price)
            price = (const gw_price_t *)zhashx_lookup (self->prices, names[i]);
        if (price)
            return price;
    }
    return NULL;
}

//  The multiplier of group in thousandths, as billing applies it (a group
//  not in the store is 1.0). Returns 0, or -1 if it is unknown because the
//  store could never be read (*milli is then 1.0).
static int
s_group_milli (gw_ratelimit_t *self, const char *group, int64_t *milli)
{
    *milli = 1000;
    if (!self->groups_on)
        return 0;
    s_groups_refresh (self);
    if (!self->groups)
        return -1;
    const int64_t *value = (const int64_t *)zhashx_lookup (self->groups, group);
    if (value)
        *milli = *value;
    return 0;
}

//  --------------------------------------------------------------------------
//  Estimate

static bool
s_key_in (const gw_mvalue_t *key, const char *const *names)
{
    for (int i = 0; names[i]; i++)
        if (gw_mvalue_streq (key, names[i]))
            return true;
    return false;
}

//  Add the bytes of every string in the next value to *bytes.
static int
s_text_bytes (gw_mreader_t *reader, int depth, uint64_t *bytes)
{
    static const char *skipped[] = {"image_url", "input_audio", "file", NULL};
    gw_mvalue_t value, key;
    if (depth > DEPTH_MAX || gw_mreader_next (reader, &value))
        return -1;
    if (value.type == GW_MP_STR)
        *bytes += value.size;
    else if (value.type == GW_MP_ARRAY) {
        for (uint32_t i = 0; i < value.v.count; i++)
            if (s_text_bytes (reader, depth + 1, bytes))
                return -1;
    }
    else if (value.type == GW_MP_MAP) {
        for (uint32_t i = 0; i < value.v.count; i++) {
            if (gw_mreader_next (reader, &key) || key.type == GW_MP_ARRAY ||
                key.type == GW_MP_MAP)
                return -1;
            int rc = key.type == GW_MP_STR && s_key_in (&key, skipped)
                ? gw_mreader_skip (reader, DEPTH_MAX)
                : s_text_bytes (reader, depth + 1, bytes);
            if (rc)
                return -1;
        }
    }
    return 0;
}

int
gw_ratelimit_estimate (gw_ratelimit_t *self, const char *op, const char *model,
    const char *group, const void *body, size_t size, gw_ratelimit_estimate_t *estimate)
{
    assert (self);
    assert (estimate);
    static const char *prompt_keys[] = {"messages", "prompt", "input", "tools",
        "functions", "system", "instructions", NULL};
    memset (estimate, 0, sizeof (*estimate));
    estimate->group_milli = 1000;
    gw_mreader_t reader;
    gw_mreader_init (&reader, body ? body : "", body ? size : 0);
    gw_mvalue_t value, key, number;
    if (gw_mreader_next (&reader, &value) || value.type != GW_MP_MAP)
        return -1;
    uint64_t bytes = 0, max_tokens = 0, n = 1;
    int max_rank = 0;  //  3 max_completion_tokens, 2 max_tokens, 1 max_output_tokens
    for (uint32_t i = 0; i < value.v.count; i++) {
        if (gw_mreader_next (&reader, &key) || key.type == GW_MP_ARRAY ||
            key.type == GW_MP_MAP)
            return -1;
        int rank = gw_mvalue_streq (&key, "max_completion_tokens") ? 3
            : gw_mvalue_streq (&key, "max_tokens")                 ? 2
            : gw_mvalue_streq (&key, "max_output_tokens")          ? 1
                                                                   : 0;
        if (key.type == GW_MP_STR && s_key_in (&key, prompt_keys)) {
            if (s_text_bytes (&reader, 0, &bytes))
                return -1;
        }
        else if (rank || gw_mvalue_streq (&key, "n")) {
            if (gw_mreader_next (&reader, &number))
                return -1;
            if (number.type != GW_MP_UINT)
                continue;  //  null or wrong type: the provider will say so
            if (!rank)
                n = number.v.u < 1 ? 1 : number.v.u > 128 ? 128 : number.v.u;
            else if (rank > max_rank) {
                max_rank = rank;
                max_tokens = number.v.u > 100000000 ? 100000000 : number.v.u;
            }
        }
        else if (gw_mreader_skip (&reader, DEPTH_MAX))
            return -1;
    }
    bool embeddings = op && streq (op, "embeddings");
    if (!max_rank)
        max_tokens = embeddings ? 0 : self->default_max_tokens;
    estimate->prompt_tokens = (bytes + 2) / 3;
    estimate->max_tokens = max_tokens * n;
    const gw_price_t *price = s_price (self, model);
    //  Prices and multipliers from a store never read: the hold may be
    //  short (a cost limit then gets the fail mode).
    if (self->groups_on && !self->groups)
        estimate->group_unknown = true;
    if (price) {
        //  As billing: tenant.group, else "default"; cached tokens are not
        //  known in advance, so the prompt is held at the input price.
        if (s_group_milli (
                self, group && *group ? group : "default", &estimate->group_milli))
            estimate->group_unknown = true;
        int64_t cost = 0;
        if (gw_price_cost (price, self->multiplier, estimate->group_milli,
                (int64_t)estimate->prompt_tokens, (int64_t)estimate->max_tokens, 0,
                &cost))
            cost = (int64_t)1 << 62;  //  beyond gw_price's bounds: beyond any budget
        estimate->cost = (uint64_t)cost;
    }
    return 0;
}

//  --------------------------------------------------------------------------
//  Admission

static int s_refuse (gw_ratelimit_refusal_t *refusal, uint16_t status, const char *type,
    const char *code, int64_t retry_after, const char *format, ...)
    __attribute__ ((format (printf, 6, 7)));

static int
s_refuse (gw_ratelimit_refusal_t *refusal, uint16_t status, const char *type,
    const char *code, int64_t retry_after, const char *format, ...)
{
    refusal->status = status;
    refusal->type = type;
    refusal->code = code;
    refusal->retry_after = retry_after;
    va_list args;
    va_start (args, format);
    vsnprintf (refusal->message, sizeof (refusal->message), format, args);
    va_end (args);
    return GW_DONE;
}

//  A scope name "kind:id" for the limiter: ids that are long or hold
//  control characters are replaced by a digest so keys stay bounded.
static void
s_scope_name (const char *kind, const char *id, char *out, size_t out_size)
{
    size_t size = strlen (id);
    bool plain = size <= 128;
    for (size_t i = 0; plain && i < size; i++)
        plain = (unsigned char)id[i] >= 0x20 && id[i] != 0x7f;
    if (plain)
        snprintf (out, out_size, "%s:%s", kind, id);
    else {
        uint64_t hash = 14695981039346656037ULL;  //  FNV-1a
        for (size_t i = 0; i < size; i++)
            hash = (hash ^ (unsigned char)id[i]) * 1099511628211ULL;
        snprintf (out, out_size, "%s:~%016" PRIx64, kind, hash);
    }
}

//  "600ms", "1.5s", "6m0s", "1h2m3s" (OpenAI's reset header style).
static void
s_duration (int64_t ms, char *out, size_t size)
{
    if (ms < 0)
        ms = 0;
    if (ms < 1000) {
        snprintf (out, size, "%" PRId64 "ms", ms);
        return;
    }
    int64_t hours = ms / 3600000, minutes = ms / 60000 % 60;
    int64_t seconds = ms / 1000 % 60, millis = ms % 1000;
    char secs[32];
    if (millis == 0)
        snprintf (secs, sizeof (secs), "%" PRId64 "s", seconds);
    else {
        snprintf (secs, sizeof (secs), "%" PRId64 ".%03" PRId64, seconds, millis);
        size_t len = strlen (secs);
        while (secs[len - 1] == '0')
            secs[--len] = 0;
        strcat (secs, "s");
    }
    if (hours)
        snprintf (out, size, "%" PRId64 "h%" PRId64 "m%s", hours, minutes, secs);
    else if (minutes)
        snprintf (out, size, "%" PRId64 "m%s", minutes, secs);
    else
        snprintf (out, size, "%s", secs);
}

//  Write ann.headers: the x-ratelimit-* values of result, merged over any
//  ann.headers already present (str -> str pairs kept).
static void
s_headers (gw_envelope_t *envelope, const gw_limiter_result_t *result)
{
    char values[6][32];
    const char *names[6] = {"x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens"};
    bool have[6] = {false};
    if (result->limit_requests >= 0) {
        snprintf (values[0], 32, "%" PRId64, result->limit_requests);
        snprintf (values[1], 32, "%" PRId64, result->remaining_requests);
        s_duration (result->reset_requests_ms, values[2], 32);
        have[0] = have[1] = have[2] = true;
    }
    if (result->limit_tokens >= 0) {
        snprintf (values[3], 32, "%" PRId64, result->limit_tokens);
        snprintf (values[4], 32, "%" PRId64, result->remaining_tokens);
        if (result->reset_tokens_ms >= 0) {
            s_duration (result->reset_tokens_ms, values[5], 32);
            have[5] = true;
        }
        have[3] = have[4] = true;
    }
    int count = 0;
    for (int i = 0; i < 6; i++)
        count += have[i];
    if (!count)
        return;
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    //  Keep earlier stages' headers (other names), at most 16.
    size_t old_size = 0;
    const void *old = gw_envelope_ann_raw (envelope, "headers", &old_size);
    gw_mreader_t reader;
    gw_mvalue_t value, name;
    uint32_t kept = 0;
    const char *kept_ptr[16][2];
    uint32_t kept_size[16][2];
    if (old) {
        gw_mreader_init (&reader, old, old_size);
        if (gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_MAP) {
            for (uint32_t i = 0; i < value.v.count && kept < 16; i++) {
                gw_mvalue_t item;
                if (gw_mreader_next (&reader, &name) || gw_mreader_next (&reader, &item))
                    break;
                if (name.type != GW_MP_STR || item.type != GW_MP_STR ||
                    (name.size > 13 && strncasecmp (name.ptr, "x-ratelimit-", 12) == 0))
                    continue;
                kept_ptr[kept][0] = name.ptr, kept_size[kept][0] = name.size;
                kept_ptr[kept][1] = item.ptr, kept_size[kept][1] = item.size;
                kept++;
            }
        }
    }
    msgpack_pack_map (&pk, (size_t)count + kept);
    for (uint32_t i = 0; i < kept; i++)
        for (int j = 0; j < 2; j++) {
            msgpack_pack_str (&pk, kept_size[i][j]);
            msgpack_pack_str_body (&pk, kept_ptr[i][j], kept_size[i][j]);
        }
    for (int i = 0; i < 6; i++)
        if (have[i]) {
            gw_mpack_str (&pk, names[i]);
            gw_mpack_str (&pk, values[i]);
        }
    gw_envelope_set_ann_raw (envelope, "headers", sbuf.data, sbuf.size);
    msgpack_sbuffer_destroy (&sbuf);
}

//  Write ann.rl (STAGES.md §6.1).
static void
s_annotate (gw_envelope_t *envelope, uint64_t hold, uint64_t tokens, bool lease,
    const gw_limiter_request_t *request)
{
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    msgpack_pack_map (&pk, 4);
    gw_mpack_str (&pk, "hold");
    msgpack_pack_uint64 (&pk, hold);
    gw_mpack_str (&pk, "est_tokens");
    msgpack_pack_uint64 (&pk, tokens);
    gw_mpack_str (&pk, "lease");
    if (lease)
        msgpack_pack_true (&pk);
    else
        msgpack_pack_false (&pk);
    gw_mpack_str (&pk, "scopes");
    msgpack_pack_array (&pk, request ? request->scopes : 0);
    for (size_t i = 0; request && i < request->scopes; i++)
        gw_mpack_str (&pk, request->scope[i]);
    gw_envelope_set_ann_raw (envelope, "rl", sbuf.data, sbuf.size);
    msgpack_sbuffer_destroy (&sbuf);
}

static const char *
s_unit (int limit)
{
    if (limit == GW_LIMIT_RPM || (limit >= GW_LIMIT_REQUESTS && limit < GW_LIMIT_TOKENS))
        return "requests";
    if (limit == GW_LIMIT_TPM || (limit >= GW_LIMIT_TOKENS && limit < GW_LIMIT_COST))
        return "tokens";
    if (limit == GW_LIMIT_CONCURRENCY)
        return "requests in flight";
    return "micro-units";
}

static uint64_t
s_limit_value (const gw_limits_t *limits, int limit)
{
    const uint64_t *fields = (const uint64_t *)limits;
    static const int field[] = {
        -1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    if (limit <= 0 || limit > GW_LIMIT_BUDGET)
        return 0;
    return fields[field[limit]];
}

//  True if a scope of request limits money (cost quotas, budget, balance).
static bool
s_cost_limited (const gw_limiter_request_t *request)
{
    for (size_t i = 0; i < request->scopes; i++) {
        const gw_limits_t *limits = &request->limits[i];
        if (limits->budget)
            return true;
        for (int w = 0; w < GW_LIMITER_WINDOWS; w++)
            if (limits->cost[w])
                return true;
    }
    return false;
}

//  An admission between its two halves: the limiter's request (its scope
//  names point into names) and what the answer needs.
typedef struct {
    gw_limiter_request_t request;
    char names[KINDS][GW_LIMITER_SCOPE_MAX + 1];
    bool lease;
    int balance_at;  //  index of the scope whose budget is the balance
    int64_t balance;
} s_admission_t;

//  The first half of gw_ratelimit_admit, up to the limiter: GW_OK with
//  *limited false when the operation has no limits, GW_OK with *limited
//  true and admission ready for the limiter, or a refusal (filled).
static int
s_admit_prepare (gw_ratelimit_t *self, gw_envelope_t *envelope, const void *body,
    size_t size, gw_ratelimit_refusal_t *refusal, s_admission_t *admission, bool *limited)
{
    assert (self);
    assert (envelope);
    assert (refusal);
    memset (refusal, 0, sizeof (*refusal));
    refusal->retry_after = -1;
    *limited = false;
    const char *op = gw_envelope_ann_str (envelope, "op");
    if (!op ||
        !(streq (op, "chat") || streq (op, "completions") || streq (op, "embeddings") ||
            streq (op, "responses")))
        return GW_OK;  //  models and other metadata: no limits
    const char *model = gw_envelope_model (envelope);
    const char *group = gw_envelope_tenant_str (envelope, "group");
    gw_ratelimit_estimate_t estimate;
    if (gw_ratelimit_estimate (self, op, model, group, body, size, &estimate))
        return s_refuse (refusal, 400, "invalid_request_error", "invalid_body", -1,
            "The request body could not be read.");

    memset (admission, 0, sizeof (*admission));
    gw_limiter_request_t *request = &admission->request;
    memcpy (request->rid, gw_envelope_rid (envelope), 16);
    char (*names)[GW_LIMITER_SCOPE_MAX + 1] = admission->names;
    const char *ids[KINDS] = {gw_envelope_tenant_str (envelope, "key"),
        gw_envelope_tenant_str (envelope, "user"), group, model,
        gw_envelope_ann_str (envelope, "ip")};
    admission->balance_at = -1;
    for (int k = 0; k < KINDS; k++) {
        if (!ids[k] || !*ids[k])
            continue;
        const gw_limits_t *limits =
            (const gw_limits_t *)zhashx_lookup (self->config->entries[k], ids[k]);
        if (!limits)
            limits = &self->config->defaults[k];
        bool by_balance = k == 1 && self->balance_on;
        if (gw_limits_empty (limits) && !by_balance)
            continue;
        s_scope_name (s_kinds[k], ids[k], names[k], sizeof (names[k]));
        request->limits[request->scopes] = *limits;
        if (by_balance) {
            s_balance_t *entry = s_balance (self, ids[k], names[k]);
            if (!entry && !gw_limiter_fail_open (self->limiter)) {
                gw_envelope_set_ann_int (envelope, "retry_after", 1);
                return s_refuse (refusal, 429, "rate_limit_error", "rate_limit_exceeded",
                    1,
                    "The balance of user %s cannot be checked right now (the store is "
                    "unavailable), so the request was refused. Please try again shortly.",
                    names[k] + 5);
            }
            if (entry && entry->balance <= 0)
                return s_refuse (refusal, 429, "insufficient_quota", "insufficient_quota",
                    -1,
                    "You exceeded your current quota: the balance of %s is %" PRId64
                    " micro-units. Add credit to continue.",
                    names[k], entry->balance);
            if (entry) {
                gw_limits_t *mine = &request->limits[request->scopes];
                if (!mine->budget || mine->budget > entry->limit)
                    mine->budget = entry->limit;
                admission->balance_at = (int)request->scopes;
                admission->balance = entry->balance;
            }
            if (gw_limits_empty (&request->limits[request->scopes]))
                continue;  //  failing open for this user, no other limit
        }
        request->scope[request->scopes] = names[k];
        request->scopes++;
        admission->lease = admission->lease || limits->concurrency > 0;
    }
    //  A hold priced without its group's multiplier (the store was never
    //  readable) could let a budget be overshot: fail mode, if money counts.
    if (estimate.group_unknown && !gw_limiter_fail_open (self->limiter) &&
        s_cost_limited (request)) {
        gw_envelope_set_ann_int (envelope, "retry_after", 1);
        return s_refuse (refusal, 429, "rate_limit_error", "rate_limit_exceeded", 1,
            "The prices and the multiplier of group %s cannot be read right now (the "
            "store is unavailable), so the request was refused. Please try again "
            "shortly.",
            group && *group ? group : "default");
    }
    request->tokens = estimate.prompt_tokens + estimate.max_tokens;
    request->cost = estimate.cost;
    int64_t now = gw_time_ms ();
    int64_t deadline = (int64_t)gw_envelope_deadline (envelope);
    request->lease_ms = deadline > now ? deadline - now + 60000 : LEASE_DEFAULT_MS;
    if (request->lease_ms > LEASE_MAX_MS)
        request->lease_ms = LEASE_MAX_MS;

    *limited = true;
    return GW_OK;
}

//  The second half: the limiter's answer (rc, result) as headers and
//  annotations on envelope, and GW_OK or a refusal (filled).
static int
s_admit_conclude (gw_ratelimit_t *self, gw_envelope_t *envelope,
    const s_admission_t *admission, int rc, const gw_limiter_result_t *result,
    gw_ratelimit_refusal_t *refusal)
{
    const gw_limiter_request_t *request = &admission->request;
    bool lease = admission->lease;
    int balance_at = admission->balance_at;
    int64_t balance = admission->balance;
    s_headers (envelope, result);
    if (rc == 0) {
        if (result->unavailable)  //  failing open: nothing reserved
            s_annotate (envelope, 0, 0, false, NULL);
        else
            s_annotate (envelope, request->cost, request->tokens, lease, request);
        if (self->verbose)
            gw_debug ("ratelimit: admitted tokens=%" PRIu64 " hold=%" PRIu64 "%s",
                request->tokens, request->cost,
                result->unavailable ? " (failing open)" : "");
        return GW_OK;
    }
    int64_t retry =
        result->retry_after_ms < 0 ? -1 : (result->retry_after_ms + 999) / 1000;
    if (retry == 0)
        retry = 1;
    if (retry >= 0)
        gw_envelope_set_ann_int (envelope, "retry_after", retry);
    if (self->verbose)
        gw_debug ("ratelimit: refused by %s", gw_limiter_limit_name (result->limit));
    if (result->limit == GW_LIMIT_UNAVAILABLE)
        return s_refuse (refusal, 429, "rate_limit_error", "rate_limit_exceeded", retry,
            "Rate limits cannot be checked right now (the limit store is unavailable), "
            "so the request was refused. Please try again shortly.");
    const char *scope = result->scope >= 0 && (size_t)result->scope < request->scopes
        ? request->scope[result->scope]
        : "?";
    uint64_t value = result->scope >= 0 && (size_t)result->scope < request->scopes
        ? s_limit_value (&request->limits[result->scope], result->limit)
        : 0;
    const char *name = gw_limiter_limit_name (result->limit);
    char wait[32] = "";
    if (retry >= 0)
        s_duration (result->retry_after_ms, wait, sizeof (wait));
    if (result->limit == GW_LIMIT_BUDGET && result->scope == balance_at)
        return s_refuse (refusal, 429, "insufficient_quota", "insufficient_quota", -1,
            "You exceeded your current quota: the balance of %s (%" PRId64
            " micro-units, less requests in flight) cannot cover this request's hold "
            "of %" PRIu64 " micro-units. Add credit or lower max_tokens.",
            scope, balance, request->cost);
    if (result->limit == GW_LIMIT_BUDGET ||
        (result->limit >= GW_LIMIT_COST && result->limit < GW_LIMIT_BUDGET))
        return s_refuse (refusal, 429, "insufficient_quota", "insufficient_quota", retry,
            "You exceeded your current quota (%s of %" PRIu64
            " micro-units on %s); this request would hold %" PRIu64 " more.%s%s",
            name, value, scope, request->cost, retry >= 0 ? " Please try again in " : "",
            retry >= 0 ? wait : "");
    if (retry < 0)
        return s_refuse (refusal, 429, "rate_limit_error", "rate_limit_exceeded", -1,
            "Request too large for %s on %s: limit %" PRIu64 " %s, requested %" PRIu64
            ". Lower max_tokens or the prompt size.",
            name, scope, value, s_unit (result->limit), request->tokens);
    return s_refuse (refusal, 429, "rate_limit_error", "rate_limit_exceeded", retry,
        "Rate limit reached for %s on %s: limit %" PRIu64 " %s. Please try again in %s.",
        name, scope, value, s_unit (result->limit), wait);
}

int
gw_ratelimit_admit (gw_ratelimit_t *self, gw_envelope_t *envelope, const void *body,
    size_t size, gw_ratelimit_refusal_t *refusal)
{
    s_admission_t admission;
    bool limited;
    int rc = s_admit_prepare (self, envelope, body, size, refusal, &admission, &limited);
    if (rc != GW_OK || !limited)
        return rc;
    gw_limiter_result_t result;
    rc = gw_limiter_admit (self->limiter, &admission.request, &result);
    return s_admit_conclude (self, envelope, &admission, rc, &result, refusal);
}

//  --------------------------------------------------------------------------
//  Actor

//  The stage as gw_stage_actor runs it, alone or co-located.
typedef struct {
    gw_ratelimit_t *stage;  //  owned
    gw_envelope_t *envelope;  //  reused for every request
    gw_stage_t *current;  //  the request being handled: its context
    gw_worker_t *worker;  //  and the session holding it (gw_stage_session)
    struct _s_pending_t **pending;  //  admissions waiting for the turn's flush
    size_t pending_count;
    size_t pending_max;
} s_actor_t;

//  An admission deferred to the flush (the limiter is on Redis: the
//  admissions of one loop turn go in one round trip).
typedef struct _s_pending_t {
    gw_msg_t *request;  //  a copy
    gw_stage_t *stage;  //  its context (gw_stage_dup)
    s_admission_t admission;
} s_pending_t;

static void
s_pending_destroy (s_pending_t **self_p)
{
    s_pending_t *self = *self_p;
    if (self) {
        gw_msg_destroy (&self->request);
        gw_stage_destroy (&self->stage);
        free (self);
        *self_p = NULL;
    }
}

//  FINAL with the envelope (ann.retry_after, ann.headers) and an OpenAI error.
static void
s_final_error (s_actor_t *self, const uint8_t *rid, const gw_ratelimit_refusal_t *refusal)
{
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    msgpack_pack_map (&pk, 1);
    gw_mpack_str (&pk, "error");
    msgpack_pack_map (&pk, 4);
    gw_mpack_str (&pk, "message");
    gw_mpack_str (&pk, refusal->message);
    gw_mpack_str (&pk, "type");
    gw_mpack_str (&pk, refusal->type);
    gw_mpack_str (&pk, "param");
    msgpack_pack_nil (&pk);
    gw_mpack_str (&pk, "code");
    gw_mpack_str (&pk, refusal->code);
    zframe_t *body = zframe_new (sbuf.data, sbuf.size);
    msgpack_sbuffer_destroy (&sbuf);
    zframe_t *envelope = gw_envelope_encode (self->envelope);
    gw_worker_final (self->worker, rid, refusal->status, &envelope, &body);
}

//  One settle/release item, the map value already read from reader: {rid:
//  bin 16 | hex str, tokens, cost, lease_only}; other members (scopes, hold,
//  est_tokens, lease) are in the limiter's own record and skipped. 0, or
//  -1 if it is malformed.
static int
s_settle_item (gw_mreader_t *reader, const gw_mvalue_t *map, uint8_t target[16],
    uint64_t *tokens, uint64_t *cost, bool *lease_only)
{
    gw_mvalue_t key, item;
    bool have_rid = false;
    bool ok = map->type == GW_MP_MAP;
    for (uint32_t i = 0; ok && i < map->v.count; i++) {
        ok = gw_mreader_next (reader, &key) == 0 && key.type == GW_MP_STR &&
            gw_mreader_next (reader, &item) == 0;
        if (!ok)
            break;
        if (gw_mvalue_streq (&key, "rid")) {
            char hex[40];
            if (item.type == GW_MP_BIN && item.size == 16) {
                memcpy (target, item.ptr, 16);
                have_rid = true;
            }
            else if (item.type == GW_MP_STR && item.size < sizeof (hex)) {
                memcpy (hex, item.ptr, item.size);
                hex[item.size] = 0;
                have_rid = gw_rid_parse (hex, target) == 0;
            }
            ok = have_rid;
        }
        else if (gw_mvalue_streq (&key, "tokens") || gw_mvalue_streq (&key, "cost")) {
            ok = item.type == GW_MP_UINT;
            if (ok)
                *(gw_mvalue_streq (&key, "tokens") ? tokens : cost) = item.v.u;
        }
        else if (gw_mvalue_streq (&key, "lease_only") && item.type == GW_MP_BOOL)
            *lease_only = item.v.b;
        else if (item.type == GW_MP_ARRAY || item.type == GW_MP_MAP) {
            uint32_t count = item.type == GW_MP_MAP ? item.v.count * 2 : item.v.count;
            for (uint32_t j = 0; ok && j < count; j++)
                ok = gw_mreader_skip (reader, DEPTH_MAX) == 0;
        }
    }
    return ok && have_rid ? 0 : -1;
}

//  Settle or release (STAGES.md §6.3): body one item {rid, tokens, cost,
//  lease_only, ...}, answered {settled: bool}; or a batch {settles: [item,
//  ...]} (billing sends one per commit) or {releases: [item, ...]} (the edge
//  sends one per turn of its I/O loop), answered {settled: uint, the items
//  that changed something}. A malformed item refuses the whole batch before
//  anything is applied.
static void
s_settle (s_actor_t *self, gw_msg_t *request, bool release)
{
    const uint8_t *rid = gw_msg_rid (request);
    zframe_t *frame = gw_msg_body (request);
    const byte *data = frame ? zframe_data (frame) : NULL;
    size_t size = frame ? zframe_size (frame) : 0;
    gw_mreader_t reader;
    gw_mreader_init (&reader, data, size);
    gw_mvalue_t value, key, item;
    bool ok = gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_MAP;
    //  A batch: the top-level map is exactly {settles: [...]} (settle) or
    //  {releases: [...]} (release).
    bool batch = false;
    uint32_t items = 0;
    if (ok && value.v.count == 1) {
        gw_mreader_t peek = reader;
        batch = gw_mreader_next (&peek, &key) == 0 && key.type == GW_MP_STR &&
            gw_mvalue_streq (&key, release ? "releases" : "settles") &&
            gw_mreader_next (&peek, &item) == 0 && item.type == GW_MP_ARRAY;
        if (batch) {
            reader = peek;
            items = item.v.count;
        }
    }
    //  Validate every item first (a first pass over the same bytes), then
    //  apply: a malformed batch changes nothing.
    gw_mreader_t start = reader;
    uint8_t target[16];
    uint64_t tokens = 0, cost = 0;
    bool lease_only = false;
    for (uint32_t i = 0; ok && i < (batch ? items : 1); i++) {
        gw_mvalue_t map = value;
        if (batch)
            ok = gw_mreader_next (&reader, &map) == 0;
        ok =
            ok && s_settle_item (&reader, &map, target, &tokens, &cost, &lease_only) == 0;
    }
    if (!ok) {
        gw_worker_error (self->worker, rid, 400, "invalid_request_error", "invalid_body",
            "settle/release needs a body {rid: 16 bytes or 32 hex digits, tokens, "
            "cost}, or {settles|releases: [such items]}.");
        return;
    }
    //  Then apply, all items in one call (on Redis: two round trips for
    //  the batch). lease_only (a release from the edge at the FINAL of a
    //  request that reached a backend): the concurrency lease ends now; the
    //  hold waits for billing's settle.
    reader = start;
    size_t count = batch ? items : 1;
    gw_limiter_finish_t *finish =
        (gw_limiter_finish_t *)calloc (count ? count : 1, sizeof (gw_limiter_finish_t));
    int *results = (int *)calloc (count ? count : 1, sizeof (int));
    assert (finish && results);
    for (size_t i = 0; i < count; i++) {
        gw_mvalue_t map = value;
        if (batch)
            gw_mreader_next (&reader, &map);
        lease_only = false;
        s_settle_item (&reader, &map, finish[i].rid, &finish[i].tokens, &finish[i].cost,
            &lease_only);
        finish[i].mode = release && lease_only ? 2 : release ? 1 : 0;
    }
    int changed = gw_limiter_finish (self->stage->limiter, finish, count, results);
    free (finish);
    free (results);
    if (changed < 0) {
        gw_worker_error (self->worker, rid, 503, "api_error", "ratelimit_unavailable",
            "The limit store is unavailable; the hold expires by itself.");
        return;
    }
    zframe_t *body;
    if (batch) {
        byte reply[32] = "\x81\xa7settled";
        size_t used = 9;
        //  uint 64 in msgpack: 0xcf + 8 bytes, big-endian
        reply[used++] = 0xcf;
        for (int shift = 56; shift >= 0; shift -= 8)
            reply[used++] = (byte)((uint64_t)changed >> shift);
        body = zframe_new (reply, used);
    }
    else
        body = zframe_new (changed ? "\x81\xa7settled\xc3" : "\x81\xa7settled\xc2", 10);
    gw_worker_final (self->worker, rid, 200, NULL, &body);
}

//  Hand an admitted request on along its slip.
static void
s_forward (s_actor_t *self, gw_msg_t *request)
{
    const uint8_t *rid = gw_msg_rid (request);
    if (gw_stage_forward (self->current, request, self->envelope) &&
        !gw_worker_cancelled (self->worker, rid))
        gw_worker_error (self->worker, rid, 500, "server_error", "routing_failed",
            "The gateway could not forward this request.");
}

static void
s_handle (s_actor_t *self, gw_msg_t *request)
{
    const uint8_t *rid = gw_msg_rid (request);
    if (gw_stage_envelope (request, self->envelope)) {
        gw_worker_error (self->worker, rid, 400, "invalid_request_error",
            "invalid_envelope", "The request envelope could not be decoded.");
        return;
    }
    const char *op = gw_envelope_ann_str (self->envelope, "op");
    if (op && (streq (op, "settle") || streq (op, "release"))) {
        s_settle (self, request, streq (op, "release"));
        return;
    }
    zframe_t *body = gw_msg_body (request);
    gw_ratelimit_refusal_t refusal;
    s_pending_t *pending = (s_pending_t *)malloc (sizeof (s_pending_t));
    assert (pending);
    bool limited;
    int rc =
        s_admit_prepare (self->stage, self->envelope, body ? zframe_data (body) : NULL,
            body ? zframe_size (body) : 0, &refusal, &pending->admission, &limited);
    if (rc == GW_OK && limited &&
        streq (gw_limiter_backend (self->stage->limiter), "redis")) {
        //  To the flush, with this turn's other admissions.
        if (self->pending_count == self->pending_max) {
            self->pending_max = self->pending_max ? self->pending_max * 2 : 16;
            self->pending = (s_pending_t **)realloc (
                self->pending, self->pending_max * sizeof (s_pending_t *));
            assert (self->pending);
        }
        pending->request = gw_msg_dup (request);
        pending->stage = gw_stage_dup (self->current);
        self->pending[self->pending_count++] = pending;
        return;
    }
    if (rc == GW_OK && limited) {
        gw_limiter_result_t result;
        rc =
            gw_limiter_admit (self->stage->limiter, &pending->admission.request, &result);
        rc = s_admit_conclude (
            self->stage, self->envelope, &pending->admission, rc, &result, &refusal);
    }
    free (pending);
    if (rc != GW_OK)
        s_final_error (self, rid, &refusal);
    else
        s_forward (self, request);
}

//  After the turn: the deferred admissions in one call to the limiter (one
//  Redis round trip), then each answered or forwarded on its own context.
//  A request cancelled meanwhile is dropped; the edge releases what it
//  held.
static void
s_flush (void *state)
{
    s_actor_t *self = (s_actor_t *)state;
    size_t count = self->pending_count;
    if (!count)
        return;
    gw_limiter_request_t *requests =
        (gw_limiter_request_t *)malloc (count * sizeof (gw_limiter_request_t));
    gw_limiter_result_t *results =
        (gw_limiter_result_t *)malloc (count * sizeof (gw_limiter_result_t));
    int *rcs = (int *)malloc (count * sizeof (int));
    assert (requests && results && rcs);
    for (size_t i = 0; i < count; i++)
        requests[i] = self->pending[i]->admission.request;
    gw_limiter_admit_many (self->stage->limiter, requests, count, results, rcs);
    gw_stage_t *outer = self->current;
    gw_worker_t *outer_worker = self->worker;
    for (size_t i = 0; i < count; i++) {
        s_pending_t *pending = self->pending[i];
        self->current = pending->stage;
        self->worker = gw_stage_session (pending->stage);
        const uint8_t *rid = gw_msg_rid (pending->request);
        zframe_t *frame = gw_msg_envelope (pending->request);
        gw_ratelimit_refusal_t refusal;
        if (!gw_worker_cancelled (self->worker, rid)) {
            if (gw_envelope_decode (
                    self->envelope, zframe_data (frame), zframe_size (frame)))
                gw_worker_error (self->worker, rid, 400, "invalid_request_error",
                    "invalid_envelope", "The request envelope could not be decoded.");
            else if (s_admit_conclude (self->stage, self->envelope, &pending->admission,
                         rcs[i], &results[i], &refusal) != GW_OK)
                s_final_error (self, rid, &refusal);
            else
                s_forward (self, pending->request);
        }
        s_pending_destroy (&self->pending[i]);
    }
    self->pending_count = 0;
    self->current = outer;
    self->worker = outer_worker;
    free (requests);
    free (results);
    free (rcs);
}

static void
s_request (void *state, gw_stage_t *stage, gw_msg_t *request)
{
    s_actor_t *self = (s_actor_t *)state;
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
    s_actor_t *self = (s_actor_t *)state;
    if (streq (command, "VERBOSE"))
        self->stage->verbose = true;
    else if (streq (command, "RELOAD"))
        return gw_ratelimit_refresh (self->stage, true, 0) < 0 ? 1 : 0;
    return -1;
}

static void
s_tick (void *state)
{
    gw_ratelimit_refresh (((s_actor_t *)state)->stage, false, CHECK_MS);
}

static void
s_stage_destroy (void **state_p)
{
    s_actor_t *self = (s_actor_t *)*state_p;
    if (self) {
        for (size_t i = 0; i < self->pending_count; i++)
            s_pending_destroy (&self->pending[i]);
        free (self->pending);
        gw_envelope_destroy (&self->envelope);
        gw_ratelimit_destroy (&self->stage);
        free (self);
        *state_p = NULL;
    }
}

static const gw_stage_class_t s_class = {.service = "ratelimit",
    .ready_flags = GW_READY_IDEMPOTENT,
    .request = s_request,
    .command = s_command,
    .tick = s_tick,
    .destroy = s_stage_destroy,
    .flush = s_flush};

void
gw_ratelimit_stage (gw_ratelimit_t *stage, gw_stage_host_t *host)
{
    assert (stage);
    assert (host);
    s_actor_t *self = (s_actor_t *)zmalloc (sizeof (s_actor_t));
    assert (self);
    self->stage = stage;
    self->envelope = gw_envelope_new ();
    gw_stage_host_add (host, &s_class, self);
}

void
gw_ratelimit_actor (zsock_t *pipe, void *args)
{
    assert (args);
    gw_stage_host_t *host = gw_stage_host_new ();
    gw_ratelimit_stage ((gw_ratelimit_t *)args, host);
    gw_stage_actor (pipe, host);
}

//  --------------------------------------------------------------------------
//  Start the ratelimit stage configured from the environment (aigw-ratelimit's
//  variables) and connect it to bus. NULL after logging why.

gw_ratelimit_t *
gw_ratelimit_new_env (void)
{
    gw_limiter_t *limiter = gw_limiter_new_env ();
    if (!limiter) {
        gw_error ("ratelimit: invalid limiter settings (see the log above)");
        return NULL;
    }
    bool redis = streq (gw_limiter_backend (limiter), "redis");
    bool fail_open = gw_limiter_fail_open (limiter);
    gw_ratelimit_t *stage = gw_ratelimit_new (&limiter);
    char error[512];
    if (gw_ratelimit_configure_env (stage, error, sizeof (error))) {
        gw_error ("ratelimit: %s", error);
        gw_ratelimit_destroy (&stage);
        return NULL;
    }
    if (redis)
        gw_info ("ratelimit: counters in Redis, failing %s if it is unavailable",
            fail_open ? "open" : "closed");
    else
        gw_info ("ratelimit: counters in memory (embedded; set REDIS_URL to share them "
                 "between replicas)");

    if (!streq (gw_env ("AIGW_GROUP_MULTIPLIERS", "1"), "0"))
        gw_info ("ratelimit: pricing holds with the prices and group multipliers of %s "
                 "(re-read every %s ms)",
            gw_env ("DATABASE_URL", "var/aigw.db"),
            gw_env ("AIGW_GROUPS_REFRESH_MS", "5000"));
    if (streq (gw_env ("AIGW_ENFORCE_BALANCE", "0"), "1"))
        gw_info ("ratelimit: enforcing user balances from %s every %s ms",
            gw_env ("DATABASE_URL", "var/aigw.db"),
            gw_env ("AIGW_BALANCE_REFRESH_MS", "1000"));
    if (gw_log_enabled (GW_LOG_DEBUG))
        stage->verbose = true;  //  every decision at debug level
    return stage;
}

zactor_t *
gw_ratelimit_launch (const char *bus)
{
    gw_ratelimit_t *stage = gw_ratelimit_new_env ();
    if (!stage)
        return NULL;
    zactor_t *actor = zactor_new (gw_ratelimit_actor, stage);  //  takes stage
    assert (actor);
    gw_actor_configure_int (
        actor, "capacity", gw_env_int ("AIGW_RATELIMIT_CAPACITY", 1024, 1, 65535));
    gw_actor_configure_session (actor);
    return gw_actor_connect (actor, bus, "ratelimit");
}

//  --------------------------------------------------------------------------
//  Self test

#include "gw_broker.h"

static zframe_t *
s_json_frame (const char *json)
{
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    gw_json_limits_t limits = gw_json_limits_default ();
    gw_json_error_t jerror;
    int rc = gw_json_to_msgpack (json, strlen (json), &pk, &limits, &jerror);
    assert (rc == 0);
    zframe_t *frame = zframe_new (sbuf.data, sbuf.size);
    msgpack_sbuffer_destroy (&sbuf);
    return frame;
}

//  Admit one chat (no prompt, max_tokens 100) for user in group (NULL:
//  none) on self directly; returns GW_OK or GW_DONE, the hold in *hold.
static int
s_admit_in (gw_ratelimit_t *self, const char *user, const char *group, uint8_t rid[16],
    gw_ratelimit_refusal_t *refusal, uint64_t *hold)
{
    gw_envelope_t *env = gw_envelope_new ();
    assert (env);
    gw_rid_new (rid);
    gw_envelope_set_rid (env, rid);
    gw_envelope_set_model (env, "m");
    gw_envelope_set_ann_str (env, "op", "chat");
    gw_envelope_set_tenant_str (env, "user", user);
    if (group)
        gw_envelope_set_tenant_str (env, "group", group);
    zframe_t *body = s_json_frame ("{\"messages\":[],\"max_tokens\":100}");
    int rc =
        gw_ratelimit_admit (self, env, zframe_data (body), zframe_size (body), refusal);
    if (hold) {
        size_t size = 0;
        const void *raw = gw_envelope_ann_raw (env, "rl", &size);
        gw_mreader_t reader;
        gw_mvalue_t value;
        *hold = 0;
        gw_mreader_init (&reader, raw, raw ? size : 0);
        if (raw && gw_mreader_find (&reader, "hold") == 0 &&
            gw_mreader_next (&reader, &value) == 0 && value.type == GW_MP_UINT)
            *hold = value.v.u;
    }
    zframe_destroy (&body);
    gw_envelope_destroy (&env);
    return rc;
}

static int
s_admit_user (gw_ratelimit_t *self, const char *user, uint8_t rid[16],
    gw_ratelimit_refusal_t *refusal)
{
    return s_admit_in (self, user, NULL, rid, refusal, NULL);
}

//  Balance enforcement over a SQLite store (docs/LIMITS.md "Balance").
static void
s_balance_test (const char *prices_path)
{
    char db[128], error[256];
    snprintf (db, sizeof (db), "/tmp/aigw-rl-balance-%d.db", getpid ());
    unlink (db);
    gw_store_t *store = gw_store_new (db, error, sizeof (error));
    assert (store);
    assert (gw_store_user_set (store, "rich", "default") == 0);
    assert (gw_store_user_credit (store, "rich", 1000) == 0);
    assert (gw_store_user_set (store, "broke", "default") == 0);
    gw_limiter_t *limiter = gw_limiter_new (NULL);
    gw_ratelimit_t *self = gw_ratelimit_new (&limiter);
    assert (gw_ratelimit_set_prices_file (self, prices_path, error, sizeof (error)) == 0);
    gw_ratelimit_set_balance (self, db, 10);
    gw_ratelimit_refusal_t refusal;
    uint8_t rid[16], rid2[16], rid3[16];
    //  Each chat holds 300 (100 output tokens × 2 µ × 1.5): 3 holds fit 1000.
    assert (s_admit_user (self, "rich", rid, &refusal) == GW_OK);
    assert (s_admit_user (self, "rich", rid2, &refusal) == GW_OK);
    assert (s_admit_user (self, "rich", rid3, &refusal) == GW_OK);
    assert (s_admit_user (self, "rich", rid3, &refusal) == GW_DONE);
    assert (streq (refusal.code, "insufficient_quota") && refusal.retry_after == -1);
    //  Billing commits 100 for rid (balance 900) and settles it: 100 spent
    //  + 600 held of L = 1000 before the refresh; after it L = 900 + 100.
    assert (gw_store_user_credit (store, "rich", -100) == 0);
    assert (gw_limiter_settle (self->limiter, rid, 0, 100) == 1);
    assert (s_admit_user (self, "rich", rid, &refusal) == GW_OK);  //  100 + 900
    assert (s_admit_user (self, "rich", rid, &refusal) == GW_DONE);
    zclock_sleep (20);  //  refresh: B 900, S 100, L 1000; held 900
    assert (s_admit_user (self, "rich", rid, &refusal) == GW_DONE);
    //  A credit reopens it at the next refresh.
    assert (gw_store_user_credit (store, "rich", 300) == 0);
    zclock_sleep (20);
    assert (s_admit_user (self, "rich", rid, &refusal) == GW_OK);
    //  No balance, or no such user: refused at once.
    assert (s_admit_user (self, "broke", rid, &refusal) == GW_DONE);
    assert (streq (refusal.code, "insufficient_quota"));
    assert (s_admit_user (self, "nobody", rid, &refusal) == GW_DONE);
    assert (streq (refusal.code, "insufficient_quota"));
    //  Off by default: no balance, no refusal.
    gw_ratelimit_set_balance (self, NULL, 0);
    assert (s_admit_user (self, "broke", rid, &refusal) == GW_OK);
    gw_ratelimit_destroy (&self);
    //  Store unavailable (a directory): failing closed refuses unseen users.
    limiter = gw_limiter_new (NULL);
    self = gw_ratelimit_new (&limiter);
    gw_ratelimit_set_balance (self, "/proc/aigw-no-such-dir/x.db", 10);
    assert (s_admit_user (self, "rich", rid, &refusal) == GW_DONE);
    assert (streq (refusal.code, "rate_limit_exceeded") && refusal.retry_after == 1);
    gw_limiter_set_fail_open (self->limiter, true);
    assert (s_admit_user (self, "rich", rid, &refusal) == GW_OK);
    gw_ratelimit_destroy (&self);
    gw_store_destroy (&store);
    gw_store_remove (db);
}

static void
s_estimate (gw_ratelimit_t *self, const char *op, const char *model, const char *json,
    gw_ratelimit_estimate_t *estimate)
{
    zframe_t *frame = s_json_frame (json);
    int rc = gw_ratelimit_estimate (
        self, op, model, NULL, zframe_data (frame), zframe_size (frame), estimate);
    assert (rc == 0);
    zframe_destroy (&frame);
}

static void
s_write_file (const char *path, const char *text)
{
    char temp[256];
    snprintf (temp, sizeof (temp), "%s.tmp", path);
    FILE *file = fopen (temp, "wb");
    assert (file);
    fputs (text, file);
    fclose (file);
    int rc = rename (temp, path);
    assert (rc == 0);
}

//  Holds priced with the group multiplier from the store, exactly as
//  billing prices the usage (gw_price_cost): with a multiplier of 3.0 and a
//  budget, the requests in flight can never cost more than the budget.
static void
s_group_test (const char *prices_path, const char *limits_path)
{
    char db[128], error[256];
    snprintf (db, sizeof (db), "/tmp/aigw-rl-groups-%d.db", getpid ());
    gw_store_remove (db);
    gw_store_t *store = gw_store_new (db, error, sizeof (error));
    assert (store);
    assert (gw_store_group_set (store, "vip", 3000) == 0);
    gw_limiter_t *limiter = gw_limiter_new (NULL);
    gw_ratelimit_t *self = gw_ratelimit_new (&limiter);
    s_write_file (prices_path, "{\"m\":{\"input\":1,\"output\":2}}");
    assert (gw_ratelimit_set_prices_file (self, prices_path, error, sizeof (error)) == 0);
    s_write_file (limits_path, "{\"groups\":{\"vip\":{\"budget\":2700}}}");
    assert (gw_ratelimit_set_limits_file (self, limits_path, error, sizeof (error)) == 0);
    gw_ratelimit_set_groups (self, db, 10);

    //  100 output tokens × 2 µ × 1.5 × 3.0 = 900: billing's price of them.
    const gw_price_t *price = (const gw_price_t *)zhashx_lookup (self->prices, "m");
    int64_t billed = 0;
    assert (gw_price_cost (price, 1500, 3000, 0, 100, 0, &billed) == 0 && billed == 900);
    gw_ratelimit_estimate_t estimate;
    zframe_t *body = s_json_frame ("{\"messages\":[],\"max_tokens\":100}");
    assert (gw_ratelimit_estimate (self, "chat", "m", "vip", zframe_data (body),
                zframe_size (body), &estimate) == 0);
    assert (
        estimate.cost == 900 && estimate.group_milli == 3000 && !estimate.group_unknown);
    assert (gw_ratelimit_estimate (self, "chat", "m", "other", zframe_data (body),
                zframe_size (body), &estimate) == 0);
    assert (estimate.cost == 300 && estimate.group_milli == 1000);  //  not in the store

    //  Requests in flight, none settled yet: exactly 2700 / 900 of them are
    //  admitted, so even if each uses every token it reserved, billing's
    //  total is within the budget (holds at 1.0 would have admitted 9).
    uint8_t rids[12][16];
    gw_ratelimit_refusal_t refusal;
    int admitted = 0;
    for (int i = 0; i < 12; i++) {
        uint64_t hold = 0;
        if (s_admit_in (self, "carol", "vip", rids[admitted], &refusal, &hold) == GW_OK) {
            assert (hold == 900);
            admitted++;
        }
        else
            assert (streq (refusal.code, "insufficient_quota"));
    }
    assert (admitted == 3);
    uint64_t total = 0;
    for (int i = 0; i < admitted; i++) {
        assert (gw_limiter_settle (self->limiter, rids[i], 100, (uint64_t)billed) == 1);
        total += (uint64_t)billed;
    }
    assert (total <= 2700);
    assert (s_admit_in (self, "carol", "vip", rids[0], &refusal, NULL) == GW_DONE);

    //  A multiplier changed in the store applies within the refresh.
    assert (gw_store_group_set (store, "vip", 2000) == 0);
    assert (gw_store_group_set (store, "default", 1500) == 0);
    zclock_sleep (20);
    assert (gw_ratelimit_estimate (self, "chat", "m", "vip", zframe_data (body),
                zframe_size (body), &estimate) == 0);
    assert (estimate.cost == 600);
    //  No group: "default", as billing.
    assert (gw_ratelimit_estimate (self, "chat", "m", NULL, zframe_data (body),
                zframe_size (body), &estimate) == 0);
    assert (estimate.cost == 450);

    //  Prices as billing finds them: a model priced only in the store (set
    //  with aigw-admin) is held at that price; the store's price of a model
    //  wins over the file's (billing loads the file into the store and then
    //  prices from the store); a model priced nowhere holds nothing.
    gw_price_t store_price = {0};
    store_price.input = 1000000;  //  $1 per 1M tokens = 1 µ per token
    store_price.output = 4000000;
    store_price.cached_input = 1000000;
    assert (gw_store_price_set (store, "admin-only", &store_price) == 0);
    zclock_sleep (20);
    assert (gw_ratelimit_estimate (self, "chat", "admin-only", NULL, zframe_data (body),
                zframe_size (body), &estimate) == 0);
    assert (estimate.cost == 900);  //  100 × 4 µ × 1.5 × "default" 1.5
    assert (gw_store_price_set (store, "m", &store_price) == 0);
    zclock_sleep (20);
    assert (gw_ratelimit_estimate (self, "chat", "m", NULL, zframe_data (body),
                zframe_size (body), &estimate) == 0);
    assert (estimate.cost == 900);  //  the store's 4 µ, not the file's 2 µ
    assert (gw_ratelimit_estimate (self, "chat", "unpriced", NULL, zframe_data (body),
                zframe_size (body), &estimate) == 0);
    assert (estimate.cost == 0);
    gw_ratelimit_destroy (&self);

    //  Store never readable: a request whose group has a cost limit is
    //  refused when failing closed; one without, and failing open, pass.
    limiter = gw_limiter_new (NULL);
    self = gw_ratelimit_new (&limiter);
    assert (gw_ratelimit_set_prices_file (self, prices_path, error, sizeof (error)) == 0);
    assert (gw_ratelimit_set_limits_file (self, limits_path, error, sizeof (error)) == 0);
    gw_ratelimit_set_groups (self, "/proc/aigw-no-such-dir/x.db", 10);
    uint8_t rid[16];
    assert (s_admit_in (self, "carol", "vip", rid, &refusal, NULL) == GW_DONE);
    assert (streq (refusal.code, "rate_limit_exceeded") && refusal.retry_after == 1);
    assert (s_admit_in (self, "dave", "free", rid, &refusal, NULL) == GW_OK);
    gw_limiter_set_fail_open (self->limiter, true);
    assert (s_admit_in (self, "carol", "vip", rid, &refusal, NULL) == GW_OK);
    gw_ratelimit_destroy (&self);
    zframe_destroy (&body);
    gw_store_destroy (&store);
    gw_store_remove (db);
}

typedef struct {
    gw_client_t *client;  //  the edge's stand-in
    gw_worker_t *next;  //  the fake next stage: answers 200 with the envelope
    int forwarded;  //  requests the next stage saw
} s_rig_t;

//  Send one request (slip ratelimit,next) and wait for its FINAL.
static gw_msg_t *
s_send (s_rig_t *rig, const char *op, const char *key, const char *user, const char *json,
    uint8_t *rid_out)
{
    uint8_t rid[16];
    gw_rid_new (rid);
    if (rid_out)
        memcpy (rid_out, rid, 16);
    gw_envelope_t *env = gw_envelope_new ();
    gw_envelope_set_rid (env, rid);
    gw_envelope_slip_append (env, "ratelimit");
    if (!streq (op, "settle") && !streq (op, "release"))
        gw_envelope_slip_append (env, "next");
    gw_envelope_set_deadline (env, (uint64_t)gw_time_ms () + 8000);
    gw_envelope_set_model (env, "m");
    gw_envelope_set_ann_str (env, "op", op);
    gw_envelope_set_ann_str (env, "ip", "10.0.0.1");
    if (key)
        gw_envelope_set_tenant_str (env, "key", key);
    if (user)
        gw_envelope_set_tenant_str (env, "user", user);
    zframe_t *frame = gw_envelope_encode (env);
    gw_envelope_destroy (&env);
    gw_msg_t *request = gw_msg_new (GW_MSG_REQUEST);
    gw_msg_set_rid (request, rid);
    gw_msg_set_service (request, "ratelimit");
    gw_msg_set_deadline (request, (uint64_t)gw_time_ms () + 8000);
    gw_msg_set_envelope (request, &frame);
    zframe_t *body = s_json_frame (json);
    gw_msg_set_body (request, &body);
    int rc = gw_client_send (rig->client, &request);
    assert (rc == 0);
    int64_t end = gw_mono_ms () + 10000;
    while (gw_mono_ms () < end) {
        gw_msg_t *msg;
        while ((msg = gw_worker_recv (rig->next))) {
            if (gw_msg_id (msg) == GW_MSG_REQUEST) {
                rig->forwarded++;
                zframe_t *echo = zframe_dup (gw_msg_envelope (msg));
                gw_worker_final (rig->next, gw_msg_rid (msg), 200, NULL, &echo);
            }
            gw_msg_destroy (&msg);
        }
        gw_worker_tick (rig->next);
        while ((msg = gw_client_recv (rig->client))) {
            if (gw_msg_id (msg) == GW_MSG_FINAL &&
                memcmp (gw_msg_rid (msg), rid, 16) == 0)
                return msg;
            gw_msg_destroy (&msg);
        }
        gw_client_tick (rig->client);
        zclock_sleep (1);
    }
    assert (false);
    return NULL;
}

//  Text of a string in a msgpack map (one level, or map.key), or "".
static const char *
s_field (const void *data, size_t size, const char *outer, const char *inner, char *out,
    size_t out_size)
{
    gw_mreader_t reader;
    gw_mvalue_t value;
    out[0] = 0;
    gw_mreader_init (&reader, data, size);
    if (gw_mreader_find (&reader, outer) != 0)
        return out;
    if (inner && gw_mreader_find (&reader, inner) != 0)
        return out;
    if (gw_mreader_next (&reader, &value) == 0) {
        if (value.type == GW_MP_STR && value.size < out_size) {
            memcpy (out, value.ptr, value.size);
            out[value.size] = 0;
        }
        else if (value.type == GW_MP_UINT)
            snprintf (out, out_size, "%" PRIu64, value.v.u);
        else if (value.type == GW_MP_BOOL)
            snprintf (out, out_size, "%s", value.v.b ? "true" : "false");
    }
    return out;
}

static void
s_settle_call (s_rig_t *rig, const char *op, const uint8_t *target, uint64_t tokens,
    uint64_t cost, const char *expect)
{
    char rid_hex[33], json[256], text[64];
    gw_rid_hex (target, rid_hex);
    snprintf (json, sizeof (json),
        "{\"rid\":\"%s\",\"scopes\":[\"key:k1\"],\"hold\":309,\"tokens\":%" PRIu64
        ",\"cost\":%" PRIu64 ",\"est_tokens\":106,\"lease\":false}",
        rid_hex, tokens, cost);
    gw_msg_t *reply = s_send (rig, op, NULL, NULL, json, NULL);
    assert (gw_msg_status (reply) == 200);
    zframe_t *body = gw_msg_body (reply);
    assert (streq (s_field (zframe_data (body), zframe_size (body), "settled", NULL, text,
                       sizeof (text)),
        expect));
    gw_msg_destroy (&reply);
}

//  Send a settle/release batch twice: the first answer says expect items
//  changed something, the second (idempotent) none.
static void
s_batch_call (s_rig_t *rig, const char *op, const char *json, const char *expect)
{
    char text[64];
    for (int round = 0; round < 2; round++) {
        gw_msg_t *reply = s_send (rig, op, NULL, NULL, json, NULL);
        assert (gw_msg_status (reply) == 200);
        zframe_t *body = gw_msg_body (reply);
        assert (streq (s_field (zframe_data (body), zframe_size (body), "settled", NULL,
                           text, sizeof (text)),
            round == 0 ? expect : "0"));
        gw_msg_destroy (&reply);
    }
}

void
gw_ratelimit_test (bool verbose)
{
    printf (" * gw_ratelimit: ");
    char error[512], text[256];
    char limits_path[128], prices_path[128];
    snprintf (
        limits_path, sizeof (limits_path), "/tmp/aigw-rl-limits-%d.json", getpid ());
    snprintf (
        prices_path, sizeof (prices_path), "/tmp/aigw-rl-prices-%d.json", getpid ());

    //  Estimates and prices.
    gw_limiter_t *limiter = gw_limiter_new (NULL);
    gw_ratelimit_t *self = gw_ratelimit_new (&limiter);
    assert (self && !limiter);
    s_write_file (prices_path,
        "{\"m\":{\"input\":1,\"output\":\"2.00\",\"cached_input\":0.5,"
        "\"note\":[\"ignored\"]},\"free\":{},\"mini\":{\"input\":0.15}}");
    int rc = gw_ratelimit_set_prices_file (self, prices_path, error, sizeof (error));
    if (rc)
        printf ("%s\n", error);
    assert (rc == 0 && zhashx_size (self->prices) == 3);
    const gw_price_t *mini = (const gw_price_t *)zhashx_lookup (self->prices, "mini");
    assert (mini && mini->input == 150000 && mini->cached_input == 150000);
    const gw_price_t *m = (const gw_price_t *)zhashx_lookup (self->prices, "m");
    assert (m && m->output == 2000000 && m->cached_input == 500000);
    gw_ratelimit_estimate_t estimate;
    const char *chat = "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":"
                       "\"hello world!\"}],\"max_tokens\":100}";
    s_estimate (self, "chat", "m", chat, &estimate);
    assert (estimate.prompt_tokens == 6 && estimate.max_tokens == 100);  //  16 bytes
    assert (estimate.cost == 309);  //  (6 × 1 + 100 × 2) µ/token × 1.5
    s_estimate (self, "chat", "m",
        "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":"
        "\"hi\"},"
        "{\"type\":\"image_url\",\"image_url\":{\"url\":\"data:xxxxxxxxxxxxxxxxxxxxxx\"}}"
        "]}],"
        "\"max_completion_tokens\":10,\"max_tokens\":99,\"n\":3}",
        &estimate);
    //  "user" "text" "hi" "image_url" (the type's value) = 19 bytes; the
    //  image itself is not counted; max_completion_tokens wins, times n.
    assert (estimate.prompt_tokens == 7 && estimate.max_tokens == 30);
    s_estimate (self, "chat", "free", "{\"messages\":[]}", &estimate);
    assert (
        estimate.prompt_tokens == 0 && estimate.max_tokens == 4096 && estimate.cost == 0);
    s_estimate (self, "embeddings", "m", "{\"input\":[\"abc\",\"def\"]}", &estimate);
    assert (
        estimate.prompt_tokens == 2 && estimate.max_tokens == 0 && estimate.cost == 3);
    s_estimate (self, "chat", "unpriced", chat, &estimate);
    assert (estimate.cost == 0);
    assert (
        gw_ratelimit_estimate (self, "chat", "m", NULL, "\x91\x01", 2, &estimate) == -1);
    assert (gw_ratelimit_estimate (self, "chat", "m", NULL, NULL, 0, &estimate) == -1);
    s_duration (600, text, sizeof (text));
    assert (streq (text, "600ms"));
    s_duration (1500, text, sizeof (text));
    assert (streq (text, "1.5s"));
    s_duration (360000, text, sizeof (text));
    assert (streq (text, "6m0s"));
    s_duration (3723004, text, sizeof (text));
    assert (streq (text, "1h2m3.004s"));
    s_scope_name ("model", "a\nb", text, sizeof (text));
    assert (strncmp (text, "model:~", 7) == 0 && strlen (text) == 23);

    //  The limits file: kind defaults under entity overrides.
    gw_limits_t env_key = {0};
    env_key.rpm = 500;
    env_key.tpm = 7;
    gw_ratelimit_set_defaults (self, "key", &env_key);
    s_write_file (limits_path,
        "{\"defaults\":{\"key\":{\"rpm\":2,\"burst\":2},\"ip\":{\"rpm\":1000}},"
        "\"keys\":{\"k-big\":{\"rpm\":1000,\"concurrency\":4}},"
        "\"users\":{\"poor\":{\"budget\":100},\"q\":{\"requests_per_day\":1,"
        "\"tokens_per_month\":9,\"cost_per_hour\":3}}}");
    rc = gw_ratelimit_set_limits_file (self, limits_path, error, sizeof (error));
    if (rc)
        printf ("%s\n", error);
    assert (rc == 0);
    const gw_limits_t *limits = &self->config->defaults[0];
    assert (limits->rpm == 2 && limits->burst == 2 && limits->tpm == 7);  //  env kept
    limits = (const gw_limits_t *)zhashx_lookup (self->config->entries[0], "k-big");
    assert (
        limits && limits->rpm == 1000 && limits->burst == 2 && limits->concurrency == 4);
    limits = (const gw_limits_t *)zhashx_lookup (self->config->entries[1], "q");
    assert (limits && limits->requests[GW_WINDOW_DAY] == 1);
    assert (limits->tokens[GW_WINDOW_MONTH] == 9 && limits->cost[GW_WINDOW_HOUR] == 3);
    assert (self->config->defaults[4].rpm == 1000);
    //  Bad files name the problem and keep the last good limits.
    const char *bad[][2] = {
        {"[]", "must hold a JSON object"},
        {"{\"key\":{}}", "unknown member \"key\""},
        {"{\"defaults\":{\"keys\":{}}}", "defaults.keys: unknown kind"},
        {"{\"users\":{\"a\":{\"rmp\":1}}}", "users.a: unknown field \"rmp\""},
        {"{\"users\":{\"a\":{\"rpm\":-1}}}", "users.a.rpm: must be a whole number"},
        {"{\"users\":{\"a\":{\"rpm\":1.5}}}", "users.a.rpm: must be a whole number"},
        {"{\"users\":{\"a\":7}}", "users.a: must be an object"},
        {"{\"users\":{\"a\":{},\"a\":{}}}", "users.a: listed twice"},
        {"{\"users\":", "invalid JSON"},
    };
    for (size_t i = 0; i < sizeof (bad) / sizeof (bad[0]); i++) {
        s_write_file (limits_path, bad[i][0]);
        rc = gw_ratelimit_set_limits_file (self, limits_path, error, sizeof (error));
        if (verbose || rc == 0 || !strstr (error, bad[i][1]))
            printf ("\n    %s -> %s", bad[i][0], rc ? error : "accepted");
        assert (rc == -1 && strstr (error, bad[i][1]) && strstr (error, limits_path));
        assert (zhashx_lookup (self->config->entries[1], "poor"));
    }
    s_write_file (prices_path, "{\"m\":{\"input\":-1}}");
    assert (
        gw_ratelimit_set_prices_file (self, prices_path, error, sizeof (error)) == -1);
    assert (strstr (error, "m.input"));
    assert (zhashx_lookup (self->prices, "m"));
    s_write_file (prices_path, "{\"m\":{\"input\":1,\"output\":2}}");
    gw_limits_t zero = {0};
    gw_ratelimit_set_defaults (self, "key", &zero);
    s_write_file (limits_path,
        "{\"defaults\":{\"key\":{\"rpm\":2,\"burst\":2}},"
        "\"users\":{\"poor\":{\"budget\":100}}}");
    assert (gw_ratelimit_refresh (self, true, 0) == 1);
    assert (self->config->defaults[0].tpm == 0);

    //  The stage on the bus.
    zactor_t *broker = zactor_new (gw_broker_actor, NULL);
    assert (broker);
    zstr_sendx (broker, "BIND", "tcp://127.0.0.1:*", NULL);
    char *endpoint = zstr_recv (broker);
    assert (endpoint && *endpoint);
    zactor_t *actor = zactor_new (gw_ratelimit_actor, self);
    assert (actor);
    if (verbose)
        zstr_send (actor, "VERBOSE");
    zstr_sendx (actor, "CONFIGURE", "capacity", "0", NULL);
    assert (zsock_wait (actor) == 1);
    zstr_sendx (actor, "CONFIGURE", "capacity", "64", NULL);
    assert (zsock_wait (actor) == 0);
    zstr_sendx (actor, "CONNECT", endpoint, NULL);
    assert (zsock_wait (actor) == 0);
    zstr_send (actor, "RELOAD");
    assert (zsock_wait (actor) == 0);
    s_rig_t rig = {0};
    rig.next = gw_worker_new (endpoint, "next", 16, GW_READY_IDEMPOTENT);
    rig.client = gw_client_new (endpoint);
    assert (rig.next && rig.client);

    //  Admitted: forwarded with ann.rl and the headers.
    uint8_t first[16], second[16];
    gw_msg_t *reply = s_send (&rig, "chat", "k1", "alice", chat, first);
    assert (gw_msg_status (reply) == 200 && rig.forwarded == 1);
    gw_envelope_t *env = gw_envelope_new ();
    zframe_t *echo = gw_msg_body (reply);
    assert (gw_envelope_decode (env, zframe_data (echo), zframe_size (echo)) == 0);
    size_t size = 0;
    const void *raw = gw_envelope_ann_raw (env, "rl", &size);
    assert (raw);
    assert (streq (s_field (raw, size, "hold", NULL, text, sizeof (text)), "309"));
    assert (streq (s_field (raw, size, "est_tokens", NULL, text, sizeof (text)), "106"));
    assert (streq (s_field (raw, size, "lease", NULL, text, sizeof (text)), "false"));
    raw = gw_envelope_ann_raw (env, "headers", &size);
    assert (raw);
    assert (
        streq (s_field (raw, size, "x-ratelimit-limit-requests", NULL, text, 64), "2"));
    assert (streq (
        s_field (raw, size, "x-ratelimit-remaining-requests", NULL, text, 64), "1"));
    assert (
        streq (s_field (raw, size, "x-ratelimit-reset-requests", NULL, text, 64), "30s"));
    assert (!*s_field (raw, size, "x-ratelimit-limit-tokens", NULL, text, 64));
    gw_msg_destroy (&reply);
    reply = s_send (&rig, "chat", "k1", "alice", chat, second);
    assert (gw_msg_status (reply) == 200 && rig.forwarded == 2);
    gw_msg_destroy (&reply);

    //  Over the limit: FINAL 429 with retry_after and the headers.
    reply = s_send (&rig, "chat", "k1", "alice", chat, NULL);
    assert (gw_msg_status (reply) == 429 && rig.forwarded == 2);
    zframe_t *final_env = gw_msg_envelope (reply);
    assert (final_env &&
        gw_envelope_decode (env, zframe_data (final_env), zframe_size (final_env)) == 0);
    assert (gw_envelope_ann_int (env, "retry_after", -1) == 30);
    raw = gw_envelope_ann_raw (env, "headers", &size);
    assert (raw);
    assert (streq (
        s_field (raw, size, "x-ratelimit-remaining-requests", NULL, text, 64), "0"));
    zframe_t *body = gw_msg_body (reply);
    assert (streq (s_field (zframe_data (body), zframe_size (body), "error", "code", text,
                       sizeof (text)),
        "rate_limit_exceeded"));
    assert (streq (s_field (zframe_data (body), zframe_size (body), "error", "type", text,
                       sizeof (text)),
        "rate_limit_error"));
    if (verbose)
        printf ("\n    %s",
            s_field (zframe_data (body), zframe_size (body), "error", "message", text,
                sizeof (text)));
    gw_msg_destroy (&reply);

    //  Settle and release, each idempotent.
    s_settle_call (&rig, "settle", first, 50, 100, "true");
    s_settle_call (&rig, "settle", first, 50, 100, "false");
    s_settle_call (&rig, "release", second, 0, 0, "true");
    s_settle_call (&rig, "release", second, 0, 0, "false");
    reply = s_send (&rig, "settle", NULL, NULL, "{\"rid\":\"nothex\"}", NULL);
    assert (gw_msg_status (reply) == 400);
    gw_msg_destroy (&reply);

    //  A batch of settles (billing sends one per commit): every item
    //  applied, answered with how many changed something; a settled rid in
    //  it is a no-op; one malformed item refuses the batch untouched.
    uint8_t third[16], fourth[16];
    reply = s_send (&rig, "chat", "k5", "carol", chat, third);
    assert (gw_msg_status (reply) == 200);
    gw_msg_destroy (&reply);
    reply = s_send (&rig, "chat", "k6", "carol", chat, fourth);
    assert (gw_msg_status (reply) == 200);
    gw_msg_destroy (&reply);
    char hex3[33], hex4[33], hex1[33], batch[512];
    gw_rid_hex (third, hex3);
    gw_rid_hex (fourth, hex4);
    gw_rid_hex (first, hex1);
    snprintf (batch, sizeof (batch),
        "{\"settles\":[{\"rid\":\"%s\",\"cost\":20},{\"rid\":\"nothex\"}]}", hex3);
    reply = s_send (&rig, "settle", NULL, NULL, batch, NULL);
    assert (gw_msg_status (reply) == 400);
    gw_msg_destroy (&reply);
    snprintf (batch, sizeof (batch),
        "{\"settles\":[{\"rid\":\"%s\",\"tokens\":10,\"cost\":20},"
        "{\"rid\":\"%s\",\"tokens\":1,\"cost\":2,\"lease\":false},"
        "{\"rid\":\"%s\",\"tokens\":50,\"cost\":100}]}",
        hex3, hex4, hex1);
    s_batch_call (&rig, "settle", batch, "2");
    //  The edge's release batch: {releases: [...]} (a {settles: [...]} body
    //  is not a release batch: 400).
    reply = s_send (&rig, "chat", "k7", "carol", chat, third);
    assert (gw_msg_status (reply) == 200);
    gw_msg_destroy (&reply);
    reply = s_send (&rig, "chat", "k8", "carol", chat, fourth);
    assert (gw_msg_status (reply) == 200);
    gw_msg_destroy (&reply);
    gw_rid_hex (third, hex3);
    gw_rid_hex (fourth, hex4);
    snprintf (batch, sizeof (batch),
        "{\"settles\":[{\"rid\":\"%s\",\"lease_only\":false}]}", hex3);
    reply = s_send (&rig, "release", NULL, NULL, batch, NULL);
    assert (gw_msg_status (reply) == 400);
    gw_msg_destroy (&reply);
    snprintf (batch, sizeof (batch),
        "{\"releases\":[{\"rid\":\"%s\",\"lease_only\":false},"
        "{\"rid\":\"%s\",\"lease_only\":false}]}",
        hex3, hex4);
    s_batch_call (&rig, "release", batch, "2");

    //  A budget refusal: insufficient_quota, and no Retry-After.
    reply = s_send (&rig, "chat", "k2", "poor", chat, NULL);
    assert (gw_msg_status (reply) == 429);
    final_env = gw_msg_envelope (reply);
    assert (final_env &&
        gw_envelope_decode (env, zframe_data (final_env), zframe_size (final_env)) == 0);
    assert (gw_envelope_ann_int (env, "retry_after", -1) == -1);
    body = gw_msg_body (reply);
    assert (streq (s_field (zframe_data (body), zframe_size (body), "error", "code", text,
                       sizeof (text)),
        "insufficient_quota"));
    if (verbose)
        printf ("\n    %s",
            s_field (zframe_data (body), zframe_size (body), "error", "message", text,
                sizeof (text)));
    gw_msg_destroy (&reply);

    //  Metadata operations pass without limits (forwarded: 2 chats, the 2
    //  of the settle batch, the 2 of the release batch, this one).
    reply = s_send (&rig, "models", "k1", "alice", "{}", NULL);
    assert (gw_msg_status (reply) == 200 && rig.forwarded == 7);
    gw_msg_destroy (&reply);
    //  A body that is not a map is a 400, not a crash.
    reply = s_send (&rig, "chat", "k3", "alice", "[1]", NULL);
    assert (gw_msg_status (reply) == 400);
    gw_msg_destroy (&reply);

    gw_envelope_destroy (&env);
    gw_client_destroy (&rig.client);
    gw_worker_destroy (&rig.next);
    zactor_destroy (&actor);
    zactor_destroy (&broker);
    zstr_free (&endpoint);
    s_balance_test (prices_path);
    s_group_test (prices_path, limits_path);
    unlink (limits_path);
    unlink (prices_path);
    printf ("OK\n");
}
