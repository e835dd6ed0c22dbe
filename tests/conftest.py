"""Shared fixtures: no network, offline W&B, one tiny shapes dataset per session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import lightning as L
    import torch

NETBLOCK = Path(__file__).parent / "netblock"
sys.path.insert(0, str(NETBLOCK))
import sitecustomize  # noqa: E402,F401  (blocks non-loopback sockets in this process)

os.environ["WANDB_MODE"] = "offline"
# The GAN metrics' cached domain classifier: never into the user's ~/.cache from tests.
os.environ.setdefault("XMODAL_CACHE_DIR", tempfile.mkdtemp(prefix="xmodal-test-cache-"))
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_API_KEY", None)
# Subprocesses load the same guard through PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NETBLOCK), os.environ.get("PYTHONPATH")]))

TINY = [
    "data.shapes.n_train=192",
    "data.shapes.n_val=48",
    "data.shapes.n_test=48",
    "data.shapes.samples_per_shard=64",
    "data.batch_size=16",
    "trainer.enable_progress_bar=false",
    "callbacks.num_samples=4",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in data is cached by spec, so one directory serves every test of the session."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def tiny(data_dir: Path, tmp_path: Path) -> list[str]:
    """Overrides for a seconds-long run on tiny data, writing under this test's tmp dir."""
    return [*TINY, f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path / 'outputs'}"]


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A plain tar of (name, bytes) members, for hand-made (and hand-broken) shards."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run an xmodal console script as a user would, capturing its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def checkpoint_tensors(path: Path) -> list[tuple[str, torch.Tensor]]:
    """Every floating tensor of a checkpoint: weights, buffers, optimizer states."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    named = list(ckpt["state_dict"].items())
    for i, opt in enumerate(ckpt.get("optimizer_states", [])):
        for j, state in opt["state"].items():
            named += [(f"opt{i}.{j}.{k}", v) for k, v in state.items()]
    return [(n, t) for n, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]


def tiny_gan_model(**gan: object) -> dict:
    """The ``model`` node of a GAN task for tiny injected nets (2-D points): fast Adam, no EMA;
    ``gan`` overrides ``model.gan`` keys."""
    from omegaconf import OmegaConf

    from xmodal.config import compose_config

    model = OmegaConf.to_container(compose_config(["model=gan"]).model, resolve=True)
    model["gan"].update(
        {
            "z_dim": 8,
            "loss": "ns",
            "g_lr": 2e-3,
            "d_lr": 2e-3,
            "g_betas": [0.5, 0.999],
            "d_betas": [0.5, 0.999],
            "ema_decay": 0.0,
            **gan,
        }
    )
    return model


@pytest.fixture
def one_thread():
    """Tiny nets run faster on one thread (and much faster on a shared, loaded machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fit_gan(task: object, loader: object, iterations: int, plugins: list | None = None) -> L.Trainer:
    """Fit a GAN task in-process for ``iterations`` (Lightning counts n_critic + 1 steps each) on
    ``loader``: CPU, one device, no logger, checkpoints, progress bar or validation."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=iterations * (task.gan.n_critic + 1),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        plugins=plugins,
    )
    trainer.fit(task, loader)
    return trainer
