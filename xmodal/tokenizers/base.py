"""The tokenizer protocol: what the loader, the tasks and the checkpoints ask of a tokenizer.

A tokenizer is any importable class named by ``data.tokenizer._target_`` that has:

- ``fit(captions, **options)`` (classmethod): learn from an iterable of training captions (a
  bounded sample, see xmodal/tokenizers/build.py); ``options`` are the other keys of
  ``data.tokenizer``;
- ``encode(text, max_len) -> list[int]`` (BOS, tokens, EOS: at most ``max_len`` ids),
  ``encode_batch(texts, max_len) -> (ids [B, T], mask [B, T])`` and ``decode(ids) -> str``;
- ``pad_id``, ``bos_id``, ``eos_id``, ``unk_id``, and ``__len__`` (the embedding size);
- ``state() -> dict``, JSON-serialisable, whose ``_target_`` is the class's import path, and
  ``from_state(state)`` (classmethod): checkpoints' hyperparameters and a run dir's
  ``tokenizer.json`` hold the state, so they rebuild the tokenizer without the data;
- optionally ``problems(options) -> list[str]`` (classmethod): ``"<option>: <why> (got <value>)"``
  lines, reported with every other config problem before any rank starts.

:class:`Tokenizer` implements the shared parts (the BOS/EOS frame, truncation, the memo, padding to
a batch); a subclass gives ``token_ids``, ``decode_tokens``, ``fit``, ``state``/``from_state`` and
``__len__``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T", bound="Tokenizer")

TARGET = "_target_"
"""Key of a state (and of the ``data.tokenizer`` node) naming the tokenizer class."""
MEMO_SIZE = 1 << 17  # encoded captions kept per tokenizer (a few MB)


def target_of(cls: type) -> str:
    """The import path a state names its class by (``xmodal.tokenizers.word.WordTokenizer``)."""
    return f"{cls.__module__}.{cls.__qualname__}"


class Tokenizer(ABC):
    """Base of the built-in tokenizers (a plug-in may subclass it or just follow the protocol)."""

    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int

    def __init__(self) -> None:
        # Training re-encodes the same captions every epoch: a memo makes that a dict lookup
        # (tokenising was most of the collate time in loader workers).
        self._memo: dict[tuple[str, int], list[int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_memo": {}}  # workers start with an empty memo, not a pickled one

    # ------------------------------------------------------------------ what a subclass gives
    @classmethod
    @abstractmethod
    def fit(cls: type[T], captions: Iterable[str], **options: Any) -> T:
        """A tokenizer learnt from training captions (``options``: the ``data.tokenizer`` keys)."""

    @classmethod
    @abstractmethod
    def from_state(cls: type[T], state: Mapping[str, Any]) -> T:
        """The tokenizer :meth:`state` describes."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """JSON-serialisable description, ``_target_`` included, that :meth:`from_state` rebuilds."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of ids (the embedding and output size of a text model)."""

    @abstractmethod
    def token_ids(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS/EOS and untruncated (not memoised)."""

    @abstractmethod
    def decode_tokens(self, ids: list[int]) -> str:
        """Text of ids that hold no BOS, EOS or padding."""

    def token_ids_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`token_ids` of several texts (a subclass may do them at once)."""
        return [self.token_ids(text) for text in texts]

    # ------------------------------------------------------------------ shared
    def encode(self, text: str, max_len: int) -> list[int]:
        """BOS + tokens + EOS, truncated to ``max_len`` ids (EOS kept). Do not mutate the result: it
        is memoised."""
        ids = self._memo.get((text, max_len))
        if ids is None:
            ids = self._remember(text, max_len, self.token_ids(text))
        return ids

    def _remember(self, text: str, max_len: int, tokens: list[int]) -> list[int]:
        ids = [self.bos_id, *tokens[: max_len - 2], self.eos_id]
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
        self._memo[(text, max_len)] = ids
        return ids

    def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids ``[B, T]`` and a mask ``[B, T]`` that is True on real tokens."""
        import numpy as np
        import torch

        rows: list[list[int] | None] = [self._memo.get((t, max_len)) for t in texts]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            fresh = self.token_ids_batch([texts[i] for i in missing])
            for i, tokens in zip(missing, fresh, strict=True):
                rows[i] = self._remember(texts[i], max_len, tokens)
        width = max(len(r) for r in rows if r is not None)
        # Padded as lists, through numpy: 5× faster than torch.tensor on nested lists.
        padded = np.array(
            [r + [self.pad_id] * (width - len(r)) for r in rows if r is not None], dtype=np.int64
        )
        ids = torch.from_numpy(padded)  # [B, T]
        return ids, ids != self.pad_id

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids up to the first EOS; BOS and padding are dropped."""
        kept: list[int] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                kept.append(i)
        return self.decode_tokens(kept)
