"""Atomic file writes and content hashing for the artifact cache.

Every artifact is written to a temporary file in the destination folder, flushed and fsync'ed,
then renamed over the destination: a reader sees the old file or the new one, never half of one.
A failed write (a full disk, say) removes its temporary file and leaves the previous artifact intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is fsync'ed and renamed to ``dest``."""
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
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(dest: Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


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


def atomic_torch_save(dest: Path, obj: Any) -> None:
    import torch

    with atomic_path(dest) as tmp:
        torch.save(obj, tmp)


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
