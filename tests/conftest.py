"""Shared fixtures: the shared reference data folder, tiny synthetic videos, a cheap test extractor."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    """``$VAD_SHARED_DATA`` or ``../shared/data`` beside the project root, if present."""
    env = os.environ.get("VAD_SHARED_DATA")
    path = Path(env) if env else ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def read_only_mount(monkeypatch):
    """Writes into any folder fail as on a read-only mount (EROFS) where the pipeline probes for it
    (``pipeline.core.runner.check_writable``); root, which runs CI, ignores permission bits."""
    import errno

    real_write = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(".write-test"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


@pytest.fixture
def shared() -> Path:
    path = shared_data()
    if path is None:
        pytest.skip("shared reference data not found (set VAD_SHARED_DATA or place it at ../shared/data)")
    return path


def write_video(path: Path, frames: np.ndarray, fps: int = 30) -> None:
    """Write uint8 ``[T, H, W, 3]`` RGB frames as near-lossless H.264 (yuv444p, crf 0)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = "yuv444p"
        s.options = {"crf": "0", "threads": "1"}
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def moving_square_video(n: int, anomalous_from: int | None = None, seed: int = 0, h: int = 48, w: int = 64) -> np.ndarray:
    """A grey scene with a slow square; from ``anomalous_from`` on, a bright fast square as well."""
    rng = np.random.default_rng(seed)
    bg = (rng.random((h, w, 1)) * 60 + 80).astype(np.uint8).repeat(3, axis=2)
    frames = np.repeat(bg[None], n, axis=0).copy()
    for t in range(n):
        x = (t // 2 + seed * 7) % (w - 8)
        frames[t, 20:28, x : x + 8] = (40, 40, 200)
        if anomalous_from is not None and t >= anomalous_from:
            x2 = (t * 9) % (w - 10)
            frames[t, 5:15, x2 : x2 + 10] = (250, 250, 30)
    return frames


_registered = False


def register_test_extractor() -> str:
    """Register (once per process) ``test_motion``: a 7-D hand-made feature, for fast runner tests.

    Per clip: mean R, G, B; mean absolute frame difference; share of bright-yellow pixels; their
    temporal std; a constant. Cheap enough that a whole pipeline run takes seconds.
    """
    global _registered
    from extractors import EXTRACTORS
    from extractors.base import ClipExtractor

    if not _registered:

        @EXTRACTORS.register("test_motion")
        class MotionExtractor(ClipExtractor):
            feature_dim = 7
            crop_size = 32
            resize = ("short", 32)

            @classmethod
            def expected_checksum(cls, weights=None):
                return "test-motion-v1" if not weights else super().expected_checksum(weights)

            @property
            def weights_checksum(self) -> str:
                return "test-motion-v1"

            def normalize(self, clips):
                return clips / 255.0

            def features(self, clips):
                mean = clips.mean(dim=(2, 3, 4))  # [N, 3]
                diff = (clips[:, :, 1:] - clips[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))[:, None]
                yellow = ((clips[:, 0] > 0.85) & (clips[:, 1] > 0.85) & (clips[:, 2] < 0.4)).float()
                y_mean = yellow.mean(dim=(1, 2, 3))[:, None]
                y_std = yellow.mean(dim=(2, 3)).std(dim=1)[:, None]
                return torch.cat([mean, diff * 10, y_mean * 10, y_std * 10, torch.ones_like(y_mean)], 1)

        _registered = True
    return "test_motion"



def install_test_hooks() -> None:
    """Register ``test_motion`` and wrap the extract stage and the optimiser step, so that
    subprocess tests (torchrun, kill -9) can observe and interrupt the work. Read from the
    environment: WSVAD_TEST_EVENTS=FILE appends ``start|done <video> <rank>`` and ``step <rank>``
    lines; WSVAD_TEST_KILL_AT=RANK:N makes that rank SIGKILL itself when its N-th video starts;
    WSVAD_TEST_SLOW=S sleeps S seconds per video and S/10 per training step."""
    import signal
    import time

    from stages.extract import ExtractStage

    register_test_extractor()
    events = os.environ.get("WSVAD_TEST_EVENTS")
    rank = os.environ.get("RANK", "0")
    kill_rank, _, kill_n = os.environ.get("WSVAD_TEST_KILL_AT", ":").partition(":")
    slow = float(os.environ.get("WSVAD_TEST_SLOW", "0"))
    started = [0]

    def note(text: str) -> None:
        if events:
            with open(events, "a") as fh:
                fh.write(text + "\n")

    process = ExtractStage.process

    def traced(self, ctx, video, out, inputs):
        started[0] += 1
        if kill_rank == rank and started[0] == int(kill_n):
            os.kill(os.getpid(), signal.SIGKILL)
        note(f"start {video.id} {rank}")
        time.sleep(slow)
        process(self, ctx, video, out, inputs)
        note(f"done {video.id} {rank}")

    step = torch.optim.Adagrad.step

    def slow_step(self, *a, **k):
        time.sleep(slow / 10)
        note(f"step {rank}")
        return step(self, *a, **k)

    ExtractStage.process = traced
    torch.optim.Adagrad.step = slow_step


#: ``python -m pipeline`` with :func:`install_test_hooks`, for torchrun tests
LAUNCHER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import install_test_hooks
install_test_hooks()
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_launcher(folder: Path) -> Path:
    """Write :data:`LAUNCHER` to ``folder/launch_pipeline.py``; run it with the ``pipeline`` CLI's arguments."""
    path = folder / "launch_pipeline.py"
    path.write_text(LAUNCHER.format(tests=str(Path(__file__).resolve().parent)))
    return path


def pytest_configure(config):
    """Module-scoped fixtures run before any per-test fixture: give the whole session a store of its
    own (``$WSVAD_STORE``), so that no test writes into the user's ``~/.cache``."""
    import shutil
    import tempfile

    os.environ["WSVAD_STORE"] = store = tempfile.mkdtemp(prefix="wsvad-test-store-")
    config.add_cleanup(lambda: shutil.rmtree(store, ignore_errors=True))


@pytest.fixture(autouse=True)
def _private_store(tmp_path_factory, monkeypatch):
    """Each test gets its own store of per-video artifacts, so that what one test computed is never
    another's cache."""
    monkeypatch.setenv("WSVAD_STORE", str(tmp_path_factory.mktemp("store")))
