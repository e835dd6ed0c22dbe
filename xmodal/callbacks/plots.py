"""Loss and metric curves as PNGs in ``plots/`` (and W&B), redrawn at every validation and at the end.

The points come from files in the run dir, so a resumed run draws its whole history: validation
rows from ``metrics.jsonl`` (written by MetricsFile, which runs before this callback), and the
training losses of each logged step, appended here to ``plots/train.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from xmodal.callbacks.metrics_file import scalar_metrics


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def draw_curves(
    train: list[dict[str, Any]], val: list[dict[str, Any]], monitor: str, out: Path
) -> Path | None:
    """Panels: training losses, validation losses, the monitored metric (each vs step). None when
    there is nothing to draw yet."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    panels = [
        ("training losses", train, lambda k: "loss" in k),
        ("validation losses", val, lambda k: "loss" in k and k != monitor),
        (monitor, val, lambda k: k == monitor),
    ]
    panels = [(title, rows, keep) for title, rows, keep in panels if any(keep(k) for r in rows for k in r)]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, (title, rows, keep) in zip(axes[0], panels, strict=True):
        names = sorted({k for r in rows for k in r if keep(k)})
        for name in names:
            points = sorted((r["step"], r[name]) for r in rows if name in r)
            axis.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                label=name,
                marker="." if len(points) < 30 else None,
            )
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(names) > 1:
            axis.legend(fontsize=7)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    figure.savefig(tmp, dpi=90, format="png")
    plt.close(figure)
    tmp.replace(out)  # a reader never sees half a PNG
    return out


class MetricPlots(L.Callback):
    """Draws ``plots/curves.png`` (rank zero) from ``metrics.jsonl`` and the logged training losses."""

    def __init__(self, run_dir: Path, monitor: str):
        self.run_dir = Path(run_dir)
        self.monitor = monitor
        self.train_file = self.run_dir / "plots" / "train.jsonl"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        every = max(trainer.log_every_n_steps, 1)
        if trainer.global_step % every:
            return
        # Read on every rank, written by rank zero: reading callback_metrics may compute synced
        # metrics, a collective that would hang DDP if rank zero alone ran it (as in MetricsFile).
        losses = {k: v for k, v in scalar_metrics(trainer.callback_metrics, "train/").items() if "loss" in k}
        if losses and trainer.is_global_zero:
            self.train_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.train_file, "a") as f:
                f.write(json.dumps({"step": trainer.global_step, **losses}, sort_keys=True) + "\n")

    def draw(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        train = read_rows(self.train_file)
        val = read_rows(self.run_dir / "metrics.jsonl")
        path = draw_curves(train, val, self.monitor, self.run_dir / "plots" / "curves.png")
        if path is None:
            return
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image("plots/curves", [str(path)], step=trainer.global_step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.draw(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.draw(trainer)
