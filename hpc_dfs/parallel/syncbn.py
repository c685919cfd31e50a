"""Batch norm whose statistics are synchronised across ranks, on any device (CPU included).

Why not ``hvd.SyncBatchNorm``: in Horovod 0.28.1 it raises ``ValueError: SyncBatchNorm expected
input tensor to be on GPU`` on CPU (verified under ``mpirun -np 2``), and torch's own SyncBatchNorm
needs CUDA and DDP. This one computes the per-channel sum, sum of squares and count on each rank and
adds them up with Horovod's *differentiable* allreduce, so both the forward statistics and the
backward pass equal those of one process holding the whole global batch. That is what makes a
2-rank run reproduce a 1-rank run with the same global batch.

On CUDA, the engine's own is used instead (faster fused kernels): ``hvd.SyncBatchNorm`` under Horovod,
``torch.nn.SyncBatchNorm`` under the torch engine (NCCL). On CPU both engines use this one.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for ``nn.BatchNorm{1,2,3}d`` that reduces statistics over all ranks."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from hpc_dfs import parallel
        if not self.training or parallel.size() == 1:
            return super().forward(x)  # plain batch norm: eval, or one rank holds the whole batch
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.full((1,), float(x.numel() // c), dtype=torch.float32, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = parallel.allreduce(stats, op="sum", name=None)
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / torch.clamp(total - 1, min=1.0)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by a rank-synchronised one (weights kept).

    Args:
        module: the model (or a layer).

    Returns:
        The module with its BatchNorm layers replaced (the same object unless ``module`` is one itself).
    """
    from hpc_dfs import parallel
    cls = SyncBatchNorm
    if torch.cuda.is_available() and parallel.horovod_available():
        import horovod.torch as hvd  # parallel/ is the one package allowed to import horovod
        cls = hvd.SyncBatchNorm
    elif torch.cuda.is_available() and parallel.torch_engine_active():
        cls = nn.SyncBatchNorm      # NCCL's default group
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child))
    return out
