"""Shared rich console (stderr, so stdout stays clean for JSON) and progress bars.

`rich.progress` is imported when a progress bar is made, not when the console is (start-up time)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress

console = Console(stderr=True)


def progress(*fields: str, disable: bool = False) -> Progress:
    """A progress bar with step counter, it/s, elapsed and ETA; `fields` are extra task fields
    shown as name=value (pass them to `add_task`/`update`, e.g. loss="0.123")."""
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

    class RateColumn(ProgressColumn):
        """Iterations per second (rich only ships a bytes/s column)."""

        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("  -- it/s" if speed is None else f"{speed:6.2f} it/s", style="cyan")

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
