//  --------------------------------------------------------------------------
//  gw_auth — the auth stage: key store, decision, and actor.
//
//  Design note. Keys are held only as SHA-256 digests in hash tables keyed
//  by the digest's hex form (digests are not secrets, so an ordinary hash
//  lookup is fine); the final comparison of the presented key's digest with
//  the stored one uses CRYPTO_memcmp. Plaintext keys exist only transiently
//  while being hashed (the environment list, the keys file's text) and
//  those buffers are wiped with OPENSSL_cleanse. Two tables: keys from
//  GATEWAY_API_KEYS (fixed for the process) and keys from the keys file
//  (replaced wholesale on each successful reload, so a request sees either
//  the old set or the new one). A failed reload keeps the last good set and
//  logs the error: a half-written file must not lock everyone out. The file
//  is stat()ed at most every interval (500 ms in the actor), so a revoked
//  key is refused within a second. Rates: one SHA-256 of a short key and one
//  hash lookup per request (a few µs); no allocation beyond the envelope's
//  annotation copies. Nothing here asserts on input: envelopes and the keys
//  file are input.
//
//  The SQL store (gw_store, api_keys) is the third source, asked only for a
//  digest that is in neither table. Its answers, found or not, are cached
//  by digest for cache_ms (1 s by default), so a key revoked in SQL is
//  refused within that time and an unknown key costs one query per window.
//  The cache is bounded (CACHE_MAX entries; expired entries are dropped
//  when it fills, and all of them if it is still full). When the store
//  cannot be reached, or a query fails, the connection is dropped and not
//  retried for RETRY_MS; meanwhile a key not in the tables is answered 503
//  (we cannot tell an unknown key from a stored one), and the outage is
//  logged once. A PostgreSQL connect blocks this thread for up to the URL's
//  connect_timeout (5 s by default) once per retry.

#include "aigw.h"
#include "gw_auth.h"
#include "gw_store.h"
#include <openssl/evp.h>
#include <openssl/crypto.h>
#include <sys/stat.h>

#define DIGEST_SIZE 32
#define KEY_BYTES_MAX 4096
#define FILE_MAX (16 * 1024 * 1024)
#define ENTRIES_MAX 1000000
#define PRINCIPAL_MAX 128
#define MODELS_MAX 4096
#define NAME_MAX_ 256
#define CHECK_MS 500  //  keys file stat() interval in the actor
#define CACHE_MAX 100000  //  store lookups cached at most
#define RETRY_MS 1000  //  store reconnect interval after a failure

typedef struct {
    uint8_t digest[DIGEST_SIZE];  //  SHA-256 of the key
    char id[9];  //  first 8 hex digits of digest
    char *user;  //  principal's user
    char *group;  //  principal's group
    char *models;  //  comma-joined allow-list, or NULL = all
    char *name;  //  key's name, or NULL
} s_key_t;

struct _gw_auth_t {
    EVP_MD *sha256;  //  fetched once
    zhashx_t *list_keys;  //  hex digest -> s_key_t, from GATEWAY_API_KEYS
    zhashx_t *file_keys;  //  hex digest -> s_key_t, last good file load
    char *file;  //  keys file path, or NULL
    struct timespec mtime;  //  of the file at the last load attempt
    struct timespec ctime;  //  idem
    off_t file_size;  //  idem
    ino_t inode;  //  idem
    bool stat_failed;  //  the last stat failed (logged once)
    int64_t checked_at;  //  mono ms of the last stat
    bool open;  //  open mode requested
    bool store_enabled;  //  look keys up in the SQL store
    char *store_url;  //  the store's URL, or NULL for the default
    gw_store_t *store;  //  connection, NULL while not open
    int64_t store_retry_at;  //  mono ms before which no reconnect is tried
    bool store_down;  //  in an outage (logged once per outage)
    bool store_has_keys;  //  api_keys held a row once (sticky: open mode off)
    int64_t store_counted_at;  //  mono ms of the last "any keys?" query
    bool store_counted;  //  store_counted_at is valid
    int cache_ms;  //  lifetime of a cached store answer, ms
    zhashx_t *cache;  //  hex digest -> s_cached_t, store answers
};

//  One cached store answer.
typedef struct {
    s_key_t *key;  //  the principal, or NULL: not in the store or revoked
    int64_t expires;  //  mono ms
} s_cached_t;

//  --------------------------------------------------------------------------
//  Keys

static void
s_key_destroy (s_key_t **self_p)
{
    s_key_t *self = *self_p;
    if (self) {
        free (self->user);
        free (self->group);
        free (self->models);
        free (self->name);
        OPENSSL_cleanse (self, sizeof (*self));
        free (self);
        *self_p = NULL;
    }
}

static void
s_cached_destroy (s_cached_t **self_p)
{
    s_cached_t *self = *self_p;
    if (self) {
        s_key_destroy (&self->key);
        free (self);
        *self_p = NULL;
    }
}

static zhashx_t *
s_table_new (void)
{
    zhashx_t *table = zhashx_new ();
    assert (table);
    zhashx_set_destructor (table, (zhashx_destructor_fn *)s_key_destroy);
    return table;
}

static void
s_hex (const uint8_t *data, size_t size, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < size; i++) {
        out[i * 2] = digits[data[i] >> 4];
        out[i * 2 + 1] = digits[data[i] & 15];
    }
    out[size * 2] = 0;
}

static void
s_hash (gw_auth_t *self, const char *key, size_t size, uint8_t digest[DIGEST_SIZE])
{
    unsigned int length = 0;
    int rc = EVP_Digest (key, size, digest, &length, self->sha256, NULL);
    assert (rc == 1 && length == DIGEST_SIZE);
}

static s_key_t *
s_key_new (const uint8_t digest[DIGEST_SIZE])
{
    s_key_t *key = (s_key_t *)zmalloc (sizeof (s_key_t));
    assert (key);
    memcpy (key->digest, digest, DIGEST_SIZE);
    char hex[DIGEST_SIZE * 2 + 1];
    s_hex (digest, DIGEST_SIZE, hex);
    memcpy (key->id, hex, 8);
    key->id[8] = 0;
    return key;
}

//  Insert key into table; returns -1 (key destroyed) if the digest exists.
static int
s_table_insert (zhashx_t *table, s_key_t *key)
{
    char hex[DIGEST_SIZE * 2 + 1];
    s_hex (key->digest, DIGEST_SIZE, hex);
    if (zhashx_insert (table, hex, key)) {
        s_key_destroy (&key);
        return -1;
    }
    return 0;
}

static const s_key_t *
s_lookup (zhashx_t *table, const uint8_t digest[DIGEST_SIZE])
{
    char hex[DIGEST_SIZE * 2 + 1];
    s_hex (digest, DIGEST_SIZE, hex);
    const s_key_t *key = (const s_key_t *)zhashx_lookup (table, hex);
    if (key && CRYPTO_memcmp (key->digest, digest, DIGEST_SIZE) == 0)
        return key;
    return NULL;
}

