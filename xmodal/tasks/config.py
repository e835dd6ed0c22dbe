"""The ``model`` config node: a typed dataclass per task family, and how one is found and checked.

Each task family owns a :class:`TaskConfig` subclass next to its code (``CaptionConfig`` in
xmodal/tasks/caption/config.py, ...). Hydra types the ``model`` group's YAML files with it (each
file starts with ``defaults: [<task>_schema, _self_]``), so a key the family does not have is
refused while composing; the central validator merges the node onto the class again (a task given
by import path has no stored schema) and calls :meth:`TaskConfig.problems`. Tasks read their
config as attributes of that dataclass, never as ``dict.get(key, default)``: one default per key.

This module imports no nets and no Lightning: composing and validating a config stays cheap.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from xmodal.problems import Problems, unknown_keys
from xmodal.registry import TASKS, RegistryError, import_object

C = TypeVar("C", bound="TaskConfig")


@dataclass
class TaskConfig:
    """What every task family's ``model`` node has."""

    task: str = ""
    """Task family: a registered name (``caption``, ``gan``, ``vae``, or a plug-in's) or an import
    path ``pkg.module:TaskClass``."""
    ema_decay: float = 0.0
    """EMA of the task's trainable weights (xmodal/callbacks/ema.py), used for validation metrics,
    samples and the saved checkpoints' weights; 0 = off. The GAN's is ``model.gan.ema_decay``."""

    def roles(self) -> tuple[str, ...]:
        """Batch roles every sample must have (a sample without one is skipped and counted)."""
        raise NotImplementedError

    def optional_roles(self) -> tuple[str, ...]:
        """Roles decoded when a sample has them (absent: masked, never skipped), e.g. the label
        roles a judge reads (``model.gan.judge_labels``); ``data.optional_modalities`` adds more."""
        return ()

    def problems(self, cfg: Any) -> list[str]:
        """Problems of this node (and of the keys elsewhere it depends on), as
        ``<key>: <why> (got <value>)`` with keys from the root (``model.lr``)."""
        return []

    def lightning_max_steps(self, max_steps: int) -> int:
        """Lightning's ``max_steps`` for ``trainer.max_steps`` (which counts what this task calls a step)."""
        return max_steps

    @classmethod
    def from_node(cls: type[C], node: Mapping[str, Any] | DictConfig) -> C:
        """The typed config of a ``model`` node or a checkpoint's hparams dict.

        Keys the class lacks are dropped: checkpoints written before the per-task split carried
        every family's keys (the validator reports such keys in a config, naming each).
        """
        plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        typed = OmegaConf.merge(OmegaConf.structured(cls), _known(plain, cls))
        return typing.cast(C, OmegaConf.to_object(typed))


def _known(node: Mapping[str, Any], schema: type) -> dict[str, Any]:
    types = typing.get_type_hints(schema)
    out = {}
    for key, value in node.items():
        if key not in types:
            continue
        nested = types[key]
        out[key] = (
            _known(value, nested)
            if dataclasses.is_dataclass(nested) and isinstance(value, Mapping)
            else value
        )
    return out


_BUILTIN_CONFIGS: dict[str, str] = {}


def register_config(task_name: str, config_path: str) -> None:
    """Declare where a built-in task's config class lives, so composing a config does not import
    the task's nets (the task class itself is registered in xmodal/tasks/__init__.py)."""
    _BUILTIN_CONFIGS[task_name] = config_path


def config_class(task: str) -> type[TaskConfig]:
    """The config dataclass of a task name or import path (``RegistryError`` if there is none)."""
    if task in TASKS and task in _BUILTIN_CONFIGS:  # `in TASKS` loads built-ins and plug-ins first
        return import_object(_BUILTIN_CONFIGS[task])
    cls = getattr(TASKS.get(task), "config_class", None)
    if not (isinstance(cls, type) and issubclass(cls, TaskConfig)):
        raise RegistryError(f"model.task: {task!r} has no config_class (a TaskConfig subclass)")
    return cls


def task_config(cfg: Any) -> TaskConfig:
    """The typed ``model`` node of a composed root config (keys it lacks are dropped)."""
    return config_class(cfg.model.task).from_node(cfg.model)


