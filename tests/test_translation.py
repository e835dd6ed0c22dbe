"""Image → image translation: paired shapes data, learning, logged metrics, samples, 2-rank DDP,
``debug=fdr``, ``xmodal-generate --image``, non-finite steps and config errors."""

from __future__ import annotations

import csv
import io
import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tests.conftest import TINY, run_cli
from xmodal.config import ConfigError, compose_config, validate
from xmodal.data.shapes import ShapesSpec, make_sample
from xmodal.data.shapes_pairs import ShapesPairsSpec, make_pair, synth_pairs
from xmodal.data.tokenizer import SPECIALS
from xmodal.factory import build_datamodule, build_task, prepare_data
from xmodal.images import to_pixels
from xmodal.tasks.translation.task import TranslationTask
from xmodal.train import train

SMALL = [
    "experiment=shapes_image2image",
    "model.g_width=8",
    "model.d_width=8",
    "model.g_lr=1e-2",  # 24 iterations must show learning (the experiment: 1e-3)...
    "model.g_residual=false",  # ...from scratch (a residual G starts as the identity)
    "model.feature_steps=20",
    "trainer.enable_progress_bar=false",
]
ITERATIONS = 24
VAL_KEYS = {"l1", "psnr", "ssim", "fid", "kid", "sample_spread", "sample_pixel_spread", "sample_roughness"}
TRAIN_KEYS = {
    "train/d_loss",
    "train/d_real",
    "train/d_fake",
    "train/d_grad_norm",
    "train/g_adv",
    "train/g_grad_norm",
    "train/g_loss",
    "train/l1",
    "train/skipped_steps",
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These small convs run several times faster on one thread on a shared, loaded machine
    (two threads spin-wait for each other); DDP's CPU ranks already get one each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def feature_cache(tmp_path_factory):
    """FID classifiers are cached per test session, not in the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XMODAL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "xmodal-cache"))
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, one_thread, feature_cache):
    """One short run: ITERATIONS batches of 16, validated at the middle and the end, then tested."""
    out = tmp_path_factory.mktemp("i2i")
    overrides = [*TINY, *SMALL, f"paths.data_dir={data_dir}", f"paths.output_dir={out}"]
    overrides += ["logger=csv", "trainer.log_every_n_steps=1", "run.id=r"]
    steps = [f"trainer.max_steps={ITERATIONS}", f"trainer.val_check_interval={ITERATIONS // 2}"]
    train(compose_config([*overrides, *steps]))
    return overrides, out / "shapes_image2image" / "r"


def one_pixel_image(value: list[float]) -> torch.Tensor:
    return torch.tensor(value).view(1, 3, 1, 1)


def test_pairs_are_the_shapes_scene_filled_and_outlined():
    spec = ShapesPairsSpec(ShapesSpec(n_train=4, n_val=1, n_test=1, image_size=32))
    pair, shapes = make_pair(spec, "train", 3), make_sample(spec.shapes, "train", 3)
    assert pair["tgt.png"] == shapes["png"] and pair["txt"] == shapes["txt"]  # the shapes sample
    assert json.loads(pair["json"])["label"] == json.loads(shapes["json"])["label"]
    src, tgt = (
        np.asarray(Image.open(io.BytesIO(pair[m])).convert("RGB")).astype(int) for m in ("src.png", "tgt.png")
    )
    shape = tgt.max(axis=2) > 95  # [H, W] the scene's shape pixels
    assert (src[~shape] == tgt[~shape]).all()  # the background is the target's, pixel for pixel
    kept = (src == tgt).all(axis=2) & shape  # the outline
    emptied = shape & ~kept
    assert kept.sum() >= 8 and emptied.sum() >= 1  # outlines drawn, interiors emptied...
    assert src[emptied].max() < 60  # ...to the dark background


def test_pairs_cache_refuses_a_directory_of_another_spec(tmp_path):
    small = ShapesPairsSpec(ShapesSpec(n_train=2, n_val=1, n_test=1, image_size=32, samples_per_shard=2))
    out = synth_pairs(tmp_path / "pairs", small, progress=False)
    assert synth_pairs(out, small, progress=False) == out  # a cache hit
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes["splits"] == {
        "train": {"shard-000000.tar": 2},
        "val": {"shard-000000.tar": 1},
        "test": {"shard-000000.tar": 1},
    }
    other = ShapesPairsSpec(ShapesSpec(n_train=3, n_val=1, n_test=1, image_size=32, samples_per_shard=2))
    with pytest.raises(ValueError, match="another spec"):
        synth_pairs(out, other, progress=False)


def test_it_learns_on_tiny_data_and_logs_exactly_its_metrics(trained):
    overrides, run_dir = trained
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["global_step"] == ITERATIONS * 2  # a D and a G step per iteration
    assert set(summary["val"]) == {f"val/{k}" for k in VAL_KEYS}
    assert set(summary["test"]) == {f"test/{k}" for k in VAL_KEYS}
    assert all(math.isfinite(v) for v in [*summary["val"].values(), *summary["test"].values()])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [ITERATIONS, ITERATIONS * 2]
    assert {k for k in rows[0] if k.startswith("val/")} == {f"val/{k}" for k in VAL_KEYS}
    with open(run_dir / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert {c for c in columns if c.startswith("train/")} == TRAIN_KEYS

    # Step 0: the same initial weights (same seed), validated untrained.
    cfg = compose_config(overrides)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg, prepare_data(cfg))
    task = TranslationTask.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    datamodule.tokenizer = task.tokenizer
    L.seed_everything(cfg.seed, workers=True)
    untrained = build_task(cfg, task.tokenizer)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    before = trainer.validate(untrained, datamodule=datamodule, verbose=False)[0]
    after = summary["val"]
    # Measured (24 iterations, batch 16): L1 0.45 → 0.063, SSIM 0.06 → 0.64, PSNR 6.3 → 18.4 dB.
    assert after["val/l1"] < 0.5 * before["val/l1"]
    assert after["val/ssim"] > before["val/ssim"] + 0.2
    assert after["val/psnr"] > before["val/psnr"] + 3.0
    # The last checkpoint gives the final validation again (nothing random in G or the metrics).
    again = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    assert again["val/l1"] == pytest.approx(after["val/l1"], rel=1e-5)

    with Image.open(run_dir / "samples" / "translation_latest.png") as grid:
        assert grid.size == (3 * (2 * 32 + 2) + 2, 4 * (2 * 32 + 2) + 2)  # source | translated | target × 4
    table = (run_dir / "samples" / f"table_step{ITERATIONS:07d}.md").read_text()
    assert "| key | caption |" in table and "val-0000000" in table


def test_generate_writes_the_translation_of_an_image_at_the_model_size(trained, tmp_path, capsys):
    from xmodal.generate import main

    _, run_dir = trained
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    spec = ShapesPairsSpec(ShapesSpec(image_size=64))  # a larger input: resized to the model's 32 px
    src = tmp_path / "outline.png"
    src.write_bytes(make_pair(spec, "test", 0)["src.png"])
    capsys.readouterr()
    assert main([str(ckpt), "--image", str(src), "--out", str(tmp_path / "out")]) == 0
    written = tmp_path / "out" / "sample_0000.png"
    assert str(written) in capsys.readouterr().out
    with Image.open(written) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
        pixels = np.asarray(image)
    # It is the model's translation of that file, as the task computes it.
    from xmodal.tasks.generation import role_inputs

    task = TranslationTask.load_from_checkpoint(ckpt, weights_only=False).eval()
    expected = to_pixels(task.translate(role_inputs(task, "src", [str(src)])["src"]))[0]
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 1

    assert main([str(ckpt), "--caption", "a red circle", "--out", str(tmp_path / "bad")]) == 2
    assert "--caption does not apply" in capsys.readouterr().err
    assert main([str(ckpt), "--out", str(tmp_path / "bad")]) == 2
    assert "give --image FILE" in capsys.readouterr().err


def test_ddp_two_cpu_ranks_end_identical_and_score_like_one_rank(data_dir, tmp_path):
    args = [*TINY, *SMALL, f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path}"]
    args += ["data.shapes.n_val=47", "data.shapes.n_test=45"]  # a padding row on one rank
    args += ["trainer=ddp_cpu", "trainer.max_steps=4", "trainer.val_check_interval=2", "logger=none"]
    args += ["callbacks.rank_checksums=true", "run.id=ddp"]
    result = run_cli(["xmodal-train", *args], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "shapes_image2image" / "ddp"
    ranks = [json.loads((run_dir / "checksums" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["global_step"] == ranks[1]["global_step"] == 8
    assert ranks[0]["end"] == ranks[1]["end"] != ranks[0]["start"]  # G and D, bit for bit
    two_ranks = json.loads((run_dir / "metrics.json").read_text())["val"]

    cfg = compose_config([a for a in args if not a.startswith(("trainer=", "run.id"))])
    task = TranslationTask.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    datamodule = build_datamodule(cfg, prepare_data(cfg), tokenizer=task.tokenizer)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    one_rank = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    for key in ("val/l1", "val/psnr", "val/ssim", "val/fid"):
        assert one_rank[key] == pytest.approx(two_ranks[key], rel=1e-4), key


def test_fast_dev_run_of_the_experiment(tiny):
    metrics = train(compose_config([*tiny, *SMALL, "debug=fdr"]))
    assert {f"test/{k}" for k in VAL_KEYS} <= set(metrics)


class Pairs(Dataset):
    """Random 8 px pairs; row ``nan_at`` has a NaN source, so G's output, D's logits and both
    steps' gradients are NaN (a NaN target alone would not do: ``abs``'s gradient at NaN is 0)."""

    def __init__(self, n: int, nan_at: int):
        gen = torch.Generator().manual_seed(0)
        self.src, self.tgt = (
            torch.rand(n, 3, 8, 8, generator=gen) * 2 - 1,
            torch.rand(n, 3, 8, 8, generator=gen) * 2 - 1,
        )
        self.src[nan_at] = float("nan")

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"src": self.src[i], "tgt": self.tgt[i], "valid": torch.tensor(True)}


def test_a_residual_unet_starts_as_the_identity_and_a_plain_one_does_not():
    from xmodal.nn.unet import UNetGenerator

    source = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(0)
    assert torch.equal(UNetGenerator(3, 3, width=4, depth=2, residual=True)(source), source)
    assert not torch.allclose(UNetGenerator(3, 3, width=4, depth=2)(source), source, atol=0.1)
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        UNetGenerator(1, 3, residual=True)


def test_non_finite_steps_are_skipped_counted_and_not_applied():
    model = dict(
        compose_config(["experiment=shapes_image2image", "model.g_width=4", "model.d_width=4"]).model
    )
    model.update(g_depth=1, d_layers=1, fid=False)
    data = {"image_size": 8, "image_channels": 3, "audio_mels": 8, "audio_frames": 8, "max_text_len": 8}
    task = TranslationTask(model, list(SPECIALS), data)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,  # one iteration: a D step and a G step on the batch holding the NaN
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(task, DataLoader(Pairs(8, nan_at=3), batch_size=8))
    assert task.skipped_steps == 2 and task.iteration == 1 and trainer.global_step == 2
    after = task.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # neither G nor D moved


@pytest.mark.parametrize(
    ("override", "line"),
    [
        (
            "model.source=sketch",
            "model.source: must name an image role of the data (data.roles has src, tgt) (got 'sketch')",
        ),
        ("model.l1_weight=-1", "model.l1_weight: must be >= 0 (got -1.0)"),
        ("model.loss=wgan", "model.loss: must be one of ('lsgan', 'ns', 'hinge', 'none') (got 'wgan')"),
        ("callbacks.monitor=val/bleu4", "callbacks.monitor: the translation task logs"),
    ],
)
def test_a_bad_config_is_one_line_naming_the_key(override, line):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["experiment=shapes_image2image", override]))
    key = line.split(":")[0]
    lines = [x.strip() for x in str(err.value).splitlines() if x.strip().startswith(f"{key}:")]
    assert len(lines) == 1 and lines[0].startswith(line)
