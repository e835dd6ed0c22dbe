"""The Unicode word tokenizer and the caption metrics in any script; the bounded fit and its warning."""

from __future__ import annotations

import json
import random
import re
import warnings

import pytest

from xmodal.data.datamodule import fit_captions
from xmodal.data.shapes import ShapesSpec, make_sample
from xmodal.data.shards import write_sizes, write_tar_shard
from xmodal.data.splits import SplitSettings, resolve_splits
from xmodal.metrics.caption import caption_scores, corpus_bleu, metric_tokens
from xmodal.tokenizers.build import EmptyCaptionWarning, fit_tokenizer, tokenizer_from_state
from xmodal.tokenizers.text import join_words, words
from xmodal.tokenizers.word import WordTokenizer

# The word pattern before Unicode support: English figures depend on ASCII text splitting as it did.
_OLD_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def test_ascii_text_splits_exactly_as_the_former_ascii_tokenizer():
    rng = random.Random(0)
    alphabet = "abcXYZ09 '_-.,!?\"\t\n()&;:/" + "aeiou" * 3
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    spec = ShapesSpec()
    texts += [c for i in range(20) for c in json.loads(make_sample(spec, "train", i)["json"])["captions"]]
    texts += ["There's a RED-circle", "rock'n'roll it's 'quoted' a'1 x_y", "A red Circle."]
    for text in texts:
        assert words(text) == _OLD_WORD.findall(text.lower()), text
        # ASCII takes a fast path: the Unicode path must agree with it (one non-ASCII space added).
        assert words(text + "\u00a0") == _OLD_WORD.findall(text.lower()), text


def test_accented_latin_round_trips_and_normalises():
    tok = WordTokenizer.fit(["Ein Mädchen im Café"])
    assert tok.decode(tok.encode("Ein Mädchen im Café", 16)) == "ein mädchen im café"
    assert "<unk>" not in tok.decode(tok.encode("EIN MÄDCHEN IM CAFÉ", 16))  # casefold
    decomposed = "Cafe\u0301"  # e + combining acute: NFKC composes it
    assert words(decomposed) == ["café"]
    assert words("ＡＢＣ１２３ Straße") == ["abc123", "strasse"]  # full width (NFKC), casefold
    assert words("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs are marks, kept inside the word
    assert words("there’s") == ["there's"]  # typographic apostrophe


def test_cjk_scripts_split_per_character_and_read_back_without_spaces():
    assert words("一只红色的圆形") == list("一只红色的圆形")
    assert words("ひらがなカタカナ") == list("ひらがなカタカナ")
    assert words("빨간 원") == ["빨", "간", "원"]
    assert words("一个red圆形, 2个") == ["一", "个", "red", "圆", "形", "2", "个"]
    assert join_words(["一", "个", "red", "圆", "形"]) == "一个 red 圆形"
    tok = WordTokenizer.fit(["一只红色的圆形", "两个蓝色的正方形"])
    ids = tok.encode("一只红色的圆形", 32)
    assert len(ids) == 2 + 7 and tok.unk_id not in ids
    assert tok.decode(ids) == "一只红色的圆形"


def test_a_perfect_chinese_caption_scores_one_and_accented_latin_too():
    refs = [["一只红色的圆形", "一个红色圆形"], ["左边有一个蓝色的正方形"]]
    hyps = ["一只红色的圆形", "左边有一个蓝色的正方形"]
    # The failure this fixes: unspaced Chinese is one "word", so BLEU-4 had no 4-gram at all.
    assert corpus_bleu(hyps, refs) == 0.0
    scores = caption_scores([metric_tokens(h) for h in hyps], [[metric_tokens(r) for r in rs] for rs in refs])
    assert scores["bleu4"] == pytest.approx(1.0) and scores["rougeL"] == pytest.approx(1.0)
    assert scores["cider"] > 0
    wrong = caption_scores([metric_tokens("一只蓝色的三角形")], [[metric_tokens("一只红色的圆形")]])
    assert wrong["bleu4"] < 0.5  # characters are compared, not just counted
    latin = caption_scores([metric_tokens("Ein Mädchen im Café.")], [[metric_tokens("ein mädchen im café")]])
    assert latin["bleu4"] == pytest.approx(1.0)
    assert metric_tokens("A red Circle.") == "a red circle"  # English as before


def test_word_state_is_json_and_rebuilds_the_same_tokenizer():
    tok = WordTokenizer.fit(["一只红色的圆形", "a red circle"], min_count=1)
    state = json.loads(json.dumps(tok.state()))
    again = tokenizer_from_state(state)
    assert isinstance(again, WordTokenizer) and again.vocab == tok.vocab
    assert tokenizer_from_state({"vocab": tok.vocab}).vocab == tok.vocab  # run dirs before plug-ins


def test_captions_that_tokenize_to_nothing_are_named_once_at_fit_time():
    captions = ["a red circle", "🙂🙂", "!!!", "a blue square", "🙂🙂", "...", "---"]
    with pytest.warns(EmptyCaptionWarning) as caught:
        fit_tokenizer(None, iter(captions))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "5 of 7 training captions" in message
    assert "'🙂🙂', '!!!', '...'" in message and "'---'" not in message  # up to 3 examples
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_tokenizer(None, iter(["a red circle"]))  # nothing to say


def test_the_fit_reads_at_most_max_fit_captions():
    read = 0

    def captions():
        nonlocal read
        for i in range(10_000):
            read += 1
            yield f"caption {i}"

    tok = fit_tokenizer({"max_fit_captions": 50}, captions())
    assert read <= 51 and len(tok) == 4 + 1 + 50  # "caption" and 50 numbers


def test_fit_captions_spread_the_bound_over_every_train_shard(tmp_path):
    (tmp_path / "train").mkdir()
    sizes = {}
    for shard in range(3):
        rows = [{"__key__": f"s{shard}-{i:03d}", "txt": f"shard{shard} {i}".encode()} for i in range(20)]
        sizes[f"shard-{shard}.tar"] = write_tar_shard(tmp_path / "train" / f"shard-{shard}.tar", rows)
    write_sizes(tmp_path, {"splits": {"train": sizes}})
    data = resolve_splits(tmp_path, SplitSettings(val_fraction=0, test_fraction=0))  # train only
    taken = list(fit_captions(data, limit=9))
    assert [c.split()[0] for c in taken] == ["shard0"] * 3 + ["shard1"] * 3 + ["shard2"] * 3
    assert len(list(fit_captions(data, limit=1000))) == 60  # a small dataset is read whole
    # A carved train split gives only its own keys' captions: no val/test caption in the vocabulary.
    carved = resolve_splits(tmp_path, SplitSettings(val_fraction=0.3, test_fraction=0.2))
    kept_keys = set(fit_captions(carved, limit=1000))  # captions are unique per key here
    assert len(kept_keys) == carved.size("train") < 60
