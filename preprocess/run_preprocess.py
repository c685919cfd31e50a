#!/usr/bin/env python
"""Entry script of the preprocessing stage (the same as ``hpc-dfs preprocess``).

    python preprocess/run_preprocess.py --data data/kits --out data/shards [--slice-size 256,256]
    mpirun -np 4 python preprocess/run_preprocess.py --data data/kits --out data/shards
    srun --mpi=pmix python preprocess/run_preprocess.py --data data/kits --out data/shards

All options: ``python preprocess/run_preprocess.py --help``. The work is done by
:mod:`hpc_dfs.stages.preprocess`; this file only forwards its arguments.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hpc_dfs.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
