"""The project's one k-means: scikit-learn's ``KMeans`` (Lloyd, k-means++ seeding), over groups.

CLAWS clusters every training video's clip representations into 2 groups each epoch; NG-MIL
clusters the projected normal features into its prototypes once. Both call :func:`kmeans`. It
used to be two batched torch implementations; ``benchmarks/kmeans.py`` measured them against
scikit-learn on the CPU (2026-12-02, 2 cores: 400 videos x 150 clips x 512-D, 0.53 s batched
torch versus 0.44 s for one scikit-learn call per video; NG-MIL's 20,000 points into 10
prototypes, 0.12 s versus 0.04 s), so scikit-learn it is. The points go to the CPU for it and
the results come back to their device.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning


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
    """k-means of each group of points (Euclidean; ``sklearn.cluster.KMeans`` with ``n_init=1``).

    Args:
        points: ``[V, T, H]`` float, group v's points in rows ``:lengths[v]`` (the rest ignored), or
            ``[N, H]`` for one group.
        k: clusters per group.
        lengths: ``[V]`` int64, each >= 1 (None: all ``T`` rows).
        seeds: ``[V]`` int64 in ``[0, 2**31 - 1)``, each group's ``random_state`` (its k-means++
            seeding); None: drawn from ``gen`` (None: torch's global RNG), so that a run with the
            same seed clusters the same way.
        iters: most Lloyd iterations (``max_iter``); ``tol``: scikit-learn's ``tol`` (0: iterate
            until no assignment changes).
    Returns:
        ``assign`` ``[V, T]`` (``[N]`` for one group) int64 in ``[0, k)``, 0 on padding; ``centres``
        ``[V, k, H]`` (``[k, H]``), the means of the clusters; ``counts`` ``[V, k]`` (``[k]``) cluster
        sizes; on the device and in the dtype of ``points``. A group of fewer than ``k`` points gets
        each point as a centre, repeated in order, and the sizes of those.
    """
    single = points.dim() == 2
    if single:
        points = points[None]
    v, t_max, h = points.shape
    lens = [t_max] * v if lengths is None else [int(n) for n in lengths.tolist()]
    states = (torch.randint(2**31 - 1, (v,), generator=gen) if seeds is None else seeds).tolist()
    data = points.detach().to("cpu", torch.float64).numpy()
    assign = np.zeros((v, t_max), np.int64)
    centres = np.zeros((v, k, h))
    counts = np.zeros((v, k))
    for i in range(v):
        x = data[i, : lens[i]]
        if len(x) < k:
            centres[i] = x[np.arange(k) % len(x)]
            assign[i, : len(x)] = np.arange(len(x))
        else:
            with warnings.catch_warnings():  # fewer distinct points than k: some centres coincide
                warnings.simplefilter("ignore", ConvergenceWarning)
                km = KMeans(k, init="k-means++", n_init=1, max_iter=max(iters, 1), tol=tol, random_state=states[i],
                            algorithm="lloyd").fit(x)
            centres[i], assign[i, : len(x)] = km.cluster_centers_, km.labels_
        counts[i] = np.bincount(assign[i, : lens[i]], minlength=k)
    out = (torch.from_numpy(assign).to(points.device),
           torch.from_numpy(centres).to(points.device, points.dtype),
           torch.from_numpy(counts).to(points.device, points.dtype))
    return tuple(t[0] for t in out) if single else out  # type: ignore[return-value]
