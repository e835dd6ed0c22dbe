"""xmodal-eval ckpt_path=PATH [overrides]: test metrics of a checkpoint, printed and saved as JSON.

The data comes from the composed config (the default experiment's unless overridden); the model
and its tokenizer come from the checkpoint alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import lightning as L
import rich
import torch
from omegaconf import DictConfig
from rich.table import Table

from xmodal.callbacks.metrics_file import scalar_metrics
from xmodal.checkpoints import checkpoint_problem
from xmodal.config import CONFIG_DIR, ConfigError, absolute, register_schemas, validate
from xmodal.console import print_error
from xmodal.factory import build_datamodule, prepare_data, rich_progress, task_class
from xmodal.files import write_json_atomic
from xmodal.metrics.provenance import describe
from xmodal.registry import RegistryError
from xmodal.warnings_filter import install_warning_filters


def load_task(ckpt_path: str | Path) -> L.LightningModule:
    """The task of a single-file checkpoint, whatever its family (read from its hyperparameters)."""
    path = Path(ckpt_path)
    if path.is_dir():
        raise ConfigError(
            f"invalid config:\n  ckpt_path: {path} is a distributed (FSDP2) checkpoint directory; "
            "evaluate it with the same trainer=fsdp2 run, or consolidate it first"
        )
    problem = checkpoint_problem(path)
    if problem is not None:  # not a torch zip traceback or a bare EOFError
        raise ConfigError(f"invalid config:\n  ckpt_path: {path} is {problem}")
    hparams = torch.load(path, map_location="cpu", weights_only=False).get("hyper_parameters", {})
    name = hparams.get("model", {}).get("task")
    if name is None:
        raise ConfigError(
            f"invalid config:\n  ckpt_path: {path} was not written by xmodal-train (no model.task)"
        )
    return task_class(name).load_from_checkpoint(path, map_location="cpu", weights_only=False)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    if cfg.get("ckpt_path") is None:
        raise ConfigError(
            "invalid config:\n  ckpt_path: required, e.g. xmodal-eval ckpt_path=outputs/.../best.ckpt"
        )
    validate(cfg)
    install_warning_filters()  # the same known noise as a training run's (after Lightning's import)
    task = load_task(absolute(cfg.ckpt_path))
    datamodule = build_datamodule(cfg, prepare_data(cfg), tokenizer=task.tokenizer)
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=rich_progress(cfg),  # a redirected TQDM bar is only noise
        limit_test_batches=cfg.trainer.limit_test_batches,
    )
    trainer.test(task, datamodule=datamodule, verbose=False)
    metrics = scalar_metrics(trainer.callback_metrics, "test/")
    table = Table(title=f"test metrics: {cfg.ckpt_path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(metrics.items()):
        table.add_row(key, f"{value:.4f}")
    rich.print(table)
    # What FID/KID, the judge and the cycle score were measured with: a score is comparable only
    # to one of the same provenance (xmodal/metrics/provenance.py).
    provenance = (getattr(task, "metric_provenance", None) or {}).get("test", {})
    for family, record in sorted(provenance.items()):
        print(f"{family} ({', '.join(record['metrics'])}): {describe(record)}")
    out = absolute(cfg.ckpt_path).with_suffix(".eval.json")
    payload = {"ckpt_path": str(absolute(cfg.ckpt_path)), "test": metrics}
    if provenance:
        payload["provenance"] = provenance
    write_json_atomic(out, payload)
    rich.print(f"saved {out}")
    return metrics


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except ConfigError as err:
        print_error(str(err))
        sys.exit(2)


def main() -> None:
    try:
        register_schemas()  # imports plug-ins: a broken one is named in one line
    except RegistryError as err:
        print_error(str(err))
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