//  --------------------------------------------------------------------------
//  Class

gw_auth_t *
gw_auth_new (void)
{
    gw_auth_t *self = (gw_auth_t *)zmalloc (sizeof (gw_auth_t));
    assert (self);
    self->sha256 = EVP_MD_fetch (NULL, "SHA256", NULL);
    assert (self->sha256);
    self->list_keys = s_table_new ();
    self->file_keys = s_table_new ();
    self->cache = zhashx_new ();
    assert (self->cache);
    zhashx_set_destructor (self->cache, (zhashx_destructor_fn *)s_cached_destroy);
    self->cache_ms = 1000;
    return self;
}

void
gw_auth_destroy (gw_auth_t **self_p)
{
    assert (self_p);
    gw_auth_t *self = *self_p;
    if (self) {
        zhashx_destroy (&self->list_keys);
        zhashx_destroy (&self->file_keys);
        zhashx_destroy (&self->cache);
        gw_store_destroy (&self->store);
        free (self->store_url);
        EVP_MD_free (self->sha256);
        free (self->file);
        free (self);
        *self_p = NULL;
    }
}

static bool
s_space (char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

int
gw_auth_add_keys (gw_auth_t *self, const char *list)
{
    assert (self);
    for (const char *p = list ? list : ""; *p;) {
        const char *comma = strchr (p, ',');
        const char *end = comma ? comma : p + strlen (p);
        const char *start = p;
        while (start < end && s_space (*start))
            start++;
        const char *stop = end;
        while (stop > start && s_space (stop[-1]))
            stop--;
        if (stop > start) {
            uint8_t digest[DIGEST_SIZE];
            s_hash (self, start, (size_t)(stop - start), digest);
            s_key_t *key = s_key_new (digest);
            key->user = strdup ("default");
            key->group = strdup ("default");
            s_table_insert (self->list_keys, key);  //  a duplicate counts once
            OPENSSL_cleanse (digest, sizeof (digest));
        }
        p = comma ? comma + 1 : end;
    }
    return (int)zhashx_size (self->list_keys);
}

void
gw_auth_set_open (gw_auth_t *self, bool open)
{
    assert (self);
    self->open = open;
}

size_t
gw_auth_size (gw_auth_t *self)
{
    assert (self);
    return zhashx_size (self->list_keys) + zhashx_size (self->file_keys);
}

//  --------------------------------------------------------------------------
//  Keys file

static bool
s_text_valid (const char *text, size_t size, size_t max, bool commas)
{
    if (size == 0 || size > max)
        return false;
    for (size_t i = 0; i < size; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c < 0x20 || c == 0x7f || (!commas && c == ','))
            return false;
    }
    return true;
}

static int
s_unhex (const char *text, size_t size, uint8_t *out)
{
    if (size != DIGEST_SIZE * 2)
        return -1;
    for (size_t i = 0; i < size; i++) {
        int c = tolower ((unsigned char)text[i]);
        int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (v < 0)
            return -1;
        if (i % 2 == 0)
            out[i / 2] = (uint8_t)(v << 4);
        else
            out[i / 2] |= (uint8_t)v;
    }
    return 0;
}

//  Parse one entry at the reader into a new key (or NULL with error).
static s_key_t *
s_parse_entry (
    gw_auth_t *self, gw_mreader_t *reader, uint32_t index, char *error, size_t error_size)
{
    gw_mvalue_t value, field;
    if (gw_mreader_next (reader, &value) || value.type != GW_MP_MAP) {
        gw_fail (error, error_size, "keys[%u]: must be an object", index);
        return NULL;
    }
    uint8_t digest[DIGEST_SIZE];
    bool have_digest = false;
    char *user = NULL, *group = NULL, *name = NULL;
    char *models = NULL;  //  comma-joined
    bool ok = false;
    uint32_t pairs = value.v.count;
    for (uint32_t i = 0; i < pairs; i++) {
        if (gw_mreader_next (reader, &field) || field.type != GW_MP_STR) {
            gw_fail (error, error_size, "keys[%u]: malformed field name", index);
            goto done;
        }
        char key[16] = "";
        if (field.size < sizeof (key))
            memcpy (key, field.ptr, field.size);
        if (streq (key, "models")) {
            if (models || gw_mreader_next (reader, &value) || value.type != GW_MP_ARRAY ||
                value.v.count == 0 || value.v.count > MODELS_MAX) {
                gw_fail (error, error_size,
                    "keys[%u].models: must be a non-empty array of model names (omit it "
                    "to "
                    "allow every model)",
                    index);
                goto done;
            }
            size_t total = 0;
            models = (char *)zmalloc (1);
            assert (models);
            for (uint32_t m = 0; m < value.v.count; m++) {
                gw_mvalue_t item;
                if (gw_mreader_next (reader, &item) || item.type != GW_MP_STR ||
                    !s_text_valid (item.ptr, item.size, NAME_MAX_, false)) {
                    gw_fail (error, error_size,
                        "keys[%u].models[%u]: must be a model name (no commas)", index,
                        m);
                    goto done;
                }
                char *grown = (char *)realloc (models, total + item.size + 2);
                assert (grown);  //  out of memory on a small object: abort
                models = grown;
                if (total)
                    models[total++] = ',';
                memcpy (models + total, item.ptr, item.size);
                total += item.size;
                models[total] = 0;
            }
            continue;
        }
        if (!streq (key, "key") && !streq (key, "sha256") && !streq (key, "user") &&
            !streq (key, "group") && !streq (key, "name")) {
            gw_fail (error, error_size, "keys[%u]: unknown field \"%.*s\"", index,
                (int)(field.size > 40 ? 40 : field.size), field.ptr);
            goto done;
        }
        if (gw_mreader_next (reader, &value) || value.type != GW_MP_STR ||
            memchr (value.ptr, 0, value.size)) {
            gw_fail (error, error_size, "keys[%u].%s: must be a string", index, key);
            goto done;
        }
        if (streq (key, "key") || streq (key, "sha256")) {
            if (have_digest) {
                gw_fail (error, error_size, "keys[%u]: give one of key or sha256, once",
                    index);
                goto done;
            }
            if (streq (key, "key")) {
                if (!s_text_valid (value.ptr, value.size, KEY_BYTES_MAX, true) ||
                    s_space (value.ptr[0]) || s_space (value.ptr[value.size - 1])) {
                    gw_fail (error, error_size,
                        "keys[%u].key: must be 1 to %d bytes, no control characters or "
                        "surrounding spaces",
                        index, KEY_BYTES_MAX);
                    goto done;
                }
                s_hash (self, value.ptr, value.size, digest);
            }
            else if (s_unhex (value.ptr, value.size, digest)) {
                gw_fail (
                    error, error_size, "keys[%u].sha256: must be 64 hex digits", index);
                goto done;
            }
            have_digest = true;
        }
        else if (streq (key, "user") || streq (key, "group") || streq (key, "name")) {
            char **target = streq (key, "user") ? &user
                : streq (key, "group")          ? &group
                                                : &name;
            if (*target || !s_text_valid (value.ptr, value.size, PRINCIPAL_MAX, true)) {
                gw_fail (error, error_size,
                    "keys[%u].%s: must be given once, 1 to %d bytes, no control "
                    "characters",
                    index, key, PRINCIPAL_MAX);
                goto done;
            }
            *target = gw_strndup (value.ptr, value.size);
        }
    }
    if (!have_digest) {
        gw_fail (error, error_size, "keys[%u]: needs \"key\" or \"sha256\"", index);
        goto done;
    }
    ok = true;
done:;
    s_key_t *result = NULL;
    if (ok) {
        result = s_key_new (digest);
        result->user = user ? user : strdup ("default");
        result->group = group ? group : strdup ("default");
        result->models = models;
        result->name = name;
    }
    else {
        free (user);
        free (group);
        free (models);
        free (name);
    }
    OPENSSL_cleanse (digest, sizeof (digest));
    return result;
}

