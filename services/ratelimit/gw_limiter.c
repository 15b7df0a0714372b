//  --------------------------------------------------------------------------
//  gw_limiter — the limiter engine (memory and Redis back ends).
//
//  Design note. Both back ends run the same algorithm over the same key
//  space, so they cannot drift apart in meaning: the Redis back end as two
//  Lua scripts (admit, settle), the memory back end as their line-by-line
//  C transcription over a hash table of keys with expiry times. All
//  arithmetic is IEEE double on integer-valued quantities, rounded the same
//  way in both (math.ceil / ceil), so both give identical answers for the
//  same sequence of calls and clock readings.
//
//  Key space (all keys of one call share the hash tag "{prefix}"; the scope
//  name comes last so no two scopes can collide):
//
//    {P}:rl:r:<rid hex>          hash: the reservation record (state s=1
//                                held, 2 settled, 3 released; est tokens tk,
//                                est cost c, scopes sc, window reference t,
//                                per-scope charge mask m<i> and token step
//                                T<i>). TTL = lease_ms; a release extends it
//                                to at least TOMBSTONE_MS.
//    {P}:rl:rq:<scope>           GCRA TAT (µs) for requests.
//    {P}:rl:tk:<scope>           GCRA TAT (µs) for tokens.
//    {P}:rl:ls:<scope>           sorted set rid -> lease expiry (unix ms).
//    {P}:rl:q:<window>:<scope>   hash r/t/c: requests, tokens, cost of one
//                                calendar window (m<min>, h<hour>, d<day>,
//                                M<yyyymm>), expiring a grace after its end.
//    {P}:rl:bg:<scope>           budget spent (micro-units), TTL 400 days
//                                from its last use.
//    {P}:rl:bs:<scope>           budget settled: the sum of the actual
//                                costs settled (no holds), TTL 400 days
//                                (read by the balance refresh).
//
//  GCRA (rate limits): emission interval T = 60 s / rate, bucket of B units
//  (burst; B = tpm for tokens). A request of n units at time now conforms
//  iff max(TAT, now) + n·T − B·T ≤ now; then TAT := max(TAT, now) + n·T.
//  So B admissions pass at once, then one per T: RPM 100 / burst 100 admits
//  exactly 100 immediately and then one every 600 ms.
//
//  Holds: the estimate (tokens, cost) is added to the token bucket, the
//  quota windows and the budget at admit; settle adds (actual − estimate)
//  (clamped at 0) to the same windows (the ones of the admit time, kept in
//  the record), release adds −estimate. The record makes admit, settle and
//  release idempotent per rid.
//
//  Release, then settle: the edge releases a request whose client left
//  before the first byte, but the request may have reached a backend, which
//  still bills it; billing's settle then comes after the release. So a
//  release leaves the record as a tombstone (state 3) for at least
//  TOMBSTONE_MS, and a settle on a tombstone adds the actual usage in full
//  (the estimate was already given back) and finishes the record (state 2):
//  the counters end at the actual usage whatever the order, exactly once.
//  Tombstones cost no more memory than holds: one record per request, for
//  about as long as its hold would have lived.
//
//  Rates: admit is one Redis round trip (EVALSHA); settle/release are two
//  (HMGET of the record, then EVALSHA: the keys are computed in C from the
//  record, never inside Lua). Batches pipeline them: gw_limiter_admit_many
//  is one round trip for all its admissions, gw_limiter_finish two for all
//  its items; an item whose answer the pipeline did not bring (broken
//  connection, NOSCRIPT, an error) runs again alone, which the scripts'
//  idempotency per rid makes safe. Memory: a few hash lookups under a
//  mutex.
//
//  Failure: a Redis that refuses, times out or answers garbage puts the
//  instance in an outage: the connection is dropped, reconnects are tried
//  after 0, 100, 200 … 2000 ms; in between calls answer at once by the fail
//  mode. A reply is input: every field is checked, nothing is asserted.

#include "aigw.h"
#include "gw_limiter.h"
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <math.h>

#define KEY_MAX (64 + GW_LIMITER_SCOPE_MAX)
#define KEYS_PER_SCOPE 9
#define ARGS_PER_SCOPE 17
#define KEYS_MAX (1 + KEYS_PER_SCOPE * GW_LIMITER_SCOPES_MAX)
#define BUDGET_TTL_MS (400LL * 86400 * 1000)
#define BACKOFF_MAX_MS 2000
#define SWEEP_MS 1000
#define TOMBSTONE_MS 600000  //  a released record awaits a late settle this long

//  --------------------------------------------------------------------------
//  The scripts. KEYS and ARGV layouts are documented beside s_admit_args.

static const char *s_admit_lua =
    "local now = tonumber(ARGV[1])\n"
    "if now == 0 then\n"
    "  local t = redis.call('TIME')\n"
    "  now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "end\n"
    "local now_ms = math.floor(now / 1000)\n"
    "local rec = KEYS[1]\n"
    "local rid = ARGV[2]\n"
    "local tokens = tonumber(ARGV[3])\n"
    "local cost = tonumber(ARGV[4])\n"
    "local lease_ms = tonumber(ARGV[5])\n"
    "local n = tonumber(ARGV[6])\n"
    "local wend = {}\n"
    "local wexp = {}\n"
    "for w = 1, 4 do\n"
    "  wend[w] = tonumber(ARGV[7 + w])\n"
    "  wexp[w] = tonumber(ARGV[11 + w])\n"
    "end\n"
    "if redis.call('EXISTS', rec) == 1 then\n"
    "  return {2, 0, -1, 0, -1, -1, -1, -1, -1, -1}\n"
    "end\n"
    "local hr = {-1, -1, -1}\n"
    "local ht = {-1, -1, -1}\n"
    "local function refuse(which, i, retry)\n"
    "  return {0, which, i, retry, hr[1], hr[2], hr[3], ht[1], ht[2], ht[3]}\n"
    "end\n"
    "local writes = {}\n"
    "local masks = {}\n"
    "local steps = {}\n"
    "for i = 0, n - 1 do\n"
    "  local k = 1 + i * 9\n"
    "  local a = 17 + i * 17\n"
    "  local rpm = tonumber(ARGV[a + 1])\n"
    "  local burst = tonumber(ARGV[a + 2])\n"
    "  local tpm = tonumber(ARGV[a + 3])\n"
    "  local conc = tonumber(ARGV[a + 4])\n"
    "  local mask = 0\n"
    "  local step = 0\n"
    "  if rpm > 0 then\n"
    "    if burst <= 0 then burst = rpm end\n"
    "    local T = 60000000 / rpm\n"
    "    local tat = tonumber(redis.call('GET', KEYS[k + 1])) or now\n"
    "    if tat < now then tat = now end\n"
    "    local new = math.ceil(tat + T)\n"
    "    local allow = new - burst * T\n"
    "    if allow > now then\n"
    "      hr = {rpm, 0, math.ceil((tat - now) / 1000)}\n"
    "      return refuse(1, i, math.ceil((allow - now) / 1000))\n"
    "    end\n"
    "    local rem = math.floor((now + burst * T - new) / T + 1e-9)\n"
    "    if hr[1] < 0 or rem < hr[2] then\n"
    "      hr = {rpm, rem, math.ceil((new - now) / 1000)}\n"
    "    end\n"
    "    writes[#writes + 1] = {1, KEYS[k + 1], new}\n"
    "  end\n"
    "  if tpm > 0 then\n"
    "    mask = mask + 1\n"
    "    local T = 60000000 / tpm\n"
    "    step = T\n"
    "    if tokens > tpm then\n"
    "      ht = {tpm, 0, -1}\n"
    "      return refuse(2, i, -1)\n"
    "    end\n"
    "    local tat = tonumber(redis.call('GET', KEYS[k + 2])) or now\n"
    "    if tat < now then tat = now end\n"
    "    local new = math.ceil(tat + tokens * T)\n"
    "    local allow = new - tpm * T\n"
    "    if allow > now then\n"
    "      ht = {tpm, math.floor((now + tpm * T - tat) / T + 1e-9),\n"
    "            math.ceil((tat - now) / 1000)}\n"
    "      return refuse(2, i, math.ceil((allow - now) / 1000))\n"
    "    end\n"
    "    local rem = math.floor((now + tpm * T - new) / T + 1e-9)\n"
    "    if ht[1] < 0 or rem < ht[2] then\n"
    "      ht = {tpm, rem, math.ceil((new - now) / 1000)}\n"
    "    end\n"
    "    if new > now then writes[#writes + 1] = {1, KEYS[k + 2], new} end\n"
    "  end\n"
    "  if conc > 0 then\n"
    "    mask = mask + 2\n"
    "    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now_ms)\n"
    "    if redis.call('ZCARD', KEYS[k + 3]) >= conc then\n"
    "      return refuse(3, i, 1000)\n"
    "    end\n"
    "    writes[#writes + 1] = {2, KEYS[k + 3]}\n"
    "  end\n"
    "  for w = 1, 4 do\n"
    "    local qr = tonumber(ARGV[a + 4 + w])\n"
    "    local qt = tonumber(ARGV[a + 8 + w])\n"
    "    local qc = tonumber(ARGV[a + 12 + w])\n"
    "    if qr > 0 or qt > 0 or qc > 0 then\n"
    "      mask = mask + 2 ^ (1 + w)\n"
    "      local v = redis.call('HMGET', KEYS[k + 3 + w], 'r', 't', 'c')\n"
    "      local r = tonumber(v[1]) or 0\n"
    "      local t = tonumber(v[2]) or 0\n"
    "      local c = tonumber(v[3]) or 0\n"
    "      local retry = wend[w] - now_ms\n"
    "      if retry < 1 then retry = 1 end\n"
    "      if qr > 0 and r + 1 > qr then return refuse(3 + w, i, retry) end\n"
    "      if qt > 0 and t + tokens > qt then return refuse(7 + w, i, retry) end\n"
    "      if qc > 0 and c + cost > qc then return refuse(11 + w, i, retry) end\n"
    "      writes[#writes + 1] = {3, KEYS[k + 3 + w], wexp[w]}\n"
    "    end\n"
    "  end\n"
    "  local budget = tonumber(ARGV[a + 17])\n"
    "  if budget > 0 then\n"
    "    mask = mask + 64\n"
    "    local spent = tonumber(redis.call('GET', KEYS[k + 8])) or 0\n"
    "    if spent + cost > budget then return refuse(16, i, -1) end\n"
    "    writes[#writes + 1] = {4, KEYS[k + 8]}\n"
    "  end\n"
    "  masks[i] = mask\n"
    "  steps[i] = step\n"
    "end\n"
    "for _, op in ipairs(writes) do\n"
    "  if op[1] == 1 then\n"
    "    redis.call('SET', op[2], string.format('%.0f', op[3]), 'PX',\n"
    "               math.ceil((op[3] - now) / 1000) + 1000)\n"
    "  elseif op[1] == 2 then\n"
    "    redis.call('ZADD', op[2], now_ms + lease_ms, rid)\n"
    "    if redis.call('PTTL', op[2]) < lease_ms + 1000 then\n"
    "      redis.call('PEXPIRE', op[2], lease_ms + 1000)\n"
    "    end\n"
    "  elseif op[1] == 3 then\n"
    "    redis.call('HINCRBY', op[2], 'r', 1)\n"
    "    redis.call('HINCRBY', op[2], 't', ARGV[3])\n"
    "    redis.call('HINCRBY', op[2], 'c', ARGV[4])\n"
    "    redis.call('PEXPIREAT', op[2], op[3])\n"
    "  else\n"
    "    redis.call('INCRBY', op[2], ARGV[4])\n"
    "    redis.call('PEXPIRE', op[2], ARGV[7])\n"
    "  end\n"
    "end\n"
    "local fields = {'s', 1, 'tk', ARGV[3], 'c', ARGV[4], 'n', n, 't', ARGV[16],\n"
    "                'sc', ARGV[17]}\n"
    "for i = 0, n - 1 do\n"
    "  fields[#fields + 1] = 'm' .. i\n"
    "  fields[#fields + 1] = masks[i]\n"
    "  fields[#fields + 1] = 'T' .. i\n"
    "  fields[#fields + 1] = string.format('%.17g', steps[i])\n"
    "end\n"
    "redis.call('HSET', rec, unpack(fields))\n"
    "redis.call('PEXPIRE', rec, lease_ms)\n"
    "return {1, 0, -1, 0, hr[1], hr[2], hr[3], ht[1], ht[2], ht[3]}\n";

