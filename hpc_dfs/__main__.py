from hpc_dfs.cli import run

run()
