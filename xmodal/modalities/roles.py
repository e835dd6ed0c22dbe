"""Roles → modalities: the default role of each modality is its name; ``data.roles`` adds more.

``data.roles: {src: image, tgt: image}`` lets a sample hold two images (members ``key.src.png``
and ``key.tgt.png``), read by tasks as ``batch["src"]`` and ``batch["tgt"]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from xmodal.modalities.base import Modality
from xmodal.problems import Problems
from xmodal.registry import MODALITIES, RegistryError


def modality_of(role: str, roles: Mapping[str, str] | None = None) -> Modality:
    """The modality object that fills ``role`` (KeyError-like RegistryError naming the role)."""
    name = (roles or {}).get(role, role)
    if name not in MODALITIES:
        raise RegistryError(
            f"role {role!r} is not a modality (registered: {', '.join(MODALITIES.names())}) "
            f"and not declared in data.roles"
        )
    return MODALITIES.get(name)()


def role_map(roles: Mapping[str, str] | None, names: Iterable[str]) -> dict[str, Modality]:
    return {role: modality_of(role, roles) for role in names}


def always_decoded_roles() -> tuple[str, ...]:
    """Default roles of the modalities decoded for every sample (captions, labels)."""
    return tuple(name for name, cls in MODALITIES.items() if cls.decoded_always)


def role_problems(cfg: Any) -> list[str]:
    """``data.roles`` and ``data.optional_modalities`` name modalities; every role the task needs
    resolves; each modality in use checks its own ``data.*`` keys."""
    from xmodal.tasks.config import model_node_problems, task_config

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
    if model_node_problems(cfg):
        return p  # the model node is reported on its own; its roles cannot be trusted
    used: set[str] = set()
    task_roles = task_config(cfg).roles()
    for role in (*task_roles, *d.optional_modalities):
        name = roles.get(role, role)
        if name in MODALITIES:
            used.add(name)
        elif role in task_roles:
            p.append(f"model: the task reads role {role!r}, which is no modality and not in data.roles")
    for name in sorted(used):
        p += MODALITIES.get(name)().problems(cfg)
    return p
