"""The project's one k-means: Lloyd's algorithm with k-means++ seeding, batched over groups.

CLAWS clusters every training video's clips into 2 groups each epoch (thousands of videos at
once, on the training device); NG-MIL clusters the projected normal features into its prototypes
once. Both are :func:`kmeans`: one batched implementation in torch rather than scikit-learn's
``KMeans``, because CLAWS would otherwise loop over videos on the CPU every epoch
(``benchmarks/kmeans.py`` measures the two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def kmeans(
    points: torch.Tensor,
    k: int,
    *,
    lengths: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    gen: torch.Generator | None = None,
    iters: int = 100,
    tol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k-means of each group of points at once (Euclidean; Lloyd, k-means++ seeding).

    Args:
        points: ``[V, T, H]`` float, group v's points in rows ``:lengths[v]`` (the rest ignored), or
            ``[N, H]`` for one group.
        k: clusters per group.
        lengths: ``[V]`` int64, each >= 1 (None: all ``T`` rows).
        seeds: ``[V, k]`` uniforms in [0, 1), the seeding draws: the first centre is point
            ``floor(seeds[v, 0] * T_v)``; centre j is drawn with probability proportional to the
            squared distance to the nearest centre so far, by inverting the cumulative sum at
            ``seeds[v, j]`` (uniformly by index when every distance is 0). None: drawn from ``gen``.
        gen: CPU generator for ``seeds`` when not given (None: torch's global RNG).
        iters: most Lloyd iterations; it stops earlier when no assignment changes or, with
            ``tol`` > 0, when every group's centres move less than ``tol`` times their squared norm.
    Returns:
        ``assign`` ``[V, T]`` (``[N]`` for one group) int64 in ``[0, k)``, ties to the lower index, 0
        on padding; ``centres`` ``[V, k, H]`` (``[k, H]``), each the mean of its cluster (an empty
        cluster keeps its previous centre); ``counts`` ``[V, k]`` (``[k]``) cluster sizes, in the
        dtype of ``points``. Matrix products and one-hot sums only (no atomic adds), so the
        result is deterministic on CUDA too.
    """
    single = points.dim() == 2
    if single:
        points = points[None]
    v, t_max, _ = points.shape
    dev = points.device
    lengths = torch.full((v,), t_max, dtype=torch.int64) if lengths is None else lengths
    lengths = lengths.to(dev)
    mask = torch.arange(t_max, device=dev)[None, :] < lengths[:, None]  # [V, T]
    u = (torch.rand(v, k, generator=gen, dtype=torch.float64) if seeds is None else seeds).to(dev, torch.float64)
    rows = torch.arange(v, device=dev)

    def sq_dist(c: torch.Tensor) -> torch.Tensor:  # [V, H] -> [V, T], 0 on padding
        return (points - c[:, None]).double().pow(2).sum(-1) * mask

    first = torch.minimum((u[:, 0] * lengths).long(), lengths - 1)
    chosen = [points[rows, first]]
    nearest = sq_dist(chosen[0])
    for j in range(1, k):
        cs = nearest.cumsum(1)
        drawn = torch.searchsorted(cs, (u[:, j] * cs[:, -1])[:, None].contiguous(), right=True)[:, 0]
        idx = torch.where(cs[:, -1] > 0, drawn, (u[:, j] * lengths).long())
        chosen.append(points[rows, torch.minimum(idx, lengths - 1)])
        nearest = torch.minimum(nearest, sq_dist(chosen[-1]))
    centres = torch.stack(chosen, dim=1)  # [V, k, H]

    assign: torch.Tensor | None = None
    sq_points = points.pow(2).sum(-1, keepdim=True)  # [V, T, 1]
    for _ in range(iters):
        d = sq_points - 2 * torch.einsum("vth,vkh->vtk", points, centres) + centres.pow(2).sum(-1)[:, None, :]
        new = d.argmin(-1) * mask
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        onehot = F.one_hot(assign, k).to(points.dtype) * mask[..., None]  # [V, T, k]
        counts = onehot.sum(1)
        sums = torch.einsum("vtk,vth->vkh", onehot, points)
        moved = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centres)
        shift = (moved - centres).pow(2).sum((1, 2))
        centres = moved
        if tol > 0 and bool((shift <= tol * centres.pow(2).sum((1, 2))).all()):
            break
    if assign is None:  # iters == 0: the seeds' clusters
        d = sq_points - 2 * torch.einsum("vth,vkh->vtk", points, centres) + centres.pow(2).sum(-1)[:, None, :]
        assign = d.argmin(-1) * mask
    counts = (F.one_hot(assign, k).to(points.dtype) * mask[..., None]).sum(1)
    if single:
        return assign[0], centres[0], counts[0]
    return assign, centres, counts
