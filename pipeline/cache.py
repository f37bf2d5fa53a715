"""Atomic file writes and content hashing for the artifact cache.

Every artifact is written to a temporary file in the destination folder, flushed and fsync'ed,
then renamed over the destination: a reader sees the old file or the new one, never half of one.
A failed write (a full disk, say) removes its temporary file and leaves the previous artifact intact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


class DiskFull(OSError):
    """A write that ran out of space; the message names the file. Its partial file is removed."""


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is fsync'ed and renamed to ``dest``.

    On any error the temporary file is removed and ``dest`` keeps its previous content; a full disk
    (ENOSPC, EDQUOT) is re-raised as :class:`DiskFull` naming ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(exc, DiskFull):
            raise DiskFull(
                exc.errno,
                f"{dest}: disk full (no space left on device) while writing it; the partial file was "
                "removed and earlier artifacts are intact; free some space and rerun to resume",
            ) from exc
        raise


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (one function, so that tests can simulate a full disk here)."""
    with open(path, "wb") as fh:
        fh.write(data)


def atomic_write_bytes(dest: Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        _write_file(tmp, data)


def atomic_write_text(dest: Path, text: str) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"))


def atomic_write_json(dest: Path, obj: Any) -> None:
    atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_npy(dest: Path, array: np.ndarray) -> str:
    """Save ``array`` as ``.npy`` atomically; returns the sha256 of the bytes written."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    data = buf.getvalue()
    atomic_write_bytes(dest, data)
    return hashlib.sha256(data).hexdigest()


def _digest_file(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def atomic_torch_save(dest: Path, obj: Any) -> None:
    """``torch.save`` atomically, with the file's sha256 in ``<dest>.sha256`` for :func:`verified_torch_load`.

    torch.load does not notice altered bytes inside a checkpoint, hence the checksum. The sidecar
    lists the new and the old digest while the file is being replaced, so a kill between the two
    renames leaves a pair that still verifies.
    """
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    new = hashlib.sha256(data).hexdigest()
    sidecar = _digest_file(dest)
    old = [line.strip() for line in sidecar.read_text().splitlines()] if sidecar.is_file() else []
    atomic_write_text(sidecar, "\n".join([new, *old]) + "\n")
    atomic_write_bytes(dest, data)
    atomic_write_text(sidecar, new + "\n")


def verified_torch_load(path: Path, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` of a file written by :func:`atomic_torch_save`.

    A file without ``.sha256`` (written before checksums were recorded) is only checked by
    torch.load itself, which notices truncation but not altered bytes.

    Raises:
        ValueError: the file is missing, its checksum does not match, or torch cannot read it (the
            message names the file); callers turn it into their own error.
    """
    import torch

    sidecar = _digest_file(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from e
    if sidecar.is_file():
        allowed = {line.strip() for line in sidecar.read_text().splitlines() if line.strip()}
        if hashlib.sha256(data).hexdigest() not in allowed:
            raise ValueError(f"{path}: checksum does not match the one recorded at write time (truncated or altered)")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle: whatever torch raises, the file is unusable
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from e


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys): the basis of every cache key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def remove_stale_temps(folder: Path, is_alive: Callable[[Path], bool] | None = None) -> int:
    """Delete ``.*.tmp`` leftovers of writes that were killed; returns how many were removed."""
    n = 0
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            if is_alive is None or not is_alive(p):
                p.unlink(missing_ok=True)
                n += 1
    return n
