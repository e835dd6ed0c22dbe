"""Unicode word segmentation shared by the word tokenizer and the caption metrics.

One function decides what a "word" is, so the vocabulary the word tokenizer learns and the
n-grams BLEU/CIDEr/ROUGE count are the same units in every language:

- NFKC, then casefold: full-width forms, ligatures and composed/decomposed accents compare equal
  (``ＡＢＣ`` → ``abc``, ``e`` + U+0301 → ``é``), and case does not split a word;
- words are runs of letters and digits (``\\w`` without ``_``), with combining marks kept inside a
  word (Devanagari vowel signs are marks, not letters) and one ``'s``-style suffix (``there's``);
  punctuation separates words and is dropped, as before;
- Han, Hiragana, Katakana and Hangul characters are words by themselves: these scripts write no
  spaces between words, so character level is the unit sacrebleu's ``zh`` tokenizer (and most
  Chinese captioning work) scores at.

On ASCII text this is exactly the former ``[a-z0-9]+(?:'[a-z]+)?`` of the lower-cased text
(tests/test_tokenizer_unicode.py checks it on random ASCII strings), so English figures hold.
"""

from __future__ import annotations

import re
import unicodedata
from functools import cache

# Blocks whose characters are words by themselves (code point ranges, inclusive).
CJK_RANGES: tuple[tuple[int, int], ...] = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x2E80, 0x2FDF),  # CJK radicals supplement, Kangxi radicals
    (0x3005, 0x3007),  # 々 〆 〇 (iteration mark, ideographic closing mark, ideographic zero)
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana
    (0x3130, 0x318F),  # Hangul compatibility Jamo
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK unified ideographs extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xA960, 0xA97F),  # Hangul Jamo extended A
    (0xAC00, 0xD7FF),  # Hangul syllables, Jamo extended B
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # half-width Katakana (NFKC widens them; kept for un-normalised input)
    (0x20000, 0x2FA1F),  # CJK extensions B–F, compatibility supplement
    (0x30000, 0x323AF),  # CJK extensions G, H
)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})  # typographic ’ reads as '
# ASCII text (most English captions) takes this pattern: the same words, 4× faster than NFKC,
# casefold and the Unicode classes (tests/test_tokenizer_unicode.py checks they agree).
_ASCII_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _char_class(ranges: list[tuple[int, int]]) -> str:
    return "".join(
        re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges
    )


@cache
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """(one CJK character, a word, the CJK test of a whole token); built once, on first use
    (scanning the Unicode table for combining marks takes ~25 ms)."""
    marks: list[tuple[int, int]] = []
    for code in range(0x0300, 0x20000):
        if unicodedata.category(chr(code)) in ("Mn", "Mc", "Me"):
            if marks and marks[-1][1] == code - 1:
                marks[-1] = (marks[-1][0], code)
            else:
                marks.append((code, code))
    cjk = f"[{_char_class(list(CJK_RANGES))}]"
    # A letter or digit (not "_"), then letters, digits or marks; one apostrophe suffix of letters.
    word = rf"[^\W_](?:[^\W_]|[{_char_class(marks)}])*(?:'[^\W\d_]+)?"
    return re.compile(cjk), re.compile(word), re.compile(f"{cjk}+")


def normalize_text(text: str) -> str:
    """NFKC and casefold: the form every tokenizer and metric compares."""
    return unicodedata.normalize("NFKC", text).casefold().translate(_APOSTROPHES)


def words(text: str) -> list[str]:
    """The words of ``text`` (module docstring): ``"Ein Mädchen im Café!"`` → ``["ein", "mädchen",
    "im", "café"]``; ``"一只红色的圆形"`` → ``["一", "只", "红", "色", "的", "圆", "形"]``."""
    if text.isascii():
        return _ASCII_WORD.findall(text.lower())
    cjk, word, _ = _patterns()
    # Spaces around each CJK character make it a word of its own (it is \\w, so the word pattern
    # would otherwise take a whole unspaced run as one word).
    return word.findall(cjk.sub(r" \g<0> ", normalize_text(text)))


def is_cjk(token: str) -> bool:
    """Whether a token is made of CJK characters only (written without spaces around it)."""
    return bool(token) and _patterns()[2].fullmatch(token) is not None


def join_words(tokens: list[str]) -> str:
    """Words back to text: spaces between words, none between two CJK ones (``["一", "个", "red",
    "圆", "形"]`` reads ``一个 red 圆形``, not ``一 个 red 圆 形``)."""
    out: list[str] = []
    previous_cjk = False
    for token in tokens:
        cjk = is_cjk(token)
        if out and not (cjk and previous_cjk):
            out.append(" ")
        out.append(token)
        previous_cjk = cjk
    return "".join(out)
