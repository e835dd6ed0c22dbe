"""Net slots: a config node with ``_target_`` builds any importable module, else the built-in.

Hydra-native swapping (as in lightning-hydra-template's ``net: {_target_: ...}``): every net
slot of a task's config (``model.encoder``, ``model.generator``, ...) is either unset (the
built-in) or a mapping instantiated by ``hydra.utils.instantiate`` with exactly the keys it gives,
so a user's module needs no change to the package. The resolved mapping is saved with the
checkpoint's hyperparameters, so a checkpoint rebuilds whatever was used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn


def build_slot(slot: Mapping[str, Any] | None, default: Callable[[], nn.Module]) -> nn.Module:
    """``default()`` when ``slot`` is unset, else the module ``slot["_target_"]`` instantiates."""
    if slot is None:
        return default()
    from hydra.utils import instantiate

    module = instantiate(dict(slot), _convert_="all")
    if not isinstance(module, nn.Module):
        raise TypeError(f"{slot['_target_']} built a {type(module).__name__}, not a torch.nn.Module")
    return module