def model_node_problems(cfg: Any) -> list[str]:
    """Every problem of ``cfg.model``: unknown task, keys the family lacks, wrong types, and the
    family's own checks."""
    task = cfg.model.get("task") if isinstance(cfg.model, (DictConfig, Mapping)) else None
    if not task:
        return ["model.task: must name a task family (got None)"]
    try:
        cls = config_class(task)
    except RegistryError as err:
        return [str(err)]
    plain = OmegaConf.to_container(cfg.model, resolve=True)
    problems = [f"model.{key}: not a config key of {schema}" for key, schema in unknown_keys(plain, cls)]
    try:
        typed = cls.from_node(plain)
    except Exception as err:  # omegaconf ValidationError: a value of the wrong type
        return [*problems, f"model: {str(err).splitlines()[0]}"]
    problems += ema_problems(typed, cfg)
    return [*problems, *typed.problems(cfg)]


def ema_problems(typed: TaskConfig, cfg: Any) -> list[str]:
    p = Problems(cfg)
    p.check(0.0 <= typed.ema_decay < 1.0, "model.ema_decay", "must be in [0, 1)")
    if typed.ema_decay > 0:
        p.check(
            not hasattr(typed, "gan"),
            "model.ema_decay",
            "the GAN averages its generator itself: set model.gan.ema_decay instead",
        )
        p.check(
            cfg.trainer.strategy != "fsdp2",
            "model.ema_decay",
            "not supported under FSDP2 yet (sharded weights); use trainer=ddp or leave it 0",
        )
    return p


# ------------------------------------------------------------------ shared by several families


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up then cosine decay (the caption and VAE families)."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100


def optimizer_problems(problems: Problems, m: OptimizerConfig) -> None:
    problems.check(m.lr > 0, "model.lr", "must be > 0")
    problems.check(m.weight_decay >= 0, "model.weight_decay", "must be >= 0")
    problems.check(m.warmup_steps >= 0, "model.warmup_steps", "must be >= 0")


def manual_optimization_problems(problems: Problems, cfg: Any, family: str) -> None:
    """Trainer settings a manual-optimization family (``family``: its name in messages) cannot run."""
    t = cfg.trainer
    problems.check(
        t.strategy != "fsdp",
        "trainer.strategy",
        f"Lightning's FSDP1 'fsdp' does not support manual optimization ({family}); use trainer=fsdp2",
    )
    problems.check(
        t.accumulate_grad_batches == 1,
        "trainer.accumulate_grad_batches",
        f"manual optimization ({family}) steps every batch; must be 1",
    )


CONDITIONS = ("none", "label", "text", "audio")


@dataclass
class ConditionConfig:
    """What a conditional generator (GAN, VAE) is conditioned on, through one condition-encoder slot."""

    condition: Any = "none"
    """none | label | text | audio: the batch role the condition encoder reads; or a list of them
    (``[text, audio]``): one encoder each, fused together (xmodal/nn/condition.py MultiCondition).
    Typed ``Any`` because OmegaConf has no str-or-list type; :func:`condition_problems` checks it."""
    num_classes: int = 10
    """Classes of ``label`` conditioning (and of the domain classifier's label head)."""
    cond_dim: int = 128
    """Width of the condition vector the encoder produces."""
    d_model: int = 128
    """Width of the text / audio condition encoders."""
    heads: int = 4
    text_layers: int = 1
    """Transformer layers of the built-in text condition encoder. More than one lets a word's
    features carry its phrase's other words before pooling (which colour goes with which shape)."""
    text_position_std: float = 0.02
    """Init scale of the text condition encoder's learned position embeddings (the word embeddings
    start at 1). At 0.02 the encoder starts as a bag of words, and a generator's loss never asks
    for word order strongly enough to grow them: which colour goes with which place stays unread
    (BENCHMARKS.md "Binding colours to places"). 1.0 starts order as loud as the words."""
    dropout: float = 0.0
    condition_encoder: Any = None
    """``_target_`` of any module called as ``encoder(batch) -> [B, cond_dim]`` (instantiated with
    the keys given here; interpolate ``${model.cond_dim}``); unset = the built-in for ``condition``."""

    def conditions(self) -> tuple[str, ...]:
        """``condition`` as a tuple of names (``none``: empty)."""
        return condition_names_of(self.condition)


def condition_names_of(condition: Any) -> tuple[str, ...]:
    """A ``model.condition`` value (a name or a list of names) as a tuple, ``none`` left out."""
    if isinstance(condition, str):
        names: tuple[Any, ...] = (condition,)
    else:  # a list; anything else is no condition here (and a problem condition_problems reports)
        names = tuple(condition) if isinstance(condition, list | tuple) else ()
    return tuple(str(name) for name in names if name != "none")


