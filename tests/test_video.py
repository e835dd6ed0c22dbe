"""Video (issue 17): PyAV/Pillow decoding of real files, bad members as counted skips, the moving
shapes data, video → text and text → video learning in-process, GIF samples, and one 2-rank DDP
run of the video captioner through the CLI."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY, make_tar, run_cli
from xmodal.codecs.video import ENCODER_OPTIONS, decode_video, encode_video, frame_indices
from xmodal.config import compose_config
from xmodal.data.epoch_plan import Topology
from xmodal.data.moving_shapes import (
    MOTIONS,
    MovingShapesSpec,
    make_clip_sample,
    motion_accuracy,
    motion_word,
)
from xmodal.data.shapes import ShapesSpec
from xmodal.data.shapes_pairs import FOREGROUND_LEVEL
from xmodal.data.shards import write_sizes
from xmodal.factory import build_datamodule, build_task, prepare_data

CAPTION = ["experiment=moving_shapes_video_caption"]
VAE = ["experiment=moving_shapes_text2video_vae", "model.vae.iwae_k=2"]


def moving_square(frames: int = 8, size: int = 32) -> np.ndarray:
    """A white square moving right 2 px per frame on black: ``[T, H, W, 3]`` uint8."""
    clip = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        clip[t, 12:20, 2 + 2 * t : 10 + 2 * t] = 255
    return clip


def centroids(clip: torch.Tensor) -> torch.Tensor:
    """Foreground centre (x, y) per frame ``[T, 2]`` of a uint8 clip ``[C, T, H, W]``."""
    mask = (clip.amax(0) > FOREGROUND_LEVEL).float()  # [T, H, W]
    ys, xs = torch.meshgrid(torch.arange(clip.shape[2]), torch.arange(clip.shape[3]), indexing="ij")
    total = mask.sum((1, 2)).clamp(min=1)
    return torch.stack([(mask * xs).sum((1, 2)) / total, (mask * ys).sum((1, 2)) / total], 1)


@pytest.mark.parametrize("codec", list(ENCODER_OPTIONS))
def test_pyav_reads_clips_a_users_tool_writes(codec):
    import av

    try:
        av.codec.Codec(codec, "w")
    except Exception:  # noqa: BLE001 - an FFmpeg build without that encoder
        pytest.skip(f"the bundled FFmpeg has no {codec} encoder")
    frames = moving_square()
    # Written the way a user's script would: av.open(..., "w") with the codec, frame by frame.
    data = encode_video(frames, fps=8, codec=codec)
    ext = "webm" if codec.startswith("libvpx") else "mp4"
    clip = decode_video(data, ext, frames=8, size=32, max_pixels=10**6)  # [3, T, H, W]
    assert clip.shape == (3, 8, 32, 32) and clip.dtype == torch.uint8
    error = (clip.permute(1, 2, 3, 0).float() - torch.from_numpy(frames).float()).abs().mean()
    assert error < 8  # lossless or near it; 4:2:0 codecs soften the square's edges
    xs = centroids(clip)[:, 0]
    assert torch.allclose(xs[1:] - xs[:-1], torch.full((7,), 2.0), atol=0.5)  # moves 2 px a frame
    # Fewer frames: evenly spaced centres; more frames than the clip has: the last one held.
    assert (
        frame_indices(8, 2) == [2, 6]
        and frame_indices(8, 1) == [4]
        and frame_indices(3, 5) == [0, 1, 2, 2, 2]
    )
    assert decode_video(data, ext, frames=12, size=16, max_pixels=10**6).shape == (3, 12, 16, 16)


def test_animated_gif_and_apng_are_frame_sequences_and_bounds_hold():
    frames = [Image.fromarray(f) for f in moving_square()]
    for fmt, ext in (("GIF", "gif"), ("PNG", "apng")):
        buffer = io.BytesIO()
        frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=125, loop=0)
        clip = decode_video(buffer.getvalue(), ext, frames=8, size=32, max_pixels=10**6)
        assert clip.shape == (3, 8, 32, 32)
        assert (clip[:, 0] != clip[:, 7]).any()  # the frames were read, not the first one repeated
    grey = decode_video(buffer.getvalue(), "apng", frames=4, size=32, max_pixels=10**6, channels=1)
    assert grey.shape == (1, 4, 32, 32)
    with pytest.raises(ValueError, match="exceed data.max_image_pixels=100"):
        decode_video(encode_video(moving_square()), "mp4", frames=8, size=32, max_pixels=100)
    with pytest.raises(ValueError, match="cannot decode video"):
        decode_video(b"\x00\x00\x00\x18ftypmp42" + b"\x17" * 500, "mp4", frames=8, size=32, max_pixels=10**6)


def test_a_corrupt_clip_is_a_counted_skip_naming_its_member(tiny, tmp_path, caplog):
    root = tmp_path / "shards"
    spec = MovingShapesSpec(ShapesSpec(n_train=4, n_val=4, n_test=0, image_size=32))
    good = [make_clip_sample(spec, "val", i) for i in range(4)]
    members = [(f"{s['__key__']}.{ext}", s[ext]) for s in good for ext in ("mp4", "txt", "json")]
    members += [("broken.mp4", good[0]["mp4"][: len(good[0]["mp4"]) // 3]), ("broken.txt", b"a clip")]
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        make_tar(root / split / "clips.tar", members)
    write_sizes(root, {"splits": {"train": {"clips.tar": 5}, "val": {"clips.tar": 5}}})
    cfg = compose_config([*tiny, *CAPTION, f"data.shards={root}", "data.batch_size=5"])
    datamodule = build_datamodule(cfg, root)
    datamodule.setup("fit")
    with caplog.at_level(logging.WARNING):
        batches = list(datamodule.loader("val", Topology(0, 1, 0)))
    kept = [k for b in batches for k, v in zip(b["__key__"], b["valid"], strict=True) if v]
    assert sorted(kept) == [s["__key__"] for s in good]
    assert batches[0]["video"].shape[1:] == (3, 8, 32, 32) and batches[0]["video"].dtype == torch.uint8
    assert sum(datamodule.skipped()["val"].values()) == 1
    assert "sample 'broken' member 'mp4'" in caplog.text


def test_moving_shapes_move_the_way_their_captions_say():
    spec = MovingShapesSpec(ShapesSpec(n_train=12, n_val=0, n_test=0, image_size=32))
    for i in range(12):
        sample = make_clip_sample(spec, "train", i)
        meta = json.loads(sample["json"])
        clip = decode_video(sample["mp4"], "mp4", frames=8, size=32, max_pixels=10**6)
        assert (clip[:, 7] != clip[:, 0]).any()
        dx, dy = MOTIONS[meta["motion"]]
        moved = centroids(clip)[-1] - centroids(clip)[0]  # [2] x, y in pixels
        assert moved[0] * dx + moved[1] * dy > 8  # ~10.5 px along the named direction
        assert abs(moved[0] * dy) + abs(moved[1] * dx) < 1.5  # and not across it
        assert all(motion_word(c) == meta["motion"] for c in meta["captions"])
        assert meta["shape"]["colour"] in sample["txt"].decode()
    assert (
        motion_accuracy(["a red circle moves up", "a red circle moves up"], ["x moves up", "x left"]) == 0.5
    )


def built(overrides: list[str]) -> tuple:
    cfg = compose_config(overrides)
    datamodule = build_datamodule(cfg, prepare_data(cfg))
    datamodule.setup("fit")
    torch.manual_seed(0)
    return build_task(cfg, datamodule.tokenizer), datamodule


def fit_steps(task, batch: dict, loss, steps: int, lr: float) -> list[float]:
    """Adam steps on one batch with the trainer's clipping (no Trainer): the loss before each step."""
    optimizer = torch.optim.Adam(task.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        value = loss(batch)
        optimizer.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        optimizer.step()
        losses.append(float(value.detach()))
    return losses


class WandbLogger:
    """Stands in for Lightning's (the callback finds W&B loggers by class name): records calls."""

    def __init__(self):
        self.videos: list[tuple] = []

    def log_image(self, *args, **kwargs) -> None:
        pass

    def log_table(self, *args, **kwargs) -> None:
        pass

    def log_video(self, key: str, videos: list, step: int, **kwargs) -> None:
        self.videos.append((key, videos, kwargs))


def test_video_captioner_learns_tiny_clips_shows_gifs_and_captions_files(tiny, tmp_path):
    from types import SimpleNamespace

    from xmodal.callbacks.samples import ValidationSamples

    task, datamodule = built([*tiny, *CAPTION])
    batch = datamodule.sample_batch(16, "train")
    assert batch["video"].shape == (16, 3, 8, 32, 32) and batch["video"].dtype == torch.float32
    losses = fit_steps(task.train(), batch, task.loss, steps=12, lr=2e-3)
    # Measured: 3.35 → 0.85 nats per token in 12 steps on 16 clips.
    assert losses[-1] < 0.4 * losses[0]

    # Validation samples through the real callback: PNG strips, looping GIFs, a W&B video each.
    wandb = WandbLogger()
    trainer = SimpleNamespace(
        sanity_checking=False, datamodule=datamodule, is_global_zero=True, global_step=12, loggers=[wandb]
    )
    ValidationSamples(tmp_path / "samples", num_samples=4).on_validation_epoch_end(trainer, task)
    [gif_path] = (tmp_path / "samples").glob("val_step*.gif")  # step: the task's own sample_step
    gif = Image.open(gif_path)
    assert gif.n_frames == 8 and gif.info["loop"] == 0
    first, last = gif.convert("RGB").tobytes(), (gif.seek(7), gif.convert("RGB").tobytes())[1]
    assert first != last  # the shapes move
    still = Image.open(tmp_path / "samples" / "val_latest.png")
    assert still.width > gif.width  # the still shows the 8 frames side by side
    assert wandb.videos == [("samples/val_video", [str(gif_path)], {"format": ["gif"]})]

    # xmodal-generate --video FILE: a user's .mp4 read as the modality reads members.
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(make_clip_sample(MovingShapesSpec(ShapesSpec(image_size=32)), "test", 0)["mp4"])
    [row] = task.eval().generate_outputs({"video": [str(clip)]}, SimpleNamespace(ckpt="ckpt"))
    assert row["video"] == str(clip) and row["caption"]


def test_text_to_video_vae_learns_and_samples_clips(tiny, tmp_path):
    task, datamodule = built([*tiny, *VAE])
    batch = datamodule.sample_batch(16, "train")

    def neg_elbo(batch: dict) -> torch.Tensor:
        terms = task.elbo_terms(batch)
        return (terms["kl_dims"].sum(1) - terms["recon"]).mean()

    losses = fit_steps(task.train(), batch, neg_elbo, steps=10, lr=3e-3)
    # Measured: -ELBO 160k → 107k nats per clip (6.5 → 4.3 nats/dim) in 10 steps.
    assert losses[-1] < 0.75 * losses[0]
    samples = task.eval().validation_samples(datamodule.sample_batch(4))
    assert set(samples.animations) == {"reconstruction", "conditional"}
    assert len(samples.animations["conditional"]) == 8
    assert task.sample(2, task.conditioning(batch)[:2]).shape == (2, 3, 8, 32, 32)
    # xmodal-generate --caption ... --out DIR: a frame strip and a looping GIF per sample.
    from types import SimpleNamespace

    from xmodal.codecs.video import decode_video

    out = tmp_path / "gen"
    args = SimpleNamespace(ckpt="vae.ckpt", num=2, seed=0, out=out)
    rows = task.generate_outputs({"text": ["a red circle moves to the left"]}, args)
    assert [row["video"] for row in rows] == [str(out / f"sample_{i:04d}.gif") for i in range(2)]
    clip = decode_video((out / "sample_0000.gif").read_bytes(), "gif", frames=8, size=32, max_pixels=10**6)
    assert clip.shape == (3, 8, 32, 32) and rows[0]["image"].endswith(".png")


def test_video_configs_refuse_what_the_nets_cannot_take(tiny):
    from xmodal.config import ConfigError, validate

    with pytest.raises(ConfigError) as error:
        validate(compose_config([*tiny, *CAPTION, "data.video_size=36", "data.video_frames=0"]))
    assert "data.video_frames" in str(error.value) and "data.video_size=36" in str(error.value)
    with pytest.raises(ConfigError, match="model.vae.likelihood"):
        validate(compose_config([*tiny, *VAE, "model.vae.likelihood=bernoulli"]))


@pytest.mark.slow
@pytest.mark.parametrize("direction", [CAPTION, VAE], ids=["video_to_text", "text_to_video"])
def test_ddp_two_ranks_train_video_directions_to_identical_weights(data_dir, tmp_path, direction):
    args = [
        *TINY,
        *direction,
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path}",
        "trainer=ddp_cpu",
        "trainer.max_steps=4",
        # One validation of one batch (it writes the GIF samples) and no test stage: the DDP
        # contract is the weights; 2-rank metrics equal 1-rank ones (tests/test_train_distributed.py).
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=1",
        "test_after_fit=false",
        "callbacks.rank_checksums=true",
        "run.id=ddp",
    ]
    result = run_cli(["xmodal-train", *args], tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / direction[0].removeprefix("experiment=") / "ddp"
    ranks = [json.loads((run_dir / "checksums" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    assert ranks[0]["start"] == ranks[1]["start"] and ranks[0]["end"] == ranks[1]["end"] != ranks[0]["start"]
    gif = "val_latest.gif" if direction is CAPTION else "conditional_latest.gif"
    assert (run_dir / "samples" / gif).is_file()  # the looping GIF samples, written by rank 0