//  Parse the keys file text into a new table, or NULL with error.
static zhashx_t *
s_parse_file (
    gw_auth_t *self, const char *text, size_t size, char *error, size_t error_size)
{
    msgpack_sbuffer sbuf;
    msgpack_sbuffer_init (&sbuf);
    msgpack_packer pk;
    msgpack_packer_init (&pk, &sbuf, msgpack_sbuffer_write);
    gw_json_limits_t limits = gw_json_limits_default ();
    limits.max_size = FILE_MAX;
    limits.max_depth = 8;
    gw_json_error_t jerror;
    zhashx_t *table = NULL;
    if (gw_json_to_msgpack (text, size, &pk, &limits, &jerror)) {
        gw_fail (error, error_size, "invalid JSON at byte %zu: %s", jerror.offset,
            jerror.message);
        goto done;
    }
    gw_mreader_t reader;
    gw_mreader_init (&reader, sbuf.data, sbuf.size);
    gw_mvalue_t value;
    if (gw_mreader_next (&reader, &value) || value.type != GW_MP_ARRAY) {
        gw_fail (error, error_size, "the file must hold a JSON array of keys");
        goto done;
    }
    if (value.v.count > ENTRIES_MAX) {
        gw_fail (error, error_size, "more than %d keys", ENTRIES_MAX);
        goto done;
    }
    table = s_table_new ();
    for (uint32_t i = 0; i < value.v.count; i++) {
        s_key_t *key = s_parse_entry (self, &reader, i, error, error_size);
        if (!key) {
            zhashx_destroy (&table);
            goto done;
        }
        if (s_table_insert (table, key)) {
            gw_fail (error, error_size, "keys[%u]: the same key is listed twice", i);
            zhashx_destroy (&table);
            goto done;
        }
    }
done:
    if (sbuf.data)
        OPENSSL_cleanse (sbuf.data, sbuf.size);
    msgpack_sbuffer_destroy (&sbuf);
    return table;
}

//  Load the keys file (recording its stat first). Returns 0 or -1.
static int
s_load_file (gw_auth_t *self, char *error, size_t error_size)
{
    struct stat info;
    if (stat (self->file, &info))
        return gw_fail (error, error_size, "%s: %s", self->file, strerror (errno));
    self->mtime = info.st_mtim;
    self->ctime = info.st_ctim;
    self->file_size = info.st_size;
    self->inode = info.st_ino;
    FILE *file = fopen (self->file, "rb");
    if (!file)
        return gw_fail (error, error_size, "%s: %s", self->file, strerror (errno));
    char *text = (char *)malloc (FILE_MAX + 1);
    assert (text);
    size_t size = fread (text, 1, FILE_MAX + 1, file);
    bool failed = ferror (file);
    fclose (file);
    int rc = -1;
    char detail[384];
    if (failed)
        gw_fail (error, error_size, "%s: read error", self->file);
    else if (size > FILE_MAX)
        gw_fail (error, error_size, "%s: larger than %d bytes", self->file, FILE_MAX);
    else {
        zhashx_t *table = s_parse_file (self, text, size, detail, sizeof (detail));
        if (table) {
            zhashx_destroy (&self->file_keys);
            self->file_keys = table;
            rc = 0;
        }
        else
            gw_fail (error, error_size, "%s: %s", self->file, detail);
    }
    OPENSSL_cleanse (text, size < FILE_MAX ? size : FILE_MAX);
    free (text);
    return rc;
}

int
gw_auth_set_keys_file (gw_auth_t *self, const char *path, char *error, size_t error_size)
{
    assert (self);
    assert (path);
    free (self->file);
    self->file = strdup (path);
    self->checked_at = gw_mono_ms ();
    return s_load_file (self, error, error_size);
}

int
gw_auth_refresh (gw_auth_t *self, bool force, int interval_ms)
{
    assert (self);
    if (!self->file)
        return 0;
    int64_t now = gw_mono_ms ();
    if (!force && now - self->checked_at < interval_ms)
        return 0;
    self->checked_at = now;
    struct stat info;
    if (stat (self->file, &info)) {
        if (!self->stat_failed)
            gw_error ("auth: keys file %s: %s (keeping the keys last loaded)", self->file,
                strerror (errno));
        self->stat_failed = true;
        return -1;
    }
    self->stat_failed = false;
    bool changed = info.st_mtim.tv_sec != self->mtime.tv_sec ||
        info.st_mtim.tv_nsec != self->mtime.tv_nsec ||
        info.st_ctim.tv_sec != self->ctime.tv_sec ||
        info.st_ctim.tv_nsec != self->ctime.tv_nsec || info.st_size != self->file_size ||
        info.st_ino != self->inode;
    if (!changed && !force)
        return 0;
    char error[512];
    if (s_load_file (self, error, sizeof (error))) {
        gw_error (
            "auth: reloading keys failed: %s (keeping the keys last loaded)", error);
        return -1;
    }
    gw_info ("auth: keys file %s loaded, %zu key(s)", self->file,
        zhashx_size (self->file_keys));
    return 1;
}

//  --------------------------------------------------------------------------
//  SQL store

//  Note a store failure: drop the connection, log once per outage.
static void
s_store_failed (gw_auth_t *self, const char *error)
{
    if (!self->store_down)
        gw_error ("auth: SQL store unavailable: %s (keys from the store get 503 until "
                  "it is back; GATEWAY_API_KEYS and the keys file still work)",
            error);
    self->store_down = true;
    self->store_retry_at = gw_mono_ms () + RETRY_MS;
    gw_store_destroy (&self->store);
}

static void
s_store_ok (gw_auth_t *self)
{
    if (self->store_down)
        gw_info ("auth: SQL store reachable again");
    self->store_down = false;
}

//  Open the store if needed. Returns 0 or -1 (unreachable, or not retried yet).
static int
s_store_ready (gw_auth_t *self)
{
    if (self->store)
        return 0;
    if (self->store_down && gw_mono_ms () < self->store_retry_at)
        return -1;
    char error[512];
    self->store = gw_store_new (self->store_url, error, sizeof (error));
    if (!self->store) {
        s_store_failed (self, error);
        return -1;
    }
    return 0;
}

