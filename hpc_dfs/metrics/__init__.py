"""Segmentation metrics: Dice, surface Dice and the region sets of the KiTS challenges.

Modules import only numpy, scipy and MONAI (and :mod:`hpc_dfs.errors`, :mod:`hpc_dfs.fsutil`), so that any
stage, the report and the benchmarks can score label maps without pulling in a stage. :mod:`.kits23` is the
official KiTS23 evaluation (hierarchical evaluation classes, Dice and surface Dice, ``evaluation.csv``).
"""
