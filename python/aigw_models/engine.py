"""Generation: sampling, stop sequences, streaming text, batched decoding.

An ``Engine`` owns one loaded model and a fixed number of *slots* (the
worker's capacity). ``add`` starts a sequence; every ``step`` runs **one**
``Transformer.forward`` over all active sequences — the whole prompt of the
ones just added (prefill) and one token of each of the others — then samples
the next token of each. Each sequence keeps its own KV cache, so sequences
of any lengths share a step without padding, and a sequence finishing or
being cancelled frees its slot at once (``release``).

Text is produced incrementally: after each token the new *bytes* of the
generated ids (``Tokenizer.decode_bytes``, prefix-stable) go through one
incremental UTF-8 decoder with ``errors="replace"``, so the text grows only
by characters that later bytes cannot change: the decoder holds back just an
incomplete trailing multibyte sequence, and it is flushed (as U+FFFD) when
the sequence ends. The text is therefore exactly
``decode_bytes(ids).decode("utf-8", "replace")`` however often, and
whenever, a consumer takes it: streamed and non-streamed text are the same.
Released is all of it except any tail that could still turn into a stop
sequence; a stop sequence found cuts the text before it and ends the
sequence with finish_reason ``stop``. EOS also gives ``stop``; ``max_tokens`` or the
model's context limit give ``length``.

Back-pressure: a sequence whose consumer has not taken its text for
``hold`` tokens (its stream window is exhausted, so the worker loop stops
resuming its handler) is left out of the batch until it does.

Sampling: temperature 0 is greedy (argmax); otherwise softmax(logits / T),
restricted to the smallest set of tokens whose probability reaches top_p,
drawn from a per-sequence ``numpy.random.Generator`` seeded by ``seed``
(same seed, same prompt, same tokens) or from OS entropy without one.
"""

from __future__ import annotations

import codecs
import itertools
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from .layers import softmax
from .tokenizers import Tokenizer
from .transformer import KVCache, ModelError, Transformer


