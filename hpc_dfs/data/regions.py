"""Region-based segmentation (nnU-Net's "regions"): overlapping targets, one sigmoid output each.

KiTS23's hierarchical evaluation classes, as nnU-Net's KiTS23 configuration trains them
(``--set loss.regions=kits23``)::

    region               classes of the shards      label written where its probability > 0.5
    kidney_and_masses    kidney, tumor, cyst        kidney (1)
    masses               tumor, cyst                cyst (3)
    tumor                tumor                      tumor (2)

The labels are written in that order, each over the one before (nnU-Net's ``regions_class_order``
``[1, 3, 2]``), so a voxel inside all three regions is tumour, inside the first two cyst, inside the first
only kidney. The regions are named by class names and resolved against the shards' classes
(:func:`resolve_regions`): the result (class indices, label per region) travels in the checkpoint, so
``predict`` turns the sigmoid outputs into a label map without knowing the data set.

Usage::

    spec = resolve_regions("kits23", ["background", "kidney", "tumor", "cyst"])
    spec["classes"] == [[1, 2, 3], [2, 3], [2]]; spec["labels"] == [1, 3, 2]
    label = region_labels(probs, spec["labels"])     # probs (3, ...) sigmoid outputs -> uint8 labels
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np

from hpc_dfs.config import ConfigError

__all__ = ["REGION_SETS", "REGION_NAMES", "resolve_regions", "region_labels", "region_mask"]

#: region set -> (region name, the classes it holds, the class written where it is predicted), in write order
REGION_SETS: dict[str, tuple[tuple[str, tuple[str, ...], str], ...]] = {
    "kits23": (("kidney_and_masses", ("kidney", "tumor", "cyst"), "kidney"),
               ("masses", ("tumor", "cyst"), "cyst"),
               ("tumor", ("tumor",), "tumor")),
}
#: the settings ``loss.regions`` takes ("none": one softmax over the classes)
REGION_NAMES = ("none", *REGION_SETS)


def resolve_regions(name: str, classes: Sequence[str]) -> Optional[dict]:
    """The region set ``name`` in class indices of ``classes``; None for ``"none"``.

    Args:
        name: ``"none"`` or a key of :data:`REGION_SETS`.
        classes: the shards' class names, background first.

    Returns:
        ``{"name", "names": [region names], "classes": [[class indices] per region], "labels": [class index
        written per region]}`` (plain JSON: it is stored in the checkpoint).

    Raises:
        ConfigError: an unknown set, or a class the set needs that the shards lack (the message names both).
    """
    if name == "none":
        return None
    if name not in REGION_SETS:
        raise ConfigError(f"loss.regions must be one of {', '.join(REGION_NAMES)}, got '{name}'")
    classes = list(classes)
    needed = sorted({c for _, members, label in REGION_SETS[name] for c in (*members, label)})
    missing = [c for c in needed if c not in classes]
    if missing:
        raise ConfigError(f"loss.regions={name} needs the classes {', '.join(needed)}, but the shards have "
                          f"{classes} (no {', '.join(missing)}): preprocess KiTS21/23 data with the default "
                          "label_map, which keeps the cyst (label 3) as a class")
    sets = REGION_SETS[name]
    return {"name": name, "names": [r for r, _, _ in sets],
            "classes": [sorted(classes.index(c) for c in members) for _, members, _ in sets],
            "labels": [classes.index(label) for _, _, label in sets]}


def region_labels(probs: np.ndarray, labels: Sequence[int], threshold: float = 0.5) -> np.ndarray:
    """A uint8 label map from region probabilities, each region's label written over the earlier ones.

    Args:
        probs: ``(R, ...)`` sigmoid probabilities, one channel per region, in the set's order.
        labels: the class index written per region (``spec["labels"]``).
        threshold: a voxel is in a region where its probability exceeds it.

    Raises:
        ValueError: ``probs`` has another number of channels than ``labels``.
    """
    probs = np.asarray(probs)
    if probs.shape[0] != len(labels):
        raise ValueError(f"{probs.shape[0]} region channels for {len(labels)} region labels")
    out = np.zeros(probs.shape[1:], dtype=np.uint8)
    for p, lab in zip(probs, labels):
        out[p > threshold] = lab
    return out


def region_mask(label: np.ndarray, members: Sequence[int]) -> np.ndarray:
    """Where a class-index map lies in a region (its classes ``members``): a bool array of ``label``'s shape.

    Args:
        label: class indices.
        members: the region's class indices.
    """
    return np.isin(label, np.asarray(list(members)))
