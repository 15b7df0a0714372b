"""Usage events from the model worker (proto/STAGES.md §6.2) on the real C
broker, with a fake ``billing`` worker in this process: one event per
chat/completions/embeddings request with the request's rid, tenant, the
client-facing model and the tokens; resent after billing's 503 and while
billing is absent; never again after the acknowledgement; a cancelled
stream billed with the tokens generated so far, ``estimated``; a 400
dropped; the spool bounded."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import msgpack
import pytest

import gwp
from aigw_worker import Final, Request, Worker
from aigw_worker.usage import UsageProducer
from conftest import (EXPIRY_MS, HEARTBEAT_MS, PYTHON, Broker, Proc, free_port, wait_for,
                      wait_registered)
from test_model_service import WORKER, admin, start_worker

TENANT = {"key": "ab12cd34", "user": "alice", "group": "staff"}
RL = {"hold": 1234, "est_tokens": 77, "lease": True,
      "scopes": ["key:ab12cd34", "user:alice", "model:local/tiny"]}


class FakeBilling:
    """Service ``billing`` answering each attempt with policy(event, n)
    (n = attempts seen for its rid, 1 first); records every attempt."""

    def __init__(self, broker: Broker,
                 policy: Callable[[Dict[str, Any], int], int] = lambda ev, n: 200) -> None:
        self.policy = policy
        self.attempts: List[Dict[str, Any]] = []
        self.answers: List[int] = []
        self.lock = threading.Lock()
        self.worker = Worker(broker.bus, label="fake-billing", heartbeat_ms=HEARTBEAT_MS,
                             expiry_ms=600, reconnect_min_ms=100, reconnect_max_ms=400)
        self.worker.add_service("billing", self.handle, capacity=16, idempotent=True)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def handle(self, req: Request) -> Final:
        event = msgpack.unpackb(req.body, raw=False)
        with self.lock:
            self.attempts.append(event)
            n = sum(1 for e in self.attempts if e["rid"] == event["rid"])
        status = self.policy(event, n)
        with self.lock:
            self.answers.append(status)
        if status == 200:
            return Final.msgpack({"cost": 1, "duplicate": n > 1})
        return Final.error(status, "fake billing says no", "server_error", "store_unavailable")

    def for_rid(self, rid: bytes) -> List[Dict[str, Any]]:
        with self.lock:
            return [e for e in self.attempts if e["rid"] == rid]

    def __enter__(self) -> "FakeBilling":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.worker.stop()
        self.thread.join(timeout=5)


def billed_envelope(service: str, op: str, tenant: Optional[Dict[str, str]] = TENANT,
                    model: str = "local/tiny") -> gwp.Envelope:
    return gwp.Envelope(slip=["auth", "ratelimit", "router", service], cur=3, model=model,
                        tenant=dict(tenant or {}), ann={"op": op, "rl": dict(RL)})


@pytest.fixture
def model_worker(spawn: Callable[..., Proc], broker: Broker, client: gwp.Client,
                 tiny_models: Path) -> Proc:
    proc = start_worker(spawn, broker, tiny_models, "tiny,hash-embed")
    for name in ("model.tiny", "model.hash-embed", "model.admin"):
        wait_registered(client, name)
    return proc


def usage_stats(client: gwp.Client) -> Dict[str, int]:
    status, st = admin(client, {"action": "status", "model": "tiny"})
    assert status == 200, st
    return st["usage_events"]


def test_one_event_per_request_with_tenant_tokens_and_rl(
        model_worker: Proc, broker: Broker, client: gwp.Client) -> None:
    with FakeBilling(broker) as billing:
        wait_registered(client, "billing")
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 5, "temperature": 0}
        chat_rid = client.request("model.tiny", body,
                                  envelope=billed_envelope("model.tiny", "chat"))
        stream_rid = client.request("model.tiny", dict(body, stream=True),
                                    envelope=billed_envelope("model.tiny", "chat"),
                                    stream=True, window=64)
        emb_rid = client.request("model.hash-embed", {"input": ["a b", "c"]},
                                 envelope=billed_envelope("model.hash-embed", "embeddings",
                                                          model="local/hash-embed"))
        bad_rid = client.request("model.tiny", {"prompt": "x", "temperature": 9},
                                 envelope=billed_envelope("model.tiny", "completions"))
        # not billed: the model list, and a request without a tenant
        models_rid = client.request("model.tiny", {},
                                    envelope=billed_envelope("model.tiny", "models"))
        anon_rid = client.request("model.tiny", body,
                                  envelope=billed_envelope("model.tiny", "chat", tenant=None))
        out = client.collect([chat_rid, stream_rid, emb_rid, bad_rid, models_rid, anon_rid],
                             10000)
        finals = {rid: msgs[-1] for rid, msgs in out.items()}
        assert [finals[r].status for r in (chat_rid, stream_rid, emb_rid, bad_rid,
                                           models_rid, anon_rid)] == [200, 200, 200, 400,
                                                                      200, 200]
        billed = [chat_rid, stream_rid, emb_rid, bad_rid]
        wait_for(lambda: all(billing.for_rid(r) for r in billed), 5, "four usage events")
        for rid in billed:
            (event,) = billing.for_rid(rid)
            assert event["channel"] == "local"
            assert {k: event[k] for k in ("key", "user", "group")} == TENANT
            assert event["hold"] == 1234 and event["est_tokens"] == 77 and event["lease"]
            assert event["scopes"] == RL["scopes"]
            assert event["cached_tokens"] == 0 and event["estimated"] is False
            assert abs(event["ts"] - gwp.now_ms()) < 10_000
            status = finals[rid].status
            assert event["status"] == status
            if status == 200:
                use = gwp.Envelope.decode(finals[rid].envelope).ann["usage"]
                assert event["prompt_tokens"] == use["prompt_tokens"] > 0
                assert event["completion_tokens"] == use["completion_tokens"]
        assert billing.for_rid(chat_rid)[0]["model"] == "local/tiny"
        assert billing.for_rid(chat_rid)[0]["completion_tokens"] == 5
        assert billing.for_rid(stream_rid)[0]["completion_tokens"] == 5
        assert billing.for_rid(emb_rid)[0]["model"] == "local/hash-embed"
        assert billing.for_rid(emb_rid)[0]["completion_tokens"] == 0
        bad = billing.for_rid(bad_rid)[0]
        assert bad["prompt_tokens"] == 0 and bad["completion_tokens"] == 0
        assert not billing.for_rid(models_rid) and not billing.for_rid(anon_rid)
        # billed FINALs say which channel served them (the edge then leaves
        # the hold to billing's settle); unbilled ones do not
        for rid in billed:
            assert gwp.Envelope.decode(finals[rid].envelope).ann["channel"] == "local"
        for rid in (models_rid, anon_rid):
            assert "channel" not in gwp.Envelope.decode(finals[rid].envelope).ann
        time.sleep(0.5)  # acknowledged: never sent again
        assert len(billing.attempts) == 4
        stats = usage_stats(client)
        assert stats["acked"] == 4 and stats["pending"] == 0 and stats["skipped"] >= 1


def test_resent_while_billing_is_absent_then_after_503_never_after_ack(
        model_worker: Proc, broker: Broker, client: gwp.Client) -> None:
    body = {"prompt": "hello", "max_tokens": 3, "temperature": 0}
    rid = client.request("model.tiny", body,
                         envelope=billed_envelope("model.tiny", "completions"))
    final = client.recv_final(rid, 5000)
    assert final is not None and final.status == 200
    # No billing worker: the broker answers 503 no_worker after its grace
    # (1 s here); the event stays spooled and is retried.
    wait_for(lambda: usage_stats(client)["retries"] >= 1, 5, "a retry while absent")
    assert usage_stats(client)["pending"] == 1
    # Billing appears and refuses the first attempt it sees with 503.
    with FakeBilling(broker, policy=lambda ev, n: 503 if n == 1 else 200) as billing:
        wait_for(lambda: any(a == 200 for a in billing.answers), 15, "the acknowledgement")
        assert billing.answers[0] == 503
        wait_for(lambda: usage_stats(client)["pending"] == 0, 5, "spool empty")
        time.sleep(1.0)  # nothing is sent after the ack
        attempts = billing.for_rid(rid)
        assert len(attempts) == 2 and billing.answers == [503, 200]
        assert all(a == attempts[0] for a in attempts)  # same event, same rid
        stats = usage_stats(client)
        assert stats["acked"] == 1 and stats["inflight"] == 0


def test_cancelled_stream_is_billed_as_estimated(model_worker: Proc, broker: Broker,
                                                 client: gwp.Client) -> None:
    with FakeBilling(broker) as billing:
        wait_registered(client, "billing")
        body = {"messages": [{"role": "user", "content": "tell me a story"}],
                "max_tokens": 400, "stream": True}
        rid = client.request("model.tiny", body, envelope=billed_envelope("model.tiny", "chat"),
                             stream=True, window=3)
        got = [client.recv(3000) for _ in range(3)]
        assert all(m is not None and m.rid == rid for m in got)
        client.cancel(rid)
        wait_for(lambda: billing.for_rid(rid), 5, "the cancelled request's usage event")
        (event,) = billing.for_rid(rid)
        assert event["status"] == 499 and event["estimated"] is True
        assert 1 <= event["completion_tokens"] < 400 and event["prompt_tokens"] > 0


def test_a_400_is_dropped_not_resent(model_worker: Proc, broker: Broker,
                                     client: gwp.Client) -> None:
    with FakeBilling(broker, policy=lambda ev, n: 400) as billing:
        wait_registered(client, "billing")
        rid = client.request("model.hash-embed", {"input": "x"},
                             envelope=billed_envelope("model.hash-embed", "embeddings"))
        assert client.recv_final(rid, 5000).status == 200
        wait_for(lambda: billing.for_rid(rid), 5, "the event")
        time.sleep(0.8)
        assert len(billing.for_rid(rid)) == 1
        stats = usage_stats(client)
        assert stats["rejected"] == 1 and stats["pending"] == 0
    assert "rejected by billing (400, dropped)" in model_worker.output()


def test_billing_off(spawn: Callable[..., Proc], broker: Broker, client: gwp.Client,
                     tiny_models: Path) -> None:
    proc = spawn([PYTHON, WORKER, "--bus", broker.bus, "--model-path", str(tiny_models),
                  "--models", "hash-embed", "--label", "off", "--heartbeat-ms",
                  str(HEARTBEAT_MS), "--expiry-ms", str(EXPIRY_MS)],
                 env={"AIGW_BILLING": "0"})
    wait_registered(client, "model.hash-embed")
    wait_registered(client, "model.admin")
    with FakeBilling(broker) as billing:
        wait_registered(client, "billing")
        rid = client.request("model.hash-embed", {"input": "x"},
                             envelope=billed_envelope("model.hash-embed", "embeddings"))
        assert client.recv_final(rid, 5000).status == 200
        time.sleep(0.5)
        assert billing.attempts == []
    status, st = admin(client, {"action": "status", "model": "hash-embed"})
    assert "usage_events" not in st
    assert "usage events off" in proc.output()


def test_spool_is_bounded_and_never_blocks() -> None:
    # No broker at all: events stay spooled (resent with back-off), at most
    # max_events of them; more are logged and dropped; nothing blocks.
    producer = UsageProducer(f"tcp://127.0.0.1:{free_port()}", max_events=3,
                             backoff_min_ms=10, backoff_max_ms=50)
    try:
        t0 = time.monotonic()
        kept = [producer.submit({"rid": bytes([i]) * 16, "user": "u", "model": "m"})
                for i in range(5)]
        assert kept == [True, True, True, False, False]
        assert not producer.submit({"rid": bytes([0]) * 16, "user": "u", "model": "m"})
        for _ in range(20):
            producer.on_ready(set())
            producer.tick()
            time.sleep(0.01)
        assert time.monotonic() - t0 < 2
        stats = producer.stats()
        assert stats["pending"] == 3 and stats["dropped_full"] == 2 and stats["acked"] == 0
        assert 0 <= producer.timeout(time.monotonic()) <= 60
        with pytest.raises(ValueError):
            producer.submit({"rid": b"short"})
    finally:
        producer.close()


def test_full_spool_refuses_new_requests_until_billing_catches_up(
        spawn: Callable[..., Proc], broker: Broker, client: gwp.Client,
        tiny_models: Path) -> None:
    # Money is not dropped: with 2 events owed (no billing), a third billed
    # request is refused with 503 usage_spool_full; once billing acks, the
    # worker serves again.
    spawn([PYTHON, WORKER, "--bus", broker.bus, "--model-path", str(tiny_models),
           "--models", "hash-embed", "--label", "small", "--heartbeat-ms", str(HEARTBEAT_MS),
           "--expiry-ms", str(EXPIRY_MS), "--billing-spool-max", "2"])
    wait_registered(client, "model.hash-embed")

    def embed() -> gwp.Message:
        rid = client.request("model.hash-embed", {"input": "x"},
                             envelope=billed_envelope("model.hash-embed", "embeddings"))
        final = client.recv_final(rid, 5000)
        assert final is not None
        return final
    assert [embed().status for _ in range(2)] == [200, 200]
    refused = embed()
    assert refused.status == 503
    assert msgpack.unpackb(refused.body)["error"]["code"] == "usage_spool_full"
    assert "channel" not in gwp.Envelope.decode(refused.envelope).ann  # the edge releases
    status, st = admin(client, {"action": "status", "model": "hash-embed"})
    assert st["usage_events"]["pending"] == 2 and st["usage_events"]["dropped_full"] == 0
    with FakeBilling(broker) as billing:
        wait_for(lambda: len(billing.answers) >= 2, 15, "the two owed events")
        wait_for(lambda: admin(client, {"action": "status", "model": "hash-embed"})[1][
            "usage_events"]["pending"] == 0, 5, "spool drained")
        assert embed().status == 200
        wait_for(lambda: len(billing.answers) == 3, 5, "the new event")
        assert len({e["rid"] for e in billing.attempts}) == 3  # the refused one is not billed
