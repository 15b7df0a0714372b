//  --------------------------------------------------------------------------
//  gw_envelope — the GWP/1 request envelope (PROTOCOL.md §4).
//
//  Design note. The envelope is small (typically < 300 bytes) and decoded
//  once per stage visit, so the struct holds fixed arrays (no allocation per
//  slip entry or timing); only tenant/annotation values, which may be any
//  msgpack, are heap copies, and those buffers are kept for the next decode
//  into the same envelope (a stage decodes into one envelope per request,
//  so after the first few requests a decode allocates nothing). Decoding uses the bounded reader: any bytes are
//  safe, and on error the envelope is left empty. Unknown keys are skipped,
//  so newer peers can add keys without breaking older ones.

#include "aigw.h"

#define ATTR_KEY_MAX 63

typedef struct {
    char key[ATTR_KEY_MAX + 1];  //  attribute name
    size_t key_size;  //  strlen (key)
    uint8_t *value;  //  raw msgpack value + NUL, in a heap buffer
    size_t size;  //  bytes in value
    size_t cap;  //  bytes allocated at value
} s_attr_t;

typedef struct {
    s_attr_t items[GW_ENVELOPE_ATTRS_MAX];  //  in insertion order
    size_t count;  //  items used
    size_t high;  //  items whose value/cap are defined (buffers kept)
} s_attrs_t;

typedef struct {
    char service[GW_SERVICE_MAX + 1];  //  stage that recorded it
    uint64_t t_in;  //  unix µs the stage received the request
    uint64_t t_out;  //  unix µs it passed it on
} s_timing_t;

struct _gw_envelope_t {
    uint8_t rid[16];  //  request id
    char slip[GW_ENVELOPE_SLIP_MAX][GW_SERVICE_MAX + 1];  //  routing slip
    size_t slip_size;  //  entries used
    size_t cursor;  //  index of current stage
    uint64_t deadline;  //  unix ms, 0 = none
    bool stream;  //  client wants a stream
    char *model;  //  requested model or NULL
    char *trace;  //  trace id or NULL
    s_attrs_t tenant;  //  principal annotations
    s_attrs_t ann;  //  free annotations
    s_timing_t timings[GW_ENVELOPE_TIMINGS_MAX];  //  per-stage timings
    size_t timing_count;  //  entries used
};

//  Set every count and scalar to "empty" (arrays beyond the counts are
//  never read).
static void
s_reset (gw_envelope_t *self)
{
    memset (self->rid, 0, sizeof (self->rid));
    self->slip_size = 0;
    self->cursor = 0;
    self->deadline = 0;
    self->stream = false;
    self->timing_count = 0;
}

gw_envelope_t *
gw_envelope_new (void)
{
    //  The struct is ~12 KB of fixed arrays; only the counts and scalars
    //  need a defined value (s_reset), so it is not zeroed as a whole: that
    //  memset was the largest single cost per request in the edge.
    gw_envelope_t *self = (gw_envelope_t *)malloc (sizeof (gw_envelope_t));
    assert (self);
    self->model = NULL;
    self->trace = NULL;
    self->tenant.count = self->tenant.high = 0;
    self->ann.count = self->ann.high = 0;
    s_reset (self);
    return self;
}

//  Forget the items; their buffers stay for reuse.
static void
s_attrs_clear (s_attrs_t *attrs)
{
    attrs->count = 0;
}

static void
s_attrs_free (s_attrs_t *attrs)
{
    for (size_t i = 0; i < attrs->high; i++)
        free (attrs->items[i].value);
    attrs->count = attrs->high = 0;
}

static void
s_clear (gw_envelope_t *self)
{
    s_attrs_clear (&self->tenant);
    s_attrs_clear (&self->ann);
    free (self->model);
    free (self->trace);
    self->model = NULL;
    self->trace = NULL;
    s_reset (self);
}

void
gw_envelope_destroy (gw_envelope_t **self_p)
{
    assert (self_p);
    if (*self_p) {
        s_clear (*self_p);
        s_attrs_free (&(*self_p)->tenant);
        s_attrs_free (&(*self_p)->ann);
        free (*self_p);
        *self_p = NULL;
    }
}

