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
    """What makes np=2 == np=1: each sample's augmentation depends only on its own key."""
    aug = SliceAugmenter(dataclasses.replace(AugmentConfig(), **{k: 0.7 for k in OFF if k != "flip_ap"}), seed=1)
    image, label = _batch(8)
    whole_x, whole_y = aug(image, label, range(100, 108), epoch=5)
    for lo, hi in ((0, 3), (3, 4), (4, 8)):
        part_x, part_y = aug(image[lo:hi], label[lo:hi], range(100 + lo, 100 + hi), epoch=5)
        torch.testing.assert_close(part_x, whole_x[lo:hi], rtol=0, atol=1e-5)
        assert torch.equal(part_y, whole_y[lo:hi])


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
