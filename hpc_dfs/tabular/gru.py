"""The Clinical-GRU's training recipe: full-batch AdamW, warm-up and cosine decay, early stopping."""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from hpc_dfs.config.clinical import ClinicalConfig
__all__ = ["train_gru", "gru_proba"]


def _early_stopping_split(X: np.ndarray, y: np.ndarray, val_fraction: float, seed: int) -> tuple:
    """``(X_fit, y_fit, X_val, y_val)``: a stratified inner split, or all rows and no validation when a class
    is too small for it."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y, minlength=2)
    n_val = int(round(val_fraction * len(y)))
    if not (counts.min() >= 2 and min(counts) * val_fraction >= 1 and n_val >= 2):
        return X, y, None, None
    X_fit, X_val, y_fit, y_val = train_test_split(X, y, test_size=val_fraction, stratify=y, random_state=seed)
    return X_fit, y_fit, X_val, y_val


def _class_weights(yf: Any, balanced: bool) -> Any:
    """Per-row loss weights: with ``balanced`` each class contributes half of the loss, else all ones."""
    import torch

    n_pos = float(yf.sum())
    n_neg = float(len(yf) - n_pos)
    if balanced and n_pos > 0 and n_neg > 0:
        return torch.where(yf > 0, len(yf) / (2 * n_pos), len(yf) / (2 * n_neg))
    return torch.ones_like(yf)


def train_gru(X: np.ndarray, y: np.ndarray, cfg: ClinicalConfig, seed: int) -> tuple[Any, dict]:
    """Train one Clinical-GRU on preprocessed training rows with the stable recipe.

    An inner stratified split (``cfg.val_fraction``) provides the early-stopping loss; the weights
    of the best inner-validation epoch are returned. When a class is too small for the inner split,
    training runs all ``cfg.epochs`` on all rows (and says so in the returned info).

    Returns:
        ``(model in eval mode, info)`` with ``epochs_run``, ``best_epoch``, ``best_val_loss``,
        ``train_s`` and ``early_stopping``.
    """
    import torch
    import torch.nn.functional as F

    from hpc_dfs.models import ClinicalGRU

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    X_fit, y_fit, X_val, y_val = _early_stopping_split(X, y, cfg.val_fraction, seed)
    early = X_val is not None
    xf = torch.as_tensor(X_fit, dtype=torch.float32)
    yf = torch.as_tensor(y_fit, dtype=torch.float32)
    w = _class_weights(yf, cfg.balanced)

    model = ClinicalGRU(X.shape[1], hidden=cfg.hidden, dropout=cfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.warmup_epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: min(1.0, (e + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(e, cfg.epochs) / cfg.epochs)))
    batch = cfg.batch_size or len(yf)
    best_loss, best_state, best_epoch, bad, epoch = math.inf, None, -1, 0, -1
    if early:
        xv = torch.as_tensor(X_val, dtype=torch.float32)
        yv = torch.as_tensor(y_val, dtype=torch.float32)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(yf), generator=gen)
        for i in range(0, len(yf), batch):
            idx = order[i:i + batch]
            loss = F.binary_cross_entropy_with_logits(model(xf[idx]), yf[idx], weight=w[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
        sched.step()
        if not early:
            continue
        model.eval()
        with torch.no_grad():
            val_loss = F.binary_cross_entropy_with_logits(model(xv), yv).item()
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, bad = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    info = {"epochs_run": epoch + 1, "best_epoch": best_epoch + 1 if early else epoch + 1,
            "best_val_loss": best_loss if early else None, "early_stopping": early,
            "train_s": time.perf_counter() - t0}
    return model, info


def gru_proba(models: list, X: np.ndarray) -> np.ndarray:
    """P(positive) of ``X``: the mean of the ``models``' predicted probabilities.

    Args:
        models: trained Clinical-GRUs.
        X: preprocessed features ``(n, F)``.
    """
    import torch

    x = torch.as_tensor(X, dtype=torch.float32)
    return np.mean([m.predict_proba(x).double().numpy() for m in models], axis=0)
