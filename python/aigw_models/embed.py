"""The built-in hashing embedder (model ``hash-embed``; clients say
``local/hash-embed``): embeddings with no weights at all.

Method (feature hashing, Weinberger et al. 2009, over character n-grams):

1. Normalise the text: Unicode NFKC, lower case, whitespace runs collapsed
   to one space, one space added at each end (so word boundaries are part of
   the n-grams).
2. Take every character n-gram for n in ``ngrams`` (default 3, 4 and 5) and
   every whole word (prefixed ``w:``).
3. Each feature adds ±1 to one of ``dim`` buckets: the bucket is its CRC-32
   modulo dim, the sign a bit of a second CRC-32 with another seed (signed
   hashing keeps the expected dot product of unrelated texts at zero).
4. The vector is L2-normalised (an empty text gives the zero vector).

So texts that share many n-grams (spelling variants, word order changes)
get a high cosine similarity; it knows nothing of meaning. It is
deterministic across processes and machines (CRC-32, not Python's salted
hash). Usage counts whitespace-separated words, at least one per input.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from typing import Iterable, List, Sequence, Tuple

import numpy as np

DEFAULT_DIM = 256
DIM_MAX = 8192
_SPACE = re.compile(r"\s+")
_SIGN_SEED = 0x9E3779B9


def normalise(text: str) -> str:
    """NFKC, lower case, single spaces, one space at each end."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " " + _SPACE.sub(" ", text).strip() + " "


class HashEmbedder:
    """Signed feature hashing of character n-grams and words."""

    def __init__(self, dim: int = DEFAULT_DIM, ngrams: Sequence[int] = (3, 4, 5)) -> None:
        if not 1 <= dim <= DIM_MAX:
            raise ValueError(f"dim must be 1..{DIM_MAX}")
        self.dim = dim
        self.ngrams = tuple(ngrams)

    def features(self, text: str) -> Iterable[str]:
        norm = normalise(text)
        for n in self.ngrams:
            for i in range(len(norm) - n + 1):
                yield norm[i:i + n]
        for word in norm.split():
            yield "w:" + word

    def embed(self, text: str, dim: int = 0) -> np.ndarray:
        """One L2-normalised float32 vector of dim (default self.dim)."""
        dim = dim or self.dim
        vec = np.zeros(dim, np.float32)
        idx: List[int] = []
        sgn: List[float] = []
        for feat in self.features(text):
            raw = feat.encode("utf-8")
            idx.append(zlib.crc32(raw) % dim)
            sgn.append(1.0 if zlib.crc32(raw, _SIGN_SEED) & 1 else -1.0)
        if idx:
            np.add.at(vec, np.asarray(idx), np.asarray(sgn, np.float32))
        norm = float(np.linalg.norm(vec))
        if norm > 0:
            vec /= norm
        return vec

    def embed_many(self, texts: Sequence[str], dim: int = 0) -> Tuple[np.ndarray, int]:
        """Vectors [N, dim] and the usage (word count, at least 1 per text)."""
        rows = [self.embed(t, dim) for t in texts]
        tokens = sum(max(1, len(t.split())) for t in texts)
        return (np.stack(rows) if rows else np.zeros((0, dim or self.dim), np.float32)), tokens
