"""The run-directory lock: one holder at a time, refused with the holder's details, and
free again as soon as the holder exits, however it exits."""

import fcntl
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from picollm.run_lock import LOCK_NAME, RunLock, RunLockedError

REPO = Path(__file__).resolve().parents[1]
# Takes the lock, says so, and holds it until its stdin closes (then exits normally).
HOLDER = ("import sys; from picollm.run_lock import RunLock\n"
          "with RunLock(sys.argv[1]):\n"
          "    print('locked', flush=True)\n"
          "    sys.stdin.read()\n")


def start_holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), "--marker"], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"  # progress: the holder has the lock now
    return proc


def held(lock: RunLock) -> bool:
    """Whether ``lock``'s file is flocked now: a second open of it cannot take the lock."""
    fd = os.open(lock.path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock when it got one
    return False


def test_a_second_process_is_refused_with_the_holders_pid_host_and_command(tmp_path):
    holder = start_holder(tmp_path / "run")
    try:
        with pytest.raises(RunLockedError) as refused:
            RunLock(tmp_path / "run").acquire()
        message = str(refused.value)
        assert f"in use by pid {holder.pid} on host {socket.gethostname()}" in message
        assert "--marker" in message and "-c" in message  # the holder's command line
        assert message.endswith("wait for it, stop it, or pick another run_dir.")
        assert message.count(". ") == 0  # one sentence
    finally:
        holder.communicate("")
    assert holder.returncode == 0


def test_the_lock_is_free_once_the_holder_is_killed(tmp_path):
    holder = start_holder(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL
    with RunLock(tmp_path / "run") as lock:  # no stale lock: the kernel dropped it
        assert held(lock)
        assert f'"pid": {os.getpid()}' in (tmp_path / "run" / LOCK_NAME).read_text()


def test_the_lock_is_free_once_the_holder_exits_normally(tmp_path):
    holder = start_holder(tmp_path / "run")
    holder.communicate("")  # closing stdin lets it leave its `with` block
    assert holder.returncode == 0
    RunLock(tmp_path / "run").acquire().release()


def test_release_in_this_process_frees_it_and_a_second_holder_here_is_refused(tmp_path):
    first = RunLock(tmp_path / "run").acquire()
    with pytest.raises(RunLockedError, match=f"in use by pid {os.getpid()} "):
        RunLock(tmp_path / "run").acquire()
    first.release()
    assert not held(first) and (tmp_path / "run" / LOCK_NAME).read_text() == ""
    with RunLock(tmp_path / "run"):
        pass
    with RunLock(tmp_path / "run"):  # and again: the context manager released it
        pass
