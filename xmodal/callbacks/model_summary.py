"""The model table at the start of fit, without Lightning's FLOPs column when it counted nothing.

Lightning measures FLOPs only on a module's ``example_input_array``, which no xmodal task sets (a
batch is a dict of roles): its table then carries a FLOPs column of zeros and "Total FLOPs: 0".
(The per-step FLOPs a run really does are measured by ``callbacks/throughput.py``.)
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)

RIGHT_ALIGNED = ("Params", "Params per Device", "FLOPs", "In sizes", "Out sizes")


def table_columns(summary_data: list[tuple[str, list[str]]], total_flops: int) -> list[tuple[str, list[str]]]:
    """Lightning's summary columns, less FLOPs when none were counted."""
    return [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops > 0]


class ModelTable(RichModelSummary):
    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = table_columns(summary_data, total_flops)
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(
                name, justify="right" if name in RIGHT_ALIGNED else "left", no_wrap=name == "Name"
            )
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        totals = [
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", str(total_training_modes["train"])),
            ("Modules in eval mode", str(total_training_modes["eval"])),
        ]
        if total_flops > 0:
            totals.append(("Total FLOPs", get_human_readable_count(total_flops)))
        grid = Table.grid(expand=True)
        grid.add_column()
        for label, value in totals:
            grid.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(grid)