//  Store key = head + value (head: a msgpack header packed by the caller,
//  or NULL), replacing an item of the same key.
static int
s_attrs_set (s_attrs_t *attrs, const char *key, size_t key_size, const void *head,
    size_t head_size, const void *value, size_t size)
{
    if (key_size == 0 || key_size > ATTR_KEY_MAX || memchr (key, 0, key_size))
        return -1;
    s_attr_t *item = NULL;
    for (size_t i = 0; i < attrs->count && !item; i++)
        if (attrs->items[i].key_size == key_size &&
            memcmp (attrs->items[i].key, key, key_size) == 0)
            item = &attrs->items[i];
    if (!item) {
        if (attrs->count == GW_ENVELOPE_ATTRS_MAX)
            return -1;
        item = &attrs->items[attrs->count];
        if (attrs->count == attrs->high) {
            item->value = NULL;
            item->cap = 0;
            attrs->high++;
        }
        attrs->count++;
        memcpy (item->key, key, key_size);
        item->key[key_size] = 0;
        item->key_size = key_size;
    }
    size_t need = head_size + size + 1;
    const uint8_t *from = (const uint8_t *)value;
    bool inside = item->value && from >= item->value && from < item->value + item->cap;
    if (need > item->cap || inside) {
        //  A new buffer: also when the value is read from this item's own
        //  buffer (set from a pointer gw_envelope_ann_raw returned).
        size_t cap = need < 64 ? 64 : need;
        uint8_t *buffer = (uint8_t *)malloc (cap);
        assert (buffer);
        if (head_size)
            memcpy (buffer, head, head_size);
        if (size)
            memcpy (buffer + head_size, value, size);
        free (item->value);
        item->value = buffer;
        item->cap = cap;
    }
    else {
        if (head_size)
            memcpy (item->value, head, head_size);
        if (size)
            memcpy (item->value + head_size, value, size);
    }
    item->value[head_size + size] = 0;  //  lets s_get_str return strings in place
    item->size = head_size + size;
    return 0;
}

static const s_attr_t *
s_attrs_get (const s_attrs_t *attrs, const char *key)
{
    size_t key_size = strlen (key);
    for (size_t i = 0; i < attrs->count; i++)
        if (attrs->items[i].key_size == key_size &&
            memcmp (attrs->items[i].key, key, key_size) == 0)
            return &attrs->items[i];
    return NULL;
}

//  Decode a map of str -> any into attrs, reader positioned at the map.
static int
s_attrs_decode (s_attrs_t *attrs, gw_mreader_t *reader)
{
    gw_mvalue_t value;
    if (gw_mreader_next (reader, &value) || value.type != GW_MP_MAP ||
        value.v.count > GW_ENVELOPE_ATTRS_MAX)
        return -1;
    for (uint32_t i = 0; i < value.v.count; i++) {
        gw_mvalue_t key;
        if (gw_mreader_next (reader, &key) || key.type != GW_MP_STR)
            return -1;
        const uint8_t *start = reader->pos;
        if (gw_mreader_skip (reader, GW_ENVELOPE_DEPTH_MAX))
            return -1;
        if (s_attrs_set (
                attrs, key.ptr, key.size, NULL, 0, start, (size_t)(reader->pos - start)))
            return -1;
    }
    return 0;
}

static char *
s_strndup_valid (const char *ptr, size_t size, size_t max)
{
    if (size > max || memchr (ptr, 0, size))
        return NULL;
    char *copy = (char *)malloc (size + 1);
    assert (copy);
    memcpy (copy, ptr, size);
    copy[size] = 0;
    return copy;
}

//  Key comparison against a literal: the length test first, then a
//  fixed-size compare (the decoder tests every key against up to 11 names).
#define s_key_is(key, literal)                                                           \
    ((key)->size == sizeof (literal) - 1 &&                                              \
        memcmp ((key)->ptr, literal, sizeof (literal) - 1) == 0)

