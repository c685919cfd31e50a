"""The predictor (nnU-Net keeps its own in ``inference/``); ``hpc_dfs/stages/predict.py`` drives it.

- :mod:`hpc_dfs.inference.cases`     the cases under ``--input``, shared over ranks by voxel count; clinical records
- :mod:`hpc_dfs.inference.replicas`  checkpoints loaded as ``Replica`` (k-fold replicas, the cascade's stage 2)
- :mod:`hpc_dfs.inference.slices`    slice inference over the replicas, flip TTA, the case risk
- :mod:`hpc_dfs.inference.case`      one case end to end: transform, infer, restore, cascade, post-process, write
- :mod:`hpc_dfs.inference.nifti`     the deterministic NIfTI writer
- :mod:`hpc_dfs.inference.folds`     a cross-validation run: the ensemble of its folds, or each fold's own cases (--oof)
- :mod:`hpc_dfs.inference.setup`     what every rank loads before the first case, and the ranks' agreement on it
- :mod:`hpc_dfs.inference.errors`    ``PredictError`` (stops the run) and ``InferenceError`` (skips one case)

The prediction folder's names, provenance and summary are :mod:`hpc_dfs.contracts.prediction`.
"""
