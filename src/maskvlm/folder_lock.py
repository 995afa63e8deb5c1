"""One writer per output folder.

Two processes given the same run folder (two ``maskvlm pretrain --output-dir runs/a`` started a
moment apart, a ``--resume auto`` started while the first run still trains, two ``maskvlm index``
builds into one ``--out``) would otherwise both write there: checkpoints of one run replaced by the
other's, one ``metrics.jsonl`` with two runs in it, an index with rows written twice. The folder's
lock refuses the second process with the first one's description instead.

The lock is the kernel's (``flock`` on ``FOLDER/.maskvlm.lock``), so it goes with the process that
held it, however that process ends: there is never a stale lock to delete by hand. The file stays
behind, holding the last holder's description. Where the file system has no locks (some network
mounts) or the platform has no ``fcntl``, the folder is used unlocked, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

LOCK_FILE = ".maskvlm.lock"

log = logging.getLogger("maskvlm")


class FolderInUse(RuntimeError):
    """Another process holds the folder."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text or "its description could not be read"


@contextlib.contextmanager
def hold_folder(folder: Path, purpose: str, hint: str = "choose another folder", wait: bool = False):
    """Hold ``folder`` (created if needed) for this process while the block runs; ``FolderInUse``,
    naming the holder and ``hint``, if another process holds it, or with ``wait``, a log line naming
    the holder and a wait until it lets go. ``purpose`` (e.g. "training run") is what the lock file
    tells a process that finds the folder taken."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not a folder; {hint}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise FolderInUse(f"{folder} is in use by another maskvlm process ({_holder(path)}); "
                                  f"wait for it to end, or {hint}") from None
            log.info("%s is in use by another maskvlm process (%s); waiting for it", folder, _holder(path))
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # e.g. ENOLCK / EOPNOTSUPP on a file system without locks
            locked = False
            log.warning("cannot lock %s (%s); make sure no other process writes to %s", path, e, folder)
        if locked:
            os.ftruncate(fd, 0)
            os.write(fd, f"{purpose}, pid {os.getpid()} on {socket.gethostname()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock
