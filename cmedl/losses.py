"""Training losses.

The segmentation loss is the soft Dice loss the paper uses for every segmentor (eq. 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss over the foreground classes, averaged over the batch.

    Args:
        logits: ``(B, C, H, W)`` raw network outputs.
        target: ``(B, H, W)`` integer class indices in ``[0, C)`` (or ``(B, 1, H, W)``).
        smooth: added to numerator and denominator so an empty class in an empty prediction costs nothing
            and the gradient stays finite.

    Returns:
        A scalar ``1 - mean Dice``; the mean runs over samples and foreground classes (1..C-1).
    """
    if target.dim() == logits.dim():
        target = target[:, 0]
    num_classes = logits.shape[1]
    probabilities = torch.softmax(logits.float(), dim=1)[:, 1:]
    one_hot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2)[:, 1:].float()
    dims = (2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    denominator = probabilities.sum(dims) + one_hot.sum(dims)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    return 1.0 - dice.mean()
