"""A word-level tokenizer that works offline: a fixed vocabulary plus hashed buckets for unknown words.

The vocabulary is built deterministically from the synthetic world's instructions and captions and is stored in the
model config (`text.vocab`), so a checkpoint keeps decoding its own ids even if the world grammar changes later.
Words outside the vocabulary map to one of `num_hash_buckets` ids by a stable hash (CRC32), so arbitrary user
instructions tokenize without error; they just carry no learned meaning.

Ids: 0 = padding, 1 .. len(vocab) = vocabulary words (in order), then the hash buckets.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Sequence

import numpy as np

PAD_ID = 0
_WORD = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Lower-cased alphanumeric words of `text` with their [start, end) character offsets."""
    return [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(text.lower())]


def world_vocabulary(num_samples_per_split: int = 1500, size: int = 24) -> tuple[str, ...]:
    """Sorted set of words in the world's instructions and captions (all splits, every edit type)."""
    from editing_jax.data.world import edits

    world = edits.WorldConfig(size=size)
    words: set[str] = set()
    for split in ("train", "val", "test"):
        for index in range(num_samples_per_split):
            edit = edits.generate_edit(split, 0, index, world)
            for text in (edit.instruction, edit.source.caption(), edit.target.caption()):
                words.update(word for word, _, _ in split_words(text))
    return tuple(sorted(words))


@dataclasses.dataclass(frozen=True)
class WordTokenizer:
    """Fixed-length word tokenizer.

    Attributes:
      vocab: known words; word i gets id i + 1.
      max_length: output length L (longer texts are truncated).
      num_hash_buckets: ids reserved for unknown words.
    """

    vocab: tuple[str, ...]
    max_length: int = 24
    num_hash_buckets: int = 64

    def __post_init__(self):
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("vocabulary words must be unique")
        object.__setattr__(self, "_index", {word: i + 1 for i, word in enumerate(self.vocab)})

    @property
    def vocab_size(self) -> int:
        return 1 + len(self.vocab) + self.num_hash_buckets

    def word_id(self, word: str) -> int:
        known = self._index.get(word)
        if known is not None:
            return known
        return 1 + len(self.vocab) + zlib.crc32(word.encode()) % self.num_hash_buckets

    def encode(self, texts: Sequence[str], spans: Sequence[tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
        """Tokenizes a batch.

        Args:
          texts: B strings.
          spans: optional B character spans [start, end) (e.g. the world's keyword span); words overlapping the span
            are flagged in `span_mask`. An empty span (start == end) flags nothing.

        Returns:
          ids `[B, L]` int32 (0-padded), mask `[B, L]` bool (real words), span_mask `[B, L]` bool.
        """
        batch = len(texts)
        ids = np.zeros((batch, self.max_length), np.int32)
        span_mask = np.zeros((batch, self.max_length), bool)
        for row, text in enumerate(texts):
            words = split_words(str(text))[: self.max_length]
            for col, (word, start, end) in enumerate(words):
                ids[row, col] = self.word_id(word)
                if spans is not None:
                    span_start, span_end = (int(v) for v in spans[row])
                    span_mask[row, col] = span_start < span_end and start < span_end and end > span_start
        return {"ids": ids, "mask": ids != PAD_ID, "span_mask": span_mask}

    def bag_of_words(self, texts: Sequence[str]) -> np.ndarray:
        """`[B, vocab_size]` float32 word counts of each text (every word, not cut at `max_length`; no padding id)."""
        counts = np.zeros((len(texts), self.vocab_size), np.float32)
        for row, text in enumerate(texts):
            for word, _, _ in split_words(str(text)):
                counts[row, self.word_id(word)] += 1.0
        return counts

    def find_phrase(self, texts: Sequence[str], phrase: str) -> np.ndarray:
        """`[B, L]` bool: positions of the words of `phrase` where they occur as a contiguous run in each text."""
        target = [w for w, _, _ in split_words(phrase)]
        found = np.zeros((len(texts), self.max_length), bool)
        if not target:
            return found
        for row, text in enumerate(texts):
            words = [w for w, _, _ in split_words(str(text))[: self.max_length]]
            for start in range(len(words) - len(target) + 1):
                if words[start : start + len(target)] == target:
                    found[row, start : start + len(target)] = True
        return found
