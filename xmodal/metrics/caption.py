"""Corpus caption metrics on pre-tokenised text: BLEU-1..4, CIDEr-D and ROUGE-L.

Own implementations, pure Python, because the usual ones each have a trap (generative-tasks.md):

- BLEU follows **sacrebleu**'s corpus BLEU with its default ``exp`` smoothing (``tokenize="none"``,
  ``max_ngram_order=n``; reported in [0, 1] rather than sacrebleu's [0, 100]): clipped n-gram
  counts summed over the corpus, closest reference length (ties → shorter), and an order with no
  match gets precision ``1 / (2^k · total)``. torchmetrics' BLEU returns 0 as soon as one order has
  no match, even with ``smooth=True``.
- CIDEr-D and ROUGE-L follow **pycocoevalcap** 1.2 (``Cider``, ``Rouge``) exactly: CIDEr-D with
  σ = 6, clipped tf-idf vectors, ×10, IDF from the evaluated references — so it is a corpus
  metric and must be computed once over the whole split (one image alone scores 0).

Inputs are whitespace-tokenised strings: ``hypotheses[i]`` and its references ``references[i]``;
:func:`metric_tokens` makes them from raw text in any language, consistently: words as the word
tokenizer sees them (NFKC, casefold, punctuation dropped) and Han, Kana and Hangul one character
per token, as sacrebleu's ``zh`` tokenizer splits Chinese (xmodal/tokenizers/text.py). So a
caption in any script is scored on the same units whatever tokenizer the model used, and a perfect
Chinese caption scores 1.0, not 0 (a whole unspaced sentence would otherwise be one "word").
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence

from xmodal.tokenizers.text import words

NGram = tuple[str, ...]


def metric_tokens(text: str) -> str:
    """Raw caption text → the whitespace-tokenised string the metrics score
    (``"一只红色的圆形"`` → ``"一 只 红 色 的 圆 形"``; ``"A red Circle."`` → ``"a red circle"``)."""
    return " ".join(words(text))


def ngrams(words: Sequence[str], n: int) -> Counter[NGram]:
    """Counts of all 1..n-grams of ``words``."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], order: int = 4) -> float:
    """sacrebleu-compatible corpus BLEU-``order`` in [0, 1] (exp smoothing, no effective order)."""
    correct, total = [0] * order, [0] * order
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references, strict=True):
        words = hyp.split()
        ref_words = [r.split() for r in refs]
        hyp_len += len(words)
        # Closest reference length; ties go to the shorter one (sacrebleu and NLTK agree).
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1] if ref_words else 0
        hyp_counts = ngrams(words, order)
        max_ref: Counter[NGram] = Counter()
        for r in ref_words:
            max_ref |= ngrams(r, order)  # element-wise max: the clip count per n-gram
        for gram, count in hyp_counts.items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(order):
            total[k] += max(len(words) - k, 0)
    if hyp_len == 0:
        return 0.0
    log_precision = 0.0
    smooth = 1.0
    for k in range(order):
        if total[k] == 0:  # hypotheses too short for this order: sacrebleu scores the corpus 0
            return 0.0
        if correct[k] == 0:
            smooth *= 2
            log_precision += math.log(1.0 / (smooth * total[k]))
        else:
            log_precision += math.log(correct[k] / total[k])
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision / order)


def _tfidf(
    counts: Counter[NGram], doc_freq: dict[NGram, float], log_docs: float, n: int
) -> tuple[list[dict[NGram, float]], list[float], int]:
    """pycocoevalcap ``counts2vec``: per-order tf-idf vectors, their norms, and the bigram count."""
    vec: list[dict[NGram, float]] = [defaultdict(float) for _ in range(n)]
    norm = [0.0] * n
    length = 0
    for gram, tf in counts.items():
        k = len(gram) - 1
        vec[k][gram] = float(tf) * (log_docs - math.log(max(1.0, doc_freq.get(gram, 0.0))))
        norm[k] += vec[k][gram] ** 2
        if k == 1:
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def cider_d(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> float:
    """Corpus CIDEr-D as pycocoevalcap's ``Cider().compute_score`` (mean over samples, ×10)."""
    if not hypotheses:
        return 0.0
    ref_counts = [[ngrams(r.split(), n) for r in refs] for refs in references]
    doc_freq: dict[NGram, float] = defaultdict(float)
    for counts in ref_counts:  # document frequency: in how many samples' references an n-gram occurs
        for gram in set(g for c in counts for g in c):
            doc_freq[gram] += 1
    log_docs = math.log(float(len(references)))
    total = 0.0
    for hyp, refs in zip(hypotheses, ref_counts, strict=True):
        vec, norm, length = _tfidf(ngrams(hyp.split(), n), doc_freq, log_docs, n)
        score = [0.0] * n
        for ref in refs:
            rvec, rnorm, rlength = _tfidf(ref, doc_freq, log_docs, n)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, rvec[k].get(g, 0.0)) * rvec[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and rnorm[k] != 0:
                    val /= norm[k] * rnorm[k]
                score[k] += val * penalty
        total += sum(score) / n / max(len(refs), 1) * 10.0
    return total / len(hypotheses)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """Mean sentence ROUGE-L F-score as pycocoevalcap's ``Rouge`` (best precision and recall over refs)."""
    if not hypotheses:
        return 0.0
    total = 0.0
    for hyp, refs in zip(hypotheses, references, strict=True):
        words = hyp.split()
        precisions, recalls = [], []
        for ref in refs:
            ref_words = ref.split()
            lcs = _lcs(ref_words, words)
            precisions.append(lcs / len(words) if words else 0.0)
            recalls.append(lcs / len(ref_words) if ref_words else 0.0)
        p, r = max(precisions, default=0.0), max(recalls, default=0.0)
        if p != 0 and r != 0:
            total += ((1 + beta**2) * p * r) / (r + beta**2 * p)
    return total / len(hypotheses)


def caption_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Every caption metric of one split: ``bleu1``..``bleu4``, ``cider`` (CIDEr-D), ``rougeL``."""
    scores = {f"bleu{k}": corpus_bleu(hypotheses, references, k) for k in range(1, 5)}
    scores["cider"] = cider_d(hypotheses, references)
    scores["rougeL"] = rouge_l(hypotheses, references)
    return scores


def caption_spread(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Distinct generated captions and distinct first references of a split: how much the captions
    vary with the input (the collapse check of xmodal/metrics/collapse.py reads both)."""
    return {
        "distinct_captions": float(len(set(hypotheses))),
        "distinct_references": float(len({refs[0] for refs in references if refs})),
    }
