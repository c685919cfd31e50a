"""The deterministic NIfTI writer of predictions: the same array gives the same bytes on every rank and run."""
from __future__ import annotations

import gzip
import io

import numpy as np

__all__ = ["nifti_gz_bytes"]


def nifti_gz_bytes(array: np.ndarray, ref_img, level: int = 6, descrip: str | None = None) -> bytes:
    """Gzipped NIfTI-1 bytes of ``array`` with ``ref_img``'s header (affine, qform/sform codes, zooms).

    Written by hand (nibabel serialises, :mod:`gzip` compresses with ``mtime=0`` and no file name)
    so that the same array gives the same bytes on every rank and every run. ``descrip`` (at most 79
    characters) replaces the header's description: predict's provenance (see :func:`provenance`).
    """
    import nibabel as nib
    hdr = ref_img.header.copy()
    if descrip is not None:
        hdr["descrip"] = descrip.encode("ascii", "replace")[:79]
    img = nib.Nifti1Image(array, ref_img.affine, header=hdr)
    img.set_data_dtype(array.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    raw = img.to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=level, mtime=0) as gz:
        gz.write(raw)
    return buf.getvalue()