def condition_problems(problems: Problems, m: ConditionConfig, target: str) -> None:
    single = isinstance(m.condition, str)
    names = [m.condition] if single else m.condition if isinstance(m.condition, list) else None
    known = names is not None and len(names) > 0 and all(name in CONDITIONS for name in names)
    problems.check(
        known and (single or "none" not in names),
        "model.condition",
        f"must be one of {CONDITIONS} or a list of {CONDITIONS[1:]}",
    )
    if known and len(set(names)) < len(names):
        problems.check(False, "model.condition", "names a condition twice")
    problems.check(m.d_model % max(m.heads, 1) == 0, "model.d_model", f"must divide by model.heads={m.heads}")
    problems.check(m.text_layers >= 1, "model.text_layers", "must be >= 1")
    problems.check(m.text_position_std >= 0, "model.text_position_std", "must be >= 0")
    problems.check(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")
    problems.check(m.num_classes >= 1, "model.num_classes", "must be >= 1")
    problems.check(m.cond_dim >= 1, "model.cond_dim", "must be >= 1")
    if target in m.conditions():
        article = "an" if target[:1] in "aeiou" else "a"
        problems.append(
            f"model.condition: {article} {target} target cannot be conditioned on itself (got {target!r})"
        )
    check_slot(problems, "model.condition_encoder", m.condition_encoder)


def judge_monitor_problems(
    problems: Problems, judged: bool, judge_labels: Mapping[str, Any], needs: str
) -> None:
    """A ``callbacks.monitor`` on a judge metric names one the run will log: refused now, not by
    the checkpoint callback at the first validation, after the judges' and the model's training.
    ``judged``: the task's judges are on for this run; ``needs``: what turns them on."""
    monitor = str(problems.cfg.callbacks.monitor)
    if not monitor.startswith("val/judge_"):
        return
    if not judged:
        problems.append(
            f"callbacks.monitor: {monitor} is a judge metric, and the judge is off (needs {needs})"
        )
        return
    from xmodal.metrics.provenance import judge_names  # imports torch, which this module does not

    logged = [f"val/{name}" for role in ("label", *judge_labels) for name in judge_names(role)]
    problems.check(monitor in logged, "callbacks.monitor", f"the judges log {logged}")


def judge_label_problems(problems: Problems, key: str, judge_labels: Mapping[str, Any]) -> None:
    """``judge_labels`` / ``aux_labels`` (role → number of classes) name roles of the label
    modality, each with >= 2 classes; ``label`` itself is covered already (``model.num_classes``)."""
    roles = dict(problems.cfg.data.get("roles") or {})
    for role, classes in judge_labels.items():
        if role == "label":
            problems.append(
                f"{key}.label: the class label (model.num_classes) is covered already; list other label roles here"
            )
        elif roles.get(role) != "label":
            problems.append(
                f"{key}.{role}: needs data.roles.{role}: label (read from key.{role}.cls or '{role}' in "
                f"each sample's JSON) (got data.roles.{role}={roles.get(role)!r})"
            )
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
            problems.append(f"{key}.{role}: the number of classes must be an integer >= 2 (got {classes!r})")


def condition_roles(target: str, condition: Any) -> tuple[str, ...]:
    """The target role and every condition role (a name or a list; ``none``: the target alone)."""
    return (target, *(name for name in condition_names_of(condition) if name != target))


def check_slot(problems: Problems, key: str, slot: Any) -> None:
    """A net slot is unset or a mapping with an importable ``_target_``; a target defining
    ``slot_problems(key, options, cfg) -> list[str]`` checks its own options (full-key lines, e.g.
    a weights directory that does not exist: xmodal/nn/pretrained.py) before anything is built."""
    if slot is None:
        return
    target = slot.get("_target_") if isinstance(slot, Mapping) else None
    if not isinstance(target, str):
        problems.append(f"{key}: must be unset or a mapping with _target_ (got {slot!r})")
        return
    try:
        built = import_object(target)
    except (ImportError, AttributeError) as err:
        problems.append(f"{key}._target_: cannot import {target!r} ({err})")
        return
    own_check = getattr(built, "slot_problems", None)
    if callable(own_check):
        options = {name: value for name, value in slot.items() if name != "_target_"}
        problems.extend(own_check(key, options, problems.cfg))
