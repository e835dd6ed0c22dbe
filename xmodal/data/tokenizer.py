"""Former home of the word tokenizer, kept so existing imports work: tokenizers live in
xmodal/tokenizers/ (the protocol, the Unicode word tokenizer, the subword tokenizer)."""

from xmodal.tokenizers.base import MEMO_SIZE
from xmodal.tokenizers.text import words as normalize
from xmodal.tokenizers.word import BOS, EOS, PAD, SPECIALS, UNK, WordTokenizer

__all__ = ["BOS", "EOS", "MEMO_SIZE", "PAD", "SPECIALS", "UNK", "WordTokenizer", "normalize"]
