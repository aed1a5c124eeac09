"""CycleGAN translator: sizes, shapes, receptive field, image pool, adversarial losses, builder errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmedl.errors import ConfigError
from cmedl.nets.cyclegan import (
    ImagePool,
    PatchDiscriminator,
    ResnetGenerator,
    Translator,
    build_translator,
    gan_loss,
    init_weights,
    lsgan_loss,
    set_requires_grad,
    vanilla_gan_loss,
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------- networks


def test_paper_parameter_counts():
    assert n_params(ResnetGenerator()) == 11_365_633
    assert n_params(PatchDiscriminator()) == 2_762_689


@pytest.mark.parametrize("size", [(32, 32), (48, 64), (36, 20)])
def test_generator_keeps_size_and_range(size):
    torch.manual_seed(0)
    generator = init_weights(ResnetGenerator(base_channels=8, n_blocks=2), gain=0.5)  # large gain: saturate tanh
    x = torch.randn(2, 1, *size) * 3
    with torch.no_grad():
        y = generator(x)
    assert y.shape == (2, 1, *size)
    assert y.min() >= -1.0 and y.max() <= 1.0
    assert y.abs().max() > 0.9  # the tanh really bounds a large response


def test_default_generator_shape():
    with torch.no_grad():
        y = ResnetGenerator()(torch.rand(1, 1, 64, 64) * 2 - 1)
    assert y.shape == (1, 1, 64, 64)


@pytest.mark.parametrize("size", [(30, 32), (32, 34), (4, 4)])
def test_generator_rejects_sizes_not_multiple_of_4(size):
    with pytest.raises(ValueError, match="multiples of 4"):
        ResnetGenerator(base_channels=4, n_blocks=1)(torch.zeros(1, 1, *size))


def test_generator_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        ResnetGenerator(base_channels=4, n_blocks=1)(torch.zeros(1, 3, 32, 32))


def test_discriminator_256_gives_30x30():
    with torch.no_grad():
        out = PatchDiscriminator()(torch.rand(2, 1, 256, 256) * 2 - 1)
    assert out.shape == (2, 1, 30, 30)


@pytest.mark.parametrize("n_layers,expected", [(3, 70), (2, 34)])
def test_discriminator_receptive_field_by_gradient(n_layers, expected):
    # instance norm couples every position through the per-image statistics, so the geometric receptive
    # field is measured on the same layer stack without it
    torch.manual_seed(1)
    net = PatchDiscriminator(base_channels=4, n_layers=n_layers, norm="none").double()
    init_weights(net, gain=0.5)
    assert net.receptive_field == expected
    x = torch.randn(1, 1, 128, 128, dtype=torch.float64, requires_grad=True)
    out = net(x)
    row, col = out.shape[2] // 2, out.shape[3] // 2
    out[0, 0, row, col].backward()
    support = x.grad[0, 0] != 0
    rows = torch.nonzero(support.any(dim=1)).flatten()
    cols = torch.nonzero(support.any(dim=0)).flatten()
    assert int(rows.max() - rows.min() + 1) == expected
    assert int(cols.max() - cols.min() + 1) == expected
    assert int(support.sum()) == expected * expected  # the patch is fully covered, nothing outside it
    assert rows.min() > 0 and rows.max() < 127  # interior pixel: the patch is not clipped by the border


def test_instance_norm_has_no_parameters_and_norm_option_checked():
    net = PatchDiscriminator(base_channels=4, norm="instance")
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert len(norms) == 3 and all(not m.affine and not m.track_running_stats for m in norms)
    with pytest.raises(ConfigError, match="normalisation"):
        PatchDiscriminator(norm="batch")


def test_init_weights_normal_002_zero_bias():
    torch.manual_seed(0)
    net = init_weights(ResnetGenerator(base_channels=16, n_blocks=1))
    conv = net.model[1]
    assert abs(conv.weight.std().item() - 0.02) < 0.004
    assert abs(conv.weight.mean().item()) < 0.004
    for module in net.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            assert torch.count_nonzero(module.bias) == 0


# ---------------------------------------------------------------------------------------------- losses


def test_lsgan_loss_values():
    ones = torch.ones(2, 1, 30, 30)
    assert lsgan_loss(ones, True).item() == 0.0
    assert lsgan_loss(ones, False).item() == pytest.approx(1.0)
    assert lsgan_loss(torch.full((1, 1, 4, 4), 0.5), True).item() == pytest.approx(0.25)
    assert gan_loss("lsgan") is lsgan_loss


def test_vanilla_gan_loss_values():
    zeros = torch.zeros(1, 1, 5, 5)
    assert vanilla_gan_loss(zeros, True).item() == pytest.approx(math.log(2))
    assert vanilla_gan_loss(zeros, False).item() == pytest.approx(math.log(2))
    assert vanilla_gan_loss(torch.full((1, 1, 2, 2), 20.0), True).item() < 1e-6
    assert vanilla_gan_loss(torch.full((1, 1, 2, 2), 20.0), False).item() == pytest.approx(20.0, abs=1e-5)
    assert gan_loss("vanilla") is vanilla_gan_loss


def test_gan_loss_unknown_mode():
    with pytest.raises(ConfigError, match="wgan"):
        gan_loss("wgan")


def test_gan_loss_gradient_pushes_fake_scores_up_for_generator():
    prediction = torch.zeros(1, 1, 3, 3, requires_grad=True)
    lsgan_loss(prediction, True).backward()
    assert (prediction.grad < 0).all()  # gradient descent raises the scores towards "real"


# ---------------------------------------------------------------------------------------------- image pool


def _batches(count: int, start: int = 0) -> list[torch.Tensor]:
    # each image is constant with a distinct value, so the returned values tell which image came back
    return [
        torch.full((2, 1, 4, 4), float(start + 2 * k)).add(torch.tensor([0.0, 1.0]).view(2, 1, 1, 1))
        for k in range(count)
    ]


def _values(batch: torch.Tensor) -> list[float]:
    return [float(image[0, 0, 0]) for image in batch]


def test_image_pool_returns_new_images_until_full_then_mixes():
    pool = ImagePool(size=6, rng=torch.Generator().manual_seed(0))
    seen: list[float] = []
    for batch in _batches(3):  # 6 images fill the pool exactly
        out = pool.query(batch)
        assert torch.equal(out, batch)
        seen += _values(batch)
    assert len(pool) == 6
    old = new = 0
    for batch in _batches(50, start=100):
        out = pool.query(batch)
        assert out.shape == batch.shape
        for value, fresh in zip(_values(out), _values(batch)):
            if value == fresh:
                new += 1
            else:
                assert value in seen  # a stored image (maybe one stored earlier in this batch), never invented
                old += 1
            seen.append(fresh)
    assert len(pool) == 6
    assert 25 <= old <= 75 and 25 <= new <= 75  # about half of 100 each


def test_image_pool_deterministic_with_seeded_generators():
    def run(rng):
        pool = ImagePool(size=4, rng=rng)
        return [_values(pool.query(b)) for b in _batches(30)]

    assert run(torch.Generator().manual_seed(7)) == run(torch.Generator().manual_seed(7))
    assert run(np.random.default_rng(7)) == run(np.random.default_rng(7))
    assert run(torch.Generator().manual_seed(7)) != run(torch.Generator().manual_seed(8))
    assert run(3) == run(3)


def test_image_pool_detaches_and_size_zero_passes_through():
    fake = torch.randn(2, 1, 8, 8, requires_grad=True)
    out = ImagePool(size=0).query(fake)
    assert torch.equal(out, fake) and not out.requires_grad
    assert not ImagePool(size=2).query(fake * 2).requires_grad


@pytest.mark.parametrize("make_rng", [lambda: torch.Generator().manual_seed(5), lambda: np.random.default_rng(5)])
def test_image_pool_state_round_trip_weights_only(tmp_path, make_rng):
    pool = ImagePool(size=5, rng=make_rng())
    for batch in _batches(6):
        pool.query(batch)
    path = tmp_path / "pool.pt"
    torch.save({"pool": pool.state_dict()}, path)
    state = torch.load(path, weights_only=True)["pool"]

    restored = ImagePool(size=5, rng=make_rng())
    restored.query(torch.full((1, 1, 4, 4), -5.0))  # diverge first, so the load must really overwrite
    restored.load_state_dict(state)
    assert len(restored) == len(pool) == 5
    assert all(torch.equal(a, b) for a, b in zip(restored.images, pool.images))
    later = _batches(10, start=500)
    assert [_values(pool.query(b)) for b in later] == [_values(restored.query(b)) for b in later]


def test_image_pool_rejects_bad_state_and_rng():
    pool = ImagePool(size=2)
    with pytest.raises(ConfigError, match="more than the pool size"):
        pool.load_state_dict({"size": 3, "images": [torch.zeros(1, 4, 4)] * 3})
    with pytest.raises(ConfigError, match="malformed"):
        pool.load_state_dict({"size": 2})
    with pytest.raises(ConfigError, match="rng"):
        ImagePool(size=2, rng="seed")
    with pytest.raises(ConfigError, match="pool size"):
        ImagePool(size=-1)


# ---------------------------------------------------------------------------------------------- builder


def test_build_small_translator():
    torch.manual_seed(0)
    translator = build_translator("cyclegan", base_channels=8, n_blocks=2, n_layers_d=2)
    assert isinstance(translator, Translator)
    ct = torch.rand(2, 1, 32, 32) * 2 - 1
    pseudo_mri = translator.g_ct_to_mr(ct)
    cycled = translator.g_mr_to_ct(pseudo_mri)
    assert pseudo_mri.shape == cycled.shape == ct.shape
    assert translator.d_mr(pseudo_mri).shape == translator.d_ct(cycled).shape == (2, 1, 6, 6)

    g_params = list(translator.generators())
    d_params = list(translator.discriminators())
    assert sum(p.numel() for p in g_params) == n_params(translator.g_ct_to_mr) * 2
    assert sum(p.numel() for p in d_params) == n_params(translator.d_ct) * 2
    assert not {id(p) for p in g_params} & {id(p) for p in d_params}
    assert len(g_params) + len(d_params) == len(list(translator.parameters()))
    # weights drawn from N(0, 0.02)
    first = translator.g_ct_to_mr.model[1].weight
    assert first.abs().max() < 0.2 and first.std() > 0.01

    rebuilt = build_translator(**translator.config)
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in translator.parameters()]


def test_default_translator_counts():
    translator = build_translator()
    assert sum(p.numel() for p in translator.generators()) == 2 * 11_365_633
    assert sum(p.numel() for p in translator.discriminators()) == 2 * 2_762_689


def test_set_requires_grad_freezes_discriminators():
    translator = build_translator(base_channels=4, n_blocks=1)
    set_requires_grad([translator.d_mr, translator.d_ct], False)
    assert not any(p.requires_grad for p in translator.discriminators())
    assert all(p.requires_grad for p in translator.generators())
    set_requires_grad(translator.d_mr, True)
    assert all(p.requires_grad for p in translator.d_mr.parameters())


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("drit", {}, "not available"),
        ("unit", {}, "unknown translator 'unit'"),
        ("cyclegan", {"ngf": 32}, "unknown option"),
        ("cyclegan", {"n_blocks": -1}, "n_blocks"),
        ("cyclegan", {"base_channels": "64"}, "base_channels"),
        ("cyclegan", {"init_gain": 0}, "init_gain"),
    ],
)
def test_build_translator_errors(name, options, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_translator(name, **options)
    assert "\n" not in str(info.value)
