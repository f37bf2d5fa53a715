"""The errors the stages and the runner share."""

from __future__ import annotations

from pathlib import Path


class StageError(RuntimeError):
    """A stage that cannot run at all (as opposed to one failed video)."""


class CorruptArtifact(RuntimeError):
    """A cached file that is missing, truncated or does not match its recorded checksum.

    ``path`` is the file; the runner drops what it belongs to (a video's item, or a whole-run
    stage's result) and computes it again.
    """

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path
