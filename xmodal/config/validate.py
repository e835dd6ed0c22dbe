"""Semantic checks of a composed config, all reported at once before any rank or worker starts.

Types and key names are the schema's business (xmodal/config/schema.py, refused while composing);
here: values types cannot express (devices ≥ 1, a precision the accelerator can run, a batch that
divides over the ranks, shards that exist). The ``model`` node is checked by its task family
(:meth:`xmodal.tasks.config.TaskConfig.problems`) and the data roles by their modalities: this
module knows no task or modality by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xmodal.config.schema import (
    ACCELERATORS,
    COMPILE_MODES,
    LOGGERS,
    PRECISIONS,
    SAFE_NAME,
    STRATEGIES,
    ConfigError,
    TrainConfig,
    absolute,
)
from xmodal.data.builtin import BUILTIN_DATASETS, builtin_dir
from xmodal.problems import Problems, unknown_keys
from xmodal.registry import MODALITIES
from xmodal.tasks.config import model_node_problems, task_config
from xmodal.tokenizers.build import tokenizer_problems

_NO_KEY = object()


def config_problems(cfg: Any, cuda_available: bool | None = None) -> list[str]:
    """Every semantic problem as '<key>: <why> (got <value>)'.

    ``cuda_available`` overrides what this process sees (a SLURM login node has no GPU, but the
    job's compute node does)."""
    cuda = _cuda_available() if cuda_available is None else cuda_available
    problems = Problems(cfg)
    if isinstance(cfg, DictConfig):  # Hydra's ``+key=value`` can add keys the schema lacks
        problems += [f"{key}: not a config key of {schema}" for key, schema in unknown_keys(cfg, TrainConfig)]
    check = problems.check

    t, d = cfg.trainer, cfg.data
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
    problems += compile_problems(cfg, cuda)
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
    check(d.max_member_bytes >= 1, "data.max_member_bytes", "must be >= 1 (bytes)")
    check(d.max_text_len >= 4, "data.max_text_len", "must be >= 4")
    tokenizer = getattr(d, "tokenizer", None)
    problems += tokenizer_problems(
        OmegaConf.to_container(tokenizer, resolve=True) if isinstance(tokenizer, DictConfig) else tokenizer
    )
    if d.shards is None and not d.sources:
        check(
            d.name in BUILTIN_DATASETS,
            "data.name",
            f"is not a built-in dataset (built-in: {tuple(BUILTIN_DATASETS)}); point data.shards at your shard directory",
        )
    problems += data_problems(cfg)
    s = d.shapes
    check(s.n_train >= 1 and s.n_val >= 1 and s.n_test >= 1, "data.shapes", "split sizes must be >= 1")
    check(
        s.image_size >= 16 and s.image_size % 8 == 0,
        "data.shapes.image_size",
        "must be >= 16, a multiple of 8",
    )
    check(1 <= s.max_shapes <= 2, "data.shapes.max_shapes", "must be 1 or 2")
    check(d.moving_shapes.frames >= 2, "data.moving_shapes.frames", "must be >= 2 (motion needs two frames)")
    from xmodal.data.shapes import LANGUAGES

    check(s.language in LANGUAGES, "data.shapes.language", f"must be one of {LANGUAGES}")
    model_problems = model_node_problems(cfg)
    # The model node's roles are only trusted when the node itself is sound (reported either way).
    problems += role_problems(cfg, None if model_problems else task_config(cfg).roles())
    problems += model_problems
    check(cfg.logger.kind in LOGGERS, "logger.kind", f"must be one of {LOGGERS}")
    check(cfg.callbacks.monitor_mode in ("min", "max"), "callbacks.monitor_mode", "must be min or max")
    check(cfg.callbacks.progress_interval_s > 0, "callbacks.progress_interval_s", "must be > 0 seconds")
    if cfg.ckpt_path is not None:
        # A directory is a distributed (FSDP2) checkpoint.
        check(Path(cfg.ckpt_path).exists(), "ckpt_path", "no such checkpoint")
    check(cfg.run.max_nonfinite_steps >= 1, "run.max_nonfinite_steps", "must be >= 1")
    for key in ("peer_timeout_s", "stall_timeout_s"):
        value = cfg.run[key]
        check(
            math.isfinite(value) and value >= 0, f"run.{key}", f"must be >= 0 seconds, 0 = off (got {value})"
        )
    for key in cfg.run.allow_changes if isinstance(cfg, DictConfig) else ():
        found = OmegaConf.select(cfg, str(key), default=_NO_KEY) is not _NO_KEY
        check(found, "run.allow_changes", f"{key!r} names no config key")
    check(
        isinstance(cfg.experiment_name, str) and SAFE_NAME.match(cfg.experiment_name) is not None,
        "experiment_name",
        "must be 1-128 characters of letters, digits, '.', '_' or '-' and start with a letter or digit "
        "(it is a folder under paths.output_dir)",
    )
    check(
        cfg.run.dir is None,
        "run.dir",
        "is derived as <paths.output_dir>/<experiment_name>/<run.id>; set those instead",
    )
    return list(problems)


def compile_problems(cfg: Any, cuda: bool) -> list[str]:
    """``trainer.compile_mode`` is inductor's and ``trainer.compile_backend`` one dynamo knows; with
    inductor on CPU (``cuda`` False) a C++ compiler must be on PATH, else every net fails at its
    first call."""
    p = Problems(cfg)
    t = cfg.trainer
    p.check(t.compile_mode in COMPILE_MODES, "trainer.compile_mode", f"must be one of {COMPILE_MODES}")
    if not t.compile:
        return p
    import torch._dynamo

    p.check(
        t.compile_backend in torch._dynamo.list_backends(exclude_tags=()),
        "trainer.compile_backend",
        f"is not a torch.compile backend (e.g. {', '.join(torch._dynamo.list_backends())}, "
        "or the debug ones aot_eager, eager)",
    )
    p.check(
        t.compile_backend == "inductor" or t.compile_mode == "default",
        "trainer.compile_mode",
        f"is an inductor mode; backend {t.compile_backend!r} takes only 'default'",
    )
    if t.compile_backend == "inductor" and not cuda:
        import shutil

        p.check(
            any(shutil.which(cc) for cc in ("g++", "c++", "clang++")),
            "trainer.compile_backend",
            "inductor on CPU needs a C++ compiler (g++ or clang++) on PATH; use aot_eager or install one",
        )
    return p


def data_problems(cfg: Any) -> list[str]:
    """The data a run reads: fractions in range, every source readable, every split the run needs
    present and non-empty (carving or indexing once, cached), pipe: shards allowed. One line each."""
    from xmodal.data.resolve import resolve_source
    from xmodal.data.shards import pipe_urls
    from xmodal.data.splits import SplitSettings, split_problems

    p = Problems(cfg)
    d = cfg.data
    fractions = {"data.val_fraction": d.val_fraction, "data.test_fraction": d.test_fraction}
    for key, value in fractions.items():
        p.check(
            value is None or 0 <= value < 1, key, "must be >= 0 and < 1 (a share of the training samples)"
        )
    if (d.val_fraction or 0) + (d.test_fraction or 0) >= 1:
        p.append(
            "data.val_fraction: data.val_fraction + data.test_fraction must be < 1 (train would be empty)"
        )
    if p:
        return p
    needed = ("train", "val", "test") if getattr(cfg, "test_after_fit", True) else ("train", "val")
    if d.sources:
        return [*p, *source_problems(cfg, needed)]
    if d.shards is None:  # built-in data (generated later) has every split; explicit ones must exist
        for key in ("val_shards", "test_shards"):
            if getattr(d, key) is not None:
                try:
                    resolve_source(getattr(d, key))
                except (ValueError, OSError) as error:
                    p.append(f"data.{key}: {error}")
        return p
    p += split_problems(str(d.shards), SplitSettings.from_config(cfg), needed)
    if not d.allow_pipe and Path(d.shards, "sizes.json").is_file():
        piped = pipe_urls(d.shards)
        p.check(
            not piped,
            "data.allow_pipe",
            f"sizes.json lists {len(piped)} pipe: shard(s) that run shell commands, e.g. "
            f"{piped[0] if piped else ''!r}; set data.allow_pipe=true to run them",
        )
    return p


def source_problems(cfg: Any, needed: tuple[str, ...]) -> list[str]:
    """``data.sources``: not with ``data.shards``, every entry with shards, a usable weight (a whole
    number in exact mode) and a distinct safe name, every source readable with the splits the run
    needs (its own, or carved), and ``data.val_shards``/``test_shards``, when set, readable and
    not empty, in place of the sources' own split (no fraction > 0 beside them, no shard a
    source trains on). One line each."""
    from xmodal.data.mix import exact_weight_error, source_names, source_settings
    from xmodal.data.splits import (
        SplitSettings,
        check_apart,
        explicit_splits,
        resolve_explicit,
        resolve_splits,
        split_problems,
    )

    p = Problems(cfg)
    d = cfg.data
    if d.shards is not None:
        return [
            "data.sources: cannot be combined with data.shards (give one dataset as data.shards, "
            "several as data.sources)"
        ]
    entries = list(d.sources)
    for i, entry in enumerate(entries):
        key = f"data.sources[{i}]"
        if entry.shards is None:
            p.append(f"{key}.shards: must be set (any form data.shards takes)")
        weight = entry.weight
        if not (math.isfinite(weight) and weight > 0):
            p.check(False, f"{key}.weight", "must be a finite number > 0")
        elif d.mode == "exact" and not (float(weight).is_integer() and weight >= 1):
            p.append(exact_weight_error(i, weight))
        if entry.name is not None:
            p.check(
                SAFE_NAME.match(entry.name) is not None,
                f"{key}.name",
                "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
            earlier = [j for j, e in enumerate(entries[:i]) if e.name == entry.name]
            if earlier:
                p.append(f"{key}.name: {entry.name!r} already names data.sources[{earlier[0]}]")
    if p:
        return p
    names = source_names([str(e.shards) for e in entries], [e.name for e in entries])
    settings = SplitSettings.from_config(cfg)
    explicit = explicit_splits(settings)
    try:
        own = source_settings(settings)
    except ValueError as error:
        return [*p, str(error)]
    held_out = {}
    for split in explicit:
        try:
            held_out[split] = resolve_explicit(split, settings)
        except (ValueError, OSError) as error:
            p.append(str(error))
            continue
        if split in needed and not any(sh.num_samples for sh in held_out[split].shards):
            p.append(f"data.{split}_shards: {explicit[split]} holds no samples")
    for i, entry in enumerate(entries):
        lines = split_problems(str(entry.shards), own, tuple(s for s in needed if s not in explicit))
        for line in lines:
            p.append(f"data.sources[{i}] ({names[i]}): {line.removeprefix('data.shards: ')}")
        if lines:
            continue
        train = [sh.url for sh in resolve_splits(str(entry.shards), own).splits.get("train", [])]
        for split, ex in held_out.items():
            try:
                check_apart(
                    split,
                    [sh.url for sh in ex.shards],
                    train,
                    f"data.sources[{i}] ({names[i]})'s train split",
                )
            except ValueError as error:
                p.append(str(error))
    return p


def role_problems(cfg: Any, task_roles: tuple[str, ...] | None) -> list[str]:
    """``data.roles`` and ``data.optional_modalities`` name modalities; every role the task reads
    (``task_roles``; None when its node is unsound) resolves; each modality checks its ``data.*`` keys."""
    p = Problems(cfg)
    d = cfg.data
    roles = dict(d.roles)
    for role, name in roles.items():
        p.check(
            name in MODALITIES,
            f"data.roles.{role}",
            f"must name a modality among {tuple(MODALITIES.names())}",
        )
    for role in d.optional_modalities:
        if role not in MODALITIES and role not in roles:
            p.append(
                f"data.optional_modalities: must name modalities {tuple(MODALITIES.names())} or roles of "
                f"data.roles; {role!r} is neither (got {list(d.optional_modalities)!r})"
            )
    held = declared_modalities(cfg)
    for role in task_roles or ():
        if roles.get(role, role) not in MODALITIES:
            p.append(f"model: the task reads role {role!r}, which is no modality and not in data.roles")
        elif (
            held is not None
            and role not in roles
            and role not in held
            and role not in d.optional_modalities
            and not MODALITIES.attr(role, "decoded_always")
        ):
            p.append(
                f"model: the task reads role {role!r} (model.condition, model.source or model.target), "
                f"which is not a modality of the data: its sizes.json lists {held}"
            )
    for _, modality in MODALITIES.items():
        p += modality().problems(cfg)
    return p


def declared_modalities(cfg: Any) -> list[str] | None:
    """The modalities the data's ``sizes.json`` lists, or None where that is not known before the
    run (several sources, a remote source, a built-in dataset not generated yet, no list)."""
    d = cfg.data
    if d.sources:
        return None
    try:
        root = (
            absolute(str(d.shards)) if d.shards is not None else builtin_dir(absolute(cfg.paths.data_dir), d)
        )
        listed = json.loads((root / "sizes.json").read_text()).get("modalities")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return [str(m) for m in listed] if isinstance(listed, list) and listed else None


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
