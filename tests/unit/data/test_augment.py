"""Training augmentation: deterministic per (seed, epoch, index), batch-independent, label-consistent."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hpc_dfs.config import ConfigError, load
from hpc_dfs.config.train import AugmentConfig
from hpc_dfs.data.augment import SliceAugmenter, derive_seed, gaussian_blur

torch.set_num_threads(1)
OFF = dict(flip_lr=0.0, flip_ap=0.0, affine_prob=0.0, elastic_prob=0.0, bias_prob=0.0, gamma_prob=0.0,
           contrast_prob=0.0, window_prob=0.0, blur_prob=0.0, lowres_prob=0.0, noise_prob=0.0, texture_prob=0.0)


def _batch(b=6, h=40, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    label = torch.zeros(b, h, w, dtype=torch.long)
    label[:, 8:30, 10:22] = 1                       # an off-centre "kidney" (asymmetric: flips show)
    label[:, 12:20, 12:18] = 2                      # with a "tumour"
    image = label.float()[:, None] * 2.0 + 0.3 * torch.randn(b, 1, h, w, generator=g) + 0.01 * xx
    return image, label


def test_same_keys_same_result_and_keys_matter():
    aug = SliceAugmenter(AugmentConfig(elastic_prob=0.5), seed=7)
    image, label = _batch()
    a = aug(image, label, range(6), epoch=2)
    b = aug(image, label, range(6), epoch=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = aug(image, label, range(6), epoch=3)
    assert not torch.equal(a[0], c[0])
    d = SliceAugmenter(AugmentConfig(elastic_prob=0.5), seed=8)(image, label, range(6), epoch=2)
    assert not torch.equal(a[0], d[0])


def test_a_sample_does_not_depend_on_its_batch():
    """What makes np=2 == np=1: each sample's augmentation depends only on its own key, to the bit.

    Bitwise, not within a tolerance: a difference of 1e-7 in one augmented slice (a grouped conv2d rounding
    differently at batch 1 than at batch 2) grew to 4e-4 of the weights of a 2-rank run after 4 steps.
    """
    aug = SliceAugmenter(dataclasses.replace(AugmentConfig(), **{k: 0.7 for k in OFF if k != "flip_ap"}), seed=1)
    image, label = _batch(8)
    whole_x, whole_y = aug(image, label, range(100, 108), epoch=5)
    for lo, hi in ((0, 3), (3, 4), (4, 8), (4, 6)):
        part_x, part_y = aug(image[lo:hi], label[lo:hi], range(100 + lo, 100 + hi), epoch=5)
        assert torch.equal(part_x, whole_x[lo:hi]), float((part_x - whole_x[lo:hi]).abs().max())
        assert torch.equal(part_y, whole_y[lo:hi])


@pytest.mark.parametrize("op", [k for k in OFF if k not in ("flip_lr", "flip_ap")] + ["domain_random_prob"])
def test_each_op_alone_is_bitwise_batch_independent(op):
    """Every op at probability 1, batch of 4 against each sample alone (the subsets of 1 and of several)."""
    aug = SliceAugmenter(AugmentConfig(**{**OFF, op: 1.0}), seed=4)
    image, label = _batch(4)
    for epoch in range(3):
        whole_x, whole_y = aug(image, label, range(8, 12), epoch=epoch)
        for i in range(4):
            x, y = aug(image[i:i + 1], label[i:i + 1], [8 + i], epoch=epoch)
            assert torch.equal(x, whole_x[i:i + 1]) and torch.equal(y, whole_y[i:i + 1]), (op, epoch, i)


def test_gaussian_blur_matches_a_convolution_and_is_batch_independent():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 24, 20, generator=g)
    sigma = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0])
    y = gaussian_blur(x, sigma, max_sigma=3.0)
    for i in range(5):    # the textbook separable convolution, one sample at a time, in float64
        r = 9
        t = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-0.5 * (t / sigma[i].double()) ** 2)
        k = k / k.sum()
        xi = torch.nn.functional.pad(x[i:i + 1].double(), (r, r, 0, 0), mode="reflect")
        xi = torch.nn.functional.conv2d(xi, k.repeat(2, 1)[:, None, None, :], groups=2)
        xi = torch.nn.functional.pad(xi, (0, 0, r, r), mode="reflect")
        xi = torch.nn.functional.conv2d(xi, k.repeat(2, 1)[:, None, :, None], groups=2)
        torch.testing.assert_close(y[i:i + 1].double(), xi, rtol=0, atol=1e-5)
        assert torch.equal(gaussian_blur(x[i:i + 1], sigma[i:i + 1], max_sigma=3.0), y[i:i + 1])


def test_everything_off_is_identity():
    aug = SliceAugmenter(AugmentConfig(**OFF), seed=0)
    image, label = _batch()
    x, y = aug(image, label, range(6))
    torch.testing.assert_close(x, image, rtol=0, atol=1e-6)
    assert torch.equal(y, label)


def test_flips_move_image_and_label_together():
    aug = SliceAugmenter(AugmentConfig(**{**OFF, "flip_lr": 1.0}), seed=0)
    image, label = _batch()
    x, y = aug(image, label, range(6))
    assert torch.equal(x, image.flip(-1)) and torch.equal(y, label.flip(-1))


def test_geometry_keeps_label_aligned_with_image():
    """Rotation/zoom/elastic warp image and label with one grid: the warped intensity still marks the label."""
    cfg = AugmentConfig(**{**OFF, "affine_prob": 1.0, "elastic_prob": 1.0, "rotate_deg": 30.0})
    image, label = _batch(6)
    image = label.float()[:, None]                  # intensity == class, so alignment is checkable
    x, y = SliceAugmenter(cfg, seed=3)(image, label, range(6))
    assert not torch.equal(y, label)                # it did move
    assert set(y.unique().tolist()) <= {0, 1, 2}
    agree = (x[:, 0].round().long() == y).float().mean()
    assert agree > 0.97, f"only {agree:.3f} of pixels agree between warped image and warped label"


def test_intensity_ops_change_image_not_label_and_stay_finite():
    cfg = AugmentConfig(**{**OFF, **{k: 1.0 for k in ("bias_prob", "gamma_prob", "contrast_prob", "window_prob",
                                                       "blur_prob", "lowres_prob", "noise_prob", "texture_prob")}})
    image, label = _batch()
    x, y = SliceAugmenter(cfg, seed=0)(image, label, range(6))
    assert torch.equal(y, label)
    assert torch.isfinite(x).all() and x.shape == image.shape and x.dtype == image.dtype
    assert (x - image).abs().mean() > 0.05
    # every sample got its own draw
    d = (x - image).flatten(1)
    assert not torch.allclose(d[0], d[1])


@pytest.mark.parametrize("op", ["noise_prob", "texture_prob", "blur_prob", "lowres_prob", "gamma_prob",
                                "bias_prob", "window_prob", "contrast_prob"])
def test_each_intensity_op_acts(op):
    image, label = _batch(4)
    x, _ = SliceAugmenter(AugmentConfig(**{**OFF, op: 1.0}), seed=2)(image, label, range(4))
    assert (x - image).abs().max() > 1e-3, op


def test_gaussian_blur_per_sample_sigma():
    x = torch.zeros(2, 1, 21, 21)
    x[:, :, 10, 10] = 1.0
    y = gaussian_blur(x, torch.tensor([0.0, 2.0]), max_sigma=3.0)
    torch.testing.assert_close(y[0], x[0], rtol=0, atol=1e-6)   # sigma 0: unchanged
    assert y[1, 0, 10, 10] < 0.1 and y[1].sum() == pytest.approx(1.0, abs=1e-4)


def test_bad_inputs_and_config():
    aug = SliceAugmenter(AugmentConfig(), seed=0)
    image, label = _batch()
    with pytest.raises(ValueError, match="B keys"):
        aug(image, label, range(5))
    with pytest.raises(ConfigError, match="augmentation.noise_prob"):
        load(AugmentConfig, overrides=["noise_prob=1.5"])
    with pytest.raises(ConfigError, match="augmentation.gamma"):
        load(AugmentConfig, overrides=["gamma=[2.0, 1.0]"])


def test_derive_seed_mixes():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, e, i) for e in range(3) for i in range(50)}) == 150


# ----------------------------------------------------------------------------- domain randomisation
DR = {**OFF, "domain_random_prob": 1.0}


def _regions(x, label):
    """Mean intensity of each class region, per sample: [B, 3]."""
    return torch.stack([(x[:, 0] * (label == c)).sum((1, 2)) / (label == c).sum((1, 2)) for c in range(3)], 1)


def test_domain_randomisation_is_off_by_default_and_deterministic():
    assert AugmentConfig().domain_random_prob == 0.0
    image, label = _batch(8)
    aug = SliceAugmenter(AugmentConfig(**DR), seed=4)
    a, ya = aug(image, label, range(8), epoch=1)
    b, _ = aug(image, label, range(8), epoch=1)
    assert torch.equal(a, b) and torch.equal(ya, label)            # the label is not touched
    assert torch.isfinite(a).all() and (a - image).abs().mean() > 0.05
    c, _ = aug(image, label, range(8), epoch=2)
    assert not torch.equal(a, c)


def test_domain_randomisation_does_not_depend_on_the_batch():
    cfg = dataclasses.replace(AugmentConfig(), domain_random_prob=0.7, bias_prob=0.7, blur_prob=0.7, lowres_prob=0.7)
    aug = SliceAugmenter(cfg, seed=2)
    image, label = _batch(8)
    whole, _ = aug(image, label, range(40, 48), epoch=1)
    for lo, hi in ((0, 1), (1, 5), (5, 8)):
        part, _ = aug(image[lo:hi], label[lo:hi], range(40 + lo, 40 + hi), epoch=1)
        assert torch.equal(part, whole[lo:hi])


def test_kidney_and_tumour_get_no_fixed_intensity():
    image, label = _batch(32)
    x, _ = SliceAugmenter(AugmentConfig(**DR), seed=0)(image, label, range(32))
    m = _regions(x, label)
    std = x.flatten(1).std(1)
    kidney_vs_bg, tumour_vs_kidney = (m[:, 1] - m[:, 0]) / std, (m[:, 2] - m[:, 1]) / std
    assert (kidney_vs_bg < 0).any() and (kidney_vs_bg > 0).any()   # brighter in some samples, darker in others
    assert (tumour_vs_kidney < 0).any() and (tumour_vs_kidney > 0).any()
    m0 = _regions(image, label)
    assert ((m0[:, 1] - m0[:, 0]) > 0).all() and ((m0[:, 2] - m0[:, 1]) > 0).all()  # the input had one ordering


def test_monotone_curves_keep_the_tissue_order_and_others_reorder():
    image, label = _batch(24)
    image = label.float()[:, None] + 0.01 * torch.rand(24, 1, 40, 48, generator=torch.Generator().manual_seed(0))
    still = dict(region_shift=0.0, region_texture=[0.0, 0.0])
    x, _ = SliceAugmenter(AugmentConfig(**{**DR, **still, "remap_monotone": 1.0}), seed=1)(image, label, range(24))
    m = _regions(x, label)
    assert (m[:, 1] >= m[:, 0] - 1e-4).all() and (m[:, 2] >= m[:, 1] - 1e-4).all()
    x, _ = SliceAugmenter(AugmentConfig(**{**DR, **still, "remap_monotone": 0.0}), seed=1)(image, label, range(24))
    m = _regions(x, label)
    assert ((m[:, 1] < m[:, 0]) | (m[:, 2] < m[:, 1])).float().mean() > 0.25


def test_region_shift_moves_only_the_label_regions():
    """remap_points=2 + monotone is the identity curve, so only the region shifts act."""
    image, label = _batch(6)
    cfg = AugmentConfig(**{**DR, "remap_points": 2, "remap_monotone": 1.0, "region_texture": [0.0, 0.0],
                           "region_edge": 1.0, "region_shift": 2.0})
    x, _ = SliceAugmenter(cfg, seed=5)(image, label, range(6))
    far = torch.zeros_like(label, dtype=torch.bool)
    far[:, 34:, :] = True                                            # > 3 sigma of edge smoothing from the kidney
    torch.testing.assert_close(x[:, 0][far], image[:, 0][far], rtol=0, atol=1e-4)
    std = image.flatten(1).std(1)
    core = torch.zeros_like(far)
    core[:, 24:28, 14:18] = True                                     # kidney, away from its edges and the tumour
    d = (x - image)[:, 0][core].view(6, -1)
    assert (d.std(1) < 1e-2).all()                                   # one shift per region and sample
    assert (d.mean(1).abs() <= 2.0 * std + 1e-4).all() and d.mean(1).abs().max() > 0.1


def test_domain_randomisation_config_is_checked():
    with pytest.raises(ConfigError, match="augmentation.domain_random_prob"):
        load(AugmentConfig, overrides=["domain_random_prob=1.5"])
    with pytest.raises(ConfigError, match="augmentation.remap_points"):
        load(AugmentConfig, overrides=["remap_points=1"])
    with pytest.raises(ConfigError, match="augmentation.region_texture"):
        load(AugmentConfig, overrides=["region_texture=[0.5, 0.1]"])


def test_domain_randomisation_treats_2p5d_context_channels_alike():
    """With k context slices as channels, every channel gets the same curve, region shifts and textures."""
    image, label = _batch(4)
    ctx = image.repeat(1, 3, 1, 1)                                   # [B,3,H,W]: three identical slices
    x, _ = SliceAugmenter(dataclasses.replace(AugmentConfig(), domain_random_prob=1.0), seed=6)(ctx, label, range(4))
    assert x.shape == ctx.shape and (x - ctx).abs().mean() > 0.05
    torch.testing.assert_close(x[:, 0], x[:, 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(x[:, 0], x[:, 2], rtol=0, atol=1e-5)
