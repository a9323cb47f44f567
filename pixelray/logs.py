"""How pixelray's log records reach a person: the library logs through `logging` (loggers under
"pixelray"); the command line calls `show_logs()` to print them on stderr as plain lines. In Ray's
workers, Ray forwards what they log to the driver: warnings everywhere, and INFO too from Ray Train
workers, whose root logger Ray Train sets up."""

from __future__ import annotations

import logging
import os
import warnings


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


HARMLESS = (  # Ray's warnings that say nothing to act on in a pixelray job
    "Token authentication is enabled",
    "Progress bars disabled",
    "is now ignored by default when packaging the working directory",
    "does not have any available CPUs",  # the job's model pool holds them, by its plan (runtime.plan_pool)
)
_quiet = False


class _NotHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in HARMLESS)


def quiet_ray() -> None:
    """A quiet terminal for the command line (unless --verbose): Ray's INFO lines, its progress tables (the job
    draws its own progress line: pipelines/progress.py), Ray's warnings with nothing to act on (HARMLESS) and
    the model libraries' download and loading bars are not shown; other warnings and errors are. Call before
    Ray starts (its workers inherit the environment set here); Ray's start sets its loggers up again, so
    `init_ray` calls `ray_started()` after it."""
    global _quiet
    _quiet = True
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", message=r".*`ray_remote_args` is deprecated.*")
    ray_started()


def ray_log_level() -> int:
    """The level Ray's own loggers get (`ray.init(logging_level=...)`)."""
    return logging.WARNING if _quiet else logging.INFO


def ray_started() -> None:
    """(Again) quiet Ray's loggers and Ray Data's progress output, when `quiet_ray` was called."""
    if not _quiet:
        return
    for name in ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        for handler in logger.handlers:
            if not any(isinstance(f, _NotHarmless) for f in handler.filters):
                handler.addFilter(_NotHarmless())
    try:
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.issue_detectors_config.detectors = []  # ("Found 1 issues": hanging or memory guesses)
    except ImportError:  # (ray without its data extra)
        pass
