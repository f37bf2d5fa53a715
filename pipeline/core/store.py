"""The artifact store: atomic writes, checksums, per-video items, checkpoints, temp sweeping.

Every artifact is written to a temporary file in the destination folder, flushed and fsync'ed,
then renamed over the destination: a reader sees the old file or the new one, never half of one.
A failed write (a full disk, say) removes its temporary file and leaves the previous artifact intact.
Files are created with the user's umask (like ``open``), so that colleagues on a shared server
can read reports and features when the umask allows it.

Per-video artifacts live in a store shared by run directories (:func:`default_store`), keyed by the
video's identity (its path and a fingerprint of the file, :func:`fingerprint`) and the settings that
shape them, never by which other videos are in the manifest; a stage's folder in the run directory
holds an ``index.json`` that maps the run's video ids to their items (:class:`StageDir`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.core.errors import CorruptArtifact

#: environment variable naming the shared store of per-video artifacts (``--store`` overrides it)
STORE_ENV = "WSVAD_STORE"


def default_store() -> Path:
    """Where per-video artifacts (features, flow, segments) are kept and shared between runs.

    ``$WSVAD_STORE`` if set, else ``$XDG_CACHE_HOME/wsvad-pipeline/store`` (``~/.cache/...``), the
    XDG base-directory convention for data that can be recomputed.
    """
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "wsvad-pipeline" / "store"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    """The mode ``open(path, 'w')`` would give a new file: 0o666 less the umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder: 0o777 less the umask."""
    return 0o777 & ~_umask()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0])[:32]


def temp_prefix(name: str) -> str:
    """Prefix of a temporary file for ``name``: it carries the writer's host and pid, so that the
    sweeper (:func:`remove_stale_temps`) leaves the temporaries of a live writer alone."""
    return f".{name}.h{_host()}-p{os.getpid()}."


_TAG = re.compile(r"\.h([A-Za-z0-9_]*)-p(\d+)\.")


class DiskFull(OSError):
    """A write that ran out of space; the message names the file. Its partial file is removed."""


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is fsync'ed and renamed to ``dest``.

    On any error the temporary file is removed and ``dest`` keeps its previous content; a full disk
    (ENOSPC, EDQUOT) is re-raised as :class:`DiskFull` naming ``dest``. The file gets the mode the
    user's umask gives new files.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dest.name), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _file_mode())  # mkstemp makes files private (0600); artifacts follow the umask
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


@contextlib.contextmanager
def scratch_path(folder: Path, name: str) -> Iterator[Path]:
    """Yield a temporary file path in ``folder`` for ``name`` (e.g. a downloaded archive read once),
    removed on exit whatever happens; tagged like every temporary (:func:`temp_prefix`) so that the
    sweeper knows its writer."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(name), suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


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


def _writer_alive(tmp: Path) -> bool | None:
    """Whether the process that named temporary file ``tmp`` (:func:`temp_prefix`) still runs:
    True or False for a writer on this machine, None for one on another machine (a network store);
    a name without the tag (an older version's) counts as dead."""
    tags = _TAG.findall(tmp.name)
    if not tags:
        return False
    host, pid_text = tags[-1]
    if host != _host():
        return None
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path, other_hosts_after_s: float = 24 * 3600.0) -> int:
    """Delete ``.*.tmp`` files and folders that killed writes left in ``folder``; returns how many.

    The one sweeper of the project: a temporary whose writer (host and pid, :func:`temp_prefix`) is
    still running is kept; one written on another machine sharing the folder is removed only once
    older than ``other_hosts_after_s`` seconds (no pid can be checked there).
    """
    n = 0
    if not folder.is_dir():
        return 0
    now = time.time()
    for p in folder.glob(".*.tmp"):
        try:
            alive = _writer_alive(p)
            if alive or (alive is None and now - p.lstat().st_mtime < other_hosts_after_s):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
        except OSError:
            continue
    return n


def fingerprint(path: Path) -> dict[str, Any]:
    """What identifies a video's content without reading all of it.

    A file: its size, modification time (ns) and the sha256 of its first and last 64 KiB (a cheap
    content check that survives ``cp -p`` and catches most rewrites of the same size). A JPEG
    frame folder: the number of files, their total size and the newest modification time. A
    missing path: ``{"missing": True}`` (the stage then records that video as failed).
    """
    try:
        st = path.stat()
    except OSError:
        return {"missing": True}
    if path.is_dir():
        n = size = newest = 0
        with os.scandir(path) as it:
            for e in it:
                if e.is_file():
                    est = e.stat()
                    n, size, newest = n + 1, size + est.st_size, max(newest, est.st_mtime_ns)
        return {"files": n, "size": size, "mtime_ns": newest}
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            h.update(fh.read(1 << 16))
            if st.st_size > 1 << 17:
                fh.seek(-(1 << 16), os.SEEK_END)
                h.update(fh.read(1 << 16))
    except OSError:
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "unreadable": True}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sample_sha256": h.hexdigest()}


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version-1 ``.npy`` header padded to a fixed 128 bytes, so that the final shape can be
    written over the placeholder once all blocks are in."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    body = repr(header).encode("latin1")
    pad = 128 - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"npy header too long for shape {shape}")
    return b"\x93NUMPY\x01\x00" + (118).to_bytes(2, "little") + body + b" " * pad + b"\n"


