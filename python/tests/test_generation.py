"""Generation on the tiny models: determinism, stop sequences, cancellation,
batching, limits; and embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import numpy as np
import pytest

from aigw_models import catalog
from aigw_models.embed import HashEmbedder
from aigw_models.engine import SamplingParams, sample
from aigw_models.transformer import ModelError

NAMES = ["tiny", "tiny-gpt2"]


@pytest.fixture(scope="module", params=NAMES)
def model(request: Any, tiny_models: Path) -> catalog.TextModel:
    return catalog.load(str(tiny_models), request.param, slots=4)


def _prompt(m: catalog.TextModel, text: str = "Once upon a time") -> List[int]:
    return m.tokenizer.encode(text)


def test_greedy_is_deterministic(model: catalog.TextModel) -> None:
    p = SamplingParams(max_tokens=20, temperature=0.0)
    a = model.engine.generate(_prompt(model), p)
    b = model.engine.generate(_prompt(model), p)
    assert a.generated == b.generated and len(a.generated) == 20
    assert a.finish_reason == "length"


def test_seeded_sampling_is_deterministic(model: catalog.TextModel) -> None:
    runs = [model.engine.generate(_prompt(model), SamplingParams(
        max_tokens=24, temperature=1.0, top_p=0.9, seed=seed)).generated
        for seed in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_sample_top_p_and_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = np.array([5.0, 4.0, -10.0, -10.0])
    assert sample(logits, 0.0, 1.0, rng) == 0
    # top_p small enough keeps only the best token
    assert {sample(logits, 1.0, 0.5, rng) for _ in range(50)} == {0}
    # with top_p 1 the second token shows up
    assert {sample(logits, 1.0, 1.0, rng) for _ in range(200)} == {0, 1}


def test_stop_sequence_cuts_text(model: catalog.TextModel) -> None:
    base = model.engine.generate(_prompt(model), SamplingParams(max_tokens=30,
                                                                temperature=0.0))
    text = base.text
    stop = next((text[i:i + 2] for i in range(3, len(text) - 2)
                 if "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) == i), None)
    assert stop, f"no usable stop string in {text!r}"
    cut = model.engine.generate(_prompt(model), SamplingParams(max_tokens=30, temperature=0.0,
                                                               stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == text[:text.find(stop)]
    assert stop not in cut.text
    assert cut.completion_tokens < 30


def test_streamed_text_never_leaks_a_stop_prefix(model: catalog.TextModel) -> None:
    base = model.engine.generate(_prompt(model), SamplingParams(max_tokens=30,
                                                                temperature=0.0))
    text = base.text
    stop = text[-3:] + "\x01"  # never completes; its prefix is at the end
    seq = model.engine.add(_prompt(model), SamplingParams(max_tokens=30, temperature=0.0,
                                                          stop=[stop]))
    pieces = []
    while not seq.done:
        model.engine.step()
        pieces.append(seq.take())
    pieces.append(seq.take())
    model.engine.release(seq)
    assert "".join(pieces) == text


@pytest.mark.parametrize("every", [1, 2, 3, 7])
def test_taken_text_is_the_whole_text_however_often_it_is_taken(
        model: catalog.TextModel, every: int) -> None:
    # Text with invalid and split UTF-8 (the tiny models' noise has plenty):
    # taking every `every` steps, plus once at the end, gives exactly the
    # bytes of the tokens decoded with errors="replace", streamed or not.
    tok = model.tokenizer
    for seed in range(6):
        p = SamplingParams(max_tokens=40, temperature=1.0, seed=seed)
        seq = model.engine.add(_prompt(model, "hello there world"), p)
        pieces, n = [], 0
        while not seq.done:
            model.engine.step()
            n += 1
            if n % every == 0:
                pieces.append(seq.take())
            else:
                seq.untaken = 0
        pieces.append(seq.take())
        model.engine.release(seq)
        whole = tok.decode_bytes(seq.generated).decode("utf-8", errors="replace")
        assert seq.text == whole
        assert "".join(pieces) == whole


def test_incremental_utf8_holds_back_only_an_incomplete_tail(
        model: catalog.TextModel) -> None:
    from aigw_models.engine import Sequence_
    seq = Sequence_([1], SamplingParams(), None, [])  # type: ignore[arg-type]
    got = []
    data = b""
    for chunk in (b"a\xe2", b"\x82", b"\xac", b"\x85b", b"\xf0\x9f"):
        data += chunk
        seq.feed(data)
        got.append(seq.take())
    assert got == ["a", "", "\u20ac", "\ufffdb", ""]
    seq.feed(data, final=True)
    seq.finish_reason = "length"
    assert seq.take() == "\ufffd"
    assert seq.text == data.decode("utf-8", errors="replace")


def test_sentencepiece_decode_bytes_is_prefix_stable(tiny_models: Path) -> None:
    from aigw_models.tokenizers import load_tokenizer
    tok = load_tokenizer(str(tiny_models / "tiny-llama"))
    rng = np.random.default_rng(1)
    byte_ids = sorted(tok._byte_value)  # type: ignore[attr-defined]
    assert len(byte_ids) == 256
    for _ in range(50):
        ids = [int(x) for x in rng.integers(0, tok.vocab_size, 30)]
        full = tok.decode_bytes(ids)
        for n in range(len(ids)):
            assert full.startswith(tok.decode_bytes(ids[:n]))
        plain = [i for i in ids if i not in tok._byte_value]  # type: ignore[attr-defined]
        assert tok.decode(plain) == tok.sp.DecodeIds(  # type: ignore[attr-defined]
            [i for i in plain if i not in tok.special_ids])
    e2, x82 = byte_ids[0xE2], byte_ids[0x82]
    assert tok.decode([e2, x82, tok.encode("a", add_bos=False)[-1]]).startswith("\ufffd")
    assert tok.decode_bytes([e2, x82, byte_ids[0xAC]]) == "\u20ac".encode()


def test_cancel_frees_the_slot(model: catalog.TextModel) -> None:
    eng = model.engine
    seqs = [eng.add(_prompt(model), SamplingParams(max_tokens=200, temperature=0.0))
            for _ in range(eng.slots)]
    eng.step()
    with pytest.raises(ModelError, match="no free slot"):
        eng.add(_prompt(model), SamplingParams(max_tokens=5))
    eng.release(seqs[0])
    assert seqs[0].finish_reason == "cancelled" and eng.free_slots == 1
    extra = eng.add(_prompt(model), SamplingParams(max_tokens=5, temperature=0.0))
    for s in seqs[1:] + [extra]:
        eng.release(s)
    assert eng.free_slots == eng.slots and not eng.has_work()


def test_batched_decoding_gives_the_same_tokens(model: catalog.TextModel) -> None:
    eng = model.engine
    pa, pb = _prompt(model, "The robot"), _prompt(model, "Hello! How are you today?")
    alone_a = eng.generate(pa, SamplingParams(max_tokens=16, temperature=0.0)).generated
    alone_b = eng.generate(pb, SamplingParams(max_tokens=12, temperature=0.0)).generated
    sa = eng.add(pa, SamplingParams(max_tokens=16, temperature=0.0))
    eng.step()  # a is one token ahead of b: the batch mixes prefill and decode
    sb = eng.add(pb, SamplingParams(max_tokens=12, temperature=0.0))
    before = eng.steps
    while not (sa.done and sb.done):
        sa.take(), sb.take()
        eng.step()
    assert sa.generated == alone_a and sb.generated == alone_b
    assert max(eng.batch_sizes[-(eng.steps - before):]) == 2  # really batched
    eng.release(sa)
    eng.release(sb)


def test_prompt_too_long_and_context_limit(model: catalog.TextModel) -> None:
    limit = model.context
    with pytest.raises(ModelError, match="does not fit"):
        model.engine.add([5] * limit, SamplingParams())
    seq = model.engine.generate([5] * (limit - 3), SamplingParams(max_tokens=50,
                                                                  temperature=0.0))
    assert seq.finish_reason == "length" and seq.completion_tokens <= 3


def test_back_pressure_pauses_an_untaken_sequence(model: catalog.TextModel) -> None:
    eng = model.engine
    seq = eng.add(_prompt(model), SamplingParams(max_tokens=100, temperature=0.0))
    for _ in range(40):
        eng.step()
    assert seq.completion_tokens == eng.hold and not eng.has_work()
    seq.take()
    assert eng.has_work()
    eng.release(seq)


def test_transformer_embeddings(model: catalog.TextModel) -> None:
    tok = model.tokenizer
    vecs = model.model.embed_texts([tok.encode("the sea"), tok.encode("a robot paints")])
    assert vecs.shape == (2, model.model.config.hidden)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    again = model.model.embed_texts([tok.encode("the sea")])
    np.testing.assert_allclose(again[0], vecs[0], rtol=1e-4, atol=1e-6)


def test_hash_embedder() -> None:
    emb = HashEmbedder(256)
    a, b, c = emb.embed("The quick brown fox"), emb.embed("the quick  brown fox!"), \
        emb.embed("Completely unrelated words here")
    assert a.shape == (256,) and a.dtype == np.float32
    assert np.linalg.norm(a) == pytest.approx(1.0, rel=1e-6)
    assert float(a @ b) > 0.8 > float(a @ c)
    np.testing.assert_array_equal(a, HashEmbedder(256).embed("The quick brown fox"))
    assert not emb.embed("").any()
    assert emb.embed("abc", dim=32).shape == (32,)
    assert (emb.embed("hello") < 0).any()  # signed hashing
    vecs, tokens = emb.embed_many(["a b c", "d"])
    assert vecs.shape == (2, 256) and tokens == 4


def test_catalog_discovers_and_reports(tiny_models: Path) -> None:
    names = {m["name"]: m for m in catalog.discover(str(tiny_models))}
    assert {"hash-embed", "tiny", "tiny-gpt2"} <= set(names)
    assert names["tiny"]["arch"] == "llama" and names["tiny-gpt2"]["arch"] == "gpt2"
    with pytest.raises(ValueError):
        catalog.model_dir(str(tiny_models), "../etc")


def test_make_tiny_is_reproducible(tmp_path: Path, tiny_models: Path) -> None:
    from aigw_models import make_tiny
    make_tiny.make_all(str(tmp_path))
    for name in ("tiny-llama", "tiny-gpt2"):
        for f in (tiny_models / name).iterdir():
            assert (tmp_path / name / f.name).read_bytes() == f.read_bytes(), f.name
        size = sum(f.stat().st_size for f in (tmp_path / name).iterdir())
        assert size < 4 * 1024 * 1024
