from xmodal.data.tokenizer import SPECIALS, WordTokenizer, normalize


def test_vocabulary_is_deterministic_and_frequency_ordered():
    texts = ["a red circle", "a blue circle", "A red square!"]
    tok = WordTokenizer.fit(texts)
    assert tok.vocab[: len(SPECIALS)] == list(SPECIALS)
    assert tok.vocab[len(SPECIALS) :] == ["a", "circle", "red", "blue", "square"]
    assert WordTokenizer.fit(reversed(texts)).vocab == tok.vocab


def test_encode_decode_round_trip_unknown_words_and_truncation():
    tok = WordTokenizer.fit(["a red circle"])
    ids = tok.encode("A red Circle.", max_len=16)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "a red circle"
    assert tok.decode(tok.encode("a green circle", 16)) == "a <unk> circle"
    assert len(tok.encode("a red circle a red circle", max_len=5)) == 5
    batch, mask = tok.encode_batch(["a", "a red circle"], 16)
    assert batch.shape == (2, 5) and mask.sum().item() == 3 + 5
    assert normalize("There's a RED-circle") == ["there's", "a", "red", "circle"]


def test_min_count_maps_rare_words_to_unk():
    tok = WordTokenizer.fit(["a red circle", "a blue circle"], min_count=2)
    assert "red" not in tok.vocab and tok.decode(tok.encode("a red circle", 8)) == "a <unk> circle"
