//  --------------------------------------------------------------------------
//  gw_envelope — the request envelope (PROTOCOL.md §4): request id, routing
//  slip and cursor, deadline, stream flag, model, trace id, tenant and free
//  annotations, per-stage timings. Encoded as a msgpack map; decoded with the
//  bounded reader, so any bytes are safe to decode.
//
//  Tenant and annotation values are kept as raw msgpack (any type); helpers
//  read and write strings and integers.

#ifndef GW_ENVELOPE_H_INCLUDED
#define GW_ENVELOPE_H_INCLUDED

#include <czmq.h>
#include <stdint.h>
#include <stdbool.h>

typedef struct _gw_envelope_t gw_envelope_t;

#define GW_ENVELOPE_SLIP_MAX 16
#define GW_ENVELOPE_TIMINGS_MAX 32
#define GW_ENVELOPE_ATTRS_MAX 32
#define GW_ENVELOPE_DEPTH_MAX 8

//  Create an empty envelope (version 1, nothing set).
gw_envelope_t *gw_envelope_new (void);

//  Destroy; nulls the caller's reference.
void gw_envelope_destroy (gw_envelope_t **self_p);

//  Empty it (as new), keeping its buffers for the next use: building an
//  envelope per request in a reused one allocates nothing.
void gw_envelope_clear (gw_envelope_t *self);

//  Replace the contents with a copy of source's (no encoding, no parsing;
//  buffers reused as by a decode).
void gw_envelope_copy (gw_envelope_t *self, gw_envelope_t *source);

//  Replace the contents with the decoded bytes. Returns 0, or -1 if the bytes
//  are not a valid version 1 envelope (malformed msgpack, wrong types, limits
//  exceeded); the envelope is then empty. Unknown keys are ignored.
int gw_envelope_decode (gw_envelope_t *self, const void *data, size_t size);

//  Encode into a new frame (caller owns it).
zframe_t *gw_envelope_encode (gw_envelope_t *self);

//  Request id (zero until set)
const uint8_t *gw_envelope_rid (gw_envelope_t *self);
void gw_envelope_set_rid (gw_envelope_t *self, const uint8_t rid[16]);

//  Routing slip. Append returns -1 if the slip is full or name invalid.
int gw_envelope_slip_append (gw_envelope_t *self, const char *service);
size_t gw_envelope_slip_size (gw_envelope_t *self);
const char *gw_envelope_slip (gw_envelope_t *self, size_t index);
//  Drop slip entries after the cursor (a stage re-plans the rest).
void gw_envelope_slip_truncate (gw_envelope_t *self);
size_t gw_envelope_cursor (gw_envelope_t *self);
void gw_envelope_set_cursor (gw_envelope_t *self, size_t cursor);
//  The service after the cursor, or NULL at the end of the slip.
const char *gw_envelope_next (gw_envelope_t *self);

uint64_t gw_envelope_deadline (gw_envelope_t *self);
void gw_envelope_set_deadline (gw_envelope_t *self, uint64_t deadline_ms);
bool gw_envelope_stream (gw_envelope_t *self);
void gw_envelope_set_stream (gw_envelope_t *self, bool stream);
//  Model and trace: NULL when unset.
const char *gw_envelope_model (gw_envelope_t *self);
void gw_envelope_set_model (gw_envelope_t *self, const char *model);
const char *gw_envelope_trace (gw_envelope_t *self);
void gw_envelope_set_trace (gw_envelope_t *self, const char *trace);

//  Tenant (principal) and free annotations. Setting a key that exists
//  replaces its value; returns -1 if the table is full (32 keys).
//  Getters return NULL / fallback if the key is missing or of another type.
int gw_envelope_set_tenant_str (gw_envelope_t *self, const char *key, const char *value);
int gw_envelope_set_tenant_int (gw_envelope_t *self, const char *key, int64_t value);
const char *gw_envelope_tenant_str (gw_envelope_t *self, const char *key);
int64_t gw_envelope_tenant_int (gw_envelope_t *self, const char *key, int64_t fallback);
int gw_envelope_set_ann_str (gw_envelope_t *self, const char *key, const char *value);
int gw_envelope_set_ann_int (gw_envelope_t *self, const char *key, int64_t value);
//  Raw msgpack value for an annotation (any type, e.g. a map); copied.
int gw_envelope_set_ann_raw (
    gw_envelope_t *self, const char *key, const void *data, size_t size);
const char *gw_envelope_ann_str (gw_envelope_t *self, const char *key);
int64_t gw_envelope_ann_int (gw_envelope_t *self, const char *key, int64_t fallback);
//  Raw msgpack bytes of an annotation, or NULL; size in *size_p.
const void *gw_envelope_ann_raw (gw_envelope_t *self, const char *key, size_t *size_p);

//  Remove an annotation (e.g. the client's credential, once auth has used
//  it). Returns 0 if it was there, -1 if not.
int gw_envelope_remove_ann (gw_envelope_t *self, const char *key);

//  Per-stage timings: append (service, µs in, µs out); -1 when full.
int gw_envelope_timing_add (
    gw_envelope_t *self, const char *service, uint64_t t_in_us, uint64_t t_out_us);
size_t gw_envelope_timings (gw_envelope_t *self);
//  Timing i: service name, and the two times through out-parameters.
const char *gw_envelope_timing (
    gw_envelope_t *self, size_t index, uint64_t *t_in_us, uint64_t *t_out_us);

//  Self test of this class.
void gw_envelope_test (bool verbose);

#endif
