"""The run's console output, also kept in ``<run_dir>/train.log``."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator, TextIO


class _Tee:
    """Writes to the console and to a file; progress-bar redraws (``\\r``) stay on the
    console only, so the file holds the lines a user would want to read later."""

    def __init__(self, console: TextIO, file: TextIO) -> None:
        self.console, self.file = console, file

    def write(self, text: str) -> int:
        n = self.console.write(text)
        if "\r" not in text:
            self.file.write(text)
        return n

    def flush(self) -> None:
        self.console.flush()
        self.file.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding ... of the console
        return getattr(self.console, name)


@contextlib.contextmanager
def tee_to(path: Path) -> Iterator[None]:
    """Copy everything printed to stdout and stderr into ``path`` (appended) while
    the block runs."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8", buffering=1) as f:
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(saved[0], f), _Tee(saved[1], f)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved
