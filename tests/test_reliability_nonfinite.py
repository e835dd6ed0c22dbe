"""Non-finite steps are skipped and counted; too many in a row stop the run (exit 4); no checkpoint
ever holds a non-finite tensor or a diverged state; stops by signal exit 3 (issue 16)."""

from __future__ import annotations

import re

import pytest
import torch

from tests.conftest import run_cli
from xmodal.callbacks.nonfinite import NonFiniteStop
from xmodal.config import compose_config
from xmodal.run import RUN_ID_ENV
from xmodal.tasks.base import XmodalTask
from xmodal.train import train

# Small and quick: no sanity validation, one validation batch, no sample grids.
STEPS = ["logger=none", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "test_after_fit=false",
         "trainer.num_sanity_val_steps=0", "callbacks.num_samples=0"]  # fmt: skip
SMALL_CAPTIONER = ["model.d_model=32", "model.encoder_channels=[16,32]", "model.decoder_layers=1"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", RUN_ID_ENV):
        monkeypatch.delenv(var, raising=False)


def test_a_diverging_captioner_stops_with_exit_4_and_saves_no_checkpoint(tiny, tmp_path):
    # Measured on main: val loss NaN from step 3, exit 0, all 68 tensors of best/last.ckpt NaN.
    args = [
        *tiny,
        *STEPS,
        *SMALL_CAPTIONER,
        "trainer.max_steps=12",
        "model.lr=1e6",
        "run.max_nonfinite_steps=3",
        "run.id=nan",
    ]
    result = run_cli(["xmodal-train", *args], tmp_path)
    assert result.returncode == 4, result.stderr[-3000:]
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "training diverged: 3 steps in a row were not finite (the last: step 3: loss = nan)" in line
    assert "Traceback" not in result.stderr
    assert "optimizer step skipped (1 in a row" in result.stdout + result.stderr
    # What is left, and how to go on: the run's own end-of-run note.
    run_dir = tmp_path / "outputs" / "shapes_caption" / "nan"
    note = rf"run nan ended at step \d+ without finishing; run dir: {re.escape(str(run_dir))}; no checkpoint written yet; "
    assert re.search(note + r"rerun to start again: cd .* && xmodal-train .* run\.id=nan\n", result.stdout)
    # After the first (finite) step every weight is ~1e6 but finite: a state that must not be kept.
    ckpts = tmp_path / "outputs" / "shapes_caption" / "nan" / "checkpoints"
    assert not list(ckpts.glob("*.ckpt")), sorted(p.name for p in ckpts.iterdir())


def test_a_vae_with_a_nan_loss_skips_then_stops(tiny, tmp_path, monkeypatch):
    from xmodal.tasks.vae.task import VaeTask

    elbo = VaeTask.elbo_terms

    def nan_recon(self, batch, *a, **kw):
        terms = elbo(self, batch, *a, **kw)
        if self.training:
            terms["recon"] = terms["recon"] * float("nan")
        return terms

    monkeypatch.setattr(VaeTask, "elbo_terms", nan_recon)
    args = [*tiny, *STEPS, "experiment=shapes_vae", "trainer.max_steps=8", "run.max_nonfinite_steps=4"]
    with pytest.raises(NonFiniteStop, match=r"4 steps in a row .* step 3: loss = nan"):
        train(compose_config([*args, "run.id=v"]))
    # Measured on main: best.ckpt written with 26 of 27 tensors NaN and best_score inf.
    assert not list((tmp_path / "outputs" / "shapes_vae" / "v").glob("checkpoints/*.ckpt"))


class Tiny(XmodalTask):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped_and_recorded():
    task = Tiny()
    optimizer = torch.optim.AdamW(task.parameters(), lr=0.1)
    loss = task.finite_or_skip(task.w.sum())
    assert loss is not None and task.nonfinite is None  # the loss itself is finite
    task.w.grad = torch.tensor([1.0, float("inf"), 0.0])
    task.on_before_optimizer_step(optimizer)
    optimizer.step()
    assert torch.equal(task.w.detach(), torch.ones(3))  # no update, no weight decay
    assert task.nonfinite is not None and task.nonfinite.what == "gradient norm"
    assert task.finite_or_skip(torch.tensor(float("nan"))) is None
