"""Pretrained Hugging Face encoders from a directory on disk (xmodal/nn/pretrained.py).

Tiny ViT / CLIP-vision / BERT models are built from a config with random weights and saved with
``save_pretrained`` (BERT with a WordPiece tokenizer.json trained here); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader, Dataset

from tests.conftest import fit_gan, tiny_gan_model
from xmodal.config import compose_config
from xmodal.config.schema import ConfigError
from xmodal.config.validate import validate
from xmodal.data.tokenizer import WordTokenizer
from xmodal.factory import build_task
from xmodal.nn.pretrained import HFImageEncoder, HFTextCondition, layer_stack, load_backbone
from xmodal.tokenizers.subword import SubwordTokenizer

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

ENCODER = "xmodal.nn.pretrained.HFImageEncoder"
TEXT = "xmodal.nn.pretrained.HFTextCondition"
CAPTIONS = ["a red circle", "a blue circle", "a red square", "a blue square"]
BERT_SPECIALS = {"pad_token": "[PAD]", "bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]"}


VIT_WEIGHTS: dict[str, torch.Tensor] = {}
"""The saved ViT's own weights, as it held them when ``save_pretrained`` wrote them."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories written by ``save_pretrained``: a 2-layer ViT with a preprocessor config, a
    1-layer CLIP vision model without one, a 1-layer BERT with its tokenizer.json."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import (
        BertConfig,
        BertModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        PreTrainedTokenizerFast,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    tiny = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    vit = ViTModel(ViTConfig(num_hidden_layers=2, image_size=32, patch_size=8, **tiny))
    vit.save_pretrained(root / "vit")
    VIT_WEIGHTS.update({k: v.clone() for k, v in vit.state_dict().items()})
    # google/vit-* processors: mean = std = 0.5, so model units are our [-1, 1] pixels.
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(root / "vit")
    CLIPVisionModel(
        CLIPVisionConfig(num_hidden_layers=1, image_size=16, patch_size=8, **tiny)
    ).save_pretrained(root / "clip")
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece.train_from_iterator(
        CAPTIONS, trainers.WordPieceTrainer(vocab_size=40, special_tokens=specials, show_progress=False)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece, mask_token="[MASK]", cls_token="[CLS]", sep_token="[SEP]",
        pad_token="[PAD]", unk_token="[UNK]",
    )  # fmt: skip
    bert = BertModel(
        BertConfig(
            vocab_size=wordpiece.get_vocab_size(), num_hidden_layers=1, max_position_embeddings=16, **tiny
        )
    )
    bert.save_pretrained(root / "bert")
    fast.save_pretrained(root / "bert")
    (root / "empty").mkdir()
    return {name: root / name for name in ("vit", "clip", "bert", "empty")}


def test_loading_gives_the_saved_weights_and_maps_our_pixels_to_the_model_s(saved):
    encoder = HFImageEncoder(str(saved["vit"]), d_model=24)
    loaded = encoder.backbone.state_dict()
    assert set(loaded) == set(VIT_WEIGHTS) and len(loaded) == 40
    assert all(torch.equal(loaded[k], VIT_WEIGHTS[k]) for k in loaded)
    assert encoder.normalization == "preprocessor_config.json" and encoder.image_size == 32
    images = torch.rand(2, 3, 32, 32) * 2 - 1  # [B, C, H, W] in [-1, 1]
    assert torch.allclose(encoder.pixel_values(images), images, atol=1e-6)  # mean = std = 0.5
    assert encoder(images).shape == (2, 17, 24)  # 16 patches + CLS → d_model
    # No preprocessor config: CLIP's statistics; grey is repeated to RGB and 32 px shrunk to 16.
    clip = HFImageEncoder(str(saved["clip"]), d_model=8)
    assert clip.normalization == "CLIP defaults" and clip.image_size == 16
    grey = torch.zeros(1, 1, 32, 32)  # mid grey
    expected = ((0.5 - clip.mean.flatten()) / clip.std.flatten()).tolist()
    assert clip.pixel_values(grey)[0, :, 5, 5].tolist() == pytest.approx(expected, abs=1e-6)
    assert clip(grey).shape == (1, 5, 8)
    assert not clip.trains_backbone and not any(p.requires_grad for p in clip.backbone.parameters())


class Captioned(Dataset):
    """Uint8 images whose colour says the caption (red / blue), as the loaders' batches hold them."""

    def __init__(self, tokenizer: object, n: int = 16):
        self.ids, self.mask = tokenizer.encode_batch([CAPTIONS[i % 2] for i in range(n)], 8)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        colour = [220, 30, 30] if i % 2 == 0 else [30, 30, 220]
        image = torch.tensor(colour, dtype=torch.uint8)[:, None, None].expand(3, 32, 32).clone()
        return {"image": image, "text": self.ids[i], "text_mask": self.mask[i], "valid": torch.tensor(True)}


@pytest.fixture(scope="module")
def caption_cfg() -> DictConfig:
    """A tiny captioner's config, composed once (each test sets its own ``model.encoder``)."""
    return compose_config(["model.d_model=16", "model.heads=2", "model.decoder_layers=1"])


