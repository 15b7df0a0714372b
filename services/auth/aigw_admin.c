//  --------------------------------------------------------------------------
//  aigw-admin — a small command line over the SQL store (gw_store): API keys,
//  user credits, model prices and group multipliers. It opens the store named by --db, else
//  DATABASE_URL, else var/aigw.db (the same forms as billing and auth), does
//  one thing and exits: 0 done, 1 failed (the store refused or could not be
//  reached, no such key or user), 2 bad usage.
//
//  A new key is "sk-aigw-" and 40 hex digits from getrandom(); only its
//  SHA-256 is stored, and the key is printed once, alone on stdout. Auth
//  accepts it (docs/ROUTING.md, "Keys in the SQL store") within its cache
//  window, and refuses it within the same window once revoked.

#include "aigw.h"
#include "gw_store.h"
#include <openssl/evp.h>
#include <openssl/crypto.h>
#include <sys/random.h>
#include <time.h>

static void
s_usage (FILE *out)
{
    fprintf (out,
        "usage: aigw-admin [--db URL] COMMAND\n"
        "  key add --user U [--group G] [--name N] [--models a,b]\n"
        "                               new key for user U (created in group G,\n"
        "                               default \"default\"); prints the key once\n"
        "  key revoke KEY_ID            revoke a key (its 8-hex id, or its sha256)\n"
        "  key list                     list every key (never the keys themselves)\n"
        "  user credit U MICROS         add MICROS micro-units (negative: debit)\n"
        "  price set MODEL INPUT OUTPUT [CACHED]\n"
        "                               micro-units per 1M tokens (CACHED: INPUT)\n"
        "  group set G MULTIPLIER       price multiplier of group G (\"1.5\": at most\n"
        "                               3 decimals, at most 1000)\n"
        "  URL: sqlite:///abs.db, sqlite://rel.db, a path, or postgres://...;\n"
        "  default DATABASE_URL, else var/aigw.db. Exit: 0 ok, 1 failed, 2 usage.\n");
}

//  Parse a whole decimal integer in [min, max]. Returns 0 or -1.
static int
s_int (const char *text, int64_t min, int64_t max, int64_t *value)
{
    if (!text || !*text)
        return -1;
    char *end = NULL;
    errno = 0;
    long long number = strtoll (text, &end, 10);
    if (errno || *end || number < min || number > max)
        return -1;
    *value = number;
    return 0;
}

//  A comma-separated list of valid names, without empty entries.
static bool
s_models_valid (const char *models)
{
    if (!*models)
        return false;
    for (const char *p = models; *p;) {
        const char *comma = strchr (p, ',');
        size_t size = comma ? (size_t)(comma - p) : strlen (p);
        if (size == 0 || size > GW_STORE_NAME_MAX)
            return false;
        char name[GW_STORE_NAME_MAX + 1];
        memcpy (name, p, size);
        name[size] = 0;
        if (!gw_store_name_valid (name, false))
            return false;
        if (!comma)
            break;
        p = comma + 1;
        if (!*p)
            return false;
    }
    return true;
}

static int
s_store_failed (gw_store_t *store, const char *what)
{
    fprintf (stderr, "aigw-admin: %s: %s\n", what, gw_store_error (store));
    return 1;
}

static int
s_key_add (gw_store_t *store, int argc, char **argv)
{
    const char *user = NULL, *group = NULL, *name = "", *models = "";
    for (int argn = 0; argn < argc; argn++) {
        const char *option = argv[argn];
        if (argn + 1 >= argc) {
            fprintf (stderr, "aigw-admin: key add: %s needs a value\n", option);
            return 2;
        }
        const char *value = argv[++argn];
        if (streq (option, "--user"))
            user = value;
        else if (streq (option, "--group"))
            group = value;
        else if (streq (option, "--name"))
            name = value;
        else if (streq (option, "--models"))
            models = value;
        else {
            fprintf (stderr, "aigw-admin: key add: unknown option %s\n", option);
            return 2;
        }
    }
    if (!user || !gw_store_name_valid (user, false)) {
        fprintf (stderr,
            "aigw-admin: key add: --user is required (1 to %d bytes of "
            "UTF-8)\n",
            GW_STORE_NAME_MAX);
        return 2;
    }
    if ((group && !gw_store_name_valid (group, false)) ||
        !gw_store_name_valid (name, true)) {
        fprintf (stderr, "aigw-admin: key add: invalid --group or --name\n");
        return 2;
    }
    if (*models && !s_models_valid (models)) {
        fprintf (stderr,
            "aigw-admin: key add: --models must be a comma-separated list "
            "of model names, without empty entries\n");
        return 2;
    }
    //  The user: created (in group, or "default") if unknown; moved to
    //  group if one is given.
    int rc = gw_store_user_get (store, user, NULL, 0, NULL);
    if (rc < 0)
        return s_store_failed (store, "key add");
    if (rc == 1 || group) {
        if (gw_store_user_set (store, user, group ? group : "default"))
            return s_store_failed (store, "key add");
    }
    //  The key: 20 random bytes, hashed; only the digest is stored.
    uint8_t random[20];
    if (getrandom (random, sizeof (random), 0) != (ssize_t)sizeof (random)) {
        fprintf (stderr, "aigw-admin: getrandom: %s\n", strerror (errno));
        return 1;
    }
    static const char digits[] = "0123456789abcdef";
    char key[8 + 40 + 1] = "sk-aigw-";
    for (size_t i = 0; i < sizeof (random); i++) {
        key[8 + i * 2] = digits[random[i] >> 4];
        key[8 + i * 2 + 1] = digits[random[i] & 15];
    }
    key[48] = 0;
    uint8_t digest[32];
    unsigned int length = 0;
    int ok = EVP_Digest (key, strlen (key), digest, &length, EVP_sha256 (), NULL);
    assert (ok == 1 && length == 32);
    char sha256[65];
    for (size_t i = 0; i < 32; i++) {
        sha256[i * 2] = digits[digest[i] >> 4];
        sha256[i * 2 + 1] = digits[digest[i] & 15];
    }
    sha256[64] = 0;
    rc = gw_store_key_add (store, sha256, name, user, models);
    if (rc == 0) {
        printf ("%s\n", key);
        fflush (stdout);
        fprintf (stderr,
            "aigw-admin: key %.8s added for user %s (shown once: only its SHA-256 is "
            "stored)\n",
            sha256, user);
    }
    OPENSSL_cleanse (random, sizeof (random));
    OPENSSL_cleanse (key, sizeof (key));
    return rc ? s_store_failed (store, "key add") : 0;
}

