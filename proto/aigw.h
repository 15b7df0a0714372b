//  --------------------------------------------------------------------------
//  aigw — the project library (libaigw). One include for every class.
//
//  Classes are prefixed gw_, follow czmq's CLASS style (see STYLE.md), and
//  each has a selftest gw_<class>_test (bool verbose) run by aigw-selftest.

#ifndef AIGW_H_INCLUDED
#define AIGW_H_INCLUDED

#include <czmq.h>
#include <msgpack.h>
#include <stdint.h>
#include <stdbool.h>

#define AIGW_VERSION "0.1.0"

//  Stage handler outcomes, as nginx phases.
#define GW_OK 0
#define GW_DONE 1
#define GW_AGAIN 2
#define GW_DECLINED 3
#define GW_ERROR -1

#include "gw_util.h"
#include "gw_log.h"
#include "gw_mpack.h"
#include "gw_json.h"
#include "gw_msg.h"
#include "gw_envelope.h"
#include "gw_link.h"
#include "gw_worker.h"
#include "gw_client.h"
#include "gw_stage.h"

#endif
