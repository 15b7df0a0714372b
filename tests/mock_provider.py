#!/usr/bin/python3
"""Mock model provider for aigw tests and benchmarks (stdlib only).

Speaks the providers' real wire formats over HTTP/1.1 (keep-alive, chunked
SSE streams) on one port:

  OpenAI-compatible   GET  /v1/models, GET /v1/models/{id}
                      POST /v1/chat/completions   (stream and non-stream)
                      POST /v1/completions        (legacy, stream and non-stream)
                      POST /v1/embeddings         (float or base64)
  Anthropic           POST /v1/messages           (stream and non-stream)
  Control (tests)     POST /_mock/config, POST /_mock/reset,
                      GET /_mock/config, GET /_mock/stats, GET /_mock/health

Reference: docs/MOCK_PROVIDER.md.  Token-count rules (deterministic):

  * a "token" is a whitespace-separated word;
  * prompt tokens = words in all message contents (text parts of content
    arrays; plus ``system`` for /v1/messages), words in the prompt(s) for
    /v1/completions and /v1/embeddings (a token array counts its length);
  * the reply is built from a base text (config ``text``, else
    "mock reply to: <last user message, first 100 chars>") as exactly
    ``chunks`` tokens (default 5, or the word count of a configured ``text``);
    token i is word i of the base text (cycled), preceded by a space for i>0;
    the reply is cut by stop sequences and by max_tokens (finish "length");
  * completion tokens = number of tokens emitted = number of content chunks
    of the stream.

The server is a single-threaded asyncio Protocol with its own minimal HTTP/1.1
parser, to keep per-request overhead low under benchmark load.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import itertools
import json
import os
import random
import signal
import struct
import sys
import time

DEFAULT_MODELS = ["mock-gpt", "mock-gpt-mini", "mock-embed"]
MAX_HEADER = 64 * 1024
MAX_BODY = 32 * 1024 * 1024
LAST_REQUESTS = 20
MAX_DISCONNECTS = 1000

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 409: "Conflict", 413: "Payload Too Large",
    422: "Unprocessable Entity", 429: "Too Many Requests",
    500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 529: "Overloaded",
}

CONFIG_KEYS = {
    "latency_ms", "chunk_delay_ms", "chunks", "status", "count",
    "break_after_chunks", "error_after_chunks", "models", "text",
    "embedding_dim", "hang", "retry_after", "api_key",
}


class ApiError(Exception):
    """An error answered in the provider's shape."""

    def __init__(self, status, message, param=None, code=None, etype=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.etype = etype


class BadHttp(Exception):
    pass


# --------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------

class State:
    def __init__(self, api_key, models, verbose):
        self.cli_api_key = api_key
        self.cli_models = list(models)
        self.verbose = verbose
        self.seq = 0
        self.reset()

    def reset(self):
        self.cfg = {
            "latency_ms": 0, "chunk_delay_ms": 0, "chunks": None,
            "status": None, "count": 0, "break_after_chunks": None,
            "error_after_chunks": None, "models": list(self.cli_models),
            "text": None, "embedding_dim": 8, "hang": False,
            "retry_after": 1, "api_key": self.cli_api_key,
        }
        self.requests = 0
        self.by_path = collections.Counter()
        self.last = collections.deque(maxlen=LAST_REQUESTS)
        self.disconnects = []
        self.active_streams = 0
        self._models_cache = None

    def update(self, upd):
        if not isinstance(upd, dict):
            raise ApiError(400, "config body must be a JSON object")
        bad = set(upd) - CONFIG_KEYS
        if bad:
            raise ApiError(400, "unknown config field(s): " + ", ".join(sorted(bad)))

        def num(k, lo=0, allow_none=True):
            v = upd[k]
            if v is None and allow_none:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo:
                raise ApiError(400, "config field %s must be a number >= %s" % (k, lo))
            return v

        new = dict(self.cfg)
        for k in ("latency_ms", "chunk_delay_ms"):
            if k in upd:
                new[k] = num(k) or 0
        for k in ("chunks", "break_after_chunks", "error_after_chunks"):
            if k in upd:
                v = num(k)
                new[k] = None if v is None else int(v)
        if "embedding_dim" in upd:
            new["embedding_dim"] = int(num(k="embedding_dim", lo=1, allow_none=False))
        if "retry_after" in upd:
            new["retry_after"] = num("retry_after")
        if "models" in upd:
            m = upd["models"]
            if not isinstance(m, list) or not all(isinstance(x, str) for x in m):
                raise ApiError(400, "config field models must be a list of strings")
            new["models"] = list(m)
        if "text" in upd:
            if upd["text"] is not None and not isinstance(upd["text"], str):
                raise ApiError(400, "config field text must be a string or null")
            new["text"] = upd["text"]
        if "api_key" in upd:
            if upd["api_key"] is not None and not isinstance(upd["api_key"], str):
                raise ApiError(400, "config field api_key must be a string or null")
            new["api_key"] = upd["api_key"] or None
        if "hang" in upd:
            new["hang"] = bool(upd["hang"])
        if "status" in upd:
            s = upd["status"]
            if s in (None, 0):
                new["status"], new["count"] = None, 0
            else:
                if isinstance(s, bool) or not isinstance(s, int) or not 100 <= s <= 599:
                    raise ApiError(400, "config field status must be an HTTP status")
                new["status"] = s
                new["count"] = 1
        if "count" in upd:
            c = upd["count"]
            if isinstance(c, bool) or not isinstance(c, int) or c < -1:
                raise ApiError(400, "config field count must be an integer >= -1")
            new["count"] = c
        self.cfg = new
        self._models_cache = None

    def take_forced_status(self):
        cfg = self.cfg
        s = cfg["status"]
        if s is None or cfg["count"] == 0:
            return None
        if cfg["count"] > 0:
            cfg["count"] -= 1
            if cfg["count"] == 0:
                cfg["status"] = None
        return s

    def next_id(self):
        self.seq += 1
        return "%s%012x" % (_BOOT, self.seq)

    def models_body(self):
        if self._models_cache is None:
            self._models_cache = _dumps({
                "object": "list",
                "data": [model_obj(m) for m in self.cfg["models"]],
            }).encode()
        return self._models_cache

    def stats(self):
        return {
            "requests": self.requests,
            "by_path": dict(self.by_path),
            "last_requests": list(self.last),
            "disconnects": list(self.disconnects),
            "active_streams": self.active_streams,
        }


_BOOT = "%06x" % (os.getpid() & 0xFFFFFF)
_CREATED = 1700000000


def model_obj(mid):
    return {"id": mid, "object": "model", "created": _CREATED, "owned_by": "aigw-mock"}


# --------------------------------------------------------------------------
# token rules
# --------------------------------------------------------------------------

def count_words(s):
    return len(s.split()) if s else 0


def content_text(content):
    """Text of an OpenAI/Anthropic message content (string or parts array)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                t = part.get("text")
                if isinstance(t, str):
                    out.append(t)
                elif part.get("type") == "tool_result":
                    out.append(content_text(part.get("content")))
        return " ".join(out)
    raise ApiError(400, "Invalid type for message content: expected a string or an array")


def build_reply(cfg, last_user, max_tokens, stops):
    """Returns (tokens, finish, stop_hit) where finish is stop|length."""
    text = cfg["text"]
    if text is None:
        base = "mock reply to: " + (last_user or "")[:100]
        n = cfg["chunks"] if cfg["chunks"] is not None else 5
    else:
        base = text
        n = cfg["chunks"] if cfg["chunks"] is not None else len(text.split())
    words = base.split() or ["mock"]
    toks = [w if i == 0 else " " + w
            for i, w in enumerate(itertools.islice(itertools.cycle(words), n))]
    finish, stop_hit = "stop", None
    if stops:
        full = "".join(toks)
        best = None
        for s in stops:
            if s:
                i = full.find(s)
                if i >= 0 and (best is None or i < best[0]):
                    best = (i, s)
        if best is not None:
            cut, stop_hit = best
            out, pos = [], 0
            for t in toks:
                if pos >= cut:
                    break
                piece = t[:cut - pos]
                out.append(piece)
                pos += len(t)
            toks = out
    if max_tokens is not None and len(toks) > max_tokens:
        toks = toks[:max_tokens]
        finish, stop_hit = "length", None
    return toks, finish, stop_hit


def parse_stops(v, name="stop"):
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    raise ApiError(400, "Invalid type for '%s'" % name, param=name, code="invalid_type")


def parse_max_tokens(body, names):
    for name in names:
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int):
            raise ApiError(400, "Invalid type for '%s': expected an integer" % name,
                           param=name, code="invalid_type")
        if v < 1:
            raise ApiError(400, "Invalid '%s': integer below minimum value 1" % name,
                           param=name, code="integer_below_min_value")
        return v
    return None


# --------------------------------------------------------------------------
# responses
# --------------------------------------------------------------------------

OPENAI_ERR = {
    400: ("invalid_request_error", None, "Bad request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory",
          "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "Not found."),
    409: ("invalid_request_error", None, "Conflict."),
    413: ("invalid_request_error", None, "Request too large."),
    429: ("requests", "rate_limit_exceeded",
          "Rate limit reached for requests. Please try again in 1s."),
    500: ("server_error", None,
          "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None,
          "The engine is currently overloaded, please try again later."),
    504: ("server_error", None, "Gateway timeout."),
}
ANTHROPIC_ERR = {
    400: "invalid_request_error", 401: "authentication_error",
    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
    429: "rate_limit_error", 500: "api_error", 529: "overloaded_error",
    503: "overloaded_error",
}


def openai_error_obj(status, message=None, param=None, code=None, etype=None):
    dt, dc, dm = OPENAI_ERR.get(status, ("server_error" if status >= 500
                                         else "invalid_request_error", None,
                                         "Error %d." % status))
    return {"error": {"message": message or dm, "type": etype or dt,
                      "param": param, "code": code if code is not None else
                      (dc if message is None or status in (401, 429) else None)}}


def anthropic_error_obj(status, message=None, etype=None):
    t = etype or ANTHROPIC_ERR.get(status, "api_error" if status >= 500
                                   else "invalid_request_error")
    return {"type": "error", "error": {"type": t, "message": message or
                                       {"overloaded_error": "Overloaded",
                                        "rate_limit_error": "Number of request tokens has exceeded your rate limit.",
                                        "api_error": "Internal server error"}.get(t, "Error %d" % status)}}


class Resp:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status, body, headers=None):
        self.status = status
        self.body = body
        self.headers = headers or []


class Stream:
    """A planned SSE stream: list of (kind, payload bytes), kind is
    'pre' (before content), 'content' (one token), 'post' (after content)."""
    __slots__ = ("events", "headers", "error_event", "meta")

    def __init__(self, events, headers, error_event, meta):
        self.events = events
        self.headers = headers
        self.error_event = error_event
        self.meta = meta


class Hang:
    pass


def json_resp(status, obj, headers=None):
    return Resp(status, _dumps(obj).encode(), headers)


def sse(obj):
    return b"data: " + _dumps(obj).encode() + b"\n\n"


def sse_ev(name, obj):
    return b"event: " + name.encode() + b"\ndata: " + _dumps(obj).encode() + b"\n\n"


def error_resp(state, flavor, status, message=None, param=None, code=None, etype=None):
    hdrs = []
    if status in (429, 503, 529):
        ra = state.cfg["retry_after"]
        if ra is not None:
            hdrs.append(("Retry-After", "%g" % ra))
    if flavor == "anthropic":
        if status == 429:
            hdrs.append(("anthropic-ratelimit-requests-remaining", "0"))
        return json_resp(status, anthropic_error_obj(status, message, etype), hdrs)
    if status == 429:
        hdrs += [("x-ratelimit-limit-requests", "60"),
                 ("x-ratelimit-remaining-requests", "0"),
                 ("x-ratelimit-reset-requests", "%gs" % (state.cfg["retry_after"] or 1))]
    return json_resp(status, openai_error_obj(status, message, param, code, etype), hdrs)


# --------------------------------------------------------------------------
# endpoint handlers (sync: return Resp, Stream or Hang; raise ApiError)
# --------------------------------------------------------------------------

_BAD_JSON = object()


def parse_json(raw):
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _BAD_JSON


def require_json(req):
    body = req.json if req.json is not None else parse_json(req.body)
    if body is _BAD_JSON:
        raise ApiError(400, "We could not parse the JSON body of your request. "
                       "(HINT: This likely means you aren't using your HTTP library "
                       "correctly. The OpenAI API expects a JSON payload, but what was "
                       "sent was not valid JSON.)")
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def require_model(state, body, flavor):
    model = body.get("model")
    if model is None:
        if flavor == "anthropic":
            raise ApiError(400, "model: Field required")
        raise ApiError(400, "you must provide a model parameter")
    if not isinstance(model, str):
        raise ApiError(400, "Invalid type for 'model': expected a string",
                       param="model", code="invalid_type")
    if model not in state.cfg["models"]:
        if flavor == "anthropic":
            raise ApiError(404, "model: " + model)
        raise ApiError(404, "The model `%s` does not exist or you do not have access to it."
                       % model, code="model_not_found")
    return model


def stream_opts(body):
    if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
        raise ApiError(400, "Invalid type for 'stream': expected a boolean",
                       param="stream", code="invalid_type")
    stream = bool(body.get("stream"))
    so = body.get("stream_options")
    include_usage = False
    if so is not None:
        if not isinstance(so, dict):
            raise ApiError(400, "Invalid type for 'stream_options': expected an object",
                           param="stream_options", code="invalid_type")
        if not stream:
            raise ApiError(400, "The 'stream_options' parameter is only allowed when "
                           "'stream' is enabled.", param="stream_options",
                           code="invalid_value")
        include_usage = bool(so.get("include_usage"))
    return stream, include_usage


def check_n(body):
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, "mock provider supports only n=1", param="n",
                       code="invalid_value")


def usage_obj(p, c):
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


SSE_HEADERS = [("Content-Type", "text/event-stream; charset=utf-8"),
               ("Cache-Control", "no-cache")]


def h_chat(state, req):
    body = require_json(req)
    model = require_model(state, body, "openai")
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError(400, "Missing required parameter: 'messages'.", param="messages",
                       code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "Invalid 'messages': expected a non-empty array.",
                       param="messages", code="invalid_value")
    prompt_tokens, last_user = 0, ""
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "Missing required parameter: 'messages[%d].role'." % i,
                           param="messages[%d].role" % i,
                           code="missing_required_parameter")
        t = content_text(m.get("content"))
        prompt_tokens += count_words(t)
        if m["role"] == "user":
            last_user = t
    check_n(body)
    stream, include_usage = stream_opts(body)
    max_tokens = parse_max_tokens(body, ("max_completion_tokens", "max_tokens"))
    toks, finish, _ = build_reply(state.cfg, last_user, max_tokens,
                                  parse_stops(body.get("stop")))
    usage = usage_obj(prompt_tokens, len(toks))
    rid = "chatcmpl-" + state.next_id()
    created = int(time.time())
    hdrs = [("x-request-id", "req_" + rid[9:]), ("openai-processing-ms", "1")]
    if not stream:
        return json_resp(200, {
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                  "content": "".join(toks),
                                                  "refusal": None, "annotations": []},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage, "service_tier": "default", "system_fingerprint": "fp_mock",
        }, hdrs)

    def chunk(delta, fr):
        c = {"id": rid, "object": "chat.completion.chunk", "created": created,
             "model": model, "service_tier": "default", "system_fingerprint": "fp_mock",
             "choices": [{"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": fr}]}
        if include_usage:
            c["usage"] = None
        return sse(c)

    ev = [("pre", chunk({"role": "assistant", "content": "", "refusal": None}, None))]
    ev += [("content", chunk({"content": t}, None)) for t in toks]
    ev.append(("post", chunk({}, finish)))
    if include_usage:
        ev.append(("post", sse({"id": rid, "object": "chat.completion.chunk",
                                "created": created, "model": model,
                                "service_tier": "default",
                                "system_fingerprint": "fp_mock", "choices": [],
                                "usage": usage})))
    ev.append(("post", b"data: [DONE]\n\n"))
    err = sse(openai_error_obj(500, "The server had an error while processing your "
                                    "request. Sorry about that!"))
    return Stream(ev, SSE_HEADERS + hdrs, err, {"model": model})


def h_completions(state, req):
    body = require_json(req)
    model = require_model(state, body, "openai")
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "Missing required parameter: 'prompt'.", param="prompt",
                       code="missing_required_parameter")
    prompt_tokens, last = prompt_count(prompt, "prompt")
    check_n(body)
    stream, include_usage = stream_opts(body)
    max_tokens = parse_max_tokens(body, ("max_tokens",))
    if max_tokens is None:
        max_tokens = 16  # the legacy API's documented default
    toks, finish, _ = build_reply(state.cfg, last, max_tokens,
                                  parse_stops(body.get("stop")))
    usage = usage_obj(prompt_tokens, len(toks))
    rid = "cmpl-" + state.next_id()
    created = int(time.time())
    hdrs = [("x-request-id", "req_" + rid[5:])]
    if not stream:
        return json_resp(200, {
            "id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": "".join(toks), "index": 0, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage, "system_fingerprint": "fp_mock",
        }, hdrs)

    def chunk(text, fr):
        c = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "system_fingerprint": "fp_mock",
             "choices": [{"text": text, "index": 0, "logprobs": None,
                          "finish_reason": fr}]}
        if include_usage:
            c["usage"] = None
        return sse(c)

    ev = [("content", chunk(t, None)) for t in toks]
    ev.append(("post", chunk("", finish)))
    if include_usage:
        ev.append(("post", sse({"id": rid, "object": "text_completion",
                                "created": created, "model": model,
                                "system_fingerprint": "fp_mock", "choices": [],
                                "usage": usage})))
    ev.append(("post", b"data: [DONE]\n\n"))
    err = sse(openai_error_obj(500))
    return Stream(ev, SSE_HEADERS + hdrs, err, {"model": model})


def _is_tokens(v):
    return isinstance(v, list) and v and all(
        isinstance(x, int) and not isinstance(x, bool) for x in v)


def prompt_inputs(inp, name):
    """List of (key, tokens) for a prompt/input that is a string, an array of
    strings, a token array or an array of token arrays."""
    bad = ApiError(400, "Invalid type for '%s': expected a string, an array of strings, "
                   "an array of integers or an array of integer arrays." % name,
                   param=name, code="invalid_type")
    if isinstance(inp, str):
        return [("s:" + inp, count_words(inp), inp)]
    if not isinstance(inp, list) or not inp:
        raise bad
    if _is_tokens(inp):
        return [("t:" + _dumps(inp), len(inp), "")]
    out = []
    for x in inp:
        if isinstance(x, str):
            out.append(("s:" + x, count_words(x), x))
        elif _is_tokens(x):
            out.append(("t:" + _dumps(x), len(x), ""))
        else:
            raise bad
    return out


def prompt_count(prompt, name):
    items = prompt_inputs(prompt, name)
    return sum(i[1] for i in items), items[-1][2]


def embed_vector(key, dim):
    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8],
                          "little")
    rnd = random.Random(seed)
    v = [rnd.uniform(-1.0, 1.0) for _ in range(dim)]
    norm = sum(x * x for x in v) ** 0.5 or 1.0
    packed = struct.pack("<%df" % dim, *[x / norm for x in v])
    return packed


def h_embeddings(state, req):
    body = require_json(req)
    model = require_model(state, body, "openai")
    inp = body.get("input")
    if inp is None:
        raise ApiError(400, "Missing required parameter: 'input'.", param="input",
                       code="missing_required_parameter")
    if inp == "" or (isinstance(inp, list) and "" in inp):
        raise ApiError(400, "'$.input' is invalid. Please check the API reference: "
                       "https://platform.openai.com/docs/api-reference.", param="input",
                       code="invalid_value")
    items = prompt_inputs(inp, "input")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, "Invalid value for 'encoding_format': expected 'float' or "
                       "'base64'.", param="encoding_format", code="invalid_value")
    dim = body.get("dimensions")
    if dim is None:
        dim = state.cfg["embedding_dim"]
    elif isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ApiError(400, "Invalid 'dimensions': integer below minimum value 1",
                       param="dimensions", code="integer_below_min_value")
    data = []
    for i, (key, _, _) in enumerate(items):
        packed = embed_vector(key, dim)
        if fmt == "base64":
            emb = base64.b64encode(packed).decode("ascii")
        else:
            emb = list(struct.unpack("<%df" % dim, packed))
        data.append({"object": "embedding", "index": i, "embedding": emb})
    pt = sum(i[1] for i in items)
    return json_resp(200, {"object": "list", "data": data, "model": model,
                           "usage": {"prompt_tokens": pt, "total_tokens": pt}},
                     [("x-request-id", "req_" + state.next_id())])


def h_messages(state, req):
    if "anthropic-version" not in req.headers:
        raise ApiError(400, "anthropic-version: header is required")
    body = require_json(req)
    model = require_model(state, body, "anthropic")
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError(400, "messages: Field required")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages: at least one message is required")
    mt = body.get("max_tokens")
    if mt is None:
        raise ApiError(400, "max_tokens: Field required")
    if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
        raise ApiError(400, "max_tokens: Input should be a valid integer >= 1")
    input_tokens = count_words(content_text(body.get("system")))
    last_user = ""
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(400, "messages.%d.role: Input should be 'user' or 'assistant'" % i)
        t = content_text(m.get("content"))
        input_tokens += count_words(t)
        if m["role"] == "user":
            last_user = t
    stops = parse_stops(body.get("stop_sequences"), "stop_sequences")
    if body.get("stream") is not None and not isinstance(body.get("stream"), bool):
        raise ApiError(400, "stream: Input should be a valid boolean")
    toks, finish, stop_hit = build_reply(state.cfg, last_user, mt, stops)
    stop_reason = "max_tokens" if finish == "length" else (
        "stop_sequence" if stop_hit is not None else "end_turn")
    mid = "msg_mock" + state.next_id()
    hdrs = [("request-id", "req_mock" + mid[8:])]
    cache0 = {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    if not body.get("stream"):
        return json_resp(200, {
            "id": mid, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "".join(toks)}],
            "stop_reason": stop_reason, "stop_sequence": stop_hit,
            "usage": dict(input_tokens=input_tokens, output_tokens=len(toks), **cache0),
        }, hdrs)
    ev = [("pre", sse_ev("message_start", {
        "type": "message_start",
        "message": {"id": mid, "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": None, "stop_sequence": None,
                    "usage": dict(input_tokens=input_tokens, output_tokens=1, **cache0)}})),
          ("pre", sse_ev("content_block_start", {
              "type": "content_block_start", "index": 0,
              "content_block": {"type": "text", "text": ""}})),
          ("pre", sse_ev("ping", {"type": "ping"}))]
    ev += [("content", sse_ev("content_block_delta", {
        "type": "content_block_delta", "index": 0,
        "delta": {"type": "text_delta", "text": t}})) for t in toks]
    ev.append(("post", sse_ev("content_block_stop",
                              {"type": "content_block_stop", "index": 0})))
    ev.append(("post", sse_ev("message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_hit},
        "usage": {"output_tokens": len(toks)}})))
    ev.append(("post", sse_ev("message_stop", {"type": "message_stop"})))
    err = sse_ev("error", anthropic_error_obj(529))
    return Stream(ev, SSE_HEADERS + hdrs, err, {"model": model})


def h_models(state, req):
    return Resp(200, state.models_body())


def h_model(state, req):
    mid = req.path[len("/v1/models/"):]
    if mid not in state.cfg["models"]:
        raise ApiError(404, "The model '%s' does not exist" % mid, param="model",
                       code="model_not_found")
    return json_resp(200, model_obj(mid))


ROUTES = {
    ("POST", "/v1/chat/completions"): (h_chat, "openai"),
    ("POST", "/v1/completions"): (h_completions, "openai"),
    ("POST", "/v1/embeddings"): (h_embeddings, "openai"),
    ("POST", "/v1/messages"): (h_messages, "anthropic"),
    ("GET", "/v1/models"): (h_models, "openai"),
}
PATHS = {p for (_, p) in ROUTES}


def authorized(state, req, flavor):
    key = state.cfg["api_key"]
    if key is None:
        return True
    if flavor == "anthropic":
        return req.headers.get("x-api-key") == key
    return req.headers.get("authorization") == "Bearer " + key


def handle_provider(state, req):
    """Sync part of a provider request: Resp, Stream or Hang."""
    path = req.path
    route = ROUTES.get((req.method, path))
    flavor = route[1] if route else ("anthropic" if path == "/v1/messages" else "openai")
    if state.cfg["hang"]:
        return Hang()
    forced = state.take_forced_status()
    if forced is not None:
        return error_resp(state, flavor, forced)
    if not authorized(state, req, flavor):
        if flavor == "anthropic":
            return error_resp(state, flavor, 401, "invalid x-api-key")
        return error_resp(state, flavor, 401,
                          "Incorrect API key provided. You can find your API key at "
                          "https://platform.openai.com/account/api-keys.",
                          code="invalid_api_key")
    try:
        if route is None:
            if req.method == "GET" and path.startswith("/v1/models/"):
                return h_model(state, req)
            if path in PATHS:
                return error_resp(state, flavor, 405,
                                  "Invalid method for URL (%s %s)" % (req.method, path))
            if flavor == "anthropic":
                return error_resp(state, flavor, 404, "Not found")
            return error_resp(state, flavor, 404,
                              "Invalid URL (%s %s)" % (req.method, path))
        return route[0](state, req)
    except ApiError as e:
        return error_resp(state, flavor, e.status, e.message, e.param, e.code, e.etype)


def handle_control(state, req):
    path = req.path
    try:
        if path == "/_mock/config":
            if req.method == "POST":
                state.update(require_json(req) if req.body.strip() else {})
            elif req.method != "GET":
                raise ApiError(405, "use GET or POST")
            return json_resp(200, state.cfg)
        if path == "/_mock/reset" and req.method == "POST":
            state.reset()
            return json_resp(200, {"ok": True})
        if path == "/_mock/stats" and req.method == "GET":
            return json_resp(200, state.stats())
        if path == "/_mock/health":
            return json_resp(200, {"ok": True})
        raise ApiError(404, "unknown control endpoint %s %s" % (req.method, path))
    except ApiError as e:
        return json_resp(e.status, openai_error_obj(e.status, e.message))


# --------------------------------------------------------------------------
# HTTP/1.1 protocol
# --------------------------------------------------------------------------

class Request:
    __slots__ = ("method", "path", "version", "headers", "body", "keep_alive", "json")


def parse_chunked(buf, start):
    """Decode a chunked body from buf[start:]. Returns (body, end) or None."""
    out = bytearray()
    pos = start
    while True:
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            return None
        try:
            size = int(bytes(buf[pos:nl]).split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadHttp("bad chunk size")
        pos = nl + 2
        if size == 0:
            # trailers until an empty line
            while True:
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    return None
                if nl == pos:
                    return bytes(out), nl + 2
                pos = nl + 2
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos:pos + size]
        pos += size + 2
        if len(out) > MAX_BODY:
            raise BadHttp("body too large")


def _status_line(status):
    return ("HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Status"))).encode()


class Conn(asyncio.Protocol):
    __slots__ = ("state", "tr", "buf", "busy", "closed", "gone", "sent_continue",
                 "paused", "drain_waiter", "peer")

    def __init__(self, state):
        self.state = state
        self.tr = None
        self.buf = bytearray()
        self.busy = False
        self.closed = False
        self.gone = None
        self.sent_continue = False
        self.paused = False
        self.drain_waiter = None

    # -- asyncio callbacks
    def connection_made(self, transport):
        self.tr = transport
        self.gone = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc):
        self.closed = True
        if not self.gone.done():
            self.gone.set_result(True)
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def eof_received(self):
        # The peer closed its side: for an HTTP client that means it went away.
        self.closed = True
        if not self.gone.done():
            self.gone.set_result(True)
        return False  # close the transport

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def data_received(self, data):
        self.buf += data
        if not self.busy:
            self.process()
        elif len(self.buf) > MAX_BODY + MAX_HEADER:
            self.tr.abort()

    # -- request parsing
    def parse(self):
        buf = self.buf
        he = buf.find(b"\r\n\r\n")
        if he < 0:
            if len(buf) > MAX_HEADER:
                raise BadHttp("headers too large")
            return None
        lines = bytes(buf[:he]).split(b"\r\n")
        while lines and not lines[0]:
            lines.pop(0)  # tolerate stray CRLF between requests
        if not lines:
            del buf[:he + 4]
            return None
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise BadHttp("bad request line")
        headers = {}
        for line in lines[1:]:
            k, sep, v = line.partition(b":")
            if not sep:
                raise BadHttp("bad header line")
            k = k.strip().lower().decode("latin-1")
            v = v.strip().decode("latin-1")
            headers[k] = headers[k] + ", " + v if k in headers else v
        start = he + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            res = parse_chunked(buf, start)
            if res is None:
                self.maybe_continue(headers)
                return None
            body, end = res
        else:
            try:
                cl = int(headers.get("content-length", "0"))
            except ValueError:
                raise BadHttp("bad content-length")
            if cl < 0 or cl > MAX_BODY:
                raise BadHttp("bad content-length")
            end = start + cl
            if len(buf) < end:
                self.maybe_continue(headers)
                return None
            body = bytes(buf[start:end])
        del buf[:end]
        self.sent_continue = False
        req = Request()
        req.method = parts[0].decode("latin-1")
        target = parts[1].decode("latin-1")
        q = target.find("?")
        req.path = target if q < 0 else target[:q]
        req.version = parts[2]
        req.headers = headers
        req.body = body
        req.json = None
        conn = headers.get("connection", "").lower()
        req.keep_alive = ("close" not in conn) if parts[2] == b"HTTP/1.1" else (
            "keep-alive" in conn)
        return req

    def maybe_continue(self, headers):
        if not self.sent_continue and headers.get("expect", "").lower() == "100-continue":
            self.sent_continue = True
            self.tr.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- dispatch
    def process(self):
        state = self.state
        while not self.busy and not self.closed:
            try:
                req = self.parse()
            except BadHttp as e:
                self.write_resp(json_resp(400, openai_error_obj(400, "bad HTTP request: %s" % e)),
                                False)
                return
            if req is None:
                return
            if req.path.startswith("/_mock/"):
                self.write_resp(handle_control(state, req), req.keep_alive)
                continue
            self.record(req)
            res = handle_provider(state, req)
            cfg = state.cfg
            if not cfg["latency_ms"]:
                if type(res) is Resp:
                    self.write_resp(res, req.keep_alive)
                    continue
                if (type(res) is Stream and not cfg["chunk_delay_ms"]
                        and cfg["break_after_chunks"] is None
                        and cfg["error_after_chunks"] is None):
                    self.write_stream_now(res, req.keep_alive)
                    continue
            self.busy = True
            asyncio.ensure_future(self.drive(req, res, dict(state.cfg)))

    def record(self, req):
        st = self.state
        st.requests += 1
        st.by_path[req.path] += 1
        body = req.json = parse_json(req.body)
        if body is _BAD_JSON:
            body = req.body.decode("utf-8", "replace")
        st.last.append({"method": req.method, "path": req.path,
                        "headers": req.headers, "body": body, "t": time.time()})
        if st.verbose:
            print("%s %s" % (req.method, req.path), file=sys.stderr, flush=True)

    def write_resp(self, resp, keep_alive):
        if self.closed:
            return
        head = [_status_line(resp.status),
                b"Content-Type: application/json\r\nContent-Length: ",
                str(len(resp.body)).encode(),
                b"\r\nConnection: keep-alive\r\n" if keep_alive else
                b"\r\nConnection: close\r\n"]
        for k, v in resp.headers:
            head.append(("%s: %s\r\n" % (k, v)).encode("latin-1"))
        head.append(b"\r\n")
        head.append(resp.body)
        self.tr.write(b"".join(head))
        if not keep_alive:
            self.closed = True
            self.tr.close()

    def write_stream_now(self, plan, keep_alive):
        """Fast path: a stream without delays or faults, written at once."""
        head = [_status_line(200), b"Transfer-Encoding: chunked\r\n",
                b"Connection: keep-alive\r\n" if keep_alive else b"Connection: close\r\n"]
        for k, v in plan.headers:
            head.append(("%s: %s\r\n" % (k, v)).encode("latin-1"))
        head.append(b"\r\n")
        for _, payload in plan.events:
            head.append(b"%x\r\n%s\r\n" % (len(payload), payload))
        head.append(b"0\r\n\r\n")
        self.tr.write(b"".join(head))
        if not keep_alive:
            self.closed = True
            self.tr.close()

    async def wait_gone(self, seconds):
        """Sleep up to `seconds`; True if the client went away meanwhile."""
        if self.gone.done():
            return True
        if seconds <= 0:
            return False
        done, _ = await asyncio.wait((self.gone,), timeout=seconds)
        return bool(done)

    async def drain(self):
        if self.paused and not self.closed:
            self.drain_waiter = asyncio.get_running_loop().create_future()
            await self.drain_waiter
            self.drain_waiter = None

    async def drive(self, req, res, cfg):
        try:
            started = time.time()
            if type(res) is Hang:
                await self.gone
                self.note_disconnect(req, 0, started, "hang", None)
                return
            latency = cfg["latency_ms"] / 1000.0
            if type(res) is Resp:
                if await self.wait_gone(latency):
                    self.note_disconnect(req, 0, started, "latency", False)
                    return
                self.write_resp(res, req.keep_alive)
                return
            await self.stream(req, res, cfg, latency)
        except Exception as e:  # never leave a connection busy forever
            if self.state.verbose:
                print("drive error: %r" % (e,), file=sys.stderr, flush=True)
            if self.tr is not None:
                self.tr.abort()
            self.closed = True
        finally:
            self.busy = False
            if not self.closed and self.buf:
                self.process()

    async def stream(self, req, plan, cfg, latency):
        st = self.state
        st.active_streams += 1
        started = time.time()
        sent = 0
        delay = cfg["chunk_delay_ms"] / 1000.0
        brk = cfg["break_after_chunks"]
        errk = cfg["error_after_chunks"]
        tr = self.tr
        try:
            if await self.wait_gone(latency):
                self.note_disconnect(req, 0, started, "latency")
                return
            head = [_status_line(200), b"Transfer-Encoding: chunked\r\n",
                    b"Connection: keep-alive\r\n" if req.keep_alive else
                    b"Connection: close\r\n"]
            for k, v in plan.headers:
                head.append(("%s: %s\r\n" % (k, v)).encode("latin-1"))
            head.append(b"\r\n")
            pending = b"".join(head)
            first_gate, post_seen = True, False
            for kind, payload in plan.events:
                # A "gate" precedes every token and the first event after the
                # tokens: cut points and chunk delays apply there.
                if kind == "content" or (kind == "post" and not post_seen):
                    if brk is not None and sent >= brk:
                        self.closed = True
                        tr.write(pending)
                        # abrupt end: FIN without the terminating zero-length
                        # chunk, the finish chunk or [DONE] (close() flushes
                        # what was written; abort() could drop it)
                        tr.close()
                        return
                    if errk is not None and sent >= errk:
                        e = plan.error_event
                        tr.write(pending + b"%x\r\n%s\r\n0\r\n\r\n" % (len(e), e))
                        if not req.keep_alive:
                            self.closed = True
                            tr.close()
                        return
                    if not first_gate and delay > 0:
                        if pending:
                            tr.write(pending)
                            pending = b""
                        if await self.wait_gone(delay):
                            self.note_disconnect(req, sent, started, "streaming")
                            return
                        await self.drain()
                    first_gate = False
                if kind == "post":
                    post_seen = True
                pending += b"%x\r\n%s\r\n" % (len(payload), payload)
                if kind == "content":
                    sent += 1
            tr.write(pending + b"0\r\n\r\n")
            if self.closed:
                self.note_disconnect(req, sent, started, "streaming")
            elif not req.keep_alive:
                self.closed = True
                tr.close()
        finally:
            st.active_streams -= 1

    def note_disconnect(self, req, chunks_sent, started, phase, stream=True):
        """phase: latency (before the first byte), streaming, or hang;
        stream: whether the request asked for a stream (None for hang)."""
        d = self.state.disconnects
        d.append({"path": req.path, "chunks_sent": chunks_sent, "at": time.time(),
                  "started": started, "phase": phase, "stream": stream})
        if len(d) > MAX_DISCONNECTS:
            del d[0]


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="aigw mock model provider")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    ap.add_argument("--port-file", help="write the bound port here (atomically)")
    ap.add_argument("--api-key", help="require this key (Bearer / x-api-key)")
    ap.add_argument("--models", help="comma-separated model ids (default: %s)"
                    % ",".join(DEFAULT_MODELS))
    ap.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = ap.parse_args(argv)

    models = [m for m in args.models.split(",") if m] if args.models else DEFAULT_MODELS
    state = State(args.api_key, models, args.verbose)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(loop.create_server(
        lambda: Conn(state), args.host, args.port, backlog=1024, reuse_address=True))
    port = server.sockets[0].getsockname()[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.replace(tmp, args.port_file)
    print("listening %d" % port, flush=True)

    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    try:
        loop.run_until_complete(stop)
    finally:
        server.close()
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
