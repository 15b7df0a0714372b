"""OpenAI request validation and response shapes for the local models.

Pure functions (no bus, no model): they turn an OpenAI request body (already
decoded from msgpack) into validated generation parameters, and results
into ``chat.completion``, ``chat.completion.chunk``, ``text_completion`` and
embedding ``list`` objects, JSON-encoded once. Invalid input raises
``HandlerError`` 400 with the OpenAI error shape (``param`` names the
field).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from aigw_worker import HandlerError

from .engine import SamplingParams

STOP_MAX = 4
INPUTS_MAX = 2048


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None
        ) -> HandlerError:
    return HandlerError(400, message, "invalid_request_error", code, param)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sse(obj: Any) -> bytes:
    """One ready-to-send SSE event."""
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _number(body: Dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{key} must be a number", key)
    if not lo <= float(value) <= hi:
        raise bad(f"{key} must be between {lo} and {hi}", key)
    return float(value)


def sampling(body: Dict[str, Any], defaults: Dict[str, Any], chat: bool) -> SamplingParams:
    """SamplingParams from an OpenAI body; defaults from the model settings."""
    n = body.get("n")
    if n is not None and n != 1:
        raise bad("only n=1 is supported by local models", "n")
    key = "max_tokens"
    value = body.get("max_tokens")
    if chat and body.get("max_completion_tokens") is not None:
        key, value = "max_completion_tokens", body.get("max_completion_tokens")
    if value is None:
        value = defaults.get("max_tokens", 256 if chat else 16)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad(f"{key} must be a positive integer", key)
    stop = body.get("stop")
    if stop is None:
        stops: List[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise bad("stop must be a string or an array of strings", "stop")
    if len(stops) > STOP_MAX:
        raise bad(f"at most {STOP_MAX} stop sequences", "stop")
    stops = [s for s in stops if s]
    seed = body.get("seed", defaults.get("seed"))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed must be an integer", "seed")
    return SamplingParams(
        max_tokens=int(value),
        temperature=_number(body, "temperature", float(defaults.get("temperature", 1.0)),
                            0.0, 2.0),
        top_p=_number(body, "top_p", float(defaults.get("top_p", 1.0)), 0.0, 1.0) or 1.0,
        stop=stops,
        seed=None if seed is None else int(seed) & 0xFFFFFFFFFFFFFFFF)


def include_usage(body: Dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


def usage(prompt: int, completion: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


# --------------------------------------------------------------------------
# Chat


def chat_completion(rid: str, model: str, text: str, finish: str, use: Dict[str, int]
                    ) -> bytes:
    return dumps({
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": "aigw-local",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish}],
        "usage": use})


def chat_chunk(rid: str, model: str, created: int, delta: Dict[str, Any],
               finish: Optional[str] = None) -> bytes:
    return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": "aigw-local",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish}]})


def chat_usage_chunk(rid: str, model: str, created: int, use: Dict[str, int]) -> bytes:
    return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": "aigw-local", "choices": [],
                "usage": use})


# --------------------------------------------------------------------------
# Completions


def prompt_of(body: Dict[str, Any]) -> Tuple[Optional[str], Optional[List[int]]]:
    """(text, None) or (None, token ids) from a completions ``prompt``."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0], None
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return None, list(prompt)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        return prompt_of({"prompt": prompt[0]})
    if isinstance(prompt, list) and len(prompt) > 1:
        raise bad("local models take one prompt per request", "prompt")
    raise bad("prompt must be a string or an array of token ids", "prompt")


def text_completion(rid: str, model: str, text: str, finish: str, use: Dict[str, int]
                    ) -> bytes:
    return dumps({
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        "usage": use})


def completion_chunk(rid: str, model: str, created: int, text: str,
                     finish: Optional[str] = None) -> bytes:
    return sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": None,
                             "finish_reason": finish}]})


def completion_usage_chunk(rid: str, model: str, created: int, use: Dict[str, int]) -> bytes:
    return sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [], "usage": use})


# --------------------------------------------------------------------------
# Embeddings


def embedding_inputs(body: Dict[str, Any]) -> List[Any]:
    """The ``input`` as a list of strings or of token-id lists."""
    value = body.get("input")
    if isinstance(value, str):
        items: List[Any] = [value]
    elif isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        items = [list(value)]
    elif isinstance(value, list) and value and all(
            isinstance(x, str) or (isinstance(x, list) and x and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x)) for x in value):
        items = list(value)
    else:
        raise bad("input must be a string, an array of strings, or token ids", "input")
    if len(items) > INPUTS_MAX:
        raise bad(f"at most {INPUTS_MAX} inputs per request", "input")
    return items


def embedding_format(body: Dict[str, Any]) -> str:
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise bad("encoding_format must be float or base64", "encoding_format")
    return str(fmt)


def embedding_list(model: str, vectors: np.ndarray, fmt: str, tokens: int) -> bytes:
    data = []
    for i, vec in enumerate(vectors):
        if fmt == "base64":
            value: Any = base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
        else:
            value = [float(x) for x in vec]
        data.append({"object": "embedding", "index": i, "embedding": value})
    return dumps({"object": "list", "data": data, "model": model,
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def token_lists(items: Sequence[Any]) -> bool:
    return any(isinstance(x, list) for x in items)
