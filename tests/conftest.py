"""Shared fixtures: no network, offline W&B, one tiny shapes dataset per session."""

from __future__ import annotations

import atexit
import os
import shutil
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
# One intra-op thread per process, inherited by every CLI run and DDP rank the tests start. The
# suite runs two pytest workers on 2 cores (pyproject addopts, pytest_xdist_auto_num_workers
# below), and a test may start two ranks beside the other worker's test: with torch's default of
# one thread per core the threads spin-wait for each other, and small ops (a KID compute, a
# 32 px conv) ran 10-90x slower than on one thread when measured on the loaded 2-core box.
os.environ["OMP_NUM_THREADS"] = "1"
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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny nets: one intra-op thread is ~10× faster than two on a busy 2-core machine (a module
    asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    """Run an xmodal console script as a user would, capturing its output.

    The process is forked from ``tests/cli_server.py`` (torch and Lightning imported once per
    pytest worker, ~6 s of CPU saved per run) when the command is an installed xmodal script and
    the environment is the one the server started with; otherwise, or with
    ``XMODAL_TEST_FRESH_PROCESSES=1``, a fresh interpreter as before.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = _cli_server(env)
    script = shutil.which(args[0]) if args else None
    if server is None or script is None or not args[0].startswith("xmodal-"):
        return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return server.run(script, args, Path(cwd), env, timeout)


class _CliServer:
    """The client side of ``tests/cli_server.py`` (one server per pytest process)."""

    # Read when an interpreter starts: a run asking for other values needs a fresh one.
    STARTUP_ENV = ("PYTHONPATH", "OMP_NUM_THREADS", "PYTHONHASHSEED", "MKL_NUM_THREADS")

    def __init__(self, env: dict[str, str]):
        self.dir = Path(tempfile.mkdtemp(prefix="xmodal-cli-"))
        self.socket = str(self.dir / "socket")
        self.startup = {k: env.get(k) for k in self.STARTUP_ENV}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "cli_server.py"), self.socket],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        said = []  # an import may print first; "ready" is the server's own last line
        while self.process.stdout and (line := self.process.stdout.readline()) and line.strip() != "ready":
            said.append(line)
        if self.process.poll() is not None:
            raise RuntimeError(f"the CLI fork server did not start (said {''.join(said)[-500:]!r})")
        atexit.register(self.process.kill)

    def fits(self, env: dict[str, str]) -> bool:
        return self.process.poll() is None and {k: env.get(k) for k in self.STARTUP_ENV} == self.startup

    def run(
        self, script: str, args: list[str], cwd: Path, env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        import json
        import signal
        import socket

        out, err = (tempfile.mkstemp(dir=self.dir)[1] for _ in range(2))
        request = {"script": script, "argv": args[1:], "cwd": str(cwd), "env": env}
        request |= {"stdout": out, "stderr": err}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.socket)
            stream = conn.makefile("rwb")
            stream.write((json.dumps(request) + "\n").encode())
            stream.flush()
            pid = int(stream.readline())
            conn.settimeout(timeout)
            try:
                code = int(stream.readline())
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)  # its session: the run and any ranks it started
                conn.settimeout(None)
                stream.readline()
                raise subprocess.TimeoutExpired(args, timeout) from None
        read = lambda path: Path(path).read_text(errors="replace")  # noqa: E731
        stdout, stderr = read(out), read(err)
        os.unlink(out), os.unlink(err)
        return subprocess.CompletedProcess(args, code, stdout, stderr)


_server: _CliServer | None = None


def _cli_server(env: dict[str, str]) -> _CliServer | None:
    """This process's fork server, started on first use; None when a fresh process is needed."""
    global _server
    if env.get("XMODAL_TEST_FRESH_PROCESSES") == "1":
        return None
    if _server is None or _server.process.poll() is not None:
        _server = _CliServer(env)
    return _server if _server.fits(env) else None


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


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(1)  # the env var above came too late if torch was imported already


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, at most 4 (each test may start two ranks of its own)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


# The files whose tests start multi-process or long runs (measured: BENCHMARKS.md "Test suite"),
# scheduled first: pytest-xdist hands whole files (--dist loadfile) to whichever worker is free in
# collection order, so a heavy file collected last would leave one worker running alone at the end.
HEAVY_FILES = (
    "test_train_distributed.py",
    "test_gan.py",
    "test_vae.py",
    "test_preemption.py",
    "test_experiments.py",
    "test_video.py",
    "test_translation.py",
    "test_plugin.py",
    "test_watchdog.py",
    "test_run_identity.py",
    "test_vocoder.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FILES)))  # stable: order kept within


def fit_gan(
    task: object,
    loader: object,
    iterations: int,
    plugins: list | None = None,
    optimizer_steps: int | None = None,
) -> L.Trainer:
    """Fit a GAN task in-process for ``iterations`` (Lightning counts n_critic + 1 steps each) on
    ``loader``: CPU, one device, no logger, checkpoints, progress bar or validation.
    ``optimizer_steps``: Lightning's count instead, where iterations differ (a G-only warm-up)."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=optimizer_steps if optimizer_steps is not None else iterations * (task.gan.n_critic + 1),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        plugins=plugins,
    )
    trainer.fit(task, loader)
    return trainer
