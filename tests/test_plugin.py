"""Plug-ins: a modality and a task from outside the package (tests/plugin_toy.py), found by the
registry, an entry point or an import path, train like built-ins (also on 2 DDP ranks); nets swap
by ``_target_``; the core holds no task or modality names. ``pytest -k plugin`` selects these."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from PIL import Image

from tests.conftest import TINY
from tests.plugin_toy import VECTOR_DIM, RegressTask, register
from xmodal.config import ConfigError, compose_config, validate
from xmodal.data.batch import BatchCollate, DecodeSpec, decode_sample
from xmodal.data.tokenizer import WordTokenizer
from xmodal.train import train

REPO = Path(__file__).resolve().parent.parent


def write_vector_shards(root: Path, n: dict[str, int]) -> Path:
    """Shards as a user's own script would write them with webdataset's ShardWriter: ``key.png``
    (a solid colour) + ``key.vec`` (that colour as 3 floats), and a hand-written sizes.json."""
    from webdataset import ShardWriter

    rng = np.random.default_rng(0)
    sizes: dict[str, dict[str, int]] = {}
    for split, count in n.items():
        (root / split).mkdir(parents=True)
        with ShardWriter(str(root / split / "part-%04d.tar"), maxcount=count, verbose=0) as sink:
            for i in range(count):
                colour = rng.uniform(0, 1, VECTOR_DIM)
                png = io.BytesIO()
                Image.new("RGB", (16, 16), tuple(int(c * 255) for c in colour)).save(png, format="PNG")
                vec = ",".join(f"{c:.4f}" for c in colour * 2 - 1)  # the colour in model units
                sink.write({"__key__": f"{split}{i:04d}", "png": png.getvalue(), "vec": vec.encode()})
        sizes[split] = {"part-0000.tar": count}
    (root / "sizes.json").write_text(json.dumps({"splits": sizes}))
    return root


@pytest.fixture
def vector_data(tmp_path: Path) -> Path:
    register()
    return write_vector_shards(tmp_path / "vectors", {"train": 64, "val": 32, "test": 32})


def regress_overrides(shards: Path, out: Path) -> list[str]:
    return [
        *TINY,
        "model=regress_schema",  # the task's typed node, stored by register_schemas() for any task
        "experiment_name=regress",
        f"data.shards={shards}",
        "data.name=vectors",
        "data.image_size=16",
        f"paths.output_dir={out}",
        "logger=none",
        "callbacks.monitor=val/mse",
        "callbacks.monitor_mode=min",
        "trainer.log_every_n_steps=1",
    ]


def test_plugin_modality_and_task_learn_from_webdataset_shards(vector_data, tmp_path):
    overrides = regress_overrides(vector_data, tmp_path / "out")
    cfg = compose_config([*overrides, "trainer.max_steps=2", "trainer.val_check_interval=2", "run.id=two"])
    assert cfg.model.task == "regress" and cfg.model.hidden == 16  # typed: defaults from RegressConfig
    two = train(cfg)
    assert "val/mse" in two and "test/mse" in two
    run = tmp_path / "out" / "regress" / "two"
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 2
    assert (run / "samples" / "inputs_latest.png").is_file()
    assert "predicted" in next((run / "samples").glob("table_step*.md")).read_text()
    # Learning: the colour is recovered far better after 60 steps than after 2.
    longer = train(
        compose_config([*overrides, "trainer.max_steps=60", "trainer.val_check_interval=30", "run.id=sixty"])
    )
    assert longer["test/mse"] < 0.5 * two["test/mse"], (two, longer)
    # A checkpoint rebuilds the plug-in task from its hyperparameters alone.
    task = RegressTask.load_from_checkpoint(
        run.parent / "sixty" / "checkpoints" / "last.ckpt", weights_only=False
    )
    assert task.cfg.hidden == 16


def test_plugin_config_is_typed_and_checked_by_its_owner(vector_data):
    with pytest.raises(ConfigError, match=r"model.lr: must be > 0 \(got -1.0\)"):
        validate(compose_config(["model=regress_schema", f"data.shards={vector_data}", "model.lr=-1"]))
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["model=regress_schema", "model.width=3"])
    assert "Key 'width' not in 'RegressConfig'" in str(err.value.__cause__)
    with pytest.raises(ConfigError, match=r"model.width: not a config key of RegressConfig"):
        validate(compose_config(["model=regress_schema", f"data.shards={vector_data}", "+model.width=3"]))


def test_plugin_task_by_import_path_and_unknown_names_are_refused_naming_the_key(vector_data):
    from xmodal.factory import task_class

    # An import path needs no registration; its config class comes from the task class.
    overrides = [
        "model=regress_schema",
        "model.task=tests.plugin_toy:RegressTask",
        f"data.shards={vector_data}",
    ]
    cfg = compose_config(overrides)
    validate(cfg)
    assert task_class(cfg.model.task) is RegressTask
    with pytest.raises(ConfigError, match=r"model.lr: must be > 0"):
        validate(compose_config([*overrides, "model.lr=0"]))  # its own config's checks still run
    with pytest.raises(ConfigError, match=r"data.roles.depth: must name a modality among"):
        validate(compose_config(["+data.roles.depth=sonar"]))


def test_plugin_roles_read_key_role_ext_members_into_their_own_batch_entries():
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(png, format="PNG")
    grey = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(grey, format="PNG")
    spec = DecodeSpec(image_size=8, required=("src", "tgt"), roles=(("src", "image"), ("tgt", "image")))
    raw = {"__key__": "k", "src.png": grey.getvalue(), "tgt.png": png.getvalue(), "txt": b"a red square"}
    row = decode_sample(raw, spec, train=False)
    batch = BatchCollate(WordTokenizer.fit(["a red square"]), 8)([row, row])
    assert batch["src"].shape == batch["tgt"].shape == (2, 3, 8, 8)
    assert int(batch["tgt"][0, 0, 0, 0]) == 255 and int(batch["src"][0, 0, 0, 0]) == 128
    assert batch["captions"] == [["a red square"]] * 2  # text and label are decoded for every sample
    with pytest.raises(ValueError, match="sample 'k' has no tgt"):
        decode_sample({"__key__": "k", "src.png": grey.getvalue()}, spec, train=False)


def test_plugin_roles_are_filled_from_generate_inputs_in_model_units(tmp_path):
    from xmodal.modalities.roles import modality_of

    path = tmp_path / "in.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path)
    spec = DecodeSpec(image_size=8, roles=(("src", "image"),))
    modality = modality_of("src", {"src": "image"})
    batch = modality.read_inputs([str(path)], "src", spec, BatchCollate(WordTokenizer.fit(["a"]), 8))
    assert set(batch) == {"src"} and batch["src"].dtype == torch.float32
    assert batch["src"][0, :, 0, 0].tolist() == [1.0, -1.0, -1.0]  # red in [-1, 1]
    text = tmp_path / "x.txt"
    text.write_text("a caption")
    with pytest.raises(
        ValueError,
        match=r"x.txt: not a file the image modality reads \(png, jpg, jpeg, webp, bmp, gif, tif, tiff\)",
    ):
        modality.read_inputs([str(text)], "src", spec, None)


def test_plugin_net_slot_by_target_trains_and_checkpoints_rebuild_it(tiny, tmp_path):
    slot = "model.encoder={_target_:tests.plugin_nets.MeanColourEncoder,d_model:${model.d_model},tokens:4}"
    cfg = compose_config([*tiny, "logger=none", "trainer.max_steps=2", "run.id=slot", slot])
    train(cfg)
    from tests.plugin_nets import MeanColourEncoder
    from xmodal.tasks.caption.task import CaptionTask

    ckpt = tmp_path / "outputs" / "shapes_caption" / "slot" / "checkpoints" / "last.ckpt"
    task = CaptionTask.load_from_checkpoint(ckpt, weights_only=False)
    assert isinstance(task.encoder, MeanColourEncoder) and task.encoder.proj.out_features == 128
    with pytest.raises(ConfigError, match=r"model.encoder._target_: cannot import 'nowhere.Net'"):
        validate(compose_config(["model.encoder={_target_:nowhere.Net}"]))


def entry_point_path(tmp_path: Path, target: str = "tests.plugin_toy:register") -> Path:
    """A distribution's metadata declaring the toy plug-in's entry point, as `pip install` of a
    package with ``[project.entry-points."xmodal.plugins"] toy = "tests.plugin_toy:register"`` leaves."""
    info = tmp_path / "site" / "xmodal_toy_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xmodal-toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[xmodal.plugins]\ntoy = {target}\n")
    return info.parent


def test_plugin_from_an_entry_point_trains_on_two_ddp_ranks_with_identical_weights(tmp_path):
    shards = write_vector_shards(tmp_path / "vectors", {"train": 64, "val": 32, "test": 32})
    site = entry_point_path(tmp_path)
    env_path = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])
    args = [*regress_overrides(shards, tmp_path / "out"), "trainer=ddp_cpu", "trainer.max_steps=2"]
    args += [
        "callbacks.rank_checksums=true",
        "run.id=ddp",
        "trainer.val_check_interval=2",
        "test_after_fit=false",
    ]
    env = {**os.environ, "PYTHONPATH": env_path, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        ["xmodal-train", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "out" / "regress" / "ddp"
    ranks = [json.loads((run / "checksums" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["global_step"] == ranks[1]["global_step"] == 2
    assert ranks[0]["end"] == ranks[1]["end"] != ranks[0]["start"]


def test_plugin_that_fails_to_import_is_named_in_one_line(monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    from xmodal import registry
    from xmodal.train import main

    broken = EntryPoint("toy", "nowhere_pkg.plugin:register", registry.PLUGIN_GROUP)
    monkeypatch.setattr(
        registry, "entry_points", lambda group: [broken] if group == registry.PLUGIN_GROUP else []
    )
    monkeypatch.setattr(registry, "_plugins_loaded", False)  # restored after the test
    monkeypatch.setattr(sys, "argv", ["xmodal-train", "logger=none"])
    with pytest.raises(SystemExit) as exit_code:
        main()  # the console script's function, in-process
    assert exit_code.value.code == 2
    err = capsys.readouterr().err
    assert (
        "plug-in 'toy' (nowhere_pkg.plugin:register) failed to import: No module named 'nowhere_pkg'" in err
    )
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_plugin_free_core_compares_no_task_or_modality_names():
    """factory, config, generate and data decide by registry lookups, never by a name."""
    names = ["caption", "gan", "vae", "image", "audio", "text", "label"]
    pattern = re.compile(
        r"(==|!=|\bin\b)\s*\(?\s*[\"']("
        + "|".join(names)
        + r")[\"']|[\"']("
        + "|".join(names)
        + r")[\"']\s*(==|!=)"
    )
    core = [
        REPO / "xmodal" / "factory.py",
        REPO / "xmodal" / "generate.py",
        *(REPO / "xmodal" / "config").glob("*.py"),
    ]
    core += (REPO / "xmodal" / "data").glob("*.py")
    hits = [
        f"{p.relative_to(REPO)}:{i}: {line.strip()}"
        for p in core
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


def test_plugin_example_package_trains_from_its_readme_command(tmp_path):
    """examples/xmodal_sensor, installed as its README says (into a venv over this environment),
    adds a modality, a net and an experiment that `xmodal-train experiment=sensor_caption` finds."""
    venv = tmp_path / "venv"
    # Without a pip of its own, the venv uses this environment's pip and setuptools (offline).
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True
    )
    python = venv / "bin" / "python"
    source = shutil.copytree(
        REPO / "examples" / "xmodal_sensor", tmp_path / "xmodal_sensor"
    )  # builds in-tree
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    data = tmp_path / "sensor"
    made = subprocess.run(
        [str(venv / "bin" / "xmodal-sensor-synth"), "--out", str(data), "--n", "96"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    # xmodal-train of this environment, run by the venv's interpreter (which sees the example).
    args = ["experiment=sensor_caption", f"data.shards={data}", "trainer.max_steps=4"]
    args += [
        "trainer.val_check_interval=2",
        "logger=none",
        f"paths.output_dir={tmp_path / 'out'}",
        "run.id=s",
    ]
    result = subprocess.run(
        [str(python), "-m", "xmodal.train", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "sensor_caption" / "s" / "metrics.json").read_text())
    assert summary["global_step"] == 4 and "test/bleu4" in summary["test"]
    assert torch.isfinite(torch.tensor(summary["test"]["test/loss"]))