typedef struct {
    const char *id;  //  key id or digest prefix to match (lowercase hex)
    char sha256[65];  //  the first match
    int matches;  //  number of matches
    bool revoked;  //  the first match is revoked
} s_match_t;

static void
s_match (const gw_key_record_t *key, void *arg)
{
    s_match_t *match = (s_match_t *)arg;
    if (strncmp (key->sha256, match->id, strlen (match->id)) == 0) {
        if (match->matches++ == 0) {
            memcpy (match->sha256, key->sha256, sizeof (match->sha256));
            match->revoked = key->revoked != 0;
        }
    }
}

static int
s_key_revoke (gw_store_t *store, const char *id)
{
    char lower[65];
    size_t size = strlen (id);
    bool hex = size == 8 || size == 64;
    for (size_t i = 0; hex && i < size; i++) {
        lower[i] = (char)tolower ((unsigned char)id[i]);
        hex = isxdigit ((unsigned char)id[i]);
    }
    if (!hex) {
        fprintf (stderr,
            "aigw-admin: key revoke: KEY_ID is 8 hex digits (as in key "
            "list) or the key's 64-digit sha256\n");
        return 2;
    }
    lower[size] = 0;
    s_match_t match = {lower, "", 0, false};
    if (gw_store_key_each (store, s_match, &match) < 0)
        return s_store_failed (store, "key revoke");
    if (match.matches == 0) {
        fprintf (stderr, "aigw-admin: key revoke: no key %s\n", lower);
        return 1;
    }
    if (match.matches > 1) {
        fprintf (stderr,
            "aigw-admin: key revoke: %d keys have the id %s; give the full sha256\n",
            match.matches, lower);
        return 1;
    }
    if (match.revoked) {
        fprintf (stderr, "aigw-admin: key revoke: key %s is already revoked\n", lower);
        return 1;
    }
    int rc = gw_store_key_revoke (store, match.sha256);
    if (rc < 0)
        return s_store_failed (store, "key revoke");
    if (rc == 1) {
        fprintf (stderr, "aigw-admin: key revoke: key %s is already revoked\n", lower);
        return 1;
    }
    printf ("revoked %.8s\n", match.sha256);
    return 0;
}

