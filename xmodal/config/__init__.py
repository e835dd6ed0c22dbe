"""Config: the typed schema of every entry point (schema.py) and the checks that run before any
rank starts (validate.py). Task families own their ``model`` node (xmodal/tasks/<family>/config.py)."""

from xmodal.config.schema import (
    CONFIG_DIR,
    ConfigError,
    TrainConfig,
    absolute,
    compose_config,
    register_schemas,
    world_size,
)
from xmodal.config.validate import config_problems, validate

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "TrainConfig",
    "absolute",
    "compose_config",
    "config_problems",
    "register_schemas",
    "validate",
    "world_size",
]
