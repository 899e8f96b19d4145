"""The one way this package writes a file: atomically, durably, with the user's umask. No Lightning import.

:func:`atomic_write` writes into a temporary file beside the target (``.<name>.<pid>.<random>.tmp``), flushes and
``fsync``\\ s it, gives it the permissions of an ordinary new file (``0666 & ~umask``; ``mkstemp`` would leave
0600), moves it into place with ``os.replace`` and ``fsync``\\ s the directory. A crash at any point leaves either
the previous file or the new one, never a mix. A process killed mid-write leaves its temporary file behind: the
next successful write to the same target removes such orphans (those whose writing process is gone).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """``write(binary_file)`` into a temporary file beside ``path``, then move it into place. Returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)
    remove_orphans(target)
    return target


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def orphans(target: str | os.PathLike[str]) -> list[Path]:
    """Temporary files of earlier writes to ``target`` whose writing process no longer runs."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\..+\.tmp$")
    found = []
    for candidate in target.parent.glob(f".{target.name}.*.tmp"):
        match = pattern.match(candidate.name)
        if match and not _process_alive(int(match.group(1))):
            found.append(candidate)
    return found


def remove_orphans(target: str | os.PathLike[str]) -> None:
    for orphan in orphans(target):
        with contextlib.suppress(OSError):
            orphan.unlink()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own earlier temporary file: this write has finished with it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
