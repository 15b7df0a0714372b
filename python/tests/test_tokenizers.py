"""Tokenizer round trips (GPT-2 byte-level BPE, SentencePiece) and chat templates."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigw_models.make_tiny import train_bpe
from aigw_models.tokenizers import (ByteLevelBPE, SentencePieceTokenizer, bytes_to_unicode,
                                    load_tokenizer, normalise_messages, render_chat)

TEXTS = ["Hello, world!", "The robot paints the sea.", "  leading and trailing  ",
         "naïve café — 東京 😀", "tabs\tand\nnewlines\n\n", "x = y + 1; def main(): return 0",
         "it's we're they'll I'd", "12345 3.14159"]


def test_bytes_to_unicode_is_a_bijection_over_bytes() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ"


def test_bpe_applies_merges_by_rank() -> None:
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for tok in ("lo", "low", "Ġlow", "er"):
        vocab[tok] = len(vocab)
    tok = ByteLevelBPE(vocab, [("l", "o"), ("lo", "w"), ("Ġ", "low"), ("e", "r")])
    ids = tok.encode("lower low")
    assert [tok.inverse[i] for i in ids] == ["low", "er", "Ġlow"]
    assert tok.decode(ids) == "lower low"


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_round_trip(tiny_models: Path, text: str) -> None:
    tok = load_tokenizer(str(tiny_models / "tiny-gpt2"))
    assert isinstance(tok, ByteLevelBPE)
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_gpt2_merges_compress_and_special_tokens(tiny_models: Path) -> None:
    tok = load_tokenizer(str(tiny_models / "tiny-gpt2"))
    text = "The robot looked at the sea."
    assert len(tok.encode(text)) < len(text.encode()) / 2  # the trained merges work
    ids = tok.encode("hi<|endoftext|>there")
    assert tok.eos_id in ids
    assert tok.decode(ids) == "hithere"  # special tokens are not text


def test_train_bpe_is_deterministic() -> None:
    assert train_bpe("ab ab abc abc abd", 5) == train_bpe("ab ab abc abc abd", 5)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trip(tiny_models: Path, text: str) -> None:
    tok = load_tokenizer(str(tiny_models / "tiny-llama"))
    assert isinstance(tok, SentencePieceTokenizer)
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text


def test_sentencepiece_bos_and_specials(tiny_models: Path) -> None:
    tok = load_tokenizer(str(tiny_models / "tiny-llama"))
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode("Hello")
    assert ids[0] == 1 and ids.count(1) == 1
    assert tok.encode("<s>Hello") == ids  # no double BOS
    assert 2 in tok.encode("Hi</s>")


def test_chat_template_from_model(tiny_models: Path) -> None:
    from aigw_models.tokenizers import chat_template_of
    tmpl = chat_template_of(str(tiny_models / "tiny-llama"))
    assert tmpl is not None
    msgs = normalise_messages([{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    text = render_chat(tmpl, msgs, "<s>", "</s>")
    assert text == "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


def test_chat_template_fallback_and_raise_exception() -> None:
    msgs = normalise_messages([{"role": "user", "content": "Hi"}])
    assert render_chat(None, msgs, "", "<|endoftext|>") == \
        "<|user|>\nHi<|endoftext|>\n<|assistant|>\n"
    strict = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}" \
             "{% endif %}"
    with pytest.raises(ValueError, match="system first"):
        render_chat(strict, msgs)


def test_chat_template_is_sandboxed() -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Exception):
        render_chat(evil, normalise_messages([{"role": "user", "content": "x"}]))
    with pytest.raises(ValueError):
        normalise_messages([{"content": "no role"}])


def test_sentencepiece_non_legacy_has_no_space_after_special(tiny_models: Path) -> None:
    path = str(tiny_models / "tiny-llama" / "tokenizer.model")
    legacy = SentencePieceTokenizer(path)
    modern = SentencePieceTokenizer(path, legacy=False)
    text = "Hi</s>\nthere"
    assert legacy.decode(legacy.encode(text)) == "Hi \nthere"  # HF legacy behaviour
    assert modern.decode(modern.encode(text)) == "Hi\nthere"
    assert modern.encode("Hi") == legacy.encode("Hi")  # the first segment is unchanged
