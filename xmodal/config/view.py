"""The config as the console shows it at the start of a run: the nodes this task uses.

The full resolved config is still written (``config.yaml``, ``config_tree.log`` in the run dir);
the console gets what a user of this task reads and tunes: no ``cluster`` node (only
``xmodal-submit`` reads it), no built-in dataset options when the data is the user's own shards,
and no data keys of a modality no role of the task uses (an image captioner has no
``audio_mels``) and no node of a built-in dataset it does not read (``data.moving_shapes`` on
shapes). Keys of a modality are the ``data.<modality>_*`` keys (``image_size``,
``audio_frames``).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from xmodal.data.builtin import BUILTIN_DATASETS
from xmodal.registry import MODALITIES
from xmodal.tasks.config import task_config

NOT_SHOWN = ("cluster",)
"""Top-level nodes no training run reads."""


def used_modalities(cfg: DictConfig) -> set[str]:
    """Modalities of the roles the task reads (required and optional), via ``data.roles``."""
    roles = dict(cfg.data.roles)
    task = task_config(cfg)
    used = [*task.roles(), *task.optional_roles(), *cfg.data.optional_modalities]
    return {roles.get(role, role) for role in used}


def hidden_data_keys(cfg: DictConfig) -> list[str]:
    """``data`` keys that do not apply to this run."""
    unused = [m for m in MODALITIES.names() if m not in used_modalities(cfg)]
    hidden = [key for key in cfg.data if any(str(key).startswith(f"{m}_") for m in unused)]
    if cfg.data.shards is not None:  # the user's shards: the built-in datasets' settings are moot
        hidden += ["name", *(key for key in cfg.data if key in BUILTIN_DATASETS)]
    else:  # another built-in dataset's own node (data.shapes is read by every shapes-based one)
        hidden += [
            key for key in cfg.data if key in BUILTIN_DATASETS and key not in ("shapes", cfg.data.name)
        ]
    return hidden


def shown_config(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` (resolved) without the nodes and keys this task does not use."""
    shown = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in hidden_data_keys(cfg):
        shown.data.pop(key, None)
    for key in NOT_SHOWN:
        shown.pop(key, None)
    return shown
