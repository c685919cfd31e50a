"""Helpers of the training loop in :mod:`hpc_dfs.stages.train`: checkpoints, metrics, curves and signals.

The loop itself stays in ``hpc_dfs/train.py`` so that it reads top to bottom.
"""
