"""The built-in demonstration model shipped in Resources/Models."""

from __future__ import annotations

import torch

from cmedl.catalogue import builtin_model_path, resolve_model
from cmedl.modelfile import load_model


def test_the_demo_model_loads_and_says_what_it_is_for() -> None:
    path = resolve_model(None)
    assert path == builtin_model_path()
    model = load_model(path)
    card = model.card
    assert card.intended_use.startswith("research use only")
    assert "not for clinical use" in card.description and "phantoms" in card.description
    assert card.training_data["real_patients"] == 0
    with torch.no_grad():
        logits = model.network(torch.zeros(1, 1, card.patch_size, card.patch_size))
    assert logits.shape == (1, card.num_classes, card.patch_size, card.patch_size)
