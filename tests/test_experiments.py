"""Every shipped experiment (conf/experiment/*.yaml) trains, validates and tests one batch under
debug=fdr, with the step count its task says one step is."""

from __future__ import annotations

import json

import pytest

from xmodal.config import CONFIG_DIR, compose_config
from xmodal.tasks.config import task_config
from xmodal.train import train

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_with_fast_dev_run(experiment, tiny, tmp_path):
    cfg = compose_config([*tiny, f"experiment={experiment}", "debug=fdr"])
    # The FID features' classifier (and the GAN's judge): 20 steps, not the experiments' 1,000.
    short = {
        "gan": ["model.gan.feature_steps=20", "model.gan.judge_steps=20"],
        "translation": ["model.feature_steps=20"],
        "vae": ["model.vae.judge_steps=20"],
    }.get(cfg.model.task)
    if short:
        cfg = compose_config([*tiny, f"experiment={experiment}", "debug=fdr", *short])
    metrics = train(cfg)
    monitor = cfg.callbacks.monitor  # the metric that selects best.ckpt, e.g. val/bleu4
    assert monitor.startswith("val/")
    assert {monitor, monitor.replace("val/", "test/", 1)} <= set(metrics)
    run_dir = next((tmp_path / "outputs" / cfg.experiment_name).iterdir())
    # One batch: Lightning counts optimizer steps (a GAN's n_critic D steps + 1 G step, a
    # translator's D + G), which is what the task's own step accounting says one step is.
    steps = task_config(cfg).lightning_max_steps(1)
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == steps
