"""Safety of a run folder: one writer at a time, finished runs kept, interrupted writes cleaned up.

* :class:`RunLock`: an exclusive ``fcntl.flock`` on ``<run folder>/.nnpre_train.lock`` held while a trainer
  runs. The kernel drops it when the process dies (also after ``kill -9``), so a stale lock never blocks a
  later run; a second run into the same folder stops with one line naming the holder's pid.
* :func:`finished_checkpoint`: the ``checkpoint_final.pth`` of a run that reached its last epoch. A new run into
  that folder needs ``--overwrite``; ``--c`` just reports it.
* :func:`remove_stale_temp_files`: ``.tmp_*`` files that an interrupted atomic write (:mod:`nnpre.atomic`) left
  behind; ``--c`` removes them.
"""
from __future__ import annotations

import fcntl
import os
import socket
from typing import List, Optional

from nnpre.errors import fail

LOCK_FILE = ".nnpre_train.lock"
FINAL_CHECKPOINT = "checkpoint_final.pth"


class RunLock:
    """Exclusive lock of a run folder (see module doc). ``acquire`` fails with a one-line error when held."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_FILE)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            fail(f"another training run ({holder}) is writing to {os.path.dirname(self.path)}; wait for it to "
                 f"finish or stop it (two runs into one folder would overwrite each other's checkpoints)")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def finished_checkpoint(folder: str, num_epochs: Optional[int] = None) -> Optional[str]:
    """``<folder>/checkpoint_final.pth`` if it exists and (given ``num_epochs``) reached that many epochs."""
    path = os.path.join(folder, FINAL_CHECKPOINT)
    if not os.path.isfile(path):
        return None
    if num_epochs is not None:
        from nnpre.checkpoints import safe_load

        try:
            if int(safe_load(path).get("current_epoch", 0)) < int(num_epochs):
                return None  # a longer run was asked for: --c continues it
        except Exception:  # noqa: BLE001 - unreadable: still a file we must not silently replace
            return path
    return path


def remove_stale_temp_files(folder: str) -> List[str]:
    """Delete ``.tmp_*`` leftovers of interrupted atomic writes in ``folder``; returns the removed paths."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if name.startswith(".tmp_") and os.path.isfile(p):
            os.remove(p)
            removed.append(p)
    return removed
