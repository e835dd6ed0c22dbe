"""Word-level tokenizer: a vocabulary of the training captions' words, in any script.

Words are those of :func:`xmodal.tokenizers.text.words` (NFKC, casefold, letters and digits, CJK
characters one by one), so the units the model predicts are the units the caption metrics count.
Enough for template captions and small vocabularies; open-vocabulary text wants the subword
tokenizer (xmodal/tokenizers/subword.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from xmodal.tokenizers.base import TARGET, Tokenizer, target_of
from xmodal.tokenizers.text import join_words, words

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


class WordTokenizer(Tokenizer):
    """``vocab[i]`` is the word of id ``i``; the four specials come first."""

    def __init__(self, vocab: Sequence[str]):
        super().__init__()
        if tuple(vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocab must start with {SPECIALS}, got {tuple(vocab[:4])}")
        self.vocab = list(vocab)
        self.index = {word: i for i, word in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.index[s] for s in SPECIALS)

    @classmethod
    def fit(cls, captions: Iterable[str], min_count: int = 1) -> WordTokenizer:
        """Vocabulary of the given captions, most frequent first (ties in code-point order:
        deterministic); words seen fewer than ``min_count`` times map to ``<unk>``."""
        counts = Counter(word for text in captions for word in words(text))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    @classmethod
    def problems(cls, options: Mapping[str, Any]) -> list[str]:
        count = options.get("min_count", 1)
        ok = isinstance(count, int) and not isinstance(count, bool) and count >= 1
        return [] if ok else [f"min_count: must be an integer >= 1 (got {count!r})"]

    def state(self) -> dict[str, Any]:
        return {TARGET: target_of(type(self)), "vocab": list(self.vocab)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> WordTokenizer:
        return cls(state["vocab"])

    def __len__(self) -> int:
        return len(self.vocab)

    def token_ids(self, text: str) -> list[int]:
        return [self.index.get(word, self.unk_id) for word in words(text)]

    def decode_tokens(self, ids: list[int]) -> str:
        """Words joined by spaces, CJK characters without (``<unk>`` is kept, visibly)."""
        return join_words([self.vocab[i] for i in ids])