int
gw_auth_set_store (gw_auth_t *self, const char *url, int cache_ms)
{
    assert (self);
    assert (cache_ms >= 0);
    free (self->store_url);
    self->store_url = url && *url ? strdup (url) : NULL;
    gw_store_destroy (&self->store);
    zhashx_purge (self->cache);
    self->store_enabled = true;
    self->store_down = false;
    self->store_has_keys = false;
    self->store_counted = false;
    self->cache_ms = cache_ms;
    if (s_store_ready (self))
        return -1;
    s_store_ok (self);
    return 0;
}

static void
s_count_key (const gw_key_record_t *key, void *arg)
{
    (*(int *)arg)++;
}

//  Does api_keys hold any row (revoked ones count: revoking every key must
//  not open the gateway)? Returns 1, 0, or -1 (store unavailable). Once
//  true it stays true (rows are never deleted); "no" is cached for cache_ms.
static int
s_store_has_keys (gw_auth_t *self)
{
    if (self->store_has_keys)
        return 1;
    int64_t now = gw_mono_ms ();
    if (self->store_counted && now - self->store_counted_at < self->cache_ms)
        return 0;
    if (s_store_ready (self))
        return -1;
    int count = 0;
    int rc = gw_store_key_each (self->store, s_count_key, &count);
    if (rc < 0) {
        s_store_failed (self, gw_store_error (self->store));
        return -1;
    }
    s_store_ok (self);
    self->store_counted = true;
    self->store_counted_at = now;
    self->store_has_keys = count > 0;
    return self->store_has_keys ? 1 : 0;
}

//  Look the digest up in the store (through the cache). Returns 0 with
//  *found set (NULL: no such active key), or -1 if the store is unavailable.
static int
s_store_lookup (gw_auth_t *self, const uint8_t digest[DIGEST_SIZE], const s_key_t **found)
{
    *found = NULL;
    char hex[DIGEST_SIZE * 2 + 1];
    s_hex (digest, DIGEST_SIZE, hex);
    int64_t now = gw_mono_ms ();
    s_cached_t *cached = (s_cached_t *)zhashx_lookup (self->cache, hex);
    if (cached && now < cached->expires) {
        if (cached->key && CRYPTO_memcmp (cached->key->digest, digest, DIGEST_SIZE) == 0)
            *found = cached->key;
        return 0;
    }
    if (s_store_ready (self))
        return -1;
    gw_key_record_t *record = (gw_key_record_t *)malloc (sizeof (gw_key_record_t));
    assert (record);
    char group[GW_STORE_NAME_MAX + 1] = "default";
    s_key_t *key = NULL;
    int rc = gw_store_key_get (self->store, hex, record);
    if (rc == 0 && record->revoked == 0) {
        int urc =
            gw_store_user_get (self->store, record->user, group, sizeof (group), NULL);
        if (urc == 1 || (urc == 0 && !*group))
            strcpy (group, "default");
        else if (urc < 0)
            rc = urc;
        if (rc == 0) {
            key = s_key_new (digest);
            key->user = strdup (record->user);
            key->group = strdup (group);
            key->models = record->models[0] ? strdup (record->models) : NULL;
            key->name = record->name[0] ? strdup (record->name) : NULL;
        }
    }
    free (record);
    if (rc < 0) {
        s_store_failed (self, gw_store_error (self->store));
        return -1;
    }
    s_store_ok (self);
    if (key)
        self->store_has_keys = true;
    if (zhashx_size (self->cache) >= CACHE_MAX) {
        //  Drop expired answers; if that frees nothing, start over.
        zlistx_t *keys = zhashx_keys (self->cache);
        for (const char *item = (const char *)zlistx_first (keys); item;
             item = (const char *)zlistx_next (keys)) {
            s_cached_t *entry = (s_cached_t *)zhashx_lookup (self->cache, item);
            if (entry && now >= entry->expires)
                zhashx_delete (self->cache, item);
        }
        zlistx_destroy (&keys);
        if (zhashx_size (self->cache) >= CACHE_MAX)
            zhashx_purge (self->cache);
    }
    cached = (s_cached_t *)zmalloc (sizeof (s_cached_t));
    assert (cached);
    cached->key = key;
    cached->expires = now + self->cache_ms;
    zhashx_update (self->cache, hex, cached);
    *found = key;
    return 0;
}

//  --------------------------------------------------------------------------
//  Decision

static bool
s_csv_has (const char *list, const char *name)
{
    size_t size = strlen (name);
    for (const char *p = list; *p;) {
        const char *comma = strchr (p, ',');
        const char *end = comma ? comma : p + strlen (p);
        if ((size_t)(end - p) == size && memcmp (p, name, size) == 0)
            return true;
        p = comma ? comma + 1 : end;
    }
    return false;
}

//  Copy text into out, cut at a UTF-8 boundary.
static int s_refuse (gw_auth_refusal_t *refusal, uint16_t status, const char *type,
    const char *code, const char *format, ...) __attribute__ ((format (printf, 5, 6)));

static int
s_refuse (gw_auth_refusal_t *refusal, uint16_t status, const char *type, const char *code,
    const char *format, ...)
{
    refusal->status = status;
    refusal->type = type;
    refusal->code = code;
    va_list args;
    va_start (args, format);
    vsnprintf (refusal->message, sizeof (refusal->message), format, args);
    va_end (args);
    return GW_DONE;
}

