//  --------------------------------------------------------------------------
//  gw_breaker — per-channel circuit breakers (see gw_breaker.h for the
//  state table).
//
//  Design note. A zhashx of channel id -> entry {consecutive failures,
//  open_until, probe taken at}. State is derived, not stored: open while
//  now < open_until; half-open once open_until has passed (open_until > 0);
//  closed when open_until = 0. Entries are deleted when a channel is closed
//  with no failures, so the table only holds failing channels. The probe
//  lease lapses after one cooldown, so a probe whose outcome never comes
//  (a request lost with its worker connection) cannot wedge a channel.
//
//  Rates: one hash lookup per attempt. Failure mode: none (a full table
//  treats new channels as closed).

#include <czmq.h>
#include "gw_breaker.h"

#define TRACKED_MAX 4096

typedef struct {
    uint32_t failures;  //  consecutive failures
    int64_t open_until;  //  mono ms the cooldown ends, 0 = closed
    int64_t probe_at;  //  mono ms the half-open probe was taken, 0 = free
} s_entry_t;

struct _gw_breaker_t {
    zhashx_t *channels;  //  channel id -> s_entry_t (owned)
    uint32_t failures;  //  failures in a row that open a breaker
    int64_t cooldown;  //  ms a breaker stays open
};

static void
s_entry_free (void **item_p)
{
    free (*item_p);
    *item_p = NULL;
}

gw_breaker_t *
gw_breaker_new (uint32_t failures, int64_t cooldown_ms)
{
    gw_breaker_t *self = (gw_breaker_t *)zmalloc (sizeof (gw_breaker_t));
    assert (self);
    self->channels = zhashx_new ();
    assert (self->channels);
    zhashx_set_destructor (self->channels, s_entry_free);
    self->failures = failures ? failures : 1;
    self->cooldown = cooldown_ms > 0 ? cooldown_ms : 1;
    return self;
}

void
gw_breaker_destroy (gw_breaker_t **self_p)
{
    assert (self_p);
    gw_breaker_t *self = *self_p;
    if (self) {
        zhashx_destroy (&self->channels);
        free (self);
        *self_p = NULL;
    }
}

static s_entry_t *
s_lookup (gw_breaker_t *self, const char *channel, bool create)
{
    s_entry_t *entry = (s_entry_t *)zhashx_lookup (self->channels, channel);
    if (!entry && create && zhashx_size (self->channels) < TRACKED_MAX) {
        entry = (s_entry_t *)zmalloc (sizeof (s_entry_t));
        assert (entry);
        zhashx_insert (self->channels, channel, entry);
    }
    return entry;
}

int
gw_breaker_state (gw_breaker_t *self, const char *channel, int64_t now)
{
    assert (self);
    s_entry_t *entry = s_lookup (self, channel, false);
    if (!entry || entry->open_until == 0)
        return GW_BREAKER_CLOSED;
    return now < entry->open_until ? GW_BREAKER_OPEN : GW_BREAKER_HALF_OPEN;
}

bool
gw_breaker_allow (gw_breaker_t *self, const char *channel, int64_t now)
{
    assert (self);
    s_entry_t *entry = s_lookup (self, channel, false);
    if (!entry || entry->open_until == 0)
        return true;
    if (now < entry->open_until)
        return false;
    if (entry->probe_at && now < entry->probe_at + self->cooldown)
        return false;  //  a probe is out
    entry->probe_at = now;
    return true;
}

void
gw_breaker_force (gw_breaker_t *self, const char *channel, int64_t now)
{
    assert (self);
    s_entry_t *entry = s_lookup (self, channel, false);
    if (entry && entry->open_until)
        entry->probe_at = now;
}

int64_t
gw_breaker_open_until (gw_breaker_t *self, const char *channel)
{
    assert (self);
    s_entry_t *entry = s_lookup (self, channel, false);
    return entry ? entry->open_until : 0;
}

void
gw_breaker_success (gw_breaker_t *self, const char *channel, int64_t now)
{
    assert (self);
    if (s_lookup (self, channel, false))
        zhashx_delete (self->channels, channel);
}

