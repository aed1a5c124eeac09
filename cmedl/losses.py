"""Training losses.

The segmentation loss is the soft Dice loss the paper uses for every segmentor (eq. 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, per_sample: bool = False
) -> torch.Tensor:
    """Soft Dice loss over the foreground classes.

    Args:
        logits: ``(B, C, H, W)`` raw network outputs.
        target: ``(B, H, W)`` integer class indices in ``[0, C)`` (or ``(B, 1, H, W)``).
        smooth: added to numerator and denominator so an empty class in an empty prediction costs nothing
            and the gradient stays finite.
        per_sample: compute one Dice per sample and average them. The default pools the whole batch into one
            Dice per class: a patch without tumour then still penalises its false positives through the shared
            denominator, whereas alone its loss ``1 - smooth / (sum p + smooth)`` saturates and its gradient
            vanishes once the false positives are many.

    Returns:
        A scalar ``1 - mean Dice`` over the foreground classes (1..C-1) (and samples when ``per_sample``).
    """
    if target.dim() == logits.dim():
        target = target[:, 0]
    num_classes = logits.shape[1]
    probabilities = torch.softmax(logits.float(), dim=1)[:, 1:]
    one_hot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2)[:, 1:].float()
    dims = (2, 3) if per_sample else (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    denominator = probabilities.sum(dims) + one_hot.sum(dims)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return 1.0 - dice.mean()