static const char *s_settle_lua =
    "local rec = KEYS[1]\n"
    "local s = redis.call('HGET', rec, 's')\n"
    "if s ~= '1' and not (s == '3' and ARGV[5] == '0') then return 0 end\n"
    "local now = tonumber(ARGV[1])\n"
    "if now == 0 then\n"
    "  local t = redis.call('TIME')\n"
    "  now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "end\n"
    "local v = redis.call('HMGET', rec, 'tk', 'c', 'n')\n"
    "local tk = tonumber(v[1])\n"
    "local c = tonumber(v[2])\n"
    "local n = tonumber(v[3])\n"
    "if not tk or not c or not n then return 0 end\n"
    "local dt = tonumber(ARGV[3]) - tk\n"
    "local dc = tonumber(ARGV[4]) - c\n"
    "if s == '3' then dt = tonumber(ARGV[3]) dc = tonumber(ARGV[4]) end\n"
    "if ARGV[5] == '1' then dt = -tk dc = -c end\n"
    "if ARGV[5] == '2' then dt = 0 dc = 0 end\n"
    "for i = 0, n - 1 do\n"
    "  local k = 1 + i * 9\n"
    "  local m = tonumber(redis.call('HGET', rec, 'm' .. i)) or 0\n"
    "  local T = tonumber(redis.call('HGET', rec, 'T' .. i)) or 0\n"
    "  if bit.band(m, 1) ~= 0 and dt ~= 0 and T > 0 then\n"
    "    local tat = tonumber(redis.call('GET', KEYS[k + 2])) or now\n"
    "    if tat < now then tat = now end\n"
    "    local new = math.ceil(tat + dt * T)\n"
    "    if new > now then\n"
    "      redis.call('SET', KEYS[k + 2], string.format('%.0f', new), 'PX',\n"
    "                 math.ceil((new - now) / 1000) + 1000)\n"
    "    else\n"
    "      redis.call('DEL', KEYS[k + 2])\n"
    "    end\n"
    "  end\n"
    "  if bit.band(m, 2) ~= 0 then redis.call('ZREM', KEYS[k + 3], ARGV[2]) end\n"
    "  for w = 1, 4 do\n"
    "    local key = KEYS[k + 3 + w]\n"
    "    if bit.band(m, 2 ^ (1 + w)) ~= 0 and redis.call('EXISTS', key) == 1 then\n"
    "      if dt ~= 0 and redis.call('HINCRBY', key, 't', dt) < 0 then\n"
    "        redis.call('HSET', key, 't', 0)\n"
    "      end\n"
    "      if dc ~= 0 and redis.call('HINCRBY', key, 'c', dc) < 0 then\n"
    "        redis.call('HSET', key, 'c', 0)\n"
    "      end\n"
    "    end\n"
    "  end\n"
    "  local bg = KEYS[k + 8]\n"
    "  if bit.band(m, 64) ~= 0 and dc ~= 0 and redis.call('EXISTS', bg) == 1 then\n"
    "    if redis.call('INCRBY', bg, dc) < 0 then\n"
    "      redis.call('SET', bg, 0, 'KEEPTTL')\n"
    "    end\n"
    "  end\n"
    "  if bit.band(m, 64) ~= 0 and ARGV[5] == '0' and tonumber(ARGV[4]) > 0 then\n"
    "    redis.call('INCRBY', KEYS[k + 9], ARGV[4])\n"
    "    redis.call('PEXPIRE', KEYS[k + 9], 34560000000)\n"
    "  end\n"
    "end\n"
    "if ARGV[5] == '0' then redis.call('HSET', rec, 's', 2) end\n"
    "if ARGV[5] == '1' then\n"
    "  redis.call('HSET', rec, 's', 3)\n"
    "  if redis.call('PTTL', rec) < tonumber(ARGV[6]) then\n"
    "    redis.call('PEXPIRE', rec, ARGV[6])\n"
    "  end\n"
    "end\n"
    "return 1\n";

//  --------------------------------------------------------------------------
//  Memory back end: entries of the key space

typedef struct {
    char rid[33];  //  hex
    int64_t expires;  //  unix ms
} s_lease_t;

typedef struct {
    int64_t expires;  //  unix ms, 0 = never
    int64_t num;  //  TAT (µs) or budget spent (micro-units)
    int64_t r, t, c;  //  quota window counters
    s_lease_t *leases;  //  lease set
    size_t leases_size;  //  leases in use
    size_t leases_max;  //  allocated
    //  Reservation record
    int state;  //  1 held, 2 settled, 3 released (a tombstone)
    int64_t tk;  //  estimated tokens
    int64_t cost;  //  estimated cost
    int64_t ref_ms;  //  window reference time of the admit
    int scopes;  //  scope count
    char *scope_list;  //  scopes joined with '\n'
    int mask[GW_LIMITER_SCOPES_MAX];  //  charges per scope (bits as in Lua)
    double step[GW_LIMITER_SCOPES_MAX];  //  token emission interval per scope
} s_entry_t;

static void
s_entry_destroy (s_entry_t **self_p)
{
    s_entry_t *self = *self_p;
    if (self) {
        free (self->leases);
        free (self->scope_list);
        free (self);
        *self_p = NULL;
    }
}

//  --------------------------------------------------------------------------
//  Class

struct _gw_limiter_t {
    pthread_mutex_t mutex;  //  guards everything below
    bool redis;  //  Redis back end (else memory)
    bool fail_open;  //  fail mode
    int timeout_ms;  //  Redis connect/command timeout
    char prefix[40];  //  key prefix (hash tag)
    int64_t fake_us;  //  fake clock, 0 = real
    //  memory
    zhashx_t *table;  //  key -> s_entry_t
    int64_t swept_at;  //  unix ms of the last expiry sweep
    //  redis
    char *host;  //  host name or address
    int port;  //  TCP port
    char *user;  //  ACL user, or NULL
    char *password;  //  or NULL
    int db;  //  database number
    redisContext *ctx;  //  connection, NULL when down
    char sha_admit[41];  //  script digests (from SCRIPT LOAD)
    char sha_settle[41];
    bool down;  //  in an outage (logged)
    int64_t down_since;  //  mono ms
    int64_t retry_at;  //  mono ms: no connect attempt before
    int backoff_ms;  //  next back-off
    uint64_t failed_calls;  //  calls answered by the fail mode in this outage
    int64_t error_logged;  //  mono ms of the last logged error reply
};

static gw_limiter_t *
s_new (void)
{
    gw_limiter_t *self = (gw_limiter_t *)zmalloc (sizeof (gw_limiter_t));
    assert (self);
    pthread_mutex_init (&self->mutex, NULL);
    self->timeout_ms = 100;
    strcpy (self->prefix, "aigw");
    self->table = zhashx_new ();
    assert (self->table);
    zhashx_set_destructor (self->table, (zhashx_destructor_fn *)s_entry_destroy);
    return self;
}

//  Decode %XX escapes in place.
static void
s_unescape (char *text)
{
    char *out = text;
    for (char *p = text; *p; p++) {
        if (*p == '%' && isxdigit ((unsigned char)p[1]) &&
            isxdigit ((unsigned char)p[2])) {
            char hex[3] = {p[1], p[2], 0};
            *out++ = (char)strtol (hex, NULL, 16);
            p += 2;
        }
        else
            *out++ = *p;
    }
    *out = 0;
}

static int
s_parse_port (const char *text, int *port)
{
    char *end;
    long value = strtol (text, &end, 10);
    if (!*text || *end || value < 1 || value > 65535)
        return -1;
    *port = (int)value;
    return 0;
}

//  redis://[[user]:password@]host[:port][/db]
static int
s_parse_url (gw_limiter_t *self, const char *url)
{
    if (strncmp (url, "redis://", 8))
        return -1;
    char *copy = strdup (url + 8);
    assert (copy);
    char *rest = copy;
    int rc = -1;
    char *at = strrchr (rest, '@');
    if (at) {
        *at = 0;
        char *colon = strchr (rest, ':');
        if (colon) {
            *colon = 0;
            if (*rest)
                self->user = strdup (rest);
            self->password = strdup (colon + 1);
        }
        else
            self->password = strdup (rest);  //  redis://password@host
        if (self->user)
            s_unescape (self->user);
        if (self->password)
            s_unescape (self->password);
        rest = at + 1;
    }
    char *slash = strchr (rest, '/');
    if (slash) {
        *slash = 0;
        char *end;
        long db = strtol (slash + 1, &end, 10);
        if (slash[1] && (*end || db < 0 || db > 1000))
            goto done;
        self->db = (int)db;
    }
    self->port = 6379;
    char *colon = strrchr (rest, ':');
    if (colon && !strchr (colon, ']')) {
        *colon = 0;
        if (s_parse_port (colon + 1, &self->port))
            goto done;
    }
    if (*rest == '[') {  //  [v6 address]
        rest++;
        char *close = strchr (rest, ']');
        if (!close)
            goto done;
        *close = 0;
    }
    if (!*rest)
        goto done;
    self->host = strdup (rest);
    rc = 0;
done:
    free (copy);
    return rc;
}

gw_limiter_t *
gw_limiter_new (const char *url)
{
    gw_limiter_t *self = s_new ();
    if (url && *url && !streq (url, "memory")) {
        self->redis = true;
        if (s_parse_url (self, url)) {
            gw_limiter_destroy (&self);
            return NULL;
        }
    }
    return self;
}

gw_limiter_t *
gw_limiter_new_env (void)
{
    gw_limiter_t *self = NULL;
    const char *url = gw_env ("REDIS_URL", NULL);
    const char *addr = gw_env ("REDIS_ADDR", NULL);
    if (url) {
        self = gw_limiter_new (url);
        if (!self)
            gw_error (
                "ratelimit: REDIS_URL is not redis://[[user]:password@]host[:port][/db]");
    }
    else if (addr) {
        self = s_new ();
        self->redis = true;
        char *copy = strdup (addr);
        assert (copy);
        char *colon = strrchr (copy, ':');
        int port = 6379;
        bool ok = true;
        if (colon) {
            *colon = 0;
            ok = s_parse_port (colon + 1, &port) == 0;
        }
        ok = ok && *copy;
        self->host = strdup (copy);
        self->port = port;
        free (copy);
        const char *password = gw_env ("REDIS_PASSWORD", NULL);
        if (password)
            self->password = strdup (password);
        self->db = (int)gw_env_int ("REDIS_DB", 0, 0, 1000);
        if (!ok) {
            gw_error ("ratelimit: REDIS_ADDR is not host:port");
            gw_limiter_destroy (&self);
        }
    }
    else
        self = gw_limiter_new (NULL);
    if (!self)
        return NULL;
    const char *fail = gw_env ("AIGW_RATELIMIT_FAIL", "closed");
    if (!streq (fail, "open") && !streq (fail, "closed")) {
        gw_error ("ratelimit: AIGW_RATELIMIT_FAIL must be open or closed");
        gw_limiter_destroy (&self);
        return NULL;
    }
    self->fail_open = streq (fail, "open");
    self->timeout_ms = (int)gw_env_int ("AIGW_REDIS_TIMEOUT_MS", 100, 1, 10000);
    gw_limiter_set_prefix (self, gw_env ("AIGW_RATELIMIT_PREFIX", "aigw"));
    return self;
}

void
gw_limiter_destroy (gw_limiter_t **self_p)
{
    assert (self_p);
    gw_limiter_t *self = *self_p;
    if (self) {
        if (self->ctx)
            redisFree (self->ctx);
        zhashx_destroy (&self->table);
        free (self->host);
        free (self->user);
        free (self->password);
        pthread_mutex_destroy (&self->mutex);
        free (self);
        *self_p = NULL;
    }
}

void
gw_limiter_set_fail_open (gw_limiter_t *self, bool open)
{
    assert (self);
    pthread_mutex_lock (&self->mutex);
    self->fail_open = open;
    pthread_mutex_unlock (&self->mutex);
}

void
gw_limiter_set_timeout (gw_limiter_t *self, int timeout_ms)
{
    assert (self);
    assert (timeout_ms >= 1 && timeout_ms <= 10000);
    pthread_mutex_lock (&self->mutex);
    self->timeout_ms = timeout_ms;
    pthread_mutex_unlock (&self->mutex);
}

void
gw_limiter_set_prefix (gw_limiter_t *self, const char *prefix)
{
    assert (self);
    assert (prefix);
    pthread_mutex_lock (&self->mutex);
    snprintf (self->prefix, sizeof (self->prefix), "%s", prefix);
    //  No braces inside the hash tag.
    for (char *p = self->prefix; *p; p++)
        if (*p == '{' || *p == '}')
            *p = '_';
    pthread_mutex_unlock (&self->mutex);
}

void
gw_limiter_set_time (gw_limiter_t *self, int64_t now_us)
{
    assert (self);
    pthread_mutex_lock (&self->mutex);
    self->fake_us = now_us;
    pthread_mutex_unlock (&self->mutex);
}

const char *
gw_limiter_backend (gw_limiter_t *self)
{
    assert (self);
    return self->redis ? "redis" : "memory";
}

bool
gw_limiter_available (gw_limiter_t *self)
{
    assert (self);
    pthread_mutex_lock (&self->mutex);
    bool available = !self->down;
    pthread_mutex_unlock (&self->mutex);
    return available;
}

bool
gw_limiter_fail_open (gw_limiter_t *self)
{
    assert (self);
    return self->fail_open;
}

const char *
gw_limiter_limit_name (int limit)
{
    static const char *names[] = {"none", "rpm", "tpm", "concurrency",
        "requests_per_minute", "requests_per_hour", "requests_per_day",
        "requests_per_month", "tokens_per_minute", "tokens_per_hour", "tokens_per_day",
        "tokens_per_month", "cost_per_minute", "cost_per_hour", "cost_per_day",
        "cost_per_month", "budget", "unavailable"};
    if (limit < 0 || limit > GW_LIMIT_UNAVAILABLE)
        return "unknown";
    return names[limit];
}

bool
gw_limits_empty (const gw_limits_t *limits)
{
    static const gw_limits_t zero;
    return memcmp (limits, &zero, sizeof (zero)) == 0;
}

//  --------------------------------------------------------------------------
//  Keys and windows (shared by both back ends)

typedef struct {
    int64_t end[GW_LIMITER_WINDOWS];  //  window end, unix ms
    int64_t expire[GW_LIMITER_WINDOWS];  //  counter expiry, unix ms
    char id[GW_LIMITER_WINDOWS][24];  //  window name in keys
} s_windows_t;