def write_streamed_npy(dest: Path, frame_shape: tuple[int, ...], dtype: Any, blocks: Iterator[np.ndarray]) -> dict[str, Any]:
    """Write ``blocks`` (each ``[n, *frame_shape]`` of ``dtype``) as one ``.npy`` array along axis 0,
    atomically; returns the ``_files`` entry (file, sha256, size, frames). Memory holds one block
    at a time (the flow stage's fields of a long video do not fit in memory at once)."""
    dtype = np.dtype(dtype)
    n = 0
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(_npy_header(dtype, (0, *frame_shape)))
            for block in blocks:
                if block.shape[1:] != tuple(frame_shape) or block.dtype != dtype:
                    raise ValueError(f"{dest.name}: block {block.dtype} {block.shape} does not fit {dtype} {frame_shape}")
                fh.write(np.ascontiguousarray(block).tobytes())
                n += len(block)
            fh.seek(0)
            fh.write(_npy_header(dtype, (n, *frame_shape)))
        digest = sha256_file(tmp)
        size = os.path.getsize(tmp)
    return {"file": dest.name, "sha256": digest, "size": size, "frames": n}


INDEX_FILE = "index.json"


class StageDir:
    """One stage's artifact folder for one cache key, and where its per-video items are.

    ``path`` holds ``stage.json``, ``failures.jsonl`` and ``DONE``. A video's item is its data files
    ``<stem>.<array>.npy`` and its metadata ``<stem>.json`` (written last: the completion marker) in
    the folder :attr:`items`. For a per-video stage of a run, the runner writes ``index.json`` into
    ``path``: :attr:`items` is then a folder of the shared store and ``stem`` the video's item key
    (:attr:`keys`, video id -> key), so that runs and manifests sharing a video share its item.
    Without an index (whole-run stages, hand-made folders) :attr:`items` is ``path/items`` and the
    stem is the video id.
    """

    def __init__(self, path: Path, items: Path | None = None, keys: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        if items is None and keys is None and (self.path / INDEX_FILE).is_file():
            try:
                index = json.loads((self.path / INDEX_FILE).read_text())
                items, keys = Path(index["items"]), dict(index["keys"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CorruptArtifact(f"{self.path / INDEX_FILE}: unreadable index ({e})", self.path / INDEX_FILE) from e
        self.items = Path(items) if items is not None else self.path / "items"
        #: video id -> item key (the file stem in :attr:`items`); None: the stem is the video id
        self.keys = keys

    def write_index(self) -> None:
        """Record where this stage's items are and which item each of the run's videos has."""
        atomic_write_json(self.path / INDEX_FILE, {"items": str(self.items), "keys": self.keys or {}})

    @property
    def done_marker(self) -> Path:
        return self.path / "DONE"

    @property
    def failures_file(self) -> Path:
        return self.path / "failures.jsonl"

    def is_done(self) -> bool:
        return self.done_marker.is_file()

    def stem(self, vid: str) -> str:
        """The file stem of video ``vid``'s item: its item key in the store, or the id itself."""
        return vid if self.keys is None else self.keys[vid]

    def item_meta_path(self, vid: str) -> Path:
        return self.items / f"{self.stem(vid)}.json"

    def item_file(self, vid: str, name: str) -> Path:
        """Where array ``name`` of video ``vid`` is stored."""
        return self.items / f"{self.stem(vid)}.{name}.npy"

    def item_complete(self, vid: str) -> bool:
        """The item's marker exists and every data file it lists has the recorded size."""
        if self.keys is not None and vid not in self.keys:
            return False
        meta_path = self.item_meta_path(vid)
        if not meta_path.is_file():
            return False
        try:
            meta = json.loads(meta_path.read_text())
            return all(
                (self.items / f["file"]).is_file() and (self.items / f["file"]).stat().st_size == f["size"]
                for f in meta.get("_files", {}).values()
            )
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def complete_items(self) -> list[str]:
        """The ids of the videos whose item is complete, sorted."""
        if self.keys is not None:
            return sorted(v for v in self.keys if self.item_complete(v))
        if not self.items.is_dir():
            return []
        return sorted(p.stem for p in self.items.glob("*.json") if self.item_complete(p.stem))

    def save_item(self, vid: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Write a video's arrays atomically, then its metadata (the completion marker) last."""
        files = {}
        for name, arr in arrays.items():
            path = self.item_file(vid, name)
            digest = atomic_save_npy(path, arr)
            files[name] = {"file": path.name, "sha256": digest, "size": path.stat().st_size}
        self.finish_item(vid, meta, files)

    def save_streamed(self, vid: str, name: str, frame_shape: tuple[int, ...], dtype: Any,
                      blocks: Iterator[np.ndarray]) -> dict[str, Any]:
        """Write array ``name`` of ``vid`` block by block (:func:`write_streamed_npy`); returns its
        ``_files`` entry for :meth:`finish_item`."""
        return write_streamed_npy(self.item_file(vid, name), frame_shape, dtype, blocks)

    def finish_item(self, vid: str, meta: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
        """Write the item's metadata, listing its data files: the completion marker, written last."""
        atomic_write_json(self.item_meta_path(vid), {**meta, "_files": files})

    def load_meta(self, vid: str) -> dict[str, Any]:
        """A video's metadata alone (no array is read); raises CorruptArtifact if it is unreadable."""
        meta_path = self.item_meta_path(vid)
        try:
            return json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise CorruptArtifact(f"{meta_path}: unreadable cached item ({e})", meta_path) from e

    def load_item(self, vid: str, verify: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """A video's metadata and arrays; raises CorruptArtifact if anything is missing or altered."""
        meta_path = self.item_meta_path(vid)
        meta = self.load_meta(vid)
        try:
            arrays = {}
            for name, f in meta["_files"].items():
                path = self.items / f["file"]
                if verify and sha256_file(path) != f["sha256"]:
                    raise CorruptArtifact(f"{path}: checksum does not match the one recorded at write time", path)
                arrays[name] = np.load(path, allow_pickle=False)
        except CorruptArtifact:
            raise
        except (OSError, ValueError, KeyError) as e:
            raise CorruptArtifact(f"{meta_path}: unreadable cached item ({e})", meta_path) from e
        return meta, arrays

    def load_mapped(self, vid: str, name: str) -> tuple[dict[str, Any], np.ndarray]:
        """A video's metadata and array ``name`` memory-mapped read-only; the file's size is checked
        against the record, its sha256 is not re-read (that would read the whole file).

        Raises:
            CorruptArtifact: the item or the file is missing, truncated or unreadable.
        """
        meta = self.load_meta(vid)
        where = self.item_meta_path(vid)
        try:
            entry = meta["_files"][name]
            path = self.items / entry["file"]
            if path.stat().st_size != entry["size"]:
                raise CorruptArtifact(f"{path}: size differs from the one recorded at write time", path)
            return meta, np.load(path, mmap_mode="r", allow_pickle=False)
        except CorruptArtifact:
            raise
        except (OSError, ValueError, KeyError) as e:
            raise CorruptArtifact(f"{where}: unreadable cached item ({e})", where) from e

    def drop_item(self, vid: str) -> None:
        """Remove a video's marker, then its data files (``<stem>.<name>.npy``; array names have no
        dot, so video ``a`` never takes the files of video ``a.b``)."""
        if self.keys is not None and vid not in self.keys:
            return
        stem = self.stem(vid)
        self.item_meta_path(vid).unlink(missing_ok=True)
        for p in self.items.glob(f"{glob.escape(stem)}.*.npy"):
            if "." not in p.name[len(stem) + 1 : -len(".npy")]:
                p.unlink(missing_ok=True)

    def item_of(self, path: Path) -> str | None:
        """The video whose item ``path`` (a file in :attr:`items`) belongs to; None for other files."""
        if Path(path).parent != self.items:
            return None
        name = Path(path).name
        if name.endswith(".json"):
            stem = name[: -len(".json")]
        elif name.endswith(".npy") and name.count(".") >= 2:
            stem = name[: -len(".npy")].rsplit(".", 1)[0]
        else:
            return None
        if self.keys is None:
            return stem
        return next((v for v, k in self.keys.items() if k == stem), None)

    def failures(self) -> list[dict[str, Any]]:
        if not self.failures_file.is_file():
            return []
        out = []
        for line in self.failures_file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def record_failures(self, records: list[dict[str, Any]]) -> None:
        atomic_write_text(self.failures_file, "".join(json.dumps(r) + "\n" for r in records))

    def write_done(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.done_marker, summary)
