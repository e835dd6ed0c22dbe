"""What the console shows at the start of a run: the task's own config nodes (the full tree stays
in config_tree.log), a model table without an all-zero FLOPs column, and validation that fires
within short epochs."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.utilities.model_summary import summarize
from torch.utils.data import DataLoader, TensorDataset

from xmodal.callbacks.model_summary import ModelTable
from xmodal.callbacks.short_epochs import ShortEpochValidation, clamped_interval
from xmodal.config import compose_config
from xmodal.config.view import shown_config
from xmodal.console import print_config_tree


def test_a_captioner_shows_its_own_nodes_and_the_log_keeps_the_full_tree(tmp_path, capsys):
    cfg = compose_config([])
    shown = shown_config(cfg)
    assert "cluster" not in shown and set(shown) == set(cfg) - {"cluster"}
    # An image captioner: the audio and video modalities' keys are not its business, nor are the
    # moving_shapes clips' settings on shapes.
    assert set(cfg.data) - set(shown.data) == {
        "audio_mels",
        "audio_frames",
        "video_frames",
        "video_size",
        "moving_shapes",
    }
    assert shown.model == cfg.model and shown.trainer == cfg.trainer
    print_config_tree(cfg, save_to=tmp_path / "config_tree.log", shown=shown)
    printed, full = capsys.readouterr().out, (tmp_path / "config_tree.log").read_text()
    assert "cluster" not in printed and "audio_mels" not in printed and "image_size: 64" in printed
    assert "cluster" in full and "audio_mels" in full
    assert f"the full config: {tmp_path / 'config_tree.log'}" in printed


def test_other_tasks_and_own_data_hide_what_they_do_not_read():
    audio = shown_config(compose_config(["experiment=shapes_audio_caption"]))
    assert "audio_mels" in audio.data and not {"image_size", "image_fit", "image_channels"} & set(audio.data)
    pairs = shown_config(compose_config(["experiment=shapes_image2image"]))  # roles src, tgt: images
    assert "image_size" in pairs.data and "audio_mels" not in pairs.data
    own = shown_config(compose_config(["data.shards=/data/photos"]))
    assert "shapes" not in own.data and "name" not in own.data and own.data.shards == "/data/photos"


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 1)
        self.validated_at: list[int] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch  # [2, 2]
        return self.net(x).square().mean()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.validated_at.append(self.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_model_table_has_no_flops_column_when_nothing_was_counted(capsys):
    summary = summarize(Tiny())
    args = (summary.total_parameters, summary.trainable_parameters, summary.model_size)
    ModelTable.summarize(summary._get_summary_data(), *args, summary.total_training_modes, total_flops=0)
    out = capsys.readouterr().out
    assert "FLOPs" not in out and "Linear" in out and "Total params" in out
    ModelTable.summarize(summary._get_summary_data(), *args, summary.total_training_modes, total_flops=10)
    assert "Total FLOPs" in capsys.readouterr().out  # kept when something was counted


def fit(interval: int, callbacks: list, limit: int | None = None) -> list[int]:
    """Global steps at which validation ran: 4 training batches an epoch, 12 steps, as xmodal
    builds the trainer for an integer interval (check_val_every_n_epoch=None)."""
    model = Tiny()
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)  # 4 batches
    trainer = L.Trainer(
        max_steps=12, val_check_interval=interval, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        limit_train_batches=limit, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=data, val_dataloaders=data)
    return model.validated_at


def test_an_interval_longer_than_the_run_and_the_epoch_validates_at_every_epoch_end(caplog):
    assert fit(250, []) == []  # without it: 12 steps, and no validation at all
    with caplog.at_level(logging.INFO, logger="xmodal"):
        assert fit(250, [ShortEpochValidation()]) == [4, 8, 12]
    notes = [r.getMessage() for r in caplog.records if r.name == "xmodal"]
    assert notes == [
        "trainer.val_check_interval=250 is longer than this run (12 batches) and than an epoch "
        "(4 batches): validating every 4 batches instead"
    ]
    assert fit(250, [ShortEpochValidation()], limit=2) == [2, 4, 6, 8, 10, 12]  # the limited epoch
    # A run long enough for its interval keeps it, across epochs (Lightning counts all batches).
    assert fit(5, [ShortEpochValidation()]) == fit(5, []) == [5, 10]


def test_only_integer_intervals_longer_than_a_known_epoch_and_the_run_are_clamped():
    assert clamped_interval(250, 4, 12) == 4
    assert clamped_interval(250, 4, 2000) is None  # validates at step 250, 500, ... anyway
    assert clamped_interval(4, 4, 2) is None and clamped_interval(0.5, 4, 2) is None
    assert clamped_interval(250, float("inf"), 12) is None  # an epoch of unknown length
    # check_val_every_n_epoch (debug=overfit: 50 epochs of 1 batch in 200 steps), unless too long.
    assert clamped_interval(250, 1, 200, every_n_epochs=50) == 50
    assert clamped_interval(250, 4, 12, every_n_epochs=50) == 4


def test_the_factory_builds_the_trainer_with_both_callbacks(tmp_path):
    from lightning.pytorch.callbacks import ModelSummary

    from xmodal.factory import build_callbacks, build_trainer
    from xmodal.run import RunIdentity

    cfg = compose_config(["debug=overfit", "trainer.accelerator=cpu"])
    run = RunIdentity("r", tmp_path, True)
    callbacks, _ = build_callbacks(cfg, run, has_logger=False)
    trainer = build_trainer(cfg, run, [], callbacks)
    (short,) = [c for c in trainer.callbacks if isinstance(c, ShortEpochValidation)]
    assert short.every_n_epochs == 50  # debug=overfit's check_val_every_n_epoch
    assert [type(c) for c in trainer.callbacks if isinstance(c, ModelSummary)] == [ModelTable]