static int
s_decode (gw_envelope_t *self, gw_mreader_t *reader)
{
    gw_mvalue_t value;
    if (gw_mreader_next (reader, &value) || value.type != GW_MP_MAP)
        return -1;
    uint32_t pairs = value.v.count;
    for (uint32_t i = 0; i < pairs; i++) {
        gw_mvalue_t key;
        if (gw_mreader_next (reader, &key) || key.type != GW_MP_STR)
            return -1;
        if (s_key_is (&key, "v")) {
            if (gw_mreader_next (reader, &value) || value.type != GW_MP_UINT ||
                value.v.u != 1)
                return -1;
        }
        else if (s_key_is (&key, "id")) {
            if (gw_mreader_next (reader, &value) || value.type != GW_MP_BIN ||
                value.size != 16)
                return -1;
            memcpy (self->rid, value.ptr, 16);
        }
        else if (s_key_is (&key, "slip")) {
            if (gw_mreader_next (reader, &value) || value.type != GW_MP_ARRAY ||
                value.v.count > GW_ENVELOPE_SLIP_MAX)
                return -1;
            uint32_t count = value.v.count;
            for (uint32_t s = 0; s < count; s++) {
                if (gw_mreader_next (reader, &value) || value.type != GW_MP_STR ||
                    !gw_msg_service_valid (value.ptr, value.size))
                    return -1;
                memcpy (self->slip[s], value.ptr, value.size);
                self->slip[s][value.size] = 0;
            }
            self->slip_size = count;
        }
        else if (s_key_is (&key, "cur")) {
            if (gw_mreader_next (reader, &value) || value.type != GW_MP_UINT ||
                value.v.u >= GW_ENVELOPE_SLIP_MAX)
                return -1;
            self->cursor = (size_t)value.v.u;
        }
        else if (s_key_is (&key, "dl")) {
            if (gw_mreader_next (reader, &value) || value.type != GW_MP_UINT)
                return -1;
            self->deadline = value.v.u;
        }
        else if (s_key_is (&key, "stream")) {
            if (gw_mreader_next (reader, &value) || value.type != GW_MP_BOOL)
                return -1;
            self->stream = value.v.b;
        }
        else if (s_key_is (&key, "model") || s_key_is (&key, "trace")) {
            bool is_model = key.size == 5 && key.ptr[0] == 'm';
            if (gw_mreader_next (reader, &value) || value.type != GW_MP_STR)
                return -1;
            char *text = s_strndup_valid (value.ptr, value.size, is_model ? 256 : 64);
            if (!text)
                return -1;
            char **field = is_model ? &self->model : &self->trace;
            free (*field);
            *field = text;
        }
        else if (s_key_is (&key, "tenant")) {
            if (s_attrs_decode (&self->tenant, reader))
                return -1;
        }
        else if (s_key_is (&key, "ann")) {
            if (s_attrs_decode (&self->ann, reader))
                return -1;
        }
        else if (s_key_is (&key, "t")) {
            if (gw_mreader_next (reader, &value) || value.type != GW_MP_ARRAY ||
                value.v.count > GW_ENVELOPE_TIMINGS_MAX)
                return -1;
            uint32_t count = value.v.count;
            for (uint32_t t = 0; t < count; t++) {
                gw_mvalue_t name, t_in, t_out;
                if (gw_mreader_next (reader, &value) || value.type != GW_MP_ARRAY ||
                    value.v.count != 3 || gw_mreader_next (reader, &name) ||
                    name.type != GW_MP_STR ||
                    !gw_msg_service_valid (name.ptr, name.size) ||
                    gw_mreader_next (reader, &t_in) || t_in.type != GW_MP_UINT ||
                    gw_mreader_next (reader, &t_out) || t_out.type != GW_MP_UINT)
                    return -1;
                s_timing_t *timing = &self->timings[t];
                memcpy (timing->service, name.ptr, name.size);
                timing->service[name.size] = 0;
                timing->t_in = t_in.v.u;
                timing->t_out = t_out.v.u;
            }
            self->timing_count = count;
        }
        else if (gw_mreader_skip (reader, GW_ENVELOPE_DEPTH_MAX))
            return -1;
    }
    return 0;
}

void
gw_envelope_clear (gw_envelope_t *self)
{
    assert (self);
    s_clear (self);
}

void
gw_envelope_copy (gw_envelope_t *self, gw_envelope_t *source)
{
    assert (self);
    assert (source);
    if (self == source)
        return;
    s_clear (self);
    memcpy (self->rid, source->rid, sizeof (self->rid));
    memcpy (self->slip, source->slip, source->slip_size * sizeof (self->slip[0]));
    self->slip_size = source->slip_size;
    self->cursor = source->cursor;
    self->deadline = source->deadline;
    self->stream = source->stream;
    self->model = source->model ? strdup (source->model) : NULL;
    self->trace = source->trace ? strdup (source->trace) : NULL;
    for (size_t i = 0; i < source->tenant.count; i++) {
        const s_attr_t *item = &source->tenant.items[i];
        s_attrs_set (
            &self->tenant, item->key, item->key_size, NULL, 0, item->value, item->size);
    }
    for (size_t i = 0; i < source->ann.count; i++) {
        const s_attr_t *item = &source->ann.items[i];
        s_attrs_set (
            &self->ann, item->key, item->key_size, NULL, 0, item->value, item->size);
    }
    memcpy (self->timings, source->timings, source->timing_count * sizeof (s_timing_t));
    self->timing_count = source->timing_count;
}

int
gw_envelope_decode (gw_envelope_t *self, const void *data, size_t size)
{
    assert (self);
    s_clear (self);
    if (size > GW_ENVELOPE_MAX)
        return -1;
    gw_mreader_t reader;
    gw_mreader_init (&reader, data, size);
    if (s_decode (self, &reader) || gw_mreader_left (&reader) != 0 ||
        self->cursor > self->slip_size) {
        s_clear (self);
        return -1;
    }
    return 0;
}

//  Append a literal (a key with its msgpack header, written out) in one
//  write.
#define S_RAW(pk, literal)                                                               \
    msgpack_sbuffer_write ((pk)->data, literal, sizeof (literal) - 1)

