"""The on-disk contracts between the stages, one module each (``hpc_dfs/CONTRACTS.md`` describes them in prose).

- :mod:`hpc_dfs.contracts.kits`        the KiTS layout: case ids, image/label/clinical file names, the ground truth
- :mod:`hpc_dfs.contracts.shards`      SHARDS/: ``manifest.json`` (schema version), ``clinical_pipeline.json``
- :mod:`hpc_dfs.contracts.checkpoint`  RUN/checkpoints/: the checkpoint schema; the only ``torch.load``
- :mod:`hpc_dfs.contracts.run`         RUN/: ``metrics.jsonl``, ``run.json`` (what ran), ``config.toml``, stages
- :mod:`hpc_dfs.contracts.prediction`  PRED/: prediction names, provenance, ``summary.json``, ``risk.csv``
- :mod:`hpc_dfs.contracts.evaluation`  ``eval.json`` / ``.csv`` / ``.md``

Each holds its file names (written as literals nowhere else: ``tests/unit/test_architecture.py``), a typed schema,
the writer and the reader; the stage that writes a folder and the stages that read it import the same module.
Contracts import only ``hpc_dfs.errors``, ``hpc_dfs.fsutil`` and ``hpc_dfs.log``.
"""