def with_values(cfg: DictConfig, values: dict[str, object]) -> DictConfig:
    """A copy of ``cfg`` with dotted keys set (cheaper than composing again)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def fit_captioner(
    caption_cfg: DictConfig, encoder: dict, steps: int = 3
) -> tuple[object, L.Trainer, dict[str, torch.Tensor]]:
    """A captioner with ``model.encoder`` = ``encoder`` trained ``steps`` steps in-process; also
    returns its weights before training."""
    slot = {"_target_": ENCODER, "d_model": "${model.d_model}", **encoder}
    cfg = with_values(caption_cfg, {"model.encoder": slot})
    validate(cfg, cuda_available=False)
    L.seed_everything(0, verbose=False)
    tokenizer = WordTokenizer.fit(CAPTIONS)
    task = build_task(cfg, tokenizer)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(task, DataLoader(Captioned(tokenizer), batch_size=8))
    return task, trainer, before


def changed(task: torch.nn.Module, before: dict[str, torch.Tensor], prefix: str) -> set[str]:
    return {k for k, v in task.state_dict().items() if k.startswith(prefix) and not torch.equal(v, before[k])}


def test_a_frozen_encoder_is_out_of_the_optimizer_unchanged_and_in_eval_while_the_rest_trains(
    saved, caption_cfg
):
    task, trainer, before = fit_captioner(caption_cfg, {"path": str(saved["vit"])})
    backbone = task.encoder.backbone
    assert task.global_step == 3 and task.training and not backbone.training  # train() kept it in eval
    frozen = {id(p) for p in backbone.parameters()}
    (optimizer,) = trainer.optimizers
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not frozen & in_optimizer and not frozen & {id(p) for p in optimizer.state}
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert changed(task, before, "encoder.backbone.") == set()
    # The head on top and the decoder did train.
    assert {"encoder.proj.weight", "encoder.norm.weight"} <= changed(task, before, "encoder.")
    assert "decoder.embed.weight" in changed(task, before, "decoder.")


def test_fine_tuning_moves_the_backbone_and_last_n_layers_only_those(saved, caption_cfg):
    task, _, before = fit_captioner(caption_cfg, {"path": str(saved["vit"]), "freeze": False}, steps=2)
    moved = changed(task, before, "encoder.backbone.")
    # Every weight the tokens depend on moved; the unused pooler head was frozen at build.
    never_read = {k for k in before if k.startswith("encoder.backbone.pooler.")}
    assert moved == {k for k in before if k.startswith("encoder.backbone.")} - never_read
    assert never_read and task.encoder.backbone.training
    task, _, before = fit_captioner(
        caption_cfg, {"path": str(saved["vit"]), "train_last_n_layers": 1}, steps=2
    )
    backbone = task.encoder.backbone
    stack = layer_stack(backbone)  # ViT's 2 blocks (named `layers` by transformers 5, `encoder.layer` by 4)
    last = {id(p) for p in [*stack[1].parameters(), *backbone.layernorm.parameters()]}
    names = {f"encoder.backbone.{n}" for n, p in backbone.named_parameters() if id(p) in last}
    assert (
        len(stack) == 2 and changed(task, before, "encoder.backbone.") == names
    )  # the last block + final norm
    assert stack[1].training and not stack[0].training and not backbone.embeddings.training


class CaptionedColours(Dataset):
    """Red or blue images captioned by BERT's own ids (xmodal's tokenizer on its tokenizer.json)."""

    def __init__(self, tokenizer: SubwordTokenizer, n: int = 32):
        self.ids, self.mask = tokenizer.encode_batch([CAPTIONS[i % 4] for i in range(n)], 8)  # [B, T]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        colour = [220, 30, 30] if "red" in CAPTIONS[i % 4] else [30, 30, 220]
        image = torch.tensor(colour, dtype=torch.uint8)[:, None, None].expand(3, 32, 32).clone()
        return {"image": image, "text": self.ids[i], "text_mask": self.mask[i], "valid": torch.tensor(True)}


def test_a_conditional_gan_trains_with_a_frozen_bert_through_cross_attention(saved):
    from xmodal.tasks.gan.task import AdversarialTask

    vocab = SubwordTokenizer.fit([], path=str(saved["bert"] / "tokenizer.json"), **BERT_SPECIALS)
    assert len(vocab) == transformers.AutoConfig.from_pretrained(saved["bert"]).vocab_size  # nothing added
    model = tiny_gan_model(g_width=8, d_width=8, mismatch_weight=1.0)
    model.update(condition="text", fusion="cross_attention", cond_dim=16, d_model=16, heads=2)
    model["condition_encoder"] = {"_target_": TEXT, "path": str(saved["bert"]), "cond_dim": 16}
    data = {"image_size": 32, "image_channels": 3, "audio_mels": 16, "audio_frames": 16, "max_text_len": 8}
    L.seed_everything(0, verbose=False)
    task = AdversarialTask(model, vocab.state(), data)
    encoders = [task.generator.cond, task.discriminator.cond]
    assert all(isinstance(e, HFTextCondition) for e in encoders) and encoders[0] is not encoders[1]
    before = {k: v.clone() for k, v in task.state_dict().items()}
    loader = DataLoader(
        CaptionedColours(vocab), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    trainer = fit_gan(task, loader, 2)
    assert task.iteration == 2 and task.skipped_steps == 0
    assert not any(m.backbone.training for m in encoders)
    assert changed(task, before, "generator.cond.backbone.") == set()
    assert changed(task, before, "discriminator.cond.backbone.") == set()
    assert {"generator.cond.proj.weight", "discriminator.cond.proj.weight"} <= changed(task, before, "")
    frozen = {id(p) for e in encoders for p in e.backbone.parameters()}
    assert not frozen & {id(p) for opt in trainer.optimizers for p in opt.state}  # no Adam moments
    held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
    assert not frozen & held  # and not in G's or D's optimizer at all
    # Cross-attention reads BERT's per-token features: the caption changes the image.
    ids, mask = vocab.encode_batch(["a red circle"] * 2 + ["a blue square"] * 2, 8)
    encoded = encoders[0].encode({"text": ids, "text_mask": mask})
    assert encoded.tokens.shape == (4, ids.shape[1], 16) and torch.equal(encoded.mask, mask)
    z = torch.randn(2, 8, generator=torch.Generator().manual_seed(1)).repeat(2, 1)
    with torch.no_grad():
        out = task.generator.eval()(z, {"text": ids, "text_mask": mask})  # [4, 3, 32, 32]
    assert (out[:2] - out[2:]).abs().mean() > 1e-5  # 9e-5: the attention blocks start at zero


def problems_of(cfg: DictConfig, values: dict[str, object] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        validate(with_values(cfg, values or {}), cuda_available=False)
    return [line.strip() for line in str(err.value).splitlines()[1:]]


def test_a_bad_weights_dir_or_a_foreign_tokenizer_is_one_line_naming_the_key(saved, caption_cfg, tmp_path):
    vit = compose_config(
        ["+model/encoder=hf_vision", f"model.encoder.path={saved['vit']}"]
    )  # the shipped node
    validate(vit, cuda_available=False)
    assert problems_of(vit, {"model.encoder.path": None}) == [
        "model.encoder.path: must name a directory written by save_pretrained (got None)"
    ]
    gone = tmp_path / "nowhere"
    assert problems_of(vit, {"model.encoder.path": str(gone)}) == [
        "model.encoder.path: no such directory (save a model there with save_pretrained; nothing is "
        f"downloaded) (got '{gone}')"
    ]
    assert problems_of(vit, {"model.encoder.path": str(saved["empty"])}) == [
        f"model.encoder.path: has no config.json (not a directory written by save_pretrained) (got '{saved['empty']}')"
    ]
    assert problems_of(vit, {"model.encoder.path": str(saved["bert"])}) == [
        f"model.encoder.path: holds a text model, HFImageEncoder needs a vision one (got '{saved['bert']}')"
    ]
    assert problems_of(vit, {"model.encoder.train_last_n_layers": 3}) == [
        "model.encoder.train_last_n_layers: the model has 2 layers (got 3)"
    ]
    assert problems_of(vit, {"model.encoder.pooling": "mean"}) == [
        "model.encoder.pooling: not an option of HFImageEncoder "
        "(options: path, d_model, freeze, train_last_n_layers, image_size)"
    ]
    # A Hub name is not a directory: refused, never looked up.
    with pytest.raises(FileNotFoundError, match="bert-base-uncased: no such directory"):
        load_backbone("bert-base-uncased", "text")
    gan = compose_config(
        [
            "experiment=shapes_text2image_gan",
            f"paths.data_dir={tmp_path}",
            "+model/condition_encoder=hf_text",
            f"model.condition_encoder.path={saved['bert']}",
            "data/tokenizer=hf_bert",
            "data.max_text_len=16",
        ]
    )
    validate(gan, cuda_available=False)  # the shipped nodes, as documented, pass
    vocab_file = saved["bert"] / "tokenizer.json"
    assert OmegaConf.select(gan, "data.tokenizer.path") == str(vocab_file)
    word = {"_target_": "xmodal.tokenizers.word.WordTokenizer", "max_fit_captions": 10, "min_count": 1}
    assert problems_of(gan, {"data.tokenizer": word}) == [
        "data.tokenizer: must load model.condition_encoder's own tokenizer "
        f"'{vocab_file}' so the caption ids are the model's: data/tokenizer=hf_bert "
        "(got {'_target_': 'xmodal.tokenizers.word.WordTokenizer', 'path': None})"
    ]
    assert problems_of(gan, {"data.tokenizer.pad_token": "<pad>"}) == [
        f"data.tokenizer.pad_token: not a token of '{vocab_file}', so its id would be past the "
        "model's vocabulary (the model's: '[PAD]') (got '<pad>')"
    ]
    assert problems_of(gan, {"data.max_text_len": 32}) == [
        "data.max_text_len: model.condition_encoder reads at most 16 tokens (max_position_embeddings) (got 32)"
    ]
