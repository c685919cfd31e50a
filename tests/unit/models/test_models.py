"""Models: exact parameter counts, shapes at odd sizes, gradients, determinism, fusion, summary CLI."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import json

import pytest
import torch
import torch.nn as nn

from hpc_dfs.config import ConfigError, load, to_dict
from hpc_dfs.config.model import ModelConfig
from hpc_dfs.models import (MODEL_NAMES, MODELS, SEGMENTATION_MODELS, ClinicalEncoder, ClinicalGRU, DFSFusion, DFSLoss,
                            RUSPNet, UNet, build_model, count_flops, count_parameters)

torch.set_num_threads(1)

TINY = dict(base_channels=4, depth=3, n_clinical=5)  # a few thousand parameters, milliseconds per forward
FUSIONS = ("film", "late", "image", "clinical")


def _inputs(name: str, b: int = 2, h: int = 37, w: int = 53, f: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if name == "clinical_gru":
        return (torch.randn(b, f, generator=g),)
    image = torch.randn(b, 1, h, w, generator=g)
    return (image, torch.randn(b, f, generator=g)) if name == "dfs_fusion" else (image,)


def _seg(out):
    return out["seg_logits"] if isinstance(out, dict) else out


# ----------------------------------------------------------------------------- parameter counts
def test_unet_counts_the_papers_31031745_parameters():
    with torch.device("meta"):  # no memory, no init time
        paper = UNet(in_channels=3, out_channels=1, base_channels=64, depth=4)
        one_channel = UNet(in_channels=1, out_channels=1)
    assert count_parameters(paper) == 31_031_745
    # One input channel: the first convolution loses 2 x 3 x 3 x 64 weights.
    assert count_parameters(one_channel) == 31_031_745 - 2 * 9 * 64 == 31_030_593
    assert sum(isinstance(m, nn.MaxPool2d) for m in paper.modules()) >= 1 and paper.depth == 4


@pytest.mark.parametrize("n_features", [1, 8, 24, 100])
def test_clinical_gru_has_3393_parameters_for_any_feature_count(n_features):
    model = ClinicalGRU(n_features)
    assert count_parameters(model) == 3_393
    assert model.gru.input_size == 1 and model.gru.hidden_size == 32
    x = torch.randn(4, n_features)
    logit = model(x)
    assert logit.shape == (4,)
    model.eval()
    assert torch.allclose(model.predict_proba(x), torch.sigmoid(model(x)))


def test_clinical_models_reject_wrong_feature_count():
    with pytest.raises(ValueError, match=r"\[B, 7\].*\(3, 5\)"):
        ClinicalGRU(7)(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\[B, 7\]"):
        ClinicalEncoder(7)(torch.randn(3, 5))


def test_count_flops_follows_two_times_multiply_adds():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv, (1, 3, 16, 16)) == 2 * 3 * 8 * 9 * 16 * 16
    gru = ClinicalGRU(10)
    # per step: 3 gates x (input 1 + hidden 32) x 32 multiply-adds; plus the 32 -> 1 output layer
    assert count_flops(gru, (1, 10)) == 10 * 2 * 3 * 32 * (1 + 32) + 2 * 32


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("size", [(37, 53), (64, 96), (5, 7)])
@pytest.mark.parametrize("name", ["unet", "rusp_net", "rusp_net_dw", "dfs_fusion"])
def test_output_shapes_at_odd_sizes(name, size):
    torch.manual_seed(0)
    model = build_model(name, n_classes=3, **TINY).eval()
    args = _inputs(name, b=2, h=size[0], w=size[1])
    with torch.no_grad():
        out = model(*args)
    assert _seg(out).shape == (2, 3, *size)
    if name == "dfs_fusion":
        assert out["risk_logit"].shape == (2,)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_dfs_fusion_modes_return_seg_and_risk(fusion):
    torch.manual_seed(0)
    model = DFSFusion(n_classes=4, fusion=fusion, norm="group", **TINY).eval()
    image, clinical = _inputs("dfs_fusion", h=33, w=20)
    out = model(image, None if fusion == "image" else clinical)
    assert set(out) == {"seg_logits", "risk_logit"}
    assert out["seg_logits"].shape == (2, 4, 33, 20) and out["risk_logit"].shape == (2,)


def test_fusion_that_uses_clinical_data_requires_it():
    model = DFSFusion(fusion="film", **TINY)
    with pytest.raises(ValueError, match="needs the clinical features"):
        model(torch.randn(1, 1, 16, 16), None)
    with pytest.raises(ValueError, match="n_clinical=0"):
        DFSFusion(fusion="late", n_clinical=0)


# ----------------------------------------------------------------------------- gradients and determinism
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name, n_classes=3, **TINY).train()
    out = model(*_inputs(name, b=3, h=24, w=19))
    if name == "clinical_gru":
        loss = out.square().mean()
    else:
        label = torch.randint(0, 3, (3, 24, 19), generator=torch.Generator().manual_seed(1))
        risk = torch.tensor([1.0, 0.0, -1.0]) if name == "dfs_fusion" else None
        loss, _ = DFSLoss(n_classes=3)(out, label, risk)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_gives_identical_model_and_output(name):
    outs = []
    for _ in range(2):
        torch.manual_seed(1234)
        model = build_model(name, **TINY).train()  # dropout active: the seed fixes it too
        torch.manual_seed(99)
        outs.append(_seg(model(*_inputs(name, h=20, w=28))))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(4321)
    other = build_model(name, **TINY)
    assert not all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values())
                   if a.is_floating_point() and a.numel() > 1)


# ----------------------------------------------------------------------------- fusion sensitivity
def _two_clinical_outputs(model, seed=0):
    image, c1 = _inputs("dfs_fusion", h=24, w=24, seed=seed)
    c2 = c1 + 2.0 * torch.randn_like(c1)
    model.eval()
    with torch.no_grad():
        return model(image, c1), model(image, c2)


def test_film_starts_as_identity_so_clinical_data_cannot_change_the_segmentation_yet():
    torch.manual_seed(0)
    film = DFSFusion(fusion="film", **TINY)
    a, b = _two_clinical_outputs(film)
    assert torch.equal(a["seg_logits"], b["seg_logits"])
    assert not torch.allclose(a["risk_logit"], b["risk_logit"])  # late fusion acts from the start
    # identical to the same RUSP-Net without conditioning
    with torch.no_grad():
        image, clinical = _inputs("dfs_fusion", h=24, w=24)
        plain = film.backbone(image)
        assert torch.allclose(plain, film(image, clinical)["seg_logits"])


def test_film_after_a_training_step_makes_segmentation_and_risk_depend_on_clinical_data():
    torch.manual_seed(0)
    model = DFSFusion(fusion="film", **TINY).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    image, clinical = _inputs("dfs_fusion", h=24, w=24, seed=3)
    label = (image[:, 0] > 0.5).long() + (image[:, 0] > 1.5).long()
    loss, _ = DFSLoss(n_classes=3, risk_weight=1.0)(model(image, clinical), label, torch.tensor([1.0, 0.0]))
    loss.backward()
    opt.step()
    a, b = _two_clinical_outputs(model)
    assert not torch.allclose(a["seg_logits"], b["seg_logits"])
    assert not torch.allclose(a["risk_logit"], b["risk_logit"])


def test_perturbed_film_weights_modulate_the_segmentation():
    torch.manual_seed(0)
    model = DFSFusion(fusion="film", **TINY)
    with torch.no_grad():
        for film in (model.film_bottleneck, model.film_decoder):
            film.linear.weight.normal_(0, 0.5)
    a, b = _two_clinical_outputs(model)
    assert (a["seg_logits"] - b["seg_logits"]).abs().max() > 1e-4


def test_image_only_fusion_ignores_clinical_data():
    torch.manual_seed(0)
    model = DFSFusion(fusion="image", **TINY)
    a, b = _two_clinical_outputs(model)
    assert torch.equal(a["seg_logits"], b["seg_logits"]) and torch.equal(a["risk_logit"], b["risk_logit"])
    image, _ = _inputs("dfs_fusion", h=24, w=24)
    with torch.no_grad():
        assert torch.equal(model(image, None)["risk_logit"], a["risk_logit"])
    assert model.clinical_encoder is None


@pytest.mark.parametrize("fusion", ["late", "clinical"])
def test_late_and_clinical_fusion_change_risk_but_not_segmentation(fusion):
    torch.manual_seed(0)
    a, b = _two_clinical_outputs(DFSFusion(fusion=fusion, **TINY))
    assert torch.equal(a["seg_logits"], b["seg_logits"])
    assert not torch.allclose(a["risk_logit"], b["risk_logit"])


# ----------------------------------------------------------------------------- options
def test_channels_last_and_bf16_autocast_match_the_default_layout():
    torch.manual_seed(0)
    ref = build_model("dfs_fusion", **TINY).eval()
    cl = build_model("dfs_fusion", channels_last=True, **TINY).eval()
    cl.load_state_dict(ref.state_dict())
    image, clinical = _inputs("dfs_fusion", h=30, w=26)
    with torch.no_grad():
        a, b = ref(image, clinical), cl(image, clinical)
        assert torch.allclose(a["seg_logits"], b["seg_logits"], atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c = ref(image, clinical)
    assert torch.isfinite(c["seg_logits"]).all()
    assert (c["seg_logits"].float() - a["seg_logits"]).abs().max() < 0.25  # bf16 has ~3 significant digits


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_norm_options(norm):
    net = RUSPNet(base_channels=4, depth=2, norm=norm)
    kinds = {type(m) for m in net.modules()}
    expected = {"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d, "group": nn.GroupNorm}.get(norm)
    if expected is None:
        assert not kinds & {nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm}
    else:
        assert expected in kinds
    assert net(torch.randn(2, 1, 12, 12)).shape == (2, 3, 12, 12)


def test_rusp_net_structure_has_residuals_spp_and_dilated_decoder():
    net = RUSPNet(base_channels=4, depth=3)
    spp_dilations = sorted({m.dilation[0] for m in net.spp.modules() if isinstance(m, nn.Conv2d)})
    assert spp_dilations == [1, 2, 3]
    last_decoder_dilations = {m.dilation[0] for m in net.decoders[-1].modules() if isinstance(m, nn.Conv2d)}
    assert last_decoder_dilations == {2}
    assert net.bottleneck_channels == 3 * (4 * 8 // 4)
    sep = RUSPNet(base_channels=4, depth=3, separable=True)
    assert any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in sep.modules())
    assert count_parameters(sep) < count_parameters(net)


def test_build_model_rejects_bad_names_and_contradictions():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")
    with pytest.raises(ValueError, match="separable=False contradicts"):
        build_model("rusp_net_dw", separable=False)
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        build_model("rusp_net", norm="layer")
    with pytest.raises(ValueError, match="unknown fusion 'early'"):
        build_model("dfs_fusion", fusion="early", n_clinical=3)


def test_model_config_fields_are_exactly_build_model_kwargs():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert fields == set(inspect.signature(build_model).parameters)
    cfg = load(ModelConfig, overrides=["name=dfs_fusion", "n_clinical=5", "base_channels=4", "depth=2",
                                      "fusion=late", "spp_dilations=[1,2]"])
    model = build_model(**to_dict(cfg))
    assert isinstance(model, DFSFusion) and model.fusion == "late"
    # defaults of both agree
    defaults = {k: v.default for k, v in inspect.signature(build_model).parameters.items()}
    for k, v in to_dict(ModelConfig()).items():
        assert list(defaults[k]) == v if isinstance(v, list) else defaults[k] == v, k
    with pytest.raises(ConfigError, match="contradicts"):
        load(ModelConfig, overrides=["name=rusp_net", "separable=true"])


# ----------------------------------------------------------------------------- summary CLI
def _unet_flops_by_hand(cin: int, size: int) -> int:
    """2 x multiply-adds of the padded U-Net (64 base, 4 poolings, 1 output) on a size x size slice."""
    ch = [64, 128, 256, 512, 1024]
    macs, c = 0, cin
    for i in range(5):  # encoder levels and the bottleneck: two 3x3 convs each
        pixels = (size // 2 ** i) ** 2
        macs += 9 * (c * ch[i] + ch[i] * ch[i]) * pixels
        c = ch[i]
    for i in reversed(range(4)):  # 2x2 stride-2 up-conv (in*out per output pixel), then two 3x3 convs
        pixels = (size // 2 ** i) ** 2
        macs += ch[i + 1] * ch[i] * pixels + 9 * (2 * ch[i] * ch[i] + ch[i] * ch[i]) * pixels
    macs += 64 * 1 * size * size  # 1x1 head
    return 2 * macs


def test_models_cli_json_meets_the_paper_counts_and_the_1_20_goal():
    from hpc_dfs.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["models", "--json"]) == 0
    summary = json.loads(buf.getvalue())
    assert set(MODEL_NAMES) <= set(summary) and "convention" in summary["_meta"]
    assert summary["unet"]["params"] == 31_031_745
    assert summary["clinical_gru"]["params"] == 3_393
    assert summary["rusp_net_dw"]["params"] * 20 <= summary["unet"]["params"]
    assert summary["rusp_net_dw"]["gflops"] * 20 <= summary["unet"]["gflops"]
    assert summary["unet"]["gflops"] == pytest.approx(_unet_flops_by_hand(3, 512) / 1e9, abs=1e-6)
    with contextlib.redirect_stdout(io.StringIO()) as table:
        assert main(["models", "--size", "64", "96"]) == 0
    assert "rusp_net_dw" in table.getvalue() and "64x96" in table.getvalue()


# ----------------------------------------------------------------------------- one list of names
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_model_declares_whether_it_takes_clinical_features(name):
    cls = MODELS[name]
    assert "takes_clinical" in vars(cls), f"{cls.__name__} does not declare takes_clinical"
    assert cls.takes_clinical is (name in ("clinical_gru", "dfs_fusion"))
    assert isinstance(build_model(name, **TINY), cls)
    if name != "clinical_gru":  # an image model takes clinical features exactly when forward has a clinical argument
        assert cls.takes_clinical == ("clinical" in inspect.signature(cls.forward).parameters)


def test_model_names_come_from_the_one_registry():
    assert SEGMENTATION_MODELS == ("unet", "rusp_net", "rusp_net_dw", "dfs_fusion")
    with pytest.raises(ConfigError, match="model.name must be one of unet, rusp_net, rusp_net_dw, clinical_gru, "
                                          "dfs_fusion, got 'resnet'"):
        load(ModelConfig, overrides=["name=resnet"])
