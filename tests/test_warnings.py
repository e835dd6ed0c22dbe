"""The known-noise filters: each known warning is triggered the way a run triggers it (a tiny real
fit, Lightning's srun check, its pytree copy) and none escapes, while an unrelated warning — even
one from the same Lightning module and category — still shows."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import _pytree
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.image.kid import KernelInceptionDistance

from xmodal.callbacks.last_checkpoint import LastCheckpoint
from xmodal.warnings_filter import TIP_LOGGERS, install_warning_filters, known_warnings, quiet_wandb_init


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch  # [2, 2]
        return self.net(x).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_like_xmodal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, filtered: bool
) -> tuple[list[str], list[str]]:
    """(warnings shown, log messages) of what a default run does that warns: 4 batches an epoch under
    log_every_n_steps=25, a checkpoint dir that is not empty, a CSV logger, LastCheckpoint, srun on
    PATH outside a SLURM job, Lightning's pytree flattening."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    for var in ("SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "old.ckpt").write_bytes(b"")  # a resumed run's dir is not empty
    logs = Records()
    loggers = [logging.getLogger(name) for name in (*TIP_LOGGERS, "lightning.pytorch")]
    # An earlier xmodal run in this process installed the tip filter on these loggers for good.
    filters = {logger: list(logger.filters) for logger in loggers}
    for logger in loggers:
        logger.addHandler(logs)
        logger.filters = []
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.resetwarnings()
            warnings.simplefilter("always")  # not just once per location: every occurrence counts
            if filtered:
                install_warning_filters()
            SLURMEnvironment._validate_srun_used()
            _pytree._tree_flatten(1)
            KernelInceptionDistance(feature=nn.Flatten(), subset_size=2)  # as the GAN metrics build it
            trainer = L.Trainer(
                max_steps=2,
                log_every_n_steps=25,
                logger=CSVLogger(tmp_path, name="", version=""),
                callbacks=[ModelCheckpoint(dirpath=ckpts), LastCheckpoint(ckpts / "last.ckpt")],
                enable_progress_bar=False,
                enable_model_summary=False,
                accelerator="cpu",
                default_root_dir=tmp_path,
            )
            data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)
            trainer.fit(Tiny(), train_dataloaders=data)
            # Unrelated: a plain warning, and one of Lightning's own category from a filtered module.
            warnings.warn("an unrelated warning", UserWarning, stacklevel=1)
            warnings.warn_explicit(
                "The number of validation batches is odd", PossibleUserWarning, "fit_loop.py", 1,
                module="lightning.pytorch.loops.fit_loop",
            )  # fmt: skip
    finally:
        for logger in loggers:
            logger.removeHandler(logs)
            logger.filters = filters[logger]
    assert (ckpts / "last.ckpt").is_file()
    return [str(w.message) for w in shown], logs.messages


TIP = r"💡 Tip: For seamless cloud logging"
NOT_SET = "`weights_only` was not set"


def test_known_warnings_are_filtered_and_an_unrelated_one_still_shows(tmp_path, monkeypatch):
    before, before_logs = run_like_xmodal(tmp_path / "before", monkeypatch, filtered=False)
    known = [k.message for k in known_warnings()]
    # Without the filters, each known warning and the tip do appear here (the test can fail). The
    # srun hint also comes from Trainer(), the pytree one from the fit: more than once each.
    counts = [sum(bool(re.match(k, m)) for m in before) for k in known]
    assert len(counts) == 5 and min(counts) >= 1, counts
    assert any(m.startswith(TIP) for m in before_logs)
    with monkeypatch.context() as patch:
        after, after_logs = run_like_xmodal(tmp_path / "after", patch, filtered=True)
    assert [m for m in after if any(re.match(k, m) for k in known)] == []
    assert "an unrelated warning" in after and "The number of validation batches is odd" in after
    assert not any(m.startswith(TIP) for m in after_logs)
    # Fixed at its source rather than filtered: LastCheckpoint says weights_only=False.
    assert not any(m.startswith(NOT_SET) for m in before_logs + after_logs)
    assert any("`Trainer.fit` stopped" in m for m in after_logs)  # other Lightning info still logged


def test_installing_twice_adds_each_filter_once():
    with warnings.catch_warnings():
        install_warning_filters()
        count = len(warnings.filters)
        install_warning_filters()
        assert len(warnings.filters) == count
    for name in TIP_LOGGERS:
        assert len(logging.getLogger(name).filters) == 1


def test_the_wandb_logger_no_longer_passes_the_anonymous_setting(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="p")
    assert "anonymous" in logger._wandb_init  # what wandb.init would be handed: it warns on any value
    quiet_wandb_init([logger, CSVLogger(tmp_path)])
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["project"] == "p"
