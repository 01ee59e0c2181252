"""One writer per directory: an exclusive `flock` that dies with its process.

    with hold(run_dir / ".lock", "run dir", fix, TrainError):  # refused at once if held
        ...

The lock is the kernel's, not the file: a process killed by SIGKILL or an OOM loses it at
once and leaves nothing to clean up by hand (at most an unlocked file that the next holder
takes over). The file names the holder (pid, host, since, command) so a refused process can
say who. The holder removes the file while still holding it; a process that opened the old
file just before sees its inode gone after locking and retries on the new one, so two
holders can never lock two different files of one path.

On a network filesystem flock must be supported (NFSv4, Lustre mounted with -o flock).
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def holder(lock_file: Path) -> str:
    try:
        return lock_file.read_text().strip() or "a process that is starting"
    except OSError:
        return "another process"


def busy(lock_file: Path, what: str, fix: str, error: type[Exception]) -> Exception:
    return error(f"{what} is being written by {holder(lock_file)}: {fix}")


def acquire(lock_file: Path, what: str, fix: str, error: type[Exception]) -> int:
    """The locked file's descriptor, its holder line written; error(one line naming the
    holder and fix) if another process holds it."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise busy(lock_file, what, fix, error) from None
        try:
            if os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its last holder removed it while we waited to lock: take the new one
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    line = f"pid {os.getpid()} on {socket.gethostname()} (since {since}: {' '.join(sys.argv)})"
    os.ftruncate(fd, 0)
    os.pwrite(fd, (line + "\n").encode(), 0)
    return fd


def release(lock_file: Path, fd: int) -> None:
    """Remove the file while still holding it, then let go."""
    try:
        lock_file.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextmanager
def hold(lock_file: Path, what: str, fix: str, error: type[Exception]) -> Iterator[None]:
    fd = acquire(lock_file, what, fix, error)
    try:
        yield
    finally:
        release(lock_file, fd)


def check_free(lock_file: Path, what: str, fix: str, error: type[Exception]) -> None:
    """Refuse, before any work, a path another process holds; changes nothing on disk."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except OSError:  # no lock file (or no dir): nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise busy(lock_file, what, fix, error) from None
    finally:
        os.close(fd)
