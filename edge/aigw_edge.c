//  --------------------------------------------------------------------------
//  aigw-edge — the gateway's HTTP front. Reads its configuration from the
//  environment (see edge/gw_edge.h for every variable), starts the edge and
//  runs until SIGINT or SIGTERM; then stops accepting, gives requests in
//  flight AIGW_DRAIN_MS to finish, and exits.
//
//  Exit status: 0 after a signal, 1 if the server could not start.

#include "aigw.h"
#include "gw_edge.h"

int
main (int argc, char *argv[])
{
    if (argc > 1) {
        fprintf (stderr,
            "usage: aigw-edge   (configured from the environment, see "
            "edge/gw_edge.h)\n");
        return 2;
    }
    gw_log_init ("edge");
    gw_signals_block ();
    zsys_init ();

    gw_edge_t *edge = gw_edge_new ();
    if (gw_edge_start (edge)) {
        gw_edge_destroy (&edge);
        zsys_shutdown ();
        return 1;
    }
    gw_signals_wait (NULL, 0);
    gw_info ("edge: stopping");
    gw_edge_destroy (&edge);
    zsys_shutdown ();
    return 0;
}
