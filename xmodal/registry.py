"""Name → class registries of the plug-in kinds: tasks and modalities.

The core (factory, config validation, xmodal-generate, the data pipeline) looks things up here and
never compares against a task's or a modality's name, so a new one is new files plus a config:

- built-ins are registered lazily by ``xmodal.tasks`` and ``xmodal.modalities`` (an import path
  per name, imported on first use: naming a task does not import every task's nets);
- out-of-tree packages register through the ``xmodal.plugins`` entry-point group: each entry
  point names a module (imported) or a callable (imported, then called with no arguments) that
  calls :meth:`Registry.register`;
- a config may also give an import path instead of a name (``model.task=my_pkg.tasks:MyTask`` or
  ``my_pkg.tasks.MyTask``), so a one-off class needs no registration at all.

docs/ARCHITECTURE.md says which room may import which.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

log = logging.getLogger("xmodal")

T = TypeVar("T")

PLUGIN_GROUP = "xmodal.plugins"
"""Entry-point group of out-of-tree plug-in packages (pyproject ``[project.entry-points."xmodal.plugins"]``)."""


class RegistryError(ValueError):
    """An unknown name or an import path that does not resolve; the message names the config key."""


def import_object(path: str) -> Any:
    """``pkg.module:Name`` or ``pkg.module.Name`` → the object (ImportError / AttributeError if not)."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ImportError(f"{path!r} is not an import path (pkg.module:Name)")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


_plugins_loaded = False


def load_plugins() -> None:
    """Import every ``xmodal.plugins`` entry point once per process (a failing one is reported by name)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for point in entry_points(group=PLUGIN_GROUP):
        try:
            loaded = point.load()
        except Exception as err:  # a broken plug-in must not hide the others
            raise RegistryError(f"plug-in {point.name!r} ({point.value}) failed to import: {err}") from err
        if callable(loaded) and not isinstance(loaded, type):
            loaded()


class Registry(Generic[T]):
    """Names → classes of one kind. ``config_key`` is the config key that names them (for errors)."""

    def __init__(self, kind: str, config_key: str, builtins_module: str):
        self.kind = kind
        self.config_key = config_key
        self._builtins_module = builtins_module
        self._entries: dict[str, T | str] = {}
        self._hints: dict[str, dict[str, Any]] = {}
        self.version = 0
        """Bumped by every registration (caches derived from the registry compare it)."""

    def register(self, name: str, obj: T | str | None = None, **hints: Any) -> Any:
        """Register ``obj`` (a class, or an import path imported on first use) under ``name``;
        without ``obj``, a class decorator. A name registered twice is refused (two plug-ins
        claiming one name would otherwise pick a winner by import order). ``hints`` are class
        attributes known without importing the class (see ``attr``)."""
        if hints:
            self._hints[name] = hints

        def add(value: T | str) -> T | str:
            previous = self._entries.get(name)
            if previous is not None and previous is not value and _path_of(previous) != _path_of(value):
                raise RegistryError(
                    f"{self.kind} {name!r} is registered twice: {_path_of(previous)} and {_path_of(value)}"
                )
            self._entries[name] = value
            self.version += 1
            return value

        if obj is None:
            return add
        add(obj)
        return obj

    def _ensure_loaded(self) -> None:
        importlib.import_module(self._builtins_module)
        load_plugins()

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def get(self, name: str) -> T:
        """The class registered as ``name``, or the object at import path ``name``."""
        self._ensure_loaded()
        entry = self._entries.get(name)
        if entry is None:
            if "." not in name and ":" not in name:
                raise RegistryError(
                    f"{self.config_key}: unknown {self.kind} {name!r} (registered: {', '.join(self.names())}; "
                    f"or give an import path pkg.module:Class)"
                )
            try:
                return import_object(name)
            except (ImportError, AttributeError) as err:
                raise RegistryError(f"{self.config_key}: cannot import {name!r} ({err})") from err
        if isinstance(entry, str):
            entry = import_object(entry)
            self._entries[name] = entry
        return entry  # type: ignore[return-value]

    def attr(self, name: str, key: str) -> Any:
        """Class attribute ``key`` of ``name``: from the registration's hints when given (so
        ``--help`` need not import the class, nor torch), else from the class itself."""
        self._ensure_loaded()
        hints = self._hints.get(name, {})
        return hints[key] if key in hints else getattr(self.get(name), key)

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.names():
            yield name, self.get(name)

    def find(self, predicate: Callable[[T], bool]) -> list[str]:
        """Names whose class satisfies ``predicate``."""
        return [name for name, obj in self.items() if predicate(obj)]


def _path_of(obj: Any) -> str:
    return obj if isinstance(obj, str) else f"{obj.__module__}:{obj.__qualname__}"


TASKS: Registry[Any] = Registry("task", "model.task", "xmodal.tasks")
"""Task families: name → XmodalTask subclass (built-ins: xmodal/tasks/__init__.py)."""

MODALITIES: Registry[Any] = Registry("modality", "data.roles", "xmodal.modalities")
"""Modalities: name → Modality subclass (built-ins: xmodal/modalities/__init__.py)."""
