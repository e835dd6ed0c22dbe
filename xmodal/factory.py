"""Config → objects: data, task, loggers, callbacks, strategy and Trainer.

Kept apart from the entry points so ``xmodal-train``, ``xmodal-eval``, tests and notebooks build
exactly the same objects from the same config. Tasks, modalities and built-in datasets are looked
up by name (xmodal/registry.py, xmodal/data/builtin.py); nothing here knows one by name.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from netrc import netrc
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from xmodal.callbacks.best_checkpoint import BestCheckpoint
from xmodal.callbacks.checksums import RankChecksums
from xmodal.callbacks.csv_history import HistoryCSVLogger
from xmodal.callbacks.data_health import DataHealth
from xmodal.callbacks.ema import EMAWeights
from xmodal.callbacks.last_checkpoint import LastCheckpoint
from xmodal.callbacks.metrics_file import MetricsFile
from xmodal.callbacks.model_summary import ModelTable
from xmodal.callbacks.nonfinite import NonFiniteGuard
from xmodal.callbacks.plots import MetricPlots
from xmodal.callbacks.preemption import Preemption
from xmodal.callbacks.progress import StepProgress, StepRichProgressBar, target_steps
from xmodal.callbacks.samples import ValidationSamples
from xmodal.callbacks.short_epochs import ShortEpochValidation
from xmodal.callbacks.throughput import Throughput
from xmodal.callbacks.watchdog import RankWatchdog
from xmodal.checkpoints import RunDirCheckpointIO
from xmodal.config import absolute, world_size
from xmodal.data.builtin import BUILTIN_DATASETS, builtin_dir
from xmodal.data.datamodule import DecodeSpec, ShardDataModule, SplitSettings
from xmodal.data.mix import SourceSpec, source_names
from xmodal.data.remote import is_remote
from xmodal.data.shards import is_pipe, set_max_member_bytes
from xmodal.registry import TASKS
from xmodal.run import RunIdentity, is_launcher, wandb_run_id
from xmodal.tasks.config import task_config
from xmodal.tokenizers.base import Tokenizer

log = logging.getLogger("xmodal")


def prepare_data(cfg: DictConfig, wait_s: float = 900.0) -> Path | str:
    """The shard source of this config (a local path made absolute, or a url as given),
    generating a built-in dataset on first use.

    Only the launcher generates; ranks started by srun wait for its ``sizes.json``. With
    ``data.sources``, the first source: only a label (``ShardDataModule.shards_dir``, in messages);
    every reader, the FID classifier and the judge too, reads the data module's splits of all the
    sources (``ShardDataModule.data``, from ``data_sources``).
    """
    if cfg.data.sources:
        return data_sources(cfg)[0].shards
    if cfg.data.shards is not None:
        return _located(str(cfg.data.shards))
    dataset = BUILTIN_DATASETS[cfg.data.name]
    out = builtin_dir(absolute(cfg.paths.data_dir), cfg.data)
    if is_launcher():
        if not (out / "sizes.json").exists():
            log.info("generating the built-in %s data into %s", cfg.data.name, out)
        return dataset.build(out, dataset.spec(cfg.data))
    deadline = time.monotonic() + wait_s
    while not (out / "sizes.json").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not generate {out} within {wait_s:.0f} s")
        time.sleep(1.0)
    return out


def _located(shards: str) -> Path | str:
    """A local path made absolute (runs may change folder), a url as given."""
    return shards if is_remote(shards) or is_pipe(shards) else absolute(shards)


def data_sources(cfg: DictConfig) -> list[SourceSpec]:
    """``data.sources`` as the data module takes them: paths absolute, every source named."""
    entries = list(cfg.data.sources)
    names = source_names([str(e.shards) for e in entries], [e.name for e in entries])
    return [
        SourceSpec(str(_located(str(e.shards))), float(e.weight), name)
        for e, name in zip(entries, names, strict=True)
    ]


def required_roles(cfg: DictConfig) -> tuple[str, ...]:
    """Roles every sample must have for this task (others are not decoded), e.g. a text→audio
    VAE's ``("audio", "text")``: the task family's config says."""
    return task_config(cfg).roles()


def decode_spec(cfg: DictConfig) -> DecodeSpec:
    d = cfg.data
    required = required_roles(cfg)
    optional = (*task_config(cfg).optional_roles(), *d.optional_modalities)
    return DecodeSpec(
        image_size=d.image_size,
        image_channels=d.image_channels,
        image_fit=d.image_fit,
        audio_mels=d.audio_mels,
        audio_frames=d.audio_frames,
        video_frames=d.video_frames,
        video_size=d.video_size,
        required=required,
        optional=tuple(dict.fromkeys(m for m in optional if m not in required)),
        max_pixels=d.max_image_pixels,
        seed=cfg.seed,
        roles=tuple(sorted(dict(d.roles).items())),
        options=OmegaConf.to_container(d.options, resolve=True),
    )


def build_datamodule(
    cfg: DictConfig, shards_dir: Path, tokenizer: Tokenizer | None = None
) -> ShardDataModule:
    # Process-wide (and inherited by loader workers): every reader of the run's shards obeys it.
    set_max_member_bytes(cfg.data.max_member_bytes)
    return ShardDataModule(
        shards_dir,
        batch_size=cfg.data.batch_size // world_size(cfg),
        num_workers=cfg.data.num_workers,
        decode=decode_spec(cfg),
        max_text_len=cfg.data.max_text_len,
        tokenizer_spec=OmegaConf.to_container(cfg.data.tokenizer, resolve=True),
        tokenizer=tokenizer,
        seed=cfg.seed,
        mode=cfg.data.mode,
        samples_per_epoch=cfg.data.samples_per_epoch,
        shuffle_buffer=cfg.data.shuffle_buffer,
        max_consecutive_failures=cfg.data.max_consecutive_failures,
        allow_pipe=cfg.data.allow_pipe,
        splits=SplitSettings.from_config(cfg),
        sources=data_sources(cfg) if cfg.data.sources else (),
    )


def task_class(name: str) -> type[L.LightningModule]:
    """The LightningModule of a task family: a registered name or an import path."""
    return TASKS.get(name)


def data_shape(cfg: DictConfig) -> dict[str, Any]:
    """What the task needs to know about the data to build its nets (saved in its hparams)."""
    d = cfg.data
    return {
        "image_size": d.image_size,
        "image_channels": d.image_channels,
        "audio_mels": d.audio_mels,
        "audio_frames": d.audio_frames,
        "video_frames": d.video_frames,
        "video_size": d.video_size,
        "max_text_len": d.max_text_len,
        "roles": dict(d.roles),
        "options": OmegaConf.to_container(d.options, resolve=True),
    }


def build_task(cfg: DictConfig, tokenizer: Tokenizer) -> L.LightningModule:
    """Every task is built as ``Task(model, tokenizer, data)`` from plain dicts (``tokenizer``: the
    tokenizer's JSON-ready state), so a checkpoint's hparams alone rebuild it
    (``Task.load_from_checkpoint(path)``), whatever the tokenizer."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    task = task_class(cfg.model.task)(model, tokenizer.state(), data_shape(cfg))
    t = cfg.trainer
    # How the nets run, not what they are: not hyperparameters (a checkpoint loads without them).
    task.configure_nets(
        compile=t.compile,
        compile_mode=t.compile_mode,
        compile_backend=t.compile_backend,
        channels_last=t.channels_last,
    )
    return task


def wandb_offline(setting: bool | None) -> bool:
    """Offline unless asked otherwise or an API key is configured (env or ~/.netrc)."""
    if setting is not None:
        return setting
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc().authenticators("api.wandb.ai") is None
    except (OSError, ValueError):
        return True


def sweep_name() -> str | None:
    """The multirun's sweep dir name (W&B group of its jobs), or None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def build_loggers(cfg: DictConfig, run: RunIdentity) -> list[Logger]:
    kind = cfg.logger.kind
    if kind == "none":
        return []
    if kind == "csv":
        return [HistoryCSVLogger(save_dir=str(run.dir), name="", version="")]  # appends across restarts
    return [
        WandbLogger(
            name=run.id,
            id=wandb_run_id(run.dir, run.id),
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=cfg.logger.group or sweep_name(),
            tags=list(cfg.logger.tags),
            job_type=cfg.model.task,
            save_dir=str(run.dir),
            offline=wandb_offline(cfg.logger.offline),
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    ]


def build_callbacks(
    cfg: DictConfig, run: RunIdentity, has_logger: bool
) -> tuple[list[Callback], ModelCheckpoint]:
    checkpoint = BestCheckpoint(  # never a non-finite score or state
        dirpath=str(run.dir / "checkpoints"),
        filename="best",
        monitor=cfg.callbacks.monitor,
        mode=cfg.callbacks.monitor_mode,
        save_top_k=1,
        save_last=False,  # LastCheckpoint writes last.ckpt after every validation, improved or not
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    last = LastCheckpoint(run.dir / "checkpoints" / "last.ckpt")
    callbacks: list[Callback] = [
        NonFiniteGuard(cfg.run.max_nonfinite_steps),  # first: the others see this batch's verdict
        checkpoint,
        last,
        Preemption(last, signal.SIGUSR2),
        ValidationSamples(run.dir / "samples", cfg.callbacks.num_samples),
        DataHealth(),  # before MetricsFile, which records what it logs
        MetricsFile(run.dir / "metrics.jsonl"),
        ShortEpochValidation(cfg.trainer.check_val_every_n_epoch),  # an interval no short run reaches
        ModelTable(),  # Lightning's table without its all-zero FLOPs column
    ]
    if cfg.callbacks.throughput:
        callbacks.append(Throughput())
    if cfg.callbacks.plots:
        callbacks.append(MetricPlots(run.dir, cfg.callbacks.monitor))  # after MetricsFile: reads its rows
    if rich_progress(cfg):
        callbacks.append(StepRichProgressBar(target_steps(cfg.trainer)))
    else:
        callbacks.append(StepProgress(target_steps(cfg.trainer), cfg.callbacks.progress_interval_s))
    if has_logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.callbacks.rank_checksums:
        callbacks.append(RankChecksums(run.dir / "checksums"))
    if cfg.run.peer_timeout_s > 0 or cfg.run.stall_timeout_s > 0:
        callbacks.append(RankWatchdog(run.dir, cfg.run.peer_timeout_s, cfg.run.stall_timeout_s))
    ema = task_config(cfg).ema_decay
    if ema > 0:
        callbacks.append(EMAWeights(ema))  # last: it averages a step after the guard has judged it
    return callbacks, checkpoint


def rich_progress(cfg: DictConfig) -> bool:
    """Rich's live bar only on a terminal: redirected, it shows nothing until the end (plain lines
    from StepProgress instead)."""
    return bool(cfg.trainer.enable_progress_bar) and sys.stdout.isatty()


def build_strategy(cfg: DictConfig) -> Any:
    name = cfg.trainer.strategy
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=world_size(cfg), tensor_parallel_size=1)
    if name in ("ddp", "ddp_spawn"):
        from lightning.pytorch.strategies import DDPStrategy

        # e.g. a GAN's D backward never touches G's parameters (and the reverse): one DDP around
        # the whole module then needs to be told that some parameters get no gradient in a step.
        return DDPStrategy(
            start_method="spawn" if name == "ddp_spawn" else "popen",
            find_unused_parameters=task_class(cfg.model.task).find_unused_parameters,
        )
    return name


def lightning_max_steps(cfg: DictConfig) -> int:
    """Lightning's ``max_steps`` counts optimizer steps; the task family says what its
    ``trainer.max_steps`` counts (a GAN: iterations of ``n_critic`` D steps + 1 G step)."""
    return task_config(cfg).lightning_max_steps(int(cfg.trainer.max_steps))


def build_trainer(
    cfg: DictConfig, run: RunIdentity, loggers: list[Logger], callbacks: list[Callback]
) -> L.Trainer:
    t = cfg.trainer
    optional = {
        key: t[key]
        for key in (
            "val_check_interval",
            "limit_train_batches",
            "limit_val_batches",
            "limit_test_batches",
            "profiler",
        )
        if t[key] is not None
    }
    # An integer interval counts batches across epochs, which Lightning allows only without the
    # per-epoch schedule.
    every_n_epochs = None if isinstance(t.val_check_interval, int) else t.check_val_every_n_epoch
    # Checkpoints staged beside their target, not in the system temp dir (xmodal/checkpoints.py).
    plugins: list[Any] = [RunDirCheckpointIO()]
    if SLURMEnvironment.detect():
        # Our sbatch scripts send SIGUSR2 before the time limit (NCCL may use USR1). The Preemption
        # callback handles it at a step boundary, so Lightning's own requeue handler stays off.
        plugins.append(SLURMEnvironment(auto_requeue=False, requeue_signal=signal.SIGUSR2))
    return L.Trainer(
        plugins=plugins,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg),
        precision=t.precision,
        max_steps=lightning_max_steps(cfg),
        max_epochs=t.max_epochs,
        check_val_every_n_epoch=every_n_epochs,
        log_every_n_steps=t.log_every_n_steps,
        # Manual optimization clips inside the task (a GAN: model.gan.clip_grad_norm, unscaled norms).
        gradient_clip_val=None if task_class(cfg.model.task).clips_own_gradients else t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        fast_dev_run=t.fast_dev_run,
        overfit_batches=t.overfit_batches,
        num_sanity_val_steps=t.num_sanity_val_steps,
        deterministic=t.deterministic,
        enable_progress_bar=rich_progress(cfg),
        enable_model_summary=False,  # the ModelTable callback is the summary (True: Lightning logs that it skips its own)
        use_distributed_sampler=False,  # the stream splits data over ranks itself (exact-once)
        default_root_dir=str(run.dir),
        logger=loggers or False,
        callbacks=callbacks,
        **optional,
    )
