"""The models of stage 3 (fm): a second-order factorization machine and its first-order baseline,
fitted the same way (full-batch Adam, L2), with the metrics both are judged by. Pure torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from ..config import FMConfig
from ..errors import NonFiniteError

log = logging.getLogger(__name__)

Task = Literal["regression", "classification"]


class FactorizationMachine(nn.Module):
    """Second-order FM (Rendle 2010) in its O(n·k) form:
    ŷ = w0 + Σ w_i m_i + ½ Σ_f [(Σ_i v_if m_i)² − Σ_i v_if² m_i²]. X [N, n] → ŷ [N]."""

    def __init__(self, n: int, k: int = 8, seed: int = 0, init_std: float = 0.05):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w0 = nn.Parameter(torch.zeros(()))
        self.w = nn.Parameter(torch.zeros(n))
        self.V = nn.Parameter(torch.randn(n, k, generator=g) * init_std)  # small random: breaks symmetry

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        xv = X @ self.V  # [N, k]
        pair = 0.5 * (xv.pow(2) - X.pow(2) @ self.V.pow(2)).sum(-1)
        return self.w0 + X @ self.w + pair

    def penalty(self) -> torch.Tensor:
        return self.w.pow(2).sum() + self.V.pow(2).sum()

    def interactions(self) -> torch.Tensor:
        """[n, n] ⟨v_i, v_j⟩ with a zero diagonal."""
        m = self.V @ self.V.T
        return m - torch.diag(torch.diag(m))

    @torch.no_grad()
    def rescale_(self, mean: float, std: float) -> None:
        """Map a model of (y − mean)/std back to y: every term scales by std (V by √std)."""
        self.w0.mul_(std).add_(mean)
        self.w.mul_(std)
        self.V.mul_(std**0.5)


class LinearModel(nn.Module):
    """First-order baseline ŷ = w0 + Σ w_i m_i, fitted the same way as the FM."""

    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        self.w0 = nn.Parameter(torch.zeros(()))
        self.w = nn.Parameter(torch.zeros(n))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.w0 + X @ self.w

    def penalty(self) -> torch.Tensor:
        return self.w.pow(2).sum()

    @torch.no_grad()
    def rescale_(self, mean: float, std: float) -> None:
        self.w0.mul_(std).add_(mean)
        self.w.mul_(std)


Model = FactorizationMachine | LinearModel


def fit(model: Model, X: torch.Tensor, y: torch.Tensor, task: Task, cfg: FMConfig) -> dict:
    """Full-batch Adam with an L2 penalty (cfg.lr, cfg.l2, cfg.epochs); deterministic given the init.

    Adam moves each weight by about lr per step, so the start matters. Regression fits the
    standardised target and starts w0, w at the closed-form ridge solution (the exact first-order
    fit: the linear model is done, and the FM's steps go to its interactions); the weights are
    mapped back to score units after. Classification fits logits, starting from one IRLS step.
    Returns train metrics; warns when the loss was still falling at the end.
    """
    X, y = X.float(), y.float()
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if task == "regression":
        mean = float(y.mean())
        std = float(y.std().clamp(min=1e-6)) if len(y) > 1 else 1.0
        target, loss_fn = (y - mean) / std, nn.functional.mse_loss
        w0, w = ridge(X, target, cfg.l2)
    else:
        mean, std = 0.0, 1.0
        target, loss_fn = y, nn.functional.binary_cross_entropy_with_logits
        # one Newton (IRLS) step of logistic regression from the base rate p: ridge on the working response
        p = float(y.mean().clamp(1e-3, 1 - 1e-3))
        w0, w = ridge(X, math.log(p / (1 - p)) + (y - p) / (p * (1 - p)), cfg.l2)
    with torch.no_grad():
        model.w0.copy_(w0)
        model.w.copy_(w)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses = []
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            opt.zero_grad()
            loss = loss_fn(model(X), target) + cfg.l2 * model.penalty()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    if task == "regression":
        model.rescale_(mean, std)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise NonFiniteError(f"the {type(model).__name__} fit diverged; lower fm.lr")
    tail = losses[-max(len(losses) // 10, 1)]
    if task == "regression" and losses and tail - losses[-1] > 0.05 * abs(tail):  # logistic loss always falls
        log.warning("%s %s fit still improving at the last epoch (%.4g → %.4g); raise fm.epochs",
                    type(model).__name__, task, tail, losses[-1])  # fmt: skip
    return {"train_loss": losses[-1] if losses else None, **metrics(model, X, y, task)}


def ridge(X: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w0, w) minimising mean (y − w0 − Xw)² + l2·‖w‖² in closed form (float64 normal equations)."""
    Xa = torch.cat([torch.ones(len(X), 1, dtype=torch.float64), X.double()], 1)
    reg = torch.eye(Xa.shape[1], dtype=torch.float64) * l2
    reg[0, 0] = 0.0  # the intercept is not penalised
    beta = torch.linalg.solve(Xa.T @ Xa / len(X) + reg + 1e-9 * torch.eye(Xa.shape[1], dtype=torch.float64),
                              Xa.T @ y.double() / len(X))  # fmt: skip
    return beta[0].float(), beta[1:].float()


@torch.no_grad()
def metrics(model: Model, X: torch.Tensor, y: torch.Tensor, task: Task) -> dict:
    """r2 (regression) and accuracy: for regression the sign accuracy (ŷ < 0 ⇔ y < 0)."""
    pred = model(X.float())
    if task == "regression":
        sst = float((y - y.mean()).pow(2).sum())
        r2 = 1 - float((y - pred).pow(2).sum()) / sst if sst > 0 else None
        return {"r2": r2, "accuracy": float(((pred < 0) == (y < 0)).float().mean())}
    return {"r2": None, "accuracy": float(((pred > 0) == (y > 0.5)).float().mean())}
