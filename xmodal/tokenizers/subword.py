"""Subword tokenizer on Hugging Face ``tokenizers``: trained offline on the training captions, or
any saved ``tokenizer.json`` loaded by path.

Trained ones never lose a character of any script:

- ``algorithm: bpe`` is byte-level BPE (GPT-2's scheme): the 256 bytes are the base alphabet, so
  every text is encodable and ``<unk>`` never occurs;
- ``algorithm: unigram`` is SentencePiece's Unigram with byte fallback: a character the training
  captions never showed is spelt as its UTF-8 bytes (``<0xF0>`` …) instead of ``<unk>``.

Both normalise with NFKC (and lower-case by default, as the word tokenizer does). A loaded
tokenizer is used as it is; the four specials (``<pad>``, ``<bos>``, ``<eos>``, ``<unk>`` unless
named otherwise) are added when it lacks them, and xmodal adds BOS/EOS itself (the file's own
post-processor, e.g. BERT's ``[CLS] … [SEP]``, is not applied). The state is the tokenizer's JSON,
so a checkpoint carries the whole tokenizer, trained or loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xmodal.tokenizers.base import TARGET, Tokenizer, target_of
from xmodal.tokenizers.word import BOS, EOS, PAD, UNK

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HfTokenizer

ALGORITHMS = ("bpe", "unigram")
BYTES = 256
MIN_VOCAB = {"bpe": BYTES + 4, "unigram": BYTES + 4 + 8}  # bytes, the specials (and a few pieces)


def _hf() -> Any:
    # Loader workers are the parallelism; the library's own thread pool inside each worker only
    # competes with them (and warns after every fork once it has been used).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import tokenizers

    return tokenizers


def train_hf_tokenizer(
    captions: Iterable[str], algorithm: str, vocab_size: int, min_count: int, lowercase: bool
) -> HfTokenizer:
    """A byte-level BPE or byte-fallback Unigram tokenizer trained on ``captions``."""
    hf = _hf()
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    specials = [PAD, BOS, EOS, UNK]
    steps = [normalizers.NFKC(), *([normalizers.Lowercase()] if lowercase else [])]
    if algorithm == "bpe":
        tok = hf.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_count,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = hf.Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        # The 256 byte pieces are added after training: they count in vocab_size, as in BPE (the
        # trainer keeps every character it saw, so a tiny vocab_size can be exceeded).
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size - BYTES, special_tokens=specials, unk_token=UNK, show_progress=False
        )
    tok.normalizer = normalizers.Sequence(steps)
    tok.train_from_iterator(captions, trainer)
    if algorithm == "unigram":
        _add_byte_fallback(tok)
    return tok


def _add_byte_fallback(tok: HfTokenizer) -> None:
    """Give a trained Unigram model the 256 byte pieces and byte fallback (the trainer cannot),
    as SentencePiece models have them: unseen characters become bytes, not ``<unk>``."""
    from tokenizers import decoders, models

    model = json.loads(tok.to_str())["model"]
    pieces = [(str(p), float(s)) for p, s in model["vocab"]]
    lowest = min(s for _, s in pieces) - 1.0  # bytes only where no learnt piece covers the text
    have = {p for p, _ in pieces}
    pieces += [(f"<0x{b:02X}>", lowest) for b in range(256) if f"<0x{b:02X}>" not in have]
    tok.model = models.Unigram(pieces, model["unk_id"], True)
    # Llama's decoder: ▁ → space, byte pieces → bytes → UTF-8, then drop the leading space.
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )


class SubwordTokenizer(Tokenizer):
    """A Hugging Face tokenizer with xmodal's BOS/EOS frame, padding and memo."""

    def __init__(self, tokenizer: HfTokenizer, specials: Mapping[str, str] | None = None):
        super().__init__()
        names = {"pad": PAD, "bos": BOS, "eos": EOS, "unk": UNK, **(specials or {})}
        missing = [n for n in names.values() if tokenizer.token_to_id(n) is None]
        if missing:
            tokenizer.add_special_tokens(missing)
        self.tokenizer = tokenizer
        self.specials = names
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (
            int(tokenizer.token_to_id(names[k])) for k in ("pad", "bos", "eos", "unk")
        )

    @classmethod
    def fit(
        cls,
        captions: Iterable[str],
        algorithm: str = "bpe",
        vocab_size: int = 1000,
        min_count: int = 2,
        lowercase: bool = True,
        path: str | None = None,
        pad_token: str = PAD,
        bos_token: str = BOS,
        eos_token: str = EOS,
        unk_token: str = UNK,
    ) -> SubwordTokenizer:
        """Train on ``captions`` (``algorithm``, ``vocab_size``, ``min_count``: merges/pieces seen
        fewer times are not learnt, ``lowercase``), or load ``path`` (a saved ``tokenizer.json``,
        used as it is: the training options do not apply). ``*_token`` name the specials."""
        specials = {"pad": pad_token, "bos": bos_token, "eos": eos_token, "unk": unk_token}
        if path is not None:
            return cls(_hf().Tokenizer.from_file(str(Path(path).expanduser())), specials)
        return cls(train_hf_tokenizer(captions, algorithm, vocab_size, min_count, lowercase), specials)

    @classmethod
    def problems(cls, options: Mapping[str, Any]) -> list[str]:
        out = []
        algorithm = options.get("algorithm", "bpe")
        if algorithm not in ALGORITHMS:
            out.append(f"algorithm: must be one of {ALGORITHMS} (got {algorithm!r})")
        size = options.get("vocab_size", 1000)
        smallest = MIN_VOCAB.get(algorithm, MIN_VOCAB["bpe"])
        if not _is_int(size) or size < smallest:
            out.append(f"vocab_size: must be an integer >= {smallest} for {algorithm} (got {size!r})")
        count = options.get("min_count", 2)
        if not _is_int(count) or count < 1:
            out.append(f"min_count: must be an integer >= 1 (got {count!r})")
        path = options.get("path")
        if path is not None:
            out += _file_problems(Path(str(path)).expanduser())
        return out

    def state(self) -> dict[str, Any]:
        return {
            TARGET: target_of(type(self)),
            "tokenizer_json": self.tokenizer.to_str(),
            "specials": self.specials,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SubwordTokenizer:
        return cls(_hf().Tokenizer.from_str(state["tokenizer_json"]), state.get("specials"))

    def __len__(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def token_ids_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One call for a batch's new captions (the memo holds the rest).
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode_tokens(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _file_problems(path: Path) -> list[str]:
    """Why ``path`` is not a readable tokenizer.json (checked without loading the library)."""
    if not path.is_file():
        return [f"path: no such tokenizer.json file (got {str(path)!r})"]
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [f"path: not a JSON file ({type(err).__name__}: {err}) (got {str(path)!r})"]
    if not isinstance(spec, dict) or "model" not in spec:
        return [f"path: not a Hugging Face tokenizer.json (no 'model' key) (got {str(path)!r})"]
    return []