//  Append a str of size bytes.
static void
s_pack_text (msgpack_packer *pk, const char *text, size_t size)
{
    msgpack_pack_str (pk, size);
    msgpack_pack_str_body (pk, text, size);
}

static void
s_pack_attrs (msgpack_packer *pk, const s_attrs_t *attrs)
{
    msgpack_pack_map (pk, attrs->count);
    for (size_t i = 0; i < attrs->count; i++) {
        s_pack_text (pk, attrs->items[i].key, attrs->items[i].key_size);
        //  Raw msgpack bytes go straight into the buffer.
        msgpack_sbuffer_write (
            pk->data, (const char *)attrs->items[i].value, attrs->items[i].size);
    }
}

//  Every thread encodes into a buffer of its own, kept for its next encode
//  (an envelope is encoded at each hand-off: no allocation of a fresh
//  buffer each time); freed when the thread ends.
static pthread_key_t s_scratch_key;
static pthread_once_t s_scratch_once = PTHREAD_ONCE_INIT;

static void
s_scratch_free (void *buffer)
{
    msgpack_sbuffer_free ((msgpack_sbuffer *)buffer);
}

static void
s_scratch_init (void)
{
    int rc = pthread_key_create (&s_scratch_key, s_scratch_free);
    assert (rc == 0);
}

static msgpack_sbuffer *
s_scratch (void)
{
    pthread_once (&s_scratch_once, s_scratch_init);
    msgpack_sbuffer *buffer = (msgpack_sbuffer *)pthread_getspecific (s_scratch_key);
    if (!buffer) {
        buffer = msgpack_sbuffer_new ();
        assert (buffer);
        pthread_setspecific (s_scratch_key, buffer);
    }
    buffer->size = 0;
    return buffer;
}

zframe_t *
gw_envelope_encode (gw_envelope_t *self)
{
    assert (self);
    msgpack_sbuffer *buffer = s_scratch ();
    msgpack_packer pk;
    msgpack_packer_init (&pk, buffer, msgpack_sbuffer_write);
    static const uint8_t zero[16];
    bool has_rid = memcmp (self->rid, zero, 16) != 0;
    size_t keys = 1 + has_rid + (self->slip_size > 0) * 2 + (self->deadline > 0) +
        self->stream + (self->model != NULL) + (self->trace != NULL) +
        (self->tenant.count > 0) + (self->ann.count > 0) + (self->timing_count > 0);
    msgpack_pack_map (&pk, keys);
    S_RAW (&pk, "\xa1v\x01");
    if (has_rid) {
        S_RAW (&pk, "\xa2id\xc4\x10");
        msgpack_sbuffer_write (buffer, (const char *)self->rid, 16);
    }
    if (self->slip_size > 0) {
        S_RAW (&pk, "\xa4slip");
        msgpack_pack_array (&pk, self->slip_size);
        for (size_t i = 0; i < self->slip_size; i++)
            gw_mpack_str (&pk, self->slip[i]);
        S_RAW (&pk,
            "\xa3"
            "cur");
        msgpack_pack_uint64 (&pk, self->cursor);
    }
    if (self->deadline > 0) {
        S_RAW (&pk,
            "\xa2"
            "dl");
        msgpack_pack_uint64 (&pk, self->deadline);
    }
    if (self->stream)
        S_RAW (&pk, "\xa6stream\xc3");
    if (self->model) {
        S_RAW (&pk, "\xa5model");
        gw_mpack_str (&pk, self->model);
    }
    if (self->trace) {
        S_RAW (&pk, "\xa5trace");
        gw_mpack_str (&pk, self->trace);
    }
    if (self->tenant.count > 0) {
        S_RAW (&pk, "\xa6tenant");
        s_pack_attrs (&pk, &self->tenant);
    }
    if (self->ann.count > 0) {
        S_RAW (&pk,
            "\xa3"
            "ann");
        s_pack_attrs (&pk, &self->ann);
    }
    if (self->timing_count > 0) {
        S_RAW (&pk, "\xa1t");
        msgpack_pack_array (&pk, self->timing_count);
        for (size_t i = 0; i < self->timing_count; i++) {
            msgpack_pack_array (&pk, 3);
            gw_mpack_str (&pk, self->timings[i].service);
            msgpack_pack_uint64 (&pk, self->timings[i].t_in);
            msgpack_pack_uint64 (&pk, self->timings[i].t_out);
        }
    }
    zframe_t *frame = zframe_new (buffer->data, buffer->size);
    if (buffer->alloc > GW_ENVELOPE_MAX) {  //  an outsized one: do not keep it
        free (buffer->data);
        msgpack_sbuffer_init (buffer);
    }
    return frame;
}

