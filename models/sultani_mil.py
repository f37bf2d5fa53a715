"""Sultani MIL ranking detector.

W. Sultani, C. Chen, M. Shah, "Real-world Anomaly Detection in Surveillance Videos", CVPR 2018
(arXiv:1801.04264). Each video is a bag of 32 segments; a 3-layer MLP scores each segment; the
loss ranks the highest-scored segment of an anomalous bag above the highest-scored segment of a
normal bag, with temporal smoothness and sparsity on the anomalous bag (paper Eq. 7), plus L2
regularisation of the weights (Eq. 8).

Defaults follow the authors' released Keras code (PROTOCOLS.md, 'Training: Sultani MIL'), which
produced the published 75.41 % AUC: FC D-512-32-1, ReLU after the first layer, linear 32-unit layer,
sigmoid output, dropout 0.6 between layers, Glorot-normal init, Adagrad lr 0.01 (the paper's text
says 0.001), 30 anomalous + 30 normal videos per batch, 20,000 iterations, lambda1 = lambda2 = 8e-5,
L2 weight regulariser 1e-3 on every kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import opt

from . import register_detector
from .base import Detector, MILBatch, TrainConfig


@dataclass
class SultaniMILConfig(TrainConfig):
    """Sultani MIL settings; every default from PROTOCOLS.md 'Sultani MIL' / the paper Sec. 3.3-4.2."""

    iterations: int = opt(20000, "Adagrad steps (authors' code)")
    lr: float = opt(0.01, "Adagrad learning rate (authors' code; the paper's text says 0.001)")
    weight_decay: float = opt(1e-3, "L2 regulariser on kernels, added to the loss as wd * sum(W^2) (Keras l2, Eq. 8)")
    batch_abnormal: int = opt(30, "anomalous videos per batch (Sec. 4.2)")
    batch_normal: int = opt(30, "normal videos per batch (Sec. 4.2)")
    hidden: tuple[int, ...] = opt((512, 32), "hidden layer sizes (Sec. 4.2)")
    dropout: float = opt(0.6, "dropout between FC layers (Sec. 4.2)")
    lambda_smooth: float = opt(8e-5, "temporal smoothness weight lambda1 (Eq. 7, Sec. 4.2)")
    lambda_sparse: float = opt(8e-5, "sparsity weight lambda2 (Eq. 7, Sec. 4.2)")
    margin: float = opt(1.0, "hinge margin (Eq. 3)")

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if not self.hidden:
            raise ValueError("hidden needs at least one layer size")


def mil_ranking_loss(
    abnormal: torch.Tensor, normal: torch.Tensor, margin: float, lambda_smooth: float, lambda_sparse: float
) -> dict[str, torch.Tensor]:
    """Sultani et al. Eq. 7, one term per key.

    Args:
        abnormal: ``[B, S]`` segment scores in [0, 1] of anomalous bags.
        normal: ``[B, S]`` scores of normal bags; row i is paired with anomalous row i.
    Returns:
        ``ranking``: mean over pairs of ``max(0, margin - max_i a_i + max_i n_i)``;
        ``smooth``: ``lambda_smooth * sum_b sum_i (a_i - a_{i+1})^2``;
        ``sparse``: ``lambda_sparse * sum_b sum_i a_i`` (both summed over the batch's anomalous bags,
        as the released objective does).
    """
    ranking = torch.relu(margin - abnormal.max(dim=1).values + normal.max(dim=1).values).mean()
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
        n = min(batch.abnormal.shape[0], batch.normal.shape[0])
        scores = self.forward(torch.cat([batch.abnormal[:n], batch.normal[:n]]))
        terms = mil_ranking_loss(
            scores[:n], scores[n:], self.cfg.margin, self.cfg.lambda_smooth, self.cfg.lambda_sparse
        )
        kernels = [m.weight for m in self.net if isinstance(m, nn.Linear)]
        terms["l2"] = self.cfg.weight_decay * sum(w.pow(2).sum() for w in kernels)
        terms["total"] = terms["ranking"] + terms["smooth"] + terms["sparse"] + terms["l2"]
        return terms

    def make_optimizer(self) -> torch.optim.Optimizer:
        # Keras Adagrad(lr=0.01, epsilon=1e-8); the L2 term is in the loss, so no optimiser decay.
        return torch.optim.Adagrad(self.parameters(), lr=self.cfg.lr, eps=1e-8)
