"""Behaviour of the procedural shapes data, the safe shard reader/writer and ``xmodal-shards``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_tar
from xmodal.data import shapes
from xmodal.data.cli import main
from xmodal.data.shapes import (
    COLOURS,
    KIND_HZ,
    KINDS,
    POSITION_PHRASES,
    POSITIONS,
    Shape,
    ShapesSpec,
    make_sample,
    parse_caption,
    render_audio,
    synth,
)
from xmodal.data.shards import (
    ShardError,
    iter_tar_samples,
    read_sizes,
    split_shards,
    split_size,
    write_tar_shard,
)

SMALL = ShapesSpec(n_train=40, n_val=8, n_test=8, samples_per_shard=16)
REPO = Path(__file__).resolve().parents[1]


def meta(sample: dict) -> dict:
    return json.loads(sample["json"])


def has_pair(sample: dict, colour: str, kind: str) -> bool:
    return any(s["colour"] == colour and s["kind"] == kind for s in meta(sample)["shapes"])


# --- determinism -------------------------------------------------------------------------------


def test_same_spec_and_index_give_identical_bytes_and_other_seeds_differ():
    a, b = make_sample(SMALL, "train", 7), make_sample(SMALL, "train", 7)
    assert a == b
    other_seed = make_sample(ShapesSpec(n_train=40, seed=1), "train", 7)
    assert other_seed["png"] != a["png"]
    assert make_sample(SMALL, "train", 8)["png"] != a["png"]
    assert make_sample(SMALL, "val", 7)["png"] != a["png"]  # splits draw independent scenes


def test_samples_do_not_depend_on_python_hash_randomisation():
    code = (
        "import hashlib, sys; from xmodal.data.shapes import ShapesSpec, make_sample; "
        "s = make_sample(ShapesSpec(n_train=40), 'train', 3); "
        "sys.stdout.write(hashlib.sha256(b''.join(s[k] for k in ('png','txt','json','wav'))).hexdigest())"
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        digests.add(result.stdout)
    local = make_sample(ShapesSpec(n_train=40), "train", 3)
    assert digests == {hashlib.sha256(b"".join(local[k] for k in ("png", "txt", "json", "wav"))).hexdigest()}


# --- content ------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_shapes", [1, 2, 3])
def test_image_shapes_and_captions_are_consistent(max_shapes):
    spec = ShapesSpec(n_train=40, image_size=48, max_shapes=max_shapes)
    counts = set()
    for index in range(40):
        sample = make_sample(spec, "train", index)
        with Image.open(io.BytesIO(sample["png"])) as image:
            assert image.mode == "RGB" and image.size == (48, 48)
        info = meta(sample)
        scene = info["shapes"]
        counts.add(len(scene))
        assert 1 <= len(scene) <= max_shapes
        cells = [POSITIONS.index(s["position"]) for s in scene]
        assert cells == sorted(set(cells)), "canonical order is row-major, one shape per cell"
        assert info["label"] == KINDS.index(scene[0]["kind"])

        caps = info["captions"]
        assert 3 <= len(caps) <= 5 and len(set(caps)) == len(caps)
        assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", c) for c in caps), caps
        canonical = " and ".join(
            f"a {s['size']} {s['colour']} {s['kind']} {POSITION_PHRASES[s['position']]}" for s in scene
        )
        assert caps[0] == canonical == sample["txt"].decode("utf-8")
        for s in scene:
            assert all(f"{s['colour']} {s['kind']}" in c for c in caps), "every caption names every shape"
        assert parse_caption(caps[0]) == [(s["size"], s["colour"], s["kind"], s["position"]) for s in scene]
    assert counts == set(range(1, max_shapes + 1)), "every shape count occurs"


def test_shape_colour_is_drawn_where_the_attributes_say():
    sample = make_sample(SMALL, "train", 0)
    pixels = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=np.int16)  # [H, W, 3]
    for s in meta(sample)["shapes"]:
        centre = pixels[round(s["cy"]), round(s["cx"])]  # [3]
        assert np.abs(centre - np.array(COLOURS[s["colour"]])).max() <= 8  # only the mild noise
    assert pixels[0, 0].max() < 40, "dark background"


def test_audio_is_16k_mono_int16_and_encodes_the_kind():
    spec = SMALL
    sample = make_sample(spec, "train", 0)
    with wave.open(io.BytesIO(sample["wav"])) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)
        assert w.getnframes() == int(spec.audio_seconds * spec.sample_rate)
        decoded = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")  # [N]
    assert np.abs(decoded).max() > 1000

    def dominant_kind_hz(kind: str) -> float:
        scene = [Shape(kind, "red", "large", "center", 32.0, 32.0, 9.6)]
        audio = render_audio(scene, spec).astype(np.float64)  # [N]
        slot = audio[: len(audio) // spec.max_shapes]  # [S]: shape 0 plays in the first slot
        assert np.all(audio[len(audio) // spec.max_shapes :] == 0), "no second shape: silent slot"
        spectrum = np.abs(np.fft.rfft(slot))  # [S/2+1]
        hz = np.fft.rfftfreq(len(slot), 1 / spec.sample_rate)  # [S/2+1]
        band = (hz > 200) & (hz < 900)  # the kind band
        return float(hz[band][spectrum[band].argmax()])

    peaks = {kind: dominant_kind_hz(kind) for kind in KINDS}
    assert len(set(peaks.values())) == len(KINDS)
    assert all(abs(peaks[k] - KIND_HZ[k]) <= 10 for k in KINDS), peaks


# --- holdout ------------------------------------------------------------------------------------


def test_holdout_pairs_only_appear_in_the_holdout_split():
    spec = ShapesSpec(n_train=150, n_val=30, n_test=30, holdout=["Red  Circle"])  # normalised
    assert spec.holdout == ("red circle",) and "holdout" in spec.split_sizes()
    for split, n in (("train", 150), ("val", 30), ("test", 30)):
        assert not any(has_pair(make_sample(spec, split, i), "red", "circle") for i in range(n)), split
    assert all(has_pair(make_sample(spec, "holdout", i), "red", "circle") for i in range(30))
    # Without the holdout the pair is common, so the first assertion above could have failed.
    plain = ShapesSpec(n_train=150)
    assert sum(has_pair(make_sample(plain, "train", i), "red", "circle") for i in range(150)) >= 3


def test_spec_validation_and_fingerprint():
    assert (
        ShapesSpec(holdout=["blue square"]).fingerprint()
        == ShapesSpec(holdout=("blue square",)).fingerprint()
    )
    assert ShapesSpec(seed=1).fingerprint() != ShapesSpec().fingerprint()
    with pytest.raises(ValueError, match="pink circle"):
        ShapesSpec(holdout=("pink circle",))
    with pytest.raises(ValueError, match="max_shapes"):
        ShapesSpec(max_shapes=10)
    with pytest.raises(ValueError, match="bogus"):
        ShapesSpec.from_dict({"n_train": 5, "bogus": 1})
    with pytest.raises(ValueError, match="holdout"):
        make_sample(ShapesSpec(), "holdout", 0)


# --- synth --------------------------------------------------------------------------------------


def read_split(directory: Path, split: str) -> list[dict]:
    return [s for shard in split_shards(directory, split) for s in iter_tar_samples(shard)]


def test_synth_sizes_match_contents_and_second_call_is_a_cache_hit(tmp_path):
    spec = ShapesSpec(n_train=40, n_val=8, n_test=8, samples_per_shard=16, holdout=("red circle",))
    out = synth(tmp_path / "shapes", spec, progress=False)
    sizes = read_sizes(out)
    assert list(sizes["splits"]) == ["train", "val", "test", "holdout"]
    assert sizes["modalities"] == ["image", "text", "attributes", "audio"]
    assert ShapesSpec.from_dict(sizes["spec"]) == spec
    for split, expected in spec.split_sizes().items():
        samples = read_split(out, split)
        assert split_size(out, split) == len(samples) == expected
        assert [s["__key__"] for s in samples] == [f"{split}-{i:07d}" for i in range(expected)]
        for shard in split_shards(out, split):  # per-shard counts, not only totals
            assert sizes["splits"][split][shard.name] == sum(1 for _ in iter_tar_samples(shard))
    assert len(split_shards(out, "train")) == 3  # 16 + 16 + 8
    assert read_split(out, "train")[5] == {
        **make_sample(spec, "train", 5),
        "__shard__": str(out / "train" / "shard-000000.tar"),
    }

    files = sorted(p for p in out.rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert synth(tmp_path / "shapes", spec, progress=False) == out
    assert {p: p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()} == mtimes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"], "no temporary dirs left behind"

    # Byte-reproducible shards: a second directory gets identical tar files.
    again = synth(tmp_path / "again", spec, progress=False)
    assert (again / "val" / "shard-000000.tar").read_bytes() == (
        out / "val" / "shard-000000.tar"
    ).read_bytes()

    with pytest.raises(ValueError, match=re.escape(str(out))) as error:
        synth(out, ShapesSpec(n_train=41, n_val=8, n_test=8, samples_per_shard=16), progress=False)
    assert "n_train" in str(error.value)


def test_synth_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="busy"):
        synth(tmp_path / "busy", SMALL, progress=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_interrupted_synth_leaves_nothing(tmp_path, monkeypatch):
    real = shapes.make_sample
    calls = []

    def flaky(spec, split, index):
        calls.append(index)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return real(spec, split, index)

    monkeypatch.setattr(shapes, "make_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        synth(tmp_path / "shapes", SMALL, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shapes, "make_sample", real)
    assert split_size(synth(tmp_path / "shapes", SMALL, progress=False), "train") == 40


def test_synth_losing_a_race_keeps_the_winners_copy(tmp_path, monkeypatch):
    out = tmp_path / "shapes"
    real_write_sizes = shapes.write_sizes

    def other_process_finishes_first(directory, sizes):
        monkeypatch.setattr(shapes, "write_sizes", real_write_sizes)
        synth(out, SMALL, progress=False)  # the "other" process renames its copy into place first
        return real_write_sizes(directory, sizes)

    monkeypatch.setattr(shapes, "write_sizes", other_process_finishes_first)
    assert synth(out, SMALL, progress=False) == out
    winner_mtime = (out / "sizes.json").stat().st_mtime_ns
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]
    assert split_size(out, "train") == len(read_split(out, "train")) == 40
    assert (out / "sizes.json").stat().st_mtime_ns == winner_mtime


# --- safe reading -------------------------------------------------------------------------------


def test_iter_tar_samples_groups_members_by_key(tmp_path):
    path = make_tar(
        tmp_path / "ok.tar",
        [("a.png", b"P"), ("a.TXT", b"T"), ("dir/b.json", b"{}"), ("dir/b.cls", b"3")],
    )
    samples = list(iter_tar_samples(path))
    assert samples == [
        {"__key__": "a", "__shard__": str(path), "png": b"P", "txt": b"T"},
        {"__key__": "dir/b", "__shard__": str(path), "json": b"{}", "cls": b"3"},
    ]


@pytest.mark.parametrize("name", ["x.pyd", "x.pth", "x.pkl", "x.tar.pyd", "x.a.b.png", "x.Seg!.png", "noext"])
def test_iter_tar_samples_skips_members_no_modality_reads_unread(tmp_path, name):
    # Once refused (one stray member refused the whole dataset); now skipped unread, never handed
    # to a decoder, and counted by the names-only scan that backs `xmodal-shards inspect`.
    from xmodal.data.shards import scan_tar

    path = make_tar(tmp_path / "bad.tar", [("x.png", b"P"), (name, b"payload"), ("y.png", b"Q")])
    samples = list(iter_tar_samples(path))
    assert [(s["__key__"], {k for k in s if not k.startswith("__")}) for s in samples] == [
        ("x", {"png"}),
        ("y", {"png"}),
    ]
    assert all(b"payload" not in v for s in samples for v in s.values() if isinstance(v, bytes))
    scan = scan_tar(path)
    assert scan.keys == ["x", "y"] and sum(scan.kinds.values()) == 3 and scan.error is None


def test_iter_tar_samples_reads_role_members(tmp_path):
    # webdataset's key.<role>.<ext>: a second image of the sample is member "seg.png" (role seg).
    path = make_tar(tmp_path / "roles.tar", [("x.png", b"P"), ("x.seg.png", b"S"), ("x.txt", b"t")])
    assert list(iter_tar_samples(path)) == [
        {"__key__": "x", "__shard__": str(path), "png": b"P", "seg.png": b"S", "txt": b"t"}
    ]


def test_iter_tar_samples_refuses_duplicate_members_and_garbage(tmp_path):
    path = make_tar(tmp_path / "dup.tar", [("k.png", b"1"), ("k.txt", b"t"), ("k.png", b"2")])
    with pytest.raises(ShardError, match=r"dup\.tar.*'k'"):
        list(iter_tar_samples(path))
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ShardError, match="garbage.tar"):
        list(iter_tar_samples(garbage))


def test_write_tar_shard_refuses_unsafe_fields(tmp_path):
    with pytest.raises(ValueError, match="pth"):
        write_tar_shard(tmp_path / "s.tar", [{"__key__": "a", "pth": b"x"}])
    assert list(tmp_path.iterdir()) == [], "no partial shard left"


def test_sizes_helpers_explain_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="xmodal-shards synth") as error:
        read_sizes(tmp_path)
    assert str(tmp_path / "sizes.json") in str(error.value)
    out = synth(tmp_path / "shapes", SMALL, progress=False)
    with pytest.raises(ValueError, match=r"'holdout'.*\['test', 'train', 'val'\]"):
        split_shards(out, "holdout")


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_synth_then_inspect(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["synth", "--out", str(out), "--n", "40", "--n-val", "8", "--n-test", "6", "--seed", "3"]
    assert main([*argv, "--holdout", "blue square", "--samples-per-shard", "16", "--quiet"]) == 0
    assert ShapesSpec.from_dict(read_sizes(out)["spec"]).seed == 3
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    for row in (
        r"train\s*│\s*3\s*│\s*40",
        r"val\s*│\s*1\s*│\s*8",
        r"test\s*│\s*1\s*│\s*6",
        r"holdout\s*│\s*1\s*│\s*6",
    ):
        assert re.search(row, printed), row
    first = read_split(out, "train")[0]
    opening = " ".join(first["txt"].decode().split()[:4])  # long captions wrap inside the table
    assert "train-0000000" in printed and opening in printed
    assert "holdout-0000002" in printed and "audio" in printed


def test_cli_user_errors_exit_2_without_traceback(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
    assert main(["synth", "--out", str(tmp_path / "x"), "--holdout", "pink circle"]) == 2
    assert "pink circle" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "xmodal-shards synth" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_tar_reader_handles_standard_formats_long_names_and_gzip(tmp_path, fmt, mode):
    """Our header parser against tars written by Python's tarfile in every standard layout."""
    deep = "d" * 120 + "/sub"  # longer than the 100-byte name field: prefix / GNU long name / PAX path
    members = [(f"{deep}/a.txt", b"alpha"), (f"{deep}/a.json", b"{}"), ("b.txt", b"x" * 1000), ("d.txt", b"")]
    path = tmp_path / ("s.tar.gz" if mode.endswith("gz") else "s.tar")
    with tarfile.open(path, mode, format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1.5  # a float mtime makes tarfile write PAX records
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("c.txt")
        link.type = tarfile.SYMTYPE
        link.linkname = "b.txt"
        tar.addfile(link)
    samples = []
    with pytest.raises(ShardError, match=r"member 'c.txt' is not a regular file"):
        for sample in iter_tar_samples(path):
            samples.append(sample)
    # Samples completed before the refused member are delivered ("d" was still open: the shard stops).
    assert [(s["__key__"], s.get("txt"), s.get("json")) for s in samples] == [
        (f"{deep}/a", b"alpha", b"{}"),
        ("b", b"x" * 1000, None),
    ]


def test_tar_cut_inside_a_header_is_an_error_not_a_short_shard(tmp_path):
    path = make_tar(tmp_path / "s.tar", [("a.txt", b"1"), ("b.txt", b"2")])
    data = path.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: 512 + 512 + 100])  # inside the second member's header
    with pytest.raises(ShardError, match="truncated header"):
        list(iter_tar_samples(tmp_path / "cut.tar"))
