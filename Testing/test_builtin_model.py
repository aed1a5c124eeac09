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


def test_the_demo_says_which_method_trained_its_model(tmp_path) -> None:
    from cmedl.catalogue import builtin_model_path
    from cmedl.demo import demo_report, run_demo
    from cmedl.filebase import peek_model_card

    summary = run_demo(tmp_path, seed=2026, device="cpu", size=128)
    card = peek_model_card(builtin_model_path())
    assert summary["model"] == card["name"] and summary["model_method"] == card["method"]
    assert 0.0 <= summary["dice"] <= 1.0 and (tmp_path / "overlay.png").is_file()
    report = demo_report(summary)
    assert f"model {card['name']}, trained by " in report
    assert ("CT only" if card["method"] == "ct_only" else "CMEDL") in report
