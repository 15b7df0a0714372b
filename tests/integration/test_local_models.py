"""Local models end to end: the whole gateway (gateway.Gateway, with
AIGW_LOCAL_MODELS=1) and the Python model worker (python/aigw_model_worker.py)
on the same broker.

What a user sees: the openai SDK streams a chat completion from local/tiny and
gets embeddings from local/hash-embed; /v1/models and /local/models list the
served local models; the management API (/api/local/models...) lists, starts,
stops, configures and downloads models (from a throttled HTTP server started
here, with progress visible in status); a killed model worker's requests fail
cleanly at the edge; two workers share the load.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import msgpack
import pytest

import gwp
from conftest import HEARTBEAT_MS, REPO, services, wait_for
from gateway import Gateway, assert_openai_error, chat, sse_events
from test_sdk import _node, _npm_ci

SDK = REPO / "tests" / "sdk"
LOCAL_ENV = {"AIGW_LOCAL_MODELS": "1"}


def listed(gw: Gateway, path: str = "/v1/models") -> List[str]:
    status, _, body = gw.request("GET", path)
    assert status == 200, body
    return [m["id"] for m in json.loads(body)["data"]]


def wait_listed(gw: Gateway, model: str, present: bool = True, path: str = "/v1/models",
                timeout: float = 10.0) -> None:
    wait_for(lambda: (model in listed(gw, path)) == present, timeout,
             f"{model} {'in' if present else 'gone from'} {path}", interval=0.1)


@pytest.fixture
def local_gw(make_gateway: Any, make_model_worker: Any) -> Iterator[Tuple[Gateway, Any]]:
    """A gateway with no upstream channel and one model worker (tiny,
    hash-embed); returns once the router lists local/tiny."""
    gw = make_gateway([], env=LOCAL_ENV)
    worker = make_model_worker(gw.broker)
    wait_listed(gw, "local/tiny")
    yield gw, worker


def stream_text(gw: Gateway, body: Dict[str, Any], path: str = "/v1/chat/completions"
                ) -> Tuple[int, List[Tuple[Optional[str], str]]]:
    status, headers, raw = gw.request("POST", path, body)
    if status != 200:
        return status, []
    assert headers["content-type"].startswith("text/event-stream"), headers
    return status, sse_events(raw.decode())


# --------------------------------------------------------------------------
# The request path


def test_sdk_streams_and_embeds_from_local_models(local_gw: Any) -> None:
    gw, _ = local_gw
    node = _node()
    _npm_ci()
    env = dict(os.environ, AIGW_BASE_URL=gw.url(), AIGW_API_KEY=gw.key, NO_COLOR="1")
    proc = subprocess.run([node, "--test", "--test-reporter=tap", "local.test.mjs"], cwd=SDK,
                          env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    print(output)
    assert proc.returncode == 0, f"node --test failed:\n{output}\n{gw.logs()}"
    passed = re.search(r"^# pass (\d+)$", output, re.M)
    failed = re.search(r"^# fail (\d+)$", output, re.M)
    assert passed and int(passed.group(1)) >= 4, output
    assert failed and int(failed.group(1)) == 0, output


def test_local_routes_and_model_lists(local_gw: Any) -> None:
    gw, _ = local_gw
    # /v1/models: local/<name>, owned by "local"; /local/models: bare names.
    status, _, body = gw.request("GET", "/v1/models")
    models = {m["id"]: m for m in json.loads(body)["data"]}
    assert models["local/tiny"]["owned_by"] == "local"
    assert "local/hash-embed" in models and "local/admin" not in models
    assert sorted(listed(gw, "/local/models")) == ["hash-embed", "tiny"]

    # The same model through /v1 (prefixed) and /local (bare), greedy.
    request = chat(max_tokens=8, temperature=0)
    s1, _, b1 = gw.request("POST", "/v1/chat/completions", dict(request, model="local/tiny"))
    s2, _, b2 = gw.request("POST", "/local/chat/completions", dict(request, model="tiny"))
    assert s1 == s2 == 200, (b1, b2)
    r1, r2 = json.loads(b1), json.loads(b2)
    assert r1["model"] == "local/tiny" and r2["model"] == "tiny"
    assert r1["choices"][0]["message"]["content"] == r2["choices"][0]["message"]["content"]
    assert r1["usage"]["completion_tokens"] <= 8

    # Streaming over /local, completions and embeddings.
    status, events = stream_text(gw, chat(model="tiny", stream=True, max_tokens=6),
                                 "/local/chat/completions")
    assert status == 200 and events[-1] == (None, "[DONE]"), events
    status, _, body = gw.request("POST", "/local/completions",
                                 {"model": "tiny", "prompt": "once upon", "max_tokens": 5})
    assert status == 200 and json.loads(body)["object"] == "text_completion", body
    status, _, body = gw.request("POST", "/local/embeddings",
                                 {"model": "hash-embed", "input": ["a b", "c d"]})
    assert status == 200 and len(json.loads(body)["data"]) == 2, body

    # Unknown local models are a quick 404 (not the broker's 503 after its
    # grace), and the management service is not a model.
    for path, model in (("/v1/chat/completions", "local/nope"),
                        ("/local/chat/completions", "nope"),
                        ("/local/chat/completions", "admin")):
        started = time.monotonic()
        status, _, body = gw.request("POST", path, chat(model=model))
        assert status == 404, (path, model, body)
        assert assert_openai_error(body, status)["code"] == "model_not_found"
        assert time.monotonic() - started < 0.9
    # /local routes never reach upstream channels; a bare name stays local.
    status, _, body = gw.request("POST", "/local/chat/completions", chat(model="mock-gpt"))
    assert status == 404, body
    # Auth applies to every local route.
    for method, path in (("GET", "/local/models"), ("GET", "/api/local/models"),
                         ("POST", "/api/local/models/tiny/stop")):
        status, _, body = gw.request(method, path, key="sk-wrong")
        assert status == 401, (path, body)
        assert_openai_error(body, status)


def test_streamed_local_chat_has_the_envelope_headers(make_gateway: Any,
                                                     make_model_worker: Any) -> None:
    """A streamed local-model chat carries the same response headers as a
    non-streamed one: ratelimit's x-ratelimit-* and x-aigw-channel. The
    model worker sends them in the envelope of each stream's first PARTIAL
    (PROTOCOL.md §2, frame 5), as the bridge does for provider streams."""
    gw = make_gateway([], env=LOCAL_ENV, limits={"defaults": {"key": {"rpm": 100}}})
    make_model_worker(gw.broker)
    wait_listed(gw, "local/tiny")
    names = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
             "x-ratelimit-reset-requests", "x-aigw-channel")
    status, plain, body = gw.request("POST", "/v1/chat/completions",
                                     chat(model="local/tiny", max_tokens=4))
    assert status == 200, body
    for path, model in (("/v1/chat/completions", "local/tiny"),
                        ("/local/chat/completions", "tiny")):
        status, streamed, raw = gw.request("POST", path,
                                           chat(model=model, stream=True, max_tokens=4))
        assert status == 200, raw
        assert streamed["content-type"].startswith("text/event-stream"), streamed
        assert sse_events(raw.decode())[-1] == (None, "[DONE]")
        missing = [n for n in names if n not in streamed]
        assert not missing, f"{path}: stream without {missing}: {streamed}"
        assert all(n in plain for n in names), plain
        assert plain["x-ratelimit-limit-requests"] == \
            streamed["x-ratelimit-limit-requests"] == "100"
        assert 0 <= int(streamed["x-ratelimit-remaining-requests"]) < 100, streamed
        assert plain["x-aigw-channel"] == streamed["x-aigw-channel"] == "local"


def test_local_models_off_by_default(make_gateway: Any, make_model_worker: Any) -> None:
    gw = make_gateway([])
    make_model_worker(gw.broker, models="hash-embed")
    time.sleep(0.5)
    assert "local/hash-embed" not in listed(gw)
    for method, path, body in (("GET", "/local/models", None),
                               ("GET", "/api/local/models", None),
                               ("POST", "/api/local/models/tiny/start", None)):
        status, _, raw = gw.request(method, path, body)
        assert status == 404, (path, raw)
        assert assert_openai_error(raw, status)["code"] == "local_models_disabled"
    status, _, raw = gw.request("POST", "/v1/embeddings",
                                {"model": "local/hash-embed", "input": "x"})
    assert status == 404, raw


# --------------------------------------------------------------------------
# Management


def status_of(gw: Gateway, model: str) -> Dict[str, Any]:
    status, _, body = gw.request("GET", f"/api/local/models/{model}/status")
    assert status == 200, body
    return json.loads(body)


def test_management_start_stop_settings(local_gw: Any) -> None:
    gw, _ = local_gw
    status, _, body = gw.request("GET", "/api/local/models")
    assert status == 200, body
    views = {m["id"]: m for m in json.loads(body)["data"]}
    assert views["tiny-gpt2"]["state"] == "available", views
    assert views["hash-embed"]["state"] == "loaded"

    # Not served yet: a 404 through the API.
    assert gw.chat(model="local/tiny-gpt2")[0] == 404

    # Start: answers at once, then the model loads and serves.
    status, _, body = gw.request("POST", "/api/local/models/tiny-gpt2/start")
    assert status == 200, body
    assert json.loads(body)["state"] in ("loading", "loaded")
    wait_for(lambda: status_of(gw, "tiny-gpt2")["state"] == "loaded", 15, "tiny-gpt2 loaded")
    # The worker says "loaded" when it has sent READY, a moment before the
    # broker has it (reported to the model service); once the broker has
    # it, the router finds it at once (it asks about a name it does not
    # know), well before its 2 s refresh.
    with gwp.Client(gw.broker.bus, heartbeat_ms=HEARTBEAT_MS) as bus:
        wait_for(lambda: "model.tiny-gpt2" in services(bus), 5, "model.tiny-gpt2 registered")
    status, _, body = gw.chat(model="local/tiny-gpt2", max_tokens=4)
    assert status == 200, body
    wait_listed(gw, "local/tiny-gpt2")

    # Settings: a default max_tokens applies to requests without one.
    status, _, body = gw.request("PUT", "/api/local/models/tiny-gpt2/settings",
                                 {"max_tokens": 3, "temperature": 0})
    assert status == 200, body
    assert json.loads(body)["settings"]["max_tokens"] == 3
    status, _, body = gw.chat(model="local/tiny-gpt2")
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] <= 3, body
    status, _, body = gw.request("PUT", "/api/local/models/tiny-gpt2/settings",
                                 {"temperature": 7})
    assert status == 400, body
    assert_openai_error(body, status)
    assert status_of(gw, "tiny-gpt2")["settings"]["temperature"] == 0

    # Stop: drains, unregisters; requests then get a 404.
    status, _, body = gw.request("POST", "/api/local/models/tiny-gpt2/stop")
    assert status == 200, body
    wait_for(lambda: status_of(gw, "tiny-gpt2")["state"] == "available", 15,
             "tiny-gpt2 stopped")
    wait_listed(gw, "local/tiny-gpt2", present=False)
    status, _, body = gw.chat(model="local/tiny-gpt2")
    assert status == 404, body
    # tiny itself was never disturbed.
    assert gw.chat(model="local/tiny", max_tokens=2)[0] == 200

    # Errors of the management API, all in the OpenAI shape.
    cases = [("GET", "/api/local/models/nope/status", None, 404, "model_not_found"),
             ("POST", "/api/local/models/tiny/stop2", None, 404, "unknown_url"),
             ("POST", "/api/local/models/a/b/start", None, 404, "unknown_url"),
             ("GET", "/api/local/models/tiny/start", None, 405, "method_not_allowed"),
             ("POST", "/api/local/models/tiny/status", None, 405, "method_not_allowed"),
             ("POST", "/api/local/models/..x/start", None, 400, "invalid_model_id"),
             ("POST", "/api/local/models/.hidden/start", None, 400, "invalid_model_id"),
             ("POST", "/api/local/models/x%20y/start", None, 400, "invalid_model_id"),
             ("POST", "/api/local/models/" + "a" * 101 + "/start", None, 400,
              "invalid_model_id"),
             ("POST", "/api/local/models/tiny-gpt2/download", None, 400, "bad_request"),
             ("PUT", "/api/local/models/tiny/settings", [1, 2], 400, "invalid_type")]
    for method, path, body, want, code in cases:
        status, headers, raw = gw.request(method, path, body)
        assert status == want, (method, path, raw)
        assert assert_openai_error(raw, status)["code"] == code, (path, raw)
        if want == 405:
            assert headers["allow"].startswith(("GET", "POST", "PUT")), headers
    status, _, raw = gw.request("POST", "/api/local/models/tiny-gpt2/download",
                                raw=b"{not json")
    assert status == 400 and assert_openai_error(raw, status)["code"] == "invalid_json"


class _Throttled(http.server.SimpleHTTPRequestHandler):
    """Serves a folder slowly (CHUNK bytes every PAUSE s), with Range."""

    CHUNK = 16 * 1024
    PAUSE = 0.03

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.directory) / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        if match and int(match.group(1)) < len(data):
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        try:
            for offset in range(start, len(data), self.CHUNK):
                self.wfile.write(data[offset:offset + self.CHUNK])
                self.wfile.flush()
                time.sleep(self.PAUSE)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def file_server(tmp_path: Path, tiny_models_dir: Path) -> Iterator[Tuple[str, Path]]:
    """A throttled HTTP server serving a copy of tiny-gpt2's files."""
    root = tmp_path / "www"
    shutil.copytree(tiny_models_dir / "tiny-gpt2", root / "tiny-gpt2")

    def handler(*args: Any, **kwargs: Any) -> _Throttled:
        return _Throttled(*args, directory=str(root), **kwargs)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/tiny-gpt2", root / "tiny-gpt2"
    finally:
        server.shutdown()
        server.server_close()


