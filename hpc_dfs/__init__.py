"""hpc-dfs: Distributed Fusion Segmentation of kidney tumours from CT and clinical records."""
__version__ = "0.1.0"