const uint8_t *
gw_envelope_rid (gw_envelope_t *self)
{
    return self->rid;
}

void
gw_envelope_set_rid (gw_envelope_t *self, const uint8_t rid[16])
{
    memcpy (self->rid, rid, 16);
}

int
gw_envelope_slip_append (gw_envelope_t *self, const char *service)
{
    size_t size = service ? strlen (service) : 0;
    if (self->slip_size == GW_ENVELOPE_SLIP_MAX || !gw_msg_service_valid (service, size))
        return -1;
    memcpy (self->slip[self->slip_size++], service, size + 1);
    return 0;
}

size_t
gw_envelope_slip_size (gw_envelope_t *self)
{
    return self->slip_size;
}

const char *
gw_envelope_slip (gw_envelope_t *self, size_t index)
{
    return index < self->slip_size ? self->slip[index] : NULL;
}

void
gw_envelope_slip_truncate (gw_envelope_t *self)
{
    if (self->slip_size > self->cursor + 1)
        self->slip_size = self->cursor + 1;
}

size_t
gw_envelope_cursor (gw_envelope_t *self)
{
    return self->cursor;
}

void
gw_envelope_set_cursor (gw_envelope_t *self, size_t cursor)
{
    self->cursor = cursor;
}

const char *
gw_envelope_next (gw_envelope_t *self)
{
    return gw_envelope_slip (self, self->cursor + 1);
}

uint64_t
gw_envelope_deadline (gw_envelope_t *self)
{
    return self->deadline;
}

void
gw_envelope_set_deadline (gw_envelope_t *self, uint64_t deadline_ms)
{
    self->deadline = deadline_ms;
}

bool
gw_envelope_stream (gw_envelope_t *self)
{
    return self->stream;
}

void
gw_envelope_set_stream (gw_envelope_t *self, bool stream)
{
    self->stream = stream;
}

const char *
gw_envelope_model (gw_envelope_t *self)
{
    return self->model;
}

void
gw_envelope_set_model (gw_envelope_t *self, const char *model)
{
    free (self->model);
    self->model = model ? strdup (model) : NULL;
}

const char *
gw_envelope_trace (gw_envelope_t *self)
{
    return self->trace;
}

void
gw_envelope_set_trace (gw_envelope_t *self, const char *trace)
{
    free (self->trace);
    self->trace = trace ? strdup (trace) : NULL;
}

typedef struct {
    uint8_t data[16];
    size_t size;
} s_small_t;

static int
s_small_write (void *data, const char *buf, size_t len)
{
    s_small_t *small = (s_small_t *)data;
    if (len > sizeof (small->data) - small->size)
        return -1;
    memcpy (small->data + small->size, buf, len);
    small->size += len;
    return 0;
}

//  Store one string: the header msgpack_pack_str writes, then its bytes,
//  without an intermediate buffer.
static int
s_set_str (s_attrs_t *attrs, const char *key, const char *value)
{
    if (!value)
        value = "";
    size_t size = strlen (value);
    s_small_t head = {{0}, 0};
    msgpack_packer pk;
    msgpack_packer_init (&pk, &head, s_small_write);
    msgpack_pack_str (&pk, size);
    return s_attrs_set (attrs, key, strlen (key), head.data, head.size, value, size);
}

static int
s_set_int (s_attrs_t *attrs, const char *key, int64_t value)
{
    s_small_t small = {{0}, 0};
    msgpack_packer pk;
    msgpack_packer_init (&pk, &small, s_small_write);
    msgpack_pack_int64 (&pk, value);
    return s_attrs_set (attrs, key, strlen (key), NULL, 0, small.data, small.size);
}

//  A STR value's bytes are the last bytes of its msgpack encoding, and every
//  stored value has a NUL after it (s_attrs_set), so the string can be
//  returned in place.
static const char *
s_get_str (const s_attrs_t *attrs, const char *key)
{
    const s_attr_t *item = s_attrs_get (attrs, key);
    if (!item)
        return NULL;
    gw_mreader_t reader;
    gw_mreader_init (&reader, item->value, item->size);
    gw_mvalue_t value;
    if (gw_mreader_next (&reader, &value) || value.type != GW_MP_STR ||
        memchr (value.ptr, 0, value.size))
        return NULL;
    return value.ptr;
}

static int64_t
s_get_int (const s_attrs_t *attrs, const char *key, int64_t fallback)
{
    const s_attr_t *item = s_attrs_get (attrs, key);
    if (!item)
        return fallback;
    gw_mreader_t reader;
    gw_mreader_init (&reader, item->value, item->size);
    gw_mvalue_t value;
    if (gw_mreader_next (&reader, &value))
        return fallback;
    if (value.type == GW_MP_INT)
        return value.v.i;
    if (value.type == GW_MP_UINT && value.v.u <= INT64_MAX)
        return (int64_t)value.v.u;
    return fallback;
}

