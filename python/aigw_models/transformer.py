"""Decoder-only transformers (Llama and GPT-2 families) with KV caches.

``ModelConfig.from_hf`` reads a Hugging Face ``config.json``; ``Transformer``
takes the weights under their Hugging Face names:

Llama family (``model_type`` llama, mistral, qwen2, …; ``LlamaForCausalLM``)::

    model.embed_tokens.weight                      [V, d]
    model.layers.N.input_layernorm.weight          [d]
    model.layers.N.self_attn.{q,k,v,o}_proj.weight [out, in] (+ .bias if any)
    model.layers.N.post_attention_layernorm.weight [d]
    model.layers.N.mlp.{gate,up,down}_proj.weight  [out, in]
    model.norm.weight                              [d]
    lm_head.weight                                 [V, d] (absent when tied)

GPT-2 family (``GPT2LMHeadModel``; an optional ``transformer.`` prefix)::

    wte.weight [V, d], wpe.weight [P, d]
    h.N.ln_1.{weight,bias}, h.N.ln_2.{weight,bias}, ln_f.{weight,bias}
    h.N.attn.c_attn.{weight [d, 3d], bias}   (Conv1D: [in, out])
    h.N.attn.c_proj, h.N.mlp.c_fc, h.N.mlp.c_proj (Conv1D: [in, out])
    lm_head tied to wte

``forward`` runs *one* pass over any number of sequences at once, each with
its own ``KVCache`` and any number of new tokens (a whole prompt, or one
token per decode step): the tokens of all sequences are packed into one
matrix for every projection and MLP (where the weights are read once for the
whole batch — the point of batching on a CPU), and attention runs per
sequence over its own cache. No padding and no mask between sequences.

Everything is float32; weights are converted once at load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import layers

LLAMA_TYPES = ("llama", "mistral", "qwen2", "tinyllama")
GPT2_TYPES = ("gpt2",)


class ModelError(ValueError):
    """A config or weights this code cannot run."""


@dataclass
class ModelConfig:
    """The architecture numbers, normalised over both families."""

    arch: str  # "llama" or "gpt2"
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    max_positions: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    tie_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: List[int] = field(default_factory=list)
    model_type: str = ""

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """From config.json contents; ModelError for unsupported models."""
        mtype = str(cfg.get("model_type", "")).lower()
        archs = [str(a) for a in cfg.get("architectures") or []]
        eos = cfg.get("eos_token_id")
        eos_ids = [int(e) for e in eos] if isinstance(eos, list) else (
            [int(eos)] if isinstance(eos, int) else [])
        bos = cfg.get("bos_token_id")
        try:
            if mtype in GPT2_TYPES or any(a.startswith("GPT2") for a in archs):
                d = int(cfg["n_embd"])
                heads = int(cfg["n_head"])
                act = cfg.get("activation_function", "gelu_new")
                if act not in ("gelu_new", "gelu", "gelu_pytorch_tanh", "gelu_fast"):
                    raise ModelError(f"activation {act} unsupported")
                return cls(arch="gpt2", vocab_size=int(cfg["vocab_size"]), hidden=d,
                           layers=int(cfg["n_layer"]), heads=heads, kv_heads=heads,
                           head_dim=d // heads,
                           intermediate=int(cfg.get("n_inner") or 4 * d),
                           eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
                           max_positions=int(cfg.get("n_positions", cfg.get("n_ctx", 1024))),
                           tie_embeddings=True,
                           bos_token_id=int(bos) if isinstance(bos, int) else None,
                           eos_token_ids=eos_ids, model_type=mtype or "gpt2")
            if mtype in LLAMA_TYPES or any(a.startswith(("Llama", "Mistral", "Qwen2"))
                                           for a in archs):
                d = int(cfg["hidden_size"])
                heads = int(cfg["num_attention_heads"])
                act = cfg.get("hidden_act", "silu")
                if act != "silu":
                    raise ModelError(f"activation {act} unsupported")
                return cls(arch="llama", vocab_size=int(cfg["vocab_size"]), hidden=d,
                           layers=int(cfg["num_hidden_layers"]), heads=heads,
                           kv_heads=int(cfg.get("num_key_value_heads") or heads),
                           head_dim=int(cfg.get("head_dim") or d // heads),
                           intermediate=int(cfg["intermediate_size"]),
                           eps=float(cfg.get("rms_norm_eps", 1e-6)),
                           max_positions=int(cfg.get("max_position_embeddings", 2048)),
                           rope_theta=float(cfg.get("rope_theta", 10000.0)),
                           rope_scaling=cfg.get("rope_scaling") or None,
                           tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                           bos_token_id=int(bos) if isinstance(bos, int) else None,
                           eos_token_ids=eos_ids, model_type=mtype or "llama")
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ModelError):
                raise
            raise ModelError(f"config.json: missing or bad field {exc}") from None
        raise ModelError(f"model_type {mtype!r} ({', '.join(archs) or 'no architectures'}) "
                         f"is not supported (Llama or GPT-2 families)")

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as fh:
                return cls.from_hf(json.load(fh))
        except (OSError, ValueError) as exc:
            if isinstance(exc, ModelError):
                raise
            raise ModelError(f"{path}: {exc}") from None


class KVCache:
    """Keys and values of one sequence, per layer [Hkv, capacity, D],
    growing by doubling. ``length`` positions are valid."""

    def __init__(self, layers_n: int, kv_heads: int, head_dim: int, capacity: int = 64,
                 limit: int = 1 << 20) -> None:
        self.limit = limit
        self.capacity = max(1, min(capacity, limit))
        self.k = [np.zeros((kv_heads, self.capacity, head_dim), np.float32)
                  for _ in range(layers_n)]
        self.v = [np.zeros((kv_heads, self.capacity, head_dim), np.float32)
                  for _ in range(layers_n)]
        self.length = 0

    def _grow(self, need: int) -> None:
        cap = self.capacity
        while cap < need:
            cap *= 2
        cap = min(cap, self.limit)
        if cap < need:
            raise ModelError(f"context of {need} positions exceeds {self.limit}")
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                new = np.zeros((old.shape[0], cap, old.shape[2]), np.float32)
                new[:, :self.length] = old[:, :self.length]
                store[i] = new
        self.capacity = cap

    def put(self, layer: int, k: np.ndarray, v: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Store k, v [Hkv, T, D] after the valid positions (not yet counted in
        length) and return views of every key and value including them."""
        t = k.shape[1]
        end = self.length + t
        if end > self.capacity:
            self._grow(end)
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, t: int) -> None:
        """Count t more positions as valid (after every layer stored them)."""
        self.length += t

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


