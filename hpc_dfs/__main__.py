import sys

from hpc_dfs.cli import main

sys.exit(main())