int
gw_envelope_set_tenant_str (gw_envelope_t *self, const char *key, const char *value)
{
    return s_set_str (&self->tenant, key, value);
}

int
gw_envelope_set_tenant_int (gw_envelope_t *self, const char *key, int64_t value)
{
    return s_set_int (&self->tenant, key, value);
}

const char *
gw_envelope_tenant_str (gw_envelope_t *self, const char *key)
{
    return s_get_str (&self->tenant, key);
}

int64_t
gw_envelope_tenant_int (gw_envelope_t *self, const char *key, int64_t fallback)
{
    return s_get_int (&self->tenant, key, fallback);
}

int
gw_envelope_set_ann_str (gw_envelope_t *self, const char *key, const char *value)
{
    return s_set_str (&self->ann, key, value);
}

int
gw_envelope_set_ann_int (gw_envelope_t *self, const char *key, int64_t value)
{
    return s_set_int (&self->ann, key, value);
}

int
gw_envelope_set_ann_raw (
    gw_envelope_t *self, const char *key, const void *data, size_t size)
{
    if (gw_mpack_check (data, size, GW_ENVELOPE_DEPTH_MAX, 4096))
        return -1;
    return s_attrs_set (&self->ann, key, strlen (key), NULL, 0, data, size);
}

const char *
gw_envelope_ann_str (gw_envelope_t *self, const char *key)
{
    return s_get_str (&self->ann, key);
}

int64_t
gw_envelope_ann_int (gw_envelope_t *self, const char *key, int64_t fallback)
{
    return s_get_int (&self->ann, key, fallback);
}

const void *
gw_envelope_ann_raw (gw_envelope_t *self, const char *key, size_t *size_p)
{
    const s_attr_t *item = s_attrs_get (&self->ann, key);
    if (!item)
        return NULL;
    if (size_p)
        *size_p = item->size;
    return item->value;
}

int
gw_envelope_remove_ann (gw_envelope_t *self, const char *key)
{
    s_attrs_t *attrs = &self->ann;
    size_t key_size = strlen (key);
    for (size_t i = 0; i < attrs->count; i++) {
        if (attrs->items[i].key_size == key_size &&
            memcmp (attrs->items[i].key, key, key_size) == 0) {
            //  The removed item's buffer moves to the first unused slot.
            s_attr_t removed = attrs->items[i];
            memmove (&attrs->items[i], &attrs->items[i + 1],
                (attrs->count - i - 1) * sizeof (s_attr_t));
            attrs->count--;
            attrs->items[attrs->count] = removed;
            return 0;
        }
    }
    return -1;
}

int
gw_envelope_timing_add (
    gw_envelope_t *self, const char *service, uint64_t t_in_us, uint64_t t_out_us)
{
    size_t size = service ? strlen (service) : 0;
    if (self->timing_count == GW_ENVELOPE_TIMINGS_MAX ||
        !gw_msg_service_valid (service, size))
        return -1;
    s_timing_t *timing = &self->timings[self->timing_count++];
    memcpy (timing->service, service, size + 1);
    timing->t_in = t_in_us;
    timing->t_out = t_out_us;
    return 0;
}

size_t
gw_envelope_timings (gw_envelope_t *self)
{
    return self->timing_count;
}

const char *
gw_envelope_timing (
    gw_envelope_t *self, size_t index, uint64_t *t_in_us, uint64_t *t_out_us)
{
    if (index >= self->timing_count)
        return NULL;
    if (t_in_us)
        *t_in_us = self->timings[index].t_in;
    if (t_out_us)
        *t_out_us = self->timings[index].t_out;
    return self->timings[index].service;
}

//  --------------------------------------------------------------------------
//  Self test

