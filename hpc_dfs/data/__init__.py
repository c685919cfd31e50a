"""The data library of hpc-dfs: KiTS I/O, clinical records, synthetic data, preprocessing, shards, reader.

Modules (imported on demand, so ``import hpc_dfs.data`` stays cheap):

- :mod:`hpc_dfs.contracts.kits`       the KiTS names: ``CASE_RE``, ``IMAGE_NAME``, ``LABEL_FILES``, ``PRED_RE``
- :mod:`hpc_dfs.data.kits_io`      nibabel I/O of the KiTS layout, label maps, atomic NIfTI save
- :mod:`hpc_dfs.data.kits_clinical` kits.json / CSV records, pre-operative features, ``ClinicalPipeline``
- :mod:`hpc_dfs.data.uci_ckd`      the UCI CKD table (ARFF/CSV) for the clinical experiment
- :mod:`hpc_dfs.data.synth`        the synthetic CT renderers (phantoms, CT around real label maps)
- :mod:`hpc_dfs.data.fingerprint`  dataset fingerprint and derived preprocessing parameters
- :mod:`hpc_dfs.data.geometry`     ``prepare_image``/``restore_volume``: the slice transform and its inverse
- :mod:`hpc_dfs.data.plan`         preprocessing's ``PreprocessPlan``, ``CaseItem`` and ``load_item`` (load + resample)
- :mod:`hpc_dfs.data.shards`       HDF5 shard writing and verification
- :mod:`hpc_dfs.data.reader`       ``ShardSet``, ``SliceDataset``, ``GlobalBatchSampler``, ``partition_balanced``
- :mod:`hpc_dfs.data.augment`      training-time augmentation of 2D CT slices, deterministic per sample
- :mod:`hpc_dfs.data.progress`     the ``--progress`` option and bar of the data stages

The ``synth`` and ``preprocess`` drivers that use them are in :mod:`hpc_dfs.stages`.
"""
