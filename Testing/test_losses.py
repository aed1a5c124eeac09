"""The soft Dice loss."""

from __future__ import annotations

import pytest
import torch

from cmedl.losses import soft_dice_loss


def logits_for(mask: torch.Tensor, confidence: float = 20.0) -> torch.Tensor:
    """Logits that say 'tumour' exactly on ``mask`` (B, H, W)."""
    signed = mask.float() * 2 - 1
    return torch.stack([-signed, signed], dim=1) * confidence


def test_perfect_and_opposite_predictions() -> None:
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:10, 4:10] = 1
    assert float(soft_dice_loss(logits_for(target), target)) == pytest.approx(0.0, abs=1e-4)
    assert float(soft_dice_loss(logits_for(1 - target), target)) > 0.95
    assert float(soft_dice_loss(logits_for(target), target[:, None])) == pytest.approx(0.0, abs=1e-4)


def test_false_positives_in_a_tumour_free_patch_keep_a_gradient_in_batch_mode() -> None:
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[0, 4:10, 4:10] = 1  # sample 1 has no tumour
    predicted = target.clone()
    predicted[1] = 1  # and the network calls all of it tumour
    gradients = {}
    for per_sample in (True, False):
        logits = logits_for(predicted, confidence=2.0).requires_grad_(True)
        soft_dice_loss(logits, target, per_sample=per_sample).backward()
        gradients[per_sample] = logits.grad[1].abs().sum().item()
    # alone, the empty patch's loss has saturated; pooled with the batch it still pushes the false positives down
    assert gradients[False] > 20 * gradients[True]
