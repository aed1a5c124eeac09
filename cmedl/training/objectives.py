"""Training methods, each as one optimisation step over its networks.

An objective owns its networks and optimizers and knows how to take one step on a batch. The trainer
(:mod:`cmedl.training.trainer`) owns everything else (data, validation, checkpoints, early stopping), so a
new method is a new objective, not a new loop. Every objective exposes the network that is exported and
validated as ``student``.
"""

from __future__ import annotations

from typing import Any

import torch

from cmedl.devices import autocast_context
from cmedl.losses import soft_dice_loss
from cmedl.nets import build_segmentor
from cmedl.training.config import TrainConfig

Batch = dict[str, tuple[torch.Tensor, torch.Tensor]]


class Objective:
    """Base class. Subclasses set ``domains`` (which datasets a batch needs) and implement :meth:`step`."""

    name = ""
    domains: tuple[str, ...] = ("ct",)

    def __init__(self, config: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None) -> None:
        self.config = config
        self.device = device
        self.amp_dtype = amp_dtype
        self.networks: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        # fp16 needs loss scaling to keep small gradients from underflowing; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    @property
    def student(self) -> torch.nn.Module:
        return self.networks["student"]

    def autocast(self):
        return autocast_context(self.device, self.amp_dtype)

    def train(self) -> None:
        for network in self.networks.values():
            network.train()

    def step(self, batch: Batch) -> dict[str, float]:
        """One optimisation step; returns every loss term as a float."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {
            "networks": {name: net.state_dict() for name, net in self.networks.items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, net in self.networks.items():
            net.load_state_dict(state["networks"][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def build_network(config: TrainConfig) -> torch.nn.Module:
    return build_segmentor(config.segmentor, in_channels=1, num_classes=2, **config.segmentor_options)


class CTOnlyObjective(Objective):
    """The paper's "CT only" baseline: one segmentor trained with the Dice loss on labelled CT patches."""

    name = "ct_only"
    domains = ("ct",)

    def __init__(self, config: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None) -> None:
        super().__init__(config, device, amp_dtype)
        self.networks["student"] = build_network(config).to(device)
        self.optimizers["student"] = torch.optim.Adam(
            self.student.parameters(), lr=config.lr_segmentor, betas=config.betas, weight_decay=config.weight_decay
        )

    def step(self, batch: Batch) -> dict[str, float]:
        images, labels = (tensor.to(self.device, non_blocking=True) for tensor in batch["ct"])
        optimizer = self.optimizers["student"]
        optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.student(images)
        loss = soft_dice_loss(logits.float(), labels)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        return {"seg_ct": float(loss.detach())}


OBJECTIVES: dict[str, type[Objective]] = {"ct_only": CTOnlyObjective}


def build_objective(config: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None) -> Objective:
    from cmedl.errors import ConfigError

    if config.method not in OBJECTIVES:
        raise ConfigError(f"method {config.method!r} is not available in this engine; choose {', '.join(OBJECTIVES)}")
    return OBJECTIVES[config.method](config, device, amp_dtype)
