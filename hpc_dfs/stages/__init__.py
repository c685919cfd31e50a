"""The stage drivers, one module per ``hpc-dfs`` verb, in pipeline order::

    synth -> preprocess -> train -> predict -> evaluate;  clinical;  report;  bench;  models

Each provides ``add_arguments(parser)`` and ``main(args) -> int`` and is read top to bottom with its
launch commands in its docstring: a driver of at most 300 lines. They use the library below them
(``hpc_dfs.data``, ``hpc_dfs.inference``, ``hpc_dfs.metrics``, ``hpc_dfs.report``, ``hpc_dfs.tabular``,
``hpc_dfs.models``, ``hpc_dfs.training``, ``hpc_dfs.parallel``, ``hpc_dfs.config``) and never import each
other: what a later stage needs travels in the folder contract (``hpc_dfs/CONTRACTS.md``, ``hpc_dfs.contracts``).
"""
