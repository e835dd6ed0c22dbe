"""Word-level tokenizer built from the training captions and stored inside every checkpoint.

Word level is enough for template captions and keeps BLEU's tokenisation and ours identical;
the captioning issue adds BPE for open-vocabulary text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
MEMO_SIZE = 1 << 17  # encoded captions kept per tokenizer (a few MB)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def normalize(text: str) -> list[str]:
    """Lower-case words and digits; punctuation is dropped (it carries nothing in captions)."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    def __init__(self, vocab: Sequence[str]):
        if tuple(vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocab must start with {SPECIALS}, got {tuple(vocab[:4])}")
        self.vocab = list(vocab)
        self.index = {word: i for i, word in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.index[s] for s in SPECIALS)
        # Training re-encodes the same captions every epoch: a memo makes that a dict lookup
        # (tokenising was most of the collate time in loader workers).
        self._memo: dict[tuple[str, int], list[int]] = {}

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_memo": {}}  # workers start with an empty memo, not a pickled one

    @classmethod
    def fit(cls, texts: Iterable[str], min_count: int = 1) -> WordTokenizer:
        """Vocabulary of the given texts, most frequent first (ties alphabetical: deterministic)."""
        counts = Counter(word for text in texts for word in normalize(text))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, max_len: int) -> list[int]:
        """BOS + words + EOS, truncated to ``max_len`` ids (EOS kept). Do not mutate the result: it
        is memoised."""
        ids = self._memo.get((text, max_len))
        if ids is None:
            words = [self.index.get(word, self.unk_id) for word in normalize(text)][: max_len - 2]
            ids = [self.bos_id, *words, self.eos_id]
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            self._memo[(text, max_len)] = ids
        return ids

    def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids ``[B, T]`` and a mask ``[B, T]`` that is True on real tokens."""
        rows = [self.encode(t, max_len) for t in texts]
        width = max(len(r) for r in rows)
        # Padded as lists, through numpy: 5× faster than torch.tensor on nested lists.
        padded = np.array([r + [self.pad_id] * (width - len(r)) for r in rows], dtype=np.int64)
        ids = torch.from_numpy(padded)  # [B, T]
        return ids, ids != self.pad_id

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first EOS; specials other than <unk> are dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.vocab[i])
        return " ".join(words)
