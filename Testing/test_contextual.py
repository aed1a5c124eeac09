"""Contextual loss (Mechrez et al.) and the frozen VGG16 feature extractor with its weight loaders."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from cmedl.contextual import DEFAULT_MAX_POSITIONS, ContextualLoss, contextual_loss, cycle_loss
from cmedl.errors import ConfigError
from cmedl.nets.vgg import VGG16_FILE_NAME, VGG16Features, load_vgg16_features, vgg16_cache_dir

EPS = 1e-5
PERFECT = -math.log(1 + EPS)  # the loss of a perfect match


@pytest.fixture()
def features():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=generator)
    y = torch.randn(2, 16, 8, 8, generator=generator)
    return x, y


# ---------------------------------------------------------------------------------------------- the formula


def test_identical_features_give_zero(features):
    x, _ = features
    loss = contextual_loss(x, x)
    assert loss.item() == pytest.approx(PERFECT, abs=1e-6)
    assert abs(loss.item()) < 1e-4


def test_spatial_permutation_is_still_a_perfect_match(features):
    x, _ = features
    order = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    permuted = x.flatten(2)[:, :, order].reshape(x.shape)
    assert not torch.equal(permuted, x)
    assert contextual_loss(x, permuted).item() == pytest.approx(PERFECT, abs=1e-6)


def test_random_features_are_far_apart_and_asymmetric(features):
    x, y = features
    forward, backward = contextual_loss(x, y).item(), contextual_loss(y, x).item()
    assert forward > 0.5 and backward > 0.5
    assert abs(forward - backward) > 1e-3
    # the values the reference formula gives for these seeded features
    assert forward == pytest.approx(1.9973, abs=2e-4)
    assert backward == pytest.approx(1.9746, abs=2e-4)


def test_smaller_band_width_gives_smaller_loss(features):
    x, y = features
    sharp = contextual_loss(x, y, band_width=0.1).item()
    default = contextual_loss(x, y, band_width=0.5).item()
    smooth = contextual_loss(x, y, band_width=1.0).item()
    assert sharp < default < smooth


def test_closer_features_give_smaller_loss(features):
    x, y = features
    assert contextual_loss(x + 0.3 * y, x).item() < contextual_loss(y, x).item()


def test_gradient_reaches_x_only(features):
    x, y = features
    x = x.clone().requires_grad_(True)
    y = y.clone().requires_grad_(True)
    contextual_loss(x, y.detach()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert y.grad is None


def test_different_spatial_sizes_are_accepted():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 8, 6, 6, generator=generator)
    # every target position has its exact match among the generated ones
    assert contextual_loss(x, x[:, :, :3, :]).item() == pytest.approx(PERFECT, abs=1e-6)
    # every target vector twice: a generated vector splits its weight between two equal matches, CX = 1/2
    tiled = x.repeat(1, 1, 2, 1)
    assert contextual_loss(x, tiled).item() == pytest.approx(math.log(2), abs=1e-4)


def test_invalid_arguments(features):
    x, y = features
    with pytest.raises(ValueError, match="equal B and C"):
        contextual_loss(x, y[:, :8])
    with pytest.raises(ConfigError, match="band_width"):
        contextual_loss(x, y, band_width=0)
    with pytest.raises(ConfigError, match="max_positions"):
        contextual_loss(x, y, max_positions=0)


def test_sampling_bounds_a_large_map():
    # 128x128 positions: unsampled, one distance matrix alone would take 1 GiB per sample
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 8, 128, 128, generator=generator, requires_grad=True)
    y = torch.randn(1, 8, 128, 128, generator=generator)
    same = contextual_loss(x, x.detach(), max_positions=512, generator=torch.Generator().manual_seed(0))
    assert same.item() == pytest.approx(PERFECT, abs=1e-6)  # the same positions are drawn on both sides
    first = contextual_loss(x, y, max_positions=512, generator=torch.Generator().manual_seed(0))
    again = contextual_loss(x, y, max_positions=512, generator=torch.Generator().manual_seed(0))
    other = contextual_loss(x, y, max_positions=512, generator=torch.Generator().manual_seed(1))
    assert first.item() == again.item() != other.item()
    first.backward()
    assert int((x.grad.flatten(2).abs().sum(dim=1) > 0).sum()) <= 512  # only sampled positions get gradient


def test_64x64_map_with_default_bound_is_exact():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 64, 64, generator=generator)
    y = torch.randn(1, 16, 64, 64, generator=generator)
    assert 64 * 64 <= DEFAULT_MAX_POSITIONS  # the paper's Conv7 map is used whole
    bounded = contextual_loss(x, y, max_positions=DEFAULT_MAX_POSITIONS)
    assert bounded.item() == contextual_loss(x, y).item()
    assert contextual_loss(x, x, max_positions=DEFAULT_MAX_POSITIONS).item() == pytest.approx(PERFECT, abs=1e-6)


def test_cycle_loss_is_mean_absolute_error():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.full((2, 1, 4, 4), 0.5)
    b[0, 0, 0, 0] = 1.5
    assert cycle_loss(a, b).item() == pytest.approx((0.5 * 31 + 1.5) / 32)
    with pytest.raises(ValueError, match="equal shapes"):
        cycle_loss(a, b[:1])


# ---------------------------------------------------------------------------------------------- VGG16


@pytest.fixture(scope="module")
def random_vgg() -> VGG16Features:
    torch.manual_seed(0)
    return load_vgg16_features("random")


def test_vgg_layout_and_key_names(random_vgg):
    keys = list(random_vgg.state_dict())
    conv_indices = (0, 2, 5, 7, 10, 12, 14, 17, 19)
    assert keys == [f"features.{i}.{kind}" for i in conv_indices for kind in ("weight", "bias")]
    assert random_vgg.features[14].out_channels == 256 and random_vgg.features[17].out_channels == 512
    assert isinstance(random_vgg.features[16], torch.nn.MaxPool2d)
    assert random_vgg.weights_source == "random"


def test_vgg_frozen_and_eval(random_vgg):
    random_vgg.train()
    assert not random_vgg.training and not any(m.training for m in random_vgg.modules())
    assert not any(p.requires_grad for p in random_vgg.parameters())


def test_vgg_feature_shapes_at_256(random_vgg):
    with torch.no_grad():
        f14, f17, f19 = random_vgg(torch.rand(2, 1, 256, 256) * 2 - 1, layers=(14, 17, 19))
    assert f14.shape == (2, 256, 64, 64)
    assert f17.shape == (2, 512, 32, 32)
    assert f19.shape == (2, 512, 32, 32)
    assert (f14 < 0).any()  # convolution outputs, taken before the ReLU


def test_vgg_conv_output_survives_the_following_relu(random_vgg):
    with torch.no_grad():
        conv, relu = random_vgg(torch.rand(1, 1, 32, 32) * 2 - 1, layers=(14, 15))
    assert torch.equal(relu, torch.relu(conv))
    assert (conv < 0).any()


def test_vgg_input_normalisation(random_vgg):
    x = torch.tensor([-1.0, 1.0]).view(1, 1, 1, 2)
    rgb = random_vgg.normalise(x)
    assert rgb.shape == (1, 3, 1, 2)
    mean = torch.tensor([0.485, 0.456, 0.406])
    std = torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(rgb[0, :, 0, 0], (0 - mean) / std)
    assert torch.allclose(rgb[0, :, 0, 1], (1 - mean) / std)
    with pytest.raises(ValueError, match="images"):
        random_vgg.normalise(torch.zeros(1, 2, 4, 4))


def test_vgg_layer_checks(random_vgg):
    with pytest.raises(ConfigError, match="0..19"):
        random_vgg(torch.zeros(1, 1, 16, 16), layers=(20,))
    with pytest.raises(ConfigError, match="last_index"):
        VGG16Features(last_index=31)


def _torchvision_style_state(vgg: VGG16Features) -> dict[str, torch.Tensor]:
    state = {key: value.clone() for key, value in vgg.state_dict().items()}  # "features.N.weight"
    state["classifier.0.weight"] = torch.zeros(4, 8)
    return state


def test_load_torchvision_named_state_dict_reproduces_activations(tmp_path, random_vgg):
    path = tmp_path / "vgg16.pth"
    torch.save(_torchvision_style_state(random_vgg), path)
    torch.manual_seed(123)  # a different random start, so only the file can make the outputs equal
    loaded = load_vgg16_features(str(path))
    assert loaded.weights_source == str(path)
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = random_vgg(x)
        got = loaded(x)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_load_safetensors_state_dict(tmp_path, random_vgg):
    path = tmp_path / "vgg16.safetensors"
    save_file(_torchvision_style_state(random_vgg), str(path))
    loaded = load_vgg16_features(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), random_vgg.parameters()))


def test_missing_feature_keys_are_named(tmp_path, random_vgg):
    state = _torchvision_style_state(random_vgg)
    del state["features.19.weight"], state["features.17.bias"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match="features.17.bias") as info:
        load_vgg16_features(str(path))
    assert "features.19.weight" in str(info.value)


def test_wrong_shapes_and_unreadable_files(tmp_path, random_vgg):
    state = _torchvision_style_state(random_vgg)
    state["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    torch.save(state, tmp_path / "gray.pth")
    with pytest.raises(ConfigError, match="features.0.weight has shape"):
        load_vgg16_features(str(tmp_path / "gray.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        load_vgg16_features(str(tmp_path / "junk.pth"))
    with pytest.raises(ConfigError, match="not found"):
        load_vgg16_features(str(tmp_path / "absent.pth"))


def test_no_weights_offline_names_both_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("CMEDL_OFFLINE", "1")
    cache = vgg16_cache_dir()
    assert cache == tmp_path / "hub" / "checkpoints"
    with pytest.raises(ConfigError) as info:
        load_vgg16_features(None)
    message = str(info.value)
    assert "\n" not in message
    assert "--vgg-weights PATH" in message and "--vgg-weights random" in message
    assert VGG16_FILE_NAME in message and str(cache) in message
    assert "CMEDL_OFFLINE" in message
    assert not cache.exists() or not any(cache.iterdir())  # nothing was downloaded

    monkeypatch.delenv("CMEDL_OFFLINE")
    with pytest.raises(ConfigError, match="switched off"):
        load_vgg16_features(None, download=False)


def test_no_weights_uses_torch_hub_cache(tmp_path, monkeypatch, random_vgg):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("CMEDL_OFFLINE", "1")
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(_torchvision_style_state(random_vgg), cache / VGG16_FILE_NAME)
    loaded = load_vgg16_features(None)
    assert loaded.weights_source == "torch-hub"
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), random_vgg.parameters()))


# ---------------------------------------------------------------------------------------------- the module


def test_contextual_loss_module(random_vgg):
    loss_fn = ContextualLoss(random_vgg)
    generator = torch.Generator().manual_seed(5)
    target = torch.rand(1, 1, 32, 32, generator=generator) * 2 - 1
    generated = (torch.rand(1, 1, 32, 32, generator=generator) * 2 - 1).requires_grad_(True)

    same = loss_fn(target.clone(), target)
    assert same.ndim == 0 and same.item() == pytest.approx(3 * PERFECT, abs=1e-5)

    loss = loss_fn(generated, target)
    assert loss.item() > 0.5
    loss.backward()
    assert generated.grad is not None and generated.grad.abs().sum() > 0
    assert all(p.grad is None for p in random_vgg.parameters())

    single = ContextualLoss(random_vgg, layers=(19,), weights=(2.0,))
    with torch.no_grad():
        expected = 2 * contextual_loss(random_vgg(generated, (19,))[0], random_vgg(target, (19,))[0])
        assert single(generated, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_contextual_loss_module_checks(random_vgg):
    with pytest.raises(ConfigError, match="weight"):
        ContextualLoss(random_vgg, layers=(14, 17), weights=(1.0,))
    with pytest.raises(ConfigError, match="0..19"):
        ContextualLoss(random_vgg, layers=(25,))
    with pytest.raises(ConfigError, match="VGG16Features"):
        ContextualLoss(torch.nn.Identity())


def test_float32_under_autocast(features):
    x, y = (t.bfloat16() for t in features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = contextual_loss(x, y)
    assert mixed.dtype == torch.float32
    assert mixed.item() == contextual_loss(x.float(), y.float()).item()


def test_gradient_matches_finite_differences():
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: contextual_loss(t, y, band_width=0.5), (x,))
