"""Sultani MIL ranking detector.

W. Sultani, C. Chen, M. Shah, "Real-world Anomaly Detection in Surveillance Videos", CVPR 2018
(arXiv:1801.04264). Each video is a bag of 32 segments; a 3-layer MLP scores each segment; the
loss ranks the highest-scored segment of an anomalous bag above the highest-scored segment of a
normal bag, with temporal smoothness and sparsity on the anomalous bags (paper Eq. 7), plus L2
regularisation of the weights (Eq. 8).

Defaults are those of the authors' released Keras 1 / Theano script, which produced the published
75.41 % AUC on UCF-Crime (github.com/WaqasSultani/AnomalyDetectionCVPR2018,
``TrainingAnomalyDetector_public.py``; "the script" below):

- Network (the script's ``Sequential`` model): Dense D-512 + ReLU, Dropout 0.6, Dense 512-32 with no
  activation (linear), Dropout 0.6, Dense 32-1 + sigmoid; every Dense ``init='glorot_normal'``
  (plain normal, std ``sqrt(2 / (fan_in + fan_out))``, as ``nn.init.xavier_normal_``) with zero biases
  (the Keras 1 ``Dense`` default) and ``W_regularizer=l2(0.001)`` on its kernel only (no bias
  regulariser): Keras adds ``0.001 * sum(W^2)`` of all three kernels to the loss.
- Objective (the script's ``custom_objective``, Keras 1 returns it as the batch loss unchanged:
  ``weighted_objective`` averages a 0-d result over nothing): the batch of 60 videos x 32 segments
  is 30 anomalous videos then 30 normal ones (``load_dataset_Train_batch`` labels the first
  30 x 32 segments 0, the rest 1). With ``a_j`` the max segment score of anomalous bag j and
  ``n_i`` that of normal bag i,

  ``ranking = (1/30) sum_i sum_j max(0, 1 - a_j + n_i)``  (for each normal bag, the hinge SUMMED
  over all 30 anomalous bags, then the MEAN over the 30 normal bags; ``train.ranking=all_pairs``),

  ``smooth = 8e-5 * sum_j sum_{s=1..31} (a_j,s - a_j,s+1)^2`` and ``sparse = 8e-5 * sum_j sum_s a_j,s``
  (both SUMMED over the 30 anomalous bags, not averaged). The paper's Eq. 3 / 7 states the hinge for
  one anomalous / normal pair without saying how pairs are formed; ``train.ranking=aligned_pairs``
  pairs anomalous bag i with normal bag i and averages the 30 hinges (this project's earlier form),
  which makes the ranking term about 30x smaller next to the regularisers.
- Optimiser: Keras ``Adagrad(lr=0.01, epsilon=1e-08)`` (``torch.optim.Adagrad`` has the same update
  ``p -= lr * g / (sqrt(sum g^2) + eps)`` from a zero accumulator); the paper's Sec. 4.2 text says
  lr 0.001. 20,000 iterations (``num_iters``), each one ``train_on_batch`` on 30 anomalous + 30
  normal videos drawn without replacement (``np.random.permutation``).

One known, negligible difference: where several segments of a bag tie for the maximum, Theano's
``max`` sends the full gradient to each of them, ``torch.max`` to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.core.config import choice, opt

from models.registry import register_detector
from .base import Detector, MILBatch, TrainConfig

#: the script's file and objective, cited by the help texts
_SCRIPT = "official TrainingAnomalyDetector_public.py"


@dataclass
class SultaniMILConfig(TrainConfig):
    """Sultani MIL settings; defaults from the authors' released training script (module docstring)."""

    iterations: int = opt(20000, f"Adagrad steps ({_SCRIPT}, num_iters = 20000)")
    lr: float = opt(
        0.01, f"Adagrad learning rate ({_SCRIPT}, Adagrad(lr=0.01, epsilon=1e-08); the paper's Sec. 4.2 says 0.001)"
    )
    weight_decay: float = opt(
        1e-3,
        f"L2 regulariser on the three Dense kernels (not biases), added to the loss as wd * sum(W^2) "
        f"({_SCRIPT}, W_regularizer=l2(0.001); paper Eq. 8)",
    )
    batch_abnormal: int = opt(30, f"anomalous videos per batch ({_SCRIPT}, load_dataset_Train_batch: 30 of 60; paper Sec. 4.2)")
    batch_normal: int = opt(30, f"normal videos per batch ({_SCRIPT}, load_dataset_Train_batch: 30 of 60; paper Sec. 4.2)")
    hidden: tuple[int, ...] = opt(
        (512, 32), f"hidden layer sizes: Dense 512 + ReLU, then Dense 32 linear ({_SCRIPT}; paper Sec. 4.2)"
    )
    dropout: float = opt(0.6, f"dropout after each hidden layer ({_SCRIPT}, Dropout(0.6); paper Sec. 4.2)")
    lambda_smooth: float = opt(
        8e-5, f"temporal smoothness weight lambda1, on the sum over anomalous bags ({_SCRIPT}, custom_objective; Eq. 7)"
    )
    lambda_sparse: float = opt(
        8e-5, f"sparsity weight lambda2, on the sum over anomalous bags ({_SCRIPT}, custom_objective; Eq. 7)"
    )
    margin: float = opt(1.0, f"hinge margin ({_SCRIPT}, custom_objective: max(1 - a + n, 0); paper Eq. 3)")
    ranking: str = choice(
        "all_pairs",
        ("all_pairs", "aligned_pairs"),
        f"how bags are paired in the hinge: 'all_pairs', for each normal bag the hinge summed over every "
        f"anomalous bag of the batch, then the mean over normal bags ({_SCRIPT}, custom_objective); "
        "'aligned_pairs', anomalous bag i against normal bag i only, mean over the pairs (one reading of "
        "the paper's Eq. 3 / 7, which states the hinge for a single pair)",
    )

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if not self.hidden:
            raise ValueError("hidden needs at least one layer size")


