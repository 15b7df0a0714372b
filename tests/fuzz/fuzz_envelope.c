//  --------------------------------------------------------------------------
//  fuzz_envelope — libFuzzer target for the envelope decoder (gw_envelope).
//
//  Any bytes may be decoded. When they decode, the envelope is encoded again,
//  and that encoding must decode to the same fields and re-encode to the same
//  bytes (encode is canonical for decoded content). One envelope also lives
//  across inputs, as in a stage that decodes every request into the same
//  one (its value buffers are reused): it must decode each input exactly as
//  a fresh envelope does.

#include "aigw.h"

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
    static gw_envelope_t *reused = NULL;
    if (!reused)
        reused = gw_envelope_new ();
    gw_envelope_t *env = gw_envelope_new ();
    int rc = gw_envelope_decode (env, data, size);
    if (gw_envelope_decode (reused, data, size) != rc)
        abort ();
    if (rc == 0) {
        zframe_t *once = gw_envelope_encode (env);
        zframe_t *from_reused = gw_envelope_encode (reused);
        if (!zframe_eq (once, from_reused))
            abort ();
        zframe_destroy (&from_reused);
        //  Stores into the reused envelope leave the next decode clean.
        gw_envelope_set_ann_str (reused, "op", "fuzz");
        gw_envelope_set_tenant_int (reused, "key", 7);
        gw_envelope_t *copy = gw_envelope_new ();
        if (gw_envelope_decode (copy, zframe_data (once), zframe_size (once)) != 0)
            abort ();
        if (gw_envelope_slip_size (copy) != gw_envelope_slip_size (env) ||
            gw_envelope_cursor (copy) != gw_envelope_cursor (env) ||
            gw_envelope_deadline (copy) != gw_envelope_deadline (env) ||
            gw_envelope_stream (copy) != gw_envelope_stream (env) ||
            gw_envelope_timings (copy) != gw_envelope_timings (env) ||
            memcmp (gw_envelope_rid (copy), gw_envelope_rid (env), 16))
            abort ();
        for (size_t i = 0; i < gw_envelope_slip_size (env); i++)
            if (strcmp (gw_envelope_slip (copy, i), gw_envelope_slip (env, i)))
                abort ();
        const char *model = gw_envelope_model (env);
        if ((model == NULL) != (gw_envelope_model (copy) == NULL) ||
            (model && strcmp (model, gw_envelope_model (copy))))
            abort ();
        zframe_t *twice = gw_envelope_encode (copy);
        if (!zframe_eq (once, twice))
            abort ();
        //  Accessors on decoded content never crash.
        gw_envelope_tenant_str (copy, "user");
        gw_envelope_tenant_int (copy, "key", 0);
        gw_envelope_ann_str (copy, "op");
        gw_envelope_next (copy);
        zframe_destroy (&twice);
        zframe_destroy (&once);
        gw_envelope_destroy (&copy);
    }
    gw_envelope_destroy (&env);
    return 0;
}
