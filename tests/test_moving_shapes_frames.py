"""``data.moving_shapes.frames``: built-in moving shapes of any clip length (xmodal/data/moving_shapes.py).

A 12-frame spec writes 12-frame clips whose shape covers the same 10.5 px as the 8-frame default;
the default's spec dict, fingerprint (the cache directory's name) and bytes are what they were
before the field existed; fewer than two frames is one config line.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.test_video import centroids
from xmodal.codecs.video import _container_frames, decode_video
from xmodal.config import compose_config
from xmodal.config.validate import config_problems
from xmodal.config.view import shown_config
from xmodal.data.builtin import builtin_dir
from xmodal.data.moving_shapes import MOTIONS, MovingShapesSpec, make_clip_sample, synth_moving
from xmodal.data.shapes import ShapesSpec

SHIPPED = ShapesSpec(n_train=3000, n_val=256, n_test=256, image_size=32, samples_per_shard=500)
"""data.shapes of xmodal/conf/data/moving_shapes.yaml."""


def test_the_default_spec_is_the_one_before_the_frames_field():
    spec = MovingShapesSpec(SHIPPED)
    assert spec.frames == 8
    # Computed by the code before data.moving_shapes.frames existed (frames and speed were constants then).
    assert spec.to_dict() == {
        "n_train": 3000,
        "n_val": 256,
        "n_test": 256,
        "seed": 0,
        "image_size": 32,
        "samples_per_shard": 500,
        "frames": 8,
        "speed": 1.5,
        "version": 1,
    }
    assert spec.fingerprint() == "c204f3fece10"
    assert MovingShapesSpec(ShapesSpec(n_train=12, n_val=0, n_test=0, image_size=32)).fingerprint() == (
        "033210dee193"
    )
    # Both shipped video experiments still read (and cache) the data they did.
    for experiment in ("moving_shapes_text2video_vae", "moving_shapes_video_caption"):
        cfg = compose_config([f"experiment={experiment}"])
        assert cfg.data.moving_shapes.frames == cfg.data.video_frames == 8
        assert builtin_dir(Path("/data"), cfg.data) == Path("/data/moving_shapes-c204f3fece10")
        assert shown_config(cfg).data.moving_shapes == {"frames": 8}  # on the console at the start
    # A run's config.yaml written before data.moving_shapes existed names the same data.
    old = OmegaConf.create(OmegaConf.to_container(cfg.data, resolve=True))
    del old["moving_shapes"]
    assert builtin_dir(Path("/data"), old) == Path("/data/moving_shapes-c204f3fece10")
    longer = compose_config(["experiment=moving_shapes_text2video_vae", "data.moving_shapes.frames=12"])
    assert longer.data.video_frames == 12  # the model sees every frame unless told otherwise
    assert (
        builtin_dir(Path("/data"), longer.data).name
        == f"moving_shapes-{MovingShapesSpec(SHIPPED, 12).fingerprint()}"
    )
    assert MovingShapesSpec(SHIPPED, 12).fingerprint() != "c204f3fece10"


def test_a_12_frame_spec_writes_12_frame_clips(tmp_path):
    spec = MovingShapesSpec(ShapesSpec(n_train=2, n_val=1, n_test=1, image_size=32, samples_per_shard=2), 12)
    out = synth_moving(tmp_path / "clips", spec, progress=False)
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes["spec"]["frames"] == 12 and sizes["spec"]["speed"] == pytest.approx(1.5 * 7 / 11)
    with tarfile.open(out / "train" / "shard-000000.tar") as tar:
        mp4s = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".mp4")]
    assert len(mp4s) == 2
    assert all(len(list(_container_frames(b, 32, 10**6))) == 12 for b in mp4s)


@pytest.mark.parametrize("frames", [2, 12])
def test_motion_is_visible_at_any_clip_length(frames):
    spec = MovingShapesSpec(ShapesSpec(n_train=8, n_val=0, n_test=0, image_size=32), frames)
    for i in range(8):
        sample = make_clip_sample(spec, "train", i)
        meta = json.loads(sample["json"])
        clip = decode_video(sample["mp4"], "mp4", frames=frames, size=32, max_pixels=10**6)  # [3, T, 32, 32]
        assert clip.shape == (3, frames, 32, 32) and (clip[:, -1] != clip[:, 0]).any()
        dx, dy = MOTIONS[meta["motion"]]
        (x0, y0), (x1, y1) = meta["path"]  # the centre in the first and last frame
        assert (x1 - x0) * dx + (y1 - y0) * dy == pytest.approx(10.5, abs=0.02)  # as over 8 frames
        moved = centroids(clip)[-1] - centroids(clip)[0]  # [2] x, y in pixels, as rendered
        assert moved[0] * dx + moved[1] * dy > 8  # along the named direction
        assert abs(moved[0] * dy) + abs(moved[1] * dx) < 1.5  # and not across it


def test_fewer_than_two_frames_is_one_config_line():
    cfg = compose_config(["experiment=moving_shapes_text2video_vae", "data.moving_shapes.frames=1"])
    assert config_problems(cfg) == [
        "data.moving_shapes.frames: must be >= 2 (motion needs two frames) (got 1)"
    ]
    with pytest.raises(
        ValueError, match=r"^data.moving_shapes.frames: must be >= 2 \(motion needs two frames\), got 0$"
    ):
        MovingShapesSpec(SHIPPED, 0)
