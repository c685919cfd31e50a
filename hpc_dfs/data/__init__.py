"""Data stages of hpc-dfs: KiTS I/O, clinical records, synthetic data, preprocessing, shards, reader.

Modules (imported on demand, so ``import hpc_dfs.data`` stays cheap):

- :mod:`hpc_dfs.data.kits_io`      nibabel I/O of the KiTS layout, label maps, atomic NIfTI save
- :mod:`hpc_dfs.data.clinical`     kits.json / CSV records, pre-operative features, ``ClinicalPipeline``
- :mod:`hpc_dfs.data.synth`        ``hpc-dfs synth``: phantoms and CT around real label maps
- :mod:`hpc_dfs.data.fingerprint`  dataset fingerprint and derived preprocessing parameters
- :mod:`hpc_dfs.data.geometry`     ``prepare_image``/``restore_volume``: the slice transform and its inverse
- :mod:`hpc_dfs.stages.preprocess`   ``hpc-dfs preprocess``: MPI-parallel shards + manifest
- :mod:`hpc_dfs.data.shards`       HDF5 shard writing and verification
- :mod:`hpc_dfs.data.reader`       ``ShardSet``, ``SliceDataset``, ``GlobalBatchSampler``, ``partition_balanced``
"""
