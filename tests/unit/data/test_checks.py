"""hpc_dfs.data.checks: one spacing for every stage, and intensities that cannot be CT."""
from __future__ import annotations

import numpy as np
import pytest

from hpc_dfs.data.checks import GeometryProblem, IntensityProblem, check_intensities, checked_spacing


def _affine(sz=2.5, sy=0.8, sx=0.8):
    aff = np.zeros((4, 4))
    aff[0, 2], aff[1, 1], aff[2, 0], aff[3, 3] = -sx, -sy, -sz, 1.0
    return aff


@pytest.mark.parametrize("image, phrase", [
    (np.ones((2, 3, 3), np.complex64), "complex"),
    (np.full((2, 3, 3), 1e40, np.float64), "non-finite"),
    (np.full((2, 3, 3), np.nan, np.float32), "non-finite"),
    (np.full((2, 3, 3), 2e5, np.float32), "implausible"),
    (np.full((2, 3, 3), 10**9, np.int32), "implausible")])
def test_intensities_that_cannot_be_ct(image, phrase):
    with pytest.raises(IntensityProblem, match=phrase):
        check_intensities(image)


def test_ct_intensities_pass():
    check_intensities(np.array([[[-1024, 0, 3071]]], np.int16))
    check_intensities(np.array([[[-1024.5, 0.25, 30000.0]]], np.float64))


def test_spacing_is_pixdim_once_it_agrees_with_the_affine():
    assert checked_spacing((4, 5, 6), _affine(), (2.5, 0.8, 0.8)) == (2.5, 0.8, 0.8)


@pytest.mark.parametrize("shape, column, zooms, phrase", [
    ((4, 0, 6), None, (2.5, 0.8, 0.8), "zero-length axis"),
    ((4, 5, 6), 2, (2.5, 0.8, 0.8), "column 2 is zero"),
    ((4, 5, 6), None, (1.0, 0.8, 1.0), "contradictory"),
    ((4, 5, 6), None, (2.5, 0.0, 0.8), "not positive")])
def test_degenerate_or_contradictory_geometry(shape, column, zooms, phrase):
    aff = _affine()
    if column is not None:
        aff[:3, column] = 0.0
    with pytest.raises(GeometryProblem, match=phrase):
        checked_spacing(shape, aff, zooms)
