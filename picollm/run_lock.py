"""One training process per run directory.

``RunLock(run_dir)`` takes an exclusive ``fcntl.flock`` on ``run_dir/.picollm.lock``.
The kernel drops the lock when its holder exits in any way (kill -9 included), so a dead
holder never blocks the next run: there is no stale lock to clean up. The holder writes
its pid, host and command line into the file, and a second process is refused with one
sentence naming them. Under torchrun only rank 0 takes it (the other ranks belong to the
same run); nothing here needs the other ranks.

flock works on local filesystems and on NFS (Linux maps it onto NFS byte-range locks);
on a filesystem without locking ``acquire`` raises the kernel's OSError (ENOLCK). A child
forked without exec (a DataLoader worker) shares the lock until it exits too.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Optional

LOCK_NAME = ".picollm.lock"


class RunLockedError(RuntimeError):
    pass


class RunLock:
    """Exclusive use of ``run_dir`` for this process, until ``release`` or exit."""

    def __init__(self, run_dir) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(_refusal(self.run_dir, holder)) from None
        except BaseException:
            os.close(fd)
            raise
        _write_holder(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up. The file stays: deleting it would let a process that opened the
        old file and one that creates a new one both hold "the" lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no holder any more
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _command_line() -> str:
    try:  # what was typed (python -m picollm.train ...), not the resolved script path
        argv = Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        words = [a.decode(errors="replace") for a in argv]
    except OSError:
        words = [sys.executable, *sys.argv]
    text = shlex.join(words)
    return text if len(text) <= 300 else text[:297] + "..."


def _write_holder(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    data = json.dumps(holder).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read_holder(fd: int) -> dict:
    """The holder's details; empty while it is between taking the lock and writing them."""
    for _ in range(50):
        try:
            data = os.pread(fd, 65536, 0)
            if data:
                return json.loads(data)
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return {}


def _refusal(run_dir: Path, holder: dict) -> str:
    if not holder:
        return (f"run_dir {run_dir} is in use by another process (it has not written its details yet); "
                "wait for it, stop it, or pick another run_dir.")
    return (f"run_dir {run_dir} is in use by pid {holder.get('pid')} on host {holder.get('host')} "
            f"(command: {holder.get('command')}, since {holder.get('since')}); wait for it, stop it, "
            "or pick another run_dir.")
