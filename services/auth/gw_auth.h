//  --------------------------------------------------------------------------
//  gw_auth — the auth stage (service "auth", IDEMPOTENT): turns the client's
//  credential (ann.credential) into a principal (tenant.key, tenant.user,
//  tenant.group, tenant.models), removes the credential, checks the model
//  allow-list and passes the request on (proto/STAGES.md §2), or ends it
//  with FINAL 401 / 403 (503 while the SQL store is unreachable) in the
//  OpenAI error shape.
//
//  Keys come from GATEWAY_API_KEYS (comma-separated), from an optional
//  JSON keys file (AIGW_KEYS_FILE, docs/ROUTING.md "Keys file"), reloaded
//  when it changes (checked twice a second) or on RELOAD (SIGHUP in the
//  main), and from the SQL store's api_keys table (DATABASE_URL), asked
//  for a key in neither and cached for AIGW_AUTH_CACHE_MS. Keys are kept
//  only as SHA-256 digests; a presented key is hashed once, looked up by
//  digest, and confirmed with CRYPTO_memcmp.
//
//  With no keys configured at all (neither variable set, and the store off
//  or without a single row in api_keys), every request is refused (401)
//  unless open mode is on (AIGW_AUTH_OPEN=1): then every request passes as
//  user "anonymous".
//
//  The gw_auth_t class holds the key store and the decision; the actor
//  wraps it in a worker session. Commands on the actor's pipe:
//
//    CONNECT endpoint     register as "auth" on the bus; replies a signal:
//                         0 done, 1 bad endpoint.
//    CONFIGURE capacity N before CONNECT; replies a signal 0 / 1.
//    RELOAD               reload the keys file now; replies a signal:
//                         0 reloaded or unchanged, 1 failed (old keys kept).
//    VERBOSE              log every decision at debug level.
//    $TERM                end the actor.
//
//  Threading: one thread (the actor) owns a gw_auth_t.

#ifndef GW_AUTH_H_INCLUDED
#define GW_AUTH_H_INCLUDED

#include <czmq.h>
#include <stdint.h>
#include <stdbool.h>

typedef struct _gw_auth_t gw_auth_t;
typedef struct _gw_envelope_t gw_envelope_t;
typedef struct _gw_stage_host_t gw_stage_host_t;

//  What to answer when a request is refused.
typedef struct {
    uint16_t status;  //  401, 403, or 503 (the SQL store is unavailable)
    const char *type;  //  OpenAI error type (static string)
    const char *code;  //  OpenAI error code (static string)
    char message[384];  //  human-readable message
} gw_auth_refusal_t;

//  Create an empty key store (no keys, open mode off).
gw_auth_t *gw_auth_new (void);

//  Destroy; digests are wiped; nulls the caller's reference.
void gw_auth_destroy (gw_auth_t **self_p);

//  Add the keys of a comma-separated list (GATEWAY_API_KEYS): whitespace
//  around each key is trimmed, empty entries are ignored, duplicates count
//  once. Each key becomes user "default", group "default". The plaintext is
//  not kept. Returns the number of keys now held from lists.
int gw_auth_add_keys (gw_auth_t *self, const char *list);

//  Use path as the keys file and load it now. Returns 0, or -1 with a
//  message naming the entry and field in error (the file's keys are then
//  not loaded, and the path is still watched).
int gw_auth_set_keys_file (
    gw_auth_t *self, const char *path, char *error, size_t error_size);

//  Also look keys up in the SQL store at url (NULL or "" = gw_store's
//  default, "var/aigw.db"): a key whose digest is in neither the list nor
//  the file is looked up in api_keys (active rows only) and becomes user =
//  user_name, group = the user's group ("default" if none), tenant.key =
//  key_id, the key's models and name. Answers (found or not) are cached for
//  cache_ms (>= 0). Opens the store now: returns 0, or -1 if it cannot be
//  reached (logged; retried about once a second on use, while keys not in
//  the list or file get 503 auth_store_unavailable).
int gw_auth_set_store (gw_auth_t *self, const char *url, int cache_ms);

//  Open mode: with no keys configured (no list keys and no keys file), let
//  every request through as user "anonymous". Ignored once keys exist,
//  including any row (even revoked) in the store's api_keys; refused with
//  503 while a store in use cannot be reached.
void gw_auth_set_open (gw_auth_t *self, bool open);

//  Reload the keys file if it changed since the last load (force: reload
//  anyway). Checks the file at most once per interval_ms unless force.
//  Returns 1 reloaded, 0 unchanged (or no file), -1 failed: the keys of the
//  last good load stay in force and the error is logged.
int gw_auth_refresh (gw_auth_t *self, bool force, int interval_ms);

//  Number of keys held (lists and file).
size_t gw_auth_size (gw_auth_t *self);

//  Authenticate the request in envelope. On success writes tenant.key,
//  tenant.user, tenant.group, tenant.models (if the key has an allow-list),
//  tenant.key_name (if named), blanks ann.credential, and returns GW_OK.
//  Otherwise fills refusal and returns GW_DONE (envelope credential still
//  blanked). Runs on the owning thread; allocates nothing per call beyond
//  the envelope's own annotation copies.
int gw_auth_check (gw_auth_t *self, gw_envelope_t *envelope, gw_auth_refusal_t *refusal);

//  The auth actor; args is a gw_auth_t * handed over (required).
void gw_auth_actor (zsock_t *pipe, void *args);

//  Add the auth stage over auth (taken) to a gw_stage host: how
//  gw_auth_actor runs it, and how aigw-gateway co-locates it with other
//  stages in one thread.
void gw_auth_stage (gw_auth_t *auth, gw_stage_host_t *host);

//  Start the auth stage configured from the environment (GATEWAY_API_KEYS,
//  AIGW_KEYS_FILE, AIGW_AUTH_OPEN, AIGW_AUTH_STORE, DATABASE_URL,
//  AIGW_AUTH_CACHE_MS, AIGW_AUTH_CAPACITY) and connect it to bus. Returns
//  the actor (it accepts RELOAD: re-read the keys file), or NULL after
//  logging why. Used by aigw-auth and by the co-located aigw-gateway.
zactor_t *gw_auth_launch (const char *bus);

//  The key store configured from the same environment, without an actor
//  (for gw_auth_stage); NULL after logging why.
gw_auth_t *gw_auth_new_env (void);

//  Self test of this class.
void gw_auth_test (bool verbose);

#endif
