"""Segmentation networks: paper parameter counts, hint taps, shapes, options, gradients, determinism."""

from __future__ import annotations

import json

import pytest
import torch

from cmedl.errors import ConfigError
from cmedl.nets import SEGMENTOR_NAMES, build_segmentor, count_parameters

# The CMEDL paper's sizes (1 input channel, 2 classes), see reference/method_notes.md sections 2, 3.4, 3.5.
PAPER_COUNTS = {"unet": 13_394_242, "densefcn": 1_374_194, "mrrn": 38_916_418}

# Small widths for fast tests.
SMALL = {
    "unet": {"base_channels": 4},
    "densefcn": {"growth_rate": 3, "stem_channels": 8, "layers_per_block": 2, "bottleneck_layers": 2},
    "mrrn": {"base_channels": 4},
}


def _hint_rule(name: str, net, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
    """Documented hint shapes relative to the input size."""
    c1, c2 = net.hint_channels
    if name == "mrrn":  # RU22 and RU33, both full resolution
        return [(batch, c1, height, width), (batch, c2, height, width)]
    # unet: up3 (1/2) and up4 (full); densefcn: the last two up dense blocks (1/2 and full)
    return [(batch, c1, height // 2, width // 2), (batch, c2, height, width)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_names():
    assert SEGMENTOR_NAMES == ("unet", "densefcn", "mrrn")


@pytest.mark.parametrize("name", SEGMENTOR_NAMES)
def test_paper_parameter_counts(name):
    net = build_segmentor(name, in_channels=1, num_classes=2)
    assert count_parameters(net) == PAPER_COUNTS[name]
    assert count_parameters(build_segmentor(name)) == PAPER_COUNTS[name]  # defaults are 1 in, 2 classes


def test_count_parameters_counts_trainable_only():
    net = build_segmentor("unet", base_channels=4)
    total = count_parameters(net)
    net.outc.weight.requires_grad_(False)
    assert count_parameters(net) == total - net.outc.weight.numel()


def test_unet_paper_hint_shapes_at_256():
    net = build_segmentor("unet").eval()
    assert net.hint_channels == (64, 64)
    with torch.no_grad():
        logits, hints = net(torch.randn(1, 1, 256, 256), return_hints=True)
    assert logits.shape == (1, 2, 256, 256)
    assert [tuple(h.shape) for h in hints] == [(1, 64, 128, 128), (1, 64, 256, 256)]


@pytest.mark.parametrize(
    ("name", "size", "expected_channels"),
    [("densefcn", (64, 96), (48, 192)), ("mrrn", (64, 48), (32, 32))],
)
def test_default_hint_shapes(name, size, expected_channels):
    net = build_segmentor(name).eval()
    assert net.hint_channels == expected_channels
    height, width = size
    with torch.no_grad():
        logits, hints = net(torch.randn(2, 1, height, width), return_hints=True)
    assert logits.shape == (2, 2, height, width)
    assert isinstance(hints, list) and len(hints) == 2
    assert [tuple(h.shape) for h in hints] == _hint_rule(name, net, 2, height, width)


@pytest.mark.parametrize("name", SEGMENTOR_NAMES)
@pytest.mark.parametrize(("in_channels", "num_classes"), [(1, 2), (3, 5), (2, 1)])
def test_logits_and_hint_shapes_small(name, in_channels, num_classes):
    net = build_segmentor(name, in_channels=in_channels, num_classes=num_classes, **SMALL[name]).eval()
    size = net.size_divisor * 2
    x = torch.randn(2, in_channels, size, size + net.size_divisor)
    with torch.no_grad():
        logits = net(x)
        logits2, hints = net(x, return_hints=True)
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (2, num_classes, size, size + net.size_divisor)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, logits2)
    assert [tuple(h.shape) for h in hints] == _hint_rule(name, net, 2, size, size + net.size_divisor)


@pytest.mark.parametrize("name", SEGMENTOR_NAMES)
def test_small_width_is_much_smaller(name):
    small = build_segmentor(name, **SMALL[name])
    assert count_parameters(small) < PAPER_COUNTS[name] / 50
    # a non-default width still follows the documented hint channel rule
    assert all(c > 0 for c in small.hint_channels)


@pytest.mark.parametrize("name", SEGMENTOR_NAMES)
def test_gradients_reach_every_parameter(name):
    net = build_segmentor(name, **SMALL[name]).train()
    size = net.size_divisor * 2
    logits, (h1, h2) = net(torch.randn(2, 1, size, size), return_hints=True)
    loss = sum((t * torch.randn_like(t)).mean() for t in (logits, h1, h2))
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("name", SEGMENTOR_NAMES)
def test_eval_mode_is_deterministic(name):
    net = build_segmentor(name, **SMALL[name])
    size = net.size_divisor * 2
    x = torch.randn(2, 1, size, size)
    net.train()
    net(x)  # move the BatchNorm running statistics away from their initial values
    net.eval()
    with torch.no_grad():
        a, hints_a = net(x, return_hints=True)
        b, hints_b = net(x, return_hints=True)
    assert torch.equal(a, b)
    assert all(torch.equal(u, v) for u, v in zip(hints_a, hints_b))


@pytest.mark.parametrize("name", SEGMENTOR_NAMES)
def test_config_round_trips_through_json(name):
    net = build_segmentor(name, in_channels=2, num_classes=3, **SMALL[name])
    config = json.loads(json.dumps(net.config))
    assert config["name"] == name
    rebuilt = build_segmentor(**config)
    assert rebuilt.config == net.config
    assert rebuilt.state_dict().keys() == net.state_dict().keys()
    assert count_parameters(rebuilt) == count_parameters(net)
    rebuilt.load_state_dict(net.state_dict())


def test_densefcn_dropout_option():
    assert build_segmentor("densefcn").config["dropout"] == 0.2
    net = build_segmentor("densefcn", dropout=0, **SMALL["densefcn"]).train()
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(net(x), net(x))  # no dropout: train-mode forwards agree too


def test_unknown_name_raises_config_error_naming_valid_names():
    with pytest.raises(ConfigError) as info:
        build_segmentor("vnet")
    for valid in SEGMENTOR_NAMES:
        assert valid in str(info.value)
    with pytest.raises(ConfigError):
        build_segmentor(None)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("unet", {"growth_rate": 12}),  # option of another network
        ("unet", {"base_channels": 0}),
        ("unet", {"base_channels": "64"}),
        ("unet", {"base_channels": 32.0}),
        ("unet", {"base_channels": True}),
        ("mrrn", {"base_channels": -1}),
        ("mrrn", {"dropout": 1.0}),
        ("densefcn", {"dropout": 1.5}),
        ("densefcn", {"dropout": "0.2"}),
        ("densefcn", {"growth_rate": 0}),
        ("densefcn", {"base_channels": 64}),
        ("densefcn", {"in_channels": 0}),
        ("mrrn", {"num_classes": 0}),
        ("mrrn", {"num_classes": 2.5}),
    ],
)
def test_bad_options_raise_config_error(name, options):
    with pytest.raises(ConfigError):
        build_segmentor(name, **options)


@pytest.mark.parametrize("name", SEGMENTOR_NAMES)
def test_bad_input_raises_value_error(name):
    net = build_segmentor(name, **SMALL[name]).eval()
    d = net.size_divisor
    with pytest.raises(ValueError, match=f"multiples of {d}"):
        net(torch.randn(1, 1, 2 * d + 8, 2 * d))
    with pytest.raises(ValueError, match="input channel"):
        net(torch.randn(1, 3, 2 * d, 2 * d))
    with pytest.raises(ValueError, match="B, C, H, W"):
        net(torch.randn(1, 2 * d, 2 * d))


@pytest.mark.parametrize("name", SEGMENTOR_NAMES)
def test_docstrings_state_the_contract(name):
    net = build_segmentor(name, **SMALL[name])
    doc = type(net).__doc__
    assert f"multiples of {net.size_divisor}" in doc
    assert "h1" in doc and "h2" in doc and "ValueError" in doc
