"""Decoding beyond images: log-mel audio, .cls labels, required modalities, and gated pipe: shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_tar
from xmodal.codecs.audio import HOP, SAMPLE_RATE, decode_audio, mel_filterbank
from xmodal.codecs.wav import wav_bytes
from xmodal.config import ConfigError, compose_config, validate
from xmodal.data.datamodule import BatchCollate, DecodeSpec, decode_sample
from xmodal.data.epoch_plan import Topology, shards_from_dir
from xmodal.data.shapes import ShapesSpec, make_sample
from xmodal.data.shards import ShardError, iter_shard, write_sizes, write_tar_shard
from xmodal.data.stream import ShardStream
from xmodal.data.tokenizer import WordTokenizer


def wav(samples: np.ndarray, rate: int) -> bytes:
    return wav_bytes((np.clip(samples, -1, 1) * 32767).astype("<i2"), rate)


def tone(hz: float, rate: int, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return 0.5 * np.sin(2 * np.pi * hz * t)


def mel_band_of(hz: float, n_mels: int = 64) -> int:
    """The filter that responds most to a frequency (from the filterbank itself)."""
    bins = mel_filterbank(n_mels)  # [M, F]
    return int(bins[:, round(hz / (SAMPLE_RATE / 2) * (bins.shape[1] - 1))].argmax())


def test_a_tone_lights_its_mel_band_and_resampling_keeps_it():
    for rate in (16_000, 8_000, 44_100):
        mels, mask = decode_audio(wav(tone(1000.0, rate), rate), "wav", n_mels=64, frames=64)
        assert mels.shape == (1, 64, 64) and mask.shape == (64,)  # [1, M, T], [T]
        assert int(mask.sum()) == 0.5 * SAMPLE_RATE // HOP + 1  # 51 centred 10 ms frames
        loudest = mels[0, :, : int(mask.sum())].mean(1).argmax()
        assert abs(int(loudest) - mel_band_of(1000.0)) <= 1, rate
    # Frames past the clip are silence (the log floor), not zeros that would read as loud.
    assert float(mels[0, :, 60].max()) == pytest.approx(float(np.log(1e-6)))


def test_shapes_audio_decodes_and_collates_with_a_mask():
    raw = make_sample(ShapesSpec(), "train", 3)
    spec = DecodeSpec(required=("audio", "text"), audio_frames=40)
    row = decode_sample({"__key__": "k", "wav": raw["wav"], "json": raw["json"]}, spec, train=False)
    assert "image" not in row  # not required: not decoded
    batch = BatchCollate(WordTokenizer.fit(row["captions"]), 16)([row, row])
    assert batch["audio"].shape == (2, 1, 64, 40) and batch["audio_mask"].all()  # cut to 40 frames
    assert torch.isfinite(batch["audio"]).all()


def test_flac_decodes_to_the_same_log_mel_as_the_wav_it_was_made_from():
    soundfile = pytest.importorskip("soundfile")  # in the dev extra, so CI runs this
    raw = make_sample(ShapesSpec(), "train", 3)
    samples, rate = soundfile.read(io.BytesIO(raw["wav"]), dtype="int16")
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="FLAC")  # lossless
    spec = DecodeSpec(required=("audio", "text"))
    from_wav = decode_sample({"__key__": "k", "wav": raw["wav"], "json": raw["json"]}, spec, train=False)
    from_flac = decode_sample(
        {"__key__": "k", "flac": buffer.getvalue(), "json": raw["json"]}, spec, train=False
    )
    assert from_flac["audio_mask"].sum() > 0 and torch.equal(from_flac["audio_mask"], from_wav["audio_mask"])
    assert torch.allclose(from_flac["audio"], from_wav["audio"], atol=1e-5)
    with pytest.raises(ValueError):  # bytes that are not FLAC: a counted skip, not a crash
        decode_sample({"__key__": "k", "flac": b"fLaC not really", "json": raw["json"]}, spec, train=False)


def test_cls_labels_and_missing_required_modalities():
    spec = DecodeSpec(required=("image", "label"))
    raw = make_sample(ShapesSpec(), "train", 0)
    base = {"__key__": "k", "png": raw["png"]}
    assert decode_sample({**base, "cls": b"7\n"}, spec, train=True)["label"] == 7
    assert decode_sample({**base, "json": b'{"label": 2}'}, spec, train=True)["label"] == 2
    with pytest.raises(ValueError, match=r"sample 'k' has no label \(.cls member or 'label' in its JSON\)"):
        decode_sample(base, spec, train=True)
    with pytest.raises(ValueError, match=r"sample 'k': .cls is not an integer"):
        decode_sample({**base, "cls": b"seven"}, spec, train=True)
    with pytest.raises(ValueError, match="sample 'k' has no audio"):
        decode_sample(base, DecodeSpec(required=("audio", "text")), train=True)
    # Not required: a missing label is -1 and the sample is kept.
    assert decode_sample(base, DecodeSpec(required=("image",)), train=True)["label"] == -1


@pytest.fixture
def piped_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A shard directory whose sizes.json lists a pipe: shard that cats a real tar (and a marker)."""
    spec = ShapesSpec()
    real = tmp_path / "real.tar"
    write_tar_shard(real, [make_sample(spec, "train", i) for i in range(6)])
    marker = tmp_path / "ran.txt"
    root = tmp_path / "shards"
    root.mkdir()
    command = f"pipe:touch {marker} && cat {real}"
    # Every split: a run needs val and test data, and carving them would run the command to count.
    write_sizes(root, {"splits": {split: {command: 6} for split in ("train", "val", "test")}})
    return root, marker


