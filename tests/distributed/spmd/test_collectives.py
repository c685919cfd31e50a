"""SPMD tests of hpc_dfs.parallel: pytest runs on EVERY rank, under a real launcher.

    mpirun --allow-run-as-root --oversubscribe -np 2 --tag-output .venv/bin/python -m pytest tests/distributed/spmd
    horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python -m pytest tests/distributed/spmd

(`make test` runs both.) A failure on any rank makes the launcher exit non-zero. Every test runs the
same collectives in the same order on all ranks, so a failing assert on one rank cannot deadlock
the other: assertions come after the collectives. Run as a single process, size is 1 and the
tests check the size-1 semantics instead.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from hpc_dfs import parallel
from hpc_dfs.parallel.launch import launch_rank_size

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module", autouse=True)
def _init():
    parallel.init()
    torch.set_num_threads(1)
    yield


def test_topology_matches_launcher():
    topo = parallel.topology()
    assert topo["size"] == launch_rank_size()[1]
    assert launch_rank_size() == (parallel.rank(), parallel.size()) == parallel.rank_size_or_env()
    assert 0 <= topo["rank"] < topo["size"]
    assert parallel.is_main() == (parallel.rank() == 0)
    gathered = parallel.allgather_object(parallel.rank())
    assert gathered == list(range(parallel.size()))


def test_allreduce_mean_and_sum_exact():
    n, r = parallel.size(), parallel.rank()
    t = torch.arange(4, dtype=torch.float32) + 10.0 * r
    mean = parallel.allreduce(t, op="mean", name="t.mean")
    total = parallel.allreduce(t, op="sum", name="t.sum")
    expect_sum = sum(torch.arange(4, dtype=torch.float32) + 10.0 * q for q in range(n))
    assert torch.equal(total, expect_sum)
    assert torch.equal(mean, expect_sum / n)
    assert parallel.allreduce_scalar(r + 1.0, op="mean") == pytest.approx((n + 1) / 2)
    assert parallel.allreduce_scalar(r + 1, op="sum") == n * (n + 1) / 2
    assert parallel.allreduce_scalar(r, op="max") == n - 1


def test_broadcast_model_and_objects():
    torch.manual_seed(100 + parallel.rank())           # different weights on every rank
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    parallel.broadcast_model(model, root=0)
    flat = torch.cat([p.detach().flatten() for p in model.state_dict().values()])
    torch.manual_seed(100)
    ref = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    ref_flat = torch.cat([p.flatten() for p in ref.state_dict().values()])
    assert torch.equal(flat, ref_flat)             # every rank now holds rank 0's weights
    obj = parallel.broadcast_object({"rank": parallel.rank(), "cfg": [1, 2]}, root=0)
    assert obj == {"rank": 0, "cfg": [1, 2]}
    parallel.barrier()


def _data(rank: int, per_rank: int = 4):
    g = torch.Generator().manual_seed(1234 + rank)
    return torch.randn(per_rank, 6, generator=g), torch.randn(per_rank, 3, generator=g)


def test_distributed_optimizer_equals_single_process_on_concatenated_batch():
    """5 SGD+momentum steps, different data per rank == one process on the concatenated batch."""
    n = parallel.size()
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double().float()
    ref = copy.deepcopy(model)
    opt = parallel.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                    model.named_parameters())
    parallel.broadcast_model(model)
    parallel.broadcast_optimizer_state(opt)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(5):
        x, y = _data(parallel.rank() + 100 * step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        xs, ys = zip(*[_data(q + 100 * step) for q in range(n)])
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref(torch.cat(xs)), torch.cat(ys)).backward()
        ref_opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = parallel.allgather(flat.unsqueeze(0), name="opt.params")
    ref_flat = torch.cat([p.detach().flatten() for p in ref.parameters()])
    for q in range(n):                              # bitwise identical on all ranks
        assert torch.equal(everyone[q], flat)
    torch.testing.assert_close(flat, ref_flat, rtol=1e-6, atol=1e-7)


def test_sync_batchnorm_equals_global_batch_norm():
    """parallel.SyncBatchNorm on per-rank halves == nn.BatchNorm2d on the whole batch (fwd and grad)."""
    n, r = parallel.size(), parallel.rank()
    g = torch.Generator().manual_seed(5)
    full = torch.randn(2 * n, 3, 5, 5, generator=g)
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    sbn = parallel.convert_sync_batchnorm(copy.deepcopy(bn))
    assert isinstance(sbn, parallel.SyncBatchNorm) or torch.cuda.is_available()
    x = full[2 * r:2 * r + 2].clone().requires_grad_(True)
    y = sbn(x)
    (y * torch.arange(y.numel()).view_as(y).float().sin()).sum().backward()
    xr = full.clone().requires_grad_(True)
    yr = bn(xr)
    w = torch.arange(y.numel()).view_as(y).float().sin().repeat(n, 1, 1, 1)  # same per-rank weights
    (yr * w).sum().backward()
    torch.testing.assert_close(y, yr[2 * r:2 * r + 2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad[2 * r:2 * r + 2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sbn.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sbn.running_var, bn.running_var, rtol=1e-5, atol=1e-6)


def test_mpi_objects_backend_under_an_mpi_launcher():
    """The backend of init(horovod=False) under mpirun/srun: ranks, objects, number allreduce, tensor work refused."""
    if parallel.launcher() not in ("mpirun", "srun"):
        pytest.skip(f"the mpi4py backend runs only under an MPI launcher (this is {parallel.launcher()})")
    from mpi4py import MPI

    from hpc_dfs.parallel.backends import MpiObjectsBackend
    b = MpiObjectsBackend(MPI.COMM_WORLD, MPI)
    n, r = b.size, b.rank
    gathered = b.allgather_object({"r": r}, None)
    root_obj = b.broadcast_object(("from", r), 0, None)
    mean = b.allreduce_array(np.array([r + 1.0, 2.0 * r]), "avg", None)
    top = b.allreduce_array(np.array([float(r)]), "max", None)
    b.barrier()
    assert (r, n, b.local_size) == (parallel.rank(), parallel.size(), parallel.local_size())
    assert gathered == [{"r": q} for q in range(n)]
    assert root_obj == ("from", 0)
    np.testing.assert_allclose(mean, [(n + 1) / 2, n - 1.0])
    assert top[0] == n - 1
    with pytest.raises(parallel.DistError, match="needs Horovod"):
        b.allreduce(torch.ones(1), "sum", None)
    with pytest.raises(parallel.DistError, match="needs Horovod"):
        b.distributed_optimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), None, "none",
                                "average", 1, 1.0)


# ----------------------------------------------------------------------------- the engine's semantics (both engines)
def test_engine_is_the_one_asked_for():
    """Horovod by default, torch under torchrun or with HPC_DFS_ENGINE=torch (make test runs all of these)."""
    import os
    want = os.environ.get("HPC_DFS_ENGINE") or ("torch" if parallel.launcher() == "torchrun" else "horovod")
    names = parallel.allgather_object(parallel.engine())
    if want == "horovod" and parallel.size() == 1 and not parallel.horovod_available():
        pytest.skip("a plain process without Horovod runs the size-1 backend")
    assert names == [want] * parallel.size() and parallel.topology()["engine"] == want


def test_allreduce_gradient_is_the_reduction_of_the_gradients():
    """Horovod's rule, which the DFS loss's rank-summed statistics rely on: d(sum_q x_q)/dx_r = sum_q of the
    upstream gradients (and 1/n of it for the mean)."""
    n, r = parallel.size(), parallel.rank()
    x = torch.arange(3.0, requires_grad=True)
    w = torch.tensor([1.0, -2.0, 0.5]) * (r + 1)          # a different upstream gradient on every rank
    (parallel.allreduce(x * (r + 1), op="sum", name="grad.sum") * w).sum().backward()
    g_sum = x.grad.clone()
    x.grad = None
    (parallel.allreduce(x, op="mean", name="grad.mean") * w).sum().backward()
    total = sum(q + 1 for q in range(n))
    assert torch.equal(g_sum, (r + 1) * torch.tensor([1.0, -2.0, 0.5]) * total)
    torch.testing.assert_close(x.grad, torch.tensor([1.0, -2.0, 0.5]) * total / n)


def test_accumulation_and_fp16_compression_equal_one_process():
    """2 backward passes per step, gradients on the wire in float16, synchronize() then step() inside
    skip_synchronize() (the trainer's protocol) == one process on the whole batch, within float16 rounding."""
    n, r = parallel.size(), parallel.rank()
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ref = copy.deepcopy(model)
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt = parallel.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model.named_parameters(),
                                        compression="fp16", backward_passes_per_step=2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for step in range(3):
        opt.zero_grad()
        for k in range(2):
            x, y = _data(r + 10 * k + 100 * step, per_rank=2)
            (nn.functional.mse_loss(model(x), y) / 2).backward()
        opt.synchronize()
        with opt.skip_synchronize():
            opt.step()
        ref_opt.zero_grad()
        for k in range(2):
            xs, ys = zip(*[_data(q + 10 * k + 100 * step, per_rank=2) for q in range(n)])
            (nn.functional.mse_loss(ref(torch.cat(xs)), torch.cat(ys)) / 2).backward()
        ref_opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = parallel.allgather(flat.unsqueeze(0), name="fp16.params")
    ref_flat = torch.cat([p.detach().flatten() for p in ref.parameters()])
    for q in range(n):
        assert torch.equal(everyone[q], flat)          # every rank stepped with the same (decompressed) gradients
    torch.testing.assert_close(flat, ref_flat, rtol=0, atol=1e-4)
    assert (flat - start).abs().max() > 100 * 1e-4, "the weights barely moved: the comparison would be vacuous"
    if n > 1:   # the gradients did travel in float16: not the float32 result bit for bit
        assert not torch.equal(flat, ref_flat), "fp16 compression left the float32 gradients untouched"


def test_allgather_of_different_lengths():
    r = parallel.rank()
    got = parallel.allgather(torch.full((r + 1, 2), float(r)), name="ragged")
    want = torch.cat([torch.full((q + 1, 2), float(q)) for q in range(parallel.size())])
    assert torch.equal(got, want)