def _strip(weights: Mapping[str, np.ndarray], prefix: str) -> Dict[str, Any]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): k for k in weights}


class Transformer:
    """A loaded model: config + float32 weights, ready for ``forward``."""

    def __init__(self, config: ModelConfig, weights: Mapping[str, np.ndarray],
                 progress: Optional[Any] = None) -> None:
        self.config = config
        self._progress = progress
        if config.arch == "llama":
            self._load_llama(weights)
        elif config.arch == "gpt2":
            self._load_gpt2(weights)
        else:
            raise ModelError(f"unknown arch {config.arch}")

    # -- loading ------------------------------------------------------------------

    def _tick(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(done, total)

    def _get(self, weights: Mapping[str, np.ndarray], names: Dict[str, str], name: str,
             shape: Optional[Tuple[int, ...]] = None, optional: bool = False
             ) -> Optional[np.ndarray]:
        key = names.get(name)
        if key is None:
            if optional:
                return None
            raise ModelError(f"weight {name!r} missing")
        arr = np.asarray(weights[key], dtype=np.float32)
        if shape is not None and tuple(arr.shape) != shape:
            raise ModelError(f"weight {name!r} has shape {tuple(arr.shape)}, "
                             f"expected {shape}")
        return np.ascontiguousarray(arr)

    def _load_llama(self, weights: Mapping[str, np.ndarray]) -> None:
        c = self.config
        names = _strip(weights, "model.")
        d, hd = c.hidden, c.head_dim
        qd, kvd = c.heads * hd, c.kv_heads * hd
        self.embed = self._get(weights, names, "embed_tokens.weight", (c.vocab_size, d))
        self.blocks: List[Dict[str, Any]] = []
        for i in range(c.layers):
            p = f"layers.{i}."
            q = self._get(weights, names, p + "self_attn.q_proj.weight", (qd, d))
            k = self._get(weights, names, p + "self_attn.k_proj.weight", (kvd, d))
            v = self._get(weights, names, p + "self_attn.v_proj.weight", (kvd, d))
            biases = [self._get(weights, names, p + f"self_attn.{n}_proj.bias", optional=True)
                      for n in ("q", "k", "v")]
            qkv_b = (np.concatenate([b if b is not None else np.zeros(n, np.float32)
                                     for b, n in zip(biases, (qd, kvd, kvd))])
                     if any(b is not None for b in biases) else None)
            gate = self._get(weights, names, p + "mlp.gate_proj.weight", (c.intermediate, d))
            up = self._get(weights, names, p + "mlp.up_proj.weight", (c.intermediate, d))
            self.blocks.append({
                "ln1": self._get(weights, names, p + "input_layernorm.weight", (d,)),
                "qkv": np.ascontiguousarray(np.concatenate([q, k, v], axis=0).T),
                "qkv_b": qkv_b,
                "o": np.ascontiguousarray(
                    self._get(weights, names, p + "self_attn.o_proj.weight", (d, qd)).T),
                "o_b": self._get(weights, names, p + "self_attn.o_proj.bias", optional=True),
                "ln2": self._get(weights, names, p + "post_attention_layernorm.weight", (d,)),
                "gate_up": np.ascontiguousarray(np.concatenate([gate, up], axis=0).T),
                "down": np.ascontiguousarray(
                    self._get(weights, names, p + "mlp.down_proj.weight",
                              (d, c.intermediate)).T),
            })
            self._tick(i + 1, c.layers)
        self.norm = self._get(weights, names, "norm.weight", (d,))
        head = None if c.tie_embeddings else self._get(weights, names, "lm_head.weight",
                                                       (c.vocab_size, d), optional=True)
        self.lm_head_t = np.ascontiguousarray((head if head is not None else self.embed).T)

    def _load_gpt2(self, weights: Mapping[str, np.ndarray]) -> None:
        c = self.config
        names = _strip(weights, "transformer.")
        d = c.hidden
        self.embed = self._get(weights, names, "wte.weight", (c.vocab_size, d))
        self.wpe = self._get(weights, names, "wpe.weight")
        assert self.wpe is not None
        if self.wpe.shape[1] != d or self.wpe.shape[0] < 1:
            raise ModelError(f"wpe has shape {self.wpe.shape}")
        self.blocks = []
        for i in range(c.layers):
            p = f"h.{i}."
            self.blocks.append({
                "ln1_w": self._get(weights, names, p + "ln_1.weight", (d,)),
                "ln1_b": self._get(weights, names, p + "ln_1.bias", (d,)),
                "qkv": self._get(weights, names, p + "attn.c_attn.weight", (d, 3 * d)),
                "qkv_b": self._get(weights, names, p + "attn.c_attn.bias", (3 * d,)),
                "o": self._get(weights, names, p + "attn.c_proj.weight", (d, d)),
                "o_b": self._get(weights, names, p + "attn.c_proj.bias", (d,)),
                "ln2_w": self._get(weights, names, p + "ln_2.weight", (d,)),
                "ln2_b": self._get(weights, names, p + "ln_2.bias", (d,)),
                "fc": self._get(weights, names, p + "mlp.c_fc.weight", (d, c.intermediate)),
                "fc_b": self._get(weights, names, p + "mlp.c_fc.bias", (c.intermediate,)),
                "proj": self._get(weights, names, p + "mlp.c_proj.weight", (c.intermediate, d)),
                "proj_b": self._get(weights, names, p + "mlp.c_proj.bias", (d,)),
            })
            self._tick(i + 1, c.layers)
        self.lnf_w = self._get(weights, names, "ln_f.weight", (d,))
        self.lnf_b = self._get(weights, names, "ln_f.bias", (d,))
        head = self._get(weights, names, "lm_head.weight", (c.vocab_size, d), optional=True)
        self.lm_head_t = np.ascontiguousarray((head if head is not None else self.embed).T)

    # -- running ------------------------------------------------------------------

    @property
    def max_positions(self) -> int:
        return int(self.wpe.shape[0]) if self.config.arch == "gpt2" else \
            self.config.max_positions

    def new_cache(self, capacity: int = 64) -> KVCache:
        c = self.config
        return KVCache(c.layers, c.kv_heads, c.head_dim, capacity, limit=self.max_positions)

    def forward(self, tokens: Sequence[Sequence[int]], caches: Sequence[KVCache],
                all_logits: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """One pass over several sequences.

        tokens[i] are the new tokens of sequence i (its cache holds what came
        before; they are appended to it). Returns (logits, hidden): logits
        [B, V] of each sequence's last new token (or [sum T, V] when
        all_logits), and hidden [sum T, d], the final-norm hidden states of
        every new token (packed in order).
        """
        c = self.config
        lens = [len(t) for t in tokens]
        if any(n == 0 for n in lens):
            raise ModelError("every sequence needs at least one new token")
        for cache, n in zip(caches, lens):
            if cache.length + n > self.max_positions:
                raise ModelError(f"context of {cache.length + n} exceeds "
                                 f"{self.max_positions} positions")
        ids = np.concatenate([np.asarray(t, dtype=np.int64) for t in tokens])
        if ids.min() < 0 or ids.max() >= c.vocab_size:
            raise ModelError("token id out of range")
        positions = [np.arange(cache.length, cache.length + n) for cache, n in zip(caches, lens)]
        x = self.embed[ids]
        if c.arch == "gpt2":
            x = x + self.wpe[np.concatenate(positions)]
            x = self._gpt2_blocks(x, lens, positions, caches)
            h = layers.layer_norm(x, self.lnf_w, self.lnf_b, c.eps)
        else:
            x = self._llama_blocks(x, lens, positions, caches)
            h = layers.rms_norm(x, self.norm, c.eps)
        for cache, n in zip(caches, lens):
            cache.advance(n)
        if all_logits:
            return h @ self.lm_head_t, h
        last = np.cumsum(lens) - 1
        return h[last] @ self.lm_head_t, h

    def _attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, lens: List[int],
                positions: List[np.ndarray], caches: Sequence[KVCache], layer: int,
                rope: bool) -> np.ndarray:
        """Per-sequence attention over packed q/k/v [N, H*D]; returns [N, Hq*D]."""
        c = self.config
        hd = c.head_dim
        out = np.empty((q.shape[0], c.heads * hd), np.float32)
        start = 0
        for n, pos, cache in zip(lens, positions, caches):
            qs = q[start:start + n].reshape(n, c.heads, hd).transpose(1, 0, 2)
            ks = k[start:start + n].reshape(n, c.kv_heads, hd).transpose(1, 0, 2)
            vs = v[start:start + n].reshape(n, c.kv_heads, hd).transpose(1, 0, 2)
            if rope:
                cos, sin = self._rope(pos)
                qs = layers.apply_rope(qs, cos, sin)
                ks = layers.apply_rope(ks, cos, sin)
            kall, vall = cache.put(layer, ks, vs)
            o = layers.attention(qs.astype(np.float32), kall, vall, cache.length)
            out[start:start + n] = o.transpose(1, 0, 2).reshape(n, c.heads * hd)
            start += n
        return out

    _rope_cache: Optional[Tuple[np.ndarray, np.ndarray]] = None

    def _rope(self, pos: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        c = self.config
        need = int(pos.max()) + 1
        if self._rope_cache is None or self._rope_cache[0].shape[0] < need:
            size = max(need, min(c.max_positions, 256))
            self._rope_cache = layers.rope_tables(np.arange(size), c.head_dim, c.rope_theta,
                                                  c.rope_scaling)
        cos, sin = self._rope_cache
        return cos[pos], sin[pos]

    def _llama_blocks(self, x: np.ndarray, lens: List[int], positions: List[np.ndarray],
                      caches: Sequence[KVCache]) -> np.ndarray:
        c = self.config
        qd, kvd = c.heads * c.head_dim, c.kv_heads * c.head_dim
        for i, b in enumerate(self.blocks):
            h = layers.rms_norm(x, b["ln1"], c.eps)
            qkv = h @ b["qkv"]
            if b["qkv_b"] is not None:
                qkv += b["qkv_b"]
            a = self._attend(qkv[:, :qd], qkv[:, qd:qd + kvd], qkv[:, qd + kvd:], lens,
                             positions, caches, i, rope=True)
            o = a @ b["o"]
            if b["o_b"] is not None:
                o += b["o_b"]
            x = x + o
            h = layers.rms_norm(x, b["ln2"], c.eps)
            gu = h @ b["gate_up"]
            x = x + (layers.silu(gu[:, :c.intermediate]) * gu[:, c.intermediate:]) @ b["down"]
        return x

    def _gpt2_blocks(self, x: np.ndarray, lens: List[int], positions: List[np.ndarray],
                     caches: Sequence[KVCache]) -> np.ndarray:
        c = self.config
        d = c.hidden
        for i, b in enumerate(self.blocks):
            h = layers.layer_norm(x, b["ln1_w"], b["ln1_b"], c.eps)
            qkv = h @ b["qkv"] + b["qkv_b"]
            a = self._attend(qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:], lens, positions,
                             caches, i, rope=False)
            x = x + (a @ b["o"] + b["o_b"])
            h = layers.layer_norm(x, b["ln2_w"], b["ln2_b"], c.eps)
            x = x + (layers.gelu_tanh(h @ b["fc"] + b["fc_b"]) @ b["proj"] + b["proj_b"])
        return x

    def embed_texts(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Mean-pooled, L2-normalised last hidden states, one row per input."""
        caches = [self.new_cache(len(t)) for t in token_lists]
        _, h = self.forward(token_lists, caches)
        out = np.empty((len(token_lists), self.config.hidden), np.float32)
        start = 0
        for i, t in enumerate(token_lists):
            v = h[start:start + len(t)].mean(axis=0)
            out[i] = v / max(float(np.linalg.norm(v)), 1e-12)
            start += len(t)
        return out


def read_config(model_dir: str) -> ModelConfig:
    """ModelConfig from model_dir/config.json."""
    return ModelConfig.from_file(os.path.join(model_dir, "config.json"))