@dataclass
class SamplingParams:
    """What a request asks of generation (already validated)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: List[str] = field(default_factory=list)
    seed: Optional[int] = None


def sample(logits: np.ndarray, temperature: float, top_p: float,
           rng: np.random.Generator) -> int:
    """One token id from logits [V]."""
    if temperature <= 0.0:
        return int(np.argmax(logits))
    probs = softmax(logits.astype(np.float64) / temperature)
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        cum = np.cumsum(sorted_p)
        keep = int(np.searchsorted(cum, top_p)) + 1  # smallest prefix reaching top_p
        keep = max(1, min(keep, len(order)))
        ids = order[:keep]
        p = sorted_p[:keep] / sorted_p[:keep].sum()
    else:
        ids = np.arange(len(probs))
        p = probs
    r = rng.random()
    idx = int(np.searchsorted(np.cumsum(p), r, side="right"))
    return int(ids[min(idx, len(ids) - 1)])


class Sequence_:
    """One generation in progress (named with a trailing underscore so it
    does not shadow typing.Sequence)."""

    _ids = itertools.count(1)

    def __init__(self, prompt: List[int], params: SamplingParams, cache: KVCache,
                 stop_ids: Sequence[int]) -> None:
        self.id = next(self._ids)
        self.prompt = list(prompt)
        self.params = params
        self.cache = cache
        self.stop_ids = set(stop_ids)
        self.rng = np.random.default_rng(params.seed)
        self.generated: List[int] = []
        self.text = ""  # decoded text of generated (after any stop cut)
        self.emitted = 0  # characters of text already released
        self._bytes = b""  # bytes of generated fed to the decoder
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.finish_reason: Optional[str] = None
        self.prefilled = False
        self.released = False
        self.first_token_at: Optional[float] = None
        self.started_at = time.monotonic()
        self.untaken = 0  # tokens generated since the consumer last called take()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)

    def take(self) -> str:
        """The text released since the last take (may be empty)."""
        self.untaken = 0
        return self._pop(self._safe_end())

    def feed(self, data: bytes, final: bool = False) -> None:
        """Decode the bytes of every generated token so far (``data``)
        into ``text``: only the bytes not fed before are decoded; final
        flushes an incomplete trailing sequence as U+FFFD."""
        if data.startswith(self._bytes):
            self.text += self._decoder.decode(data[len(self._bytes):], final)
        else:  # not prefix-stable (no supported tokenizer does this): start over
            self._decoder.reset()
            self.text = self._decoder.decode(data, final)
        self._bytes = data

    def _pop(self, end: int) -> str:
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out

    def _safe_end(self) -> int:
        if self.done:
            return len(self.text)
        end = len(self.text)
        hold = 0
        for s in self.params.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if self.text[:end].endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return max(self.emitted, end - hold)


class Engine:
    """Batched generation over one model; single-threaded (the worker loop)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, slots: int = 4,
                 stop_ids: Optional[Sequence[int]] = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.slots = slots
        ids = list(stop_ids) if stop_ids is not None else []
        ids += tokenizer.stop_ids + list(model.config.eos_token_ids)
        self.stop_ids = sorted(set(i for i in ids if i is not None))
        self.active: Dict[int, Sequence_] = {}
        self.steps = 0
        self.tokens_out = 0
        self.batch_sizes: List[int] = []  # recent step batch sizes (tests, metrics)
        #  A sequence whose consumer has not taken its text for this many
        #  tokens is paused (stream credit exhausted: the producer waits).
        self.hold = 16

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.active)

    def add(self, prompt: List[int], params: SamplingParams) -> Sequence_:
        """Start a sequence; ModelError if no slot is free, the prompt is
        empty, or it does not fit the context."""
        if len(self.active) >= self.slots:
            raise ModelError("no free slot")
        if not prompt:
            raise ModelError("empty prompt")
        limit = self.model.max_positions
        if len(prompt) >= limit:
            raise ModelError(f"prompt of {len(prompt)} tokens does not fit the context of "
                             f"{limit}")
        cache = self.model.new_cache(min(limit, max(64, len(prompt) + params.max_tokens)))
        seq = Sequence_(prompt, params, cache, self.stop_ids)
        if params.max_tokens <= 0:
            seq.finish_reason = "length"
        else:
            self.active[seq.id] = seq
        return seq

    def release(self, seq: Sequence_) -> None:
        """Free the sequence's slot and cache (idempotent; cancel uses it)."""
        self.active.pop(seq.id, None)
        seq.released = True
        if seq.finish_reason is None:
            seq.finish_reason = "cancelled"
        seq.cache = None  # type: ignore[assignment]

    def has_work(self) -> bool:
        return any(not s.done and s.untaken < self.hold for s in self.active.values())

    def step(self) -> bool:
        """One batched forward over every active, unfinished sequence."""
        run = [s for s in self.active.values() if not s.done and s.untaken < self.hold]
        if not run:
            return False
        tokens = [s.prompt if not s.prefilled else [s.generated[-1]] for s in run]
        logits, _ = self.model.forward(tokens, [s.cache for s in run])
        self.steps += 1
        self.batch_sizes.append(len(run))
        if len(self.batch_sizes) > 1000:
            del self.batch_sizes[:500]
        now = time.monotonic()
        for s, row in zip(run, logits):
            s.prefilled = True
            tok = sample(row, s.params.temperature, s.params.top_p, s.rng)
            if s.first_token_at is None:
                s.first_token_at = now
            self._push(s, tok)
        return True

    def _push(self, s: Sequence_, tok: int) -> None:
        s.generated.append(tok)
        s.untaken += 1
        self.tokens_out += 1
        if tok in s.stop_ids:
            s.feed(self.tokenizer.decode_bytes(s.generated[:-1]), final=True)
            s.finish_reason = "stop"
            return
        length = (len(s.generated) >= s.params.max_tokens
                  or s.cache.length + 1 >= self.model.max_positions)
        s.feed(self.tokenizer.decode_bytes(s.generated), final=length)
        for stop in s.params.stop:
            idx = s.text.find(stop, max(0, s.emitted - len(stop)))
            if idx >= 0:
                s.text = s.text[:idx]
                s.finish_reason = "stop"
                return
        if length:
            s.finish_reason = "length"

    def generate(self, prompt: List[int], params: SamplingParams) -> Sequence_:
        """Run one sequence to the end (tests and tools; not for the worker)."""
        seq = self.add(prompt, params)
        try:
            while not seq.done:
                seq.untaken = 0
                self.step()
        finally:
            self.active.pop(seq.id, None)
        return seq