def test_management_download_with_progress(make_gateway: Any, make_model_worker: Any,
                                           file_server: Tuple[str, Path],
                                           tmp_path: Path) -> None:
    base, folder = file_server
    models = tmp_path / "models"
    models.mkdir()
    gw = make_gateway([], env=LOCAL_ENV)
    make_model_worker(gw.broker, models="hash-embed", model_path=models)
    wait_listed(gw, "local/hash-embed")
    files = [{"url": f"{base}/{p.name}", "name": p.name,
              "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    assert len(files) >= 4

    # A wrong checksum fails the download, and nothing lands in MODEL_PATH.
    bad = [dict(f, sha256="0" * 64) if f["name"] == "config.json" else f for f in files]
    status, _, body = gw.request("POST", "/api/local/models/fresh-bad/download",
                                 {"files": bad})
    assert status == 200, body
    view = wait_for(lambda: (lambda v: v if v["state"] == "error" else None)(
        status_of(gw, "fresh-bad")), 30, "the bad download to fail")
    assert "sha256" in (view["error"] or ""), view
    assert not (models / "fresh-bad").exists()

    # The real download: status shows it running with partial progress.
    status, _, body = gw.request("POST", "/api/local/models/fresh/download", {"files": files})
    assert status == 200, body
    assert json.loads(body)["state"] == "downloading", body
    seen: List[Dict[str, Any]] = []

    def finished() -> bool:
        view = status_of(gw, "fresh")
        seen.append(view)
        return view["state"] != "downloading"
    wait_for(finished, 60, "the download to finish", interval=0.05)
    assert seen[-1]["state"] == "available", seen[-1]
    partial = [v for v in seen if v["state"] == "downloading" and 0 < v["progress"] < 1]
    assert len(partial) >= 3, [(v["state"], v["progress"]) for v in seen]
    # Bytes only grow. (The "progress" fraction may step back when a larger
    # file's size becomes known: reported to the model service.)
    done = [v["download"]["bytes_done"] for v in partial]
    assert done == sorted(done) and done[0] < done[-1], done
    # Some view caught a file half-way (a view between two files may have
    # bytes_done == bytes_total of the files known so far).
    assert any(0 < v["download"]["bytes_done"] < v["download"]["bytes_total"]
               for v in partial), [v["download"] for v in partial]
    # Atomic: the folder appeared whole, with identical files.
    for f in files:
        assert (models / "fresh" / f["name"]).read_bytes() == (folder / f["name"]).read_bytes()

    # Listed, then started and served like any local model.
    status, _, body = gw.request("GET", "/api/local/models")
    assert "fresh" in [m["id"] for m in json.loads(body)["data"]], body
    status, _, body = gw.request("POST", "/api/local/models/fresh/start")
    assert status == 200, body
    wait_for(lambda: status_of(gw, "fresh")["state"] == "loaded", 15, "fresh loaded")
    wait_listed(gw, "local/fresh")
    status, _, body = gw.chat(model="local/fresh", max_tokens=4)
    assert status == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] >= 1


# --------------------------------------------------------------------------
# Failure and scale-out


def test_killed_worker_fails_cleanly_at_the_edge(make_gateway: Any,
                                                 make_model_worker: Any) -> None:
    gw = make_gateway([], env=LOCAL_ENV)
    worker = make_model_worker(gw.broker, models="tiny-gpt2")
    wait_listed(gw, "local/tiny-gpt2")

    # A stream cut mid-way ends with an SSE error event, never a silent 200.
    body = json.dumps(chat(model="local/tiny-gpt2", stream=True, max_tokens=400,
                           temperature=0)).encode()
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=15)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: aigw\r\n"
                 b"Authorization: Bearer " + gw.key.encode() + b"\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"data: {" not in received:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    os.kill(worker.pid, signal.SIGSTOP)  # hung mid-generation...
    worker.kill(signal.SIGKILL)  # ...then gone
    while not received.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    sock.close()
    text = received.decode(errors="replace")
    assert text.startswith("HTTP/1.1 200"), text[:200]
    assert "event: error" in text, text[-500:]
    assert "[DONE]" not in text, text[-500:]

    # A request in the worker's hands when it dies: 502 in the OpenAI shape.
    worker = make_model_worker(gw.broker, models="tiny-gpt2")
    wait_for(lambda: gw.chat(model="local/tiny-gpt2", max_tokens=1)[0] == 200, 10,
             "the new worker serving")
    os.kill(worker.pid, signal.SIGSTOP)
    result: Dict[str, Any] = {}

    def call() -> None:
        result["response"] = gw.chat(model="local/tiny-gpt2", max_tokens=50)
    thread = threading.Thread(target=call)
    thread.start()
    with gwp.Client(gw.broker.bus, heartbeat_ms=HEARTBEAT_MS) as bus:
        wait_for(lambda: services(bus).get("model.tiny-gpt2", {}).get("in_flight", 0) >= 1,
                 5, "the request dispatched to the (stopped) worker")
    worker.kill(signal.SIGKILL)
    thread.join(15)
    status, _, raw = result["response"]
    assert status == 502, raw
    assert_openai_error(raw, status)


def test_two_workers_share_the_load(make_gateway: Any, make_model_worker: Any) -> None:
    gw = make_gateway([], env=LOCAL_ENV)
    admins = ["model.admin.a", "model.admin.b"]
    for admin in admins:
        make_model_worker(gw.broker, models="tiny", capacity=1, admin=admin)
    with gwp.Client(gw.broker.bus, heartbeat_ms=HEARTBEAT_MS) as bus:
        wait_for(lambda: services(bus).get("model.tiny", {}).get("workers", 0) == 2, 10,
                 "two workers for model.tiny")
        wait_listed(gw, "local/tiny")
        results: List[int] = []

        def call() -> None:
            results.append(gw.chat(model="local/tiny", max_tokens=48, temperature=0)[0])
        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [200] * 8, results
        served = []
        for admin in admins:
            reply = bus.call(admin, msgpack.packb({"action": "status", "model": "tiny"}))
            assert reply is not None and reply.status == 200
            served.append(msgpack.unpackb(reply.body)["tokens_out"])
    assert all(n > 0 for n in served), served
