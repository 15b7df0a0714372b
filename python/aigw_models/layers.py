"""The numerical building blocks of decoder-only transformers, in numpy.

All functions take and return float32 arrays and follow the Hugging Face
reference implementations (``modeling_llama.py``, ``modeling_gpt2.py``), so
real checkpoints give real text:

* ``rms_norm`` — Llama: x / sqrt(mean(x²) + eps) · w.
* ``layer_norm`` — GPT-2: (x − mean) / sqrt(var + eps) · w + b.
* ``rope_tables`` / ``apply_rope`` — rotary embeddings in the "rotate half"
  layout Hugging Face checkpoints use (the two halves of each head form the
  complex pairs), inv_freq = theta^(−2i/d), with ``linear`` and ``llama3``
  rope scaling.
* ``attention`` — scaled dot-product attention with grouped-query heads
  (each of the Hkv key/value heads serves Hq/Hkv query heads) and a causal
  mask offset by the number of cached positions, so one code path serves the
  prompt (many queries) and each decode step (one query).
* ``silu``, ``gelu_tanh`` (GPT-2's ``gelu_new``), ``softmax``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax along axis."""
    z = x - np.max(x, axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= np.sum(z, axis=axis, keepdims=True)
    return z


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Root-mean-square norm over the last axis, scaled by weight."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps)) * weight


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """Layer norm over the last axis."""
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.mean(np.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def silu(x: np.ndarray) -> np.ndarray:
    """x · sigmoid(x)."""
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (GPT-2's ``gelu_new``)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[Dict[str, Any]] = None
                  ) -> np.ndarray:
    """Inverse frequencies per pair, with optional ``llama3`` scaling."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = float(scaling.get("factor", 8.0))
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(is_mid, mid, scaled)
    return inv


def rope_tables(positions: np.ndarray, head_dim: int, theta: float = 10000.0,
                scaling: Optional[Dict[str, Any]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [T, head_dim] for integer positions [T]."""
    inv = rope_inv_freq(head_dim, theta, scaling)
    pos = positions.astype(np.float64)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
        pos = pos / float(scaling.get("factor", 1.0))
    freqs = np.outer(pos, inv)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate x [..., T, D] by the tables [T, D] (rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, past: int) -> np.ndarray:
    """Causal attention for T new queries over S = past + T keys.

    q [Hq, T, D], k and v [Hkv, S, D] with Hq a multiple of Hkv (grouped
    query attention). Query i sits at position past + i and sees keys
    0 .. past + i. Returns [Hq, T, D].
    """
    hq, t, d = q.shape
    hkv, s, _ = k.shape
    group = hq // hkv
    qg = q.reshape(hkv, group * t, d)
    scores = np.matmul(qg, k.transpose(0, 2, 1)) * np.float32(1.0 / math.sqrt(d))
    scores = scores.reshape(hkv, group, t, s)
    if t > 1 or s != past + t:
        qpos = past + np.arange(t)[:, None]
        allowed = np.arange(s)[None, :] <= qpos
        scores = np.where(allowed, scores, np.float32(-np.inf))
    probs = softmax(scores.astype(np.float32), axis=-1).reshape(hkv, group * t, s)
    out = np.matmul(probs, v)
    return out.reshape(hq, t, d)
