"""CMEDLSegment's helpers that need no scene: requirement checks and the model card text."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmedl.catalogue import ModelEntry, list_models
from cmedl.filebase import peek_model_card


def test_requirements_file_is_read_and_checked_against_installed_versions(tmp_path: Path) -> None:
    # The installer moved to CMEDLCommon (both modules use it); its requirement checks are still these.
    from CMEDLCommon.dependencies import missing_requirements, read_requirements

    wanted = ["numpy>=1.0", "numpy>=999.0", "no-such-package-cmedl", "scipy"]
    assert missing_requirements(wanted) == ["numpy>=999.0", "no-such-package-cmedl"]
    bad = tmp_path / "requirements.txt"
    bad.write_text("torch==2.0  # exact pin\n", encoding="utf-8")
    with pytest.raises(ValueError, match="only 'name' or 'name>=version'"):
        read_requirements(bad)


def test_the_model_card_text_shows_intended_use_license_and_training(monkeypatch, tmp_path: Path) -> None:
    from CMEDLSegmentLib.model_cards import model_card_text

    monkeypatch.setenv("CMEDL_HOME", str(tmp_path))
    demo = next(entry for entry in list_models() if entry.name == "demo")
    card = peek_model_card(demo.path)
    text = model_card_text(demo)
    assert card["intended_use"] in text and f"License: {card['license']}" in text
    assert "Lung tumour" in text and str(demo.path) in text
    pending = ModelEntry(
        name="site-model", source="download", path=None, title="Site model", license="CC-BY-NC-4.0",
        url="https://models.example.org/site.safetensors", sha256="0" * 64,
    )  # fmt: skip
    text = model_card_text(pending)
    assert "CC-BY-NC-4.0" in text and "https://models.example.org/site.safetensors" in text
    assert "once the file is downloaded" in text
