#!/usr/bin/python3
"""Write the tiny demo/test models: ``tiny-llama`` and ``tiny-gpt2``.

    /usr/bin/python3 python/aigw_models/make_tiny.py [--out var/models] [--force]

Both are real Hugging Face folders (``config.json``, ``model.safetensors``,
tokenizer files, ``tokenizer_config.json``) with random weights drawn from a
fixed seed, so their text is noise but every part of the machinery (loader,
tokenizer, chat template, KV cache, sampling, batching) runs for real:

* ``tiny-llama`` — LlamaForCausalLM, 2 layers, hidden 64, 4 query heads
  sharing 2 key/value heads (GQA), untied ``lm_head``, weights stored as
  BF16 (like TinyLlama's checkpoints), a SentencePiece BPE
  ``tokenizer.model`` (byte fallback, ``<unk>``=0 ``<s>``=1 ``</s>``=2)
  trained here on the text embedded below, and TinyLlama-Chat's chat
  template.
* ``tiny-gpt2`` — GPT2LMHeadModel, 2 layers, hidden 64, 4 heads, Conv1D
  weights, F32, a byte-level BPE ``vocab.json`` + ``merges.txt`` (256 byte
  symbols, merges learned here on the same text, ``<|endoftext|>`` last), no
  chat template (the documented fallback applies).

Everything is deterministic: same script, same bytes (checked by
``python/tests``). A stamp file skips the work when the outputs are already
there (``--force`` rebuilds). About 0.5 MB in all.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import os
import shutil
import sys
from typing import Dict, List, Tuple

import numpy as np

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aigw_models import safetensors  # noqa: E402
from aigw_models.tokenizers import GPT2_PATTERN, bytes_to_unicode  # noqa: E402

VERSION = "1"
SEED = 20240501

#  Training text for both tokenizers (written for this project).
CORPUS = """\
The gateway takes a request from a client and sends it along a chain of stages.
Each stage reads the envelope, does its part, and forwards the request to the next one.
A broker in the middle knows which workers are ready and how much credit each has left.
When a worker is busy, the request waits in a queue; when it is free, the broker sends it on.
Local models run inside a Python worker that speaks the same protocol as every other stage.
The model reads the prompt, one token at a time, and writes its answer as a stream of chunks.
Hello! How are you today? I am fine, thank you. What can I do for you?
Please tell me a short story about a small robot who learns to paint the sea.
Once upon a time there was a little robot. It lived in a house near the sea.
Every morning the robot looked at the water and tried to paint the colours of the waves.
The first pictures were grey and flat, but the robot kept trying, day after day.
One evening the sun went down and the sea turned gold, and the robot painted it at last.
Numbers matter too: 1, 2, 3, 10, 42, 100, 2024 and 3.14 appear in many texts.
Questions and answers, lists and tables, code like def main(): return 0 and x = y + 1;
user: what is the capital of France? assistant: The capital of France is Paris.
system: You are a helpful assistant. Answer briefly and clearly.
Tokens, embeddings, attention, layers, weights, caches and samplers make a model work.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
"""

TINYLLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}")


# --------------------------------------------------------------------------
# Byte-level BPE training (GPT-2 style)


def train_bpe(text: str, merges_n: int) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """Learn merges_n merges over GPT-2 pre-tokens of text.

    The most frequent adjacent pair wins; ties go to the lexicographically
    smallest pair, so the result is deterministic.
    """
    enc = bytes_to_unicode()
    words = collections.Counter(
        "".join(enc[b] for b in piece.encode("utf-8")) for piece in GPT2_PATTERN.findall(text))
    splits = {w: list(w) for w in words}
    vocab: Dict[str, int] = {}
    for ch in enc.values():
        vocab[ch] = len(vocab)
    merges: List[Tuple[str, str]] = []
    for _ in range(merges_n):
        pairs: Dict[Tuple[str, str], int] = collections.Counter()
        for w, n in words.items():
            parts = splits[w]
            for i in range(len(parts) - 1):
                pairs[(parts[i], parts[i + 1])] += n
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        for w, parts in splits.items():
            i, out = 0, []
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == best[0] and parts[i + 1] == best[1]:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def train_sentencepiece(text: str, vocab_size: int) -> bytes:
    """A SentencePiece BPE model (Llama conventions) trained on text's lines."""
    import sentencepiece as spm
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in text.splitlines() if line.strip()]),
        model_writer=out, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
        hard_vocab_limit=False, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        minloglevel=2)
    return out.getvalue()


# --------------------------------------------------------------------------
# Weights


