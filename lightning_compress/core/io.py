"""The one way this package writes a file: atomically, durably, with the user's umask. No Lightning import.

:func:`atomic_write` writes into a temporary file beside the target (``.<name>.<pid>.<random>.tmp``), flushes and
``fsync``\\ s it, gives it the permissions of an ordinary new file (``0666 & ~umask``; ``mkstemp`` would leave
0600), moves it into place with ``os.replace`` and ``fsync``\\ s the directory. A crash at any point leaves either
the previous file or the new one, never a mix. A process killed mid-write leaves its temporary file behind: the
next successful write to the same target removes such orphans (those whose writing process is gone).

:func:`read_safetensors_header` is the wary side of reading: it checks what a safetensors file declares (header
size, dtypes, shapes, byte ranges) against the file's real size before any tensor is read or allocated.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO


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
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename in (None, tmp):  # a full disk's write() names no file: name it
            raise OSError(err.errno, err.strerror or str(err), os.fspath(target)) from err
        raise
    _fsync_directory(target.parent)
    remove_orphans(target)
    return target


def check_export_path(value: str | os.PathLike[str], base_dir: str | os.PathLike[str], argument: str = "export_path",
                      *, create: bool = True) -> Path:
    """Where an export named ``value`` goes, checked before any training: a relative path lands in ``base_dir`` (the
    run's log directory, so runs never overwrite each other's exports), an absolute one is used as given. Refused
    with a ``ValueError`` naming ``argument`` and the value: an existing directory, an absolute path to an existing
    file, a directory that cannot be created (``/proc/...``) or written to. ``create``: make the directory."""
    given = Path(value).expanduser()
    path = given if given.is_absolute() else Path(base_dir) / given
    shown = f"`{argument}`={os.fspath(value)!r}"
    if path.is_dir():
        raise ValueError(f"{shown} is an existing directory; allowed: a file path ending in '.safetensors', or None")
    if given.is_absolute() and path.exists():
        raise ValueError(f"{shown} already exists; allowed: a new file, or a relative path (kept inside each run's "
                         "log directory)")
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"{shown}: its directory {str(path.parent)!r} cannot be created "
                             f"({err.strerror or err}); allowed: a path in a writable directory, or None") from None
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise ValueError(f"{shown}: its directory {str(path.parent)!r} is not writable; allowed: a path in a "
                             "writable directory, or None")
    return path


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


# ---------------------------------------------------------------------------- reading safetensors files warily
class UntrustedFileError(ValueError):
    """A file that cannot be what it claims to be: malformed header, inconsistent sizes, unexpected contents. The
    message names the file and the key."""


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on the JSON header
SAFETENSORS_DTYPES: dict[str, int] = {  # dtype code in the header -> bytes per element
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it (nothing of it has been read)."""

    dtype: str  # safetensors code, e.g. "F32", "I8", "U8"
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and check the header of a safetensors file without reading (or allocating) any tensor.

    The layout is an 8-byte little-endian header length, that many bytes of JSON, then the tensor bytes. Checked:
    the header fits in the file and in :data:`MAX_HEADER_BYTES`; it is a JSON object; every entry has a known
    dtype, a shape of non-negative integers and ``data_offsets`` inside the file whose length is exactly
    ``numel * itemsize``; ``__metadata__`` maps strings to strings. Raises :class:`UntrustedFileError` naming the
    file and the key, or ``FileNotFoundError`` / ``IsADirectoryError``.
    """
    name = os.fspath(path)
    with open(name, "rb") as handle:  # FileNotFoundError / IsADirectoryError name the path themselves
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise UntrustedFileError(f"{name!r} is not a safetensors file: {size} bytes, shorter than the 8-byte "
                                     "header length (truncated or empty)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise UntrustedFileError(f"{name!r} declares a {length}-byte header but holds {size} bytes in all "
                                     f"(at most {MAX_HEADER_BYTES} allowed): truncated or not a safetensors file")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UntrustedFileError(f"{name!r}: the safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise UntrustedFileError(f"{name!r}: the safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UntrustedFileError(f"{name!r}: `__metadata__` must map strings to strings, got {metadata!r:.200}")
    data_bytes = size - 8 - length
    tensors = {key: _tensor_entry(name, key, info, data_bytes) for key, info in header.items()}
    return SafetensorsHeader(tensors, metadata)


def _tensor_entry(name: str, key: str, info: Any, data_bytes: int) -> TensorEntry:
    where = f"{name!r}, key {key!r}"
    if not isinstance(info, dict):
        raise UntrustedFileError(f"{where}: the header entry must be an object, got {info!r:.200}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise UntrustedFileError(f"{where}: unknown dtype {dtype!r}; allowed: {sorted(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise UntrustedFileError(f"{where}: `shape` must be a list of non-negative integers, got {shape!r:.200}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise UntrustedFileError(f"{where}: `data_offsets` {offsets!r:.200} do not lie within the file's "
                                 f"{data_bytes} bytes of tensor data (truncated file?)")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise UntrustedFileError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes, but `data_offsets` "
                                 f"{offsets} cover {offsets[1] - offsets[0]}")
    return TensorEntry(dtype, tuple(shape), nbytes)
