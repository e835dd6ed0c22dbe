"""The known, harmless warnings and tips a default run would print, filtered one by one.

Each entry matches one message (a regex from its start), its category and the module that issues
it, so that any other warning — from the same library too — still shows. Each says why it does not
apply to an xmodal run. Installed by ``xmodal-train`` after Lightning is imported (a filter added
later goes first: Lightning's own import-time filters must not override these).

Two other known messages are fixed where they arise rather than filtered: ``weights_only was not
set`` (``LastCheckpoint`` passes ``weights_only=False``: its checkpoints carry the data stream
position and loop state, by design) and W&B's "anonymous setting has no effect"
(:func:`quiet_wandb_init`).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KnownWarning:
    message: str
    """Regex matched at the start of the warning's text."""
    category: type[Warning]
    module: str
    """Regex matched against the whole name of the module the warning is attributed to."""
    why: str
    """Why it is harmless for an xmodal run."""


def known_warnings() -> tuple[KnownWarning, ...]:
    """The filtered ``warnings.warn`` messages (Lightning's category imported only when needed)."""
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    return (
        KnownWarning(
            r"The `srun` command is available on your system but is not used",
            PossibleUserWarning,
            r"lightning\.fabric\.plugins\.environments\.slurm",
            "a run started without srun on a machine that has it (a login node, a local test) is "
            "meant to be one process; xmodal's sbatch scripts start ranks with srun themselves",
        ),
        KnownWarning(
            r"`isinstance\(treespec, LeafSpec\)` is deprecated",
            FutureWarning,
            r"lightning\.pytorch\.utilities\._pytree",
            "torch's deprecation of a class Lightning's own pytree copy still builds; nothing for the "
            "user to change, and it works in this torch",
        ),
        KnownWarning(
            r"The number of training batches \(\d+\) is smaller than the logging interval",
            PossibleUserWarning,
            r"lightning\.pytorch\.loops\.fit_loop",
            "with max_steps and no epoch limit Lightning logs every log_every_n_steps optimizer "
            "steps across epochs, so short epochs (small data) lose no training logs",
        ),
        KnownWarning(
            r"Checkpoint directory .* exists and is not empty\.",
            UserWarning,
            r"lightning\.pytorch\.callbacks\.model_checkpoint",
            "xmodal owns the run dir: a resumed run writes into its own checkpoints/ on purpose, "
            "and best.ckpt / last.ckpt are replaced atomically, never versioned",
        ),
        KnownWarning(
            r"Metric `Kernel Inception Distance` will save all extracted features in buffer",
            UserWarning,
            r"torchmetrics\.utilities\.prints",
            "the GAN and translation tasks score at most model.gan.metric_samples rows per pass "
            "(512 by default), so the buffer holds that many feature rows per rank at most",
        ),
    )


KNOWN_TIPS = (
    # An advertisement Lightning logs at every Trainer construction without a LitLogger.
    re.compile(r"💡 Tip: For seamless cloud logging and experiment tracking, try installing \[litlogger\]"),
)
# rank_zero_info logs through whichever of these its module last pointed at.
TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropKnownTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(tip.match(message) for tip in KNOWN_TIPS)


_TIP_FILTER = _DropKnownTips()


def install_warning_filters() -> None:
    """Ignore exactly the known messages (idempotent: a multirun calls it for every job)."""
    for known in known_warnings():
        warnings.filterwarnings(
            "ignore", message=known.message, category=known.category, module=known.module + r"\Z"
        )
    for name in TIP_LOGGERS:
        logger = logging.getLogger(name)
        if _TIP_FILTER not in logger.filters:
            logger.addFilter(_TIP_FILTER)


def quiet_wandb_init(loggers: Iterable[Any]) -> None:
    """Drop the ``anonymous`` argument Lightning's ``WandbLogger`` always hands ``wandb.init``:
    W&B (>= 0.19) warns that the setting has no effect whatever its value, None included."""
    for logger in loggers:
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)
