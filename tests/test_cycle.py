"""The cycle score of text → image: generated images captioned by a captioner of the same data, CIDEr-D
against each row's captions (xmodal/metrics/cycle.py), and its config checks."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from tests.conftest import TINY
from xmodal.config import ConfigError, compose_config, validate
from xmodal.factory import build_datamodule, build_task, data_shape, prepare_data
from xmodal.metrics.caption import cider_d, corpus_bleu, metric_tokens
from xmodal.metrics.cycle import load_captioner
from xmodal.tasks.gan.task import AdversarialTask, row_noise

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "model.gan.cycle_captioner"


@pytest.fixture(scope="module")
def captioner_ckpt(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A tiny 32 px image → text captioner, 20 AdamW steps in-process (~1.7 s; val CIDEr-D 0.29 on
    real images when measured: one caption for every image, but the score is not 0), saved with its hyperparameters as ``xmodal-train`` saves them;
    and the data overrides it was built with."""
    data = [*TINY, f"paths.data_dir={data_dir}", "data.image_size=32"]
    cfg = compose_config([*data, "experiment=shapes_caption", "model.d_model=32"])
    datamodule = build_datamodule(cfg, prepare_data(cfg))
    L.seed_everything(0, verbose=False)
    task = build_task(cfg, datamodule.build_tokenizer())
    datamodule.setup("fit")
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3)
    steps = 0
    while steps < 20:
        for batch in datamodule.train_dataloader():
            loss = task.loss(task.on_after_batch_transfer(batch, 0))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == 20:
                break
    path = tmp_path_factory.mktemp("cycle") / "captioner.ckpt"
    hparams = {k: copy.deepcopy(v) for k, v in task.hparams.items()}
    torch.save(
        {
            "state_dict": task.state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return path, data


class CopyG(nn.Module):
    """A "generator" that draws the row's real image: its cycle score is the captioner's ceiling."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(1, 1)

    def forward(self, z: torch.Tensor, batch: dict) -> torch.Tensor:
        return batch["image"].float()  # [B, C, H, W] in [-1, 1]


def gan_config(data: list[str], *extra: str):
    return compose_config(
        [
            *data,
            "experiment=shapes_text2image_gan",
            "model.gan.feature_steps=10",
            "model.gan.judge_steps=0",
            "callbacks.monitor=val/fid",  # the experiment's monitor is the judge's
            "callbacks.monitor_mode=min",
            *extra,
        ]
    )


def cycle_by_hand(task: AdversarialTask, datamodule, captioner) -> tuple[list[str], list[list[str]]]:
    """The validation's images (noise keyed by sample) captioned greedily, with their rows' captions."""
    rows = []
    for batch in datamodule.val_dataloader():
        batch = task.on_after_batch_transfer(batch, 0)
        fake = task.generate(batch, row_noise(batch["__key__"], task.gan.z_dim))  # [B, C, H, W]
        captions = captioner.caption(fake, beam_size=1)
        for key, hyp, refs, keep in zip(
            batch["__key__"], captions, batch["captions"], batch["valid"].tolist(), strict=True
        ):
            if keep:
                rows.append((key, metric_tokens(hyp), [metric_tokens(r) for r in refs]))
    rows.sort()
    return [h for _, h, _ in rows], [r for _, _, r in rows]


def test_cycle_cider_is_the_cider_of_the_generated_images_captions(captioner_ckpt):
    path, data = captioner_ckpt
    cfg = gan_config(data, f"{KEY}={path}", "model.gan.aux_weight=0")  # the stand-in D has no class head
    validate(cfg)
    datamodule = build_datamodule(cfg, prepare_data(cfg))
    tokenizer = datamodule.build_tokenizer()
    model = OmegaConf.to_container(cfg.model, resolve=True)
    L.seed_everything(0, verbose=False)
    task = AdversarialTask(model, tokenizer.state(), data_shape(cfg), nets=(CopyG(), nn.Linear(1, 1)))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    logged = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    assert {"val/cycle_cider", "val/cycle_bleu4", "val/fid"} <= set(logged)
    assert 0.0 < logged["val/cycle_cider"] <= 10.0 and 0.0 < logged["val/cycle_bleu4"] <= 1.0
    assert logged["val/fid"] == pytest.approx(0.0, abs=1e-3)  # the copies are the real images
    # The captioner is no part of the generator: neither in its state_dict nor among its modules.
    assert not any("decoder" in k or "encoder" in k for k in task.state_dict())
    assert not any("CaptionTask" in type(m).__name__ for m in task.modules())

    hyps, refs = cycle_by_hand(task, datamodule, load_captioner(str(path)))
    assert len(hyps) == 48  # every val row
    assert logged["val/cycle_cider"] == pytest.approx(cider_d(hyps, refs), rel=1e-6)
    assert logged["val/cycle_bleu4"] == pytest.approx(corpus_bleu(hyps, refs), rel=1e-6)
    record = task.metric_provenance["val"]["cycle"]
    assert record["generated_samples"] == record["reference_samples"] == 48
    assert record["weights_file"] == str(path) and record["reference_split"] == "val"


def test_cycle_captioner_config_errors_name_the_key(captioner_ckpt, tmp_path):
    path, data = captioner_ckpt
    base = gan_config(data, f"{KEY}={path}")

    def problem(value: object, **data_or_model: object) -> str:
        cfg = copy.deepcopy(base)
        cfg.model.gan.cycle_captioner = str(value)
        for key, setting in data_or_model.items():
            OmegaConf.update(cfg, key.replace("__", "."), setting)
        with pytest.raises(ConfigError) as err:
            validate(cfg)
        (line,) = [x.strip() for x in str(err.value).splitlines() if x.strip().startswith(KEY)]
        return line

    missing = tmp_path / "nope.ckpt"
    assert problem(missing) == f"{KEY}: no such file (got {str(missing)!r})"
    gan = tmp_path / "gan.ckpt"
    torch.save({"hyper_parameters": {"model": {"task": "gan"}, "data": {}}}, gan)
    assert problem(gan) == (
        f"{KEY}: {gan} is a checkpoint of the gan task; the cycle score needs a captioner (model.task=caption)"
    )
    audio = tmp_path / "audio.ckpt"
    torch.save({"hyper_parameters": {"model": {"task": "caption", "source": "audio"}, "data": {}}}, audio)
    assert problem(audio) == f"{KEY}: {audio} captions audio, but the generator makes image"
    # The captioner was trained on 32 px images; a 64 px generator would hand it another size.
    assert problem(path, data__image_size=64) == (
        f"{KEY}: {path} reads image at image_size=32, the generator makes data.image_size=64"
    )
    assert problem(path, model__condition="none") == (
        f"{KEY}: scores samples against their condition: set model.condition (got {str(path)!r})"
    )


def test_a_text_to_image_vae_logs_the_cycle_score_of_its_conditional_samples(captioner_ckpt):
    path, data = captioner_ckpt
    cfg = compose_config(
        [*data, "experiment=shapes_text2image_vae", "model.vae.judge_steps=0", "model.vae.iwae_k=2"]
        + [f"model.vae.cycle_captioner={path}"]
    )
    validate(cfg)
    datamodule = build_datamodule(cfg, prepare_data(cfg))
    L.seed_everything(0, verbose=False)
    task = build_task(cfg, datamodule.build_tokenizer())
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    logged = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    assert not any("captioner" in k or "_cycle" in k for k in task.state_dict())
    captioner = load_captioner(str(path))
    rows = []
    for batch in datamodule.val_dataloader():
        batch = task.on_after_batch_transfer(batch, 0)
        captions = captioner.caption(task.conditional_samples(batch), beam_size=1)
        keep = batch["valid"].tolist()
        rows += [
            (key, metric_tokens(hyp), [metric_tokens(r) for r in refs])
            for key, hyp, refs, valid in zip(batch["__key__"], captions, batch["captions"], keep, strict=True)
            if valid
        ]
    rows.sort()
    hyps, refs = [h for _, h, _ in rows], [r for _, _, r in rows]
    assert len(hyps) == 48
    assert logged["val/cycle_cider"] == pytest.approx(cider_d(hyps, refs), rel=1e-6)
    assert task.metric_provenance["val"]["cycle"]["generated_samples"] == 48
