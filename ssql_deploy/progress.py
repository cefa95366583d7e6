"""The shared rich consoles and progress bar, so every stage reports long work the same way."""

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# Logs and progress go to stderr, result tables to stdout; off a terminal rich would wrap at 80
# columns, which truncates tables in CI logs.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
results = Console(width=None if sys.stdout.isatty() else 160)


class _StatusColumn(ProgressColumn):
    """Free text a loop sets with `bar.update(task, status=...)` (loss, accuracy, ...)."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("status", "")))


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        _StatusColumn(),
        console=console,
    )
