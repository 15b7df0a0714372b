//  --------------------------------------------------------------------------
//  aigw-edge — the gateway's HTTP front. Reads its configuration from the
//  environment (see edge/gw_edge.h for every variable), starts the edge and
//  runs until SIGINT or SIGTERM; then stops accepting, gives requests in
//  flight AIGW_DRAIN_MS to finish, and exits.
//
//  Exit status: 0 after a signal, 1 if the server could not start.

#include "aigw.h"
#include "gw_edge.h"
#include <signal.h>

static volatile sig_atomic_t s_stop;

static void
s_on_signal (int signum)
{
    s_stop = 1;
}

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
    //  czmq would install its own handlers on first use; ours decide.
    zsys_handler_set (NULL);
    zsys_init ();
    struct sigaction action;
    memset (&action, 0, sizeof (action));
    action.sa_handler = s_on_signal;
    sigemptyset (&action.sa_mask);
    sigaction (SIGINT, &action, NULL);
    sigaction (SIGTERM, &action, NULL);
    signal (SIGPIPE, SIG_IGN);

    gw_edge_t *edge = gw_edge_new ();
    if (gw_edge_start (edge)) {
        gw_edge_destroy (&edge);
        zsys_shutdown ();
        return 1;
    }
    while (!s_stop)
        zclock_sleep (100);
    gw_info ("edge: stopping");
    gw_edge_destroy (&edge);
    zsys_shutdown ();
    return 0;
}
