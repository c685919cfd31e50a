"""The clinical experiment on tabular data (``hpc-dfs clinical``): the Clinical-GRU beside sklearn baselines.

- :mod:`hpc_dfs.tabular.table`         the data file (UCI CKD or kits.json) as features, target and ids
- :mod:`hpc_dfs.tabular.preprocessor`  the per-fold preprocessing Pipeline, with ``RiskOrientation``
- :mod:`hpc_dfs.tabular.gru`           the GRU's training recipe
- :mod:`hpc_dfs.tabular.scores`        scores per fold and pooled; the metrics table
- :mod:`hpc_dfs.tabular.figures`       confusion matrices, ROC, SHAP
- :mod:`hpc_dfs.tabular.experiment`    the k-fold experiment (:func:`~hpc_dfs.tabular.experiment.run`)

The clinical features of the segmentation pipeline (kits.json into the fusion model) are
:mod:`hpc_dfs.data.kits_clinical`; this package is the stand-alone experiment.
"""
