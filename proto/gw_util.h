//  --------------------------------------------------------------------------
//  gw_util — small helpers shared by every process: clocks, request ids,
//  environment lookups and the selftest data path.

#ifndef GW_UTIL_H_INCLUDED
#define GW_UTIL_H_INCLUDED

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

//  Environment variable as string, or fallback when unset or empty.
const char *gw_env (const char *name, const char *fallback);

//  Environment variable as integer within [min, max], or fallback when unset,
//  empty or not a number in range.
int64_t gw_env_int (const char *name, int64_t fallback, int64_t min, int64_t max);

//  Path of a file under the shared test data folder (AIGW_TESTDATA, default
//  ../shared/testdata). Returns a freshly allocated string; caller frees.
char *gw_testdata_path (const char *relative);

//  Self test of this class.
void gw_util_test (bool verbose);

#endif
