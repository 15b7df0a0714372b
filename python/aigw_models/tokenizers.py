"""Tokenizers for local models: GPT-2 byte-level BPE and SentencePiece.

``ByteLevelBPE`` is GPT-2's tokenizer implemented from its definition: text is
split by GPT-2's pre-tokenizer pattern, each piece's UTF-8 bytes are mapped to
printable characters (``bytes_to_unicode``), and merges from ``merges.txt``
are applied by rank until none applies; pieces are looked up in
``vocab.json``. Python's ``re`` has no ``\\p{L}``/``\\p{N}``, so letters are
``[^\\W\\d_]`` and numbers ``\\d`` (decimal digits only); other Unicode number
characters (e.g. "²") are split as punctuation, a difference of a few tokens
on rare text and none on ASCII.

``SentencePieceTokenizer`` wraps Debian's ``python3-sentencepiece`` for
Llama's ``tokenizer.model``.

Both split the text on special-token strings first (``<s>``, ``</s>``,
``<|endoftext|>``, added tokens from ``tokenizer_config.json``), so a chat
template's rendered text maps those to their ids, as Hugging Face does.

``load_tokenizer(model_dir)`` picks the right one from the files present.
Chat templates (``render_chat``) are rendered with jinja2's immutable
sandbox; see ``FALLBACK_CHAT_TEMPLATE`` for models without one.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

GPT2_PATTERN = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")

#  The chat template used when tokenizer_config.json has none: the Zephyr /
#  TinyLlama-Chat layout, one block per message ending with the EOS token,
#  then the assistant header so the model continues as the assistant.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class TokenizerError(ValueError):
    """Missing or unreadable tokenizer files."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class Tokenizer:
    """Common interface: ids from text and back, special tokens, BOS/EOS."""

    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    bos_token: str = ""
    eos_token: str = ""
    add_bos: bool = False
    vocab_size: int = 0

    def __init__(self) -> None:
        self.special: Dict[str, int] = {}
        self._special_re: Optional[re.Pattern[str]] = None

    def set_special(self, tokens: Mapping[str, int]) -> None:
        """Strings that map straight to one id wherever they occur in text."""
        self.special.update({k: v for k, v in tokens.items() if k})
        if self.special:
            alts = sorted(self.special, key=len, reverse=True)
            self._special_re = re.compile("(" + "|".join(re.escape(a) for a in alts) + ")")

    @property
    def stop_ids(self) -> List[int]:
        """Ids that end generation (EOS)."""
        return [self.eos_id] if self.eos_id is not None else []

    def encode(self, text: str, add_bos: Optional[bool] = None) -> List[int]:
        """Token ids for text; special-token strings become their ids. BOS is
        prepended when add_bos (default: the tokenizer's setting) and the
        text does not already start with it."""
        ids: List[int] = []
        parts = self._special_re.split(text) if self._special_re else [text]
        for i, part in enumerate(parts):
            if not part:
                continue
            if i % 2 == 1:
                ids.append(self.special[part])
            else:
                ids.extend(self._encode_plain(part, first=not ids))
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids.insert(0, self.bos_id)
        return ids

    def _encode_plain(self, text: str, first: bool) -> List[int]:
        raise NotImplementedError

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The UTF-8 bytes of ids (special tokens dropped), which may be
        invalid or end inside a character. Prefix-stable: the bytes of
        ``ids[:n]`` are a prefix of the bytes of ``ids`` (what incremental
        detokenization relies on)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ids, special tokens dropped; invalid UTF-8 becomes U+FFFD
        (Python's ``errors="replace"``: one per maximal invalid subpart)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class ByteLevelBPE(Tokenizer):
    """GPT-2 byte-level BPE over a vocab (piece -> id) and ranked merges."""

    def __init__(self, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]],
                 eos_token: str = "<|endoftext|>", bos_token: Optional[str] = None,
                 extra_special: Optional[Mapping[str, int]] = None) -> None:
        super().__init__()
        self.vocab = dict(vocab)
        self.inverse = {v: k for k, v in self.vocab.items()}
        self.ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache: Dict[str, List[str]] = {}
        self.vocab_size = max(self.vocab.values()) + 1 if self.vocab else 0
        special: Dict[str, int] = dict(extra_special or {})
        if eos_token in self.vocab:
            self.eos_token, self.eos_id = eos_token, self.vocab[eos_token]
            special[eos_token] = self.eos_id
        if bos_token and bos_token in self.vocab:
            self.bos_token, self.bos_id = bos_token, self.vocab[bos_token]
            special[bos_token] = self.bos_id
        self.special_ids = set(special.values())
        self.set_special(special)

    @classmethod
    def from_files(cls, vocab_path: str, merges_path: str, **kwargs: Any) -> "ByteLevelBPE":
        """Load vocab.json and merges.txt (first line ``#version`` optional)."""
        try:
            with open(vocab_path, encoding="utf-8") as fh:
                vocab = json.load(fh)
            with open(merges_path, encoding="utf-8") as fh:
                lines = fh.read().split("\n")
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"cannot read GPT-2 tokenizer files: {exc}") from None
        if not isinstance(vocab, dict):
            raise TokenizerError(f"{vocab_path}: not a JSON object")
        merges = parse_merges(lines)
        return cls(vocab, merges, **kwargs)

    def bpe(self, word: str) -> List[str]:
        """Apply merges to one pre-token (already byte-mapped)."""
        cached = self.cache.get(word)
        if cached is not None:
            return cached
        parts = list(word)
        while len(parts) > 1:
            best: Optional[Tuple[int, int]] = None
            for i in range(len(parts) - 1):
                rank = self.ranks.get((parts[i], parts[i + 1]))
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, i)
            if best is None:
                break
            first, second = parts[best[1]], parts[best[1] + 1]
            merged: List[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if len(self.cache) < 100_000:
            self.cache[word] = parts
        return parts

    def _encode_plain(self, text: str, first: bool) -> List[int]:
        ids: List[int] = []
        for piece in GPT2_PATTERN.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            for tok in self.bpe(mapped):
                tid = self.vocab.get(tok)
                if tid is None:  # a vocab without every byte: fall back per char
                    ids.extend(self.vocab[c] for c in tok if c in self.vocab)
                else:
                    ids.append(tid)
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        out = bytearray()
        for i in ids:
            if i in self.special_ids:
                continue
            tok = self.inverse.get(int(i))
            if tok is None:
                continue
            out.extend(self.byte_decoder[c] for c in tok if c in self.byte_decoder)
        return bytes(out)


def parse_merges(lines: Iterable[Any]) -> List[Tuple[str, str]]:
    """Merges from merges.txt lines ("a b") or tokenizer.json entries."""
    merges: List[Tuple[str, str]] = []
    for line in lines:
        if isinstance(line, list) and len(line) == 2:
            merges.append((str(line[0]), str(line[1])))
            continue
        if not isinstance(line, str) or not line or line.startswith("#version"):
            continue
        a, sep, b = line.partition(" ")
        if sep and a and b:
            merges.append((a, b))
    return merges


class SentencePieceTokenizer(Tokenizer):
    """Llama's SentencePiece ``tokenizer.model`` (via python3-sentencepiece)."""

    def __init__(self, model_path: str, add_bos: bool = True,
                 extra_special: Optional[Mapping[str, int]] = None, legacy: bool = True
                 ) -> None:
        super().__init__()
        self.legacy = legacy  # tokenizer_config.json "legacy" (HF default True)
        try:
            import sentencepiece as spm  # Debian python3-sentencepiece
        except ImportError as exc:  # pragma: no cover — packaging error
            raise TokenizerError("python3-sentencepiece is not installed") from exc
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{model_path}: {exc}") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.add_bos = add_bos
        special: Dict[str, int] = dict(extra_special or {})
        if self.sp.bos_id() >= 0:
            self.bos_id = self.sp.bos_id()
            self.bos_token = self.sp.IdToPiece(self.bos_id)
            special[self.bos_token] = self.bos_id
        if self.sp.eos_id() >= 0:
            self.eos_id = self.sp.eos_id()
            self.eos_token = self.sp.IdToPiece(self.eos_id)
            special[self.eos_token] = self.eos_id
        self.special_ids = set(special.values())
        self.set_special(special)
        #  Byte-fallback pieces <0xNN>: id -> byte value.
        self._byte_value: Dict[int, int] = {}
        for i in range(self.vocab_size):
            if self.sp.IsByte(i):
                piece = self.sp.IdToPiece(i)
                try:
                    self._byte_value[i] = int(piece[3:-1], 16)
                except ValueError:
                    pass

    def _encode_plain(self, text: str, first: bool) -> List[int]:
        if not self.legacy and not first and self.sp.unk_id() >= 0:
            #  Hugging Face's non-legacy Llama tokenizer: no dummy-prefix
            #  space for text that follows a special token.
            unk = self.sp.IdToPiece(self.sp.unk_id())
            skip = len(self.sp.EncodeAsIds(unk))
            return list(self.sp.EncodeAsIds(unk + text))[skip:]
        return list(self.sp.EncodeAsIds(text))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """SentencePiece's own surfaces for ordinary pieces (its rules for
        ``▁`` and the leading space), but byte-fallback pieces (``<0xNN>``)
        as the raw bytes: SentencePiece itself turns each invalid byte into
        U+FFFD, which is not prefix-stable and not Python's "replace"."""
        keep = [int(i) for i in ids if int(i) not in self.special_ids
                and 0 <= int(i) < self.vocab_size]
        if not keep:
            return b""
        if not any(i in self._byte_value for i in keep):
            return self.sp.DecodeIds(keep).encode("utf-8")
        out = bytearray()
        for piece in self.sp.DecodeIdsAsImmutableProto(keep).pieces:
            value = self._byte_value.get(piece.id)
            if value is not None:
                out.append(value)
            else:
                out += piece.surface.encode("utf-8")
        return bytes(out)


def _token_str(value: Any) -> Optional[str]:
    """bos_token/eos_token in tokenizer_config.json: a string or {content}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_tokenizer_config(model_dir: str) -> Dict[str, Any]:
    """tokenizer_config.json as a dict ({} when absent or unreadable)."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
        return cfg if isinstance(cfg, dict) else {}
    except (OSError, ValueError):
        return {}


def load_tokenizer(model_dir: str) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder.

    ``tokenizer.model`` → SentencePiece; ``vocab.json`` + ``merges.txt`` →
    byte-level BPE; else ``tokenizer.json`` with a BPE model → byte-level BPE
    from its vocab and merges (GPT-2 pre-tokenizer assumed). Added tokens
    from ``tokenizer_config.json`` (``added_tokens_decoder``) are special.
    """
    cfg = read_tokenizer_config(model_dir)
    added: Dict[str, int] = {}
    for tid, entry in (cfg.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("content"), str):
            try:
                added[entry["content"]] = int(tid)
            except ValueError:
                pass
    bos = _token_str(cfg.get("bos_token"))
    eos = _token_str(cfg.get("eos_token"))
    sp_path = os.path.join(model_dir, "tokenizer.model")
    vocab_path = os.path.join(model_dir, "vocab.json")
    merges_path = os.path.join(model_dir, "merges.txt")
    tj_path = os.path.join(model_dir, "tokenizer.json")
    tok: Tokenizer
    if os.path.exists(sp_path):
        tok = SentencePieceTokenizer(sp_path, add_bos=bool(cfg.get("add_bos_token", True)),
                                     extra_special=added,
                                     legacy=bool(cfg.get("legacy", True)))
    elif os.path.exists(vocab_path) and os.path.exists(merges_path):
        tok = ByteLevelBPE.from_files(vocab_path, merges_path,
                                      eos_token=eos or "<|endoftext|>", bos_token=bos,
                                      extra_special=added)
        tok.add_bos = bool(cfg.get("add_bos_token", False))
    elif os.path.exists(tj_path):
        try:
            with open(tj_path, encoding="utf-8") as fh:
                tj = json.load(fh)
            model = tj["model"]
            if model.get("type") != "BPE":
                raise TokenizerError(f"{tj_path}: model type {model.get('type')} unsupported")
            for entry in tj.get("added_tokens") or []:
                added[entry["content"]] = int(entry["id"])
            vocab = dict(model["vocab"])
            vocab.update(added)
            tok = ByteLevelBPE(vocab, parse_merges(model["merges"]),
                               eos_token=eos or "<|endoftext|>", bos_token=bos,
                               extra_special=added)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TokenizerError(f"{tj_path}: {exc}") from None
        tok.add_bos = bool(cfg.get("add_bos_token", False))
    else:
        raise TokenizerError(f"{model_dir}: no tokenizer.model, vocab.json+merges.txt "
                             f"or tokenizer.json")
    return tok


# --------------------------------------------------------------------------
# Chat templates


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def chat_template_of(model_dir: str) -> Optional[str]:
    """The model's chat template (tokenizer_config.json ``chat_template``,
    a string or the ``default`` entry of a list), or None."""
    cfg = read_tokenizer_config(model_dir)
    tmpl = cfg.get("chat_template")
    if isinstance(tmpl, str):
        return tmpl
    if isinstance(tmpl, list):
        for entry in tmpl:
            if isinstance(entry, dict) and entry.get("name") == "default":
                return str(entry.get("template"))
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    return None


def normalise_messages(messages: Any) -> List[Dict[str, Any]]:
    """OpenAI messages as plain {role, content: str, ...} maps.

    Content given as a list of parts keeps the text parts, joined. Raises
    ValueError for anything that is not a list of messages with a role.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty array")
    out: List[Dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a role")
        content = msg.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content
                              if isinstance(p, dict) and p.get("type") == "text")
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or an array")
        entry = dict(msg)
        entry["content"] = content
        out.append(entry)
    return out


_ENV_CACHE: Dict[str, Any] = {}


def render_chat(template: Optional[str], messages: List[Dict[str, Any]], bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """Render a chat template (or the fallback) in jinja2's immutable sandbox
    with the variables Hugging Face passes: messages, bos_token, eos_token,
    add_generation_prompt and raise_exception. Raises ValueError if the
    template fails (e.g. it calls raise_exception for a role order it does
    not support)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    source = template or FALLBACK_CHAT_TEMPLATE
    compiled = _ENV_CACHE.get(source)
    try:
        if compiled is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            compiled = env.from_string(source)
            if len(_ENV_CACHE) < 32:
                _ENV_CACHE[source] = compiled
        return str(compiled.render(messages=messages, bos_token=bos_token,
                                   eos_token=eos_token,
                                   add_generation_prompt=add_generation_prompt))
    except TemplateError as exc:
        raise ValueError(f"chat template: {exc}") from None
