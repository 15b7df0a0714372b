//  --------------------------------------------------------------------------
//  gw_util — small helpers shared by every process: clocks, request ids and
//  rid-keyed maps, error texts, environment lookups and the selftest data
//  path.

#ifndef GW_UTIL_H_INCLUDED
#define GW_UTIL_H_INCLUDED

#include <czmq.h>
#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>

//  Wall clock in unix milliseconds / microseconds (CLOCK_REALTIME); used for
//  deadlines and timings that cross processes.
int64_t gw_time_ms (void);
int64_t gw_time_us (void);

//  Monotonic clock in milliseconds; used for timers inside one process.
int64_t gw_mono_ms (void);

//  Fill rid with 16 random bytes (UUIDv4 layout). Thread safe.
void gw_rid_new (uint8_t rid[16]);

//  Format rid as 32 lowercase hex digits plus NUL into out (33 bytes).
void gw_rid_hex (const uint8_t rid[16], char out[33]);

//  Parse 32 hex digits (dashes allowed in UUID positions) into rid.
//  Returns 0 on success, -1 if text is not a well-formed id.
int gw_rid_parse (const char *text, uint8_t rid[16]);

//  Hash of a 16-byte request id (all 16 bytes are mixed: rids are random,
//  but a careless peer could pick structured ones). A zhashx key hasher.
size_t gw_rid_hash (const void *rid);

//  Compare two 16-byte request ids like memcmp. A zhashx key comparator.
int gw_rid_compare (const void *a, const void *b);

//  A new zhashx keyed by 16-byte request ids. Keys are neither copied nor
//  freed: each key must point into its item (and so live as long as the
//  item). destructor frees items on delete, purge and destroy; NULL leaves
//  them to the caller. Aborts on out-of-memory; never returns NULL.
zhashx_t *gw_rid_map_new (zhashx_destructor_fn destructor);

//  Write a printf-formatted message into error (error_size bytes, NUL
//  terminated, truncated to fit); error may be NULL. Returns -1, so a
//  failing parser can `return gw_fail (error, size, "...")`.
int gw_fail (char *error, size_t error_size, const char *format, ...)
    __attribute__ ((format (printf, 3, 4)));

//  Copy text into out (out_size >= 4 bytes) for a message: whole if it
//  fits, else cut at a UTF-8 character boundary and ended with "...".
//  Returns out.
const char *gw_clip (const char *text, char *out, size_t out_size);

//  A NUL-terminated copy of exactly size bytes at data (which may hold NUL
//  bytes, unlike strndup's input). Caller frees; aborts on out-of-memory.
char *gw_strndup (const char *data, size_t size);

//  Environment variable as string, or fallback when unset or empty.
const char *gw_env (const char *name, const char *fallback);

//  Environment variable as integer within [min, max], or fallback when unset,
//  empty or not a number in range.
int64_t gw_env_int (const char *name, int64_t fallback, int64_t min, int64_t max);

//  Path of a file under the shared test data folder (AIGW_TESTDATA, default
//  ../shared/testdata). Returns a freshly allocated string; caller frees.
char *gw_testdata_path (const char *relative);

//  Send an actor "CONFIGURE" key value and wait for its answer: 0, or -1
//  after logging "<key>=<value> rejected" if the actor refused it.
//  gw_actor_configure_int formats an integer value.
int gw_actor_configure (zactor_t *actor, const char *key, const char *value);
int gw_actor_configure_int (zactor_t *actor, const char *key, int64_t value);

//  CONFIGURE heartbeat and expiry of a stage actor's bus session from
//  AIGW_HEARTBEAT_MS and AIGW_EXPIRY_MS (both set, or neither is used).
//  Returns 0 or -1 as gw_actor_configure.
int gw_actor_configure_session (zactor_t *actor);

//  Send a stage actor "CONNECT" bus and wait for its answer. On success
//  logs "<stage>: serving on <bus>" (launchers and tests wait for that
//  line) and returns the actor; on failure logs why, destroys the actor and
//  returns NULL.
zactor_t *gw_actor_connect (zactor_t *actor, const char *bus, const char *stage);

//  Name the calling thread (at most 15 characters kept), as top -H, perf
//  and gdb show it: every actor names its thread "aigw-<stage>".
void gw_thread_name (const char *name);

//  Process signals for a stage's main. gw_signals_block blocks SIGINT,
//  SIGTERM and SIGHUP in the calling thread and in every thread created
//  after it (call it first in main, before zsys_init, libzmq, curl or an
//  actor start threads) and turns off czmq's own handlers.
//  gw_signals_wait then takes them synchronously: on SIGHUP it sends RELOAD
//  to each of the count actors (NULL entries skipped) and waits for their
//  answer; it returns the first SIGINT or SIGTERM.
void gw_signals_block (void);
int gw_signals_wait (zactor_t **actors, size_t count);

//  Self test of this class.
void gw_util_test (bool verbose);

#endif
