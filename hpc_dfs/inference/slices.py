"""Slice inference: every replica over batches of (2.5D) slices, flip test-time augmentation, the case risk."""
from __future__ import annotations

import numpy as np

from hpc_dfs.data.roi import context_indices
from hpc_dfs.inference.errors import InferenceError
from hpc_dfs.inference.replicas import Replica

__all__ = ["TTA_FLIPS", "infer_slices"]



TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (2, 3))  # dims of [B, 1, H, W]


def _forward(rep: Replica, x, clin):
    """Segmentation logits and risk logits (or None) of one batch."""
    out = rep.model(x, clinical=clin) if rep.takes_clinical else rep.model(x)
    if isinstance(out, dict):
        return out["seg_logits"], out.get("risk_logit")
    return out, None


def infer_slices(reps: list[Replica], slices: np.ndarray, clinical: list[np.ndarray | None], batch_size: int,
                 tta: bool, device) -> tuple[np.ndarray, float | None]:
    """Weighted-average softmax probabilities ``(C, n, H, W)`` of all replicas, and the case risk. Replicas
    trained on regions give their sigmoid probabilities instead, one channel per region.

    Args:
        reps: loaded checkpoints (weights summing to 1).
        slices: normalised slices ``(n, H, W)`` from ``prepare_image`` (a replica of context k sees each slice
            with its k // 2 neighbours on either side, clamped at the ends, as in training).
        clinical: per replica its feature vector, or None for models that take no clinical input.
        batch_size: slices per forward pass.
        tta: average over the four flips of each batch.
        device: torch device.
    """
    import torch
    n = slices.shape[0]
    c = reps[0].n_outputs
    probs = np.zeros((c, n, *slices.shape[1:]), dtype=np.float32)
    risk_sum, risk_w = 0.0, 0.0
    flips = TTA_FLIPS if tta else TTA_FLIPS[:1]
    with torch.inference_mode():
        for rep, vec in zip(reps, clinical):
            rep_risk = 0.0
            has_risk = False
            idx = context_indices(n, rep.context)  # 2.5D: each slice with its neighbours as channels
            for b0 in range(0, n, batch_size):
                x = torch.from_numpy(np.ascontiguousarray(slices[idx[b0:b0 + batch_size]])).to(device)
                clin = None
                if vec is not None:
                    clin = torch.from_numpy(vec)[None].expand(x.shape[0], -1).contiguous().to(device)
                acc = None
                risk_acc = None
                for dims in flips:
                    xi = torch.flip(x, dims) if dims else x
                    seg, risk = _forward(rep, xi, clin)
                    if seg.shape[1] != c:
                        raise InferenceError(f"{rep.path.name} gives {seg.shape[1]} output channels, expected {c}")
                    if seg.shape[2:] != x.shape[2:]:
                        raise InferenceError(f"{rep.path.name} gives {tuple(seg.shape[2:])} logits for "
                                          f"{tuple(x.shape[2:])} slices")
                    p = torch.sigmoid(seg.float()) if rep.regions else torch.softmax(seg.float(), dim=1)
                    p = torch.flip(p, dims) if dims else p
                    acc = p if acc is None else acc + p
                    if risk is not None:
                        r = torch.sigmoid(risk.float())
                        risk_acc = r if risk_acc is None else risk_acc + r
                acc = acc / len(flips)
                probs[:, b0:b0 + x.shape[0]] += (rep.weight * acc).permute(1, 0, 2, 3).cpu().numpy()
                if risk_acc is not None:
                    has_risk = True
                    rep_risk += float((risk_acc / len(flips)).double().sum())
            if has_risk:
                risk_sum += rep.weight * rep_risk / n
                risk_w += rep.weight
    return probs, (risk_sum / risk_w if risk_w > 0 else None)
