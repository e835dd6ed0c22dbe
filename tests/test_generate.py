"""xmodal-generate for image generators: seeded PNGs per condition, and arguments checked per model."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.conftest import run_cli
from xmodal.config import compose_config
from xmodal.train import train


@pytest.fixture(scope="module")
def text_vae(tmp_path_factory, data_dir):
    from tests.conftest import TINY

    out = tmp_path_factory.mktemp("vae")
    overrides = [*TINY, f"paths.data_dir={data_dir}", f"paths.output_dir={out}", "logger=none"]
    overrides += [
        "experiment=shapes_text2image_vae",
        "trainer.max_steps=4",
        "run.id=v",
        "test_after_fit=false",
        "model.vae.judge_steps=0",  # the experiment's 1,500-step judge: not what this file tests
    ]
    overrides += ["trainer.val_check_interval=null"]
    train(compose_config(overrides))
    return out / "shapes_text2image_vae" / "v" / "checkpoints" / "last.ckpt"


def test_a_text_to_image_model_writes_seeded_images_per_caption(text_vae, tmp_path, capsys):
    from xmodal.generate import main

    args = [str(text_vae), "--caption", "a red circle", "a blue square", "--num", "2"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "a")]) == 0  # in-process, then the console script
    files = sorted((tmp_path / "a").glob("sample_*.png"))
    assert [f.name for f in files] == [f"sample_{i:04d}.png" for i in range(4)]  # 2 captions × 2
    assert "a blue square" in capsys.readouterr().out.splitlines()[3]
    with Image.open(files[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"  # the experiment's data.image_size
    assert (tmp_path / "a" / "grid.png").is_file()
    # Another process, the same command: the same bytes (samples are seeded, not drawn from global RNG).
    again = run_cli(["xmodal-generate", *args, "--out", str(tmp_path / "b")], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "a blue square" in again.stdout.splitlines()[3]
    assert [f.read_bytes() for f in files] == [
        f.read_bytes() for f in sorted((tmp_path / "b").glob("s*.png"))
    ]


def test_conditions_that_do_not_fit_the_model_are_refused(text_vae, tmp_path, capsys):
    from xmodal.generate import main  # the console script's function, in-process (7 s less a call)

    assert main([str(text_vae), "--num", "2", "--out", str(tmp_path)]) == 2
    assert "is conditioned on text: give --caption TEXT" in capsys.readouterr().err
    assert main([str(text_vae), "--label", "3", "--out", str(tmp_path)]) == 2
    assert "is conditioned on 'text': --label does not apply" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_a_text_to_audio_vae_writes_spectrogram_pngs_per_caption(data_dir, tmp_path, capsys):
    from tests.conftest import TINY

    overrides = [*TINY, f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path}", "logger=none"]
    overrides += ["experiment=shapes_text2audio_vae", "data.audio_mels=32", "trainer.max_steps=2"]
    overrides += ["run.id=a", "test_after_fit=false", "trainer.val_check_interval=null"]
    train(compose_config(overrides))
    ckpt = tmp_path / "shapes_text2audio_vae" / "a" / "checkpoints" / "last.ckpt"
    from xmodal.generate import main  # in-process: the text→image test above runs the console script

    args = [str(ckpt), "--caption", "a red circle", "a blue square", "--num", "2"]
    capsys.readouterr()  # the training's own output
    assert main([*args, "--out", str(tmp_path / "gen")]) == 0
    files = sorted((tmp_path / "gen").glob("sample_*.png"))
    assert len(files) == 4 and "a blue square" in capsys.readouterr().out.splitlines()[3]
    for file in files:
        with Image.open(file) as image:
            assert image.size == (64, 32)  # time across (64 frames), 32 mel bands up
            red, green, blue = image.convert("RGB").split()
            assert red.tobytes() == green.tobytes() == blue.tobytes()  # a grey spectrogram
    assert (tmp_path / "gen" / "grid.png").is_file()
