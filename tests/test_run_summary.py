"""The end-of-run summary: summary.json's key set, the next commands, the stop's resume hint.

The summary of a real run is checked where a run already happens (tests/test_train.py: a finished
run with test metrics; tests/test_reliability_resume.py: a run stopped by SIGTERM); here, the
summary of hand-made outcomes, so every field's rule is pinned without training anything.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from omegaconf import OmegaConf

from xmodal.config import compose_config
from xmodal.summary import (
    COMMAND_KEYS,
    SUMMARY_KEYS,
    RunOutcome,
    build_summary,
    generate_args,
    summary_text,
    write_summary,
)
from xmodal.tasks.config import task_config


def outcome(run_dir: Path, **changes) -> RunOutcome:
    fields = dict(
        run_id="r1",
        run_dir=run_dir,
        wall_time_s=83.26,
        steps=60,
        max_steps=60,
        global_step=60,
        monitor="val/cider",
        best_score=1.25,
        best_checkpoint=str(run_dir / "checkpoints" / "best.ckpt"),
        test={"test/cider": 1.5, "test/loss": 0.75},
        skipped={"train": {"a.tar": 2, "b.tar": 1}},
        argv=["logger=csv", "data.shards=my data", "trainer.max_steps=60", "run.id=r1"],
        cwd="/home/u/proj",
        generate_args="--image FILES_OR_FOLDER",
    )
    return RunOutcome(**{**fields, **changes})


def test_a_finished_run_summary_has_the_fixed_keys_and_the_next_commands(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    summary = build_summary(outcome(tmp_path))
    assert tuple(summary) == SUMMARY_KEYS and tuple(summary["commands"]) == COMMAND_KEYS
    best = str(tmp_path / "checkpoints" / "best.ckpt")
    assert summary["status"] == "finished" and summary["stop_reason"] is None
    assert summary["last_checkpoint"] == str(tmp_path / "checkpoints" / "last.ckpt")
    assert summary["skipped_samples"] == {"train": 3}
    assert summary["wall_time_s"] == 83.3
    # The eval command gets the training command's data overrides (quoted), nothing else.
    assert summary["commands"] == {
        "eval": f"cd /home/u/proj && xmodal-eval ckpt_path={best} 'data.shards=my data'",
        "generate": f"xmodal-generate {best} --image FILES_OR_FOLDER",
        "resume": None,  # nothing to resume: it finished
        "wandb_sync": None,  # no offline W&B run in the run dir
    }
    text = summary_text(summary)
    assert text.splitlines()[:7] == [
        "run r1 finished after 1m23s, step 60/60",
        f"  run dir:          {tmp_path}",
        f"  best checkpoint:  {best} (val/cider 1.25)",
        f"  last checkpoint:  {tmp_path / 'checkpoints' / 'last.ckpt'}",
        "  test:             test/cider 1.5  test/loss 0.75",
        "  skipped samples:  train 3",
        "next:",
    ]
    assert f"  evaluate:       {summary['commands']['eval']}" in text.splitlines()
    assert "resume" not in text


def test_a_stopped_run_summary_says_the_signal_and_the_resume_command(tmp_path):
    (tmp_path / "wandb" / "offline-run-20240101_000000-r1").mkdir(parents=True)
    summary = build_summary(
        outcome(tmp_path, stop_reason="SIGTERM", test=None, steps=6, global_step=6, skipped={})
    )
    assert summary["status"] == "stopped" and summary["stop_reason"] == "SIGTERM"
    assert summary["last_checkpoint"] is None and summary["test"] is None and summary["skipped_samples"] == {}
    # The old run.id= is replaced by the run's own id, and the command runs where it ran.
    assert summary["commands"]["resume"] == (
        "cd /home/u/proj && xmodal-train logger=csv 'data.shards=my data' trainer.max_steps=60 run.id=r1"
    )
    offline = tmp_path / "wandb" / "offline-run-20240101_000000-r1"
    assert summary["commands"]["wandb_sync"] == f"wandb sync {offline}"
    lines = summary_text(summary).splitlines()
    assert lines[0] == "run r1 stopped by SIGTERM after 1m23s, step 6/60"
    assert "  skipped samples:  none" in lines and not any(line.startswith("  test:") for line in lines)
    assert lines[lines.index("next:") + 1] == f"  resume:         {summary['commands']['resume']}"
    # Each command parses back as one shell line.
    assert all(shlex.split(c) for c in summary["commands"].values())


def test_no_best_checkpoint_means_no_eval_or_generate_command(tmp_path):
    summary = build_summary(outcome(tmp_path, best_checkpoint=None, best_score=None))
    assert summary["commands"]["eval"] is None and summary["commands"]["generate"] is None
    assert "  best checkpoint:  none saved" in summary_text(summary).splitlines()


def test_summary_files_hold_the_json_and_the_printed_text(tmp_path):
    summary = build_summary(outcome(tmp_path))
    text = write_summary(tmp_path, summary)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert list(json.loads((tmp_path / "summary.json").read_text())) == list(SUMMARY_KEYS)  # in order
    assert (tmp_path / "summary.txt").read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "summary.txt"]  # no partials


def test_generate_flags_follow_the_tasks_source_or_condition(tmp_path):
    def flags(*overrides: str) -> str:
        cfg = compose_config(list(overrides))
        return generate_args(task_config(cfg), OmegaConf.to_container(cfg.data.roles), tmp_path)

    assert flags() == "--image FILES_OR_FOLDER"  # a captioner reads images
    assert flags("experiment=shapes_audio_caption") == "--audio FILES_OR_FOLDER"
    assert flags("experiment=shapes_image2image") == "--image FILES_OR_FOLDER"  # role src: an image
    assert flags("experiment=shapes_text2image_gan") == f"--caption CAPTION --num 8 --out {tmp_path}"
    assert flags("experiment=shapes_gan") == f"--num 8 --out {tmp_path}"  # unconditional
