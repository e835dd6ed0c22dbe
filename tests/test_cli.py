"""xmodal-generate, xmodal-eval and the W&B logger, on a tiny trained checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli
from xmodal.config import compose_config
from xmodal.data.shapes import ShapesSpec, make_sample
from xmodal.tasks.caption.task import CaptionTask
from xmodal.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> tuple[Path, list[str]]:
    """A run trained for a few steps; returns its dir and the overrides that made it."""
    root = tmp_path_factory.mktemp("trained")
    overrides = [*TINY, f"paths.data_dir={data_dir}", f"paths.output_dir={root}", "logger=none", "run.id=t"]
    train(compose_config([*overrides, "trainer.max_steps=6", "trainer.val_check_interval=3"]))
    return root / "shapes_caption" / "t", overrides


def test_generate_prints_one_caption_per_image(trained, tmp_path):
    run_dir, _ = trained
    images = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        path.write_bytes(make_sample(ShapesSpec(), "test", i)["png"])
        images.append(str(path))
    result = run_cli(
        ["xmodal-generate", str(run_dir / "checkpoints" / "last.ckpt"), "--image", *images, "--json"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in rows] == images
    vocab = set(json.loads((run_dir / "tokenizer.json").read_text())["vocab"])
    for row in rows:
        assert row["caption"] and set(row["caption"].split()) <= vocab


def test_generate_names_a_missing_file(trained, tmp_path):
    run_dir, _ = trained
    result = run_cli(
        ["xmodal-generate", str(run_dir / "checkpoints" / "last.ckpt"), "--image", "nope.png"], tmp_path
    )
    assert result.returncode == 2 and "image not found: nope.png" in result.stderr


def test_eval_reproduces_the_test_metrics_of_training(trained, tmp_path):
    run_dir, overrides = trained
    best = run_dir / "checkpoints" / "best.ckpt"
    result = run_cli(["xmodal-eval", f"ckpt_path={best}", *overrides[:-2]], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test/bleu4" in result.stdout
    evaluated = json.loads(best.with_suffix(".eval.json").read_text())["test"]
    trained_test = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert evaluated["test/bleu4"] == pytest.approx(trained_test["test/bleu4"], abs=1e-6)
    assert evaluated["test/loss"] == pytest.approx(trained_test["test/loss"], rel=1e-5)


def test_eval_requires_a_checkpoint(tmp_path):
    result = run_cli(["xmodal-eval"], tmp_path)
    assert result.returncode != 0 and "ckpt_path" in (result.stdout + result.stderr)


def test_checkpoint_alone_rebuilds_the_captioner_and_its_tokenizer(trained):
    run_dir, _ = trained
    task = CaptionTask.load_from_checkpoint(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert task.tokenizer.vocab == json.loads((run_dir / "tokenizer.json").read_text())["vocab"]


def test_wandb_offline_one_run_per_job_finished_even_on_failure(tiny, tmp_path, monkeypatch):
    import wandb

    steps = ["trainer.max_steps=2", "trainer.val_check_interval=2", "test_after_fit=false"]
    train(compose_config([*tiny, "logger=wandb", *steps, "run.id=ok"]))
    run_dir = tmp_path / "outputs" / "shapes_caption" / "ok"
    wandb_id = (run_dir / "wandb_id.txt").read_text().strip()
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[-1] for p in offline_runs] == [wandb_id]
    assert list(offline_runs[0].glob(f"run-{wandb_id}.wandb"))
    assert list(offline_runs[0].glob("files/media/images/samples/val_*.png"))  # the sample grid
    assert list(offline_runs[0].glob("files/media/table/samples/table_*.table.json"))  # caption table
    assert wandb.run is None

    def explode(*args, **kwargs):
        raise RuntimeError("boom in training_step")

    monkeypatch.setattr(CaptionTask, "training_step", explode)
    with pytest.raises(RuntimeError, match="boom"):
        train(compose_config([*tiny, "logger=wandb", "trainer.max_steps=2", "run.id=bad"]))
    assert wandb.run is None  # finished despite the failure: the next job gets its own run
    assert len(list((tmp_path / "outputs" / "shapes_caption" / "bad" / "wandb").glob("offline-run-*"))) == 1


def test_generate_reads_a_folder_and_a_glob_and_prints_csv_and_the_python_api_agrees(trained, tmp_path):
    import csv
    import io

    import xmodal

    run_dir, _ = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, name in enumerate(["b.png", "a.png", "sub/c.png"]):
        (photos / name).write_bytes(make_sample(ShapesSpec(), "test", i)["png"])
    (photos / "notes.txt").write_text("not an image")  # ignored: not a file the image modality reads
    result = run_cli(["xmodal-generate", str(ckpt), "--image", str(photos), "--csv"], tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    files = [str(photos / n) for n in ("a.png", "b.png", "sub/c.png")]
    assert [r["image"] for r in rows] == files and all(r["caption"] for r in rows)

    globbed = run_cli(["xmodal-generate", str(ckpt), "--image", str(photos / "*.png"), "--json"], tmp_path)
    assert [json.loads(line)["image"] for line in globbed.stdout.splitlines()] == files[:2]

    model = xmodal.load(ckpt)
    assert model.caption(files) == [r["caption"] for r in rows]  # the CLI's captions, from Python
    with pytest.raises(ValueError, match="no modality reads .txt files"):
        model.caption(photos / "notes.txt")

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(["xmodal-generate", str(ckpt), "--image", str(empty)], tmp_path)
    assert result.returncode == 2 and f"{empty}: no image files" in result.stderr
    assert "Traceback" not in result.stderr
