"""The model service: serves local models on the aigw bus.

    /usr/bin/python3 python/aigw_model_worker.py [--models tiny,hash-embed]
        [--capacity 4] [--bus tcp://127.0.0.1:5555] [--model-path var/models]

(or ``python3 -m aigw_models.serve`` with ``python/`` on ``PYTHONPATH``).

Each model is the bus service ``model.<name>`` (the router sends a client's
``local/<name>`` there) with ``--capacity`` batch slots: that many requests
are decoded together, one batched forward per step. The envelope's
``ann.op`` selects the operation (``chat``, ``completions``, ``embeddings``;
without it the body decides: ``messages``, ``prompt`` or ``input``). Replies
follow proto/STAGES.md §5: a non-stream FINAL 200 carries the OpenAI JSON
(``ann.ctype = "json"``); a stream is PARTIALs of SSE events ending with
``data: [DONE]``, then FINAL 200 with an empty body; both put
``ann.usage`` in the FINAL envelope. Errors are FINAL ≥ 400 with the OpenAI
error object.

The management service (default ``model.admin``, ``--admin-service``)
lists, starts, stops, configures and downloads models; its messages are in
proto/STAGES.md §7.2. Loading and downloading run in background threads and
report progress through ``status``; the bus loop never blocks on them. A
started model is ``loaded`` only once the broker has confirmed its
registration (``Worker.registered``), so a request sent after ``status``
says ``loaded`` is dispatched to it.

Billing: after every chat/completions/embeddings request, one usage event
(STAGES.md §6.2) goes to ``--billing-service`` (default ``billing``) through
a ``UsageProducer`` (bounded in-memory spool, resent until acknowledged;
when full, new requests get 503 ``usage_spool_full``); ``AIGW_BILLING=0``
turns it off.

Environment: ``AIGW_BUS`` (bus endpoint), ``MODEL_PATH`` (models folder,
default ``var/models`` of the repository), ``AIGW_MODELS`` (like
``--models``), ``AIGW_BILLING`` (``0`` = no usage events), ``AIGW_BILLING_SERVICE``,
``AIGW_BILLING_SPOOL_MAX``, ``LOG_LEVEL`` (debug, info, warning, error), ``LOG_FORMAT``
(``json`` for JSON lines, else text; always on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aigw_worker import Final, HandlerError, Request, Worker  # noqa: E402
from aigw_worker.protocol import RID_SIZE, now_ms  # noqa: E402
from aigw_worker.usage import SPOOL_MAX_DEFAULT, UsageProducer  # noqa: E402

from aigw_models import catalog, openai_api as api  # noqa: E402
from aigw_models.catalog import HashModel, TextModel  # noqa: E402
from aigw_models.download import Download, DownloadError, parse_files  # noqa: E402
from aigw_models.embed import DIM_MAX  # noqa: E402
from aigw_models.tokenizers import normalise_messages, render_chat  # noqa: E402
from aigw_models.transformer import ModelError  # noqa: E402

log = logging.getLogger("aigw.models")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#  Settings a client may change per model (admin "settings"), with bounds.
SETTINGS_SPEC: Dict[str, tuple] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "max_tokens": (int, 1, 1 << 20),
    "seed": (int, 0, (1 << 63) - 1),
    "capacity": (int, 1, 256),
    "dimensions": (int, 1, DIM_MAX),
}
ADMIN_ACTIONS = ("list", "status", "start", "stop", "settings", "download")
#  Operations that are billed: each such request a model serves produces one
#  usage event (proto/STAGES.md §6.2).
BILLED_OPS = ("chat", "completions", "embeddings")
DEFAULT_SETTINGS: Dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 256}


class ModelState:
    """What the admin service reports for one model."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = "available"  # available, loading, loaded, stopping, downloading, error
        self.progress = 0.0
        self.phase = ""
        self.error: Optional[str] = None
        self.settings: Dict[str, Any] = {}
        self.download: Optional[Download] = None
        self.loaded_at: Optional[float] = None

    def view(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"id": self.name, "state": self.state,
                               "progress": round(self.progress, 4), "phase": self.phase,
                               "error": self.error, "service": f"model.{self.name}"}
        if self.download is not None:
            out["download"] = self.download.view()
        return out


