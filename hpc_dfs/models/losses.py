"""DFS loss: Dice + cross-entropy for segmentation, BCE for the case-level risk, exact across ranks.

``total = seg_weight * (dice_weight * Dice + ce_weight * CE) + risk_weight * BCE``

- **Dice** is the soft Dice of the softmax probabilities against the one-hot labels, computed over
  the *whole batch* (the numerator and denominator are summed over the batch and the pixels before
  the ratio, MONAI's ``batch=True``), per class, then averaged over the classes (background
  excluded by default). Per-sample Dice suppresses the tumour, which is absent from most slices.
- **CE** is the mean pixel-wise cross-entropy of the logits.
- **BCE** is the mean binary cross-entropy of the risk logits over the cases whose risk label is
  known; a target of ``-1`` means unknown and is ignored.

Why this is hand-written rather than ``monai.losses.DiceCELoss``: in data-parallel training each rank
holds a slice of the global batch, and a batch Dice is a ratio of *sums over the batch*. Averaging
per-rank Dice losses is not the Dice of the global batch. :class:`DFSLoss` therefore computes the
sufficient statistics (per-class intersection, prediction and ground-truth sums; CE sum and pixel
count; BCE sum and known-label count), lets an optional ``reduce_fn`` sum them over all ranks, and
only then forms the ratios. With ``reduce_fn`` set to a *differentiable* sum-allreduce (Horovod's
``allreduce(op=Sum)``, whose backward is again a sum-allreduce), the loss on every rank equals the
loss of one process holding the concatenated global batch, and so do the gradients after the
optimizer's gradient averaging (the backward sum over ``N`` identical upstream gradients gives
``N x``, the ``1/N`` average cancels it). MONAI's DiceCELoss has no hook for this reduction.
Without ``reduce_fn`` the result matches
``monai.losses.DiceCELoss(softmax=True, to_onehot_y=True, batch=True, include_background=False)``
(checked in ``tests/unit/models/test_losses.py``).

**Regions** (``regions=[[1, 2, 3], [2, 3], [2]]``, nnU-Net's region training, e.g. KiTS23's hierarchical
classes): the logits are one channel per region, each a sigmoid; a region's target is "the label is one of
its classes". The segmentation term is then nnU-Net's ``DC_and_BCE_loss``: the mean binary cross-entropy
over every region and pixel plus the batch soft Dice of every region (all regions count: none is background).
The statistics have the same layout (the BCE sum and the count of region-pixels in place of CE's), so the
rank reduction is the same.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DFSLoss"]


class DFSLoss(nn.Module):
    """Weighted Dice + CE segmentation loss plus BCE risk loss, with optional cross-rank reduction.

    Args:
        n_classes: number of segmentation classes ``C`` (>= 2).
        seg_weight: weight of the segmentation term ``dice_weight * Dice + ce_weight * CE``.
        risk_weight: weight of the risk BCE.
        dice_weight: weight of Dice inside the segmentation term (MONAI's ``lambda_dice``).
        ce_weight: weight of CE inside the segmentation term (MONAI's ``lambda_ce``).
        reduce_fn: optional differentiable ``tensor -> tensor`` summing a tensor over all ranks.
            It is called exactly once per loss evaluation, on every rank, with a 1-D float32 tensor
            of length ``3 * C' + 4`` (``C'`` = classes in the Dice).
        include_background: include class 0 in the Dice mean.
        smooth_nr, smooth_dr: Dice smoothing added to numerator and denominator (MONAI's defaults).
        regions: None (softmax over ``n_classes``), or per output channel the class indices of its region
            (sigmoid outputs, ``len(regions)`` of them; ``n_classes`` is then the number of label classes).

    Call: ``loss(outputs, label, risk=None) -> (total, {"dice", "ce", "risk"})`` where ``outputs`` is
    the model's dict (``seg_logits`` ``[B, C, H, W]``, optional ``risk_logit`` ``[B]``) or a bare
    logits tensor, ``label`` is ``[B, H, W]`` (or ``[B, 1, H, W]``) int64 class indices and ``risk``
    is ``[B]`` float with ``-1`` for unknown. The returned components are detached, for logging.
    """

    def __init__(self, n_classes: int = 3, seg_weight: float = 1.0, risk_weight: float = 0.1,
                 dice_weight: float = 1.0, ce_weight: float = 1.0,
                 reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 include_background: bool = False, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5,
                 regions: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"DFSLoss needs n_classes >= 2 (softmax over classes), got {n_classes}")
        self.n_classes = n_classes
        self.regions = None if regions is None else [sorted(int(c) for c in r) for r in regions]
        if self.regions is not None and (not self.regions or not all(self.regions)):
            raise ValueError(f"DFSLoss regions must be non-empty lists of class indices, got {regions}")
        #: the logits' channels: one per class, or one per region
        self.n_out = n_classes if self.regions is None else len(self.regions)
        self.seg_weight, self.risk_weight = float(seg_weight), float(risk_weight)
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)
        self.reduce_fn = reduce_fn
        self.include_background = include_background
        self.smooth_nr, self.smooth_dr = float(smooth_nr), float(smooth_dr)
        self.first_class = 0 if include_background or self.regions is not None else 1

    def _split(self, outputs: Mapping[str, torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(outputs, torch.Tensor):
            return outputs, None
        if "seg_logits" not in outputs:
            raise KeyError(f"DFSLoss expects model outputs with 'seg_logits', got keys {sorted(outputs)}")
        return outputs["seg_logits"], outputs.get("risk_logit")

    def statistics(self, outputs: Mapping[str, torch.Tensor] | torch.Tensor, label: torch.Tensor,
                   risk: torch.Tensor | None = None) -> torch.Tensor:
        """Local sufficient statistics of this process's batch, as one float32 vector.

        Layout: ``[intersection (C'), prediction sum (C'), ground-truth sum (C'), CE sum, pixel count,
        BCE sum, known-risk count]``. Sums of these over ranks give the global batch's statistics.
        """
        logits, risk_logit = self._split(outputs)
        if logits.dim() != 4 or logits.shape[1] != self.n_out:
            raise ValueError(f"seg_logits must be [B, {self.n_out}, H, W], got {tuple(logits.shape)}")
        if label.dim() == 4 and label.shape[1] == 1:
            label = label[:, 0]
        if label.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"label must be [B, H, W] = {(logits.shape[0], *logits.shape[2:])} to match "
                             f"seg_logits {tuple(logits.shape)}, got {tuple(label.shape)}")
        label = label.long()
        logits = logits.float()  # AMP: reductions in float32

        if self.regions is None:
            probs = torch.softmax(logits, dim=1)
            onehot = F.one_hot(label, self.n_classes).permute(0, 3, 1, 2).to(probs.dtype)
            probs, onehot = probs[:, self.first_class:], onehot[:, self.first_class:]
            ce_sum = F.cross_entropy(logits, label, reduction="sum")
        else:   # one sigmoid per region; the target: the label is one of the region's classes
            probs = torch.sigmoid(logits)
            members = [torch.tensor(r, device=label.device) for r in self.regions]
            onehot = torch.stack([torch.isin(label, m) for m in members], 1).to(probs.dtype)
            ce_sum = F.binary_cross_entropy_with_logits(logits, onehot, reduction="sum")
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        pred_sum = probs.sum(dims)
        gt_sum = onehot.sum(dims)
        n_pix = torch.tensor(float(label.numel() * (1 if self.regions is None else self.n_out)),
                             device=logits.device)

        if risk_logit is not None and risk is not None:
            risk = risk.to(device=logits.device, dtype=torch.float32).reshape(-1)
            risk_logit = risk_logit.float().reshape(-1)
            if risk.shape != risk_logit.shape:
                raise ValueError(f"risk targets {tuple(risk.shape)} do not match risk_logit {tuple(risk_logit.shape)}")
            known = (risk >= 0).float()
            bce = F.binary_cross_entropy_with_logits(risk_logit, risk.clamp(0.0, 1.0), reduction="none")
            bce_sum, n_known = (bce * known).sum(), known.sum()
        else:
            bce_sum = logits.new_zeros(())
            n_known = logits.new_zeros(())
        return torch.cat([intersection, pred_sum, gt_sum,
                          torch.stack([ce_sum, n_pix, bce_sum, n_known])])

    def from_statistics(self, stats: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss from (possibly rank-summed) statistics made by :meth:`statistics`."""
        k = self.n_out - self.first_class
        intersection, pred_sum, gt_sum = stats[:k], stats[k:2 * k], stats[2 * k:3 * k]
        ce_sum, n_pix, bce_sum, n_known = stats[3 * k:3 * k + 4]
        dice = (1.0 - (2.0 * intersection + self.smooth_nr) / (pred_sum + gt_sum + self.smooth_dr)).mean()
        ce = ce_sum / n_pix.clamp_min(1.0)
        risk = bce_sum / n_known.clamp_min(1.0)  # 0 (with zero gradient) when no label is known
        total = self.seg_weight * (self.dice_weight * dice + self.ce_weight * ce) + self.risk_weight * risk
        return total, {"dice": dice.detach(), "ce": ce.detach(), "risk": risk.detach()}

    def forward(self, outputs: Mapping[str, torch.Tensor] | torch.Tensor, label: torch.Tensor,
                risk: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        stats = self.statistics(outputs, label, risk)
        if self.reduce_fn is not None:
            stats = self.reduce_fn(stats)
        return self.from_statistics(stats)
