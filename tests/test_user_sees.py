"""What a user sees: progress lines in redirected output, curves in plots/, progress toward max_steps."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
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
    import csv

    with (
        open(run_dir / "csv" / "metrics.csv")
        if (run_dir / "csv" / "metrics.csv").exists()
        else open(next(run_dir.rglob("metrics.csv"))) as f
    ):
        rows = list(csv.DictReader(f))
    rates = [float(r["perf/samples_per_s"]) for r in rows if r.get("perf/samples_per_s")]
    flops = {float(r["perf/flops_per_step"]) for r in rows if r.get("perf/flops_per_step")}
    assert rates and min(rates) > 0 and len(flops) == 1 and flops.pop() > 1e6
    assert not any(r.get("perf/mfu") for r in rows)  # no comparable peak on a CPU


def test_steps_count_in_the_users_units_when_lightning_counts_more():
    """A GAN's trainer.max_steps counts optimizer steps (two per iteration): progress shows iterations."""
    counter = StepCounter(max_steps=100)
    trainer = SimpleNamespace(max_steps=200, global_step=50)
    assert counter.done(trainer) == 25 and counter.label(trainer) == "25/100"
    assert counter.eta(trainer) == "?"  # no rate before this process has trained a step
    assert [format_duration(s) for s in (4.4, 92, 3 * 3600 + 60)] == ["4s", "1m32s", "3h01m"]
    # A task that counts its own iterations is believed: a GAN's G-only warm-up iterations take
    # one optimizer step each, so no fixed ratio converts Lightning's count.
    warming = SimpleNamespace(
        max_steps=1800, global_step=300, lightning_module=SimpleNamespace(sample_step=300)
    )
    assert counter.label(warming) == "100/100"  # capped at the run's steps
    assert StepCounter(max_steps=1400).label(warming) == "300/1400"


def test_a_fast_dev_run_counts_toward_its_batches_not_max_steps():
    """debug=fdr stops after 1 batch whatever max_steps says: "step 1000/1000" was printed."""
    from omegaconf import OmegaConf

    from xmodal.callbacks.progress import target_steps

    fdr = OmegaConf.create({"max_steps": 1000, "fast_dev_run": 1})
    assert target_steps(fdr) == 1 and target_steps(OmegaConf.create({"max_steps": 1000})) == 1000
    counter = StepCounter(target_steps(fdr))
    caption = SimpleNamespace(max_steps=1, global_step=1)  # Lightning's max_steps = fast_dev_run
    gan = SimpleNamespace(max_steps=1, global_step=2)  # one iteration = 2 optimizer steps
    assert counter.label(caption) == counter.label(gan) == "1/1"


def test_throughput_counts_the_flops_of_a_whole_training_step(tmp_path):
    """A first linear layer's step: forward 2·B·I·O plus its weight gradient 2·B·I·O (its input needs none)."""
    import lightning as L
    import torch

    from xmodal.callbacks.throughput import Throughput

    class Linear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(32, 16, bias=False)

        def training_step(self, batch, batch_idx):
            return self.layer(batch["x"]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = [{"x": torch.randn(8, 32), "__key__": [str(i)] * 8} for i in range(6)]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    meter = Throughput()
    trainer = L.Trainer(
        max_steps=6,
        callbacks=[meter],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(Linear(), loader)
    assert meter.flops_per_step == 4 * 8 * 32 * 16
    assert trainer.logged_metrics["perf/samples_per_s"] > 0


HELP_CALLS = {
    "xmodal-train": "from xmodal.entry import train_main as main",
    "xmodal-eval": "from xmodal.entry import eval_main as main",
    "xmodal-generate": "from xmodal.generate import main",
    "xmodal-shards": "from xmodal.data.cli import main",
    "xmodal-submit": "from xmodal.submit import main",
}


@pytest.mark.parametrize("command", sorted(HELP_CALLS))
def test_help_of_every_command_has_an_example_and_imports_no_torch(command):
    code = (
        f"import sys; sys.argv = [{command!r}, '--help']; {HELP_CALLS[command]}\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("NO-TORCH"), result.stdout[-500:]
    assert re.search(rf"^\s+{command} \S", result.stdout, re.M), result.stdout  # an example line
    if command == "xmodal-eval":
        assert "ckpt_path= is required" in result.stdout
    if command == "xmodal-train":
        assert "experiment: " in result.stdout and "shapes_caption" in result.stdout  # the config groups


def test_console_scripts_are_the_help_aware_entry_points():
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["xmodal-train"] == "xmodal.entry:train_main"
    assert scripts["xmodal-eval"] == "xmodal.entry:eval_main"


def test_every_package_xmodal_imports_is_declared_in_pyproject():
    """A fresh ``pip install -e .`` has only what pyproject declares; this suite's environment has
    more (matplotlib came with mlxtend, a dev extra, so ``xmodal-train`` passed here and failed on
    a clean machine at its first validation's plots)."""
    import ast
    import importlib.metadata
    import sys

    import tomllib
    from packaging.requirements import Requirement

    root = Path(__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    base = {Requirement(r) for r in project["dependencies"]}
    extras = {Requirement(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    declared = {r.name.lower() for r in base | extras}
    # aiohttp arrives through fsspec's http extra, which the base dependencies ask for.
    if any(r.name == "fsspec" and "http" in r.extras for r in base):
        declared.add("aiohttp")
    imported = set()
    for path in (root / "xmodal").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "xmodal"}
    distributions = importlib.metadata.packages_distributions()
    providers = {module: {d.lower() for d in distributions.get(module, [module])} for module in third_party}
    assert {module: dists for module, dists in providers.items() if not dists & declared} == {}


def test_generate_flag_hints_equal_the_modality_classes():
    """The hints that keep `xmodal-generate --help` free of torch must not drift from the classes."""
    from xmodal.registry import MODALITIES

    for name in ("image", "audio", "text", "label"):
        cls = MODALITIES.get(name)
        for key in ("input_flag", "input_files"):
            assert MODALITIES._hints[name][key] == getattr(cls, key), (name, key)


def test_train_from_python_gets_a_console_handler_only_when_nothing_would_show_its_lines(capsys):
    """From a notebook or a script, Hydra's job logging is not set up: xmodal's progress lines and
    summary must still show; under a configured logger nothing is added (no double lines)."""
    import logging

    from xmodal.console import log_to_console_if_unconfigured, stop_logging_to

    root, xmodal_log = logging.getLogger(), logging.getLogger("xmodal")
    saved = root.handlers[:], xmodal_log.handlers[:], xmodal_log.level
    root.handlers[:], xmodal_log.handlers[:] = [], []
    try:
        handler = log_to_console_if_unconfigured()
        assert handler is not None and log_to_console_if_unconfigured() is None
        xmodal_log.info("step 3/10 (30%)")
        stop_logging_to(handler)
        assert "[xmodal][INFO] - step 3/10 (30%)" in capsys.readouterr().out
        assert not xmodal_log.handlers
    finally:
        root.handlers[:], xmodal_log.handlers[:] = saved[0], saved[1]
        xmodal_log.setLevel(saved[2])
