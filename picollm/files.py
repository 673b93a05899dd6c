"""Writing a file so that a reader never sees half of it.

``atomic_open(path)`` hands out a temporary file beside ``path``; when the block ends the
file is flushed, fsynced and renamed over ``path`` in one step, and when it fails the
temporary is removed and ``path`` is as it was. ``write_atomic`` does that for bytes or
text. A rename is durable only once its directory is fsynced too: ``fsync_dir`` (or
``sync_dir=True``) does that, once per batch of renames where several files go together.

Temporary names carry the writer's host, pid and a random suffix (``TMP_RE``), so two
writers, even on two hosts sharing a filesystem, never share one, and a later writer can
tell which temporaries belong to a dead process (``checkpoint`` removes those).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
from pathlib import Path
from typing import BinaryIO, Iterator, Union

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
# .NAME.HOST.PID.RANDOM.tmp: one writer's temporary file or folder.
TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
# fsync of a directory that the filesystem does not support (some network filesystems)
_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def temp_path(path: Path) -> Path:
    """A temporary name next to ``path`` that no other writer (process or host) uses."""
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike], sync_dir: bool = False) -> Iterator[Path]:
    """A temporary path for a writer that needs a file name (safetensors, torch.save): what
    it wrote there is fsynced and renamed over ``path`` when the block ends without error."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: Union[str, os.PathLike], sync_dir: bool = False) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` (fsynced first) when the block ends without error."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # ours alone: another writer's temp file is not touched
        raise
    if sync_dir:
        fsync_dir(path.parent)


def write_atomic(path: Union[str, os.PathLike], data: Union[bytes, str], sync_dir: bool = False) -> Path:
    """``data`` (text is written as UTF-8) into ``path`` through ``atomic_open``; returns ``path``."""
    with atomic_open(path, sync_dir) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def fsync_dir(path: Union[str, os.PathLike]) -> None:
    """Make the renames in ``path`` durable. They have already happened, so a filesystem
    that cannot fsync a directory (EINVAL on some network filesystems) gets best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host still runs: a temporary file or folder named
    after a dead one is litter from a killed writer."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True
