#!/usr/bin/env python
"""Entry script of the synthetic KiTS generator (the same as ``hpc-dfs synth``).

    python preprocess/run_synth.py --out data/kits --cases 8 --seed 0
    python preprocess/run_synth.py --out data/kits --from-labels ../shared/data/kits19/labels \\
        --kits-json ../shared/data/kits19/kits.json --cases case_00002,case_00004
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpc_dfs.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))
