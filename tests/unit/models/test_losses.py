"""DFSLoss: agreement with MONAI's DiceCELoss, exact split-batch reduction, risk targets, weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from hpc_dfs.models import DFSLoss

torch.set_num_threads(1)


def _batch(b=6, c=3, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g)
    label = torch.randint(0, c, (b, h, w), generator=g)
    label[: b // 2][label[: b // 2] == c - 1] = 0  # the last class ("tumour") absent from half the slices
    return logits, label


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 1.3)])
def test_matches_monai_dice_ce_without_reduce_fn(include_background, weights):
    logits, label = _batch()
    dice_w, ce_w = weights
    ours, parts = DFSLoss(n_classes=3, dice_weight=dice_w, ce_weight=ce_w,
                          include_background=include_background)(logits, label)
    monai = DiceCELoss(softmax=True, to_onehot_y=True, batch=True, include_background=include_background,
                       smooth_nr=1e-5, smooth_dr=1e-5, lambda_dice=dice_w, lambda_ce=ce_w)(logits, label[:, None])
    assert ours.item() == pytest.approx(monai.item(), rel=1e-5, abs=1e-6)
    assert parts["ce"].item() == pytest.approx(F.cross_entropy(logits, label).item(), rel=1e-6)


def test_class_absent_from_the_whole_batch_follows_monai_smoothing():
    logits, label = _batch()
    label[label == 2] = 1  # tumour absent everywhere
    ours, _ = DFSLoss(n_classes=3)(logits, label)
    monai = DiceCELoss(softmax=True, to_onehot_y=True, batch=True, include_background=False)(logits, label[:, None])
    assert ours.item() == pytest.approx(monai.item(), rel=1e-5)


def test_concatenated_batch_equals_two_halves_with_a_summing_reduce_fn():
    """Simulates two ranks in one process: each half's reduce_fn adds the other half's statistics."""
    logits, label = _batch(b=8, seed=1)
    risk_logit = torch.randn(8, generator=torch.Generator().manual_seed(2))
    risk = torch.tensor([1.0, 0.0, -1.0, 1.0, -1.0, -1.0, 0.0, 1.0])  # unknowns unevenly spread over halves

    full_logits = logits.clone().requires_grad_(True)
    full_risk = risk_logit.clone().requires_grad_(True)
    loss_fn = DFSLoss(n_classes=3, risk_weight=0.5)
    full, full_parts = loss_fn({"seg_logits": full_logits, "risk_logit": full_risk}, label, risk)
    full.backward()

    halves = [slice(0, 3), slice(3, 8)]  # unequal halves, like an uneven last batch
    stats = [loss_fn.statistics({"seg_logits": logits[s], "risk_logit": risk_logit[s]}, label[s], risk[s]).detach()
             for s in halves]
    for rank, s in enumerate(halves):
        other = stats[1 - rank]
        part_logits = logits[s].clone().requires_grad_(True)
        part_risk = risk_logit[s].clone().requires_grad_(True)
        rank_loss = DFSLoss(n_classes=3, risk_weight=0.5, reduce_fn=lambda t, o=other: t + o)
        loss, parts = rank_loss({"seg_logits": part_logits, "risk_logit": part_risk}, label[s], risk[s])
        assert loss.item() == pytest.approx(full.item(), rel=1e-6)
        for k in ("dice", "ce", "risk"):
            assert parts[k].item() == pytest.approx(full_parts[k].item(), rel=1e-6)
        loss.backward()
        # the gradient w.r.t. this rank's own outputs equals that slice of the global-batch gradient
        assert torch.allclose(part_logits.grad, full_logits.grad[s], rtol=1e-5, atol=1e-9)
        assert torch.allclose(part_risk.grad, full_risk.grad[s], rtol=1e-5, atol=1e-9)


def test_averaging_per_rank_losses_would_not_give_the_global_loss():
    """Why the reduce_fn exists: the mean of per-half batch Dice losses differs from the global one."""
    logits, label = _batch(b=8, seed=3)
    label[:4][label[:4] == 2] = 0  # tumour only in the second half
    loss_fn = DFSLoss(n_classes=3)
    full = loss_fn(logits, label)[1]["dice"]
    mean_of_halves = (loss_fn(logits[:4], label[:4])[1]["dice"] + loss_fn(logits[4:], label[4:])[1]["dice"]) / 2
    assert abs(full.item() - mean_of_halves.item()) > 1e-3


def test_unknown_risk_targets_are_ignored():
    logits, label = _batch(b=4)
    risk_logit = torch.tensor([0.3, -1.2, 2.0, 0.1], requires_grad=True)
    risk = torch.tensor([1.0, -1.0, 0.0, -1.0])
    total, parts = DFSLoss(n_classes=3)({"seg_logits": logits, "risk_logit": risk_logit}, label, risk)
    expected = F.binary_cross_entropy_with_logits(risk_logit[[0, 2]], risk[[0, 2]])
    assert parts["risk"].item() == pytest.approx(expected.item(), rel=1e-6)
    total.backward()
    assert risk_logit.grad[1] == 0 and risk_logit.grad[3] == 0 and risk_logit.grad[0] != 0


def test_all_unknown_or_missing_risk_gives_zero_risk_loss():
    logits, label = _batch(b=3)
    loss_fn = DFSLoss(n_classes=3, risk_weight=1.0)
    seg_only, _ = loss_fn(logits, label)
    risk_logit = torch.zeros(3, requires_grad=True)
    total, parts = loss_fn({"seg_logits": logits, "risk_logit": risk_logit}, label, torch.full((3,), -1.0))
    assert parts["risk"].item() == 0.0 and total.item() == pytest.approx(seg_only.item())
    total.backward()
    assert torch.equal(risk_logit.grad, torch.zeros(3))


def test_total_is_the_weighted_sum_of_the_parts():
    logits, label = _batch(b=4)
    out = {"seg_logits": logits, "risk_logit": torch.randn(4)}
    risk = torch.tensor([1.0, 0.0, 1.0, 0.0])
    total, p = DFSLoss(3, seg_weight=2.0, risk_weight=0.3, dice_weight=0.5, ce_weight=1.5)(out, label, risk)
    assert total.item() == pytest.approx(2.0 * (0.5 * p["dice"] + 1.5 * p["ce"]).item() + 0.3 * p["risk"].item(),
                                         rel=1e-6)


def test_reduce_fn_is_called_once_per_evaluation():
    calls = []
    loss_fn = DFSLoss(n_classes=3, reduce_fn=lambda t: calls.append(t.shape) or t)
    logits, label = _batch(b=2)
    loss_fn(logits, label)
    loss_fn({"seg_logits": logits, "risk_logit": torch.zeros(2)}, label, torch.tensor([1.0, -1.0]))
    assert calls == [torch.Size([3 * 2 + 4])] * 2  # same call, same shape, with or without risk


def test_low_precision_logits_give_a_float32_loss():
    logits, label = _batch(b=2)
    total, _ = DFSLoss(n_classes=3)(logits.to(torch.bfloat16), label)
    assert total.dtype == torch.float32 and torch.isfinite(total)


def test_bad_shapes_give_one_clear_error():
    logits, label = _batch(b=2, h=8, w=8)
    with pytest.raises(ValueError, match=r"label must be \[B, H, W\]"):
        DFSLoss(n_classes=3)(logits, label[:, :4])
    with pytest.raises(ValueError, match=r"seg_logits must be \[B, 4, H, W\]"):
        DFSLoss(n_classes=4)(logits, label)
    with pytest.raises(ValueError, match="n_classes >= 2"):
        DFSLoss(n_classes=1)
    # a [B, 1, H, W] label is accepted
    assert torch.isfinite(DFSLoss(n_classes=3)(logits, label[:, None])[0])


KITS23_REGIONS = [[1, 2, 3], [2, 3], [2]]   # kidney and masses, masses, tumour (hpc_dfs.data.regions)


def _kits23_batch(b=6, h=12, w=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g), torch.randint(0, 4, (b, h, w), generator=g)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 1.3)])
def test_regions_are_bce_plus_sigmoid_batch_dice_of_each_region(weights):
    """nnU-Net's DC_and_BCE_loss: BCE over every region and pixel plus the soft Dice of each region (MONAI's
    sigmoid DiceLoss with batch=True as the reference), the targets built from the label by region membership."""
    from monai.losses import DiceLoss
    logits, label = _kits23_batch()
    dice_w, ce_w = weights
    ours, parts = DFSLoss(n_classes=4, dice_weight=dice_w, ce_weight=ce_w, regions=KITS23_REGIONS)(logits, label)
    target = torch.stack([(label >= 1), (label >= 2), (label == 2)], 1).float()
    dice = DiceLoss(sigmoid=True, batch=True, include_background=True, smooth_nr=1e-5, smooth_dr=1e-5)(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert parts["dice"].item() == pytest.approx(dice.item(), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(bce.item(), rel=1e-6)
    assert ours.item() == pytest.approx(dice_w * dice.item() + ce_w * bce.item(), rel=1e-5)


def test_regions_split_batch_with_a_summing_reduce_fn_equals_the_whole_batch():
    """The rank-invariance construction holds for regions: two halves whose statistics are summed give the
    loss and the gradients of the concatenated batch."""
    logits, label = _kits23_batch(b=7, seed=4)
    full_logits = logits.clone().requires_grad_(True)
    loss_fn = DFSLoss(n_classes=4, regions=KITS23_REGIONS)
    full, _ = loss_fn(full_logits, label)
    full.backward()
    halves = [slice(0, 3), slice(3, 7)]
    stats = [loss_fn.statistics(logits[s], label[s]).detach() for s in halves]
    for rank, s in enumerate(halves):
        part = logits[s].clone().requires_grad_(True)
        loss, _ = DFSLoss(n_classes=4, regions=KITS23_REGIONS, reduce_fn=lambda t, o=stats[1 - rank]: t + o)(
            part, label[s])
        assert loss.item() == pytest.approx(full.item(), rel=1e-6)
        loss.backward()
        assert torch.allclose(part.grad, full_logits.grad[s], rtol=1e-5, atol=1e-9)


def test_regions_need_one_logit_channel_per_region():
    logits, label = _kits23_batch()
    with pytest.raises(ValueError, match=r"seg_logits must be \[B, 3, H, W\], got \(6, 4, 12, 10\)"):
        DFSLoss(n_classes=4, regions=KITS23_REGIONS)(torch.randn(6, 4, 12, 10), label)
    with pytest.raises(ValueError, match="non-empty lists of class indices"):
        DFSLoss(n_classes=4, regions=[[1], []])