//  Every window edge (minute, hour, day, month) falls on a minute, so the
//  windows of one minute are computed once per thread and copied after.
static void
s_windows (int64_t ref_ms, s_windows_t *windows)
{
    static __thread int64_t cached_minute = INT64_MIN;
    static __thread s_windows_t cached;
    int64_t minute = ref_ms >= 0 ? ref_ms / 60000 : (ref_ms - 59999) / 60000;
    if (minute == cached_minute) {
        *windows = cached;
        return;
    }
    static const int64_t sizes[] = {60000, 3600000, 86400000};
    static const char tags[] = "mhd";
    for (int w = 0; w < 3; w++) {
        int64_t index = ref_ms / sizes[w];
        windows->end[w] = (index + 1) * sizes[w];
        snprintf (windows->id[w], sizeof (windows->id[w]), "%c%" PRId64, tags[w], index);
    }
    time_t seconds = (time_t)(ref_ms / 1000);
    struct tm tm;
    gmtime_r (&seconds, &tm);
    snprintf (windows->id[3], sizeof (windows->id[3]), "M%04d%02d", tm.tm_year + 1900,
        tm.tm_mon + 1);
    struct tm next = {0};
    next.tm_year = tm.tm_mon == 11 ? tm.tm_year + 1 : tm.tm_year;
    next.tm_mon = tm.tm_mon == 11 ? 0 : tm.tm_mon + 1;
    next.tm_mday = 1;
    windows->end[3] = (int64_t)timegm (&next) * 1000;
    //  Counters outlive their window by a grace, so that settles of
    //  requests admitted near the end still find them.
    windows->expire[0] = windows->end[0] + 600000;
    for (int w = 1; w < 4; w++)
        windows->expire[w] = windows->end[w] + 3600000;
    cached = *windows;
    cached_minute = minute;
}

//  One key: "{prefix}:rl:" then the parts, truncated to KEY_MAX - 1 bytes
//  as snprintf would (a key is built for every counter of every call, so
//  this is plain copying, not formatting).
static void
s_key (char *key, const char *prefix, const char *a, const char *b, const char *c)
{
    const char *parts[] = {"{", prefix, "}:rl:", a, b, c};
    size_t at = 0;
    for (size_t i = 0; i < sizeof (parts) / sizeof (parts[0]); i++) {
        if (!parts[i])
            continue;
        size_t size = strlen (parts[i]);
        if (size > KEY_MAX - 1 - at)
            size = KEY_MAX - 1 - at;
        memcpy (key + at, parts[i], size);
        at += size;
    }
    key[at] = 0;
}

//  Build the keys of a call: keys[0] the record, then KEYS_PER_SCOPE per
//  scope (rq, tk, ls, q minute, hour, day, month, bg).
static void
s_keys (const char *prefix, const char *rid_hex, size_t count, const char *const *scopes,
    const s_windows_t *windows, char keys[][KEY_MAX])
{
    s_key (keys[0], prefix, "r:", rid_hex, NULL);
    for (size_t i = 0; i < count; i++) {
        char (*k)[KEY_MAX] = keys + 1 + i * KEYS_PER_SCOPE;
        s_key (k[0], prefix, "rq:", scopes[i], NULL);
        s_key (k[1], prefix, "tk:", scopes[i], NULL);
        s_key (k[2], prefix, "ls:", scopes[i], NULL);
        for (int w = 0; w < GW_LIMITER_WINDOWS; w++) {
            char window[32];
            size_t size = strlen (windows->id[w]);
            memcpy (window, windows->id[w], size);
            window[size] = ':';
            window[size + 1] = 0;
            s_key (k[3 + w], prefix, "q:", window, scopes[i]);
        }
        s_key (k[7], prefix, "bg:", scopes[i], NULL);
        s_key (k[8], prefix, "bs:", scopes[i], NULL);
    }
}

static void
s_result_init (gw_limiter_result_t *result)
{
    memset (result, 0, sizeof (*result));
    result->scope = -1;
    result->limit_requests = result->remaining_requests = result->reset_requests_ms = -1;
    result->limit_tokens = result->remaining_tokens = result->reset_tokens_ms = -1;
}

//  --------------------------------------------------------------------------
//  Memory back end (a transcription of the scripts)

static s_entry_t *
s_get (gw_limiter_t *self, const char *key, int64_t now_ms)
{
    s_entry_t *entry = (s_entry_t *)zhashx_lookup (self->table, key);
    if (entry && entry->expires && entry->expires <= now_ms) {
        zhashx_delete (self->table, key);
        entry = NULL;
    }
    return entry;
}

static s_entry_t *
s_put (gw_limiter_t *self, const char *key, int64_t now_ms)
{
    s_entry_t *entry = s_get (self, key, now_ms);
    if (!entry) {
        entry = (s_entry_t *)zmalloc (sizeof (s_entry_t));
        assert (entry);
        zhashx_insert (self->table, key, entry);
    }
    return entry;
}

static void
s_sweep (gw_limiter_t *self, int64_t now_ms)
{
    if (now_ms - self->swept_at < SWEEP_MS && now_ms >= self->swept_at)
        return;
    self->swept_at = now_ms;
    zlistx_t *dead = zlistx_new ();
    assert (dead);
    for (s_entry_t *entry = (s_entry_t *)zhashx_first (self->table); entry;
         entry = (s_entry_t *)zhashx_next (self->table))
        if (entry->expires && entry->expires <= now_ms)
            zlistx_add_end (dead, (void *)zhashx_cursor (self->table));
    for (const char *key = (const char *)zlistx_first (dead); key;
         key = (const char *)zlistx_next (dead))
        zhashx_delete (self->table, key);
    zlistx_destroy (&dead);
}

//  Set a TAT entry as the script's SET … PX.
static void
s_mem_set_tat (gw_limiter_t *self, const char *key, double tat, double now)
{
    int64_t now_ms = (int64_t)floor (now / 1000);
    s_entry_t *entry = s_put (self, key, now_ms);
    entry->num = (int64_t)tat;
    entry->expires = now_ms + (int64_t)ceil ((tat - now) / 1000) + 1000;
}

typedef struct {
    int op;  //  1 tat, 2 lease, 3 quota, 4 budget
    const char *key;
    double value;  //  tat or expiry
} s_write_t;

static int
s_mem_admit (gw_limiter_t *self, const gw_limiter_request_t *request,
    char keys[][KEY_MAX], const char *rid_hex, const s_windows_t *windows, double now,
    int64_t ref_ms, const char *scope_list, gw_limiter_result_t *result)
{
    int64_t now_ms = (int64_t)floor (now / 1000);
    s_sweep (self, now_ms);
    double tokens = (double)request->tokens;
    double cost = (double)request->cost;
    int64_t lease_ms = request->lease_ms;
    if (s_get (self, keys[0], now_ms)) {
        result->admitted = result->duplicate = true;
        return 0;
    }
    int64_t hr[3] = {-1, -1, -1}, ht[3] = {-1, -1, -1};
    s_write_t writes[KEYS_MAX];
    int nwrites = 0;
    int masks[GW_LIMITER_SCOPES_MAX] = {0};
    double steps[GW_LIMITER_SCOPES_MAX] = {0};
    int which = 0, at = -1;
    int64_t retry = 0;
    for (size_t i = 0; i < request->scopes && !which; i++) {
        char (*k)[KEY_MAX] = keys + 1 + i * KEYS_PER_SCOPE;
        const gw_limits_t *limits = &request->limits[i];
        int mask = 0;
        double step = 0;
        at = (int)i;
        if (limits->rpm > 0) {
            double rpm = (double)limits->rpm;
            double burst = limits->burst ? (double)limits->burst : rpm;
            double T = 60000000.0 / rpm;
            s_entry_t *entry = s_get (self, k[0], now_ms);
            double tat = entry ? (double)entry->num : now;
            if (tat < now)
                tat = now;
            double nw = ceil (tat + T);
            double allow = nw - burst * T;
            if (allow > now) {
                hr[0] = (int64_t)rpm, hr[1] = 0,
                hr[2] = (int64_t)ceil ((tat - now) / 1000);
                which = GW_LIMIT_RPM, retry = (int64_t)ceil ((allow - now) / 1000);
                break;
            }
            int64_t rem = (int64_t)floor ((now + burst * T - nw) / T + 1e-9);
            if (hr[0] < 0 || rem < hr[1])
                hr[0] = (int64_t)rpm, hr[1] = rem,
                hr[2] = (int64_t)ceil ((nw - now) / 1000);
            writes[nwrites++] = (s_write_t){1, k[0], nw};
        }
        if (limits->tpm > 0) {
            mask += 1;
            double tpm = (double)limits->tpm;
            double T = 60000000.0 / tpm;
            step = T;
            if (tokens > tpm) {
                ht[0] = (int64_t)tpm, ht[1] = 0, ht[2] = -1;
                which = GW_LIMIT_TPM, retry = -1;
                break;
            }
            s_entry_t *entry = s_get (self, k[1], now_ms);
            double tat = entry ? (double)entry->num : now;
            if (tat < now)
                tat = now;
            double nw = ceil (tat + tokens * T);
            double allow = nw - tpm * T;
            if (allow > now) {
                ht[0] = (int64_t)tpm;
                ht[1] = (int64_t)floor ((now + tpm * T - tat) / T + 1e-9);
                ht[2] = (int64_t)ceil ((tat - now) / 1000);
                which = GW_LIMIT_TPM, retry = (int64_t)ceil ((allow - now) / 1000);
                break;
            }
            int64_t rem = (int64_t)floor ((now + tpm * T - nw) / T + 1e-9);
            if (ht[0] < 0 || rem < ht[1])
                ht[0] = (int64_t)tpm, ht[1] = rem,
                ht[2] = (int64_t)ceil ((nw - now) / 1000);
            if (nw > now)
                writes[nwrites++] = (s_write_t){1, k[1], nw};
        }
        if (limits->concurrency > 0) {
            mask += 2;
            s_entry_t *entry = s_get (self, k[2], now_ms);
            size_t live = 0;
            if (entry) {
                //  ZREMRANGEBYSCORE -inf now_ms
                size_t kept = 0;
                for (size_t l = 0; l < entry->leases_size; l++)
                    if (entry->leases[l].expires > now_ms)
                        entry->leases[kept++] = entry->leases[l];
                entry->leases_size = kept;
                live = kept;
            }
            if (live >= limits->concurrency) {
                which = GW_LIMIT_CONCURRENCY, retry = 1000;
                break;
            }
            writes[nwrites++] = (s_write_t){2, k[2], 0};
        }
        for (int w = 0; w < GW_LIMITER_WINDOWS && !which; w++) {
            uint64_t qr = limits->requests[w], qt = limits->tokens[w],
                     qc = limits->cost[w];
            if (!qr && !qt && !qc)
                continue;
            mask += 1 << (2 + w);
            s_entry_t *entry = s_get (self, k[3 + w], now_ms);
            double r = entry ? (double)entry->r : 0, t = entry ? (double)entry->t : 0,
                   c = entry ? (double)entry->c : 0;
            int64_t wait = windows->end[w] - now_ms;
            if (wait < 1)
                wait = 1;
            if (qr && r + 1 > (double)qr)
                which = GW_LIMIT_REQUESTS + w, retry = wait;
            else if (qt && t + tokens > (double)qt)
                which = GW_LIMIT_TOKENS + w, retry = wait;
            else if (qc && c + cost > (double)qc)
                which = GW_LIMIT_COST + w, retry = wait;
            else
                writes[nwrites++] = (s_write_t){3, k[3 + w], (double)windows->expire[w]};
        }
        if (which)
            break;
        if (limits->budget > 0) {
            mask += 64;
            s_entry_t *entry = s_get (self, k[7], now_ms);
            double spent = entry ? (double)entry->num : 0;
            if (spent + cost > (double)limits->budget) {
                which = GW_LIMIT_BUDGET, retry = -1;
                break;
            }
            writes[nwrites++] = (s_write_t){4, k[7], 0};
        }
        masks[i] = mask;
        steps[i] = step;
    }
    result->limit_requests = hr[0], result->remaining_requests = hr[1];
    result->reset_requests_ms = hr[2];
    result->limit_tokens = ht[0], result->remaining_tokens = ht[1];
    result->reset_tokens_ms = ht[2];
    if (which) {
        result->limit = which;
        result->scope = at;
        result->retry_after_ms = retry;
        return 1;
    }
    for (int i = 0; i < nwrites; i++) {
        const s_write_t *op = &writes[i];
        if (op->op == 1)
            s_mem_set_tat (self, op->key, op->value, now);
        else if (op->op == 2) {
            s_entry_t *entry = s_put (self, op->key, now_ms);
            if (entry->leases_size == entry->leases_max) {
                entry->leases_max = entry->leases_max ? entry->leases_max * 2 : 4;
                entry->leases = (s_lease_t *)realloc (
                    entry->leases, entry->leases_max * sizeof (s_lease_t));
                assert (entry->leases);
            }
            s_lease_t *lease = &entry->leases[entry->leases_size++];
            snprintf (lease->rid, sizeof (lease->rid), "%s", rid_hex);
            lease->expires = now_ms + lease_ms;
            int64_t ttl = entry->expires ? entry->expires - now_ms : -1;
            if (ttl < lease_ms + 1000)
                entry->expires = now_ms + lease_ms + 1000;
        }
        else if (op->op == 3) {
            s_entry_t *entry = s_put (self, op->key, now_ms);
            entry->r += 1;
            entry->t += (int64_t)request->tokens;
            entry->c += (int64_t)request->cost;
            entry->expires = (int64_t)op->value;
        }
        else {
            s_entry_t *entry = s_put (self, op->key, now_ms);
            entry->num += (int64_t)request->cost;
            entry->expires = now_ms + BUDGET_TTL_MS;
        }
    }
    s_entry_t *record = s_put (self, keys[0], now_ms);
    record->state = 1;
    record->tk = (int64_t)request->tokens;
    record->cost = (int64_t)request->cost;
    record->ref_ms = ref_ms;
    record->scopes = (int)request->scopes;
    record->scope_list = strdup (scope_list);
    memcpy (record->mask, masks, sizeof (masks));
    memcpy (record->step, steps, sizeof (steps));
    record->expires = now_ms + lease_ms;
    result->admitted = true;
    return 0;
}

