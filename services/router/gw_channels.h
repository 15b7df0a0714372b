//  --------------------------------------------------------------------------
//  gw_channels — the router's channel table (docs/ROUTING.md): upstream
//  channels loaded from a JSON config file plus the default channel from
//  TARGET_API_URL, the models each one serves (declared, "*", or learnt
//  from the provider's GET /models), and the failover plan for a model
//  (proto/STAGES.md §3): priority tiers, weighted random order within a
//  tier, one key of the channel's pool per attempt (round robin).
//
//  Threading: one thread (the router actor) owns the table. Discovery runs
//  elsewhere and hands its results to that thread (gw_channels_set_discovered).

#ifndef GW_CHANNELS_H_INCLUDED
#define GW_CHANNELS_H_INCLUDED

#include <czmq.h>
#include <msgpack.h>
#include <stdint.h>
#include <stdbool.h>

typedef struct _gw_channels_t gw_channels_t;

#define GW_CHANNELS_MAX 1024  //  channels in one table
#define GW_CHANNELS_PLAN_MAX 32  //  attempts written into one plan
#define GW_CHANNELS_NAME_MAX 256  //  bytes in a model name

//  Create an empty table. The random generator is seeded from the OS.
gw_channels_t *gw_channels_new (void);

//  Destroy; nulls the caller's reference.
void gw_channels_destroy (gw_channels_t **self_p);

//  Parse a JSON channel list (format in docs/ROUTING.md) and add its
//  channels. Returns 0, or -1 with a message that names the offending field
//  written to error (e.g. "channels[2].weight: must be an integer from 1 to
//  1000"); nothing is added then. Never asserts on the text.
int gw_channels_load (
    gw_channels_t *self, const char *json, size_t size, char *error, size_t error_size);

//  Read a file and gw_channels_load it; errors name the path.
int gw_channels_load_file (
    gw_channels_t *self, const char *path, char *error, size_t error_size);

//  Add the default channel (id "default", type openai) from TARGET_API_URL,
//  TARGET_API_KEY (a key, or a comma-separated pool; may be NULL) and
//  AIGW_TARGET_MODELS (comma-separated; NULL or empty = "*"). A URL without a
//  path gets "/v1" appended. Returns 0 or -1 with error filled.
int gw_channels_add_default (gw_channels_t *self, const char *base_url, const char *keys,
    const char *models, char *error, size_t error_size);

//  Number of channels.
size_t gw_channels_size (gw_channels_t *self);

//  Channel index (0..size-1, highest priority first): id, base URL, and the
//  first key of its pool (NULL if none). NULL for a bad index.
const char *gw_channels_id (gw_channels_t *self, size_t index);
const char *gw_channels_base_url (gw_channels_t *self, size_t index);
const char *gw_channels_key (gw_channels_t *self, size_t index);

//  True if channel index declared no model list and must learn it from the
//  provider's GET {base_url}/models.
bool gw_channels_discovers (gw_channels_t *self, size_t index);

//  Replace the learnt model list of channel id with names (a list of
//  strings; invalid names are skipped). Returns the number of names kept,
//  or -1 if no discovering channel has that id.
int gw_channels_set_discovered (gw_channels_t *self, const char *id, zlistx_t *names);

//  Seed the random generator (tests; 0 is allowed).
void gw_channels_seed (gw_channels_t *self, uint64_t seed);

//  True if model is a valid name (1..256 bytes, no control characters, no
//  commas).
bool gw_channels_name_valid (const char *name, size_t size);

//  Resolve model for a tenant whose allow-list is allow (comma-separated;
//  NULL or "" = every model) and pack the plan (STAGES.md §3: an array of
//  {id, type, base, key, model, timeout_ms}) with pk. Returns the number of
//  attempts packed (at most GW_CHANNELS_PLAN_MAX), or 0 if no channel
//  serves the model for this tenant (nothing packed).
int gw_channels_plan (
    gw_channels_t *self, const char *model, const char *allow, msgpack_packer *pk);

//  Pack the OpenAI model list object {"object":"list","data":[{"id",
//  "object":"model","created","owned_by"}]}: every client-facing model name
//  of every channel ("*" is not listed), deduplicated, sorted, filtered by
//  allow. owned_by is the id of the highest-priority channel serving it.
//  Returns the number of models.
size_t gw_channels_models (
    gw_channels_t *self, const char *allow, int64_t created, msgpack_packer *pk);

//  True if name appears in the comma-separated list (entries trimmed).
bool gw_channels_csv_has (const char *list, const char *name);

//  Self test of this class.
void gw_channels_test (bool verbose);

#endif
