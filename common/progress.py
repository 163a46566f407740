"""Progress bars (rich) for long work, on stderr so stdout stays machine-readable."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console = Console(stderr=True)


def progress_enabled() -> bool:
    """Bars are drawn on a terminal unless ``STEALRANGE_NO_PROGRESS`` is set."""
    return sys.stderr.isatty() and not os.environ.get("STEALRANGE_NO_PROGRESS")


def make_progress(enabled: bool | None = None) -> Progress:
    """A rich Progress with count, elapsed and remaining time; disabled off a terminal."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_console,
        disable=not (progress_enabled() if enabled is None else enabled),
        transient=False,
    )
