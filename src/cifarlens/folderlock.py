"""Claiming a run folder for one process: an exclusive ``flock`` on the folder itself.

A training (and --force, --resume) holds it while it writes the run; evaluate, calibrate, report
and robustness hold it too, so none of them writes figures of weights that a training beside it
is changing. The lock goes with the process (a killed training leaves none). A process claims a
folder once: its own nested claims (train's final evaluation) are counted, not locked again.
Where locks cannot be taken (no fcntl, some network file systems), nothing is guarded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cifarlens.errors import CifarlensError

_CLAIMED: dict[str, list[int]] = {}  # real path of a folder this process has claimed -> [fd, claims]


def claim(folder: Path) -> str | None:
    """Claim ``folder`` (it must exist); the key to :func:`release` it with, or None where it
    cannot be locked. A folder another process holds is a one-line error."""
    try:
        import fcntl
    except ImportError:  # not on POSIX
        return None
    key = os.path.realpath(folder)
    if key in _CLAIMED:  # this process holds it already
        _CLAIMED[key][1] += 1
        return key
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened to read (mode 0311): unguarded; the command says what fails
        return None
    try:
        for attempt in range(5):  # a moment's grace: held_elsewhere's probe (compare) holds it for microseconds
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 4:
                    raise
                time.sleep(0.05)
    except BlockingIOError:
        os.close(fd)
        raise CifarlensError(f"run folder {folder} is in use by another cifarlens process (a training, --resume, "
                             "evaluate, calibrate, report or robustness of it is running); wait for it to end, or "
                             "stop it first") from None
    except OSError:  # a file system without locks: go on unguarded, as before
        os.close(fd)
        return None
    _CLAIMED[key] = [fd, 1]
    return key


def release(key: str | None) -> None:
    if key is None or key not in _CLAIMED:
        return
    _CLAIMED[key][1] -= 1
    if _CLAIMED[key][1] == 0:
        os.close(_CLAIMED.pop(key)[0])  # closing the descriptor releases the flock


def held_elsewhere(folder: Path) -> bool | None:
    """Whether another process holds ``folder`` (a training of it runs); None where that cannot
    be told (no fcntl, no such folder, a file system without locks)."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released with the descriptor below
        return False
    except BlockingIOError:
        return os.path.realpath(folder) not in _CLAIMED
    except OSError:
        return None
    finally:
        os.close(fd)


def moved(key: str | None) -> bool:
    """Whether the folder claimed under ``key`` is no longer where it was claimed (moved, renamed or
    deleted while this process holds it); False where nothing was claimed."""
    if key is None or key not in _CLAIMED:
        return False
    held = os.fstat(_CLAIMED[key][0])
    try:
        now = os.stat(key)
    except OSError:
        return True
    return (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino)
