"""Fetching pretrained weights: a per-user cache, sha256 verification, and offline-friendly errors.

A :class:`WeightSpec` names one weights file, where to download it from and its sha256. The file may
be served directly (``url`` is the file) or as one member of a ``.tar.gz`` archive (``url`` is the
archive, ``archive_member`` the member's name inside it, ``archive_sha256`` the archive's sha256).

:func:`fetch_weights` returns the path of a verified copy of the file:

1. with ``local_path`` (the ``extract.weights`` setting): that file, which may be the weights file
   itself or the archive; it is verified and nothing is downloaded;
2. otherwise the cached copy ``<cache_dir>/weights/<filename>``, re-verified on every call (a corrupt
   copy is deleted and fetched again);
3. otherwise a download of ``url``, streamed to a temporary file in the cache folder, verified,
   unpacked if it is an archive, and renamed into place atomically.

Every failure raises :class:`WeightsError` with a message that says what went wrong and how to fix it.

Weights whose publisher gives no checksum (``WeightSpec.sha256 = None``; e.g. pytorchvideo's model zoo and
the C3D PyTorch port) are *pinned on first use*: the first download, which nothing can verify (or a file
found in the cache without a pin), has its sha256 recorded in ``<cache_dir>/weights/<filename>.sha256``,
and every later use, and any later download, must match that pin. A local file given with ``local_path`` cannot be
checked against anything for such a spec; it is used as is (its loader checks its layout) and its own
sha256 is what enters the cache key.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipeline.core.store import atomic_path, atomic_write_text, scratch_path, sha256_file

logger = logging.getLogger(__name__)

#: Seconds a download may wait on the server (connecting, or between two reads).
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


class WeightsError(RuntimeError):
    """Weights that cannot be obtained or do not verify; the message says how to fix it."""


@dataclass(frozen=True)
class WeightSpec:
    """One pretrained weights file.

    Attributes:
        name: human-readable name used in messages (``"I3D Kinetics-400 RGB"``).
        url: where to download the file, or the ``.tar.gz`` archive holding it.
        sha256: sha256 of the weights file itself (hex, lower case), or None when the publisher gives
            none: the file is then pinned on first use (see the module docstring, :func:`pinned_sha256`).
        filename: name of the file in the cache folder.
        archive_member: if set, ``url`` is a ``.tar.gz`` archive and the weights are this member of it.
        archive_sha256: sha256 of the archive at ``url``; required when ``archive_member`` is set.
    """

    name: str
    url: str
    sha256: str | None
    filename: str
    archive_member: str | None = None
    archive_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.archive_member is not None and not self.archive_sha256:
            raise ValueError(f"WeightSpec {self.name!r}: archive_member needs archive_sha256")
        if self.sha256 is None and self.archive_member is not None:
            raise ValueError(f"WeightSpec {self.name!r}: an archive member needs a known sha256")
        if Path(self.filename).name != self.filename:
            raise ValueError(f"WeightSpec {self.name!r}: filename must be a bare file name, got {self.filename!r}")

    @property
    def download_sha256(self) -> str | None:
        """sha256 of what ``url`` serves: the archive if there is one, else the weights file (None: unpublished)."""
        return self.archive_sha256 if self.archive_member is not None else self.sha256  # type: ignore[return-value]


def cache_dir() -> Path:
    """The per-user cache folder: ``$WSVAD_CACHE``, else ``$XDG_CACHE_HOME/wsvad``, else ``~/.cache/wsvad``."""
    if os.environ.get("WSVAD_CACHE"):
        return Path(os.environ["WSVAD_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "wsvad"
    return Path.home() / ".cache" / "wsvad"


def cached_weights_path(spec: WeightSpec) -> Path:
    """Where the verified weights file of ``spec`` lives in the cache: ``<cache_dir>/weights/<filename>``."""
    return cache_dir() / "weights" / spec.filename


def pin_path(spec: WeightSpec) -> Path:
    """Where the sha256 of a spec without a published checksum is pinned: ``<cached file>.sha256``."""
    return cached_weights_path(spec).with_name(spec.filename + ".sha256")


def pinned_sha256(spec: WeightSpec) -> str | None:
    """The sha256 the default weights of ``spec`` must have: ``spec.sha256``, else the pinned one, else None."""
    if spec.sha256 is not None:
        return spec.sha256
    try:
        text = pin_path(spec).read_text().strip().lower()
    except OSError:
        return None
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        logger.warning("ignoring %s: not a sha256 (%r)", pin_path(spec), text[:80])
        return None
    return text


def _write_pin(spec: WeightSpec, digest: str, origin: str) -> None:
    pin = pin_path(spec)
    atomic_write_text(pin, digest + "\n")
    logger.warning(
        "%s weights have no published sha256; pinned the sha256 of %s, %s, in %s (trust on first use: "
        "later uses and downloads must match it)", spec.name, origin, digest, pin,
    )


def default_weights_sha256(spec: WeightSpec) -> str:
    """sha256 of the default weights of ``spec``, for cache keys.

    ``spec.sha256`` or the pinned sha256, without touching the network; a spec with neither has its
    weights fetched (downloaded) now, which pins them. Raises :class:`WeightsError` as :func:`fetch_weights`.
    """
    digest = pinned_sha256(spec)
    if digest is None:
        fetch_weights(spec)
        digest = pinned_sha256(spec)
        if digest is None:  # pragma: no cover - fetch_weights pins or raises
            raise WeightsError(f"{spec.name}: no sha256 pinned at {pin_path(spec)} after fetching the weights")
    return digest


def fetch_weights(spec: WeightSpec, local_path: str | Path | None = None) -> Path:
    """A path to a verified copy of the weights file of ``spec``.

    Args:
        spec: the weights to fetch.
        local_path: a file the user supplies (the weights file itself, or the archive when ``spec``
            has one); it is verified and nothing is downloaded. An archive is unpacked into the cache.
    Returns:
        Path of a file whose sha256 is ``spec.sha256`` (or, for a spec without one, the pinned sha256;
        a local file for such a spec is returned unverified).
    Raises:
        WeightsError: a missing or mismatching local file, a failed download, a download that does not
            verify, or an archive without the expected member.
    """
    dest = cached_weights_path(spec)
    if local_path is not None:
        return _use_local(spec, Path(local_path).expanduser(), dest)

    expected = pinned_sha256(spec)  # spec.sha256 unless unpublished
    if dest.is_file():
        actual = sha256_file(dest)
        if expected is None:  # unpublished checksum, a file put in the cache by hand: pin it
            _write_pin(spec, actual, f"the cached file {dest}")
            return dest
        if actual == expected:
            logger.debug("using cached %s weights at %s", spec.name, dest)
            return dest
        logger.warning(
            "cached %s weights at %s are corrupt (sha256 %s, expected %s); deleting and fetching again",
            spec.name, dest, actual, expected,
        )
        dest.unlink(missing_ok=True)

    _ensure_dir(dest.parent, spec)
    want = spec.download_sha256 if spec.sha256 is not None else expected
    if spec.archive_member is not None:  # the archive is read once for its member, then removed
        with scratch_path(dest.parent, spec.filename + ".download") as tmp:
            _download_verified(spec, tmp, dest, want)
            _extract_member(spec, tmp, dest)
    else:
        with atomic_path(dest) as tmp:  # renamed into place only once it verifies
            actual = _download_verified(spec, tmp, dest, want)
        if want is None:
            _write_pin(spec, actual, f"the download from {spec.url}")
    logger.info("saved %s weights to %s", spec.name, dest)
    return dest


def fetch_pinned_weights(spec: WeightSpec, local_path: str | Path | None = None) -> tuple[Path, str]:
    """:func:`fetch_weights` for a spec whose publisher gives no checksum, with the sha256 that keys
    the features: the local file's own (``local_path``: it cannot be checked against anything), or
    the default download's pin.

    Raises:
        WeightsError: as :func:`fetch_weights`.
    """
    path = fetch_weights(spec, local_path=local_path)
    digest = sha256_file(path) if local_path else pinned_sha256(spec)
    assert digest is not None  # fetch_weights pins the default weights or raises
    return path, digest


def _download_verified(spec: WeightSpec, tmp: Path, dest: Path, want: str | None) -> str:
    """Download ``spec.url`` into ``tmp`` and check its sha256 against ``want`` (None: accept);
    returns the sha256. Raises WeightsError offline or on a mismatch."""
    logger.info("downloading %s weights from %s", spec.name, spec.url)
    try:
        _download(spec.url, tmp)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise WeightsError(_offline_message(spec, dest, exc)) from exc
    actual = sha256_file(tmp)
    if want is not None and actual != want:
        pinned = "" if spec.sha256 is not None else (
            f" (the sha256 pinned at {pin_path(spec)} by an earlier download; delete that file if the "
            "published weights really changed)"
        )
        raise WeightsError(
            f"the download of {spec.name} weights from {spec.url} does not verify: sha256 {actual}, "
            f"expected {want}{pinned} (the server or a proxy returned something else). "
            + _how_to_fix(spec, dest)
        )
    return actual


def _download(url: str, dest: Path) -> None:
    """Stream ``url`` into ``dest`` (overwritten). Network errors propagate (URLError, OSError, HTTPException)."""
    request = urllib.request.Request(url, headers={"User-Agent": "wsvad-pipeline"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        next_report = 0.0
        while True:
            block = response.read(_CHUNK)
            if not block:
                break
            out.write(block)
            done += len(block)
            if total and done / total >= next_report:
                logger.info("  %.0f%% of %.1f MB", 100.0 * done / total, total / 1e6)
                next_report += 0.25
        if total and done != total:
            raise OSError(f"connection closed after {done} of {total} bytes")


def _use_local(spec: WeightSpec, path: Path, dest: Path) -> Path:
    """Verify a user-supplied weights file or archive; unpack an archive into the cache."""
    if not path.is_file():
        raise WeightsError(f"{spec.name} weights file {path} does not exist (or is not a file)")
    if spec.sha256 is None:
        logger.info("using %s weights from %s (no published sha256 to verify it against)", spec.name, path)
        return path
    actual = sha256_file(path)
    if actual == spec.sha256:
        logger.info("using %s weights from %s (sha256 verified)", spec.name, path)
        return path
    if spec.archive_member is not None and actual == spec.archive_sha256:
        if dest.is_file() and sha256_file(dest) == spec.sha256:
            logger.info("%s is the verified %s archive; its weights are already unpacked at %s", path, spec.name, dest)
            return dest
        _ensure_dir(dest.parent, spec)
        logger.info("unpacking %s weights from the archive %s to %s", spec.name, path, dest)
        _extract_member(spec, path, dest)
        return dest
    expected = f"{spec.sha256} (the weights file {spec.filename})"
    if spec.archive_member is not None:
        expected += f" or {spec.archive_sha256} (the archive {spec.url.rsplit('/', 1)[-1]})"
    raise WeightsError(
        f"{path} is not the {spec.name} weights: sha256 {actual}, expected {expected}. "
        f"The official file is at {spec.url}"
    )


def _extract_member(spec: WeightSpec, archive: Path, dest: Path) -> None:
    """Copy the regular-file member ``spec.archive_member`` of ``archive`` to ``dest``, verified and atomic.

    Only that member's bytes are read: nothing is written under a name taken from the archive, and links,
    devices and folders are refused, so a hostile archive cannot write outside ``dest``.
    """
    assert spec.archive_member is not None
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            try:
                member = tar.getmember(spec.archive_member)
            except KeyError:
                raise WeightsError(
                    f"the archive {archive} has no member {spec.archive_member!r} ({spec.name} weights)"
                ) from None
            if not member.isfile():
                raise WeightsError(
                    f"the member {spec.archive_member!r} of {archive} is not a regular file; refusing it"
                )
            source = tar.extractfile(member)
            if source is None:  # pragma: no cover - isfile() members always have data
                raise WeightsError(f"cannot read {spec.archive_member!r} from {archive}")
            with source:
                _copy_verified(source, spec, dest, origin=f"{archive}:{spec.archive_member}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise WeightsError(f"cannot read the {spec.name} archive {archive}: {exc}") from exc


def _copy_verified(source: BinaryIO, spec: WeightSpec, dest: Path, origin: str) -> None:
    """Write ``source`` to a temporary file next to ``dest``, check its sha256, rename it to ``dest``."""
    with atomic_path(dest) as tmp:  # a file that does not verify is removed, never renamed into place
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for block in iter(lambda: source.read(_CHUNK), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != spec.sha256:
            raise WeightsError(
                f"{origin} is not the {spec.name} weights: sha256 {digest.hexdigest()}, expected {spec.sha256}"
            )


def _ensure_dir(folder: Path, spec: WeightSpec) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(
            f"cannot create the weights cache folder {folder} for {spec.name} weights: {exc}. "
            "Set WSVAD_CACHE to a writable folder, or pass the weights file with --set extract.weights=PATH"
        ) from exc


def _how_to_fix(spec: WeightSpec, dest: Path) -> str:
    what = "the archive" if spec.archive_member is not None else "the file"
    if spec.sha256 is None:
        return (
            f"To fix it, download {spec.url} on a machine with internet access (no sha256 is published for "
            f"it) and pass it with `--set extract.weights=PATH`, or put it at {dest} (it is pinned on first use)."
        )
    return (
        f"To fix it, download {spec.url} on a machine with internet access (sha256 {spec.download_sha256}) "
        f"and pass it with `--set extract.weights=PATH` ({what}"
        + (f", or its member {spec.archive_member}" if spec.archive_member is not None else "")
        + f"), or put the weights file (sha256 {spec.sha256}) at {dest}."
    )


def _offline_message(spec: WeightSpec, dest: Path, exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return (
        f"could not download {spec.name} weights from {spec.url}: {type(exc).__name__}: {reason}. "
        f"No verified copy is cached at {dest}. " + _how_to_fix(spec, dest)
    )
