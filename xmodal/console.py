"""What the user sees in the terminal: the config tree, errors, log files."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import rich
import rich.console
from omegaconf import DictConfig, OmegaConf
from rich.syntax import Syntax
from rich.tree import Tree

log = logging.getLogger("xmodal")

TREE_ORDER = ("experiment_name", "run", "data", "model", "trainer", "logger", "callbacks", "paths", "seed")


def config_tree(cfg: DictConfig) -> Tree:
    tree = Tree("[bold]config[/bold]", guide_style="dim")
    keys = [k for k in TREE_ORDER if k in cfg] + [k for k in cfg if k not in TREE_ORDER]
    for key in keys:
        branch = tree.add(f"[bold cyan]{key}[/bold cyan]")
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    return tree


def print_config_tree(cfg: DictConfig, save_to: Path | None = None, shown: DictConfig | None = None) -> None:
    """Print the tree of ``shown`` (default: all of ``cfg``); ``save_to`` gets the full tree."""
    rich.print(config_tree(cfg if shown is None else shown))
    if save_to is not None:
        with open(save_to, "w") as f:
            # force_jupyter=False: in a notebook Rich would display the tree instead of writing the file.
            rich.console.Console(file=f, force_jupyter=False).print(config_tree(cfg))
        if shown is not None:
            note = (
                f"[dim]the task's own nodes shown; the full config: {rich.markup.escape(str(save_to))}[/dim]"
            )
            rich.get_console().print(note, soft_wrap=True)  # the path stays on one line


def print_error(message: str) -> None:
    """``error: message`` on stderr, its lines never re-wrapped (a path stays greppable on one line)."""
    console = rich.console.Console(file=sys.stderr, soft_wrap=True)
    console.print(f"[bold red]error:[/bold red] {rich.markup.escape(message)}")


def log_to_console_if_unconfigured() -> logging.Handler | None:
    """A stdout handler for xmodal's records when nothing would show them (``train()`` called from
    Python or a notebook, where Hydra's job logging is not set up: progress lines, the summary and
    warnings went nowhere but to Python's last-resort WARNING handler). None when a handler exists."""
    xmodal_log = logging.getLogger("xmodal")
    if xmodal_log.hasHandlers():
        return None
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    xmodal_log.addHandler(handler)
    xmodal_log.setLevel(logging.INFO)
    return handler


def log_to_file(path: Path) -> logging.Handler:
    """Mirror xmodal's and Lightning's log records into the run dir."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("xmodal", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("xmodal").setLevel(logging.INFO)
    return handler


def stop_logging_to(handler: logging.Handler) -> None:
    for name in ("xmodal", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).removeHandler(handler)
    handler.close()


@contextmanager
def progress_counter(enabled: bool, label: str, total: int | None = None) -> Iterator[Callable[[], None]]:
    """Yield ``advance()`` for a rich progress bar (a spinner and a count when ``total`` is unknown),
    or a no-op when disabled."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if total is None:
        columns = (SpinnerColumn(), TextColumn(f"{label} {{task.completed}}"), TimeElapsedColumn())
    else:
        columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)