//  Settle or release (mode 1: the usage is ignored; mode 2: only the lease
//  ends, the record stays held). A settle of a released record (a
//  tombstone) adds the whole actual usage: the estimate was given back.
static int
s_mem_settle (gw_limiter_t *self, char keys[][KEY_MAX], const char *rid_hex, double now,
    s_entry_t *record, int64_t tokens, int64_t cost, int release)
{
    int64_t now_ms = (int64_t)floor (now / 1000);
    double dt = (double)(tokens - record->tk);
    double dc = (double)(cost - record->cost);
    if (record->state == 3)
        dt = (double)tokens, dc = (double)cost;
    if (release == 1)
        dt = -(double)record->tk, dc = -(double)record->cost;
    if (release == 2)
        dt = 0, dc = 0;
    for (int i = 0; i < record->scopes; i++) {
        char (*k)[KEY_MAX] = keys + 1 + i * KEYS_PER_SCOPE;
        int mask = record->mask[i];
        double T = record->step[i];
        if ((mask & 1) && dt != 0 && T > 0) {
            s_entry_t *entry = s_get (self, k[1], now_ms);
            double tat = entry ? (double)entry->num : now;
            if (tat < now)
                tat = now;
            double nw = ceil (tat + dt * T);
            if (nw > now)
                s_mem_set_tat (self, k[1], nw, now);
            else if (entry)
                zhashx_delete (self->table, k[1]);
        }
        if (mask & 2) {
            s_entry_t *entry = s_get (self, k[2], now_ms);
            for (size_t l = 0; entry && l < entry->leases_size; l++)
                if (streq (entry->leases[l].rid, rid_hex)) {
                    entry->leases[l] = entry->leases[--entry->leases_size];
                    break;
                }
        }
        for (int w = 0; w < GW_LIMITER_WINDOWS; w++) {
            s_entry_t *entry =
                (mask & (1 << (2 + w))) ? s_get (self, k[3 + w], now_ms) : NULL;
            if (entry) {
                entry->t += (int64_t)dt;
                if (entry->t < 0)
                    entry->t = 0;
                entry->c += (int64_t)dc;
                if (entry->c < 0)
                    entry->c = 0;
            }
        }
        s_entry_t *entry = (mask & 64) && dc != 0 ? s_get (self, k[7], now_ms) : NULL;
        if (entry) {
            entry->num += (int64_t)dc;
            if (entry->num < 0)
                entry->num = 0;
        }
        if ((mask & 64) && release == 0 && cost > 0) {
            entry = s_put (self, k[8], now_ms);
            entry->num += cost;
            entry->expires = now_ms + BUDGET_TTL_MS;
        }
    }
    if (release == 0)
        record->state = 2;
    else if (release == 1) {
        record->state = 3;
        if (record->expires < now_ms + TOMBSTONE_MS)
            record->expires = now_ms + TOMBSTONE_MS;
    }
    return 1;
}

//  --------------------------------------------------------------------------
//  Redis back end: connection and outage handling

static void
s_outage (gw_limiter_t *self, const char *reason)
{
    char why[160];  //  reason may live in the context freed below
    snprintf (why, sizeof (why), "%s", reason);
    if (self->ctx) {
        redisFree (self->ctx);
        self->ctx = NULL;
    }
    int64_t now = gw_mono_ms ();
    self->retry_at = now + self->backoff_ms;
    self->backoff_ms = self->backoff_ms ? self->backoff_ms * 2 : 100;
    if (self->backoff_ms > BACKOFF_MAX_MS)
        self->backoff_ms = BACKOFF_MAX_MS;
    if (!self->down) {
        self->down = true;
        self->down_since = now;
        self->failed_calls = 0;
        gw_warn ("ratelimit: Redis %s:%d unavailable (%s): failing %s until it returns",
            self->host, self->port, why,
            self->fail_open ? "OPEN (requests pass unlimited)"
                            : "CLOSED (requests refused with 429)");
    }
}

//  A command on the connection; NULL (and an outage) on I/O failure.
static redisReply *
s_command (gw_limiter_t *self, int argc, const char **argv, const size_t *lens)
{
    redisReply *reply = (redisReply *)redisCommandArgv (self->ctx, argc, argv, lens);
    if (!reply)
        s_outage (self, self->ctx->errstr[0] ? self->ctx->errstr : "I/O error");
    return reply;
}

static int
s_load (gw_limiter_t *self, const char *script, char sha[41])
{
    const char *argv[] = {"SCRIPT", "LOAD", script};
    size_t lens[] = {6, 4, strlen (script)};
    redisReply *reply = s_command (self, 3, argv, lens);
    if (!reply)
        return -1;
    int rc = -1;
    if (reply->type == REDIS_REPLY_STRING && reply->len == 40) {
        memcpy (sha, reply->str, 40);
        sha[40] = 0;
        rc = 0;
    }
    else
        s_outage (
            self, reply->type == REDIS_REPLY_ERROR ? reply->str : "SCRIPT LOAD failed");
    freeReplyObject (reply);
    return rc;
}

//  True when connected (connecting now if the back-off allows).
static bool
s_ready (gw_limiter_t *self)
{
    if (self->ctx)
        return true;
    if (gw_mono_ms () < self->retry_at)
        return false;
    struct timeval tv = {self->timeout_ms / 1000, (self->timeout_ms % 1000) * 1000};
    self->ctx = redisConnectWithTimeout (self->host, self->port, tv);
    if (!self->ctx || self->ctx->err) {
        char why[160];
        snprintf (
            why, sizeof (why), "%s", self->ctx ? self->ctx->errstr : "out of memory");
        s_outage (self, why);
        return false;
    }
    redisSetTimeout (self->ctx, tv);
    if (self->password) {
        const char *argv[] = {"AUTH", self->user, self->password};
        const char *pargv[] = {"AUTH", self->password};
        redisReply *reply = self->user ? s_command (self, 3, argv, NULL)
                                       : s_command (self, 2, pargv, NULL);
        if (!reply)
            return false;
        bool ok = reply->type == REDIS_REPLY_STATUS;
        if (!ok)
            s_outage (
                self, reply->type == REDIS_REPLY_ERROR ? reply->str : "AUTH failed");
        freeReplyObject (reply);
        if (!ok)
            return false;
    }
    if (self->db) {
        char db[16];
        snprintf (db, sizeof (db), "%d", self->db);
        const char *argv[] = {"SELECT", db};
        redisReply *reply = s_command (self, 2, argv, NULL);
        if (!reply)
            return false;
        bool ok = reply->type == REDIS_REPLY_STATUS;
        if (!ok)
            s_outage (
                self, reply->type == REDIS_REPLY_ERROR ? reply->str : "SELECT failed");
        freeReplyObject (reply);
        if (!ok)
            return false;
    }
    if (s_load (self, s_admit_lua, self->sha_admit) ||
        s_load (self, s_settle_lua, self->sha_settle))
        return false;
    self->backoff_ms = 0;
    if (self->down) {
        self->down = false;
        gw_info ("ratelimit: Redis %s:%d available again after %" PRId64 " ms (%" PRIu64
                 " call(s) answered by the fail mode)",
            self->host, self->port, gw_mono_ms () - self->down_since, self->failed_calls);
    }
    return true;
}

//  Run a script call; on an I/O failure (a reply later than the timeout on
//  a loaded machine, a dropped connection) run it once more on a fresh
//  connection before the fail mode takes over. Both scripts are idempotent
//  per rid (admit finds the record it wrote and answers "already admitted";
//  settle and release find the record settled or tombstoned), so a first
//  attempt that did run is not counted twice, and a token it took is not
//  lost to a refusal. NULL: an outage (logged).
static redisReply *
s_command_retry (gw_limiter_t *self, int argc, const char **argv, const size_t *lens)
{
    redisReply *reply = (redisReply *)redisCommandArgv (self->ctx, argc, argv, lens);
    if (reply)
        return reply;
    char why[160];
    snprintf (
        why, sizeof (why), "%s", self->ctx->errstr[0] ? self->ctx->errstr : "I/O error");
    redisFree (self->ctx);
    self->ctx = NULL;
    self->retry_at = 0;  //  reconnect now, once
    if (!s_ready (self))
        return NULL;  //  s_ready declared the outage
    reply = (redisReply *)redisCommandArgv (self->ctx, argc, argv, lens);
    if (!reply)
        s_outage (self, self->ctx->errstr[0] ? self->ctx->errstr : why);
    return reply;
}

//  EVALSHA (loading the script again on NOSCRIPT). argv[0..1] are filled
//  here. Returns the reply (caller frees) or NULL (outage or error reply,
//  logged).
static redisReply *
s_eval (gw_limiter_t *self, bool admit, int argc, const char **argv, size_t *lens)
{
    for (int attempt = 0; attempt < 2; attempt++) {
        argv[0] = "EVALSHA";
        lens[0] = 7;
        argv[1] = admit ? self->sha_admit : self->sha_settle;
        lens[1] = 40;
        redisReply *reply = s_command_retry (self, argc, argv, lens);
        if (!reply)
            return NULL;
        if (reply->type != REDIS_REPLY_ERROR)
            return reply;
        bool noscript = strncmp (reply->str, "NOSCRIPT", 8) == 0;
        if (!noscript || attempt) {
            int64_t now = gw_mono_ms ();
            if (now - self->error_logged > 10000 || !self->error_logged) {
                self->error_logged = now;
                gw_error ("ratelimit: Redis %s:%d answered an error: %.200s", self->host,
                    self->port, reply->str);
            }
            freeReplyObject (reply);
            return NULL;
        }
        freeReplyObject (reply);
        if (s_load (self, admit ? s_admit_lua : s_settle_lua,
                admit ? self->sha_admit : self->sha_settle))
            return NULL;
    }
    return NULL;
}

static bool
s_int (const redisReply *reply, int64_t *value)
{
    if (reply->type != REDIS_REPLY_INTEGER)
        return false;
    *value = (int64_t)reply->integer;
    return true;
}

//  Arguments of the admit script, from argv[2] on (s_eval fills 0 and 1),
//  pointing into keys, rid_hex, scope_list and numbers. Returns argc.
//  KEYS: record, then 9 per scope. ARGV: 1 now µs (0 = TIME), 2 rid,
//  3 tokens, 4 cost, 5 lease ms, 6 scopes, 7 budget TTL ms, 8..11 window
//  ends, 12..15 window expiries, 16 reference ms, 17 scope list, then 17
//  numbers per scope (rpm, burst, tpm, concurrency, requests[4], tokens[4],
//  cost[4], budget).
typedef struct {
    const char *argv[3 + KEYS_MAX + 17 + GW_LIMITER_SCOPES_MAX * ARGS_PER_SCOPE];
    size_t lens[3 + KEYS_MAX + 17 + GW_LIMITER_SCOPES_MAX * ARGS_PER_SCOPE];
    char numbers[17 + GW_LIMITER_SCOPES_MAX * ARGS_PER_SCOPE][24];
    char nkeys[8];
} s_admit_args_t;

static size_t
s_admit_args (gw_limiter_t *self, const gw_limiter_request_t *request,
    char keys[][KEY_MAX], const char *rid_hex, const s_windows_t *windows, int64_t ref_ms,
    const char *scope_list, s_admit_args_t *args)
{
    size_t nkeys = 1 + request->scopes * KEYS_PER_SCOPE;
    size_t nargs = 17 + request->scopes * ARGS_PER_SCOPE;
    size_t argc = 3 + nkeys + nargs;
    const char **argv = args->argv;
    snprintf (args->nkeys, sizeof (args->nkeys), "%zu", nkeys);
    argv[2] = args->nkeys;
    for (size_t i = 0; i < nkeys; i++)
        argv[3 + i] = keys[i];
    int64_t values[17 + GW_LIMITER_SCOPES_MAX * ARGS_PER_SCOPE];
    size_t v = 0;
    values[v++] = self->fake_us;
    values[v++] = 0;  //  rid (text, below)
    values[v++] = (int64_t)request->tokens;
    values[v++] = (int64_t)request->cost;
    values[v++] = request->lease_ms;
    values[v++] = (int64_t)request->scopes;
    values[v++] = BUDGET_TTL_MS;
    for (int w = 0; w < GW_LIMITER_WINDOWS; w++)
        values[v++] = windows->end[w];
    for (int w = 0; w < GW_LIMITER_WINDOWS; w++)
        values[v++] = windows->expire[w];
    values[v++] = ref_ms;
    values[v++] = 0;  //  scope list (text, below)
    for (size_t i = 0; i < request->scopes; i++) {
        const gw_limits_t *limits = &request->limits[i];
        values[v++] = (int64_t)limits->rpm;
        values[v++] = (int64_t)limits->burst;
        values[v++] = (int64_t)limits->tpm;
        values[v++] = (int64_t)limits->concurrency;
        for (int w = 0; w < GW_LIMITER_WINDOWS; w++)
            values[v++] = (int64_t)limits->requests[w];
        for (int w = 0; w < GW_LIMITER_WINDOWS; w++)
            values[v++] = (int64_t)limits->tokens[w];
        for (int w = 0; w < GW_LIMITER_WINDOWS; w++)
            values[v++] = (int64_t)limits->cost[w];
        values[v++] = (int64_t)limits->budget;
    }
    assert (v == nargs);
    for (size_t i = 0; i < nargs; i++) {
        snprintf (args->numbers[i], sizeof (args->numbers[i]), "%" PRId64, values[i]);
        argv[3 + nkeys + i] = args->numbers[i];
    }
    argv[3 + nkeys + 1] = rid_hex;
    argv[3 + nkeys + 16] = scope_list;
    for (size_t i = 2; i < argc; i++)
        args->lens[i] = strlen (argv[i]);
    return argc;
}

//  Read the admit script's answer into result: 0 admitted, 1 refused, -1
//  if it is not a valid answer (logged).
static int
s_admit_reply (const redisReply *reply, const gw_limiter_request_t *request,
    gw_limiter_result_t *result)
{
    int64_t f[10];
    bool ok = reply->type == REDIS_REPLY_ARRAY && reply->elements == 10;
    for (size_t i = 0; ok && i < 10; i++)
        ok = s_int (reply->element[i], &f[i]);
    if (!ok || f[0] < 0 || f[0] > 2 || f[1] < 0 || f[1] > GW_LIMIT_BUDGET || f[2] < -1 ||
        f[2] >= (int64_t)request->scopes) {
        gw_error ("ratelimit: Redis answered the admit script with an unexpected reply");
        return -1;
    }
    result->admitted = f[0] != 0;
    result->duplicate = f[0] == 2;
    result->limit = (int)f[1];
    result->scope = (int)f[2];
    result->retry_after_ms = f[3];
    result->limit_requests = f[4], result->remaining_requests = f[5];
    result->reset_requests_ms = f[6];
    result->limit_tokens = f[7], result->remaining_tokens = f[8];
    result->reset_tokens_ms = f[9];
    return result->admitted ? 0 : 1;
}

