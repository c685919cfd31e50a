"""The segmentation metrics of hpc-dfs (as MONAI keeps its own in ``metrics/``); ``stages/evaluate.py`` drives them.

- :mod:`hpc_dfs.metrics.overlap`    Dice and IoU of KiTS19's regions (kidney = ``label > 0``, tumour = ``label == 2``)
- :mod:`hpc_dfs.metrics.surface`    HD95 and surface Dice (MONAI), in mm
- :mod:`hpc_dfs.metrics.detection`  tumour detection: hit, missed, wrong kidney, false-positive components
- :mod:`hpc_dfs.metrics.cases`      every metric of one case, missing predictions, the means over cases
- :mod:`hpc_dfs.metrics.folders`    a prediction folder paired with a ground-truth folder, and its provenance

The results' file layout (eval.json, .csv, .md) is :mod:`hpc_dfs.contracts.evaluation`.
"""
from hpc_dfs.metrics.cases import EvaluationError, evaluate_arrays
from hpc_dfs.metrics.detection import kits_affine, tumour_detection
from hpc_dfs.metrics.overlap import dice, iou
from hpc_dfs.metrics.surface import hausdorff, surface_dice

__all__ = ["EvaluationError", "evaluate_arrays", "kits_affine", "tumour_detection", "dice", "iou", "hausdorff",
           "surface_dice"]
