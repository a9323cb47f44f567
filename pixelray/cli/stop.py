"""How `pixelray serve` stops: Ctrl-C (SIGINT) or SIGTERM, at any moment (while Ray starts, while the app
deploys, while it serves), shuts Serve down, stops the Ray instance the command started and leaves no process
behind: what Ray's shutdown leaves (an agent of a half-started node, a replica whose raylet is gone) is
terminated, then killed, within a bounded time.

    with stops_cleanly():
        serve_cli.main(["run", config], ...)  # starts Ray, deploys, blocks until Ctrl-C
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import sys
from collections.abc import Iterator

import psutil

logger = logging.getLogger(__name__)

GRACE_S = 15.0  # from the first signal: Serve's and Ray's own shutdown, then what is left is terminated
TERMINATE_S = 5.0  # then killed
_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    """(Linux) Processes orphaned below this one (a replica whose raylet exited) become its children, not
    init's, so that they can be found and ended."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _descendants() -> set[psutil.Process]:
    try:
        return set(psutil.Process().children(recursive=True))
    except psutil.Error:
        return set()


def _end(processes: set[psutil.Process]) -> None:
    """Terminate the processes still running, wait, kill those that remain, and collect them all."""
    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(processes, timeout=TERMINATE_S)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=TERMINATE_S)


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)
_stopping = False


def _interrupt(signum, frame) -> None:
    """SIGINT, SIGTERM and the grace period's end: the first stops the command (as Ctrl-C does) and starts
    the grace period, a later one cuts the graceful shutdown short."""
    _start_grace()
    raise KeyboardInterrupt


def _start_grace() -> None:
    global _stopping
    if not _stopping:
        _stopping = True
        signal.setitimer(signal.ITIMER_REAL, GRACE_S)


def handle_signals() -> None:
    """SIGINT and SIGTERM as Ctrl-C (`ray.init` makes SIGTERM a plain exit: set again for the shutdown)."""
    for s in _SIGNALS:
        signal.signal(s, _interrupt)


def _shutdown() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        with contextlib.suppress(Exception):
            serve.shutdown()
    ray.shutdown()


@contextlib.contextmanager
def stops_cleanly() -> Iterator[None]:
    """Run the body; whatever ends it (a signal, an error, Serve's own exit), shut Serve and Ray down and end
    every process started below this one, all within GRACE_S + 2 x TERMINATE_S. A stop by a signal is a
    normal end. In a program that holds Ray already (its Ray, its processes) the body just runs."""
    global _stopping
    import ray

    if ray.is_initialized():
        yield
        return
    _become_subreaper()
    before = _descendants()
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    _stopping = False
    handle_signals()
    try:
        yield
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM (Ray's handler exits), `serve run`'s own exit
        pass
    except Exception as e:
        if type(e).__name__ != "Abort":  # click's Abort is how `serve run` passes on a Ctrl-C before it serves
            raise
    finally:
        handle_signals()
        _start_grace()
        started = _descendants()
        try:
            _shutdown()
        except (KeyboardInterrupt, SystemExit):  # a second Ctrl-C, or the grace period is over
            logger.warning("Serve and Ray did not stop in time: ending their processes")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)
            _end((started | _descendants()) - before)
            for s, handler in previous.items():
                signal.signal(s, handler)