int
gw_auth_check (gw_auth_t *self, gw_envelope_t *envelope, gw_auth_refusal_t *refusal)
{
    assert (self);
    assert (envelope);
    assert (refusal);
    //  The credential: "Bearer <key>" (scheme case-insensitive) or the bare
    //  x-api-key value; surrounding whitespace is not part of the key.
    const char *credential = gw_envelope_ann_str (envelope, "credential");
    bool had_credential = gw_envelope_ann_raw (envelope, "credential", NULL) != NULL;
    const char *start = credential ? credential : "";
    while (s_space (*start))
        start++;
    if (strncasecmp (start, "bearer", 6) == 0 && (start[6] == 0 || s_space (start[6]))) {
        start += 6;
        while (s_space (*start))
            start++;
    }
    size_t size = strlen (start);
    while (size && s_space (start[size - 1]))
        size--;
    uint8_t digest[DIGEST_SIZE];
    char masked[16] = "";
    if (size) {
        s_hash (self, start, size, digest);
        if (size >= 12)
            snprintf (masked, sizeof (masked), "%.3s...%.4s", start, start + size - 4);
        else
            strcpy (masked, "***");
    }
    //  From here on the envelope carries no secret (start and credential
    //  point into the removed value and are not used below).
    if (had_credential)
        gw_envelope_remove_ann (envelope, "credential");

    const s_key_t *key = NULL;
    int rc;
    if (zhashx_size (self->list_keys) == 0 && zhashx_size (self->file_keys) == 0 &&
        self->open && !self->file) {
        //  Open mode, unless the store has (or may have) keys.
        int has = self->store_enabled ? s_store_has_keys (self) : 0;
        if (has < 0) {
            rc = s_refuse (refusal, 503, "server_error", "auth_store_unavailable",
                "The API key store is unavailable; please retry shortly.");
            goto done;
        }
        if (has == 0) {
            gw_envelope_set_tenant_str (envelope, "key", "anonymous");
            gw_envelope_set_tenant_str (envelope, "user", "anonymous");
            gw_envelope_set_tenant_str (envelope, "group", "default");
            rc = GW_OK;
            goto done;
        }
    }
    if (!size) {
        rc = s_refuse (refusal, 401, "invalid_request_error", "missing_api_key",
            "Missing API key. Provide it in an Authorization header using Bearer auth "
            "(Authorization: Bearer YOUR_KEY) or in an x-api-key header.");
        goto done;
    }
    key = s_lookup (self->file_keys, digest);
    if (!key)
        key = s_lookup (self->list_keys, digest);
    if (!key && self->store_enabled && s_store_lookup (self, digest, &key)) {
        rc = s_refuse (refusal, 503, "server_error", "auth_store_unavailable",
            "The API key store is unavailable; please retry shortly.");
        goto done;
    }
    if (!key) {
        rc = s_refuse (refusal, 401, "invalid_request_error", "invalid_api_key",
            "Incorrect API key provided: %s.", masked);
        goto done;
    }
    gw_envelope_set_tenant_str (envelope, "key", key->id);
    gw_envelope_set_tenant_str (envelope, "user", key->user);
    gw_envelope_set_tenant_str (envelope, "group", key->group);
    if (key->name)
        gw_envelope_set_tenant_str (envelope, "key_name", key->name);
    if (key->models) {
        gw_envelope_set_tenant_str (envelope, "models", key->models);
        const char *model = gw_envelope_model (envelope);
        if (model && *model && !s_csv_has (key->models, model)) {
            char shown[208];
            rc = s_refuse (refusal, 403, "invalid_request_error", "model_not_allowed",
                "This API key does not have access to the model `%s`.",
                gw_clip (model, shown, sizeof (shown)));
            goto done;
        }
    }
    rc = GW_OK;
done:
    OPENSSL_cleanse (digest, sizeof (digest));
    OPENSSL_cleanse (masked, sizeof (masked));
    return rc;
}

//  --------------------------------------------------------------------------
//  The stage (run by gw_stage_actor, alone or co-located)

typedef struct {
    gw_auth_t *auth;  //  key store, owned
    gw_envelope_t *envelope;  //  reused for every request
    bool verbose;  //  log decisions
} s_stage_t;

static void
s_request (void *state, gw_stage_t *stage, gw_msg_t *request)
{
    s_stage_t *self = (s_stage_t *)state;
    gw_worker_t *session = gw_stage_session (stage);
    const uint8_t *rid = gw_msg_rid (request);
    if (gw_stage_envelope (request, self->envelope)) {
        gw_worker_error (session, rid, 400, "invalid_request_error", "invalid_envelope",
            "The request envelope could not be decoded.");
        return;
    }
    gw_auth_refusal_t refusal;
    if (gw_auth_check (self->auth, self->envelope, &refusal) != GW_OK) {
        if (self->verbose)
            gw_debug ("auth: refused %u %s", refusal.status, refusal.code);
        gw_worker_error (
            session, rid, refusal.status, refusal.type, refusal.code, refusal.message);
        return;
    }
    if (gw_stage_forward (stage, request, self->envelope) &&
        !gw_worker_cancelled (session, rid))
        gw_worker_error (session, rid, 500, "server_error", "routing_failed",
            "The gateway could not forward this request.");
}

static int
s_command (void *state, const char *command, const char *key, const char *value)
{
    s_stage_t *self = (s_stage_t *)state;
    if (streq (command, "VERBOSE"))
        self->verbose = true;
    else if (streq (command, "RELOAD"))
        return gw_auth_refresh (self->auth, true, 0) < 0 ? 1 : 0;
    return -1;
}

static void
s_tick (void *state)
{
    gw_auth_refresh (((s_stage_t *)state)->auth, false, CHECK_MS);
}

static void
s_stage_destroy (void **state_p)
{
    s_stage_t *self = (s_stage_t *)*state_p;
    if (self) {
        gw_envelope_destroy (&self->envelope);
        gw_auth_destroy (&self->auth);
        free (self);
        *state_p = NULL;
    }
}

static const gw_stage_class_t s_class = {.service = "auth",
    .ready_flags = GW_READY_IDEMPOTENT,
    .request = s_request,
    .command = s_command,
    .tick = s_tick,
    .destroy = s_stage_destroy};

void
gw_auth_stage (gw_auth_t *auth, gw_stage_host_t *host)
{
    assert (auth);
    assert (host);
    s_stage_t *self = (s_stage_t *)zmalloc (sizeof (s_stage_t));
    assert (self);
    self->auth = auth;
    self->envelope = gw_envelope_new ();
    gw_stage_host_add (host, &s_class, self);
}

void
gw_auth_actor (zsock_t *pipe, void *args)
{
    assert (args);
    gw_stage_host_t *host = gw_stage_host_new ();
    gw_auth_stage ((gw_auth_t *)args, host);
    gw_stage_actor (pipe, host);
}

//  --------------------------------------------------------------------------
//  Start the auth stage configured from the environment (aigw-auth's
//  variables) and connect it to bus. NULL after logging why.

gw_auth_t *
gw_auth_new_env (void)
{
    gw_auth_t *auth = gw_auth_new ();
    int listed = gw_auth_add_keys (auth, gw_env ("GATEWAY_API_KEYS", NULL));
    const char *file = gw_env ("AIGW_KEYS_FILE", NULL);
    char error[512];
    if (file && gw_auth_set_keys_file (auth, file, error, sizeof (error))) {
        gw_error ("auth: AIGW_KEYS_FILE %s", error);
        gw_auth_destroy (&auth);
        return NULL;
    }
    bool open = streq (gw_env ("AIGW_AUTH_OPEN", "0"), "1");
    const char *use_store = gw_env ("AIGW_AUTH_STORE", "1");
    if (!streq (use_store, "0") && !streq (use_store, "1")) {
        gw_error ("auth: AIGW_AUTH_STORE must be 0 or 1");
        gw_auth_destroy (&auth);
        return NULL;
    }
    if (streq (use_store, "1")) {
        const char *url = gw_env ("DATABASE_URL", NULL);
        int cache_ms = (int)gw_env_int ("AIGW_AUTH_CACHE_MS", 1000, 0, 60000);
        if (gw_auth_set_store (auth, url, cache_ms) == 0)
            gw_info ("auth: also accepting keys from the SQL store (%s), cached %d ms",
                url ? "DATABASE_URL" : "var/aigw.db", cache_ms);
    }
    if (!listed && !file) {
        if (open)
            gw_warn ("auth: OPEN MODE: no keys configured and AIGW_AUTH_OPEN=1, every "
                     "request passes as user anonymous%s",
                streq (use_store, "1") ? " while the SQL store has no keys" : "");
        else
            gw_warn ("auth: no keys in GATEWAY_API_KEYS or AIGW_KEYS_FILE: only keys in "
                     "the SQL store are accepted, if enabled; set AIGW_AUTH_OPEN=1 for "
                     "an open demo gateway");
    }
    else if (open)
        gw_warn ("auth: AIGW_AUTH_OPEN ignored: keys are configured");
    gw_auth_set_open (auth, open);
    gw_info ("auth: %zu key(s) loaded (%d from GATEWAY_API_KEYS)", gw_auth_size (auth),
        listed);
    return auth;
}