void
gw_breaker_failure (gw_breaker_t *self, const char *channel, int64_t now)
{
    assert (self);
    s_entry_t *entry = s_lookup (self, channel, true);
    if (!entry)
        return;
    entry->probe_at = 0;
    if (entry->open_until) {
        //  Open or half-open: a failure (the probe, or a request that was
        //  already under way when the breaker opened) restarts the cooldown.
        entry->open_until = now + self->cooldown;
        return;
    }
    if (++entry->failures >= self->failures)
        entry->open_until = now + self->cooldown;
}

void
gw_breaker_release (gw_breaker_t *self, const char *channel, int64_t now)
{
    assert (self);
    s_entry_t *entry = s_lookup (self, channel, false);
    if (entry)
        entry->probe_at = 0;
}

size_t
gw_breaker_size (gw_breaker_t *self)
{
    assert (self);
    return zhashx_size (self->channels);
}

void
gw_breaker_test (bool verbose)
{
    printf (" * gw_breaker: ");
    gw_breaker_t *breaker = gw_breaker_new (3, 1000);
    int64_t t = 5000;

    //  Closed: failures below the threshold keep it closed; success resets.
    assert (gw_breaker_state (breaker, "a", t) == GW_BREAKER_CLOSED);
    assert (gw_breaker_allow (breaker, "a", t));
    gw_breaker_failure (breaker, "a", t);
    gw_breaker_failure (breaker, "a", t);
    assert (gw_breaker_state (breaker, "a", t) == GW_BREAKER_CLOSED);
    gw_breaker_success (breaker, "a", t);
    assert (gw_breaker_size (breaker) == 0);
    gw_breaker_failure (breaker, "a", t);
    gw_breaker_failure (breaker, "a", t);
    assert (gw_breaker_allow (breaker, "a", t));

    //  Third failure in a row opens it for the cooldown.
    gw_breaker_failure (breaker, "a", t);
    assert (gw_breaker_state (breaker, "a", t) == GW_BREAKER_OPEN);
    assert (gw_breaker_open_until (breaker, "a") == t + 1000);
    assert (!gw_breaker_allow (breaker, "a", t + 999));
    assert (gw_breaker_allow (breaker, "b", t));  //  other channels unaffected

    //  Half-open: one probe; others wait for its outcome.
    t += 1000;
    assert (gw_breaker_state (breaker, "a", t) == GW_BREAKER_HALF_OPEN);
    assert (gw_breaker_allow (breaker, "a", t));
    assert (!gw_breaker_allow (breaker, "a", t + 1));
    //  Probe fails: open for another cooldown.
    gw_breaker_failure (breaker, "a", t + 10);
    assert (gw_breaker_state (breaker, "a", t + 10) == GW_BREAKER_OPEN);
    assert (!gw_breaker_allow (breaker, "a", t + 1009));
    //  Released probe (cancelled request): the next caller probes.
    t += 1010;
    assert (gw_breaker_allow (breaker, "a", t));
    gw_breaker_release (breaker, "a", t);
    assert (gw_breaker_allow (breaker, "a", t + 1));
    //  A lost probe lapses after a cooldown.
    assert (!gw_breaker_allow (breaker, "a", t + 2));
    assert (gw_breaker_allow (breaker, "a", t + 1001));
    //  Probe succeeds: closed, forgotten.
    gw_breaker_success (breaker, "a", t + 1002);
    assert (gw_breaker_state (breaker, "a", t + 1002) == GW_BREAKER_CLOSED);
    assert (gw_breaker_open_until (breaker, "a") == 0);
    assert (gw_breaker_size (breaker) == 0);

    //  Force takes an open channel as the probe.
    for (int i = 0; i < 3; i++)
        gw_breaker_failure (breaker, "c", t);
    assert (!gw_breaker_allow (breaker, "c", t));
    gw_breaker_force (breaker, "c", t);
    gw_breaker_success (breaker, "c", t);
    assert (gw_breaker_allow (breaker, "c", t));

    //  The table is bounded.
    char name[32];
    for (int i = 0; i < 5000; i++) {
        snprintf (name, sizeof (name), "ch%d", i);
        gw_breaker_failure (breaker, name, t);
    }
    assert (gw_breaker_size (breaker) == 4096);
    assert (gw_breaker_allow (breaker, "ch4999", t));
    gw_breaker_destroy (&breaker);
    assert (breaker == NULL);
    printf ("OK\n");
}
