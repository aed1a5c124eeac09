"""The text a user reads about a model before using it: intended use, training data, license, labels."""

from __future__ import annotations

from cmedl.catalogue import ModelEntry, card_summary
from cmedl.training.finetune import fine_tuned_on_line, parent_line

#: digits of a parent model's sha256 shown in the box (enough to tell models apart; `cmedl info` shows all)
PARENT_SHA256_CHARS = 12


def model_card_text(entry: ModelEntry) -> str:
    """A plain-text model card for a catalogue entry (a download entry not yet fetched shows its catalogue data)."""
    lines = [f"Model: {entry.title or entry.name} ({entry.source})"]
    if entry.card is None:
        lines += [
            f"Description: {entry.description or '-'}",
            f"License: {entry.license or '-'}",
            f"Download: {entry.url or '-'}",
            f"sha256: {entry.sha256 or '-'}",
            "The full model card is shown once the file is downloaded.",
        ]
        return "\n".join(lines)
    summary = card_summary(entry.card)
    labels = ", ".join(label["name"] for label in summary["labels"]) or "-"
    lines += [
        f"Intended use: {summary['intended_use'] or '-'}",
        f"License: {summary['license'] or '-'}",
        f"Trained by: {summary['method'] or '-'} ({summary['architecture']})",
        f"Training data: {summary['training_data'] or '-'}",
        f"Metrics: {summary['metrics'] or '-'}",
        f"Segments: {labels}",
        f"Description: {summary['description'] or '-'}",
        f"Engine version: {summary['engine_version'] or '-'}, created {summary['created'] or '-'}",
    ]
    # A fine-tuned model names the model it started from and the data it was adapted to.
    parent = parent_line(entry.card, sha256_chars=PARENT_SHA256_CHARS)
    if parent:
        lines.append(f"Fine-tuned from: {parent}")
        lines.append(f"Fine-tuned on: {fine_tuned_on_line(entry.card) or '-'}")
    if entry.path is not None:
        lines.append(f"File: {entry.path}")
    return "\n".join(lines)