class ModelServer:
    """The models of one worker process and their bus handlers."""

    def __init__(self, worker: Worker, root: str, capacity: int = 4,
                 admin_service: Optional[str] = "model.admin",
                 usage: Optional[UsageProducer] = None) -> None:
        self.worker = worker
        self.root = root
        self.capacity = capacity
        #  The usage event producer (None: billing off); the worker loop
        #  drives its connection.
        self.usage = usage
        self.usage_skipped = 0  # billed requests without a tenant (not sent)
        if usage is not None:
            worker.attach(usage)
        self.models: Dict[str, Any] = {}  # name -> TextModel / HashModel (serving)
        self.states: Dict[str, ModelState] = {}
        self.lock = threading.Lock()  # guards states against loader/download threads
        worker.add_step(self.step)
        if admin_service:
            worker.add_service(admin_service, self.admin, capacity=16)

    # -- life cycle of models -------------------------------------------------------

    def state(self, name: str) -> ModelState:
        with self.lock:
            st = self.states.get(name)
            if st is None:
                st = self.states[name] = ModelState(name)
            return st

    def start(self, name: str, wait: bool = False) -> ModelState:
        """Load name in a background thread, then register ``model.<name>``.

        ValueError for an invalid name or a model that is not there."""
        if not catalog.valid_name(name):
            raise ValueError(f"invalid model name {name!r}")
        if name not in catalog.BUILTIN and not os.path.isdir(catalog.model_dir(self.root, name)):
            raise ValueError(f"model {name!r} not found under MODEL_PATH")
        st = self.state(name)
        with self.lock:
            if st.state in ("loading", "loaded", "downloading"):
                return st
            if st.state == "stopping":
                raise ValueError(f"model {name!r} is stopping; start it again when stopped")
            st.state, st.progress, st.phase, st.error = "loading", 0.0, "queued", None
        capacity = int(st.settings.get("capacity", self.capacity))

        def progress(fraction: float, phase: str) -> None:
            with self.lock:
                st.progress, st.phase = fraction, phase

        def work() -> None:
            try:
                model = catalog.load(self.root, name, capacity, progress)
            except Exception as exc:  # noqa: BLE001 — any failure is reported in status
                log.error("load failed model=%s: %s", name, exc)
                with self.lock:
                    st.state, st.error, st.phase = "error", str(exc), "failed"
                return
            self.worker.call_soon(lambda: self._serve(name, model, capacity))

        if wait:
            work()
        else:
            threading.Thread(target=work, name=f"load-{name}", daemon=True).start()
        return st

    def _serve(self, name: str, model: Any, capacity: int) -> None:
        st = self.state(name)
        model.settings = dict(DEFAULT_SETTINGS)
        if isinstance(model, HashModel):
            model.settings["dimensions"] = model.embedder.dim
        model.settings.update(st.settings)
        self.models[name] = model
        service = f"model.{name}"

        def registered() -> None:
            #  "loaded" only once the broker has confirmed the READY (its
            #  answer to the PING that follows READY): from then on a request
            #  for model.<name> is dispatched, never 404/503 for a moment.
            with self.lock:
                if st.state != "loading" or self.models.get(name) is not model:
                    return
                st.state, st.progress, st.phase, st.loaded_at = (
                    "loaded", 1.0, "serving", time.time())
            log.info("serving %s capacity=%d", service, capacity)

        with self.lock:
            st.progress, st.phase = 1.0, "registering"
        if service not in self.worker.sessions:
            self.worker.add_service(service, self._handler(name), capacity=capacity,
                                    on_registered=registered,
                                    on_end=lambda req: self._usage_event(name, req))
        elif self.worker.registered(service):
            registered()
        else:
            self.worker.sessions[service].on_registered = registered

    def stop(self, name: str) -> ModelState:
        """Drain ``model.<name>`` (new requests get 503), then unregister and
        unload. ValueError if it is not loaded."""
        st = self.state(name)
        service = f"model.{name}"
        if st.state != "loaded" or service not in self.worker.sessions:
            raise ValueError(f"model {name!r} is not loaded")

        def removed() -> None:
            self.models.pop(name, None)
            with self.lock:
                st.state, st.progress, st.phase = "available", 0.0, "stopped"
            log.info("stopped %s", service)

        with self.lock:
            st.state, st.phase = "stopping", "draining"
        self.worker.remove_service(service, drain=True, on_removed=removed)
        return st

    def step(self) -> bool:
        """The worker loop's step: one batched decode per model with work."""
        did = False
        for model in list(self.models.values()):
            if isinstance(model, TextModel) and model.engine.has_work():
                try:
                    did = model.engine.step() or did
                except Exception:  # noqa: BLE001
                    log.exception("decode step failed model=%s", model.name)
                    for seq in list(model.engine.active.values()):
                        seq.finish_reason = seq.finish_reason or "error"
        return did

    # -- model requests -----------------------------------------------------------

    def _handler(self, name: str) -> Any:
        def handle(req: Request) -> Any:
            model = self.models.get(name)
            if model is None:
                raise HandlerError(503, f"model {name} is not loaded", "server_error",
                                   "model_not_loaded")
            req.ann["worker"] = self.worker.label
            body = req.obj()
            if not isinstance(body, dict):
                raise api.bad("request body must be a map")
            op = req.op or ("chat" if "messages" in body else "embeddings" if "input" in body
                            else "completions" if "prompt" in body else None)
            req.state["op"] = op
            if op in BILLED_OPS and self.usage is not None and \
                    not self.usage.room(self._billed_in_flight(req)):
                #  Backpressure: billing has not acknowledged max events;
                #  serving more would produce events there is no room for.
                req.state["unbilled"] = True
                raise HandlerError(503, "usage events are not being acknowledged by billing; "
                                   "retry later", "server_error", "usage_spool_full")
            if op in BILLED_OPS and self.usage is not None and _tenant_of(req):
                #  A usage event will settle this request's hold (STAGES.md
                #  §6.3: the edge releases only FINALs without ann.channel).
                req.ann["channel"] = "local"
            shown = body.get("model") if isinstance(body.get("model"), str) else f"local/{name}"
            if op == "embeddings":
                return self._embeddings(model, body, shown)
            if op in ("chat", "completions"):
                if not isinstance(model, TextModel):
                    raise api.bad(f"model {shown} only serves embeddings", "model",
                                  "unsupported_operation")
                return self._generate(model, req, body, op, shown)
            if op == "models":
                return Final.json(api.dumps({"object": "list", "data": [
                    {"id": f"local/{name}", "object": "model", "created": 0,
                     "owned_by": "local"}]}))
            raise api.bad(f"operation {op!r} is not supported by local models", None,
                          "unsupported_operation")
        return handle

    def _prompt(self, model: TextModel, body: Dict[str, Any], op: str) -> List[int]:
        tok = model.tokenizer
        if op == "chat":
            try:
                messages = normalise_messages(body.get("messages"))
                text = render_chat(model.chat_template, messages, tok.bos_token, tok.eos_token)
            except ValueError as exc:
                raise api.bad(str(exc), "messages") from None
            return tok.encode(text)
        text, ids = api.prompt_of(body)
        if ids is not None:
            if any(not 0 <= t < model.model.config.vocab_size for t in ids):
                raise api.bad("token id out of range", "prompt")
            return ids
        return tok.encode(text or "")

    def _generate(self, model: TextModel, req: Request, body: Dict[str, Any], op: str,
                  shown: str) -> Iterator[Optional[bytes]]:
        chat = op == "chat"
        params = api.sampling(body, model.settings, chat)
        prompt = self._prompt(model, body, op)
        if len(prompt) >= model.context:
            raise api.bad(f"the prompt is {len(prompt)} tokens; this model's context is "
                          f"{model.context}", "messages" if chat else "prompt",
                          "context_length_exceeded")
        params.max_tokens = min(params.max_tokens, model.context - len(prompt))
        stream = bool(req.stream and body.get("stream"))
        want_usage = api.include_usage(body)
        return self._run(model, req, prompt, params, chat, stream, want_usage, shown)

    def _run(self, model: TextModel, req: Request, prompt: List[int], params: Any, chat: bool,
             stream: bool, want_usage: bool, shown: str) -> Iterator[Optional[bytes]]:
        try:
            seq = model.engine.add(prompt, params)
        except ModelError as exc:
            raise HandlerError(503, str(exc), "server_error", "over_capacity") from None
        req.state["seq"] = seq  # the usage event counts its tokens
        rid = api.new_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        parts: List[str] = []
        try:
            if stream and chat:
                yield api.chat_chunk(rid, shown, created, {"role": "assistant", "content": ""})
            while True:
                #  done is read BEFORE take: a yield below hands the loop a
                #  decode step, which may end the sequence after this take;
                #  reading done after the yield would drop that last text.
                done = seq.done
                delta = seq.take()
                if delta:
                    if stream:
                        yield (api.chat_chunk(rid, shown, created, {"content": delta}) if chat
                               else api.completion_chunk(rid, shown, created, delta))
                    else:
                        parts.append(delta)
                if done:
                    break
                yield None
            if seq.finish_reason == "error":
                raise HandlerError(500, "generation failed", "server_error", "internal_error")
            use = api.usage(seq.prompt_tokens, seq.completion_tokens)
            finish = seq.finish_reason or "stop"
            if not stream:
                text = "".join(parts)
                raw = (api.chat_completion(rid, shown, text, finish, use) if chat
                       else api.text_completion(rid, shown, text, finish, use))
                return Final.json(raw, usage=use)
            yield (api.chat_chunk(rid, shown, created, {}, finish) if chat
                   else api.completion_chunk(rid, shown, created, "", finish))
            if want_usage:
                yield (api.chat_usage_chunk(rid, shown, created, use) if chat
                       else api.completion_usage_chunk(rid, shown, created, use))
            yield api.SSE_DONE
            return Final(200, b"", {"usage": use})
        finally:
            model.engine.release(seq)

    def _embeddings(self, model: Any, body: Dict[str, Any], shown: str) -> Final:
        items = api.embedding_inputs(body)
        fmt = api.embedding_format(body)
        dims = body.get("dimensions")
        if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int)
                                 or not 1 <= dims <= DIM_MAX):
            raise api.bad(f"dimensions must be 1..{DIM_MAX}", "dimensions")
        if isinstance(model, HashModel):
            texts = [x if isinstance(x, str) else " ".join(str(t) for t in x) for x in items]
            vectors, tokens = model.embedder.embed_many(
                texts, int(dims or model.settings.get("dimensions") or model.embedder.dim))
        else:
            tok = model.tokenizer
            lists = [x if isinstance(x, list) else tok.encode(x) for x in items]
            for i, ids in enumerate(lists):
                if not ids:
                    raise api.bad(f"input[{i}] is empty", "input")
                if len(ids) > model.context:
                    raise api.bad(f"input[{i}] is {len(ids)} tokens; the context is "
                                  f"{model.context}", "input", "context_length_exceeded")
                if any(not 0 <= t < model.model.config.vocab_size for t in ids):
                    raise api.bad("token id out of range", "input")
            vectors = model.model.embed_texts(lists)
            if dims is not None:
                if dims > vectors.shape[1]:
                    raise api.bad(f"dimensions must be at most {vectors.shape[1]}",
                                  "dimensions")
                vectors = vectors[:, :dims]
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                vectors = vectors / np.maximum(norms, 1e-12)
            tokens = sum(len(x) for x in lists)
        use = {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}
        return Final.json(api.embedding_list(shown, vectors, fmt, tokens), usage=use)

    # -- usage events (billing) --------------------------------------------------

    def _billed_in_flight(self, req: Request) -> int:
        """Requests in progress on the model services, this one included:
        each will submit one usage event when it ends."""
        return sum(len(session.tasks) for service, session in self.worker.sessions.items()
                   if service.startswith("model.") and service[len("model."):] in self.models)

    def _usage_event(self, name: str, req: Request) -> None:
        """The Worker's on_end for model.<name>: one usage event per
        chat/completions/embeddings request (proto/STAGES.md §6.2), whatever
        its outcome. Tokens are the FINAL's ann.usage; a request that ended
        without one (cancelled 499, deadline 504, abandoned 502, an error)
        counts the tokens of its sequence so far, ``estimated`` when it was
        cut short mid-generation. Requests without a tenant (they did not
        come through auth, e.g. bus tools) are not billed."""
        if self.usage is None or req.state.get("unbilled"):
            return
        try:
            env = req.envelope()
        except HandlerError:
            return
        op = req.state.get("op") or env.ann.get("op")
        if op not in BILLED_OPS:
            return
        tenant = _tenant_of(req)
        if not tenant:
            self.usage_skipped += 1
            log.debug("usage event skipped (no tenant) rid=%s", req.rid_hex)
            return
        status = int(req.status or 500)
        use = req.final_ann.get("usage") if status == 200 else None
        seq = req.state.get("seq")
        estimated = False
        if isinstance(use, dict):
            prompt = int(use.get("prompt_tokens") or 0)
            completion = int(use.get("completion_tokens") or 0)
        elif seq is not None:
            prompt, completion = seq.prompt_tokens, seq.completion_tokens
            estimated = status in (499, 502, 504)
        else:
            prompt = completion = 0
        event: Dict[str, Any] = {
            "rid": req.rid, "ts": now_ms(),
            "model": env.model if isinstance(env.model, str) and env.model
            else f"local/{name}",
            "channel": "local", "prompt_tokens": prompt, "completion_tokens": completion,
            "cached_tokens": 0, "estimated": estimated, "status": status, "hold": 0}
        for key in ("key", "user", "group"):
            if isinstance(tenant.get(key), str):
                event[key] = tenant[key]
        rl = env.ann.get("rl")
        if isinstance(rl, dict):
            hold = rl.get("hold")
            if isinstance(hold, int) and not isinstance(hold, bool) and hold >= 0:
                event["hold"] = hold
            if isinstance(rl.get("scopes"), list):
                event["scopes"] = [s for s in rl["scopes"] if isinstance(s, str)]
            if isinstance(rl.get("est_tokens"), int) and not isinstance(rl["est_tokens"], bool):
                event["est_tokens"] = rl["est_tokens"]
            if isinstance(rl.get("lease"), bool):
                event["lease"] = rl["lease"]
        if len(req.rid) == RID_SIZE:
            self.usage.submit(event)

    # -- the admin service ----------------------------------------------------------------

    def admin(self, req: Request) -> Final:
        body = req.obj()
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise api.bad("admin body must be a map")
        action = body.get("action") or (req.op if req.op in ADMIN_ACTIONS else "list")
        name = body.get("model")
        if isinstance(name, str) and name.startswith("local/"):
            name = name[len("local/"):]
        if action != "list" and (not isinstance(name, str) or not catalog.valid_name(name)):
            raise HandlerError(400, "model must be a valid model name", "invalid_request_error",
                               "bad_model", "model")
        try:
            if action == "list":
                return Final.msgpack({"object": "list", "worker": self.worker.label,
                                      "data": self.list_models()})
            if action == "status":
                return Final.msgpack(self.status(name))
            if action == "start":
                return Final.msgpack(self.start(name).view())
            if action == "stop":
                return Final.msgpack(self.stop(name).view())
            if action == "settings":
                return Final.msgpack(self.settings(name, body.get("settings")))
            if action == "download":
                return Final.msgpack(self.download(name, body))
        except ValueError as exc:
            status = 404 if "not found" in str(exc) else 409 if (
                "not loaded" in str(exc) or "stopping" in str(exc) or "already" in str(exc)) \
                else 400
            raise HandlerError(status, str(exc), "invalid_request_error",
                               "model_not_found" if status == 404 else
                               "conflict" if status == 409 else "bad_request") from None
        raise HandlerError(400, f"unknown action {action!r}", "invalid_request_error",
                           "bad_action", "action")

    def list_models(self) -> List[Dict[str, Any]]:
        seen = set()
        out = []
        for item in catalog.discover(self.root):
            name = item["name"]
            seen.add(name)
            out.append(self._describe(name, item))
        for name in list(self.states):
            if name not in seen:
                out.append(self._describe(name, {"name": name}))
        return out

    def _describe(self, name: str, item: Dict[str, Any]) -> Dict[str, Any]:
        entry = dict(item)
        entry["id"] = name
        st = self.states.get(name)
        view = st.view() if st else ModelState(name).view()
        entry.update({k: view[k] for k in ("state", "progress", "phase", "error", "service")})
        if "download" in view:
            entry["download"] = view["download"]
        entry["loaded"] = name in self.models
        return entry

    def status(self, name: str) -> Dict[str, Any]:
        known = {item["name"]: item for item in catalog.discover(self.root)}
        if name not in known and name not in self.states:
            raise ValueError(f"model {name!r} not found under MODEL_PATH")
        out = self._describe(name, known.get(name, {"name": name}))
        model = self.models.get(name)
        st = self.states.get(name)
        out["settings"] = dict(model.settings) if model is not None else dict(
            st.settings if st else {})
        out["in_flight"] = self.worker.in_flight(f"model.{name}")
        out["registered"] = self.worker.registered(f"model.{name}")
        if self.usage is not None:
            out["usage_events"] = dict(self.usage.stats(), skipped=self.usage_skipped)
        out["worker"] = self.worker.label
        if isinstance(model, TextModel):
            out["slots"] = model.engine.slots
            out["active"] = len(model.engine.active)
            out["tokens_out"] = model.engine.tokens_out
            out["steps"] = model.engine.steps
            out["context"] = model.context
            out["chat_template"] = "model" if model.chat_template else "fallback"
        return out

    def settings(self, name: str, changes: Any) -> Dict[str, Any]:
        if changes is not None and not isinstance(changes, dict):
            raise ValueError("settings must be a map")
        clean: Dict[str, Any] = {}
        for key, value in (changes or {}).items():
            spec = SETTINGS_SPEC.get(key)
            if spec is None:
                raise ValueError(f"unknown setting {key!r}")
            kind, lo, hi = spec
            if value is None and key == "seed":
                clean[key] = None
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    kind is int and not isinstance(value, int)):
                raise ValueError(f"setting {key} must be a {kind.__name__}")
            if not lo <= value <= hi:
                raise ValueError(f"setting {key} must be between {lo} and {hi}")
            clean[key] = kind(value)
        st = self.state(name)
        st.settings.update(clean)
        model = self.models.get(name)
        if model is not None:
            model.settings.update(clean)
            if "capacity" in clean and isinstance(model, TextModel):
                model.engine.slots = clean["capacity"]
                self.worker.set_capacity(f"model.{name}", clean["capacity"])
        current = dict(DEFAULT_SETTINGS)
        current.update(model.settings if model is not None else st.settings)
        return {"id": name, "settings": current}

    def download(self, name: str, body: Dict[str, Any]) -> Dict[str, Any]:
        st = self.state(name)
        with self.lock:
            if st.state in ("downloading", "loading", "loaded", "stopping"):
                raise ValueError(f"model {name!r} is {st.state}; already there or busy")
        try:
            files = parse_files(body)
        except DownloadError as exc:
            raise ValueError(str(exc)) from None
        dl = Download(self.root, catalog.ALIASES.get(name, name), files)

        def done(ok: bool, error: Optional[str]) -> None:
            with self.lock:
                if ok:
                    st.state, st.phase, st.progress, st.error = "available", "downloaded", 1.0, None
                else:
                    st.state, st.phase, st.error = "error", "download failed", error

        def on_progress(fraction: float) -> None:
            with self.lock:
                st.progress = fraction

        with self.lock:
            st.state, st.phase, st.progress, st.error, st.download = (
                "downloading", "downloading", 0.0, None, dl)
        dl.start(on_progress, done)
        return st.view()


