"""Messages for the user: the one place that writes the `[ds-finetune]` prefix and prints a message.

Status lines (what was resumed, saved, skipped, waited for) are printed by the process that knows them,
on stdout by default: the launcher passes every rank's stdout through, and tests read these lines. Where
a sink other than print is needed (the progress bar's `write`, which keeps the bar intact), the caller
formats with `tagged` and hands the line to that sink.
"""

from __future__ import annotations

import sys

PREFIX = "[ds-finetune]"


def tagged(text: str) -> str:
    """`text` as a user message line (prefix included)."""
    return f"{PREFIX} {text}"


def say(text: str) -> None:
    """Print a message for the user on stdout, at once (a launcher may buffer otherwise)."""
    print(tagged(text), flush=True)


def say_on_stderr(text: str) -> None:
    """The same message on stderr: for commands whose stdout is kept for their result (`ds-finetune data
    prepare` writes its progress bar and summary there too)."""
    print(tagged(text), file=sys.stderr, flush=True)
