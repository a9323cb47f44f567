"""One job at a time per store: the lock a batch job holds on its output directory while it runs.

    OUT/pixelray.lock    {"host", "pid", "since", "refreshed", "token"} of the job holding the store

Two jobs writing one store would both process everything, and the second one's resume clean-up
would delete the first one's temporary files; the second job is refused instead, with a one-line
error naming the holder (StoreLockedError).

- Local and NFS-mounted stores: the lock is an flock on the file. The kernel releases it when the
  holder exits, however it exits, so a lock left by a killed job never blocks the next one.
- Object stores (s3://, gs://, ...) have no lock primitive: the file itself is the lock. The holder
  rewrites it every REFRESH_S; one not rewritten for STALE_S, or left by a dead process of this
  host, is taken over. This is best-effort: two jobs starting within the same instant may both
  write the file, and the one that reads back another's token refuses.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid

import pyarrow.fs as pafs

from pixelray.errors import PixelrayError

logger = logging.getLogger(__name__)

LOCK_FILE = "pixelray.lock"
REFRESH_S = 30.0
STALE_S = 300.0


class StoreLockedError(PixelrayError):
    """Another job holds the store."""

    status, code = 409, "store_locked"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(text: str) -> dict:
    try:
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}


class StoreLock:
    """The lock on one store; `acquire()` raises StoreLockedError when another job holds it."""

    def __init__(self, fs: pafs.FileSystem, root: str, uri: str):
        self.fs, self.path, self.uri = fs, f"{root}/{LOCK_FILE}", uri
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self.token = uuid.uuid4().hex
        self._file = None  # local: the open, flocked lock file
        self._stop: threading.Event | None = None  # object stores: stops the refresher
        self._refresher: threading.Thread | None = None

    def _record(self, since: float | None = None) -> bytes:
        now = time.time()
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since or now)),
                           "refreshed": now, "token": self.token}).encode()

    def _refuse(self, holder: dict) -> StoreLockedError:
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
               if holder else "details unavailable")
        return StoreLockedError(f"{self.uri} is in use by another pixelray job ({who}); wait for it to end or "
                                f"stop it (if no job runs, delete {self.uri}/{LOCK_FILE})")

    def acquire(self) -> None:
        self._acquire_local() if self.local else self._acquire_shared()

    def release(self) -> None:
        """Give the store back (idempotent)."""
        if self._file is not None:
            try:
                os.unlink(self.path)  # while still locked: a job waiting on this inode re-checks the path
            except OSError:
                pass
            self._file.close()  # closes the descriptor: the flock goes with it
            self._file = None
        if self._stop is not None:
            self._stop.set()
            self._refresher.join()
            self._stop = self._refresher = None
            try:
                if (self._read_shared() or {}).get("token") == self.token:
                    self.fs.delete_file(self.path)
            except OSError:
                pass

    # --- local and NFS: flock -------------------------------------------------------------------

    def _acquire_local(self) -> None:
        import fcntl

        for _ in range(10):
            f = open(self.path, "a+b")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                f.seek(0)
                holder = _holder(f.read().decode(errors="replace"))
                f.close()
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise self._refuse(holder) from None
                raise
            try:  # the holder we raced with may have unlinked the file before letting go of it
                same = os.path.samestat(os.fstat(f.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                f.close()
                continue
            f.seek(0)
            f.truncate()
            f.write(self._record())
            f.flush()
            self._file = f
            return
        raise self._refuse({})

    # --- object stores: a refreshed lock file ---------------------------------------------------

    def _read_shared(self) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return _holder(f.read().decode(errors="replace"))
        except FileNotFoundError:
            return None

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not _pid_alive(holder["pid"])
        refreshed = holder.get("refreshed")
        return not isinstance(refreshed, (int, float)) or time.time() - refreshed > STALE_S

    def _write_shared(self, since: float) -> None:
        with self.fs.open_output_stream(self.path) as f:
            f.write(self._record(since))

    def _acquire_shared(self) -> None:
        holder = self._read_shared()
        if holder is not None and not self._stale(holder):
            raise self._refuse(holder)
        if holder is not None:
            logger.warning("note: taking over the lock of %s left by pid %s on %s (not refreshed since %s)",
                           self.uri, holder.get("pid"), holder.get("host"), holder.get("since"))
        since = time.time()
        self._write_shared(since)
        holder = self._read_shared()
        if holder is None or holder.get("token") != self.token:  # another job wrote it at the same time
            raise self._refuse(holder or {})
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh, args=(since,), daemon=True,
                                           name="pixelray-store-lock")
        self._refresher.start()

    def _refresh(self, since: float) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                holder = self._read_shared()
                if holder is not None and holder.get("token") != self.token:
                    logger.error("error: the lock of %s was taken over by pid %s on %s; this job and that one "
                                 "may now both write the store", self.uri, holder.get("pid"), holder.get("host"))
                    return
                self._write_shared(since)
            except Exception as e:  # a transient object-store error: the next refresh tries again
                logger.warning("note: could not refresh the lock of %s: %s", self.uri, e)