//  Call the admit script. Returns 0 admitted, 1 refused, -1 unavailable.
static int
s_redis_admit (gw_limiter_t *self, const gw_limiter_request_t *request,
    char keys[][KEY_MAX], const char *rid_hex, const s_windows_t *windows, int64_t ref_ms,
    const char *scope_list, gw_limiter_result_t *result)
{
    s_admit_args_t args;
    args.argv[0] = "EVALSHA";  //  s_eval sets it too; set here for cppcheck
    args.lens[0] = 7;
    size_t argc =
        s_admit_args (self, request, keys, rid_hex, windows, ref_ms, scope_list, &args);
    redisReply *reply = s_eval (self, true, (int)argc, args.argv, args.lens);
    if (!reply)
        return -1;
    int rc = s_admit_reply (reply, request, result);
    freeReplyObject (reply);
    return rc;
}

//  --------------------------------------------------------------------------
//  Operations

static double
s_now_us (gw_limiter_t *self)
{
    return (double)(self->fake_us ? self->fake_us : gw_time_us ());
}

//  Join scopes with '\n' into out (size checked by the caller's bounds).
static void
s_join (const gw_limiter_request_t *request, char *out, size_t size)
{
    size_t used = 0;
    out[0] = 0;
    for (size_t i = 0; i < request->scopes; i++)
        used += (size_t)snprintf (
            out + used, size - used, "%s%s", i ? "\n" : "", request->scope[i]);
}

static void
s_admit_check (const gw_limiter_request_t *request)
{
    assert (request);
    assert (request->scopes <= GW_LIMITER_SCOPES_MAX);
    assert (request->lease_ms > 0);
    for (size_t i = 0; i < request->scopes; i++) {
        assert (request->scope[i] && *request->scope[i]);
        assert (strlen (request->scope[i]) <= GW_LIMITER_SCOPE_MAX);
        assert (!strchr (request->scope[i], '\n'));
    }
}

//  What an admission needs besides the request: its rid in hex, its scope
//  list, the windows of now and every key.
typedef struct {
    char rid_hex[33];
    char scope_list[GW_LIMITER_SCOPES_MAX * (GW_LIMITER_SCOPE_MAX + 1) + 1];
    double now;
    int64_t ref_ms;
    s_windows_t windows;
    char keys[KEYS_MAX][KEY_MAX];
} s_admission_t;

//  Fill admission for request (the mutex held: the clock and windows).
static void
s_admission (
    gw_limiter_t *self, const gw_limiter_request_t *request, s_admission_t *admission)
{
    gw_rid_hex (request->rid, admission->rid_hex);
    s_join (request, admission->scope_list, sizeof (admission->scope_list));
    admission->now = s_now_us (self);
    admission->ref_ms = (int64_t)floor (admission->now / 1000);
    s_windows (admission->ref_ms, &admission->windows);
    s_keys (self->prefix, admission->rid_hex, request->scopes, request->scope,
        &admission->windows, admission->keys);
}

//  The answer when the back end is unavailable: the fail mode.
static int
s_admit_unavailable (gw_limiter_t *self, gw_limiter_result_t *result)
{
    self->failed_calls++;
    s_result_init (result);
    result->unavailable = true;
    result->admitted = self->fail_open;
    result->limit = self->fail_open ? GW_LIMIT_NONE : GW_LIMIT_UNAVAILABLE;
    result->retry_after_ms = self->fail_open ? 0 : 1000;
    return self->fail_open ? 0 : 1;
}

//  One admission, the mutex held.
static int
s_admit_one (
    gw_limiter_t *self, const gw_limiter_request_t *request, gw_limiter_result_t *result)
{
    s_result_init (result);
    s_admission_t admission;
    s_admission (self, request, &admission);
    if (!self->redis)
        return s_mem_admit (self, request, admission.keys, admission.rid_hex,
            &admission.windows, admission.now, admission.ref_ms, admission.scope_list,
            result);
    int rc = s_ready (self)
        ? s_redis_admit (self, request, admission.keys, admission.rid_hex,
              &admission.windows, admission.ref_ms, admission.scope_list, result)
        : -1;
    return rc < 0 ? s_admit_unavailable (self, result) : rc;
}

int
gw_limiter_admit (
    gw_limiter_t *self, const gw_limiter_request_t *request, gw_limiter_result_t *result)
{
    assert (self);
    assert (result);
    s_admit_check (request);
    pthread_mutex_lock (&self->mutex);
    int rc = s_admit_one (self, request, result);
    pthread_mutex_unlock (&self->mutex);
    return rc;
}

//  The batch on Redis, the mutex held and the connection up: every script
//  call in one round trip, in order (Redis runs them one after the other,
//  as the single calls would). An admission whose answer is not known (the
//  connection broke, the script was not loaded, an error) is left at -2
//  for s_admit_one: the script is idempotent per rid, so one that did run
//  answers "already admitted" and takes nothing twice.
static void
s_admit_pipelined (gw_limiter_t *self, const gw_limiter_request_t *requests, size_t count,
    gw_limiter_result_t *results, int *rcs)
{
    s_admission_t *admission = (s_admission_t *)malloc (sizeof (s_admission_t));
    s_admit_args_t *args = (s_admit_args_t *)malloc (sizeof (s_admit_args_t));
    assert (admission && args);
    size_t sent = 0;
    for (sent = 0; sent < count; sent++) {
        rcs[sent] = -2;
        s_admission (self, &requests[sent], admission);
        size_t argc =
            s_admit_args (self, &requests[sent], admission->keys, admission->rid_hex,
                &admission->windows, admission->ref_ms, admission->scope_list, args);
        args->argv[0] = "EVALSHA";
        args->lens[0] = 7;
        args->argv[1] = self->sha_admit;
        args->lens[1] = 40;
        if (redisAppendCommandArgv (self->ctx, (int)argc, args->argv, args->lens) !=
            REDIS_OK)
            break;
    }
    for (size_t i = sent; i < count; i++)
        rcs[i] = -2;
    bool broken = sent < count;
    for (size_t i = 0; i < sent && !broken; i++) {
        redisReply *reply = NULL;
        if (redisGetReply (self->ctx, (void **)&reply) != REDIS_OK || !reply) {
            broken = true;
            break;
        }
        if (reply->type != REDIS_REPLY_ERROR) {
            int rc = s_admit_reply (reply, &requests[i], &results[i]);
            if (rc >= 0)
                rcs[i] = rc;
        }
        freeReplyObject (reply);
    }
    if (broken) {
        //  The connection's state is unknown: drop it, so that s_admit_one
        //  connects again once (as s_command_retry) before the fail mode.
        redisFree (self->ctx);
        self->ctx = NULL;
        self->retry_at = 0;
    }
    free (admission);
    free (args);
}

void
gw_limiter_admit_many (gw_limiter_t *self, const gw_limiter_request_t *requests,
    size_t count, gw_limiter_result_t *results, int *rcs)
{
    assert (self);
    assert ((requests && results && rcs) || count == 0);
    for (size_t i = 0; i < count; i++) {
        s_admit_check (&requests[i]);
        s_result_init (&results[i]);
        rcs[i] = -2;
    }
    pthread_mutex_lock (&self->mutex);
    if (self->redis && count > 1 && s_ready (self))
        s_admit_pipelined (self, requests, count, results, rcs);
    for (size_t i = 0; i < count; i++)
        if (rcs[i] == -2)
            rcs[i] = s_admit_one (self, &requests[i], &results[i]);
    pthread_mutex_unlock (&self->mutex);
}

//  Split the record's scope list (in place) into scopes; returns the count
//  or -1 if it is not a valid list for count scopes.
static int
s_split (char *list, int64_t count, const char **scopes)
{
    if (count < 0 || count > GW_LIMITER_SCOPES_MAX)
        return -1;
    int found = 0;
    if (count == 0)
        return *list ? -1 : 0;
    for (char *p = list; found < count;) {
        scopes[found++] = p;
        char *nl = strchr (p, '\n');
        if (!nl)
            break;
        *nl = 0;
        p = nl + 1;
    }
    for (int i = 0; i < found; i++)
        if (!*scopes[i] || strlen (scopes[i]) > GW_LIMITER_SCOPE_MAX)
            return -1;
    return found == count ? found : -1;
}

//  Read an HMGET s t n sc reply of rid's record: 1 with keys (nkeys of
//  them) filled when the script must run, 0 when there is nothing to do
//  (unknown, expired, or already finished), -1 if the reply or the record
//  is malformed (logged).
static int
s_finish_keys (gw_limiter_t *self, const redisReply *reply, int release,
    const char *rid_hex, char keys[][KEY_MAX], size_t *nkeys)
{
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 4)
        return -1;
    redisReply **f = reply->element;
    if (f[0]->type != REDIS_REPLY_STRING ||
        !(streq (f[0]->str, "1") || (streq (f[0]->str, "3") && release == 0)))
        return 0;
    bool ok = f[1]->type == REDIS_REPLY_STRING && f[2]->type == REDIS_REPLY_STRING &&
        f[3]->type == REDIS_REPLY_STRING;
    const char *scopes[GW_LIMITER_SCOPES_MAX];
    int count = -1;
    char *list = NULL;
    int64_t ref_ms = 0;
    if (ok) {
        ref_ms = strtoll (f[1]->str, NULL, 10);
        list = strdup (f[3]->str);
        assert (list);
        count = s_split (list, strtoll (f[2]->str, NULL, 10), scopes);
    }
    if (count < 0 || ref_ms <= 0) {
        gw_error ("ratelimit: malformed reservation record %s in Redis", keys[0]);
        free (list);
        return -1;
    }
    s_windows_t windows;
    s_windows (ref_ms, &windows);
    s_keys (self->prefix, rid_hex, (size_t)count, scopes, &windows, keys);
    free (list);
    *nkeys = 1 + (size_t)count * KEYS_PER_SCOPE;
    return 1;
}

//  The settle script's arguments, from argv[2] on (s_eval fills 0 and 1).
//  KEYS as for admit. ARGV: 1 now µs (0 = TIME), 2 rid, 3 tokens, 4 cost,
//  5 mode (0 settle, 1 release, 2 unlease), 6 tombstone ms. numbers holds
//  the digits argv points to. Returns argc.
static size_t
s_finish_args (gw_limiter_t *self, const char *rid_hex, char keys[][KEY_MAX],
    size_t nkeys, uint64_t tokens, uint64_t cost, int release, const char **argv,
    size_t *lens, char numbers[5][24])
{
    snprintf (numbers[0], sizeof (numbers[0]), "%zu", nkeys);
    argv[2] = numbers[0];
    for (size_t i = 0; i < nkeys; i++)
        argv[3 + i] = keys[i];
    snprintf (numbers[1], sizeof (numbers[1]), "%" PRId64, self->fake_us);
    snprintf (numbers[2], sizeof (numbers[2]), "%" PRIu64, tokens);
    snprintf (numbers[3], sizeof (numbers[3]), "%" PRIu64, cost);
    argv[3 + nkeys] = numbers[1];
    argv[4 + nkeys] = rid_hex;
    argv[5 + nkeys] = numbers[2];
    argv[6 + nkeys] = numbers[3];
    argv[7 + nkeys] = release == 2 ? "2" : release ? "1" : "0";
    snprintf (numbers[4], sizeof (numbers[4]), "%d", TOMBSTONE_MS);
    argv[8 + nkeys] = numbers[4];
    size_t argc = 9 + nkeys;
    for (size_t i = 2; i < argc; i++)
        lens[i] = strlen (argv[i]);
    return argc;
}

//  The settle script's answer: 0 or 1, or -1 if it is not one of those.
static int
s_finish_result (const redisReply *reply)
{
    int64_t value = -1;
    return s_int (reply, &value) && (value == 0 || value == 1) ? (int)value : -1;
}

//  One settle, release (1) or unlease (2), the mutex held.
static int
s_finish_one (gw_limiter_t *self, const uint8_t rid[16], uint64_t tokens, uint64_t cost,
    int release)
{
    char rid_hex[33];
    gw_rid_hex (rid, rid_hex);
    char keys[KEYS_MAX][KEY_MAX];
    s_key (keys[0], self->prefix, "r:", rid_hex, NULL);
    if (!self->redis) {
        double now = s_now_us (self);
        int64_t now_ms = (int64_t)floor (now / 1000);
        s_entry_t *record = s_get (self, keys[0], now_ms);
        if (!record || !(record->state == 1 || (record->state == 3 && release == 0)))
            return 0;
        const char *scopes[GW_LIMITER_SCOPES_MAX];
        s_windows_t windows;
        char *list = strdup (record->scope_list);
        assert (list);
        int count = s_split (list, record->scopes, scopes);
        assert (count >= 0);  //  written by admit
        s_windows (record->ref_ms, &windows);
        s_keys (self->prefix, rid_hex, (size_t)count, scopes, &windows, keys);
        int rc = s_mem_settle (
            self, keys, rid_hex, now, record, (int64_t)tokens, (int64_t)cost, release);
        free (list);
        return rc;
    }
    if (!s_ready (self))
        return -1;
    const char *hargv[] = {"HMGET", keys[0], "s", "t", "n", "sc"};
    redisReply *reply = s_command (self, 6, hargv, NULL);
    if (!reply)
        return -1;
    size_t nkeys = 0;
    int rc = s_finish_keys (self, reply, release, rid_hex, keys, &nkeys);
    freeReplyObject (reply);
    if (rc <= 0)
        return rc;
    const char *argv[3 + KEYS_MAX + 6];
    size_t lens[3 + KEYS_MAX + 6];
    char numbers[5][24];
    size_t argc = s_finish_args (
        self, rid_hex, keys, nkeys, tokens, cost, release, argv, lens, numbers);
    reply = s_eval (self, false, (int)argc, argv, lens);
    if (!reply)
        return -1;
    rc = s_finish_result (reply);
    freeReplyObject (reply);
    return rc;
}