void
gw_envelope_test (bool verbose)
{
    printf (" * gw_envelope: ");
    gw_envelope_t *env = gw_envelope_new ();
    uint8_t rid[16];
    gw_rid_new (rid);
    gw_envelope_set_rid (env, rid);
    assert (gw_envelope_slip_append (env, "auth") == 0);
    assert (gw_envelope_slip_append (env, "ratelimit") == 0);
    assert (gw_envelope_slip_append (env, "router") == 0);
    assert (gw_envelope_slip_append (env, "bad name") == -1);
    assert (streq (gw_envelope_next (env), "ratelimit"));
    gw_envelope_set_deadline (env, 1700000000000ULL);
    gw_envelope_set_stream (env, true);
    gw_envelope_set_model (env, "gpt-4o-mini");
    gw_envelope_set_trace (env, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert (gw_envelope_set_tenant_str (env, "user", "alice") == 0);
    assert (gw_envelope_set_tenant_int (env, "key", 42) == 0);
    assert (gw_envelope_set_tenant_str (env, "user", "bob") == 0);  //  replace
    assert (gw_envelope_set_ann_str (env, "route", "openai-1") == 0);
    assert (gw_envelope_set_ann_int (env, "neg", -5) == 0);
    assert (gw_envelope_set_ann_raw (env, "map", "\x81\xa1k\x01", 4) == 0);
    assert (gw_envelope_set_ann_raw (env, "bad", "\xdd\xff\xff\xff\xff", 5) == -1);
    assert (gw_envelope_timing_add (env, "auth", 10, 20) == 0);

    zframe_t *frame = gw_envelope_encode (env);
    assert (frame);
    if (verbose)
        printf ("(%zu bytes) ", zframe_size (frame));
    gw_envelope_t *copy = gw_envelope_new ();
    assert (gw_envelope_decode (copy, zframe_data (frame), zframe_size (frame)) == 0);
    assert (memcmp (gw_envelope_rid (copy), rid, 16) == 0);
    assert (gw_envelope_slip_size (copy) == 3);
    assert (streq (gw_envelope_slip (copy, 2), "router"));
    assert (gw_envelope_cursor (copy) == 0);
    assert (gw_envelope_deadline (copy) == 1700000000000ULL);
    assert (gw_envelope_stream (copy));
    assert (streq (gw_envelope_model (copy), "gpt-4o-mini"));
    assert (streq (gw_envelope_trace (copy), "4bf92f3577b34da6a3ce929d0e0e4736"));
    assert (streq (gw_envelope_tenant_str (copy, "user"), "bob"));
    assert (streq (gw_envelope_tenant_str (copy, "user"), "bob"));  //  stable
    assert (gw_envelope_tenant_int (copy, "key", 0) == 42);
    assert (gw_envelope_tenant_str (copy, "key") == NULL);
    assert (gw_envelope_tenant_int (copy, "missing", -1) == -1);
    assert (streq (gw_envelope_ann_str (copy, "route"), "openai-1"));
    assert (gw_envelope_ann_int (copy, "neg", 0) == -5);
    size_t size;
    const void *raw = gw_envelope_ann_raw (copy, "map", &size);
    assert (raw && size == 4 && memcmp (raw, "\x81\xa1k\x01", 4) == 0);
    uint64_t t_in = 0, t_out = 0;
    assert (streq (gw_envelope_timing (copy, 0, &t_in, &t_out), "auth"));
    assert (t_in == 10 && t_out == 20);
    assert (gw_envelope_remove_ann (copy, "route") == 0);
    assert (gw_envelope_remove_ann (copy, "route") == -1);
    assert (gw_envelope_ann_str (copy, "route") == NULL);
    assert (gw_envelope_ann_int (copy, "neg", 0) == -5);  //  others kept
    assert (gw_envelope_set_ann_str (copy, "route", "openai-1") == 0);

    //  Cursor moves; re-encoding an envelope decoded from bytes gives the
    //  same bytes.
    gw_envelope_set_cursor (copy, 1);
    assert (streq (gw_envelope_next (copy), "router"));
    gw_envelope_set_cursor (copy, 2);
    assert (gw_envelope_next (copy) == NULL);
    gw_envelope_set_cursor (copy, 0);
    zframe_t *again = gw_envelope_encode (copy);
    //  Same content; "route" moved to the end, so compare decoded values.
    gw_envelope_t *third = gw_envelope_new ();
    assert (gw_envelope_decode (third, zframe_data (again), zframe_size (again)) == 0);
    assert (streq (gw_envelope_ann_str (third, "route"), "openai-1"));
    assert (zframe_size (again) == zframe_size (frame));
    gw_envelope_destroy (&third);
    zframe_destroy (&again);
    //  A copy (gw_envelope_copy, into an envelope that held other values)
    //  encodes to exactly the source's bytes.
    gw_envelope_t *copied = gw_envelope_new ();
    assert (gw_envelope_set_ann_str (copied, "old", "value") == 0);
    gw_envelope_set_model (copied, "old-model");
    gw_envelope_copy (copied, env);
    gw_envelope_copy (copied, copied);  //  a no-op
    zframe_t *copied_frame = gw_envelope_encode (copied);
    assert (zframe_eq (copied_frame, frame));
    assert (gw_envelope_ann_str (copied, "old") == NULL);
    zframe_destroy (&copied_frame);
    gw_envelope_destroy (&copied);
    gw_envelope_set_cursor (copy, 1);
    gw_envelope_slip_truncate (copy);
    assert (gw_envelope_slip_size (copy) == 2);

    //  Unknown keys are skipped.
    const char with_unknown[] = "\x82\xa1v\x01\xa3zzz\x92\x01\xa1x";
    assert (gw_envelope_decode (copy, with_unknown, sizeof (with_unknown) - 1) == 0);
    assert (gw_envelope_slip_size (copy) == 0);

    //  Hostile or wrong inputs are refused and leave the envelope empty.
    struct {
        const char *data;
        size_t size;
    } bad[] = {
        {"", 0}, {"\x90", 1},  //  not a map
        {"\x81\xa1v\x02", 4},  //  version 2
        {"\x81\xa2id\xc4\x03"
         "abc",
            8},  //  short id
        {"\x81\xa4slip\x91\xa3"
         "a b",
            10},  //  invalid service
        {"\x81\xa4slip\xdd\xff\xff\xff\xff", 10},  //  huge count
        {"\x81\xa3"
         "cur\x05",
            6},  //  cursor past the slip
        {"\x81\xa6stream\x01", 9},  //  wrong type
        {"\x81\xa1v\x01\x00", 5},  //  trailing bytes
        {"\x82\xa1v\x01", 4},  //  truncated
        {"\x81\xa6tenant\x81\x01\x02", 11},  //  non-string key
        {"\x81\xa6tenant\x81\xa2k\x00\x01", 13},  //  NUL in a key (fuzz find)
    };
    for (size_t i = 0; i < sizeof (bad) / sizeof (bad[0]); i++) {
        gw_envelope_set_model (copy, "x");
        int rc = gw_envelope_decode (copy, bad[i].data, bad[i].size);
        if (verbose && rc == 0)
            printf ("bad[%zu] accepted ", i);
        assert (rc == -1);
        assert (gw_envelope_model (copy) == NULL);
    }
    //  Depth bound on skipped values.
    uint8_t deep[64];
    deep[0] = 0x81;
    deep[1] = 0xa1;
    deep[2] = 'z';
    for (int i = 3; i < 63; i++)
        deep[i] = 0x91;
    deep[63] = 0x01;
    assert (gw_envelope_decode (copy, deep, sizeof (deep)) == -1);

    //  Value buffers are kept across decodes, removes and sets: values read
    //  back are always the last ones stored, also when a value is set from
    //  a pointer into the envelope itself, and strings of every header size
    //  read back.
    gw_envelope_t *reuse = gw_envelope_new ();
    for (int round = 0; round < 3; round++) {
        assert (
            gw_envelope_decode (reuse, zframe_data (frame), zframe_size (frame)) == 0);
        assert (gw_envelope_set_ann_str (reuse, "a", "first") == 0);
        assert (gw_envelope_set_ann_int (reuse, "b", -5) == 0);
        assert (gw_envelope_set_ann_str (reuse, "c", "third") == 0);
        assert (gw_envelope_remove_ann (reuse, "a") == 0);
        assert (gw_envelope_ann_str (reuse, "a") == NULL);
        assert (gw_envelope_set_ann_str (reuse, "a", "again") == 0);
        assert (streq (gw_envelope_ann_str (reuse, "a"), "again"));
        assert (gw_envelope_ann_int (reuse, "b", 0) == -5);
        assert (
            gw_envelope_set_ann_str (reuse, "c", gw_envelope_ann_str (reuse, "c")) == 0);
        assert (streq (gw_envelope_ann_str (reuse, "c"), "third"));
        size_t raw_size = 0;
        const void *own = gw_envelope_ann_raw (reuse, "c", &raw_size);
        assert (gw_envelope_set_ann_raw (reuse, "c", own, raw_size) == 0);
        assert (streq (gw_envelope_ann_str (reuse, "c"), "third"));
        size_t sizes[] = {70000, 0, 31, 32, 255, 256, 65535, 2000};
        for (size_t i = 0; i < sizeof (sizes) / sizeof (sizes[0]); i++) {
            char *text = (char *)malloc (sizes[i] + 1);
            assert (text);
            memset (text, 'x', sizes[i]);
            text[sizes[i]] = 0;
            assert (gw_envelope_set_ann_str (reuse, "long", text) == 0);
            assert (streq (gw_envelope_ann_str (reuse, "long"), text));
            free (text);
        }
        zframe_t *encoded = gw_envelope_encode (reuse);
        gw_envelope_t *check = gw_envelope_new ();
        assert (gw_envelope_decode (
                    check, zframe_data (encoded), zframe_size (encoded)) == 0);
        assert (streq (gw_envelope_ann_str (check, "a"), "again"));
        assert (strlen (gw_envelope_ann_str (check, "long")) == 2000);
        gw_envelope_destroy (&check);
        zframe_destroy (&encoded);
    }
    gw_envelope_destroy (&reuse);

    zframe_destroy (&frame);
    gw_envelope_destroy (&copy);
    gw_envelope_destroy (&env);
    assert (env == NULL);
    printf ("OK\n");
}
