"""Parameters and FLOPs of every model: ``hpc-dfs models [--json] [--size H W] [--n-clinical F]``.

Convention: FLOPs = 2 x multiply-adds of the convolutions, transposed convolutions and matrix
products (GRU and linear layers included), counted by :class:`torch.utils.flop_counter.FlopCounterMode`
for one forward pass of a batch of one ``1 x H x W`` slice (default 512 x 512) and, for the clinical
models, one record of ``F`` features. Normalisation, activations, pooling and additions are not
counted (they are a few percent at most). Models are built on PyTorch's ``meta`` device, so the count
takes no memory and well under a second even for the 31M-parameter U-Net.

The ``unet`` row is the paper's Table 5 baseline: Ronneberger's U-Net, 64 base channels, 4 poolings,
no normalisation, **3 input channels** and 1 output channel, which counts exactly 31,031,745
parameters (with 1 input channel it is 31,030,593; see :mod:`hpc_dfs.models.unet`).

Example::

    $ hpc-dfs models --json
    {"unet": {"params": 31031745, "gflops": 385.34}, "rusp_net": {...}, ..., "_meta": {...}}
"""
from __future__ import annotations

import argparse
import json

from hpc_dfs.config import ConfigError

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``hpc-dfs models`` options: ``--json``, ``--size``, ``--n-clinical``, ``--n-classes``."""
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--size", nargs=2, type=int, default=[512, 512], metavar=("H", "W"),
                        help="slice size for the FLOP count (default: 512 512)")
    parser.add_argument("--n-clinical", type=int, default=24, metavar="F",
                        help="number of clinical features (default: 24, UCI CKD); GRU params do not depend on it")
    parser.add_argument("--n-classes", type=int, default=3, help="segmentation classes (default: 3)")


def main(args: argparse.Namespace) -> int:
    """Print the table (or ``--json``) of every model's parameters and GFLOPs.

    Raises:
        ConfigError: a size or feature count below 1 (exit code 2).
    """
    from hpc_dfs.models.summary import model_summary
    try:
        summary = model_summary(args.size, args.n_clinical, args.n_classes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.json:
        print(json.dumps(summary))
        return 0
    meta = summary.pop("_meta")
    ref = summary["unet"]
    h, w = meta["size"]
    print(f"{'model':<14}{'params':>14}{'GFLOPs':>12}{'params/U-Net':>15}{'FLOPs/U-Net':>14}   at {h}x{w}")
    for name, row in summary.items():
        print(f"{name:<14}{row['params']:>14,}{row['gflops']:>12.3f}{row['params'] / ref['params']:>15.4f}"
              f"{row['gflops'] / ref['gflops']:>14.4f}")
    print(f"\n{meta['convention']}\nunet: {meta['unet']}")
    return 0