def _normal(rng: np.random.Generator, shape: Tuple[int, ...], std: float = 0.02) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def llama_weights(cfg: Dict[str, int], rng: np.random.Generator) -> Dict[str, np.ndarray]:
    d, v, f = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    hd = d // cfg["num_attention_heads"]
    kvd = cfg["num_key_value_heads"] * hd
    w: Dict[str, np.ndarray] = {"model.embed_tokens.weight": _normal(rng, (v, d), 1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(d, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
        w[p + "self_attn.q_proj.weight"] = _normal(rng, (d, d), 0.2)
        w[p + "self_attn.k_proj.weight"] = _normal(rng, (kvd, d), 0.2)
        w[p + "self_attn.v_proj.weight"] = _normal(rng, (kvd, d), 0.2)
        w[p + "self_attn.o_proj.weight"] = _normal(rng, (d, d), 0.1)
        w[p + "mlp.gate_proj.weight"] = _normal(rng, (f, d), 0.1)
        w[p + "mlp.up_proj.weight"] = _normal(rng, (f, d), 0.1)
        w[p + "mlp.down_proj.weight"] = _normal(rng, (d, f), 0.1)
    w["model.norm.weight"] = np.ones(d, np.float32)
    w["lm_head.weight"] = _normal(rng, (v, d), 0.5)
    return w


def gpt2_weights(cfg: Dict[str, int], rng: np.random.Generator) -> Dict[str, np.ndarray]:
    d, v, p_n = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    w: Dict[str, np.ndarray] = {"wte.weight": _normal(rng, (v, d), 0.1),
                                "wpe.weight": _normal(rng, (p_n, d), 0.05)}
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        w[p + "ln_1.weight"] = np.ones(d, np.float32)
        w[p + "ln_1.bias"] = np.zeros(d, np.float32)
        w[p + "ln_2.weight"] = np.ones(d, np.float32)
        w[p + "ln_2.bias"] = np.zeros(d, np.float32)
        w[p + "attn.c_attn.weight"] = _normal(rng, (d, 3 * d), 0.2)
        w[p + "attn.c_attn.bias"] = _normal(rng, (3 * d,), 0.02)
        w[p + "attn.c_proj.weight"] = _normal(rng, (d, d), 0.5)
        w[p + "attn.c_proj.bias"] = np.zeros(d, np.float32)
        w[p + "mlp.c_fc.weight"] = _normal(rng, (d, 4 * d), 0.1)
        w[p + "mlp.c_fc.bias"] = np.zeros(4 * d, np.float32)
        w[p + "mlp.c_proj.weight"] = _normal(rng, (4 * d, d), 0.5)
        w[p + "mlp.c_proj.bias"] = np.zeros(d, np.float32)
    w["ln_f.weight"] = np.ones(d, np.float32)
    w["ln_f.bias"] = np.zeros(d, np.float32)
    return w


def _write_json(path: str, obj: object) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, sort_keys=True)
        fh.write("\n")


def make_llama(out: str) -> None:
    import sentencepiece as spm
    os.makedirs(out, exist_ok=True)
    model = train_sentencepiece(CORPUS, 400)
    with open(os.path.join(out, "tokenizer.model"), "wb") as fh:
        fh.write(model)
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": sp.GetPieceSize(), "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "bfloat16",
    }
    _write_json(os.path.join(out, "config.json"), cfg)
    _write_json(os.path.join(out, "tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 512,
        "tokenizer_class": "LlamaTokenizer", "chat_template": TINYLLAMA_CHAT_TEMPLATE,
    })
    _write_json(os.path.join(out, "generation_config.json"),
                {"bos_token_id": 1, "eos_token_id": 2, "max_length": 512})
    weights = llama_weights(cfg, np.random.default_rng(SEED))
    safetensors.save(os.path.join(out, "model.safetensors"), weights,
                     dtypes={k: "BF16" for k in weights}, metadata={"format": "pt"})


def make_gpt2(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    vocab, merges = train_bpe(CORPUS, 300)
    _write_json(os.path.join(out, "vocab.json"), vocab)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n")
        for a, b in merges:
            fh.write(f"{a} {b}\n")
    cfg = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": len(vocab), "n_embd": 64, "n_layer": 2, "n_head": 4,
        "n_positions": 256, "n_ctx": 256, "n_inner": None, "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new", "bos_token_id": len(vocab) - 1,
        "eos_token_id": len(vocab) - 1, "tie_word_embeddings": True,
    }
    _write_json(os.path.join(out, "config.json"), cfg)
    _write_json(os.path.join(out, "tokenizer_config.json"), {
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "model_max_length": 256,
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
    })
    weights = gpt2_weights(cfg, np.random.default_rng(SEED + 1))
    safetensors.save(os.path.join(out, "model.safetensors"), weights, metadata={"format": "pt"})


def _stamp() -> str:
    with open(os.path.abspath(__file__), "rb") as fh:
        return VERSION + ":" + hashlib.sha256(fh.read()).hexdigest()[:16]


def make_all(root: str, force: bool = False) -> List[str]:
    """Write both models under root (atomically per model); returns their dirs."""
    made = []
    for name, fn in (("tiny-llama", make_llama), ("tiny-gpt2", make_gpt2)):
        final = os.path.join(root, name)
        stamp_path = os.path.join(final, ".make_tiny")
        if not force and os.path.exists(stamp_path):
            with open(stamp_path, encoding="utf-8") as fh:
                if fh.read().strip() == _stamp():
                    made.append(final)
                    continue
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        fn(tmp)
        with open(os.path.join(tmp, ".make_tiny"), "w", encoding="utf-8") as fh:
            fh.write(_stamp() + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        made.append(final)
    return made


def main(argv: List[str] | None = None) -> int:
    default_out = os.environ.get("MODEL_PATH") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        "var", "models")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=default_out, help="models folder (default %(default)s)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for path in make_all(args.out, args.force):
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        print(f"make_tiny: {path} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
