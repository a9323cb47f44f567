"""How pixelray's log records reach a person: the library logs through `logging` (loggers under
"pixelray"); the command line calls `show_logs()` to print them on stderr as plain lines. In Ray's
workers, Ray forwards what they log to the driver: warnings everywhere, and INFO too from Ray Train
workers, whose root logger Ray Train sets up."""

from __future__ import annotations

import logging


class _Lines(logging.StreamHandler):
    """stderr, the message alone."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))


def show_logs(level: int = logging.INFO) -> None:
    """Print pixelray's records of `level` and above on stderr (once, however often it is called)."""
    logger = logging.getLogger("pixelray")
    if not any(isinstance(h, _Lines) for h in logger.handlers):
        logger.addHandler(_Lines())
    logger.setLevel(level)
