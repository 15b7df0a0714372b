"""The model worker program (python/aigw_model_worker.py) on the real broker:
OpenAI-shaped replies, streaming with usage, load sharing by credit, a
killed worker, cancellation, and the model.admin service (start, stop,
status, settings, download)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import msgpack
import numpy as np
import pytest

import gwp
from conftest import (EXPIRY_MS, HEARTBEAT_MS, PYDIR, PYTHON, Broker, Proc, services,
                      wait_for, wait_registered)

WORKER = str(PYDIR / "aigw_model_worker.py")


def start_worker(spawn: Callable[..., Proc], broker: Broker, root: Path, models: str,
                 capacity: int = 2, label: str = "w1", admin: str = "model.admin") -> Proc:
    return spawn([PYTHON, WORKER, "--bus", broker.bus, "--model-path", str(root),
                  "--models", models, "--capacity", str(capacity), "--label", label,
                  "--admin-service", admin, "--heartbeat-ms", str(HEARTBEAT_MS),
                  "--expiry-ms", str(EXPIRY_MS), "--reconnect-ms", "200"],
                 env={"LOG_LEVEL": "info"})


def envelope(service: str, op: str) -> gwp.Envelope:
    return gwp.Envelope(slip=["auth", "router", service], cur=2, ann={"op": op})


def call(client: gwp.Client, service: str, op: str, body: Dict[str, Any],
         timeout_ms: int = 5000, **kw: Any) -> gwp.Message:
    reply = client.call(service, body, envelope=envelope(service, op), timeout_ms=timeout_ms,
                        **kw)
    assert reply is not None, f"no FINAL from {service}"
    return reply


def admin(client: gwp.Client, body: Dict[str, Any], service: str = "model.admin") -> Any:
    reply = client.call(service, body, timeout_ms=5000)
    assert reply is not None, "no FINAL from admin"
    return reply.status, msgpack.unpackb(reply.body, raw=False)


def sse_events(partials: List[gwp.Message]) -> List[Any]:
    out = []
    for m in partials:
        assert m.body.startswith(b"data: ") and m.body.endswith(b"\n\n"), m.body
        data = m.body[6:-2]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


@pytest.fixture
def served(spawn: Callable[..., Proc], broker: Broker, client: gwp.Client,
           tiny_models: Path) -> Proc:
    proc = start_worker(spawn, broker, tiny_models, "tiny,tiny-gpt2,hash-embed")
    for name in ("model.tiny", "model.tiny-gpt2", "model.hash-embed", "model.admin"):
        wait_registered(client, name)
    return proc


def test_chat_stream_partials_then_final_with_usage(served: Proc, client: gwp.Client) -> None:
    body = {"model": "local/tiny", "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0}
    rid = client.request("model.tiny", body, envelope=envelope("model.tiny", "chat"),
                         stream=True, window=64)
    msgs = client.collect([rid], 5000)[rid]
    final = msgs[-1]
    assert final.command == gwp.Command.FINAL and final.status == 200 and final.body == b""
    events = sse_events(msgs[:-1])
    assert events[-1] == "[DONE]"
    usage = gwp.Envelope.decode(final.envelope).ann["usage"]
    assert events[-2]["usage"] == usage and events[-2]["choices"] == []
    assert usage["completion_tokens"] == 12 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    chunks = events[:-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "local/tiny"
               for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    # the same request without streaming gives the same text (greedy)
    body.pop("stream")
    reply = call(client, "model.tiny", "chat", body)
    assert reply.status == 200
    assert gwp.Envelope.decode(reply.envelope).ann["ctype"] == "json"
    doc = json.loads(reply.body)
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert doc["usage"] == usage


def test_completions_embeddings_and_errors(served: Proc, client: gwp.Client) -> None:
    reply = call(client, "model.tiny-gpt2", "completions",
                 {"model": "local/tiny-gpt2", "prompt": "Once upon a time", "max_tokens": 5,
                  "temperature": 0})
    doc = json.loads(reply.body)
    assert doc["object"] == "text_completion" and doc["usage"]["completion_tokens"] == 5
    reply = call(client, "model.hash-embed", "embeddings",
                 {"model": "local/hash-embed", "input": ["the sea", "the seas"],
                  "encoding_format": "base64", "dimensions": 64})
    doc = json.loads(reply.body)
    vecs = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in doc["data"]]
    assert [v.shape for v in vecs] == [(64,), (64,)]
    assert float(vecs[0] @ vecs[1]) > 0.5
    assert doc["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    reply = call(client, "model.tiny", "embeddings", {"model": "local/tiny", "input": "hi"})
    assert len(json.loads(reply.body)["data"][0]["embedding"]) == 64
    for service, op, body, status, code in [
            ("model.tiny", "chat", {"messages": [{"role": "user", "content": "x"}],
                                    "temperature": 5}, 400, None),
            ("model.tiny", "chat", {"messages": "nope"}, 400, None),
            ("model.tiny", "chat", {"messages": [{"role": "user", "content": "x"}], "n": 2},
             400, None),
            ("model.hash-embed", "chat", {"messages": [{"role": "user", "content": "x"}]},
             400, "unsupported_operation"),
            ("model.tiny-gpt2", "completions", {"prompt": "x " * 400}, 400,
             "context_length_exceeded")]:
        reply = call(client, service, op, body)
        err = msgpack.unpackb(reply.body)["error"]
        assert reply.status == status, err
        assert err["type"] == "invalid_request_error" and err["message"]
        if code:
            assert err["code"] == code


def test_stop_sequence_over_the_bus(served: Proc, client: gwp.Client) -> None:
    body = {"prompt": "The robot", "max_tokens": 20, "temperature": 0}
    text = json.loads(call(client, "model.tiny-gpt2", "completions", body).body)[
        "choices"][0]["text"]
    stop = text[4:6]
    cut = json.loads(call(client, "model.tiny-gpt2", "completions",
                          dict(body, stop=[stop])).body)["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[:text.find(stop)]


def _first_partial(client: gwp.Client, rids: List[bytes], timeout: float = 5.0
                   ) -> Dict[bytes, gwp.Message]:
    got: Dict[bytes, gwp.Message] = {}
    deadline = time.monotonic() + timeout
    while set(got) != set(rids) and time.monotonic() < deadline:
        m = client.recv(200)
        if m is not None and m.rid in rids and m.rid not in got:
            got[m.rid] = m
    return got


def _hold_body() -> Dict[str, Any]:
    return {"messages": [{"role": "user", "content": "tell me a story"}], "max_tokens": 400,
            "stream": True}


def test_two_workers_share_load_by_credit(spawn: Callable[..., Proc], broker: Broker,
                                          client: gwp.Client, tiny_models: Path) -> None:
    start_worker(spawn, broker, tiny_models, "tiny", capacity=1, label="wa", admin="")
    start_worker(spawn, broker, tiny_models, "tiny", capacity=1, label="wb", admin="")
    wait_registered(client, "model.tiny", workers=2)
    # window 1: each stream stops after its first chunk and holds its slot
    rids = [client.request("model.tiny", _hold_body(), envelope=envelope("model.tiny", "chat"),
                           stream=True, window=1) for _ in range(2)]
    got = _first_partial(client, rids)
    assert set(got) == set(rids), "both requests must run at once, one per worker"
    entry = services(client)["model.tiny"]
    assert entry["in_flight"] == 2 and entry["queued"] == 0
    # a third waits in the broker's queue: no worker has credit left
    rid3 = client.request("model.tiny", dict(_hold_body(), max_tokens=2, stream=False),
                          envelope=envelope("model.tiny", "chat"))
    assert client.recv_final(rid3, 300) is None
    assert services(client)["model.tiny"]["queued"] == 1
    for rid in rids:
        client.cancel(rid)
    final3 = client.recv_final(rid3, 5000)
    assert final3 is not None and final3.status == 200
    # finish two more streams and see both workers answer, once both have
    # their credit back (a cancelled stream ends on its worker's own time;
    # until then the idle one would take both, one after the other)
    wait_for(lambda: services(client)["model.tiny"]["in_flight"] == 0, 5,
             "both workers idle")
    rids = [client.request("model.tiny", dict(_hold_body(), max_tokens=3),
                           envelope=envelope("model.tiny", "chat"), stream=True)
            for _ in range(2)]
    out = client.collect(rids, 5000)
    workers = {gwp.Envelope.decode(out[r][-1].envelope).ann["worker"] for r in rids}
    assert workers == {"wa", "wb"}


def test_killed_worker_fails_its_requests_with_502(spawn: Callable[..., Proc],
                                                   broker: Broker, client: gwp.Client,
                                                   tiny_models: Path) -> None:
    proc = start_worker(spawn, broker, tiny_models, "tiny", capacity=2, admin="")
    wait_registered(client, "model.tiny")
    rid = client.request("model.tiny", _hold_body(), envelope=envelope("model.tiny", "chat"),
                         stream=True, window=1)
    assert _first_partial(client, [rid]), "no first chunk"
    proc.kill()
    started = time.monotonic()
    final = client.recv_final(rid, 5000)
    assert final is not None and final.status == 502
    assert msgpack.unpackb(final.body)["error"]["code"] == "worker_lost"
    assert time.monotonic() - started < 3


def test_cancel_mid_generation_frees_the_slot(spawn: Callable[..., Proc], broker: Broker,
                                              client: gwp.Client, tiny_models: Path) -> None:
    start_worker(spawn, broker, tiny_models, "tiny", capacity=1)
    wait_registered(client, "model.tiny")
    wait_registered(client, "model.admin")
    rid = client.request("model.tiny", _hold_body(), envelope=envelope("model.tiny", "chat"),
                         stream=True, window=1)
    assert _first_partial(client, [rid])
    status, st = admin(client, {"action": "status", "model": "tiny"})
    assert st["active"] == 1 and st["in_flight"] == 1
    client.cancel(rid)
    reply = call(client, "model.tiny", "chat", dict(_hold_body(), max_tokens=3, stream=False),
                 timeout_ms=3000)
    assert reply.status == 200
    status, st = admin(client, {"action": "status", "model": "tiny"})
    assert st["active"] == 0 and st["in_flight"] == 0


def test_admin_list_status_settings_stop_start(served: Proc, client: gwp.Client) -> None:
    status, listing = admin(client, {"action": "list"})
    assert status == 200
    by = {m["id"]: m for m in listing["data"]}
    assert by["tiny"]["state"] == "loaded" and by["tiny"]["arch"] == "llama"
    assert by["hash-embed"]["loaded"]
    status, st = admin(client, {"action": "settings", "model": "tiny",
                                "settings": {"temperature": 0, "max_tokens": 4}})
    assert status == 200 and st["settings"]["temperature"] == 0.0
    body = {"messages": [{"role": "user", "content": "hi"}]}
    a = json.loads(call(client, "model.tiny", "chat", body).body)
    b = json.loads(call(client, "model.tiny", "chat", body).body)
    assert a["usage"]["completion_tokens"] == 4  # the new default
    assert a["choices"][0]["message"] == b["choices"][0]["message"]  # greedy default
    status, err = admin(client, {"action": "settings", "model": "tiny",
                                 "settings": {"temperature": 9}})
    assert status == 400 and "temperature" in err["error"]["message"]
    status, st = admin(client, {"action": "stop", "model": "tiny-gpt2"})
    assert status == 200 and st["state"] in ("stopping", "available")
    wait_for(lambda: admin(client, {"action": "status", "model": "tiny-gpt2"})[1]["state"]
             == "available", 3, "tiny-gpt2 stopped")
    assert services(client).get("model.tiny-gpt2", {}).get("workers", 0) == 0
    status, err = admin(client, {"action": "stop", "model": "tiny-gpt2"})
    assert status == 409
    status, st = admin(client, {"action": "start", "model": "tiny-gpt2"})
    assert status == 200 and st["state"] in ("loading", "loaded")
    wait_registered(client, "model.tiny-gpt2")
    reply = call(client, "model.tiny-gpt2", "completions", {"prompt": "hi", "max_tokens": 2})
    assert reply.status == 200
    status, err = admin(client, {"action": "start", "model": "nope"})
    assert status == 404
    status, err = admin(client, {"action": "start", "model": "../x"})
    assert status == 400


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range support; counts requests."""

    requests: List[str] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = open(path, "rb").read()
        rng = self.headers.get("Range")
        type(self).requests.append(f"{self.path} {rng or ''}")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            data = data[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def http_server(tiny_models: Path) -> Iterator[str]:
    handler = lambda *a, **kw: _RangeHandler(*a, directory=str(tiny_models), **kw)  # noqa
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_admin_download_resumes_verifies_and_serves(spawn: Callable[..., Proc],
                                                    broker: Broker, client: gwp.Client,
                                                    tiny_models: Path, tmp_path: Path,
                                                    http_server: str) -> None:
    root = tmp_path / "models"
    root.mkdir()
    start_worker(spawn, broker, root, "hash-embed")
    wait_registered(client, "model.admin")
    src = tiny_models / "tiny-gpt2"
    names = ["config.json", "vocab.json", "merges.txt", "tokenizer_config.json",
             "model.safetensors"]
    files = [{"url": f"{http_server}/tiny-gpt2/{n}", "name": n,
              "sha256": hashlib.sha256((src / n).read_bytes()).hexdigest()} for n in names]
    # a previous, interrupted attempt left half of the weights behind
    staging = root / ".download-dl"
    staging.mkdir()
    weights = (src / "model.safetensors").read_bytes()
    (staging / "model.safetensors.part").write_bytes(weights[:len(weights) // 2])
    _RangeHandler.requests = []
    status, st = admin(client, {"action": "download", "model": "dl", "files": files})
    assert status == 200 and st["state"] == "downloading"
    seen_progress = set()

    def finished() -> bool:
        s = admin(client, {"action": "status", "model": "dl"})[1]
        seen_progress.add(s["progress"])
        return s["state"] == "available"
    wait_for(finished, 10, "download finished", 0.02)
    s = admin(client, {"action": "status", "model": "dl"})[1]
    assert s["download"]["resumed_bytes"] == len(weights) // 2
    assert s["download"]["bytes_done"] == sum((src / n).stat().st_size for n in names)
    assert any(r.endswith(f"bytes={len(weights) // 2}-") for r in _RangeHandler.requests)
    assert (root / "dl" / "model.safetensors").read_bytes() == weights
    assert not staging.exists() and max(seen_progress) == 1.0
    status, st = admin(client, {"action": "start", "model": "dl"})
    wait_registered(client, "model.dl")
    reply = call(client, "model.dl", "completions", {"prompt": "hi", "max_tokens": 3})
    assert reply.status == 200
    # a wrong checksum fails the download with a clear error; nothing installed
    bad = [dict(files[0], sha256="0" * 64)]
    status, st = admin(client, {"action": "download", "model": "broken", "files": bad})
    assert status == 200
    wait_for(lambda: admin(client, {"action": "status", "model": "broken"})[1]["state"]
             == "error", 5, "download error")
    s = admin(client, {"action": "status", "model": "broken"})[1]
    assert "sha256 mismatch" in s["error"] and not (root / "broken").exists()
    status, err = admin(client, {"action": "download", "model": "x",
                                 "files": [{"url": "file:///etc/passwd"}]})
    assert status == 400
    status, err = admin(client, {"action": "download", "model": "x",
                                 "files": [{"url": f"{http_server}/a", "name": "../../a"}]})
    assert status == 400


@pytest.mark.parametrize("service,op,max_tokens", [
    ("model.tiny", "chat", 10), ("model.tiny", "completions", 10),
    ("model.tiny", "chat", 40), ("model.tiny-gpt2", "chat", 40)])
def test_streamed_text_equals_non_streamed_with_invalid_utf8(
        served: Proc, client: gwp.Client, service: str, op: str, max_tokens: int) -> None:
    # Regression: the tiny model's greedy output for this prompt has invalid
    # UTF-8 ("*\ufffd of" at the end of 10 tokens); the stream used to stop
    # at "*" because it tracked what it had sent by character offsets of a
    # string it re-decoded every step.
    body: Dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0}
    if op == "chat":
        body["messages"] = [{"role": "user", "content": "hello there world"}]
    else:
        body["prompt"] = "hello there world"
    doc = json.loads(call(client, service, op, body).body)
    whole = (doc["choices"][0]["message"]["content"] if op == "chat"
             else doc["choices"][0]["text"])
    rid = client.request(service, dict(body, stream=True), envelope=envelope(service, op),
                         stream=True, window=256)
    msgs = client.collect([rid], 5000)[rid]
    assert msgs[-1].status == 200
    events = [e for e in sse_events(msgs[:-1]) if e != "[DONE]"]
    key = "delta" if op == "chat" else None
    text = "".join((c["choices"][0][key].get("content", "") if key else c["choices"][0]["text"])
                   for c in events if c["choices"])
    assert text == whole
    if service == "model.tiny" and op == "chat" and max_tokens == 10:
        assert whole.endswith("*\ufffd of"), whole


def test_loaded_only_once_the_broker_confirms_the_registration(tiny_models: Path) -> None:
    # A fake broker (a ROUTER) that takes READY but does not answer yet: the
    # model must not be "loaded" (a request now would get 404/503 from the
    # real path); the broker's first answer (PONG to the PING after READY)
    # makes it loaded.
    import zmq
    from aigw_models.serve import ModelServer
    from aigw_worker import Worker
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    worker = Worker(f"tcp://127.0.0.1:{port}", label="fake", heartbeat_ms=200,
                    expiry_ms=5000, ctx=ctx)
    server = ModelServer(worker, str(tiny_models), capacity=2, admin_service=None)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        server.start("hash-embed")
        assert router.poll(5000), "no READY"
        ident, *frames = router.recv_multipart()
        assert frames[1] == b"\x01" and frames[2] == b"model.hash-embed"
        assert router.poll(2000), "no PING after READY"
        ping = router.recv_multipart()
        assert ping[0] == ident and ping[2] == b"\x08"
        time.sleep(0.3)
        view = server.state("hash-embed").view()
        assert view["state"] == "loading" and view["phase"] == "registering", view
        assert not worker.registered("model.hash-embed")
        router.send_multipart([ident, b"GWP1", b"\x09"])  # PONG: READY was processed
        wait_for(lambda: server.state("hash-embed").view()["state"] == "loaded", 2,
                 "loaded after the broker's answer")
        assert worker.registered("model.hash-embed")
    finally:
        worker.stop()
        thread.join(timeout=5)
        router.close(0)
        ctx.term()


def test_loaded_model_is_in_gw_services_at_once(served: Proc, client: gwp.Client) -> None:
    status, _ = admin(client, {"action": "start", "model": "tiny-gpt2"})
    status, st = admin(client, {"action": "stop", "model": "tiny-gpt2"})
    assert status == 200
    wait_for(lambda: admin(client, {"action": "status", "model": "tiny-gpt2"})[1]["state"]
             == "available", 3, "tiny-gpt2 stopped")
    admin(client, {"action": "start", "model": "tiny-gpt2"})
    seen = wait_for(lambda: (lambda s: s if s["state"] == "loaded" else None)(
        admin(client, {"action": "status", "model": "tiny-gpt2"})[1]), 10, "loaded",
        interval=0.002)
    assert seen["registered"] is True
    assert services(client).get("model.tiny-gpt2", {}).get("workers") == 1
    reply = call(client, "model.tiny-gpt2", "completions", {"prompt": "hi", "max_tokens": 2})
    assert reply.status == 200


class _NoHeadHandler(_RangeHandler):
    def do_HEAD(self) -> None:  # noqa: N802
        self.send_error(405)


@pytest.mark.parametrize("head", [True, False])
def test_download_progress_never_goes_back(tiny_models: Path, tmp_path: Path,
                                           head: bool) -> None:
    # Small files first, then a large one: the fraction used to drop (0.99 ->
    # 0.003) when the large file's size became known.
    from aigw_models.download import Download, FileSpec
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"small{i}.json").write_bytes(b"x" * 1000)
    (src / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    cls = _RangeHandler if head else _NoHeadHandler
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **kw: cls(*a, directory=str(src), **kw))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        names = ["small0.json", "small1.json", "small2.json", "big.bin"]
        root = tmp_path / "models"
        root.mkdir()
        dl = Download(str(root), "m", [FileSpec(f"{base}/{n}", n) for n in names])
        views: List[Dict[str, Any]] = []
        dl.run(lambda f: views.append(dict(dl.view(), reported=f)))
    finally:
        server.shutdown()
        server.server_close()
    total = sum((src / n).stat().st_size for n in names)
    fractions = [v["reported"] for v in views]
    assert fractions == sorted(fractions), fractions
    assert all(v["fraction"] >= v["reported"] for v in views)
    assert fractions[-1] == 1.0 and max(fractions[:-1]) < 1.0
    done = [v["bytes_done"] for v in views]
    assert done == sorted(done) and done[-1] == total
    if head:  # sizes known up front: the total from the first report, and exact
        assert all(v["bytes_total"] == total for v in views)
        mid = [v for v in views if v["current"] == "big.bin" and v["state"] == "running"]
        assert any(abs(v["fraction"] - v["bytes_done"] / total) < 1e-9 for v in mid)
        # after the three small files, well under half is done
        assert max(v["fraction"] for v in views if v["bytes_done"] <= 3000) < 0.01
    assert (root / "m" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
