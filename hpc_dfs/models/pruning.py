"""Magnitude pruning of convolution layers with :mod:`torch.nn.utils.prune`, a sparsity report, and
a way to make the pruning permanent.

Two methods, each with a per-layer or global amount:

- ``"l1_unstructured"``: zero the individual weights of smallest ``|w|``
  (``prune.l1_unstructured`` per layer, ``prune.global_unstructured`` over all layers);
- ``"ln_structured"``: zero whole *output channels* of smallest L``n`` norm (``n=1`` for L1,
  ``n=2`` for L2). Per layer this is ``prune.ln_structured``. ``prune`` has no global structured
  method, so the global form is written here: channel norms are made comparable across layers by
  dividing by ``numel_per_channel ** (1/n)`` (the root-mean-``n``-th-power of the channel), the
  ``amount`` weakest channels of all layers are chosen, and each layer gets its mask through
  ``prune.custom_from_mask``. In both scopes every layer keeps at least one channel.

Structured pruning never removes output channels of the model's last convolution (its outputs are
the classes). Pruning masks weights only: the zeroed channels are not physically removed, so the
report is about sparsity, not speed.

Example::

    prune_model(net, amount=0.5, method="l1_unstructured", scope="global")
    print(sparsity_report(net)["total"]["sparsity"])   # 0.5
    make_permanent(net)                                  # plain weights again, zeros kept
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.nn.utils import prune

__all__ = ["prunable_layers", "prune_model", "sparsity_report", "make_permanent", "PRUNE_METHODS"]

PRUNE_METHODS = ("l1_unstructured", "ln_structured")
_LAYERS = (nn.Conv2d, nn.ConvTranspose2d)


def prunable_layers(model: nn.Module, exclude: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """Convolution and transposed-convolution layers of ``model`` in registration order.

    Args:
        exclude: module-name prefixes to leave out (e.g. ``["backbone.head"]``).
    """
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _LAYERS) and not any(name.startswith(e) for e in exclude if e)]


def _channel_dim(module: nn.Module) -> int:
    # Conv2d weight is [out, in/groups, kh, kw]; ConvTranspose2d weight is [in, out/groups, kh, kw].
    return 1 if isinstance(module, nn.ConvTranspose2d) else 0


def _check_amount(amount: float) -> None:
    if not 0.0 <= float(amount) < 1.0:
        raise ValueError(f"pruning amount must be a fraction in [0, 1), got {amount}")


def prune_model(model: nn.Module, amount: float, method: str = "l1_unstructured", scope: str = "global",
                n: int | float = 1, exclude: Sequence[str] = ()) -> dict:
    """Prune the convolution weights of ``model`` in place and return :func:`sparsity_report`.

    Args:
        model: any model; its ``Conv2d``/``ConvTranspose2d`` weights are pruned.
        amount: fraction of weights (unstructured) or output channels (structured) to prune.
        method: ``"l1_unstructured"`` or ``"ln_structured"``.
        scope: ``"global"`` (one threshold over all layers) or ``"layer"`` (``amount`` in each layer).
        n: norm order for ``ln_structured`` (1 = L1, 2 = L2, ...).
        exclude: module-name prefixes not to prune.
    """
    _check_amount(amount)
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method '{method}' (choose one of {', '.join(PRUNE_METHODS)})")
    if scope not in ("global", "layer"):
        raise ValueError(f"unknown pruning scope '{scope}' (choose 'global' or 'layer')")
    layers = prunable_layers(model, exclude)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no convolution layers to prune")

    if method == "l1_unstructured":
        if scope == "global":
            prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured,
                                      amount=float(amount))
        else:
            for _, m in layers:
                prune.l1_unstructured(m, "weight", amount=float(amount))
        return sparsity_report(model)

    layers = layers[:-1]  # never prune the output channels (classes) of the last convolution
    if scope == "layer":
        for _, m in layers:
            d = _channel_dim(m)
            n_prune = min(int(round(float(amount) * m.weight.shape[d])), m.weight.shape[d] - 1)  # keep >= 1
            prune.ln_structured(m, "weight", amount=n_prune, n=n, dim=d)
    else:
        _global_structured(layers, float(amount), n)
    return sparsity_report(model)


def _global_structured(layers: list[tuple[str, nn.Module]], amount: float, n: int | float) -> None:
    norms = []
    for _, m in layers:
        w = m.weight.detach().float()
        d = _channel_dim(m)
        flat = w.transpose(0, d).reshape(w.shape[d], -1)
        norms.append(torch.linalg.vector_norm(flat, ord=n, dim=1) / flat.shape[1] ** (1.0 / n))
    # Each layer's strongest channel is never a candidate, so every layer keeps at least one channel.
    candidates = []
    for norm in norms:
        norm = norm.clone()
        norm[norm.argmax()] = float("inf")
        candidates.append(norm)
    all_norms = torch.cat(candidates)
    k = min(int(round(amount * all_norms.numel())), all_norms.numel() - len(norms))
    if k <= 0:
        return
    pruned = torch.zeros(all_norms.numel(), dtype=torch.bool, device=all_norms.device)
    pruned[torch.topk(all_norms, k, largest=False).indices] = True
    start = 0
    for _, m in layers:
        d = _channel_dim(m)
        keep = ~pruned[start:start + m.weight.shape[d]]
        start += m.weight.shape[d]
        shape = [1] * m.weight.dim()
        shape[d] = -1
        mask = keep.view(shape).expand_as(m.weight).to(m.weight)
        prune.custom_from_mask(m, "weight", mask)


def sparsity_report(model: nn.Module) -> dict:
    """Fraction of zero weights per convolution layer and in total.

    Returns:
        ``{"layers": {name: {"params", "zeros", "sparsity"}}, "total": {"params", "zeros", "sparsity"},
        "pruned": bool}`` where ``pruned`` says whether pruning masks are still attached.
    """
    layers = {}
    total = zeros = 0
    for name, m in prunable_layers(model):
        w = m.weight.detach()
        z = int((w == 0).sum())
        layers[name] = {"params": w.numel(), "zeros": z, "sparsity": z / max(w.numel(), 1)}
        total += w.numel()
        zeros += z
    return {"layers": layers, "total": {"params": total, "zeros": zeros, "sparsity": zeros / max(total, 1)},
            "pruned": prune.is_pruned(model)}


def make_permanent(model: nn.Module) -> int:
    """Fold pruning masks into the weights (``prune.remove``); returns how many were folded.

    Afterwards the model has plain ``weight`` parameters again (with the zeros), so its
    ``state_dict`` loads into an unpruned model of the same architecture.
    """
    count = 0
    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(m, hook._tensor_name)
                count += 1
    return count
