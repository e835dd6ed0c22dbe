"""What a user sees: progress lines in redirected output, curves in plots/, progress toward max_steps."""

from __future__ import annotations

import re
from types import SimpleNamespace

from PIL import Image

from tests.conftest import run_cli
from xmodal.callbacks.progress import StepCounter, format_duration


def test_redirected_output_shows_progress_toward_max_steps_and_the_run_dir_has_curves(tiny, tmp_path):
    """Output to a pipe (as under nohup, tee or SLURM): plain lines naming step/max_steps, no bar."""
    args = [
        "xmodal-train",
        *tiny,
        "logger=csv",
        "run.id=p",
        "trainer.max_steps=12",
        "trainer.val_check_interval=6",
        "trainer.log_every_n_steps=2",
        "callbacks.progress_interval_s=0.001",  # a line at every step of this short run
    ]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if re.search(r"step \d+/12\b", line)]
    assert len(lines) >= 3, result.stdout[-3000:]
    assert any(
        re.search(r"step 12/12 \(100%\) · [\d.]+ steps/s · ETA \S+ · train/loss", line) for line in lines
    )
    assert any(
        re.search(r"validating: batch \d+/\d+ \(at step \d+/12\)", line)
        for line in result.stdout.splitlines()
    )
    assert "\r" not in result.stdout  # no redrawn bar in a file
    run_dir = tmp_path / "outputs" / "shapes_caption" / "p"
    assert "step 12/12" in (run_dir / "train.log").read_text()
    curves = run_dir / "plots" / "curves.png"
    with Image.open(curves) as image:
        assert image.format == "PNG" and image.width > image.height > 100  # three panels side by side
    steps = [
        int(line.split('"step": ')[1].split("}")[0].split(",")[0])
        for line in (run_dir / "plots" / "train.jsonl").read_text().splitlines()
    ]
    assert steps == [2, 4, 6, 8, 10, 12]


def test_steps_count_in_the_users_units_when_lightning_counts_more():
    """A GAN's trainer.max_steps counts optimizer steps (two per iteration): progress shows iterations."""
    counter = StepCounter(max_steps=100)
    trainer = SimpleNamespace(max_steps=200, global_step=50)
    assert counter.done(trainer) == 25 and counter.label(trainer) == "25/100"
    assert counter.eta(trainer) == "?"  # no rate before this process has trained a step
    assert [format_duration(s) for s in (4.4, 92, 3 * 3600 + 60)] == ["4s", "1m32s", "3h01m"]