//  The batch on Redis, the mutex held and the connection up: every HMGET
//  in one round trip, then every script call due in a second one. An item
//  whose result is not known from the batch (the connection broke, the
//  script was not loaded) is left at -2 for s_finish_one; the scripts are
//  idempotent per rid, so running one again is safe.
static void
s_finish_pipelined (
    gw_limiter_t *self, const gw_limiter_finish_t *items, size_t count, int *results)
{
    char rid_hex[33];
    char keys[KEYS_MAX][KEY_MAX];
    const char *argv[3 + KEYS_MAX + 6];
    size_t lens[3 + KEYS_MAX + 6];
    char numbers[5][24];
    bool *scripted = (bool *)calloc (count ? count : 1, sizeof (bool));
    assert (scripted);
    size_t i = 0;
    for (i = 0; i < count; i++) {
        results[i] = -2;
        gw_rid_hex (items[i].rid, rid_hex);
        s_key (keys[0], self->prefix, "r:", rid_hex, NULL);
        const char *hargv[] = {"HMGET", keys[0], "s", "t", "n", "sc"};
        if (redisAppendCommandArgv (self->ctx, 6, hargv, NULL) != REDIS_OK)
            goto broken;
    }
    for (i = 0; i < count; i++) {
        redisReply *reply = NULL;
        if (redisGetReply (self->ctx, (void **)&reply) != REDIS_OK || !reply)
            goto broken;
        gw_rid_hex (items[i].rid, rid_hex);
        s_key (keys[0], self->prefix, "r:", rid_hex, NULL);
        size_t nkeys = 0;
        int rc = s_finish_keys (self, reply, items[i].mode, rid_hex, keys, &nkeys);
        freeReplyObject (reply);
        if (rc <= 0) {
            results[i] = rc;
            continue;
        }
        size_t argc = s_finish_args (self, rid_hex, keys, nkeys, items[i].tokens,
            items[i].cost, items[i].mode, argv, lens, numbers);
        argv[0] = "EVALSHA";
        lens[0] = 7;
        argv[1] = self->sha_settle;
        lens[1] = 40;
        if (redisAppendCommandArgv (self->ctx, (int)argc, argv, lens) != REDIS_OK)
            goto broken;
        scripted[i] = true;
    }
    for (i = 0; i < count; i++) {
        if (!scripted[i])
            continue;
        redisReply *reply = NULL;
        if (redisGetReply (self->ctx, (void **)&reply) != REDIS_OK || !reply)
            goto broken;
        //  An error (NOSCRIPT after a restart of Redis, or another) is left
        //  to s_finish_one, which reloads the script or logs the error.
        if (reply->type != REDIS_REPLY_ERROR)
            results[i] = s_finish_result (reply);
        freeReplyObject (reply);
    }
    free (scripted);
    return;
broken:
    //  The connection's state is unknown: drop it, so that s_finish_one
    //  connects again once (like s_command_retry) before the fail mode.
    redisFree (self->ctx);
    self->ctx = NULL;
    self->retry_at = 0;
    free (scripted);
}

static int
s_finish (gw_limiter_t *self, const uint8_t rid[16], uint64_t tokens, uint64_t cost,
    int release)
{
    assert (self);
    assert (rid);
    pthread_mutex_lock (&self->mutex);
    int rc = s_finish_one (self, rid, tokens, cost, release);
    if (rc < 0)
        self->failed_calls++;
    pthread_mutex_unlock (&self->mutex);
    return rc;
}

int
gw_limiter_finish (
    gw_limiter_t *self, const gw_limiter_finish_t *items, size_t count, int *results)
{
    assert (self);
    assert (items || count == 0);
    assert (results || count == 0);
    pthread_mutex_lock (&self->mutex);
    if (self->redis && count > 1 && s_ready (self))
        s_finish_pipelined (self, items, count, results);
    else
        for (size_t i = 0; i < count; i++)
            results[i] = -2;
    int changed = 0;
    bool failed = false;
    for (size_t i = 0; i < count; i++) {
        assert (items[i].mode >= 0 && items[i].mode <= 2);
        if (results[i] == -2)
            results[i] = s_finish_one (
                self, items[i].rid, items[i].tokens, items[i].cost, items[i].mode);
        if (results[i] < 0) {
            self->failed_calls++;
            failed = true;
        }
        else
            changed += results[i];
    }
    pthread_mutex_unlock (&self->mutex);
    return failed ? -1 : changed;
}

int
gw_limiter_settle (
    gw_limiter_t *self, const uint8_t rid[16], uint64_t tokens, uint64_t cost)
{
    return s_finish (self, rid, tokens, cost, 0);
}

int
gw_limiter_release (gw_limiter_t *self, const uint8_t rid[16])
{
    return s_finish (self, rid, 0, 0, 1);
}

int
gw_limiter_unlease (gw_limiter_t *self, const uint8_t rid[16])
{
    return s_finish (self, rid, 0, 0, 2);
}

int
gw_limiter_budget_settled (gw_limiter_t *self, const char *scope, uint64_t *settled)
{
    assert (self);
    assert (scope && *scope && strlen (scope) <= GW_LIMITER_SCOPE_MAX);
    assert (settled);
    char key[KEY_MAX];
    s_key (key, self->prefix, "bs:", scope, NULL);
    int rc = -1;
    pthread_mutex_lock (&self->mutex);
    if (!self->redis) {
        int64_t now_ms = (int64_t)floor (s_now_us (self) / 1000);
        s_entry_t *entry = s_get (self, key, now_ms);
        *settled = entry && entry->num > 0 ? (uint64_t)entry->num : 0;
        pthread_mutex_unlock (&self->mutex);
        return 0;
    }
    if (s_ready (self)) {
        const char *argv[] = {"GET", key};
        redisReply *reply = s_command (self, 2, argv, NULL);
        if (reply) {
            if (reply->type == REDIS_REPLY_NIL) {
                *settled = 0;
                rc = 0;
            }
            else if (reply->type == REDIS_REPLY_STRING) {
                char *end = NULL;
                long long value = strtoll (reply->str, &end, 10);
                if (end && !*end && end != reply->str) {
                    *settled = value > 0 ? (uint64_t)value : 0;
                    rc = 0;
                }
            }
            freeReplyObject (reply);
        }
    }
    if (rc < 0)
        self->failed_calls++;
    pthread_mutex_unlock (&self->mutex);
    return rc;
}

//  --------------------------------------------------------------------------
//  Self test

#define T0 ((int64_t)1894710030000000)  //  2030-01-15 12:00:30 UTC, µs

static gw_limiter_request_t
s_request (const char *scope, const gw_limits_t *limits, uint64_t tokens, uint64_t cost)
{
    gw_limiter_request_t request;
    memset (&request, 0, sizeof (request));
    gw_rid_new (request.rid);
    request.scopes = 1;
    request.scope[0] = scope;
    request.limits[0] = *limits;
    request.tokens = tokens;
    request.cost = cost;
    request.lease_ms = 60000;
    return request;
}

//  Admit a fresh request for one scope; returns the rc, result in *result.
static int
s_try (gw_limiter_t *self, const char *scope, const gw_limits_t *limits, uint64_t tokens,
    uint64_t cost, gw_limiter_result_t *result, uint8_t *rid_out)
{
    gw_limiter_request_t request = s_request (scope, limits, tokens, cost);
    if (rid_out)
        memcpy (rid_out, request.rid, 16);
    return gw_limiter_admit (self, &request, result);
}

static int
s_count (gw_limiter_t *self, const char *scope, const gw_limits_t *limits, int attempts,
    uint64_t tokens, uint64_t cost)
{
    int admitted = 0;
    gw_limiter_result_t result;
    for (int i = 0; i < attempts; i++)
        if (s_try (self, scope, limits, tokens, cost, &result, NULL) == 0)
            admitted++;
    return admitted;
}

