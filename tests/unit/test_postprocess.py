"""``hpc_dfs.postprocess`` on constructed label maps with a KiTS affine (axes I, P, L)."""
from __future__ import annotations

import numpy as np
import pytest

from hpc_dfs.config.predict import PostprocessConfig
from hpc_dfs.postprocess import class_indices, midline_x, postprocess

SPACING = (2.0, 1.0, 1.0)  # slices, rows, cols (mm)


def kits_affine(shape, spacing=SPACING):
    """KiTS layout: array axes (slices, rows, cols) -> world (-x from cols, -y from rows, -z from slices)."""
    aff = np.zeros((4, 4))
    aff[0, 2], aff[1, 1], aff[2, 0], aff[3, 3] = -spacing[2], -spacing[1], -spacing[0], 1.0
    aff[:3, 3] = [spacing[2] * (shape[2] - 1) / 2, 0.0, 0.0]  # world x = 0 at the centre column
    return aff


def two_kidneys(shape=(20, 40, 60)):
    lab = np.zeros(shape, np.uint8)
    lab[5:15, 10:30, 5:20] = 1     # kidney in columns 5..19 (patient's right in KiTS layout: cols go to L)
    lab[5:15, 10:30, 40:55] = 1    # kidney in columns 40..54 (patient's left)
    lab[8:12, 15:20, 10:15] = 2    # tumour inside the first kidney
    return lab


def cfg(**kw):
    base = dict(enabled=True, largest_kidney_per_side=False, remove_mass_outside_kidney=False, min_component_mm3=0.0)
    base.update(kw)
    return PostprocessConfig(**base)


def test_clean_map_is_unchanged_by_every_step():
    lab = two_kidneys()
    out, info = postprocess(lab, kits_affine(lab.shape), PostprocessConfig())
    np.testing.assert_array_equal(out, lab)
    assert info["small_components_voxels"] == info["other_components_voxels"] == 0
    assert info["masses_outside_kidney_voxels"] == 0


def test_largest_component_per_side():
    lab = two_kidneys()
    noisy = lab.copy()
    noisy[1:3, 2:5, 2:5] = 1       # small blob on the right side: removed (smaller than the right kidney)
    noisy[1:3, 2:5, 56:59] = 2     # small "tumour" blob on the left side: removed
    out, info = postprocess(noisy, kits_affine(lab.shape), cfg(largest_kidney_per_side=True))
    np.testing.assert_array_equal(out, lab)
    assert info["other_components_voxels"] == 18 + 18
    # both kidneys survive: they are on different sides of the midline
    assert (out[..., :30] > 0).sum() > 0 and (out[..., 30:] > 0).sum() > 0


def test_midline_from_body_mask():
    shape = (4, 10, 20)
    aff = kits_affine(shape)
    ct = np.full(shape, -1000.0)
    ct[:, :, 2:8] = 40.0  # body only in columns 2..7 -> centroid column 4.5
    assert midline_x(shape, aff, ct) == pytest.approx(aff[0, 2] * 4.5 + aff[0, 3])
    assert midline_x(shape, aff, None) == pytest.approx(0.0)  # grid centre


def test_mass_outside_kidney_removed_with_margin_in_mm():
    lab = two_kidneys()
    lab[8:10, 20:24, 22:25] = 2    # 2 columns (2 mm) beyond the first kidney's edge at column 19: kept at 5 mm
    lab[8:10, 20:24, 30:33] = 2    # 10 mm beyond it and 7 mm before the other kidney: removed
    out, info = postprocess(lab, kits_affine(lab.shape), cfg(remove_mass_outside_kidney=True, kidney_margin_mm=5.0))
    assert (out[8:10, 20:24, 22:25] == 2).all()
    assert (out[8:10, 20:24, 30:33] == 0).all()
    assert info["masses_outside_kidney_voxels"] == 2 * 4 * 3
    out0, _ = postprocess(lab, kits_affine(lab.shape), cfg(remove_mass_outside_kidney=True, kidney_margin_mm=1.0))
    assert (out0[8:10, 20:24, 22:25] == 0).all()  # 3 mm away: outside a 1 mm margin


def test_min_component_size_in_mm3():
    lab = two_kidneys()
    lab[1, 1, 1] = 1               # 2 mm^3 speck: background
    lab[6, 12, 45] = 2             # 2 mm^3 tumour speck inside the left kidney: becomes kidney
    out, info = postprocess(lab, kits_affine(lab.shape), cfg(min_component_mm3=10.0))
    assert out[1, 1, 1] == 0 and out[6, 12, 45] == 1
    assert (out[8:12, 15:20, 10:15] == 2).all()  # the real tumour (160 mm^3) stays
    assert info["small_components_voxels"] == 2
    # the threshold is in mm^3: with 0.1 mm voxels each kidney (3000 voxels) is 3 mm^3, under 10 mm^3
    tiny = kits_affine(lab.shape, (0.1, 0.1, 0.1))
    out2, _ = postprocess(lab, tiny, cfg(min_component_mm3=10.0))
    assert not out2.any()
    out3, _ = postprocess(lab, tiny, cfg(min_component_mm3=2.0))  # kidneys stay, the 0.1 mm^3 tumour is kidney
    assert (out3 > 0).sum() == (lab > 0).sum() - 1 and not (out3 == 2).any()


def test_switched_off_and_cyst_classes():
    lab = two_kidneys()
    lab[0, 0, 0] = 2
    out, info = postprocess(lab, kits_affine(lab.shape), PostprocessConfig(enabled=False))
    np.testing.assert_array_equal(out, lab)
    assert info == {"enabled": False}
    assert class_indices(["background", "kidney", "tumor", "cyst"]) == (1, [2, 3])
    with pytest.raises(ValueError, match="kidney"):
        class_indices(["background", "organ"])


def test_empty_map():
    lab = np.zeros((5, 6, 7), np.uint8)
    out, _ = postprocess(lab, kits_affine(lab.shape), PostprocessConfig())
    assert not out.any()


def test_cysts_are_masses_like_tumours():
    """With 4 classes (KiTS23), a cyst inside a kidney stays, a cyst away from any kidney goes, and every step
    leaves a clean 4-class map as it is."""
    classes = ["background", "kidney", "tumor", "cyst"]
    lab = two_kidneys()
    lab[6:9, 20:25, 44:48] = 3      # a cyst in the left kidney
    out, _ = postprocess(lab, kits_affine(lab.shape), PostprocessConfig(), classes)
    np.testing.assert_array_equal(out, lab)
    stray = lab.copy()
    stray[16:19, 33:37, 28:32] = 3  # a "cyst" between the kidneys, touching neither
    out, info = postprocess(stray, kits_affine(lab.shape), cfg(remove_mass_outside_kidney=True), classes)
    np.testing.assert_array_equal(out, lab)
    assert info["masses_outside_kidney_voxels"] == 3 * 4 * 4
