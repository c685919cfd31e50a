"""The torch engine: ``torch.distributed`` with Gloo on CPU and NCCL on CUDA, as one more backend object.

It gives the trainer what Horovod gives it, with the same arithmetic, so that a torch run reaches a Horovod
run's weights (``tests/distributed/test_train_distributed.py``):

- a *differentiable* allreduce (:class:`_AllReduce`): sum (or mean) forward, the same reduction of the
  gradient backward, as Horovod's ``allreduce`` -- the DFS loss's rank-summed Dice statistics and the CPU
  SyncBatchNorm (:mod:`hpc_dfs.parallel.syncbn`) rely on it;
- a distributed optimizer (:class:`GradientSync`) with Horovod's ``synchronize()`` / ``skip_synchronize()``
  protocol: gradients are reduced once per optimizer step, after the step's last backward pass, so the
  trainer clips and unscales the *averaged* gradients, and gradient accumulation communicates nothing in
  between (what DDP's ``no_sync()`` gives). Like Horovod, a parameter without a gradient gets a zero one, the
  average is a sum times ``1/size``, and ``compression='fp16'`` puts the gradients on the wire in float16 (DDP's
  ``fp16_compress_hook``). The gradients go in buckets of :data:`BUCKET_BYTES` (Horovod's fusion buffer);
- object collectives and number allreduces on a Gloo group (the default group under Gloo; a second, Gloo,
  group next to NCCL on CUDA), so rank-0 broadcasts of configs, plans and RNG states work on every device.

Why not DDP itself: DDP reduces inside ``backward()``, so the trainer's flow (accumulate k passes, reduce,
unscale, clip the averaged gradients, step; the same flow as Horovod's) would need a second code path in the
trainer, and the model would be wrapped (``module.`` in every key of the checkpoint). Reducing in
``synchronize()`` keeps one trainer for both engines and checkpoints that load under either.

The process group is started by :func:`start` from a :class:`~hpc_dfs.parallel.rendezvous.Rendezvous`; every
wait is bounded by its ``timeout``, and a rank that dies closes its sockets, which fails the others' next
collective at once.
"""
from __future__ import annotations

import atexit
import contextlib
import sys
from datetime import timedelta
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from hpc_dfs.parallel.backends import Backend, DistError, reduction
from hpc_dfs.parallel.rendezvous import Rendezvous

__all__ = ["TorchBackend", "GradientSync", "start", "BUCKET_BYTES"]

#: gradients are reduced in buckets of at most this many bytes (Horovod's default fusion threshold)
BUCKET_BYTES = 64 * 1024 * 1024

_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


class _AllReduce(torch.autograd.Function):
    """Allreduce with Horovod's gradient: the backward of a sum (mean) is the sum (mean) of the gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, kind: str, size: int) -> torch.Tensor:
        ctx.kind, ctx.size = kind, size
        return _reduce(tensor, kind, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduce.apply(grad, ctx.kind, ctx.size), None, None


def _reduce(tensor: torch.Tensor, kind: str, size: int, group: Any = None) -> torch.Tensor:
    out = tensor.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=_OPS[kind], group=group)
    if kind == "mean":
        out.mul_(1.0 / size)   # Horovod's Average: the sum times 1/size
    return out


def _buckets(tensors: list[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors of one dtype and device, each at most ``limit`` bytes (or one tensor)."""
    out: list[list[torch.Tensor]] = []
    nbytes = 0
    for t in tensors:
        same = out and out[-1][0].dtype == t.dtype and out[-1][0].device == t.device
        if same and nbytes + t.numel() * t.element_size() <= limit:
            out[-1].append(t)
            nbytes += t.numel() * t.element_size()
        else:
            out.append([t])
            nbytes = t.numel() * t.element_size()
    return out


