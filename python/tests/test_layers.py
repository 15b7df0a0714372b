"""Each layer against its direct formula, and the KV cache against none."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aigw_models import layers
from aigw_models.transformer import KVCache, ModelConfig, Transformer

RNG = np.random.default_rng(7)


def test_softmax_matches_formula_and_is_stable() -> None:
    x = RNG.standard_normal((3, 11)).astype(np.float32)
    want = np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(layers.softmax(x.copy()), want, rtol=1e-6)
    big = np.array([1000.0, 1001.0, 1002.0], np.float32)
    out = layers.softmax(big)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, layers.softmax(big - 1000.0), rtol=1e-6)


def test_rms_norm_matches_formula() -> None:
    x = RNG.standard_normal((4, 16)).astype(np.float32)
    w = RNG.standard_normal(16).astype(np.float32)
    eps = 1e-5
    want = np.empty_like(x)
    for i, row in enumerate(x):
        want[i] = row / math.sqrt(sum(float(v) ** 2 for v in row) / len(row) + eps) * w
    np.testing.assert_allclose(layers.rms_norm(x, w, eps), want, rtol=1e-5, atol=1e-6)


def test_layer_norm_matches_formula() -> None:
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    w, b = RNG.standard_normal(8).astype(np.float32), RNG.standard_normal(8).astype(np.float32)
    mu = x.mean(-1, keepdims=True)
    sd = np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(layers.layer_norm(x, w, b, 1e-5), (x - mu) / sd * w + b,
                               rtol=1e-5, atol=1e-6)


def test_rope_is_a_rotation_of_half_pairs() -> None:
    d, theta = 8, 500.0
    x = RNG.standard_normal((2, 5, d)).astype(np.float32)  # [H, T, D]
    pos = np.array([0, 1, 2, 7, 100])
    cos, sin = layers.rope_tables(pos, d, theta)
    got = layers.apply_rope(x, cos, sin)
    half = d // 2
    for h in range(2):
        for t, p in enumerate(pos):
            for i in range(half):
                angle = p * theta ** (-2 * i / d)
                z = complex(x[h, t, i], x[h, t, i + half]) * complex(math.cos(angle),
                                                                     math.sin(angle))
                assert got[h, t, i] == pytest.approx(z.real, abs=1e-4)
                assert got[h, t, i + half] == pytest.approx(z.imag, abs=1e-4)
    np.testing.assert_allclose(got[:, 0], x[:, 0], rtol=1e-6)  # position 0: identity
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)


def test_rope_relative_property() -> None:
    """q·k after RoPE depends only on the distance between positions."""
    d = 16
    q = RNG.standard_normal(d).astype(np.float32)
    k = RNG.standard_normal(d).astype(np.float32)

    def dot(pq: int, pk: int) -> float:
        cq, sq = layers.rope_tables(np.array([pq]), d)
        ck, sk = layers.rope_tables(np.array([pk]), d)
        return float(layers.apply_rope(q[None], cq, sq)[0] @ layers.apply_rope(k[None], ck, sk)[0])

    assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-4)


def _naive_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    hq, t, d = q.shape
    hkv = k.shape[0]
    out = np.zeros_like(q)
    for h in range(hq):
        kh = h // (hq // hkv)
        for i in range(t):
            s = np.array([q[h, i] @ k[kh, j] / math.sqrt(d) for j in range(i + 1)])
            p = np.exp(s - s.max())
            p /= p.sum()
            out[h, i] = p @ v[kh, :i + 1]
    return out


def test_attention_gqa_causal_matches_naive() -> None:
    q = RNG.standard_normal((4, 6, 8)).astype(np.float32)
    k = RNG.standard_normal((2, 6, 8)).astype(np.float32)
    v = RNG.standard_normal((2, 6, 8)).astype(np.float32)
    np.testing.assert_allclose(layers.attention(q, k, v, 0), _naive_attention(q, k, v),
                               rtol=1e-4, atol=1e-5)


def test_attention_with_cache_equals_without() -> None:
    q = RNG.standard_normal((4, 6, 8)).astype(np.float32)
    k = RNG.standard_normal((2, 6, 8)).astype(np.float32)
    v = RNG.standard_normal((2, 6, 8)).astype(np.float32)
    full = layers.attention(q, k, v, 0)
    # the last two queries, with the first four positions "cached"
    part = layers.attention(q[:, 4:], k, v, 4)
    np.testing.assert_allclose(part, full[:, 4:], rtol=1e-5, atol=1e-6)
    # one query at a time, as in decoding
    for t in range(6):
        step = layers.attention(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], t)
        np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-5, atol=1e-6)


def _random_llama() -> Transformer:
    cfg = ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0})
    from aigw_models.make_tiny import llama_weights
    w = llama_weights({"hidden_size": 32, "vocab_size": 50, "intermediate_size": 48,
                       "num_attention_heads": 4, "num_key_value_heads": 2,
                       "num_hidden_layers": 2}, np.random.default_rng(1))
    return Transformer(cfg, w)


def _random_gpt2() -> Transformer:
    from aigw_models.make_tiny import gpt2_weights
    c = {"n_embd": 32, "vocab_size": 50, "n_positions": 64, "n_layer": 2, "n_head": 4}
    cfg = ModelConfig.from_hf(dict(c, model_type="gpt2"))
    return Transformer(cfg, gpt2_weights(c, np.random.default_rng(2)))


@pytest.mark.parametrize("make", [_random_llama, _random_gpt2])
def test_model_kv_cache_equals_full_forward(make) -> None:
    model = make()
    tokens = [3, 17, 9, 22, 41, 5, 8]
    full, _ = model.forward([tokens], [model.new_cache()], all_logits=True)
    cache = model.new_cache(2)  # small, so it has to grow
    got = [model.forward([tokens[:3]], [cache], all_logits=True)[0]]
    for t in tokens[3:]:
        got.append(model.forward([[t]], [cache])[0])
    np.testing.assert_allclose(np.concatenate(got), full, rtol=1e-4, atol=1e-4)
    assert cache.length == len(tokens)


def test_batched_forward_equals_separate() -> None:
    model = _random_llama()
    a, b = [1, 2, 3, 4, 5], [9, 8]
    alone_a, _ = model.forward([a], [model.new_cache()])
    alone_b, _ = model.forward([b], [model.new_cache()])
    both, _ = model.forward([a, b], [model.new_cache(), model.new_cache()])
    np.testing.assert_allclose(both[0], alone_a[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(both[1], alone_b[0], rtol=1e-4, atol=1e-5)


def test_kv_cache_grows_and_keeps_content() -> None:
    cache = KVCache(1, 2, 4, capacity=2, limit=16)
    k = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    kall, _ = cache.put(0, k, k)
    cache.advance(3)
    assert cache.capacity >= 3
    np.testing.assert_array_equal(kall, k)
    with pytest.raises(ValueError):
        cache.put(0, np.zeros((2, 20, 4), np.float32), np.zeros((2, 20, 4), np.float32))


def test_hf_weight_name_conventions() -> None:
    """GPT-2 saved with the ``transformer.`` prefix and an explicit lm_head,
    and Llama with tied embeddings (no lm_head), load and agree with the
    plain layouts."""
    from aigw_models.make_tiny import gpt2_weights, llama_weights
    c = {"n_embd": 32, "vocab_size": 50, "n_positions": 64, "n_layer": 2, "n_head": 4}
    plain = gpt2_weights(c, np.random.default_rng(2))
    prefixed = {f"transformer.{k}": v for k, v in plain.items()}
    prefixed["lm_head.weight"] = plain["wte.weight"]
    prefixed["transformer.h.0.attn.bias"] = np.zeros((1, 1, 4, 4), np.float32)  # HF buffer
    cfg = ModelConfig.from_hf(dict(c, architectures=["GPT2LMHeadModel"]))
    a = Transformer(cfg, plain).forward([[1, 2, 3]], [Transformer(cfg, plain).new_cache()])[0]
    m = Transformer(cfg, prefixed)
    np.testing.assert_allclose(m.forward([[1, 2, 3]], [m.new_cache()])[0], a, rtol=1e-6)

    lc = {"hidden_size": 32, "vocab_size": 50, "intermediate_size": 48,
          "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 1}
    w = llama_weights(lc, np.random.default_rng(3))
    del w["lm_head.weight"]
    tied = Transformer(ModelConfig.from_hf(dict(lc, model_type="llama",
                                                tie_word_embeddings=True)), w)
    np.testing.assert_array_equal(tied.lm_head_t, w["model.embed_tokens.weight"].T)
    with pytest.raises(ValueError, match="lm_head|missing"):
        del w["model.norm.weight"]
        Transformer(ModelConfig.from_hf(dict(lc, model_type="llama")), w)
    with pytest.raises(ValueError, match="not supported"):
        ModelConfig.from_hf({"model_type": "bert"})