def test_pipe_shards_are_refused_unless_allowed(piped_dir):
    root, marker = piped_dir
    cfg = compose_config([f"data.shards={root}"])
    with pytest.raises(
        ConfigError, match=r"data.allow_pipe: sizes.json lists 1 pipe: shard\(s\) that run shell"
    ):
        validate(cfg)
    shards = shards_from_dir(root, "train")
    with pytest.raises(ShardError, match="refused unless data.allow_pipe=true"):
        list(iter_shard(shards[0].url))
    refused = ShardStream(shards, "exact", 0, Topology(0, 1, 0), 2, max_consecutive_failures=1)
    with pytest.raises(RuntimeError, match="refused unless data.allow_pipe=true"):
        list(refused)
    assert not marker.exists()  # the command never ran

    validate(compose_config([f"data.shards={root}", "data.allow_pipe=true"]))
    allowed = ShardStream(shards, "exact", 0, Topology(0, 1, 0), 2, allow_pipe=True)
    keys = sorted(k for batch in allowed for k in batch["__key__"])
    assert keys == [f"train-{i:07d}" for i in range(6)] and marker.exists()


def test_a_failing_pipe_command_is_a_shard_error(tmp_path):
    with pytest.raises(ShardError, match="command exited with status 3"):
        list(iter_shard("pipe:exit 3", allow_pipe=True))
    bad = make_tar(tmp_path / "x.tar", [("a.json", json.dumps({}).encode())])
    assert [s["__key__"] for s in iter_shard(f"pipe:cat {bad}", allow_pipe=True)] == ["a"]


def striped(width: int, height: int) -> bytes:
    """An RGB PNG whose red channel is the column index and green the row index."""
    from PIL import Image

    x = np.broadcast_to(np.arange(width, dtype=np.uint8)[None], (height, width))
    y = np.broadcast_to(np.arange(height, dtype=np.uint8)[:, None], (height, width))
    buffer = io.BytesIO()
    Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_fit_modes_stretch_centre_cut_and_seeded_random_cuts():
    from xmodal.codecs.pixels import decode_image

    wide = striped(128, 64)  # 2:1
    stretched = decode_image(wide, 32, fit="resize")
    centre = decode_image(wide, 32, fit="center_crop")
    assert stretched.shape == centre.shape == (3, 32, 32)
    # Stretching keeps the whole width (columns 0..127); a centre cut keeps the middle half.
    assert int(stretched[0, :, 0].float().mean()) < 4 and int(stretched[0, :, -1].float().mean()) > 123
    assert (
        28 <= int(centre[0, :, 0].float().mean()) <= 36 and 90 <= int(centre[0, :, -1].float().mean()) <= 98
    )

    spec = DecodeSpec(required=("image",), image_size=32, image_fit="random_crop")
    raw = {"__key__": "k", "png": wide}
    cut = [decode_sample({**raw, "__epoch__": e}, spec, train=True)["image"] for e in range(6)]
    assert torch.equal(cut[0], decode_sample({**raw, "__epoch__": 0}, spec, train=True)["image"])  # seeded
    assert len({int(c[0, 0, 0]) for c in cut}) > 1  # the cut moves with the epoch
    evaluated = [decode_sample(raw, spec, train=False)["image"] for _ in range(2)]
    assert torch.equal(evaluated[0], evaluated[1])  # evaluation: always the centre


