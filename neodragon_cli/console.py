"""Shared rich console (stderr, so stdout stays clean for JSON) and progress bars."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Iterations per second (rich only ships a bytes/s column)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("  -- it/s" if speed is None else f"{speed:6.2f} it/s", style="cyan")


def progress(*fields: str, disable: bool = False) -> Progress:
    """A progress bar with step counter, it/s, elapsed and ETA; `fields` are extra task fields
    shown as name=value (pass them to `add_task`/`update`, e.g. loss="0.123")."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    columns += [TextColumn(f"{name}={{task.fields[{name}]}}") for name in fields]
    return Progress(*columns, console=console, disable=disable)