zactor_t *
gw_auth_launch (const char *bus)
{
    gw_auth_t *auth = gw_auth_new_env ();
    if (!auth)
        return NULL;
    zactor_t *actor = zactor_new (gw_auth_actor, auth);  //  takes auth
    assert (actor);
    gw_actor_configure_int (
        actor, "capacity", gw_env_int ("AIGW_AUTH_CAPACITY", 1024, 1, 65535));
    return gw_actor_connect (actor, bus, "auth");
}

//  --------------------------------------------------------------------------
//  Self test

static void
s_write (const char *path, const char *text)
{
    //  Write a new file and rename it over the old one, as editors and
    //  deploy tools do.
    char temp[256];
    snprintf (temp, sizeof (temp), "%s.tmp", path);
    FILE *file = fopen (temp, "wb");
    assert (file);
    fputs (text, file);
    fclose (file);
    int rc = rename (temp, path);
    assert (rc == 0);
}

//  Run a check for credential (NULL = none) and model; returns the outcome.
static int
s_try (gw_auth_t *auth, gw_envelope_t *env, const char *credential, const char *model,
    gw_auth_refusal_t *refusal)
{
    gw_envelope_t *fresh = gw_envelope_new ();
    gw_envelope_slip_append (fresh, "auth");
    if (credential)
        gw_envelope_set_ann_str (fresh, "credential", credential);
    if (model)
        gw_envelope_set_model (fresh, model);
    zframe_t *frame = gw_envelope_encode (fresh);
    gw_envelope_destroy (&fresh);
    int rc = gw_envelope_decode (env, zframe_data (frame), zframe_size (frame));
    assert (rc == 0);
    zframe_destroy (&frame);
    memset (refusal, 0, sizeof (*refusal));
    rc = gw_auth_check (auth, env, refusal);
    assert (gw_envelope_ann_raw (env, "credential", NULL) == NULL);  //  never passed on
    return rc;
}

//  True if no memory the key store owns holds the text.
static bool
s_holds_no (zhashx_t *table, const char *text)
{
    size_t size = strlen (text);
    for (s_key_t *key = (s_key_t *)zhashx_first (table); key;
         key = (s_key_t *)zhashx_next (table)) {
        const char *hex = (const char *)zhashx_cursor (table);
        if (strlen (hex) != DIGEST_SIZE * 2 || memmem (hex, strlen (hex), text, size))
            return false;
        if (memmem (key, sizeof (*key), text, size))
            return false;
        const char *strings[] = {key->user, key->group, key->models, key->name};
        for (size_t i = 0; i < 4; i++)
            if (strings[i] && strstr (strings[i], text))
                return false;
    }
    return true;
}