def test_optional_modalities_are_masked_when_absent_and_required_ones_skip():
    raw = make_sample(ShapesSpec(), "val", 1)
    spec = DecodeSpec(required=("image", "text"), optional=("audio",))
    with_audio = decode_sample({k: raw[k] for k in ("__key__", "png", "json", "wav")}, spec, train=False)
    without = decode_sample({k: raw[k] for k in ("__key__", "png", "json")}, spec, train=False)
    assert with_audio["audio_present"] is True and without["audio_present"] is False
    batch = BatchCollate(WordTokenizer.fit(with_audio["captions"]), 16)([with_audio, without])
    assert batch["audio_present"].tolist() == [True, False]
    assert batch["audio"].shape == (2, 1, 64, 64)  # the absent clip is silence with an empty mask
    assert batch["audio_mask"][0].any() and not batch["audio_mask"][1].any()
    assert float(batch["audio"][1].max()) == pytest.approx(-1.0)  # silence (the log floor) in model units
    with pytest.raises(ValueError, match="has no caption"):
        decode_sample({k: raw[k] for k in ("__key__", "png", "wav")}, spec, train=False)


def test_optional_modalities_come_from_config_without_doubling_required_ones():
    from xmodal.factory import decode_spec

    spec = decode_spec(compose_config(["data.optional_modalities=[audio,image]"]))
    assert spec.required == ("image", "text") and spec.optional == ("audio",)
    with pytest.raises(ConfigError, match="data.optional_modalities: must name modalities"):
        validate(compose_config(["data.optional_modalities=[smell]"]))


def encoded(mode: str, fmt: str, size: tuple[int, int] = (48, 40), **options) -> bytes:
    """Noisy pixels in ``mode``, saved as ``fmt`` (noise: every decoder difference would show)."""
    pixels = np.random.default_rng(len(mode) + len(fmt)).integers(
        0, 255, (size[1], size[0], 4), dtype=np.uint8
    )
    image = Image.fromarray(pixels, "RGBA")
    image = image.convert(mode) if mode == "RGBA" else image.convert("RGB").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# (mode, format, options, channels) → whether libspng / libjpeg-turbo decode it (else PIL does).
FAST_CASES = [
    ("RGB", "JPEG", {}, 3, True),
    ("RGB", "JPEG", {"subsampling": 0}, 3, True),
    ("L", "JPEG", {}, 3, True),
    ("L", "JPEG", {}, 1, True),
    ("RGB", "JPEG", {}, 1, False),  # PIL's luma weights, not the JPEG's Y channel
    ("CMYK", "JPEG", {}, 3, False),
    ("RGB", "PNG", {}, 3, True),
    ("L", "PNG", {}, 1, True),
    ("L", "PNG", {}, 3, False),
    ("RGBA", "PNG", {}, 3, False),
    ("P", "PNG", {}, 3, False),
    ("RGB", "WEBP", {}, 3, False),
]


@pytest.mark.parametrize(("mode", "fmt", "options", "channels", "fast"), FAST_CASES)
def test_fast_decoders_give_the_same_pixels_as_pil(mode, fmt, options, channels, fast):
    from xmodal.codecs.pixels import _decode_fast, decode_image, decode_pil

    data = encoded(mode, fmt, **options)
    by_pil = np.asarray(decode_pil(data, channels, 10**9)).reshape(40, 48, channels)  # [H, W, C]
    by_library = _decode_fast(data, channels, 10**9)
    assert (by_library is not None) == fast
    if fast:
        assert by_library.shape == by_pil.shape and np.array_equal(by_library, by_pil)
    # The public path agrees with PIL for every case, fitted or not.
    assert torch.equal(
        decode_image(data, 40, channels=channels, fit="center_crop"), decode_image_by_pil(data, 40, channels)
    )


def decode_image_by_pil(data: bytes, size: int, channels: int) -> torch.Tensor:
    from xmodal.codecs.pixels import _fit, decode_pil

    fitted = np.asarray(_fit(decode_pil(data, channels, 10**9), size, "center_crop", None))
    return torch.from_numpy(fitted.reshape(size, size, channels).copy()).permute(2, 0, 1)


def test_fast_path_refuses_oversized_and_broken_files_with_the_pil_path_s_errors():
    from PIL import UnidentifiedImageError

    from xmodal.codecs.pixels import decode_image

    for fmt in ("PNG", "JPEG"):
        with pytest.raises(ValueError, match=r"image of 48×40 pixels exceeds data.max_image_pixels=1000"):
            decode_image(encoded("RGB", fmt), 40, max_pixels=1000)
    jpeg = encoded("RGB", "JPEG")
    with pytest.raises(OSError, match="truncated"):  # not returned grey-filled by libjpeg-turbo
        decode_image(jpeg[: len(jpeg) // 2], 40)
    png = encoded("RGB", "PNG")
    with pytest.raises(OSError):
        decode_image(png[: len(png) // 2], 40)
    with pytest.raises(UnidentifiedImageError):
        decode_image(b"\xff\xd8<html>not a jpeg</html>", 40)