//  The semantics, identical on both back ends. Uses the fake clock.
static void
s_semantics (gw_limiter_t *self, bool verbose)
{
    gw_limiter_result_t result;
    uint8_t rid[16], rid2[16], rid3[16];
    int64_t now = T0;
    gw_limiter_set_time (self, now);

    //  RPM 100 / burst 100: exactly 100 at once, then one per 600 ms.
    gw_limits_t rpm = {0};
    rpm.rpm = 100;
    rpm.burst = 100;
    assert (s_try (self, "key:burst", &rpm, 0, 0, &result, NULL) == 0);
    assert (result.limit_requests == 100 && result.remaining_requests == 99);
    assert (result.reset_requests_ms == 600);
    assert (s_count (self, "key:burst", &rpm, 120, 0, 0) == 99);
    assert (s_try (self, "key:burst", &rpm, 0, 0, &result, NULL) == 1);
    assert (!result.admitted && result.limit == GW_LIMIT_RPM && result.scope == 0);
    assert (result.retry_after_ms == 600);
    assert (result.remaining_requests == 0 && result.reset_requests_ms == 60000);
    now += 599000;
    gw_limiter_set_time (self, now);
    assert (s_count (self, "key:burst", &rpm, 5, 0, 0) == 0);
    now += 1000;
    gw_limiter_set_time (self, now);
    assert (s_count (self, "key:burst", &rpm, 5, 0, 0) == 1);
    now += 60000000;  //  a full minute refills the bucket
    gw_limiter_set_time (self, now);
    assert (s_count (self, "key:burst", &rpm, 150, 0, 0) == 100);

    //  A burst smaller than the rate: 5 at once, then one per second.
    gw_limits_t small = {0};
    small.rpm = 60;
    small.burst = 5;
    assert (s_count (self, "key:small", &small, 10, 0, 0) == 5);
    now += 1000000;
    gw_limiter_set_time (self, now);
    assert (s_count (self, "key:small", &small, 10, 0, 0) == 1);

    //  TPM 1000: 600 pass, another 600 waits 12 s (200 tokens at 60 ms);
    //  a request larger than the bucket can never pass.
    gw_limits_t tpm = {0};
    tpm.tpm = 1000;
    assert (s_try (self, "key:tpm", &tpm, 600, 0, &result, rid) == 0);
    assert (result.limit_tokens == 1000 && result.remaining_tokens == 400);
    assert (result.reset_tokens_ms == 36000);
    assert (s_try (self, "key:tpm", &tpm, 600, 0, &result, NULL) == 1);
    assert (result.limit == GW_LIMIT_TPM && result.retry_after_ms == 12000);
    assert (s_try (self, "key:tpm", &tpm, 2000, 0, &result, NULL) == 1);
    assert (result.limit == GW_LIMIT_TPM && result.retry_after_ms == -1);
    //  Settling with fewer tokens gives them back at once.
    assert (gw_limiter_settle (self, rid, 100, 0) == 1);
    assert (s_try (self, "key:tpm", &tpm, 600, 0, &result, NULL) == 0);
    assert (result.remaining_tokens == 300);

    //  All or nothing: a refusal by one scope reserves nothing anywhere.
    gw_limiter_request_t two = s_request ("key:both", &rpm, 0, 0);
    two.scopes = 2;
    two.scope[1] = "user:both";
    memset (&two.limits[0], 0, sizeof (gw_limits_t));
    two.limits[0].rpm = 2;
    two.limits[1].concurrency = 1;
    assert (gw_limiter_admit (self, &two, &result) == 0);
    memcpy (rid, two.rid, 16);
    assert (result.remaining_requests == 1);
    gw_rid_new (two.rid);
    assert (gw_limiter_admit (self, &two, &result) == 1);
    assert (result.limit == GW_LIMIT_CONCURRENCY && result.scope == 1);
    assert (gw_limiter_release (self, rid) == 1);
    gw_rid_new (two.rid);
    assert (gw_limiter_admit (self, &two, &result) == 0);
    assert (result.remaining_requests == 0);  //  the refused one took nothing
    gw_rid_new (two.rid);
    assert (gw_limiter_admit (self, &two, &result) == 1);
    assert (result.limit == GW_LIMIT_RPM && result.scope == 0);

    //  Quotas: fixed UTC windows; the refusal waits for the window's end.
    gw_limits_t quota = {0};
    quota.requests[GW_WINDOW_DAY] = 3;
    assert (s_count (self, "user:q", &quota, 5, 10, 0) == 3);
    assert (s_try (self, "user:q", &quota, 10, 0, &result, NULL) == 1);
    assert (result.limit == GW_LIMIT_REQUESTS + GW_WINDOW_DAY);
    int64_t midnight = (now / 1000 / 86400000 + 1) * 86400000;
    assert (result.retry_after_ms == midnight - now / 1000);
    gw_limits_t minute = {0};
    minute.requests[GW_WINDOW_MINUTE] = 2;
    int64_t next_minute = (now / 60000000 + 1) * 60000000;
    assert (s_count (self, "user:m", &minute, 4, 0, 0) == 2);
    gw_limiter_set_time (self, next_minute - 1);
    assert (s_count (self, "user:m", &minute, 1, 0, 0) == 0);
    gw_limiter_set_time (self, next_minute);
    assert (s_count (self, "user:m", &minute, 4, 0, 0) == 2);
    now = next_minute;
    //  Token quota with settle corrections; a second settle is a no-op.
    gw_limits_t tq = {0};
    tq.tokens[GW_WINDOW_HOUR] = 100;
    assert (s_try (self, "user:t", &tq, 60, 0, &result, rid) == 0);
    assert (s_try (self, "user:t", &tq, 60, 0, &result, NULL) == 1);
    assert (result.limit == GW_LIMIT_TOKENS + GW_WINDOW_HOUR);
    assert (gw_limiter_settle (self, rid, 20, 0) == 1);
    assert (gw_limiter_settle (self, rid, 0, 0) == 0);
    assert (gw_limiter_release (self, rid) == 0);
    assert (s_try (self, "user:t", &tq, 80, 0, &result, NULL) == 0);  //  20 + 80
    assert (s_try (self, "user:t", &tq, 1, 0, &result, NULL) == 1);
    //  Cost quota per month.
    gw_limits_t cq = {0};
    cq.cost[GW_WINDOW_MONTH] = 1000;
    assert (s_try (self, "user:c", &cq, 0, 700, &result, rid) == 0);
    assert (s_try (self, "user:c", &cq, 0, 700, &result, NULL) == 1);
    assert (result.limit == GW_LIMIT_COST + GW_WINDOW_MONTH);
    assert (gw_limiter_settle (self, rid, 0, 300) == 1);
    assert (s_try (self, "user:c", &cq, 0, 700, &result, NULL) == 0);

    //  Budget holds: never overshot, fully usable after settling.
    gw_limits_t budget = {0};
    budget.budget = 1000;
    assert (s_try (self, "user:b", &budget, 0, 400, &result, rid) == 0);
    assert (s_try (self, "user:b", &budget, 0, 400, &result, rid2) == 0);
    assert (s_try (self, "user:b", &budget, 0, 400, &result, NULL) == 1);
    assert (result.limit == GW_LIMIT_BUDGET && result.retry_after_ms == -1);
    assert (gw_limiter_settle (self, rid, 0, 100) == 1);  //  spent 100 + held 400
    assert (s_try (self, "user:b", &budget, 0, 400, &result, rid3) == 0);  //  900
    assert (s_try (self, "user:b", &budget, 0, 200, &result, NULL) == 1);
    assert (gw_limiter_release (self, rid2) == 1);  //  500
    assert (gw_limiter_release (self, rid2) == 0);
    assert (s_try (self, "user:b", &budget, 0, 500, &result, NULL) == 0);  //  1000
    assert (s_try (self, "user:b", &budget, 0, 1, &result, NULL) == 1);
    //  Actual above the estimate is charged too (no free overage).
    assert (gw_limiter_settle (self, rid3, 0, 450) == 1);
    assert (s_try (self, "user:b", &budget, 0, 0, &result, NULL) == 1);
    //  The settled sum counts actual costs only (no holds, no releases).
    uint64_t settled = 1;
    assert (gw_limiter_budget_settled (self, "user:b", &settled) == 0);
    assert (settled == 550);
    assert (gw_limiter_settle (self, rid3, 0, 450) == 0);  //  no double count
    assert (gw_limiter_budget_settled (self, "user:b", &settled) == 0);
    assert (settled == 550);
    assert (gw_limiter_budget_settled (self, "user:none", &settled) == 0);
    assert (settled == 0);

    //  A settle after a release (the edge released a request whose client
    //  left before the first byte, but it had reached a backend, which bills
    //  it) still counts the actual usage, exactly once.
    gw_limits_t late = {0};
    late.tokens[GW_WINDOW_HOUR] = 100;
    late.budget = 1000;
    assert (s_try (self, "user:late", &late, 60, 600, &result, rid) == 0);
    assert (gw_limiter_release (self, rid) == 1);  //  0 tokens, 0 spent
    assert (gw_limiter_unlease (self, rid) == 0);
    assert (gw_limiter_settle (self, rid, 30, 250) == 1);  //  30 tokens, 250 spent
    assert (gw_limiter_settle (self, rid, 30, 250) == 0);
    assert (gw_limiter_release (self, rid) == 0);
    assert (s_try (self, "user:late", &late, 71, 0, &result, NULL) == 1);
    assert (result.limit == GW_LIMIT_TOKENS + GW_WINDOW_HOUR);
    assert (s_try (self, "user:late", &late, 0, 751, &result, NULL) == 1);
    assert (result.limit == GW_LIMIT_BUDGET);
    assert (gw_limiter_budget_settled (self, "user:late", &settled) == 0);
    assert (settled == 250);
    //  The other order: settle, then release (a no-op).
    assert (s_try (self, "user:late", &late, 70, 750, &result, rid2) == 0);
    assert (gw_limiter_settle (self, rid2, 0, 0) == 1);
    assert (gw_limiter_release (self, rid2) == 0);
    assert (s_try (self, "user:late", &late, 70, 750, &result, NULL) == 0);
    assert (s_try (self, "user:late", &late, 1, 0, &result, NULL) == 1);
    //  The tombstone lasts TOMBSTONE_MS, then a late settle finds nothing.
    assert (s_try (self, "user:late2", &late, 10, 10, &result, rid3) == 0);
    assert (gw_limiter_release (self, rid3) == 1);
    if (self->redis) {  //  Redis expires keys by its own clock: check the TTL
        char hex[33];
        gw_rid_hex (rid3, hex);
        redisReply *ttl = (redisReply *)redisCommand (
            self->ctx, "PTTL {%s}:rl:r:%s", self->prefix, hex);
        assert (ttl && ttl->type == REDIS_REPLY_INTEGER);
        assert (ttl->integer > TOMBSTONE_MS - 10000 && ttl->integer <= TOMBSTONE_MS);
        freeReplyObject (ttl);
    }
    else {
        gw_limiter_set_time (self, now + (TOMBSTONE_MS + 1) * 1000LL);
        assert (gw_limiter_settle (self, rid3, 5, 5) == 0);
        gw_limiter_set_time (self, now);
    }

    //  A batch (gw_limiter_finish) does what the single calls do, in order,
    //  also for a rid twice in one batch and for a release then a settle of
    //  the same rid (on Redis: read before any item's script ran).
    gw_limits_t batch = {0};
    batch.tokens[GW_WINDOW_HOUR] = 1000;
    batch.budget = 10000;
    uint8_t holds[4][16];
    for (int i = 0; i < 4; i++)
        assert (s_try (self, "user:batch", &batch, 100, 1000, &result, holds[i]) == 0);
    gw_limiter_finish_t items[7];
    memset (items, 0, sizeof (items));
    memcpy (items[0].rid, holds[0], 16);  //  settle: 10 tokens, 100 spent
    items[0].tokens = 10;
    items[0].cost = 100;
    memcpy (items[1].rid, holds[0], 16);  //  again: a no-op
    items[1].tokens = 10;
    items[1].cost = 100;
    memcpy (items[2].rid, holds[1], 16);  //  release, then settle: counted once
    items[2].mode = 1;
    memcpy (items[3].rid, holds[1], 16);
    items[3].tokens = 20;
    items[3].cost = 200;
    memcpy (items[4].rid, holds[2], 16);  //  unlease: the hold stays
    items[4].mode = 2;
    gw_rid_new (items[5].rid);  //  unknown
    memcpy (items[6].rid, holds[3], 16);  //  release
    items[6].mode = 1;
    int results[7];
    assert (gw_limiter_finish (self, items, 7, results) == 5);
    int expect[7] = {1, 0, 1, 1, 1, 0, 1};
    for (int i = 0; i < 7; i++)
        assert (results[i] == expect[i]);
    assert (gw_limiter_budget_settled (self, "user:batch", &settled) == 0);
    assert (settled == 300);
    //  Used now: 30 tokens and 300 spent, plus holds[2]'s 100 and 1000.
    assert (s_try (self, "user:batch", &batch, 871, 0, &result, NULL) == 1);
    assert (s_try (self, "user:batch", &batch, 0, 8701, &result, NULL) == 1);
    assert (s_try (self, "user:batch", &batch, 870, 8700, &result, NULL) == 0);
    assert (gw_limiter_finish (self, items, 0, results) == 0);

    //  Admissions in a batch (gw_limiter_admit_many): in order, as single
    //  calls; the same rid twice is admitted once (a duplicate).
    gw_limits_t three = {0};
    three.rpm = 3;
    three.burst = 3;
    gw_limiter_request_t many[5];
    gw_limiter_result_t answers[5];
    int rcs[5];
    for (int i = 0; i < 5; i++)
        many[i] = s_request ("key:many", &three, 0, 0);
    memcpy (many[1].rid, many[0].rid, 16);
    gw_limiter_admit_many (self, many, 5, answers, rcs);
    assert (rcs[0] == 0 && rcs[1] == 0 && rcs[2] == 0 && rcs[3] == 0 && rcs[4] == 1);
    assert (!answers[0].duplicate && answers[1].duplicate && !answers[3].duplicate);
    assert (answers[3].remaining_requests == 0);
    assert (answers[4].limit == GW_LIMIT_RPM && answers[4].retry_after_ms == 20000);
    assert (gw_limiter_unlease (self, many[2].rid) == 1);
    gw_limiter_admit_many (self, many, 0, answers, rcs);

    //  Idempotent admit: the same rid twice reserves once.
    gw_limits_t one = {0};
    one.rpm = 2;
    gw_limiter_request_t again = s_request ("key:idem", &one, 0, 0);
    assert (gw_limiter_admit (self, &again, &result) == 0 && !result.duplicate);
    assert (gw_limiter_admit (self, &again, &result) == 0 && result.duplicate);
    assert (s_count (self, "key:idem", &one, 3, 0, 0) == 1);

    //  Leases expire on their own.
    gw_limits_t conc = {0};
    conc.concurrency = 1;
    gw_limiter_request_t lease = s_request ("key:lease", &conc, 0, 0);
    lease.lease_ms = 1000;
    assert (gw_limiter_admit (self, &lease, &result) == 0);
    memcpy (rid, lease.rid, 16);
    gw_rid_new (lease.rid);
    assert (gw_limiter_admit (self, &lease, &result) == 1);
    assert (result.limit == GW_LIMIT_CONCURRENCY);
    gw_limiter_set_time (self, now + 1001000);
    gw_rid_new (lease.rid);
    assert (gw_limiter_admit (self, &lease, &result) == 0);
    assert (gw_limiter_release (self, lease.rid) == 1);
    gw_rid_new (lease.rid);
    assert (gw_limiter_admit (self, &lease, &result) == 0);
    //  Unlease (the FINAL went out): the lease ends at once, the hold stays
    //  for the settle, which still applies once.
    uint8_t held[16];
    memcpy (held, lease.rid, 16);
    assert (gw_limiter_unlease (self, held) == 1);
    assert (gw_limiter_unlease (self, held) == 1);  //  idempotent
    gw_rid_new (lease.rid);
    assert (gw_limiter_admit (self, &lease, &result) == 0);
    assert (gw_limiter_settle (self, held, 0, 0) == 1);
    assert (gw_limiter_settle (self, held, 0, 0) == 0);
    assert (gw_limiter_unlease (self, held) == 0);
    assert (gw_limiter_release (self, lease.rid) == 1);
    //  Its record expired too (Redis expires keys by its own clock).
    if (self->redis)
        zclock_sleep (1100);
    assert (gw_limiter_settle (self, rid, 0, 0) == 0);

    //  No limits at all: admitted, no headers.
    gw_limits_t none = {0};
    assert (s_try (self, "key:free", &none, 10, 10, &result, NULL) == 0);
    assert (result.limit_requests == -1 && result.limit_tokens == -1);
    gw_limiter_set_time (self, 0);
    if (verbose)
        printf ("\n    %s: semantics OK", gw_limiter_backend (self));
}

//  Concurrency: threads hammer limiters sharing one counter space.
typedef struct {
    gw_limiter_t *limiter;  //  the instance this thread uses
    const char *scope;  //  scope for every admit
    gw_limits_t limits;  //  its limits
    int attempts;  //  admits to try
    uint64_t cost;  //  estimate per admit
    int admitted;  //  out: admitted
    uint8_t (*rids)[16];  //  out: admitted rids (attempts slots)
} s_hammer_t;

static void *
s_hammer (void *args)
{
    s_hammer_t *self = (s_hammer_t *)args;
    for (int i = 0; i < self->attempts; i++) {
        gw_limiter_request_t request =
            s_request (self->scope, &self->limits, 0, self->cost);
        gw_limiter_result_t result;
        if (gw_limiter_admit (self->limiter, &request, &result) == 0) {
            assert (!result.unavailable);
            memcpy (self->rids[self->admitted++], request.rid, 16);
        }
    }
    return NULL;
}

//  Run threads over the limiters (thread t uses limiters[t % count]);
//  returns the total admitted.
static int
s_run (gw_limiter_t **limiters, int count, int threads, const char *scope,
    const gw_limits_t *limits, int attempts, uint64_t cost, uint8_t (*rids)[16])
{
    pthread_t ids[16];
    s_hammer_t hammers[16];
    assert (threads <= 16);
    for (int t = 0; t < threads; t++) {
        hammers[t] = (s_hammer_t){limiters[t % count], scope, *limits, attempts, cost, 0,
            (uint8_t (*)[16])malloc ((size_t)attempts * 16)};
        assert (hammers[t].rids);
        pthread_create (&ids[t], NULL, s_hammer, &hammers[t]);
    }
    int total = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join (ids[t], NULL);
        if (rids)
            memcpy (rids[total], hammers[t].rids, (size_t)hammers[t].admitted * 16);
        total += hammers[t].admitted;
        free (hammers[t].rids);
    }
    return total;
}

