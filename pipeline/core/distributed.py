"""Distributed extraction: per-video stages sharded over the ranks of a ``torchrun`` job.

Launch the usual command under ``torchrun`` (one process per GPU, or several on a CPU machine)::

    torchrun --nproc-per-node 4 -m pipeline run --stage extract --set data.manifest=ucf.csv
    # two machines: the same command on each, with --nnodes 2 --node-rank {0,1}
    #   --rdzv-backend c10d --rdzv-endpoint HOST0:29500 (the run directory on a shared file system)

:func:`from_env` sees torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and joins a gloo process
group. The group only carries small Python objects (the work plan, failure records, counts): every
rank reads and writes the shared run directory itself, and the features never travel between
ranks, so gloo serves GPU jobs too. With CUDA each rank computes on ``cuda:LOCAL_RANK``.

How a per-video stage runs (``pipeline.core.runner.Runner``): rank 0 alone decides (cleans the stage
folder, lists the videos still to compute, splits them with :func:`shard`) and broadcasts the plan;
each rank computes its share and writes each video's artifacts atomically, as a single process
does, so a rank that dies loses only the video it was computing; all ranks then gather their
failures and rank 0 writes ``failures.jsonl`` and the ``DONE`` marker. Whole-run stages (train,
evaluate) run on rank 0 alone; the other ranks exit once the per-video stages are done. The plan
covers only what is not complete yet, so a rerun with any number of ranks (or none) completes
the set without redoing finished videos.

Rank 0 alone takes the run directory's lock (``RUN_DIR/.lock``, ``fcntl``), so a second job or a
plain ``pipeline run`` on the same run directory from rank 0's machine is refused while the job
runs; the other ranks write only the items of their own videos, never a shared file.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: seconds a rank waits in a collective (the slowest rank's share of a stage can take hours); a
#: rank that dies is noticed by torchrun, which stops the others, so a long wait never hangs a job
DEFAULT_TIMEOUT_S = 24 * 3600


@dataclass
class Distributed:
    """This process's place in a torchrun job; :attr:`active` is False once it works alone."""

    rank: int
    world_size: int
    local_rank: int
    active: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.active = False


def from_env(environ: dict[str, str] | None = None) -> Distributed | None:
    """Join the torchrun job described by ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; None outside one
    (or with a single process). Sets the CUDA device to ``cuda:LOCAL_RANK`` when CUDA is present."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in env:
        return None
    import torch
    import torch.distributed as dist

    rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    timeout = float(env.get("WSVAD_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    _tag_logs(rank, world)
    log.info("distributed: rank %d of %d (local rank %d)", rank, world, local_rank)
    return Distributed(rank, world, local_rank)


def _tag_logs(rank: int, world: int) -> None:
    """Prefix every log line with the rank, so that interleaved logs of a job stay readable."""
    tag = f"[rank {rank}/{world}] "
    for handler in logging.getLogger().handlers:
        fmt = handler.formatter._fmt if handler.formatter is not None else "%(message)s"
        if fmt is not None and tag not in fmt:
            handler.setFormatter(logging.Formatter(tag + fmt, datefmt="%H:%M:%S"))


def shard(ids: list[str], weights: list[float], world_size: int) -> list[list[str]]:
    """Split videos over ranks so that each rank gets about the same number of frames.

    Greedy longest-first bin packing (LPT): videos in order of decreasing weight (ties by id) each
    go to the rank with the least weight so far (ties to the lowest rank). The largest share is at
    most 4/3 of the optimum, and the result depends only on the inputs (rank 0 computes it and
    broadcasts it).

    Args:
        ids: video ids.
        weights: each video's cost (its frame count), >= 0.
        world_size: number of ranks.
    Returns:
        ``world_size`` lists of ids, each in the manifest's order.
    """
    if len(ids) != len(weights):
        raise ValueError("one weight per video")
    load = [0.0] * world_size
    owner: dict[str, int] = {}
    for w, vid in sorted(zip(weights, ids), key=lambda t: (-t[0], t[1])):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[vid] = r
        load[r] += w
    return [[v for v in ids if owner[v] == r] for r in range(world_size)]


def estimate_frames(path: Path, folder_fps: float = 30.0) -> int:
    """The frame count the container (or the frame folder's listing) reports, without decoding;
    1 for a video that cannot be opened (it fails fast when its rank gets to it)."""
    from pipeline.core.video import open_video

    try:
        src = open_video(path, folder_fps=folder_fps)
    except Exception:  # a broken video is the extract stage's to report, with its reason
        return 1
    try:
        return max(1, src.num_frames)
    finally:
        src.close()