class GradientSync:
    """Mixed into an optimizer's own class (as Horovod's ``DistributedOptimizer`` is): ``step`` uses gradients
    reduced over the ranks.

    ``synchronize()`` reduces this step's gradients (once); ``step()`` calls it unless inside
    ``skip_synchronize()``; see the module docstring.
    """

    _sync_backend: "TorchBackend"
    _sync_params: list[torch.nn.Parameter]
    _sync_fp16: bool
    _sync_scale: tuple[float, float]   # (before, after) the sum: (1/f, f/size) for the average, (1, 1) for the sum
    _sync_done: bool
    _sync_skip: bool

    def synchronize(self) -> None:
        """Reduce every parameter's gradient over the ranks (a missing gradient counts as zeros)."""
        if self._sync_done:
            return
        grads = []
        for p in self._sync_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        before, after = self._sync_scale
        for bucket in _buckets(grads, BUCKET_BYTES):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            wire = flat.half() if self._sync_fp16 and flat.is_floating_point() else flat
            if before != 1.0:
                wire.mul_(before)
            dist.all_reduce(wire)
            if after != 1.0:
                wire.mul_(after)
            flat = wire.to(flat.dtype)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        self._sync_done = True

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Inside, ``step()`` uses the gradients as they are (after an explicit ``synchronize()``)."""
        self._sync_skip = True
        try:
            yield
        finally:
            self._sync_skip = False

    def step(self, closure=None):
        if not self._sync_skip:
            self.synchronize()
        self._sync_done = False
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # new gradients follow: reduce them (also after a step that GradScaler skipped for an inf)
        self._sync_done = False
        super().zero_grad(set_to_none)


class TorchBackend(Backend):
    """``torch.distributed`` once the process group is up (see the module docstring).

    Args:
        rdv: where this rank joined.
        objects: the Gloo group of the object collectives (None: the default group is Gloo).
        device: the device that tensor collectives expect.
    """

    name = "torch"

    def __init__(self, rdv: Rendezvous, objects: Any, device: torch.device) -> None:
        super().__init__(rdv.rank, rdv.size, rdv.local_rank, rdv.local_size)
        self._objects, self._device, self._init = objects, device, rdv.init_method

    def describe(self) -> dict:
        return {"horovod": False, "mpi4py": False, "torch_distributed": dist.get_backend(), "init": self._init}

    def allreduce(self, tensor: torch.Tensor, op: str, name: str | None) -> torch.Tensor:
        kind = reduction(op)
        if kind in ("sum", "mean") and tensor.requires_grad:
            return _AllReduce.apply(tensor, kind, self.size)
        return _reduce(tensor, kind, self.size)

    def allreduce_array(self, arr: np.ndarray, op: str, name: str | None) -> np.ndarray:
        kind = reduction(op)
        return _reduce(torch.as_tensor(np.ascontiguousarray(arr)), kind, self.size, self._objects).numpy()

    def allgather(self, tensor: torch.Tensor, name: str | None) -> torch.Tensor:
        n = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
        counts = [torch.zeros_like(n) for _ in range(self.size)]
        dist.all_gather(counts, n)
        counts = [int(c.item()) for c in counts]
        padded = tensor.new_zeros((max(counts),) + tuple(tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def broadcast_object(self, obj: Any, root: int, name: str | None) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=root, group=self._objects)
        return box[0]

    def allgather_object(self, obj: Any, name: str | None) -> list:
        out: list = [None] * self.size
        dist.all_gather_object(out, obj, group=self._objects)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self._objects)

    def broadcast_model(self, model: torch.nn.Module, root: int) -> None:
        if self.size == 1:
            return
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=root)

    def broadcast_optimizer_state(self, optimizer: torch.optim.Optimizer, root: int) -> None:
        if self.size == 1:
            return
        state = _to_cpu(optimizer.state_dict()) if self.rank == root else None
        state = self.broadcast_object(state, root, None)
        if self.rank != root:
            optimizer.load_state_dict(state)

    def distributed_optimizer(self, optimizer: torch.optim.Optimizer, named_parameters: Iterable | None,
                              compression: str, op: str, backward_passes_per_step: int,
                              gradient_predivide_factor: float) -> torch.optim.Optimizer:
        """The optimizer, its class extended by :class:`GradientSync` (see the public function).

        Raises:
            ValueError: for an unknown ``compression`` or ``op``.
            DistError: for ``op='adasum'`` (Horovod only).
        """
        if compression not in ("none", "fp16"):
            raise ValueError(f"unknown gradient compression '{compression}' (use none or fp16)")
        if op.lower() == "adasum":
            raise DistError("Adasum exists only in Horovod: use --engine horovod, or average the gradients")
        if op.lower() not in ("average", "sum"):
            raise ValueError(f"unknown gradient reduction '{op}' (use average or adasum)")
        f = float(gradient_predivide_factor)
        scale = (1.0 / f, f / self.size) if op.lower() == "average" else (1.0, 1.0)
        base = type(optimizer)
        if not isinstance(optimizer, GradientSync):
            optimizer.__class__ = type(base.__name__, (GradientSync, base), {})
        optimizer._sync_backend, optimizer._sync_fp16, optimizer._sync_scale = self, compression == "fp16", scale
        optimizer._sync_params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        optimizer._sync_done = optimizer._sync_skip = False
        optimizer.backward_passes_per_step = backward_passes_per_step
        return optimizer

    def finalize(self) -> None:
        """Leave the process group, and finalize MPI where the rendezvous started it (mpirun)."""
        if dist.is_initialized():
            dist.destroy_process_group()
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.Finalize()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def start(rdv: Rendezvous, tensors: bool, timeout_s: float) -> TorchBackend:
    """Start the process group (once per process) and return the backend.

    Args:
        rdv: where this rank joins.
        tensors: whether the stage does tensor work: then NCCL on CUDA (with a Gloo group for objects);
            False (object collectives only: preprocess, predict, evaluate): Gloo alone.
        timeout_s: the longest any collective, and the rendezvous, may wait for another rank.

    Raises:
        DistError: (exit code 4) when the ranks cannot meet within ``timeout_s``, or NCCL is missing.
    """
    cuda = tensors and torch.cuda.is_available()
    timeout = timedelta(seconds=timeout_s)
    device = torch.device("cpu")
    kw: dict = {}
    if cuda:
        if not dist.is_nccl_available():
            raise DistError("CUDA is present but this torch has no NCCL: install a CUDA build of torch")
        device = torch.device("cuda", rdv.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        kw["device_id"] = device
    if not dist.is_available():
        raise DistError("this torch was built without torch.distributed: install an official torch wheel")
    try:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", init_method=rdv.init_method, rank=rdv.rank,
                                    world_size=rdv.size, timeout=timeout, **kw)
        objects = dist.new_group(backend="gloo", timeout=timeout) if cuda else None
    except (RuntimeError, ValueError) as e:   # DistStoreError and DistNetworkError are RuntimeErrors
        raise DistError(f"rank {rdv.rank} of {rdv.size} could not join the torch.distributed job at "
                        f"{rdv.init_method} within {timeout_s:.0f} s: {str(e).splitlines()[0] if str(e) else e!r}"
                        ) from None
    atexit.register(_leave)   # a process that exits without shutdown() must not abort in Gloo's teardown
    return TorchBackend(rdv, objects, device)


def _leave() -> None:
    """Leave the process group at interpreter exit (seen without it: 'terminate called without an active
    exception', SIGABRT, when a script that used the torch engine simply ended)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
