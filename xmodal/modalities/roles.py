"""Roles → modalities: the default role of each modality is its name; ``data.roles`` adds more.

``data.roles: {src: image, tgt: image}`` lets a sample hold two images (members ``key.src.png``
and ``key.tgt.png``), read by tasks as ``batch["src"]`` and ``batch["tgt"]``.
"""

from __future__ import annotations

from collections.abc import Mapping

from xmodal.modalities.base import Modality
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


def always_decoded_roles() -> tuple[str, ...]:
    """Default roles of the modalities decoded for every sample (captions, labels)."""
    return tuple(name for name, cls in MODALITIES.items() if cls.decoded_always)