static void
s_exactness (gw_limiter_t **limiters, int count, bool verbose)
{
    for (int i = 0; i < count; i++)
        gw_limiter_set_time (limiters[i], T0 + 7200000000LL);
    //  300 concurrent admits against 100/min: exactly 100.
    gw_limits_t rpm = {0};
    rpm.rpm = 100;
    rpm.burst = 100;
    int admitted = s_run (limiters, count, 6, "key:exact", &rpm, 50, 0, NULL);
    if (verbose)
        printf ("\n    %s x%d: 300 concurrent admits at 100/min -> %d admitted",
            gw_limiter_backend (limiters[0]), count, admitted);
    assert (admitted == 100);

    //  A budget of N micro-units: concurrent holds never overshoot it...
    gw_limits_t budget = {0};
    budget.budget = 10000;
    uint8_t (*rids)[16] = (uint8_t (*)[16])malloc (300 * 16);
    assert (rids);
    admitted = s_run (limiters, count, 6, "user:budget", &budget, 20, 300, rids);
    if (verbose)
        printf (
            "\n    budget 10000, 120 concurrent holds of 300 -> %d admitted", admitted);
    assert (admitted == 33);  //  33 * 300 = 9900 <= 10000 < 34 * 300
    //  ... and after settling below the estimate, the rest is fully usable.
    for (int i = 0; i < admitted; i++)
        assert (gw_limiter_settle (limiters[i % count], rids[i], 0, 100) == 1);
    gw_limiter_result_t result;
    uint64_t left = 10000 - 33 * 100;
    assert (s_try (limiters[0], "user:budget", &budget, 0, left + 1, &result, NULL) == 1);
    assert (s_try (limiters[0], "user:budget", &budget, 0, left, &result, rids[0]) == 0);
    assert (
        s_try (limiters[count - 1], "user:budget", &budget, 0, 1, &result, NULL) == 1);
    assert (gw_limiter_settle (limiters[0], rids[0], 0, left) == 1);
    assert (
        s_try (limiters[count - 1], "user:budget", &budget, 0, 1, &result, NULL) == 1);
    free (rids);
    for (int i = 0; i < count; i++)
        gw_limiter_set_time (limiters[i], 0);
}

static void
s_redis_cli (const char *port, const char *command)
{
    char line[512];
    snprintf (line, sizeof (line), "redis-cli -p %s %s >/dev/null 2>&1", port, command);
    int rc = system (line);
    (void)rc;
}

//  Redis stopped and restarted under the limiter (needs REDISTEST_PORT and
//  REDISTEST_DIR from tests/harness/services.sh).
//  Read events Redis has processed (INFO stats), over all clients; the
//  INFO call itself is one.
static int64_t
s_redis_reads (redisContext *ctx)
{
    redisReply *reply = (redisReply *)redisCommand (ctx, "INFO stats");
    assert (reply && reply->type == REDIS_REPLY_STRING);
    const char *at = strstr (reply->str, "total_reads_processed:");
    assert (at);
    int64_t reads = strtoll (at + strlen ("total_reads_processed:"), NULL, 10);
    freeReplyObject (reply);
    return reads;
}

static void
s_outage_test (const char *url, const char *prefix, bool verbose)
{
    const char *port = getenv ("REDISTEST_PORT");
    const char *dir = getenv ("REDISTEST_DIR");
    if (!port || !dir) {
        if (verbose)
            printf ("\n    outage: skipped (REDISTEST_PORT/REDISTEST_DIR unset)");
        return;
    }
    gw_limiter_t *limiter = gw_limiter_new (url);
    assert (limiter);
    gw_limiter_set_prefix (limiter, prefix);
    gw_limits_t rpm = {0};
    rpm.rpm = 1000000;
    gw_limiter_result_t result;
    uint8_t rid[16];
    assert (s_try (limiter, "key:outage", &rpm, 0, 0, &result, rid) == 0);
    assert (!result.unavailable && gw_limiter_available (limiter));

    //  A connection lost under a call (here: killed by the server) costs a
    //  retry on a fresh connection, not an outage: the call is answered
    //  for real and the limiter stays available.
    s_redis_cli (port, "client kill type normal");
    assert (s_try (limiter, "key:outage", &rpm, 0, 0, &result, NULL) == 0);
    assert (!result.unavailable && gw_limiter_available (limiter));
    //  And an admission that did run is answered as such when asked again
    //  (what the retry relies on): the same rid is a duplicate, not a
    //  second reservation.
    gw_limiter_request_t again = s_request ("key:outage", &rpm, 0, 0);
    memcpy (again.rid, rid, 16);
    assert (gw_limiter_admit (limiter, &again, &result) == 0);
    assert (result.admitted && result.duplicate);

    s_redis_cli (port, "shutdown nosave");
    for (int i = 0; i < 20; i++) {
        int64_t start = gw_mono_ms ();
        int rc = s_try (limiter, "key:outage", &rpm, 0, 0, &result, NULL);
        int64_t took = gw_mono_ms () - start;
        assert (took < 500);
        assert (rc == 1 && result.unavailable && result.limit == GW_LIMIT_UNAVAILABLE);
        zclock_sleep (10);
    }
    assert (!gw_limiter_available (limiter));
    assert (gw_limiter_settle (limiter, rid, 0, 0) == -1);
    gw_limiter_set_fail_open (limiter, true);
    assert (s_try (limiter, "key:outage", &rpm, 0, 0, &result, NULL) == 0);
    assert (result.unavailable && result.admitted);
    gw_limiter_set_fail_open (limiter, false);

    char line[1024];
    snprintf (line, sizeof (line),
        "redis-server --port %s --bind 127.0.0.1 --daemonize yes --pidfile %s/redis.pid "
        "--dir %s --logfile %s/redis.log --save '' --appendonly no",
        port, dir, dir, dir);
    int rc = system (line);
    assert (rc == 0);
    int64_t start = gw_mono_ms ();
    while (s_try (limiter, "key:outage", &rpm, 0, 0, &result, NULL) != 0) {
        assert (result.unavailable);
        assert (gw_mono_ms () - start < 5000);
        zclock_sleep (20);
    }
    if (verbose)
        printf ("\n    outage: recovered %" PRId64 " ms after restart",
            gw_mono_ms () - start);
    assert (gw_limiter_available (limiter));
    assert (!result.unavailable);  //  the scripts were loaded again (NOSCRIPT)
    gw_limiter_destroy (&limiter);
}

void
gw_limiter_test (bool verbose)
{
    printf (" * gw_limiter: ");

    //  Configuration parsing.
    gw_limiter_t *self = gw_limiter_new ("redis://:s%40cret@10.1.2.3:6380/2");
    assert (self && self->redis && streq (self->host, "10.1.2.3") && self->port == 6380);
    assert (streq (self->password, "s@cret") && !self->user && self->db == 2);
    gw_limiter_destroy (&self);
    self = gw_limiter_new ("redis://bob:pw@[::1]");
    assert (self && streq (self->host, "::1") && self->port == 6379);
    assert (streq (self->user, "bob") && streq (self->password, "pw"));
    gw_limiter_destroy (&self);
    assert (!gw_limiter_new ("redis://host:0"));
    assert (!gw_limiter_new ("redis://"));
    assert (!gw_limiter_new ("http://host"));
    assert (!gw_limiter_new ("redis://h/x"));
    assert (streq (
        gw_limiter_limit_name (GW_LIMIT_TOKENS + GW_WINDOW_DAY), "tokens_per_day"));
    assert (streq (gw_limiter_limit_name (99), "unknown"));
    s_windows_t windows;
    s_windows (1896134399999, &windows);  //  2030-01-31 23:59:59.999
    assert (streq (windows.id[3], "M203001") && windows.end[3] == 1896134400000);
    s_windows (1924991999000, &windows);  //  2030-12-31 23:59:59
    assert (streq (windows.id[3], "M203012") && windows.end[3] == 1924992000000);

    //  Memory back end.
    self = gw_limiter_new (NULL);
    assert (self && streq (gw_limiter_backend (self), "memory"));
    s_semantics (self, verbose);
    s_exactness (&self, 1, verbose);
    //  Expired entries are swept.
    gw_limiter_set_time (self, T0 + 86400000000LL * 500);
    gw_limits_t rpm = {0};
    rpm.rpm = 1;
    gw_limiter_result_t result;
    assert (s_try (self, "key:sweep", &rpm, 0, 0, &result, NULL) == 0);
    assert (zhashx_size (self->table) == 2);  //  the new TAT and record only
    gw_limiter_destroy (&self);

    //  Redis back end, against a real server.
    const char *url = getenv ("AIGW_TEST_REDIS_URL");
    if (!url || !*url) {
        if (streq (gw_env ("AIGW_REQUIRE_SERVICES", "0"), "1")) {
            printf ("FAILED: AIGW_REQUIRE_SERVICES=1 but AIGW_TEST_REDIS_URL is unset\n");
            assert (false);
        }
        printf ("(Redis skipped: AIGW_TEST_REDIS_URL unset) ");
    }
    else {
        char prefix[40];
        snprintf (prefix, sizeof (prefix), "t%d-%" PRId64, getpid (), gw_time_ms ());
        self = gw_limiter_new (url);
        assert (self && streq (gw_limiter_backend (self), "redis"));
        gw_limiter_set_prefix (self, prefix);
        s_semantics (self, verbose);
        gw_limiter_t *limiters[2] = {self, gw_limiter_new (url)};
        gw_limiter_set_prefix (limiters[1], prefix);
        s_exactness (limiters, 2, verbose);
        //  Every key has a TTL: nothing leaks.
        redisContext *ctx = limiters[1]->ctx;
        redisReply *keys = (redisReply *)redisCommand (ctx, "KEYS {%s}:*", prefix);
        assert (keys && keys->type == REDIS_REPLY_ARRAY && keys->elements > 0);
        for (size_t i = 0; i < keys->elements; i++) {
            redisReply *ttl =
                (redisReply *)redisCommand (ctx, "PTTL %s", keys->element[i]->str);
            if (!(ttl && ttl->type == REDIS_REPLY_INTEGER && ttl->integer > 0))
                printf ("\n    no TTL on %s", keys->element[i]->str);
            assert (ttl && ttl->type == REDIS_REPLY_INTEGER && ttl->integer > 0);
            freeReplyObject (ttl);
        }
        if (verbose)
            printf ("\n    redis: %zu keys, all with a TTL", keys->elements);
        //  The fake clock's windows end in 2030: remove them now.
        for (size_t i = 0; i < keys->elements; i++)
            freeReplyObject (redisCommand (ctx, "DEL %s", keys->element[i]->str));
        freeReplyObject (keys);
        //  Garbage where a record should be is refused, not trusted.
        uint8_t rid[16];
        gw_rid_new (rid);
        char hex[33];
        gw_rid_hex (rid, hex);
        redisReply *reply = (redisReply *)redisCommand (
            ctx, "HSET {%s}:rl:r:%s s 1 t x n 99 sc y", prefix, hex);
        freeReplyObject (reply);
        assert (gw_limiter_settle (self, rid, 0, 0) == -1);
        //  In a pipelined batch it fails alone; a script Redis lost (SCRIPT
        //  FLUSH, as after a restart) is loaded again for the items that
        //  need it.
        gw_limiter_set_time (self, 0);
        gw_limits_t limits = {0};
        limits.budget = 1000;
        gw_limiter_finish_t items[3];
        memset (items, 0, sizeof (items));
        memcpy (items[1].rid, rid, 16);
        assert (s_try (self, "user:flush", &limits, 0, 100, &result, items[0].rid) == 0);
        assert (s_try (self, "user:flush", &limits, 0, 100, &result, items[2].rid) == 0);
        items[0].cost = items[2].cost = 40;
        freeReplyObject (redisCommand (ctx, "SCRIPT FLUSH"));
        int results[3];
        assert (gw_limiter_finish (self, items, 3, results) == -1);
        assert (results[0] == 1 && results[1] == -1 && results[2] == 1);
        uint64_t settled = 0;
        assert (gw_limiter_budget_settled (self, "user:flush", &settled) == 0);
        assert (settled == 80);
        gw_limiter_request_t many[2] = {s_request ("user:flush", &limits, 0, 100),
            s_request ("user:flush", &limits, 0, 2000)};
        gw_limiter_result_t answers[2];
        freeReplyObject (redisCommand (ctx, "SCRIPT FLUSH"));
        gw_limiter_admit_many (self, many, 2, answers, results);
        assert (results[0] == 0 && results[1] == 1);
        assert (answers[1].limit == GW_LIMIT_BUDGET);
        //  A batch is one round trip: Redis reads the 20 admissions, then
        //  the 40 settle steps, in a few reads, where single calls take one
        //  read each.
        gw_limiter_request_t twenty[20];
        gw_limiter_result_t outcomes[20];
        gw_limiter_finish_t settles[20];
        int codes[20];
        memset (settles, 0, sizeof (settles));
        for (int i = 0; i < 20; i++) {
            twenty[i] = s_request ("user:reads", &limits, 0, 10);
            memcpy (settles[i].rid, twenty[i].rid, 16);
            settles[i].cost = 5;
        }
        //  (Both scripts loaded again after the SCRIPT FLUSH above.)
        assert (gw_limiter_admit (self, &twenty[0], &outcomes[0]) == 0);
        assert (gw_limiter_settle (self, twenty[0].rid, 0, 5) == 1);
        gw_rid_new (twenty[0].rid);
        memcpy (settles[0].rid, twenty[0].rid, 16);
        int64_t reads = s_redis_reads (ctx);
        gw_limiter_admit_many (self, twenty, 20, outcomes, codes);
        gw_limiter_finish (self, settles, 20, codes);
        int64_t batched = s_redis_reads (ctx) - reads - 1;
        for (int i = 0; i < 20; i++)
            assert (outcomes[i].admitted && codes[i] == 1);
        reads = s_redis_reads (ctx);
        for (int i = 0; i < 20; i++) {
            gw_rid_new (twenty[i].rid);
            assert (gw_limiter_admit (self, &twenty[i], &outcomes[0]) == 0);
            assert (gw_limiter_settle (self, twenty[i].rid, 0, 5) == 1);
        }
        int64_t single = s_redis_reads (ctx) - reads - 1;
        if (verbose)
            printf ("\n    redis reads: %" PRId64
                    " for 20 admits + 20 settles batched, %" PRId64 " single",
                batched, single);
        assert (batched >= 3 && batched <= 10 && single >= 60);
        gw_limiter_destroy (&limiters[1]);
        gw_limiter_destroy (&self);
        s_outage_test (url, prefix, verbose);
    }
    printf ("OK\n");
}
