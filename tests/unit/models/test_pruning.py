"""Pruning: achieved sparsity of each method and scope, permanence, and the report."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hpc_dfs.models import RUSPNet, build_model, make_permanent, prune_model, sparsity_report
from hpc_dfs.models.pruning import prunable_layers

torch.set_num_threads(1)


def _net(separable=False):
    torch.manual_seed(0)
    return RUSPNet(base_channels=4, depth=2, separable=separable, norm="batch").eval()


def _zero_channels(m: nn.Module) -> int:
    d = 1 if isinstance(m, nn.ConvTranspose2d) else 0
    w = m.weight.detach().transpose(0, d).reshape(m.weight.shape[d], -1)
    return int((w.abs().sum(1) == 0).sum())


@pytest.mark.parametrize("amount", [0.3, 0.8])
def test_global_l1_unstructured_reaches_the_amount(amount):
    net = _net()
    report = prune_model(net, amount, method="l1_unstructured", scope="global")
    total = report["total"]["params"]
    assert report["total"]["zeros"] == round(amount * total)
    assert report["total"]["sparsity"] == pytest.approx(amount, abs=1 / total)
    assert report["pruned"] and len(report["layers"]) == len(prunable_layers(net))
    # global: layers end up with different sparsities
    assert len({round(v["sparsity"], 3) for v in report["layers"].values()}) > 1


def test_layer_l1_unstructured_prunes_each_layer_by_the_amount():
    net = _net()
    report = prune_model(net, 0.4, method="l1_unstructured", scope="layer")
    for name, layer in report["layers"].items():
        assert layer["zeros"] == round(0.4 * layer["params"]), name


@pytest.mark.parametrize("n", [1, 2])
def test_layer_ln_structured_zeroes_whole_output_channels(n):
    net = _net(separable=True)
    prune_model(net, 0.5, method="ln_structured", scope="layer", n=n)
    layers = prunable_layers(net)
    for name, m in layers[:-1]:
        channels = m.weight.shape[1 if isinstance(m, nn.ConvTranspose2d) else 0]
        assert _zero_channels(m) == round(0.5 * channels), name
    assert _zero_channels(layers[-1][1]) == 0  # the class outputs are never pruned


def test_global_structured_prunes_the_amount_of_all_channels():
    net = _net()
    prune_model(net, 0.3, method="ln_structured", scope="global", n=2)
    layers = prunable_layers(net)[:-1]
    n_channels = sum(m.weight.shape[1 if isinstance(m, nn.ConvTranspose2d) else 0] for _, m in layers)
    zeroed = sum(_zero_channels(m) for _, m in layers)
    assert zeroed == round(0.3 * n_channels)
    assert all(_zero_channels(m) < m.weight.shape[1 if isinstance(m, nn.ConvTranspose2d) else 0] for _, m in layers)


def test_make_permanent_keeps_the_zeros_and_the_outputs():
    net = _net()
    x = torch.randn(2, 1, 20, 20)
    prune_model(net, 0.6, method="l1_unstructured", scope="global")
    before_report, before_out = sparsity_report(net), net(x)
    assert make_permanent(net) == len(prunable_layers(net))
    after = sparsity_report(net)
    assert not after["pruned"] and after["total"] == before_report["total"]
    assert not any(k.endswith("_orig") or k.endswith("_mask") for k in net.state_dict())
    fresh = _net()
    fresh.load_state_dict(net.state_dict())  # loads into an unpruned model
    assert torch.allclose(fresh(x), before_out, atol=1e-6)
    assert make_permanent(net) == 0


def test_pruned_fusion_model_still_trains():
    torch.manual_seed(0)
    model = build_model("dfs_fusion", base_channels=4, depth=2, n_clinical=3)
    prune_model(model, 0.5, method="l1_unstructured", scope="layer", exclude=["backbone.head"])
    assert sparsity_report(model)["layers"]["backbone.head.2"]["zeros"] == 0
    out = model(torch.randn(2, 1, 16, 16), torch.randn(2, 3))
    out["seg_logits"].mean().backward()
    pruned_conv = model.backbone.encoders[0][0][0][1]  # pointwise conv of the first separable conv
    assert torch.equal(pruned_conv.weight_orig.grad * (1 - pruned_conv.weight_mask),
                       torch.zeros_like(pruned_conv.weight_orig))  # masked weights get no gradient


def test_sparsity_report_of_an_unpruned_model():
    report = sparsity_report(_net())
    assert report["total"]["zeros"] == 0 and report["total"]["sparsity"] == 0.0 and not report["pruned"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(amount=1.0), "fraction in"),
    (dict(amount=0.5, method="random"), "unknown pruning method"),
    (dict(amount=0.5, scope="model"), "unknown pruning scope"),
])
def test_bad_pruning_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune_model(_net(), **kwargs)
