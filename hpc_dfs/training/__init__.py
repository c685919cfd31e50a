"""The training library under :mod:`hpc_dfs.stages.train`: the loop (:mod:`.trainer`), its state
(:mod:`.state`), the set-up checks (:mod:`.plan`), optimizer and schedule (:mod:`.optim`), checkpoints
(:mod:`.checkpoint`, the one schema), metrics, curves and signals, and cross-validation (:mod:`.folds`: the folds of
``train --folds`` one after the other).
"""