def _tenant_of(req: Request) -> Dict[str, Any]:
    """The envelope's tenant if it names a user or key (the request came
    through auth), else {}."""
    try:
        tenant = req.envelope().tenant
    except HandlerError:
        return {}
    if not isinstance(tenant, dict) or not (isinstance(tenant.get("user"), str)
                                            or isinstance(tenant.get("key"), str)):
        return {}
    return tenant


# --------------------------------------------------------------------------
# Program


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage(), "pid": os.getpid()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging() -> None:
    level = getattr(logging, os.environ.get("LOG_LEVEL", "info").upper(), logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("LOG_FORMAT", "text").lower() == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="aigw model worker (local models on the bus)")
    ap.add_argument("--bus", default=os.environ.get("AIGW_BUS", "tcp://127.0.0.1:5555"))
    ap.add_argument("--model-path", default=os.environ.get(
        "MODEL_PATH", os.path.join(REPO, "var", "models")))
    ap.add_argument("--models", default=os.environ.get("AIGW_MODELS", "tiny,hash-embed"),
                    help="models to serve at start, comma separated")
    ap.add_argument("--capacity", type=int, default=4, help="batch slots per model")
    ap.add_argument("--admin-service", default="model.admin",
                    help="management service name ('' to disable)")
    ap.add_argument("--label", default="")
    ap.add_argument("--heartbeat-ms", type=int, default=1000)
    ap.add_argument("--expiry-ms", type=int, default=3000)
    ap.add_argument("--reconnect-ms", type=int, default=1000)
    ap.add_argument("--billing-service", default=os.environ.get("AIGW_BILLING_SERVICE",
                                                                "billing"),
                    help="service that receives usage events ('' to disable; "
                         "AIGW_BILLING=0 disables too)")
    ap.add_argument("--billing-spool-max", type=int, default=int(os.environ.get(
        "AIGW_BILLING_SPOOL_MAX", SPOOL_MAX_DEFAULT)),
                    help="usage events owed before new requests get 503 "
                         "usage_spool_full")
    args = ap.parse_args(argv)
    setup_logging()
    if not 1 <= args.capacity <= 256:
        ap.error("--capacity must be 1..256")
    worker = Worker(args.bus, label=args.label, heartbeat_ms=args.heartbeat_ms,
                    expiry_ms=args.expiry_ms, reconnect_min_ms=args.reconnect_ms)
    usage = None
    if args.billing_service and os.environ.get("AIGW_BILLING", "1") not in ("0", "false", "off"):
        usage = UsageProducer(args.bus, args.billing_service, max_events=args.billing_spool_max,
                              heartbeat_ms=args.heartbeat_ms, expiry_ms=args.expiry_ms,
                              reconnect_min_ms=args.reconnect_ms)
    else:
        log.info("usage events off: requests served here are not billed")
    server = ModelServer(worker, args.model_path, args.capacity, args.admin_service or None,
                         usage)
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        try:
            server.start(name)
        except ValueError as exc:
            log.error("cannot serve %s: %s", name, exc)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop(grace=5.0))
    signal.signal(signal.SIGINT, lambda *_: worker.stop(grace=5.0))
    log.info("model worker on %s, models under %s", args.bus, args.model_path)
    worker.run()
    log.info("model worker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