def mil_ranking_loss(
    abnormal: torch.Tensor,
    normal: torch.Tensor,
    margin: float,
    lambda_smooth: float,
    lambda_sparse: float,
    pairs: str = "all_pairs",
) -> dict[str, torch.Tensor]:
    """Sultani et al.'s objective without the weight penalty, one term per key.

    Args:
        abnormal: ``[Ba, S]`` segment scores in [0, 1] of the anomalous bags.
        normal: ``[Bn, S]`` segment scores of the normal bags.
        pairs: ``"all_pairs"`` (the released ``custom_objective``) or ``"aligned_pairs"`` (row i
            with row i; ``Ba`` must equal ``Bn``).
    Returns:
        ``ranking``: with ``a_j = max_s abnormal[j]`` and ``n_i = max_s normal[i]``,
        ``"all_pairs"``: ``(1/Bn) sum_i sum_j max(0, margin - a_j + n_i)``;
        ``"aligned_pairs"``: ``(1/B) sum_i max(0, margin - a_i + n_i)``.
        ``smooth``: ``lambda_smooth * sum_j sum_s (abnormal[j,s] - abnormal[j,s+1])^2``;
        ``sparse``: ``lambda_sparse * sum_j sum_s abnormal[j,s]`` (both summed over the anomalous
        bags, as the released objective does). All three are 0-d tensors.
    """
    top_a = abnormal.max(dim=1).values  # [Ba]
    top_n = normal.max(dim=1).values  # [Bn]
    if pairs == "all_pairs":
        hinge = torch.relu(margin - top_a[None, :] + top_n[:, None])  # [Bn, Ba]: row i = normal bag i
        ranking = hinge.sum(dim=1).mean()
    elif pairs == "aligned_pairs":
        if top_a.shape != top_n.shape:
            raise ValueError(f"aligned pairs need as many anomalous as normal bags, got {top_a.numel()} and {top_n.numel()}")
        ranking = torch.relu(margin - top_a + top_n).mean()
    else:
        raise ValueError(f"unknown ranking pairs {pairs!r}")
    smooth = lambda_smooth * (abnormal[:, 1:] - abnormal[:, :-1]).pow(2).sum()
    sparse = lambda_sparse * abnormal.sum()
    return {"ranking": ranking, "smooth": smooth, "sparse": sparse}


@register_detector("sultani_mil")
class SultaniMIL(Detector):
    """FC D-512-32-1 segment scorer trained with the MIL ranking loss (see module docstring).

    Causal: the MLP scores every unit independently, so it also runs online on single clips, fed the
    clip feature L2-normalised like its training segments; those scores approximate the offline ones,
    which score 32-segment means.
    """

    Config = SultaniMILConfig
    input_level = "segments"
    causal = True
    #: 2: the released objective's all-pairs ranking term became the default
    version = 2
    #: no short_schedule: the defaults learn the synthetic benchmark in 400 steps (measured on
    #: tests/test_synthetic_benchmark.py: frame AUC 0.956 with ranking=all_pairs, 0.955 with
    #: aligned_pairs, the earlier default)

    def __init__(self, feature_dim: int, cfg: SultaniMILConfig | None = None) -> None:
        cfg = cfg or SultaniMILConfig()
        super().__init__(feature_dim, cfg)
        sizes = [feature_dim, *cfg.hidden]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i == 0:
                layers.append(nn.ReLU())  # only the first layer is ReLU; the 32-unit layer is linear
            layers.append(nn.Dropout(cfg.dropout))
        layers.append(nn.Linear(sizes[-1], 1))
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)  # Keras glorot_normal
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, S, D]`` float32 -> ``[B, S]`` scores in [0, 1]."""
        return torch.sigmoid(self.net(x)).squeeze(-1)

    def losses(self, batch: MILBatch) -> dict[str, torch.Tensor]:
        """``ranking``, ``smooth``, ``sparse``, ``l2`` and ``total`` (their sum), as ``custom_objective``
        plus the Keras kernel regularisers (module docstring). ``aligned_pairs`` uses the first
        ``min(Ba, Bn)`` bags of each kind."""
        xa, xn = batch.abnormal, batch.normal
        if self.cfg.ranking == "aligned_pairs":
            n = min(xa.shape[0], xn.shape[0])
            xa, xn = xa[:n], xn[:n]
        scores = self.forward(torch.cat([xa, xn]))  # anomalous bags first, as the script's batch
        terms = mil_ranking_loss(
            scores[: xa.shape[0]],
            scores[xa.shape[0] :],
            self.cfg.margin,
            self.cfg.lambda_smooth,
            self.cfg.lambda_sparse,
            self.cfg.ranking,
        )
        kernels = [m.weight for m in self.net if isinstance(m, nn.Linear)]
        terms["l2"] = self.cfg.weight_decay * sum(w.pow(2).sum() for w in kernels)
        terms["total"] = terms["ranking"] + terms["smooth"] + terms["sparse"] + terms["l2"]
        return terms

    def make_optimizer(self) -> torch.optim.Optimizer:
        # the script's Adagrad(lr=0.01, epsilon=1e-08); the L2 term is in the loss, so no optimiser decay
        return torch.optim.Adagrad(self.parameters(), lr=self.cfg.lr, eps=1e-8)