static void
s_format_time (int64_t ms, char *out, size_t size)
{
    if (ms <= 0) {
        snprintf (out, size, "-");
        return;
    }
    time_t seconds = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r (&seconds, &tm);
    strftime (out, size, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static void
s_list_one (const gw_key_record_t *key, void *arg)
{
    char created[32], revoked[32];
    s_format_time (key->created, created, sizeof (created));
    s_format_time (key->revoked, revoked, sizeof (revoked));
    printf ("%.8s\t%s\t%s\t%s\t%s\t%s\n", key->sha256, key->user,
        *key->name ? key->name : "-", *key->models ? key->models : "*", created, revoked);
}

static int
s_key_list (gw_store_t *store)
{
    printf ("KEY_ID\tUSER\tNAME\tMODELS\tCREATED\tREVOKED\n");
    int rc = gw_store_key_each (store, s_list_one, NULL);
    return rc < 0 ? s_store_failed (store, "key list") : 0;
}

static int
s_user_credit (gw_store_t *store, const char *user, const char *amount)
{
    int64_t delta;
    if (!gw_store_name_valid (user, false) ||
        s_int (amount, -GW_STORE_PRICE_MAX * 1000, GW_STORE_PRICE_MAX * 1000, &delta)) {
        fprintf (stderr,
            "aigw-admin: user credit: USER and an integer MICROS (micro-units, "
            "1 USD = 1000000) are required\n");
        return 2;
    }
    int rc = gw_store_user_credit (store, user, delta);
    if (rc < 0)
        return s_store_failed (store, "user credit");
    if (rc == 1) {
        fprintf (stderr, "aigw-admin: user credit: no user %s (key add creates users)\n",
            user);
        return 1;
    }
    int64_t balance = 0;
    if (gw_store_user_get (store, user, NULL, 0, &balance) < 0)
        return s_store_failed (store, "user credit");
    printf ("%s balance %" PRId64 "\n", user, balance);
    return 0;
}

static int
s_price_set (gw_store_t *store, int argc, char **argv)
{
    gw_price_t price;
    if (argc < 3 || argc > 4 || !gw_store_name_valid (argv[0], false) ||
        s_int (argv[1], 0, GW_STORE_PRICE_MAX, &price.input) ||
        s_int (argv[2], 0, GW_STORE_PRICE_MAX, &price.output) ||
        (argc == 4 && s_int (argv[3], 0, GW_STORE_PRICE_MAX, &price.cached_input))) {
        fprintf (stderr,
            "aigw-admin: price set MODEL INPUT OUTPUT [CACHED]: prices are integers, "
            "micro-units per 1M tokens, 0 to %lld ($2.50 / 1M = 2500000)\n",
            (long long)GW_STORE_PRICE_MAX);
        return 2;
    }
    if (argc == 3)
        price.cached_input = price.input;
    if (gw_store_price_set (store, argv[0], &price))
        return s_store_failed (store, "price set");
    printf ("%s input %" PRId64 " output %" PRId64 " cached_input %" PRId64 "\n", argv[0],
        price.input, price.output, price.cached_input);
    return 0;
}

static int
s_group_set (gw_store_t *store, const char *group, const char *text)
{
    int64_t milli;
    if (!gw_store_name_valid (group, false) || gw_price_multiplier (text, &milli)) {
        fprintf (stderr,
            "aigw-admin: group set GROUP MULTIPLIER: a decimal like 1.5, at most 3 "
            "decimals, at most 1000\n");
        return 2;
    }
    if (gw_store_group_set (store, group, milli))
        return s_store_failed (store, "group set");
    printf (
        "%s multiplier %" PRId64 ".%03" PRId64 "\n", group, milli / 1000, milli % 1000);
    return 0;
}

int
main (int argc, char *argv[])
{
    gw_log_init ("admin");
    const char *url = gw_env ("DATABASE_URL", NULL);
    int argn = 1;
    if (argn < argc && (streq (argv[argn], "--help") || streq (argv[argn], "-h"))) {
        s_usage (stdout);
        return 0;
    }
    if (argn < argc && streq (argv[argn], "--db")) {
        if (argn + 1 >= argc) {
            s_usage (stderr);
            return 2;
        }
        url = argv[argn + 1];
        argn += 2;
    }
    if (argc - argn < 2) {
        s_usage (stderr);
        return 2;
    }
    const char *noun = argv[argn], *verb = argv[argn + 1];
    char **rest = argv + argn + 2;
    int count = argc - argn - 2;
    enum { KEY_ADD, KEY_REVOKE, KEY_LIST, USER_CREDIT, PRICE_SET, GROUP_SET } command;
    if (streq (noun, "key") && streq (verb, "add"))
        command = KEY_ADD;
    else if (streq (noun, "key") && streq (verb, "revoke") && count == 1)
        command = KEY_REVOKE;
    else if (streq (noun, "key") && streq (verb, "list") && count == 0)
        command = KEY_LIST;
    else if (streq (noun, "user") && streq (verb, "credit") && count == 2)
        command = USER_CREDIT;
    else if (streq (noun, "price") && streq (verb, "set"))
        command = PRICE_SET;
    else if (streq (noun, "group") && streq (verb, "set") && count == 2)
        command = GROUP_SET;
    else {
        s_usage (stderr);
        return 2;
    }
    char error[512];
    gw_store_t *store = gw_store_new (url, error, sizeof (error));
    if (!store) {
        fprintf (stderr, "aigw-admin: cannot open the store: %s\n", error);
        return 1;
    }
    int rc = 2;
    switch (command) {
        case KEY_ADD:
            rc = s_key_add (store, count, rest);
            break;
        case KEY_REVOKE:
            rc = s_key_revoke (store, rest[0]);
            break;
        case KEY_LIST:
            rc = s_key_list (store);
            break;
        case USER_CREDIT:
            rc = s_user_credit (store, rest[0], rest[1]);
            break;
        case PRICE_SET:
            rc = s_price_set (store, count, rest);
            break;
        case GROUP_SET:
            rc = s_group_set (store, rest[0], rest[1]);
            break;
    }
    gw_store_destroy (&store);
    return rc;
}
