"""The subword tokenizer, a saved tokenizer.json by path, the data.tokenizer node, and checkpoints."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from tests.conftest import TINY
from xmodal.config import ConfigError, compose_config, validate
from xmodal.factory import build_datamodule, build_task, prepare_data
from xmodal.tasks.caption.task import CaptionTask
from xmodal.tokenizers.build import fit_tokenizer, tokenizer_from_state
from xmodal.tokenizers.subword import SubwordTokenizer
from xmodal.tokenizers.word import WordTokenizer

SUBWORD = "xmodal.tokenizers.subword.SubwordTokenizer"
CAPTIONS = [
    "a red circle on the left",
    "a large blue square at the top",
    "左上角有一个小的红色圆形",
    "右边有一个大的蓝色正方形",
    "Ein Mädchen im Café",
] * 20


@pytest.mark.parametrize("algorithm", ["bpe", "unigram"])
def test_trained_subwords_round_trip_any_script_and_never_need_unk(algorithm):
    tok = fit_tokenizer({"_target_": SUBWORD, "algorithm": algorithm, "vocab_size": 300}, iter(CAPTIONS))
    assert isinstance(tok, SubwordTokenizer) and len(tok) > 256  # the bytes are always there
    if algorithm == "bpe":
        assert len(tok) <= 300  # Unigram keeps every character seen, so it may exceed vocab_size
    for text in ("左上角有一个小的红色圆形", "ein mädchen im café", "a red circle on the left"):
        ids = tok.encode(text, 64)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == text
    # Characters no caption had (an emoji, unseen Han and Latin): bytes, not <unk>.
    unseen = "🙂 漢字 xyzq"
    ids = tok.encode(unseen, 64)
    assert tok.unk_id not in ids and tok.decode(ids) == unseen
    assert tok.decode(tok.encode("Ein MÄDCHEN", 64)) == "ein mädchen"  # NFKC + lower-case
    batch, mask = tok.encode_batch(["a red circle", "左上角有一个小的红色圆形", "a red circle"], 64)
    assert batch.shape[0] == 3 and torch.equal(batch[0], batch[2]) and mask[:, 0].all()
    assert (batch[~mask] == tok.pad_id).all()


def test_subword_state_is_the_tokenizer_json_and_rebuilds_it():
    tok = fit_tokenizer({"_target_": SUBWORD, "vocab_size": 300}, iter(CAPTIONS))
    state = json.loads(json.dumps(tok.state()))
    assert json.loads(state["tokenizer_json"])["model"]["type"] == "BPE"
    again = tokenizer_from_state(state)
    assert isinstance(again, SubwordTokenizer) and len(again) == len(tok)
    for text in CAPTIONS[:5]:
        assert again.encode(text, 64) == tok.encode(text, 64)


def test_a_tokenizer_json_saved_by_the_tokenizers_library_loads_by_path(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    # A user's own tokenizer, with its own specials (BERT-style names) and no <bos>/<eos>.
    own = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    own.pre_tokenizer = pre_tokenizers.Whitespace()
    own.train_from_iterator(
        ["a red circle", "a blue square", "two red squares"],
        trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]"], show_progress=False),
    )
    path = tmp_path / "tokenizer.json"
    own.save(str(path))
    spec = {"_target_": SUBWORD, "path": str(path), "pad_token": "[PAD]", "unk_token": "[UNK]"}
    tok = fit_tokenizer(spec, iter(["ignored: a loaded tokenizer is used as it is"]))
    assert tok.pad_id == own.token_to_id("[PAD]") and tok.unk_id == own.token_to_id("[UNK]")
    assert {tok.bos_id, tok.eos_id} == {own.get_vocab_size(), own.get_vocab_size() + 1}  # added
    assert len(tok) == own.get_vocab_size() + 2
    ids = tok.encode("a red square", 16)
    assert ids[1:-1] == own.encode("a red square").ids
    assert tok.decode(ids) == own.decode(own.encode("a red square").ids)
    again = tokenizer_from_state(json.loads(json.dumps(tok.state())))
    assert again.encode("a red square", 16) == ids and again.bos_id == tok.bos_id


def problems_of(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides), cuda_available=False)
    return [line.strip() for line in str(err.value).splitlines()[1:]]


def test_a_bad_tokenizer_node_is_one_line_naming_the_key(tmp_path):
    lines = problems_of(["data.tokenizer._target_=no.such.Tokenizer"])
    assert len(lines) == 1 and lines[0].startswith(
        "data.tokenizer._target_: cannot import 'no.such.Tokenizer'"
    )
    lines = problems_of(["data.tokenizer._target_=xmodal.tokenizers.text.words"])
    assert len(lines) == 1 and "is not a tokenizer class" in lines[0]
    lines = problems_of(["+data.tokenizer.vocab_sise=10"])
    assert lines == [
        "data.tokenizer.vocab_sise: not an option of WordTokenizer.fit (options: max_fit_captions, min_count)"
    ]
    assert problems_of(["data.tokenizer.min_count=0"]) == [
        "data.tokenizer.min_count: must be an integer >= 1 (got 0)"
    ]
    assert problems_of(["data.tokenizer.max_fit_captions=0"]) == [
        "data.tokenizer.max_fit_captions: must be an integer >= 1 (got 0)"
    ]
    missing = tmp_path / "nope.json"
    lines = problems_of(["data/tokenizer=subword", f"data.tokenizer.path={missing}"])
    assert lines == [f"data.tokenizer.path: no such tokenizer.json file (got {str(missing)!r})"]
    lines = problems_of(["data/tokenizer=subword", "data.tokenizer.algorithm=wordpiece"])
    assert len(lines) == 1 and lines[0].startswith("data.tokenizer.algorithm: must be one of")
    validate(compose_config(["data/tokenizer=subword"]), cuda_available=False)  # the shipped option is sound


def test_the_loader_tokenizes_with_the_configured_subword_tokenizer(data_dir):
    cfg = compose_config(
        [*TINY, f"paths.data_dir={data_dir}", "data/tokenizer=subword", "data.tokenizer.vocab_size=300"]
    )
    datamodule = build_datamodule(cfg, prepare_data(cfg))
    datamodule.setup("fit")
    tok = datamodule.tokenizer
    assert isinstance(tok, SubwordTokenizer)
    batch = next(iter(datamodule.val_dataloader()))
    ids, mask = batch["text"], batch["text_mask"]  # [B, T] each
    assert (ids[:, 0] == tok.bos_id).all() and ids.max() < len(tok)
    first = ids[0][mask[0]].tolist()
    assert tok.decode(first) == " ".join(batch["captions"][0][0].split())


def checkpoint(path, task: L.LightningModule, hparams: dict) -> None:
    """A checkpoint as Lightning writes it (the keys load_from_checkpoint reads)."""
    torch.save(
        {
            "state_dict": task.state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )


def test_checkpoints_rebuild_any_tokenizer_and_old_vocab_checkpoints_still_load(tmp_path):
    cfg = compose_config(["model.d_model=32", "model.encoder_channels=[8,16]", "model.decoder_layers=1"])
    subword = fit_tokenizer({"_target_": SUBWORD, "vocab_size": 300}, iter(CAPTIONS))
    task = build_task(cfg, subword)
    checkpoint(tmp_path / "new.ckpt", task, dict(task.hparams))
    loaded = CaptionTask.load_from_checkpoint(tmp_path / "new.ckpt", map_location="cpu", weights_only=False)
    assert isinstance(loaded.tokenizer, SubwordTokenizer) and len(loaded.tokenizer) == len(subword)
    assert loaded.tokenizer.encode("右边有一个大的蓝色正方形", 32) == subword.encode(
        "右边有一个大的蓝色正方形", 32
    )

    # Written before tokenizer plug-ins: hparams hold a bare word vocabulary under "vocab".
    word = WordTokenizer.fit(CAPTIONS)
    old = build_task(cfg, word)
    hparams = {"model": old.hparams["model"], "vocab": list(word.vocab), "data": old.hparams["data"]}
    checkpoint(tmp_path / "old.ckpt", old, hparams)
    loaded = CaptionTask.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu", weights_only=False)
    assert isinstance(loaded.tokenizer, WordTokenizer) and loaded.tokenizer.vocab == word.vocab
    for name, tensor in old.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.hparams["tokenizer"] == word.state() and "vocab" not in loaded.hparams  # saved anew
