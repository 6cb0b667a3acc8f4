"""Binary classification metrics the aggregator and sites report the same way."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from fedmq.site_agent.models import trained_part


@torch.no_grad()
def predict_proba(
    model: nn.Module, X: torch.Tensor, batch_size: int = 512, device: torch.device | str | None = None
) -> np.ndarray:
    """``device``: run there (the model is moved; X is moved once). None: where the model is."""
    was_training = model.training
    if device is not None:
        model.to(device)
        X = X.to(device)
    model.eval()
    try:
        net, inputs = trained_part(model, X.float())  # a fixed front end's features come once per dataset
        chunks = [torch.sigmoid(net(inputs[i : i + batch_size]).reshape(-1)) for i in range(0, len(X), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks).cpu().numpy() if chunks else np.zeros(0, dtype=np.float32)


def evaluate(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor | np.ndarray,
    threshold: float = 0.5,
    batch_size: int = 512,
    device: torch.device | str | None = None,
) -> dict[str, float | int]:
    """AUC (NaN when only one class is present), accuracy at ``threshold``, mean BCE loss and n."""
    labels = np.asarray(y.cpu().numpy() if isinstance(y, torch.Tensor) else y).reshape(-1).astype(np.float64)
    probs = predict_proba(model, X, batch_size, device).astype(np.float64)
    n = int(len(labels))
    if n == 0:
        return {"auc": math.nan, "accuracy": math.nan, "loss": math.nan, "n": 0, "threshold": threshold}
    auc = float(roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else math.nan
    accuracy = float(((probs >= threshold).astype(np.float64) == labels).mean())
    clipped = np.clip(probs, 1e-7, 1 - 1e-7)
    loss = float(-(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)).mean())
    return {"auc": auc, "accuracy": accuracy, "loss": loss, "n": n, "threshold": threshold}