void
gw_auth_test (bool verbose)
{
    printf (" * gw_auth: ");
    gw_auth_refusal_t refusal;
    gw_envelope_t *env = gw_envelope_new ();
    char error[512];

    //  Keys from GATEWAY_API_KEYS: trimmed, empties ignored, duplicates once,
    //  kept only as digests.
    gw_auth_t *auth = gw_auth_new ();
    assert (gw_auth_add_keys (auth,
                " sk-one-plaintext , ,\tsk-two-plaintext\n,sk-one-plaintext,") == 2);
    assert (gw_auth_size (auth) == 2);
    assert (s_holds_no (auth->list_keys, "sk-one-plaintext"));
    assert (s_holds_no (auth->list_keys, "sk-two-plaintext"));
    assert (memmem (auth, sizeof (*auth), "sk-one", 6) == NULL);

    //  Valid: Bearer, bare (x-api-key), odd spacing and scheme case.
    assert (s_try (auth, env, "Bearer sk-one-plaintext", "m", &refusal) == GW_OK);
    uint8_t digest[DIGEST_SIZE];
    char hex[DIGEST_SIZE * 2 + 1];
    s_hash (auth, "sk-one-plaintext", strlen ("sk-one-plaintext"), digest);
    s_hex (digest, DIGEST_SIZE, hex);
    hex[8] = 0;
    assert (streq (gw_envelope_tenant_str (env, "key"), hex));
    assert (streq (gw_envelope_tenant_str (env, "user"), "default"));
    assert (streq (gw_envelope_tenant_str (env, "group"), "default"));
    assert (gw_envelope_tenant_str (env, "models") == NULL);
    assert (s_try (auth, env, "sk-two-plaintext", "m", &refusal) == GW_OK);
    assert (s_try (auth, env, "  bearer   sk-two-plaintext  ", NULL, &refusal) == GW_OK);

    //  Invalid and missing.
    assert (s_try (auth, env, "Bearer sk-one-plaintexT", "m", &refusal) == GW_DONE);
    assert (refusal.status == 401 && streq (refusal.code, "invalid_api_key"));
    assert (streq (refusal.type, "invalid_request_error"));
    assert (strstr (refusal.message, "Incorrect API key provided"));
    assert (!strstr (refusal.message, "plaintexT"));
    if (verbose)
        printf ("\n    %s", refusal.message);
    assert (s_try (auth, env, NULL, "m", &refusal) == GW_DONE);
    assert (refusal.status == 401 && streq (refusal.code, "missing_api_key"));
    assert (s_try (auth, env, "Bearer ", "m", &refusal) == GW_DONE);
    assert (streq (refusal.code, "missing_api_key"));
    assert (s_try (auth, env, "", "m", &refusal) == GW_DONE);
    assert (streq (refusal.code, "missing_api_key"));
    assert (s_try (auth, env, "Bearer", "m", &refusal) == GW_DONE);
    assert (streq (refusal.code, "missing_api_key"));
    //  A credential that is not a string counts as missing.
    gw_envelope_set_ann_int (env, "credential", 5);
    assert (gw_auth_check (auth, env, &refusal) == GW_DONE);
    assert (streq (refusal.code, "missing_api_key"));

    //  The keys file: principals, allow-list, hashed entries.
    char path[128];
    snprintf (path, sizeof (path), "/tmp/aigw-auth-test-%d.json", getpid ());
    s_hash (auth, "sk-hashed", 9, digest);
    s_hex (digest, DIGEST_SIZE, hex);
    char text[1024];
    snprintf (text, sizeof (text),
        "[{\"key\":\"sk-file-plaintext\",\"user\":\"alice\",\"group\":\"team\","
        "\"models\":[\"gpt-4o\",\"m\"],\"name\":\"ci\"},"
        "{\"sha256\":\"%s\",\"user\":\"bob\"}]",
        hex);
    for (char *p = strstr (text, hex); p && *p != '"'; p++)
        *p = (char)toupper ((unsigned char)*p);  //  hex in either case
    s_write (path, text);
    int rc = gw_auth_set_keys_file (auth, path, error, sizeof (error));
    if (rc)
        printf ("%s\n", error);
    assert (rc == 0 && gw_auth_size (auth) == 4);
    assert (s_holds_no (auth->file_keys, "sk-file-plaintext"));
    assert (s_try (auth, env, "Bearer sk-file-plaintext", "m", &refusal) == GW_OK);
    assert (streq (gw_envelope_tenant_str (env, "user"), "alice"));
    assert (streq (gw_envelope_tenant_str (env, "group"), "team"));
    assert (streq (gw_envelope_tenant_str (env, "models"), "gpt-4o,m"));
    assert (streq (gw_envelope_tenant_str (env, "key_name"), "ci"));
    assert (s_try (auth, env, "Bearer sk-file-plaintext", NULL, &refusal) == GW_OK);
    assert (s_try (auth, env, "Bearer sk-file-plaintext", "gpt-4", &refusal) == GW_DONE);
    assert (refusal.status == 403 && streq (refusal.code, "model_not_allowed"));
    assert (strstr (refusal.message, "`gpt-4`"));
    assert (s_try (auth, env, "sk-hashed", "anything", &refusal) == GW_OK);
    assert (streq (gw_envelope_tenant_str (env, "user"), "bob"));
    assert (streq (gw_envelope_tenant_str (env, "group"), "default"));

    //  Revocation: rewrite the file without alice; refused within a second
    //  by the periodic check alone.
    assert (gw_auth_refresh (auth, false, CHECK_MS) == 0);  //  unchanged
    snprintf (text, sizeof (text), "[{\"sha256\":\"%s\",\"user\":\"bob\"}]", hex);
    s_write (path, text);
    int64_t start = gw_mono_ms ();
    while (s_try (auth, env, "Bearer sk-file-plaintext", "m", &refusal) == GW_OK) {
        assert (gw_mono_ms () - start < 1000);
        zclock_sleep (20);
        gw_auth_refresh (auth, false, CHECK_MS);
    }
    if (verbose)
        printf ("\n    revoked key refused after %" PRId64 " ms", gw_mono_ms () - start);
    assert (gw_mono_ms () - start < 1000);
    assert (refusal.status == 401);
    assert (s_try (auth, env, "sk-hashed", "m", &refusal) == GW_OK);
    assert (s_try (auth, env, "sk-one-plaintext", "m", &refusal) ==
        GW_OK);  //  list keys stay

    //  A broken file keeps the last good keys.
    s_write (path, "[{\"sha256\":\"nothex\"}]");
    assert (gw_auth_refresh (auth, true, 0) == -1);
    assert (s_try (auth, env, "sk-hashed", "m", &refusal) == GW_OK);
    gw_auth_destroy (&auth);

    //  Bad keys files: errors name the entry and field.
    const char *bad[][2] = {
        {"{}", "must hold a JSON array"},
        {"[{\"key\":\"a\"},", "invalid JSON"},
        {"[7]", "keys[0]: must be an object"},
        {"[{\"user\":\"x\"}]", "keys[0]: needs \"key\" or \"sha256\""},
        {"[{\"key\":\"a\",\"sha256\":\"00\"}]", "keys[0]"},
        {"[{\"sha256\":\"abc\"}]", "keys[0].sha256: must be 64 hex digits"},
        {"[{\"key\":\"a\"},{\"key\":\"\"}]", "keys[1].key"},
        {"[{\"key\":\"a\",\"models\":[]}]", "keys[0].models"},
        {"[{\"key\":\"a\",\"models\":[\"x,y\"]}]", "keys[0].models[0]"},
        {"[{\"key\":\"a\",\"user\":7}]", "keys[0].user: must be a string"},
        {"[{\"key\":\"a\",\"usr\":\"x\"}]", "keys[0]: unknown field \"usr\""},
        {"[{\"key\":\"a\"},{\"key\":\"a\"}]", "keys[1]: the same key is listed twice"},
    };
    for (size_t i = 0; i < sizeof (bad) / sizeof (bad[0]); i++) {
        auth = gw_auth_new ();
        s_write (path, bad[i][0]);
        rc = gw_auth_set_keys_file (auth, path, error, sizeof (error));
        if (verbose || rc == 0 || !strstr (error, bad[i][1]))
            printf ("\n    %s -> %s", bad[i][0], rc ? error : "accepted");
        assert (rc == -1 && strstr (error, bad[i][1]) && strstr (error, path));
        assert (gw_auth_size (auth) == 0);
        //  A keys file, even a broken one, means open mode never applies.
        gw_auth_set_open (auth, true);
        assert (s_try (auth, env, "whatever", "m", &refusal) == GW_DONE);
        gw_auth_destroy (&auth);
    }
    auth = gw_auth_new ();
    assert (gw_auth_set_keys_file (
                auth, "/nonexistent/keys.json", error, sizeof (error)) == -1);
    assert (strstr (error, "/nonexistent/keys.json"));
    gw_auth_destroy (&auth);
    unlink (path);

    //  No keys at all: refused by default, open mode lets everyone in.
    auth = gw_auth_new ();
    assert (s_try (auth, env, "Bearer x", "m", &refusal) == GW_DONE);
    assert (refusal.status == 401 && streq (refusal.code, "invalid_api_key"));
    assert (s_try (auth, env, NULL, "m", &refusal) == GW_DONE);
    gw_auth_set_open (auth, true);
    assert (s_try (auth, env, NULL, "m", &refusal) == GW_OK);
    assert (streq (gw_envelope_tenant_str (env, "user"), "anonymous"));
    assert (s_try (auth, env, "Bearer anything", "m", &refusal) == GW_OK);
    //  ... but not once keys exist.
    gw_auth_add_keys (auth, "sk-real");
    assert (s_try (auth, env, "Bearer anything", "m", &refusal) == GW_DONE);
    assert (s_try (auth, env, "Bearer sk-real", "m", &refusal) == GW_OK);

    //  The actor: RELOAD with no file succeeds; ends on $TERM.
    zactor_t *actor = zactor_new (gw_auth_actor, auth);
    assert (actor);
    zstr_send (actor, "RELOAD");
    assert (zsock_wait (actor) == 0);
    zstr_sendx (actor, "CONFIGURE", "capacity", "0", NULL);
    assert (zsock_wait (actor) == 1);
    zstr_sendx (actor, "CONFIGURE", "capacity", "64", NULL);
    assert (zsock_wait (actor) == 0);
    zactor_destroy (&actor);

    //  Keys in the SQL store (a temporary SQLite file).
    char db[256], url[300];
    snprintf (db, sizeof (db), "/tmp/aigw-auth-test-%d.db", getpid ());
    snprintf (url, sizeof (url), "sqlite://%s", db);
    gw_store_t *store = gw_store_new (url, error, sizeof (error));
    if (!store)
        printf ("%s\n", error);
    assert (store);
    assert (gw_store_group_set (store, "team", 1000) == 0);
    assert (gw_store_user_set (store, "alice", "team") == 0);
    auth = gw_auth_new ();
    s_hash (auth, "sk-aigw-stored-alice", 20, digest);
    s_hex (digest, DIGEST_SIZE, hex);
    assert (gw_store_key_add (store, hex, "laptop", "alice", "gpt-4o,m") == 0);
    char key_id[9];
    memcpy (key_id, hex, 8);
    key_id[8] = 0;
    gw_auth_add_keys (auth, "sk-env-key");
    assert (gw_auth_set_store (auth, url, 300) == 0);
    assert (s_try (auth, env, "Bearer sk-aigw-stored-alice", "m", &refusal) == GW_OK);
    assert (streq (gw_envelope_tenant_str (env, "key"), key_id));
    assert (streq (gw_envelope_tenant_str (env, "user"), "alice"));
    assert (streq (gw_envelope_tenant_str (env, "group"), "team"));
    assert (streq (gw_envelope_tenant_str (env, "models"), "gpt-4o,m"));
    assert (streq (gw_envelope_tenant_str (env, "key_name"), "laptop"));
    assert (s_try (auth, env, "sk-aigw-stored-alice", "gpt-4", &refusal) == GW_DONE);
    assert (refusal.status == 403);
    assert (s_try (auth, env, "sk-aigw-unknown", "m", &refusal) == GW_DONE);
    assert (refusal.status == 401 && streq (refusal.code, "invalid_api_key"));
    assert (s_try (auth, env, "sk-env-key", "m", &refusal) == GW_OK);
    assert (streq (gw_envelope_tenant_str (env, "user"), "default"));
    //  A key added after a negative answer is found once that answer expires.
    s_hash (auth, "sk-aigw-later", 13, digest);
    char later[DIGEST_SIZE * 2 + 1];
    s_hex (digest, DIGEST_SIZE, later);
    assert (s_try (auth, env, "sk-aigw-later", "m", &refusal) == GW_DONE);
    assert (gw_store_key_add (store, later, NULL, "alice", NULL) == 0);
    start = gw_mono_ms ();
    while (s_try (auth, env, "sk-aigw-later", "m", &refusal) != GW_OK) {
        assert (refusal.status == 401 && gw_mono_ms () - start < 1000);
        zclock_sleep (20);
    }
    assert (gw_envelope_tenant_str (env, "models") == NULL);
    assert (gw_envelope_tenant_str (env, "key_name") == NULL);
    //  Revoked in SQL: refused within the cache window.
    assert (s_try (auth, env, "Bearer sk-aigw-stored-alice", "m", &refusal) == GW_OK);
    assert (gw_store_key_revoke (store, hex) == 0);
    start = gw_mono_ms ();
    while (s_try (auth, env, "sk-aigw-stored-alice", "m", &refusal) == GW_OK) {
        assert (gw_mono_ms () - start < 1000);
        zclock_sleep (20);
    }
    if (verbose)
        printf ("\n    key revoked in SQL refused after %" PRId64 " ms",
            gw_mono_ms () - start);
    assert (refusal.status == 401 && streq (refusal.code, "invalid_api_key"));
    gw_auth_destroy (&auth);

    //  Open mode never applies while the store holds a key (even revoked).
    auth = gw_auth_new ();
    gw_auth_set_open (auth, true);
    assert (gw_auth_set_store (auth, url, 300) == 0);
    assert (s_try (auth, env, "Bearer anything", "m", &refusal) == GW_DONE);
    assert (refusal.status == 401);
    assert (s_try (auth, env, "sk-aigw-later", "m", &refusal) == GW_OK);
    assert (streq (gw_envelope_tenant_str (env, "user"), "alice"));
    gw_auth_destroy (&auth);
    gw_store_destroy (&store);
    gw_store_remove (db);

    //  An empty store leaves open mode on; AIGW_AUTH_STORE=0 is no store.
    snprintf (db, sizeof (db), "/tmp/aigw-auth-test-%d-empty.db", getpid ());
    auth = gw_auth_new ();
    gw_auth_set_open (auth, true);
    assert (gw_auth_set_store (auth, db, 300) == 0);
    assert (s_try (auth, env, NULL, "m", &refusal) == GW_OK);
    assert (streq (gw_envelope_tenant_str (env, "user"), "anonymous"));
    gw_auth_destroy (&auth);
    gw_store_remove (db);

    //  Store down (its folder cannot be created): keys from the list still
    //  pass, every other key gets 503, open mode is off.
    snprintf (path, sizeof (path), "/tmp/aigw-auth-test-%d.file", getpid ());
    s_write (path, "not a folder");
    snprintf (db, sizeof (db), "%s/aigw.db", path);
    auth = gw_auth_new ();
    gw_auth_add_keys (auth, "sk-env-key");
    assert (gw_auth_set_store (auth, db, 300) == -1);
    assert (s_try (auth, env, "sk-env-key", "m", &refusal) == GW_OK);
    assert (s_try (auth, env, "sk-aigw-stored-alice", "m", &refusal) == GW_DONE);
    assert (refusal.status == 503 && streq (refusal.code, "auth_store_unavailable"));
    assert (streq (refusal.type, "server_error"));
    assert (s_try (auth, env, "sk-aigw-unknown", "m", &refusal) == GW_DONE);
    assert (refusal.status == 503);
    assert (s_try (auth, env, NULL, "m", &refusal) == GW_DONE);
    assert (refusal.status == 401);  //  no credential: nothing to look up
    gw_auth_destroy (&auth);
    auth = gw_auth_new ();
    gw_auth_set_open (auth, true);
    assert (gw_auth_set_store (auth, db, 300) == -1);
    assert (s_try (auth, env, NULL, "m", &refusal) == GW_DONE);
    assert (refusal.status == 503);
    gw_auth_destroy (&auth);
    unlink (path);

    //  Random envelopes never crash the check.
    auth = gw_auth_new ();
    gw_auth_add_keys (auth, "k");
    for (int round = 0; round < 500; round++) {
        uint8_t noise[48];
        gw_rid_new (noise);
        gw_rid_new (noise + 16);
        gw_rid_new (noise + 32);
        noise[0] = 0x82;  //  a map, so some decode
        if (gw_envelope_decode (env, noise, (size_t)(round % 48)) == 0)
            gw_auth_check (auth, env, &refusal);
    }
    gw_auth_destroy (&auth);
    gw_envelope_destroy (&env);
    printf ("OK\n");
}
