"""Co-location (DESIGN.md §8): aigw-gateway runs the broker and the C stages
as actors of one process over inproc://, and still binds the bus over tcp
so separate stage processes, Python workers and aigw-tap join it.

What is asserted is what a user or an operator notices: the one process
answers chat completions (plain and streamed) with the same headers as the
separate processes, bills them into the ledger, enforces the request limit,
takes a separate aigw-auth replica that joins over tcp, reloads its keys file
on SIGHUP, refuses an unknown stage name in AIGW_STAGES, and stops cleanly on
SIGTERM; auth, ratelimit and router share one thread (AIGW_FUSE), with a
request handed from one to the next without the broker, local-model requests
parked by the router included.

Run: tests/harness/services.sh /usr/bin/python3 -m pytest -q -p no:cacheprovider \\
     tests/integration/test_colocated.py   (with AIGW_BUILD set)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Dict, List

import pytest

from conftest import BUILD, require_env, wait_for
from gateway import KEY, STAGES, ChunkedReader, assert_openai_error, binary, channel, chat, \
    sse_events, write_json_atomic

ALL = list(STAGES)
PRICES = {"*": {"input": 1, "output": 2}}


def test_one_process_serves_bills_and_limits(make_mock, make_gateway) -> None:
    mock = make_mock()
    gw = make_gateway([channel("a", mock)], colocated=ALL, prices=PRICES,
                      env={"RATE_LIMIT_REQUESTS_PER_MINUTE": "5", "RATE_LIMIT_BURST": "5"})
    assert gw.colocated_proc is not None
    assert not any(gw.stages[s] for s in STAGES), "no separate stage process was started"

    status, headers, body = gw.chat(content="one two three")
    assert status == 200, body
    reply = json.loads(body)
    assert reply["object"] == "chat.completion"
    assert headers.get("x-aigw-channel") == "a"
    assert headers.get("x-ratelimit-limit-requests") == "5"
    assert int(headers["x-aigw-prompt-tokens"]) == reply["usage"]["prompt_tokens"]

    sock = gw.raw_stream(chat("four five", stream=True))
    reader = ChunkedReader(sock)
    reader.read_head()
    events = sse_events(reader.read_all().decode())
    sock.close()
    assert events[-1] == (None, "[DONE]")
    assert any('"chat.completion.chunk"' in data for _, data in events)

    #  Both reached the provider: two ledger rows, written by the
    #  co-located billing actor.
    wait_for(lambda: gw.sql("SELECT count(*) FROM usage_ledger")[0][0] in (2, "2"), 10,
             "two ledger rows")

    #  5 per minute with a burst of 5: three more pass, the next is a 429.
    codes = [gw.chat(content="x")[0] for _ in range(4)]
    assert codes == [200, 200, 200, 429], codes


def test_separate_replica_joins_over_tcp(make_mock, make_gateway) -> None:
    """auth runs outside the co-located process and registers on its tcp bus."""
    mock = make_mock()
    gw = make_gateway([channel("a", mock)], colocated=["edge", "ratelimit", "router",
                                                       "bridge", "billing"])
    assert len(gw.stages["auth"]) == 1 and gw.stages["auth"][0].alive
    status, _, body = gw.chat(content="hello")
    assert status == 200, body
    status, _, body = gw.request("POST", "/v1/chat/completions", chat("hello"),
                                 key="sk-not-a-key-0000000000000")
    assert status == 401
    assert_openai_error(body, 401)


def test_sighup_reloads_the_keys_file(make_mock, make_gateway, tmp_path) -> None:
    mock = make_mock()
    keys = tmp_path / "keys.json"
    write_json_atomic(str(keys), [{"key": KEY, "user": "alice"}])
    gw = make_gateway([channel("a", mock)], colocated=ALL, keys=(),
                      env={"AIGW_KEYS_FILE": str(keys)})
    gw.key = KEY
    assert gw.chat(content="hi")[0] == 200
    later = "sk-aigw-e2e-added-later-000000000"

    def status_of(key: str) -> int:
        return gw.request("POST", "/v1/chat/completions", chat("hi"), key=key)[0]
    assert status_of(later) == 401
    write_json_atomic(str(keys), [{"key": KEY, "user": "alice"},
                                  {"key": later, "user": "bob"}])
    gw.colocated_proc.kill(signal.SIGHUP)
    wait_for(lambda: status_of(later) == 200, 5,
             "the added key accepted after SIGHUP")
    assert gw.colocated_proc.alive


def test_bad_stage_list_and_clean_stop(make_mock, make_gateway) -> None:
    proc = subprocess.run([str(binary("gateway"))], env={"AIGW_STAGES": "edge,nope"},
                          capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2
    assert "unknown stage 'nope'" in proc.stderr

    gw = make_gateway([channel("a", make_mock())], colocated=ALL)
    assert gw.chat(content="hi")[0] == 200
    gw.colocated_proc.kill(signal.SIGTERM)
    started = time.monotonic()
    gw.colocated_proc.popen.wait(timeout=15)
    assert gw.colocated_proc.popen.returncode == 0, gw.colocated_proc.output()
    assert time.monotonic() - started < 10
    assert "gateway: stopping" in gw.colocated_proc.output()


def _tap_topics(tap) -> Dict[str, List[str]]:
    """The topics the tap printed so far, per request id, in order."""
    topics: Dict[str, List[str]] = {}
    for line in list(tap.lines):
        if line.startswith("{"):
            doc = json.loads(line)
            topics.setdefault(doc["rid"], []).append(doc["topic"])
    return topics


@pytest.mark.parametrize("fuse", ["1", "0", "redis", "redis+1"])
def test_admission_and_router_in_one_thread(make_mock, make_gateway, procs,
                                            fuse: str) -> None:
    """Co-located auth, ratelimit and router run as one actor: a request auth
    passes reaches ratelimit and then the router by direct calls, so the bus
    (aigw-tap) sees the request's REQUEST for auth and then its FORWARD to
    the bridge, with no FORWARD to ratelimit or the router in between; both
    still decided (the x-ratelimit headers, the channel the router chose).
    AIGW_FUSE=0 keeps the trips through the broker. With Redis, ratelimit
    keeps its own thread (its Redis round trips would hold up the others)
    unless AIGW_FUSE=1."""
    env = {"RATE_LIMIT_REQUESTS_PER_MINUTE": "1000",
           "AIGW_FUSE": {"1": "1", "0": "0", "redis": "", "redis+1": "1"}[fuse]}
    redis_url = None
    if fuse.startswith("redis"):
        redis_url = require_env("AIGW_TEST_REDIS_URL")
        env["AIGW_RATELIMIT_PREFIX"] = f"fuse-{os.getpid()}-{time.time_ns()}"
    mock = make_mock()
    gw = make_gateway([channel("a", mock)], colocated=ALL, env=env, redis_url=redis_url)
    tap = procs.start("aigw-tap", [str(BUILD / "aigw-tap"), "--tap", gw.broker.tap, "--json",
                                   "--timeout-ms", "3000"])
    topics: Dict[str, List[str]] = {}

    def seen_whole_request() -> bool:
        status, headers, _ = gw.chat(content="hello")
        assert status == 200 and headers.get("x-ratelimit-limit-requests") == "1000"
        assert headers.get("x-aigw-channel") == "a"
        topics.clear()
        topics.update(_tap_topics(tap))
        return any(t[0] == "auth.REQUEST" and t[-1] == "bridge.FINAL"
                   for t in topics.values())
    wait_for(seen_whole_request, 10, "the tap to see one whole request", interval=0.1)
    whole = [t for t in topics.values() if t[0] == "auth.REQUEST" and t[-1] == "bridge.FINAL"]
    expected = (["auth.REQUEST", "bridge.FORWARD", "bridge.FINAL"]
                if fuse in ("1", "redis+1") else
                ["auth.REQUEST", "ratelimit.FORWARD", "router.FORWARD", "bridge.FORWARD",
                 "bridge.FINAL"])
    assert whole[0] == expected, whole


def test_fused_router_parks_local_model_requests(make_gateway, make_model_worker,
                                                 procs) -> None:
    """With the router fused into auth's thread, a request for a local model
    the router does not know yet is parked until a fresh list from
    gw.services and answered then on the session that received it (auth's):
    an unknown name is a quick 404, not the broker's 504 or 503, and a model
    whose worker has just started is found and served."""
    gw = make_gateway([], colocated=ALL, env={"AIGW_LOCAL_MODELS": "1"})
    tap = procs.start("aigw-tap", [str(BUILD / "aigw-tap"), "--tap", gw.broker.tap, "--json",
                                   "--timeout-ms", "3000"])
    for model in ("local/nope", "local/tiny"):
        started = time.monotonic()
        status, _, body = gw.request("POST", "/v1/chat/completions", chat(model=model))
        assert status == 404, (model, body)
        assert assert_openai_error(body, status)["code"] == "model_not_found"
        assert time.monotonic() - started < 0.9

    make_model_worker(gw.broker, models="tiny")
    status, _, body = 0, {}, b""

    def served() -> bool:
        nonlocal status, body
        status, _, body = gw.request("POST", "/v1/chat/completions",
                                     chat(model="local/tiny", max_tokens=4))
        assert status in (200, 404), body
        return status == 200
    wait_for(served, 10, "local/tiny served", interval=0.1)
    assert json.loads(body)["model"] == "local/tiny"

    def seen() -> bool:
        return any(t[0] == "auth.REQUEST" and t[-1] == "model.tiny.FINAL"
                   for t in _tap_topics(tap).values())
    wait_for(seen, 5, "the tap to see the local request", interval=0.1)
    whole = [t for t in _tap_topics(tap).values()
             if t[0] == "auth.REQUEST" and t[-1] == "model.tiny.FINAL"]
    assert whole[0] == ["auth.REQUEST", "model.tiny.FORWARD", "model.tiny.FINAL"], whole
