"""Integration tests of tests/mock_provider.py over real HTTP.

Run: /usr/bin/python3 -m pytest -q tests/integration/test_mock_provider.py

The mock runs as a real process on a free loopback port (--port 0 +
--port-file); every test starts from POST /_mock/reset.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MOCK = os.path.join(os.path.dirname(HERE), "mock_provider.py")
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
DEFAULT_MODELS = ["mock-gpt", "mock-gpt-mini", "mock-embed"]


# --------------------------------------------------------------------------
# process and HTTP helpers
# --------------------------------------------------------------------------

class Mock:
    def __init__(self, *extra):
        self.dir = tempfile.mkdtemp(prefix="mockprov-")
        self.port_file = os.path.join(self.dir, "port")
        self.proc = subprocess.Popen(
            [PYTHON, MOCK, "--port", "0", "--port-file", self.port_file, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 10
        while not os.path.exists(self.port_file):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("mock did not start: %s" % self.proc.stderr.read())
            time.sleep(0.02)
        with open(self.port_file) as f:
            self.port = int(f.read().strip())
        self.stdout_line = self.proc.stdout.readline().strip()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def conn(self, timeout=10):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, raw=None, timeout=10):
        """One request on a fresh connection -> (status, headers, parsed body)."""
        c = self.conn(timeout)
        try:
            data = raw if raw is not None else (
                json.dumps(body).encode() if body is not None else None)
            h = {"Content-Type": "application/json"}
            h.update(headers or {})
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
            payload = r.read()
            try:
                parsed = json.loads(payload) if payload else None
            except ValueError:
                parsed = payload.decode()
            return r.status, r, parsed
        finally:
            c.close()

    def post(self, path, body, headers=None):
        return self.request("POST", path, body, headers)

    def config(self, **cfg):
        st, _, body = self.post("/_mock/config", cfg)
        assert st == 200, body
        return body

    def stats(self):
        st, _, body = self.request("GET", "/_mock/stats")
        assert st == 200
        return body


def read_sse(resp):
    """Parse an SSE body from an http.client response.

    Returns (events, complete): events is a list of (event_name, data_str);
    complete is False when the chunked body was cut off (no terminating chunk)."""
    events, name, data = [], None, []
    complete = True
    lines = []
    buf = b""
    while True:  # read1, not readline: readline hides a truncated chunked body
        try:
            piece = resp.read1(65536)
        except (http.client.IncompleteRead, http.client.HTTPException,
                ConnectionError, ValueError):
            complete = False
            break
        if not piece:
            break
        buf += piece
        *done, buf = buf.split(b"\n")
        lines += done
    for line in lines:
        line = line.decode().rstrip("\r")
        if line == "":
            if data:
                events.append((name, "\n".join(data)))
            name, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
    return events, complete


def stream(mock, path, body, headers=None):
    c = mock.conn()
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    c.request("POST", path, body=json.dumps(body), headers=h)
    r = c.getresponse()
    if r.status != 200:
        payload = r.read()
        c.close()
        return r.status, r, json.loads(payload), True
    events, complete = read_sse(r)
    c.close()
    return r.status, r, events, complete


ANTH = {"anthropic-version": "2023-06-01"}


def chat_body(text="hello there world", **kw):
    b = {"model": "mock-gpt", "messages": [{"role": "user", "content": text}]}
    b.update(kw)
    return b


def assert_openai_error(body, etype=None, code=None):
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if etype is not None:
        assert err["type"] == etype
    if code is not None:
        assert err["code"] == code


def assert_anthropic_error(body, etype):
    assert body["type"] == "error", body
    assert body["error"]["type"] == etype
    assert isinstance(body["error"]["message"], str)


def raw_http(port, data, timeout=5):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(data)
    return s


def recv_until(s, needle, timeout=5):
    buf = b""
    deadline = time.time() + timeout
    while needle not in buf:
        if time.time() > deadline:
            raise AssertionError("timeout waiting for %r in %r" % (needle, buf))
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    m = Mock()
    yield m
    m.stop()


@pytest.fixture
def mock(server):
    st, _, _ = server.post("/_mock/reset", {})
    assert st == 200
    return server


# --------------------------------------------------------------------------
# startup, models
# --------------------------------------------------------------------------

def test_startup_reports_port(mock):
    assert mock.stdout_line == "listening %d" % mock.port
    st, _, body = mock.request("GET", "/_mock/health")
    assert st == 200 and body == {"ok": True}


def test_models_list_default(mock):
    st, r, body = mock.request("GET", "/v1/models")
    assert st == 200
    assert r.getheader("Content-Type") == "application/json"
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == DEFAULT_MODELS
    for m in body["data"]:
        assert m["object"] == "model"
        assert isinstance(m["created"], int) and isinstance(m["owned_by"], str)
    st, _, one = mock.request("GET", "/v1/models/mock-embed")
    assert st == 200 and one["id"] == "mock-embed" and one["object"] == "model"
    st, _, err = mock.request("GET", "/v1/models/nope")
    assert st == 404
    assert_openai_error(err, "invalid_request_error")


def test_models_from_config_and_reset(mock):
    mock.config(models=["m-a", "m-b"])
    _, _, body = mock.request("GET", "/v1/models")
    assert [m["id"] for m in body["data"]] == ["m-a", "m-b"]
    st, _, _ = mock.post("/v1/chat/completions", chat_body(model="m-b"))
    assert st == 200
    st, _, err = mock.post("/v1/chat/completions", chat_body(model="mock-gpt"))
    assert st == 404
    mock.post("/_mock/reset", {})
    _, _, body = mock.request("GET", "/v1/models")
    assert [m["id"] for m in body["data"]] == DEFAULT_MODELS


# --------------------------------------------------------------------------
# chat completions
# --------------------------------------------------------------------------

def test_chat_nonstream_shape_and_usage(mock):
    body = {"model": "mock-gpt", "messages": [
        {"role": "system", "content": "You are helpful"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "hello there"},
                                     {"type": "text", "text": "world"}]}]}
    st, r, resp = mock.post("/v1/chat/completions", body)
    assert st == 200
    assert r.getheader("Content-Type") == "application/json"
    assert resp["object"] == "chat.completion"
    assert resp["id"].startswith("chatcmpl-")
    assert resp["model"] == "mock-gpt"
    assert isinstance(resp["created"], int)
    assert len(resp["choices"]) == 1
    ch = resp["choices"][0]
    assert ch["index"] == 0 and ch["finish_reason"] == "stop" and ch["logprobs"] is None
    assert ch["message"]["role"] == "assistant"
    assert ch["message"]["refusal"] is None
    assert ch["message"]["content"] == "mock reply to: hello there"
    # prompt: 3 + 2 + 0 + 3 words; completion: 5 chunks (default)
    assert resp["usage"] == {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}


def test_chat_max_tokens_and_stop(mock):
    _, _, resp = mock.post("/v1/chat/completions", chat_body(max_tokens=2))
    assert resp["choices"][0]["finish_reason"] == "length"
    assert resp["choices"][0]["message"]["content"] == "mock reply"
    assert resp["usage"]["completion_tokens"] == 2
    _, _, resp = mock.post("/v1/chat/completions", chat_body(max_completion_tokens=3))
    assert resp["usage"]["completion_tokens"] == 3
    assert resp["choices"][0]["finish_reason"] == "length"
    _, _, resp = mock.post("/v1/chat/completions", chat_body(max_tokens=50))
    assert resp["choices"][0]["finish_reason"] == "stop"
    assert resp["usage"]["completion_tokens"] == 5
    _, _, resp = mock.post("/v1/chat/completions", chat_body(stop=[" to:"]))
    assert resp["choices"][0]["message"]["content"] == "mock reply"
    assert resp["choices"][0]["finish_reason"] == "stop"
    assert resp["usage"]["completion_tokens"] == 2


def test_chat_text_and_chunks_config(mock):
    mock.config(text="Alpha beta gamma delta epsilon zeta")
    _, _, resp = mock.post("/v1/chat/completions", chat_body())
    assert resp["choices"][0]["message"]["content"] == "Alpha beta gamma delta epsilon zeta"
    assert resp["usage"]["completion_tokens"] == 6
    mock.config(chunks=8)
    _, _, resp = mock.post("/v1/chat/completions", chat_body())
    assert resp["choices"][0]["message"]["content"] == \
        "Alpha beta gamma delta epsilon zeta Alpha beta"
    assert resp["usage"]["completion_tokens"] == 8
    mock.config(text=None, chunks=2)
    _, _, resp = mock.post("/v1/chat/completions", chat_body())
    assert resp["choices"][0]["message"]["content"] == "mock reply"


def chunk_objs(events):
    assert events[-1] == (None, "[DONE]"), events[-3:]
    assert all(d != "[DONE]" for _, d in events[:-1])
    return [json.loads(d) for _, d in events[:-1]]


def test_chat_stream_without_usage(mock):
    st, r, events, complete = stream(mock, "/v1/chat/completions",
                                     chat_body(stream=True))
    assert st == 200 and complete
    assert r.getheader("Content-Type").startswith("text/event-stream")
    assert r.getheader("Transfer-Encoding") == "chunked"
    chunks = chunk_objs(events)
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == "mock-gpt"
        assert "usage" not in c
        assert len(c["choices"]) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["choices"][0]["finish_reason"] is None
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert len(content) == 5
    assert "".join(content) == "mock reply to: hello there"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_with_usage(mock):
    st, _, events, complete = stream(
        mock, "/v1/chat/completions",
        chat_body(stream=True, stream_options={"include_usage": True}, max_tokens=3))
    assert st == 200 and complete
    chunks = chunk_objs(events)
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    for c in chunks[:-1]:
        assert "usage" in c and c["usage"] is None
        assert len(c["choices"]) == 1
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    content = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert content == ["mock", " reply", " to:"]
    # include_usage false: no usage chunk
    _, _, events, _ = stream(mock, "/v1/chat/completions",
                             chat_body(stream=True, stream_options={"include_usage": False}))
    assert all(c["choices"] for c in chunk_objs(events))


# --------------------------------------------------------------------------
# legacy completions
# --------------------------------------------------------------------------

def test_completions_nonstream(mock):
    st, _, resp = mock.post("/v1/completions",
                            {"model": "mock-gpt-mini", "prompt": "Say this is a test"})
    assert st == 200
    assert resp["object"] == "text_completion" and resp["id"].startswith("cmpl-")
    assert resp["model"] == "mock-gpt-mini"
    ch = resp["choices"][0]
    assert ch["text"] == "mock reply to: Say this" and ch["finish_reason"] == "stop"
    assert ch["index"] == 0 and ch["logprobs"] is None
    assert resp["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    # token-array prompt, default max_tokens 16 caps a long reply
    mock.config(chunks=40)
    _, _, resp = mock.post("/v1/completions", {"model": "mock-gpt", "prompt": [1, 2, 3]})
    assert resp["usage"]["prompt_tokens"] == 3
    assert resp["usage"]["completion_tokens"] == 16
    assert resp["choices"][0]["finish_reason"] == "length"


def test_completions_stream(mock):
    st, _, events, complete = stream(
        mock, "/v1/completions",
        {"model": "mock-gpt", "prompt": "a b c", "stream": True,
         "stream_options": {"include_usage": True}})
    assert st == 200 and complete
    chunks = chunk_objs(events)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5,
                                   "total_tokens": 8}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == "mock reply to: a b"
    _, _, events, _ = stream(mock, "/v1/completions",
                             {"model": "mock-gpt", "prompt": "x", "stream": True})
    assert all(c["choices"] and "usage" not in c for c in chunk_objs(events))


# --------------------------------------------------------------------------
# embeddings
# --------------------------------------------------------------------------

def test_embeddings_float(mock):
    st, _, resp = mock.post("/v1/embeddings", {"model": "mock-embed",
                                                "input": "The quick brown fox"})
    assert st == 200
    assert resp["object"] == "list" and resp["model"] == "mock-embed"
    assert resp["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    (d,) = resp["data"]
    assert d["object"] == "embedding" and d["index"] == 0
    v = d["embedding"]
    assert len(v) == 8 and all(isinstance(x, float) for x in v)
    assert abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-5
    _, _, again = mock.post("/v1/embeddings", {"model": "mock-embed",
                                                "input": ["The quick brown fox", "other"]})
    assert again["data"][0]["embedding"] == v          # deterministic
    assert again["data"][1]["embedding"] != v
    assert [x["index"] for x in again["data"]] == [0, 1]
    assert again["usage"]["prompt_tokens"] == 5


def test_embeddings_tokens_base64_dims(mock):
    _, _, f = mock.post("/v1/embeddings", {"model": "mock-embed",
                                           "input": [[1, 2, 3], [4, 5]]})
    assert f["usage"]["prompt_tokens"] == 5 and len(f["data"]) == 2
    _, _, b = mock.post("/v1/embeddings", {"model": "mock-embed",
                                           "input": [[1, 2, 3], [4, 5]],
                                           "encoding_format": "base64"})
    for fd, bd in zip(f["data"], b["data"]):
        raw = base64.b64decode(bd["embedding"])
        assert len(raw) == 8 * 4
        assert list(struct.unpack("<8f", raw)) == fd["embedding"]
    _, _, single = mock.post("/v1/embeddings", {"model": "mock-embed", "input": [1, 2, 3]})
    assert single["data"][0]["embedding"] == f["data"][0]["embedding"]
    mock.config(embedding_dim=32)
    _, _, r = mock.post("/v1/embeddings", {"model": "mock-embed", "input": "x"})
    assert len(r["data"][0]["embedding"]) == 32
    _, _, r = mock.post("/v1/embeddings", {"model": "mock-embed", "input": "x",
                                           "dimensions": 4, "encoding_format": "base64"})
    assert len(base64.b64decode(r["data"][0]["embedding"])) == 16


def test_embeddings_errors(mock):
    for body in ({"model": "mock-embed"}, {"model": "mock-embed", "input": ""},
                 {"model": "mock-embed", "input": 5},
                 {"model": "mock-embed", "input": "x", "encoding_format": "hex"}):
        st, _, err = mock.post("/v1/embeddings", body)
        assert st == 400, body
        assert_openai_error(err, "invalid_request_error")


# --------------------------------------------------------------------------
# Anthropic messages
# --------------------------------------------------------------------------

def anth_body(**kw):
    b = {"model": "mock-gpt", "max_tokens": 100, "system": "be brief",
         "messages": [{"role": "user", "content": "hello there world"}]}
    b.update(kw)
    return b


def test_messages_nonstream(mock):
    st, r, resp = mock.post("/v1/messages", anth_body(), ANTH)
    assert st == 200
    assert resp["type"] == "message" and resp["role"] == "assistant"
    assert resp["id"].startswith("msg_")
    assert resp["content"] == [{"type": "text", "text": "mock reply to: hello there"}]
    assert resp["stop_reason"] == "end_turn" and resp["stop_sequence"] is None
    assert resp["usage"]["input_tokens"] == 5 and resp["usage"]["output_tokens"] == 5
    assert r.getheader("request-id")
    _, _, resp = mock.post("/v1/messages", anth_body(max_tokens=2), ANTH)
    assert resp["stop_reason"] == "max_tokens" and resp["usage"]["output_tokens"] == 2
    _, _, resp = mock.post("/v1/messages", anth_body(stop_sequences=["reply"]), ANTH)
    assert resp["stop_reason"] == "stop_sequence" and resp["stop_sequence"] == "reply"
    assert resp["content"][0]["text"] == "mock "


def test_messages_stream_event_sequence(mock):
    st, r, events, complete = stream(mock, "/v1/messages", anth_body(stream=True), ANTH)
    assert st == 200 and complete
    assert r.getheader("Content-Type").startswith("text/event-stream")
    names = [n for n, _ in events]
    datas = [json.loads(d) for _, d in events]
    for n, d in zip(names, datas):
        assert d["type"] == n
    core = [n for n in names if n != "ping"]
    assert core == (["message_start", "content_block_start"] + ["content_block_delta"] * 5
                    + ["content_block_stop", "message_delta", "message_stop"])
    start = datas[0]["message"]
    assert start["usage"]["input_tokens"] == 5 and start["content"] == []
    assert start["stop_reason"] is None
    deltas = [d["delta"] for d in datas if d["type"] == "content_block_delta"]
    assert all(x["type"] == "text_delta" for x in deltas)
    assert "".join(x["text"] for x in deltas) == "mock reply to: hello there"
    md = datas[names.index("message_delta")]
    assert md["delta"]["stop_reason"] == "end_turn"
    assert md["usage"]["output_tokens"] == 5


def test_messages_errors(mock):
    st, _, err = mock.post("/v1/messages", anth_body())          # no anthropic-version
    assert st == 400
    assert_anthropic_error(err, "invalid_request_error")
    b = anth_body()
    del b["max_tokens"]
    st, _, err = mock.post("/v1/messages", b, ANTH)
    assert st == 400 and "max_tokens" in err["error"]["message"]
    st, _, err = mock.post("/v1/messages", anth_body(model="claude-x"), ANTH)
    assert st == 404
    assert_anthropic_error(err, "not_found_error")
    st, _, err = mock.request("POST", "/v1/messages", raw=b"{nope", headers=ANTH)
    assert st == 400
    assert_anthropic_error(err, "invalid_request_error")


# --------------------------------------------------------------------------
# errors and auth
# --------------------------------------------------------------------------

def test_openai_errors(mock):
    st, _, err = mock.request("POST", "/v1/chat/completions", raw=b"{not json")
    assert st == 400
    assert_openai_error(err, "invalid_request_error")
    st, _, err = mock.post("/v1/chat/completions", {"messages": []})
    assert st == 400
    assert_openai_error(err, "invalid_request_error")
    st, _, err = mock.post("/v1/chat/completions", {"model": "mock-gpt"})
    assert st == 400
    assert_openai_error(err, "invalid_request_error", "missing_required_parameter")
    assert err["error"]["param"] == "messages"
    st, _, err = mock.post("/v1/chat/completions", chat_body(model="gpt-9"))
    assert st == 404
    assert_openai_error(err, "invalid_request_error", "model_not_found")
    st, _, err = mock.post("/v1/chat/completions", chat_body(n=2))
    assert st == 400
    st, _, err = mock.post("/v1/nope", {})
    assert st == 404
    assert_openai_error(err, "invalid_request_error")
    st, _, err = mock.post("/v1/completions", {"model": "mock-gpt"})
    assert st == 400 and err["error"]["param"] == "prompt"


def test_api_key_required():
    m = Mock("--api-key", "sk-test")
    try:
        st, _, err = m.post("/v1/chat/completions", chat_body())
        assert st == 401
        assert_openai_error(err, "invalid_request_error", "invalid_api_key")
        st, _, _ = m.post("/v1/chat/completions", chat_body(),
                          {"Authorization": "Bearer wrong"})
        assert st == 401
        st, _, _ = m.post("/v1/chat/completions", chat_body(),
                          {"Authorization": "Bearer sk-test"})
        assert st == 200
        st, _, _ = m.request("GET", "/v1/models", headers={"Authorization": "Bearer x"})
        assert st == 401
        st, _, err = m.post("/v1/messages", anth_body(), dict(ANTH, **{"x-api-key": "bad"}))
        assert st == 401
        assert_anthropic_error(err, "authentication_error")
        st, _, _ = m.post("/v1/messages", anth_body(),
                          dict(ANTH, **{"x-api-key": "sk-test"}))
        assert st == 200
        # the key survives a reset; control endpoints need no key
        st, _, _ = m.post("/_mock/reset", {})
        assert st == 200
        st, _, _ = m.post("/v1/embeddings", {"model": "mock-embed", "input": "a"})
        assert st == 401
    finally:
        m.stop()


def test_config_validation(mock):
    st, _, err = mock.post("/_mock/config", {"latency": 5})
    assert st == 400 and "latency" in err["error"]["message"]
    st, _, err = mock.post("/_mock/config", {"status": "boom"})
    assert st == 400
    st, _, cfg = mock.request("GET", "/_mock/config")
    assert st == 200 and cfg["latency_ms"] == 0 and cfg["chunks"] is None


# --------------------------------------------------------------------------
# control behaviours
# --------------------------------------------------------------------------

def test_latency(mock):
    mock.config(latency_ms=400)
    t0 = time.time()
    st, _, _ = mock.post("/v1/chat/completions", chat_body())
    assert st == 200 and time.time() - t0 >= 0.39
    c = mock.conn()
    t0 = time.time()
    c.request("POST", "/v1/chat/completions", body=json.dumps(chat_body(stream=True)))
    r = c.getresponse()
    first = time.time() - t0
    events, complete = read_sse(r)
    c.close()
    assert first >= 0.39 and complete and events[-1][1] == "[DONE]"
    # control endpoints are never delayed
    t0 = time.time()
    mock.stats()
    assert time.time() - t0 < 0.3


def test_forced_status_count(mock):
    mock.config(status=500, count=2)
    seen = [mock.post("/v1/chat/completions", chat_body()) for _ in range(3)]
    assert [s for s, _, _ in seen] == [500, 500, 200]
    assert_openai_error(seen[0][2], "server_error")
    # a forced status on a stream request is a plain JSON error, not SSE
    mock.config(status=503)
    st, r, err, _ = stream(mock, "/v1/chat/completions", chat_body(stream=True))
    assert st == 503 and r.getheader("Retry-After") == "1"
    assert_openai_error(err)
    assert mock.post("/v1/chat/completions", chat_body())[0] == 200   # count defaults to 1


def test_forced_429_retry_after_and_forever(mock):
    mock.config(status=429, count=-1, retry_after=7)
    for _ in range(4):
        st, r, err = mock.post("/v1/embeddings", {"model": "mock-embed", "input": "x"})
        assert st == 429
        assert r.getheader("Retry-After") == "7"
        assert r.getheader("x-ratelimit-remaining-requests") == "0"
        assert_openai_error(err, code="rate_limit_exceeded")
    st, _, err = mock.post("/v1/messages", anth_body(), ANTH)
    assert st == 429
    assert_anthropic_error(err, "rate_limit_error")
    assert mock.stats()["requests"] == 5
    mock.config(status=529, count=1)
    st, _, err = mock.post("/v1/messages", anth_body(), ANTH)
    assert st == 529
    assert_anthropic_error(err, "overloaded_error")
    assert mock.post("/v1/messages", anth_body(), ANTH)[0] == 200


def test_chunk_delay(mock):
    mock.config(chunk_delay_ms=100, chunks=3)
    t0 = time.time()
    st, _, events, complete = stream(mock, "/v1/chat/completions", chat_body(stream=True))
    elapsed = time.time() - t0
    assert st == 200 and complete
    assert len(chunk_objs(events)) == 5            # role, 3 tokens, finish
    assert 0.29 <= elapsed < 2.0                   # 3 gaps of 100 ms


def test_break_after_chunks_openai(mock):
    mock.config(break_after_chunks=2)
    st, _, events, complete = stream(
        mock, "/v1/chat/completions",
        chat_body(stream=True, stream_options={"include_usage": True}))
    assert st == 200
    assert not complete                            # no terminating chunk
    datas = [d for _, d in events]
    assert "[DONE]" not in datas
    chunks = [json.loads(d) for d in datas]
    assert len(chunks) == 3                        # role + 2 content chunks
    assert all(c["choices"] and c["choices"][0]["finish_reason"] is None for c in chunks)
    # the server survives and serves the next request normally
    st, _, events, complete = stream(mock, "/v1/completions",
                                     {"model": "mock-gpt", "prompt": "x", "stream": True})
    assert complete is False and not any(d == "[DONE]" for _, d in events)
    mock.config(break_after_chunks=None)
    st, _, events, complete = stream(mock, "/v1/chat/completions", chat_body(stream=True))
    assert complete and events[-1][1] == "[DONE]"


def test_break_after_chunks_anthropic(mock):
    mock.config(break_after_chunks=1)
    st, _, events, complete = stream(mock, "/v1/messages", anth_body(stream=True), ANTH)
    assert st == 200 and not complete
    names = [n for n, _ in events]
    assert names.count("content_block_delta") == 1
    assert "message_stop" not in names and "message_delta" not in names


def test_error_after_chunks(mock):
    mock.config(error_after_chunks=2)
    st, _, events, complete = stream(mock, "/v1/chat/completions", chat_body(stream=True))
    assert st == 200 and complete
    last = json.loads(events[-1][1])
    assert_openai_error(last, "server_error")
    assert len(events) == 4 and "[DONE]" not in [d for _, d in events]
    st, _, events, complete = stream(mock, "/v1/messages", anth_body(stream=True), ANTH)
    assert events[-1][0] == "error"
    assert_anthropic_error(json.loads(events[-1][1]), "overloaded_error")


def test_client_disconnect_detected_within_a_second(mock):
    mock.config(chunk_delay_ms=5000, chunks=5)
    body = json.dumps(chat_body(stream=True)).encode()
    s = raw_http(mock.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    got = recv_until(s, b'"content":"mock"')
    assert b"HTTP/1.1 200" in got
    assert mock.stats()["active_streams"] == 1
    t_close = time.time()
    s.close()
    deadline = t_close + 1.0
    rec = None
    while time.time() < deadline:
        st = mock.stats()
        if st["disconnects"]:
            rec = st["disconnects"][-1]
            break
        time.sleep(0.02)
    assert rec is not None, "disconnect not seen within 1 s"
    assert rec["path"] == "/v1/chat/completions"
    assert rec["chunks_sent"] == 1
    assert rec["at"] - t_close < 1.0
    assert rec["started"] <= rec["at"]
    assert mock.stats()["active_streams"] == 0


def test_disconnect_during_anthropic_stream(mock):
    mock.config(chunk_delay_ms=3000)
    body = json.dumps(anth_body(stream=True)).encode()
    s = raw_http(mock.port, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n"
                 b"anthropic-version: 2023-06-01\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    recv_until(s, b"text_delta")
    s.close()
    t_close = time.time()
    while time.time() < t_close + 1.0 and not mock.stats()["disconnects"]:
        time.sleep(0.02)
    (rec,) = mock.stats()["disconnects"]
    assert rec["path"] == "/v1/messages" and rec["chunks_sent"] == 1


def test_disconnect_while_waiting_for_first_byte(mock):
    mock.config(latency_ms=3000)
    body = json.dumps(chat_body()).encode()
    s = raw_http(mock.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(0.2)
    s.close()
    t_close = time.time()
    while time.time() < t_close + 1.0 and not mock.stats()["disconnects"]:
        time.sleep(0.02)
    (rec,) = mock.stats()["disconnects"]
    assert rec["phase"] == "latency" and rec["stream"] is False
    assert rec["chunks_sent"] == 0 and rec["at"] - t_close < 1.0


def test_connection_close_and_http10(mock):
    body = json.dumps(chat_body()).encode()
    for head in (b"POST /v1/chat/completions HTTP/1.1\r\nConnection: close\r\n",
                 b"POST /v1/chat/completions HTTP/1.0\r\n"):
        s = raw_http(mock.port, head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while True:                      # the server closes after the response
            piece = s.recv(65536)
            if not piece:
                break
            data += piece
        s.close()
        assert data.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in data
        assert data.endswith(b"}")


def test_hang(mock):
    mock.config(hang=True)
    c = mock.conn(timeout=0.5)
    c.request("POST", "/v1/chat/completions", body=json.dumps(chat_body()))
    with pytest.raises(socket.timeout):
        c.getresponse()
    c.close()
    time.sleep(0.1)
    recs = mock.stats()["disconnects"]
    assert recs and recs[-1]["phase"] == "hang" and recs[-1]["stream"] is None
    mock.config(hang=False)
    assert mock.post("/v1/chat/completions", chat_body())[0] == 200


def test_stats(mock):
    mock.post("/v1/chat/completions", chat_body(), {"Authorization": "Bearer abc"})
    mock.post("/v1/embeddings", {"model": "mock-embed", "input": "x"})
    mock.request("GET", "/v1/models")
    st = mock.stats()
    assert st["requests"] == 3
    assert st["by_path"] == {"/v1/chat/completions": 1, "/v1/embeddings": 1,
                             "/v1/models": 1}
    first = st["last_requests"][0]
    assert first["method"] == "POST" and first["path"] == "/v1/chat/completions"
    assert first["headers"]["authorization"] == "Bearer abc"
    assert first["body"] == chat_body()
    assert st["last_requests"][2]["body"] is None
    assert st["disconnects"] == [] and st["active_streams"] == 0
    for _ in range(25):
        mock.request("GET", "/v1/models")
    st = mock.stats()
    assert st["requests"] == 28 and len(st["last_requests"]) == 20
    mock.post("/_mock/reset", {})
    st = mock.stats()
    assert st["requests"] == 0 and st["last_requests"] == [] and st["by_path"] == {}


# --------------------------------------------------------------------------
# HTTP/1.1 behaviour
# --------------------------------------------------------------------------

def test_keep_alive_across_requests_and_streams(mock):
    c = mock.conn()
    try:
        c.request("GET", "/v1/models")
        r = c.getresponse()
        r.read()
        sock = c.sock
        assert r.getheader("Connection") == "keep-alive"
        for i in range(3):
            c.request("POST", "/v1/chat/completions", body=json.dumps(
                chat_body(stream=bool(i % 2))))
            r = c.getresponse()
            if i % 2:
                events, complete = read_sse(r)
                assert complete and events[-1][1] == "[DONE]"
            else:
                assert json.loads(r.read())["object"] == "chat.completion"
            assert c.sock is sock          # same TCP connection throughout
    finally:
        c.close()


def test_pipelining_expect_continue_and_chunked_body(mock):
    body = json.dumps(chat_body()).encode()
    one = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
           % (len(body), body))
    s = raw_http(mock.port, one + one)
    data = recv_until(s, b"HTTP/1.1 200 OK", 5)
    deadline = time.time() + 5
    while data.count(b"chat.completion") < 2 and time.time() < deadline:
        data += s.recv(65536)
    assert data.count(b"HTTP/1.1 200 OK") == 2
    s.close()
    # Expect: 100-continue, then a chunked request body
    s = raw_http(mock.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert recv_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 100 Continue")
    half = len(body) // 2
    s.sendall(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
              % (half, body[:half], len(body) - half, body[half:]))
    data = recv_until(s, b'"total_tokens"')
    assert b"HTTP/1.1 200 OK" in data and b"mock reply to: hello there" in data
    s.close()
