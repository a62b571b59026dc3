"""An exclusive lock on a run directory for the life of a training run.

Why: two training processes on one run directory (the same command started twice, a requeued job
whose first incarnation still runs) interleave checkpoints, metrics.jsonl and results.json into a
directory neither can resume from. The first start holds RUN_DIR/.lock; a second one stops at
once with a RunLockedError naming the holder and the directory.

The lock file holds one JSON object naming its holder, e.g.
    {"host": "node17", "pid": 4242, "started": "2025-05-01T09:30:12+02:00"}
(`started`: local time with its UTC offset). The lock itself is `fcntl.flock` on that file, so
the kernel (or the NFS lock manager) drops it however the holder ends, `kill -9` included; the
file is deleted on a clean release. A file left behind by a holder that is gone (killed, or a
machine that went down) is therefore not held: it is taken over with a printed warning naming the
holder it names.

On a file system without flock (Lustre mounted without `flock`, some FUSE mounts) the file's
existence is the lock (created with O_EXCL) and its content decides: a holder on this host
whose pid is alive, or a holder on another host (whose liveness cannot be checked from here),
refuses; a holder on this host whose pid is gone is taken over with a warning.

    lock = RunLock(run_dir); lock.acquire(); ...; lock.release()     # or: with RunLock(run_dir): ...
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from flaxen.errors import FlaxenError

LOCK_FILE = ".lock"
# flock errors that mean "this file system cannot lock", not "someone holds it"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLockedError(FlaxenError):
    """Another process holds the run directory's lock."""


def holder_record() -> dict:
    """This process as a lock holder: host, pid and start time."""
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started}


def describe(holder: dict | None) -> str:
    if not holder:
        return "a process that has not written its host and pid yet"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def pid_alive(pid) -> bool:
    """Whether a process with this pid runs on this host (a pid of another user's process counts)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    try:
        value = json.loads(data.decode())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class RunLock:
    """The lock on `run_dir` (created if missing). `log` prints the take-over warning."""

    def __init__(self, run_dir: str, log=print):
        self.directory = os.path.abspath(os.path.expanduser(run_dir))
        self.path = os.path.join(self.directory, LOCK_FILE)
        self.log = log
        self.record: dict | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Takes the lock or raises RunLockedError naming the holder (FlaxenError when the
        directory or the lock file cannot be created)."""
        if self.held:
            return self
        try:
            return self._acquire()
        except OSError as error:
            raise FlaxenError(f"cannot lock run directory {self.directory}: {error.strerror} "
                              f"({error.filename or self.path})") from error

    def _acquire(self) -> "RunLock":
        os.makedirs(self.directory, exist_ok=True)
        while True:
            try:
                fd, created = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    fd, created = os.open(self.path, os.O_RDWR), False
                except FileNotFoundError:  # released (deleted) between the two opens
                    continue
            try:
                previous, retry = self._lock(fd, created)
            except BaseException:
                os.close(fd)
                raise
            if not retry:
                break
            os.close(fd)
        if previous:
            self.log(f"warning: {self.path} names {describe(previous)}, which no longer holds it "
                     f"({self._why_stale(previous)}); taking the run directory over")
        self.record = holder_record()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _lock(self, fd: int, created: bool) -> tuple[dict | None, bool]:
        """(the stale record found in the file, whether to open the file again)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._locked_error(_read(fd)) from None
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                raise
            return self._lock_without_flock(fd, created)
        try:  # the holder before us may have released and deleted the file after our open
            if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                return None, True
        except FileNotFoundError:
            return None, True
        return _read(fd), False

    def _lock_without_flock(self, fd: int, created: bool) -> tuple[dict | None, bool]:
        if created:
            return None, False
        holder = _read(fd)
        mine = socket.gethostname()
        if holder is None or holder.get("host") != mine or (
                pid_alive(holder.get("pid")) and holder.get("pid") != os.getpid()):
            raise self._locked_error(holder, unlockable=True)
        os.unlink(self.path)  # a dead holder's file: remove it and race for a fresh one (O_EXCL)
        self.log(f"warning: {self.path} names {describe(holder)}, whose process is not running; removed it")
        return None, True

    def _why_stale(self, holder: dict) -> str:
        if holder.get("host") == socket.gethostname() and not pid_alive(holder.get("pid")):
            return f"pid {holder.get('pid')} is not running"
        return "it ended without releasing the lock"

    def _locked_error(self, holder: dict | None, unlockable: bool = False) -> RunLockedError:
        hint = ("Wait for it to finish or stop it, or train in another run directory "
                "(hydra.run.dir=PATH).")
        if unlockable:
            hint += (f" This file system does not support file locks, so liveness is judged from {self.path}: "
                     "if that process is gone, delete the file.")
        return RunLockedError(f"run directory {self.directory} is in use by another training process: "
                              f"{describe(holder)} ({self.path}). {hint}")

    def release(self) -> None:
        """Deletes the lock file (still holding the lock) and unlocks; a no-op when not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
