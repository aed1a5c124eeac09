"""Training methods, each as one optimisation step over its networks.

An objective owns its networks and optimizers and knows how to take one step on a batch. The trainer
(:mod:`cmedl.training.trainer`) owns everything else (data, validation, checkpoints, early stopping), so a
new method is a new objective, not a new loop. Every objective exposes the network that is exported and
validated as ``student``.

Data-parallel training (``torchrun``) wraps each trained network on its own (:meth:`Objective.distribute`);
:meth:`Objective.step` calls a network through :meth:`Objective.replica` where that network is being trained,
so the wrapper averages its gradients, and calls it directly where it is frozen. ``networks`` always holds
the plain modules: checkpoints and model files look the same whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from cmedl.devices import autocast_context
from cmedl.losses import soft_dice_loss
from cmedl.modelfile import ModelCard, save_cyclegan, save_translator
from cmedl.nets import build_segmentor
from cmedl.training.config import TrainConfig, paper_deviations
from cmedl.training.runfolder import CYCLEGAN_FILE, TRANSLATOR_FILE

Batch = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # images, labels, labelled


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
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        # fp16 needs loss scaling to keep small gradients from underflowing; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        # Data-parallel wrappers of the trained modules, by the names of trained_modules(); empty in one process.
        self.replicas: dict[str, torch.nn.Module] = {}

    @property
    def student(self) -> torch.nn.Module:
        return self.networks["student"]

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """The modules whose parameters an optimizer steps, each one called as a whole inside :meth:`step`."""
        return {"student": self.student}

    def distribute(self, wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Wrap every trained module (for example in DistributedDataParallel) for :meth:`step` to call."""
        self.replicas = {name: wrap(module) for name, module in self.trained_modules().items()}

    def replica(self, name: str) -> torch.nn.Module:
        """What :meth:`step` calls to train the module ``name``: its wrapper, or the module in one process."""
        return self.replicas[name] if name in self.replicas else self.trained_modules()[name]

    def autocast(self):
        return autocast_context(self.device, self.amp_dtype)

    def adam(self, parameters: Any, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
        """Adam with the run's betas. On a CPU its fused implementation: one kernel over all parameters instead of
        a few small operations per tensor, 4-8 times faster per step (``benchmarks/adam_step_time.py``) for the
        same update rule; elsewhere torch's default."""
        parameters = list(parameters)  # tensors or parameter groups; a generator would not survive a second try
        settings = {"lr": lr, "betas": self.config.betas, "weight_decay": weight_decay}
        if self.device.type == "cpu":
            try:
                return torch.optim.Adam(parameters, fused=True, **settings)
            except (RuntimeError, ValueError):  # torch before 2.4 fuses Adam on GPUs only
                pass
        return torch.optim.Adam(parameters, **settings)

    def train(self) -> None:
        for network in self.networks.values():
            network.train()

    def step(self, batch: Batch) -> dict[str, float]:
        """One optimisation step; returns every loss term as a float."""
        raise NotImplementedError

    def end_epoch(self) -> None:
        """Advance the learning-rate schedules by one epoch."""
        with warnings.catch_warnings():
            # A run resumed after its last step (stopped while validating) ends the epoch without a step of its
            # own; torch then warns about an order that is right here.
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
            for scheduler in self.schedulers.values():
                scheduler.step()

    def apply_schedules(self) -> None:
        """Set every optimiser's learning rates from this run's schedules at the current epoch count.

        A checkpoint carries the rates of the epoch count it was written with: at the end of a finished run
        that is 0, the end of the linear decay. Resumed with more epochs, the schedule (built from the new
        count) gives other rates, which the optimiser would only take at the next epoch's scheduler step;
        this sets them now, so the first resumed epoch does not train at the old rate.
        """
        for name, scheduler in self.schedulers.items():
            lambdas = getattr(scheduler, "lr_lambdas", None)
            if lambdas is None:
                continue
            rates = [base * schedule(scheduler.last_epoch) for base, schedule in zip(scheduler.base_lrs, lambdas)]
            for group, rate in zip(self.optimizers[name].param_groups, rates):
                group["lr"] = rate
            scheduler._last_lr = rates  # what get_last_lr() reports; torch keeps it in this attribute

    def add_linear_decay(self, name: str) -> None:
        """Constant learning rate, then linear decay to zero over the last ``lr_decay_fraction`` of the epochs.

        With ``warmup_epochs`` W > 0 the rate first rises linearly: epoch k (from 0) of the first W runs at
        (k + 1) / (W + 1) of it. A parameter group with ``frozen_epochs`` N (the student's encoder, see
        :meth:`segmentor_parameters`) runs at a rate of 0 for the first N epochs, then follows the schedule.
        """
        epochs = self.config.epochs
        decay_epochs = round(epochs * self.config.lr_decay_fraction)
        constant_epochs = epochs - decay_epochs
        warmup_epochs = self.config.warmup_epochs

        def factor(epoch: int) -> float:
            decay = 1.0 - max(0, epoch + 1 - constant_epochs) / (decay_epochs + 1)
            # min(1, ...) is 1 from the first epoch on without warm-up: the schedule is then exactly as before.
            return decay * min(1.0, (epoch + 1) / (warmup_epochs + 1))

        def frozen_for(frozen_epochs: int) -> Callable[[int], float]:
            return lambda epoch: 0.0 if epoch < frozen_epochs else factor(epoch)

        optimizer = self.optimizers[name]
        frozen = [group.get("frozen_epochs", 0) for group in optimizer.param_groups]
        schedule = [frozen_for(n) if n else factor for n in frozen] if any(frozen) else factor
        self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def segmentor_parameters(self, network: torch.nn.Module) -> Any:
        """What the optimiser of the exported segmentor steps: its parameters, or, with ``freeze_encoder_epochs``
        N > 0, two parameter groups, the encoder's marked ``frozen_epochs`` N (see :meth:`add_linear_decay`).

        A learning rate of 0 freezes the encoder rather than ``requires_grad``, which the CMEDL steps switch on
        and off for their own reasons; and Adam leaves a parameter exactly as it is when its rate is 0.
        """
        frozen_epochs = self.config.freeze_encoder_epochs
        if frozen_epochs <= 0:
            return network.parameters()
        encoder = {id(parameter) for parameter in network.encoder_parameters()}
        return [
            {"params": [p for p in network.parameters() if id(p) in encoder], "frozen_epochs": frozen_epochs},
            {"params": [p for p in network.parameters() if id(p) not in encoder]},
        ]

    @torch.no_grad()
    def previews(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named ``(B, H, W)`` pictures of what the networks make of CT patches ``(B, 1, H, W)``."""
        self.student.eval()
        with self.autocast():
            probabilities = torch.softmax(self.student(images.to(self.device)).float(), dim=1)[:, 1]
        self.student.train()
        return {"CT": images[:, 0], "student": probabilities.cpu()}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {
            "networks": {name: net.state_dict() for name, net in self.networks.items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
            "scaler": self.scaler.state_dict(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, net in self.networks.items():
            net.load_state_dict(state["networks"][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, scheduler in self.schedulers.items():
            if name in state.get("schedulers", {}):
                scheduler.load_state_dict(state["schedulers"][name])
        self.apply_schedules()
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.load_extra_state(state.get("extra", {}))

    def card_details(self) -> dict[str, Any]:
        """What the exported student's model card says about how this method trained it."""
        return {}

    def export_extras(self, folder: Path, student_card: ModelCard) -> None:
        """Write model files besides the student's (called whenever the student is exported)."""


@contextlib.contextmanager
def batchnorm_statistics_kept(*modules: torch.nn.Module) -> Iterator[None]:
    """Run forward passes in training mode without changing any BatchNorm running statistics.

    The generator update calls the segmentors only to pass gradients back to the pseudo-MRI: those passes use
    the batch's statistics, as a training pass does, but must not count as extra updates of the running mean
    and variance (which would otherwise see every CT and pseudo-MRI batch twice or three times per step, and
    shift the statistics inference uses toward the generator's current output).
    """
    layers = [
        layer
        for module in modules
        for layer in module.modules()
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
    ]
    # The passes update scratch copies; the originals are put back untouched afterwards. (Copying the old values
    # back in place instead would bump the version of tensors autograd saved, and break the backward pass.)
    saved = [(layer.running_mean, layer.running_var, layer.num_batches_tracked) for layer in layers]
    for layer in layers:
        layer.running_mean = layer.running_mean.clone()
        layer.running_var = layer.running_var.clone()
        layer.num_batches_tracked = layer.num_batches_tracked.clone()
    try:
        yield
    finally:
        for layer, (mean, var, count) in zip(layers, saved):
            layer.running_mean, layer.running_var, layer.num_batches_tracked = mean, var, count


def build_network(config: TrainConfig) -> torch.nn.Module:
    return build_segmentor(config.segmentor, in_channels=1, num_classes=2, **config.segmentor_options)


class CTOnlyObjective(Objective):
    """The paper's "CT only" baseline: one segmentor trained with the Dice loss on labelled CT patches."""

    name = "ct_only"
    domains = ("ct",)

    def __init__(self, config: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None) -> None:
        super().__init__(config, device, amp_dtype)
        self.networks["student"] = build_network(config).to(device)
        self.optimizers["student"] = self.adam(
            self.segmentor_parameters(self.student), lr=config.lr_segmentor, weight_decay=config.weight_decay
        )
        # The same schedule as every CMEDL optimiser, so the two methods differ only in their losses.
        self.add_linear_decay("student")

    def step(self, batch: Batch) -> dict[str, float]:
        images, labels = (tensor.to(self.device, non_blocking=True) for tensor in batch["ct"][:2])
        optimizer = self.optimizers["student"]
        optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.replica("student")(images)
        loss = soft_dice_loss(logits.float(), labels)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        return {"seg_ct": float(loss.detach())}


def hint_loss(student_hints: list[torch.Tensor], teacher_hints: list[torch.Tensor], reduction: str) -> torch.Tensor:
    """Eq. 2: squared differences between the student's and the teacher's last-two-layer features.

    ``sum`` is the literal squared Frobenius norm per sample (averaged over the batch); ``mean`` divides each
    layer's norm by its number of elements (the mean squared difference).
    """
    total = student_hints[0].new_zeros(())
    for student, teacher in zip(student_hints, teacher_hints):
        squared = (student.float() - teacher.float()).pow(2)
        total = total + (squared.mean() if reduction == "mean" else squared.sum() / squared.shape[0])
    return total


def masked_dice(logits: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor | None:
    """Dice loss over the labelled samples only; None when no sample of the batch is labelled."""
    if not bool(labelled.any()):
        return None
    return soft_dice_loss(logits[labelled].float(), labels[labelled])


class CMEDLObjective(Objective):
    """Cross-modality educed distillation (paper section III, eqs. 1-7).

    Networks: the CycleGAN translator (generators CT->MR and MR->CT, discriminators for MR and CT), the MRI
    teacher and the CT student (same architecture). Each step alternates three updates:

    1. generators: lambda_adv*L_adv + lambda_cyc*L_cyc + lambda_cx*L_cx + lambda_hint*L_hint + lambda_seg*L_seg^pM
       (the hint and pMRI segmentation terms reach the generator through the pseudo-MRI unless switched off);
    2. discriminators: L_adv on real images against a pool of past fakes;
    3. segmentors: L_hint + L_seg^CT + L_seg^pM + L_seg^rM (L_seg^rM only for labelled MRI samples), on the
       pseudo-MRI of step 1, detached.

    Batches hold one CT patch and one MRI patch per sample, drawn independently (unpaired).
    """

    name = "cmedl"
    domains = ("ct", "mr")

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        vgg: torch.nn.Module | None = None,
    ) -> None:
        """``vgg``: the contextual loss's VGG16 as :func:`load_contextual_vgg` loaded it (the trainer does so before
        reading the data, so that missing weights fail at once); None loads it here."""
        from cmedl.contextual import ContextualLoss
        from cmedl.nets.cyclegan import ImagePool, build_translator, gan_loss
        from cmedl.nets.vgg import load_vgg16_features

        super().__init__(config, device, amp_dtype)
        # The oracle teacher sees the real MRI of each CT's own anatomy (phantom experiments only): no translator.
        self.oracle = config.teacher_input == "paired_mr"
        if self.oracle:
            self.domains = ("ct", "mr", "paired_mr")
        self.translator = None
        if not self.oracle:
            self.translator = build_translator(config.translator, **config.translator_options).to(device)
            self.networks["translator"] = self.translator
        self.networks["teacher"] = build_network(config).to(device)
        self.networks["student"] = build_network(config).to(device)
        if self.translator is not None:
            self.optimizers["generators"] = self.adam(self.translator.generators(), lr=config.lr_translator)
            self.optimizers["discriminators"] = self.adam(self.translator.discriminators(), lr=config.lr_translator)
        self.optimizers["teacher"] = self.adam(
            self.networks["teacher"].parameters(), lr=config.lr_segmentor, weight_decay=config.weight_decay
        )
        self.optimizers["student"] = self.adam(
            self.segmentor_parameters(self.student), lr=config.lr_segmentor, weight_decay=config.weight_decay
        )
        for name in self.optimizers:
            self.add_linear_decay(name)
        self.gan_loss = gan_loss(config.gan_mode)
        self.pool_mr = ImagePool(config.pool_size, rng=config.seed)
        self.pool_ct = ImagePool(config.pool_size, rng=config.seed + 1)
        self.contextual = None
        if self.translator is not None and config.use_cx and config.lambda_cx > 0:
            vgg = (vgg if vgg is not None else load_vgg16_features(config.vgg_weights or None)).to(device)
            self.contextual = ContextualLoss(
                vgg,
                band_width=config.cx_band_width,
                max_positions=config.cx_max_positions,
                generator=torch.Generator(device=device).manual_seed(config.seed),
            )

    @property
    def teacher(self) -> torch.nn.Module:
        return self.networks["teacher"]

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        # The translator as such is never called: each of its four networks is, in its own update.
        translator = self.translator
        if translator is None:
            return {"teacher": self.teacher, "student": self.student}
        return {
            "g_ct_to_mr": translator.g_ct_to_mr,
            "g_mr_to_ct": translator.g_mr_to_ct,
            "d_mr": translator.d_mr,
            "d_ct": translator.d_ct,
            "teacher": self.teacher,
            "student": self.student,
        }

    def hint_weight(self) -> float:
        """lambda_hint, or 0 while fewer than ``hint_start_epoch`` epochs have finished.

        The count of finished epochs is the learning-rate schedule's, which checkpoints carry, so a resumed run
        switches the hint on at the same epoch.
        """
        finished_epochs = self.schedulers["student"].last_epoch
        return self.config.lambda_hint if finished_epochs >= self.config.hint_start_epoch else 0.0

    def _set_requires_grad(self, modules, flag: bool) -> None:
        for module in modules:
            for parameter in module.parameters():
                parameter.requires_grad_(flag)

    def step(self, batch: Batch) -> dict[str, float]:
        ct, ct_labels, _ = (tensor.to(self.device, non_blocking=True) for tensor in batch["ct"])
        mr, mr_labels, mr_labelled = (tensor.to(self.device, non_blocking=True) for tensor in batch["mr"])
        losses: dict[str, float] = {}
        if self.oracle:
            teacher_input = batch["paired_mr"][0].to(self.device, non_blocking=True)
        else:
            teacher_input = self._translator_step(ct, ct_labels, mr, losses)
        self._segmentor_step(ct, ct_labels, mr, mr_labels, mr_labelled, teacher_input, losses)
        return losses

    def _translator_step(
        self, ct: torch.Tensor, ct_labels: torch.Tensor, mr: torch.Tensor, losses: dict[str, float]
    ) -> torch.Tensor:
        """Updates 1 (generators) and 2 (discriminators); returns the pseudo-MRI ``(B, 1, P, P)``, detached."""
        config = self.config
        translator, teacher, student = self.translator, self.teacher, self.student

        # 1. generators; the discriminators and segmentors only pass gradients through. Frozen networks are called
        # directly, not through their data-parallel wrappers: a wrapper whose forward ran expects gradients for
        # its parameters in the next backward pass.
        g_ct_to_mr, g_mr_to_ct = self.replica("g_ct_to_mr"), self.replica("g_mr_to_ct")
        discriminators = [translator.d_mr, translator.d_ct]
        self._set_requires_grad(discriminators + [teacher, student], False)
        generators = self.optimizers["generators"]
        generators.zero_grad(set_to_none=True)
        with self.autocast():
            pseudo_mr = g_ct_to_mr(ct)
            pseudo_ct = g_mr_to_ct(mr)
            adversarial = self.gan_loss(translator.d_mr(pseudo_mr), True) + self.gan_loss(
                translator.d_ct(pseudo_ct), True
            )
            loss_g = config.lambda_adv * adversarial
            losses["adv_g"] = float(adversarial.detach())
            if config.use_cycle and config.lambda_cyc > 0:
                cycle = (g_mr_to_ct(pseudo_mr) - ct).abs().mean() + (g_ct_to_mr(pseudo_ct) - mr).abs().mean()
                loss_g = loss_g + config.lambda_cyc * cycle
                losses["cyc"] = float(cycle.detach())
            if config.lambda_identity > 0:
                identity = (g_ct_to_mr(mr) - mr).abs().mean() + (g_mr_to_ct(ct) - ct).abs().mean()
                loss_g = loss_g + config.lambda_identity * identity
                losses["identity"] = float(identity.detach())
        if self.contextual is not None:
            contextual = self.contextual(pseudo_mr.float(), mr.float())
            loss_g = loss_g + config.lambda_cx * contextual
            losses["cx"] = float(contextual.detach())
        lambda_hint = self.hint_weight()
        reach_hint = config.hint_to_generator and lambda_hint > 0
        reach_seg = config.seg_pm_to_generator and config.use_seg_pm
        if reach_hint or reach_seg:
            with self.autocast(), batchnorm_statistics_kept(teacher, student):
                teacher_logits, teacher_hints = teacher(pseudo_mr, return_hints=True)
                if reach_hint:
                    with torch.no_grad():
                        _, student_hints = student(ct, return_hints=True)
            if reach_hint:
                loss_g = loss_g + lambda_hint * hint_loss(student_hints, teacher_hints, config.hint_reduction)
            if reach_seg:
                loss_g = loss_g + config.lambda_seg * soft_dice_loss(teacher_logits.float(), ct_labels)
        self.scaler.scale(loss_g).backward()
        self.scaler.step(generators)

        # 2. discriminators, on real images against pooled past fakes
        d_mr, d_ct = self.replica("d_mr"), self.replica("d_ct")
        self._set_requires_grad(discriminators, True)
        discriminator_optimizer = self.optimizers["discriminators"]
        discriminator_optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            fake_mr = self.pool_mr.query(pseudo_mr.detach())
            fake_ct = self.pool_ct.query(pseudo_ct.detach())
            loss_d_mr = 0.5 * (self.gan_loss(d_mr(mr), True) + self.gan_loss(d_mr(fake_mr), False))
            loss_d_ct = 0.5 * (self.gan_loss(d_ct(ct), True) + self.gan_loss(d_ct(fake_ct), False))
            loss_d = loss_d_mr + loss_d_ct
        self.scaler.scale(loss_d).backward()
        self.scaler.step(discriminator_optimizer)
        losses["adv_d"] = float(loss_d.detach())
        return pseudo_mr.detach()

    def _segmentor_step(
        self,
        ct: torch.Tensor,
        ct_labels: torch.Tensor,
        mr: torch.Tensor,
        mr_labels: torch.Tensor,
        mr_labelled: torch.Tensor,
        teacher_input: torch.Tensor,
        losses: dict[str, float],
    ) -> None:
        """Update 3: teacher and student on the CT, the teacher's view of it (pseudo-MRI, or the paired MRI
        of the oracle) and the unpaired real MRI."""
        config = self.config
        lambda_hint = self.hint_weight()
        seg_weight = config.segmentor_seg_weight
        teacher, student = self.replica("teacher"), self.replica("student")
        self._set_requires_grad([teacher, student], True)
        for name in ("teacher", "student"):
            self.optimizers[name].zero_grad(set_to_none=True)
        with self.autocast():
            student_logits, student_hints = student(ct, return_hints=True)
            teacher_logits, teacher_hints = teacher(teacher_input, return_hints=True)
        seg_ct = soft_dice_loss(student_logits.float(), ct_labels)
        loss_s = seg_weight * seg_ct
        losses["seg_ct"] = float(seg_ct.detach())
        if config.use_seg_pm:
            seg_pm = soft_dice_loss(teacher_logits.float(), ct_labels)
            loss_s = loss_s + seg_weight * seg_pm
            losses["seg_pm"] = float(seg_pm.detach())
        if config.use_seg_rm:
            with self.autocast():
                real_logits = teacher(mr)
            seg_rm = masked_dice(real_logits, mr_labels, mr_labelled)
            if seg_rm is not None:
                loss_s = loss_s + seg_weight * seg_rm
                losses["seg_rm"] = float(seg_rm.detach())
        if config.lambda_hint > 0:
            if not config.hint_to_teacher:
                teacher_hints = [hint.detach() for hint in teacher_hints]
            hint = hint_loss(student_hints, teacher_hints, config.hint_reduction)
            loss_s = loss_s + lambda_hint * hint
            losses["hint"] = float(hint.detach())
        if self.replicas:
            # Every process must produce a gradient for every teacher parameter in every step, or the gradient
            # all-reduce waits for one that never comes: a zero-weighted term keeps the teacher in the graph
            # when its only loss (L_seg^rM) found no labelled MRI in this process's batch.
            loss_s = loss_s + 0.0 * teacher_logits.float().sum()
        self.scaler.scale(loss_s).backward()
        self.scaler.step(self.optimizers["teacher"])
        self.scaler.step(self.optimizers["student"])
        self.scaler.update()

    @torch.no_grad()
    def previews(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.translator is None:
            return super().previews(images)
        images = images.to(self.device)
        for network in self.networks.values():
            network.eval()
        with self.autocast():
            pseudo_mr = self.translator.g_ct_to_mr(images)
            student = torch.softmax(self.student(images).float(), dim=1)[:, 1]
            teacher = torch.softmax(self.teacher(pseudo_mr).float(), dim=1)[:, 1]
        self.train()
        return {"CT": images[:, 0].cpu(), "pseudo-MRI": pseudo_mr[:, 0].float().cpu(),
                "student": student.cpu(), "teacher": teacher.cpu()}  # fmt: skip

    def extra_state(self) -> dict[str, Any]:
        return {"pool_mr": self.pool_mr.state_dict(), "pool_ct": self.pool_ct.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "pool_mr" in state:
            self.pool_mr.load_state_dict(state["pool_mr"])
            self.pool_ct.load_state_dict(state["pool_ct"])

    def export_extras(self, folder: Path, student_card: ModelCard) -> None:
        """``translator.safetensors`` (the CT->MR generator and the teacher, for ``cmedl translate``) and
        ``cyclegan.safetensors`` (every translator network, for fine-tuning from this run)."""
        config = self.config
        if self.translator is None:
            return
        card = dataclasses.replace(
            student_card,
            name=f"{student_card.name}-translator",
            architecture=config.translator,
            architecture_options=dict(config.translator_options),
            training={
                **student_card.training,
                "teacher": {"architecture": config.segmentor, "options": dict(config.segmentor_options)},
            },
            description="CT to pseudo-MRI generator and MRI teacher of a CMEDL run",
        )
        save_translator(folder / TRANSLATOR_FILE, self.translator.g_ct_to_mr, self.teacher, card)
        whole = dataclasses.replace(
            card,
            name=f"{student_card.name}-cyclegan",
            description="every network of a CMEDL run's translator (both generators and discriminators)",
        )
        save_cyclegan(folder / CYCLEGAN_FILE, self.translator, whole)

    def card_details(self) -> dict[str, Any]:
        config = self.config
        keys = (
            "translator", "translator_options", "gan_mode", "lambda_adv", "lambda_cyc", "lambda_cx", "lambda_hint",
            "lambda_seg", "lambda_identity", "use_cx", "use_cycle", "use_seg_rm", "use_seg_pm", "hint_reduction",
            "hint_to_teacher", "hint_to_generator", "seg_pm_to_generator", "hint_start_epoch", "lr_translator",
            "segmentor_seg_weight", "teacher_input",
        )  # fmt: skip
        details = {key: getattr(config, key) for key in keys}
        details["vgg_weights"] = config.vgg_weights or "torch hub cache (ImageNet)"
        details["deviations"] = paper_deviations(config)
        return details


OBJECTIVES: dict[str, type[Objective]] = {"ct_only": CTOnlyObjective, "cmedl": CMEDLObjective}


def build_objective(
    config: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None, vgg: torch.nn.Module | None = None
) -> Objective:
    """The objective of ``config.method``; ``vgg``: the contextual loss's VGG16 already loaded
    (:func:`load_contextual_vgg`), or None to load it when needed."""
    from cmedl.errors import ConfigError

    if config.method not in OBJECTIVES:
        raise ConfigError(f"method {config.method!r} is not available in this engine; choose {', '.join(OBJECTIVES)}")
    if vgg is not None:
        return OBJECTIVES[config.method](config, device, amp_dtype, vgg=vgg)
    return OBJECTIVES[config.method](config, device, amp_dtype)


def contextual_loss_needs_vgg(config: TrainConfig) -> bool:
    """Whether a run computes the contextual loss, and so needs VGG16 weights: CMEDL with its translator (not
    the paired-MRI teacher), ``use_cx`` on and ``lambda_cx`` above 0 (as :class:`CMEDLObjective` decides)."""
    return config.method == "cmedl" and config.teacher_input != "paired_mr" and config.use_cx and config.lambda_cx > 0


def load_contextual_vgg(config: TrainConfig) -> tuple[torch.nn.Module | None, str]:
    """The contextual loss's VGG16 with the weights ``config.vgg_weights`` names, and a log line (``""`` unless
    the weights were downloaded now); ``(None, "")`` when the run needs none, or for ``random`` weights (drawn
    where the objective is built, from the run's seed, as before).

    Why apart from :func:`build_objective`: the trainer calls this before it reads the data, so that a missing
    or unreadable weights file, or a failed download, ends the command at once in one line
    (:class:`ConfigError`, from :func:`cmedl.nets.vgg.load_vgg16_features`) instead of after minutes of data
    preparation. Without a file and with nothing in torch hub's cache the ImageNet weights are downloaded into that
    cache (unless ``CMEDL_OFFLINE=1``); torch hub announces it on stdout ("Downloading: ..."), where the JSON events
    of ``--progress json`` go, so that line is caught and the download reported as the returned log line instead.
    """
    if not contextual_loss_needs_vgg(config) or config.vgg_weights == "random":
        return None, ""
    from cmedl.nets.vgg import VGG16_FILE_NAME, load_vgg16_features, vgg16_cache_dir

    if config.vgg_weights:
        return load_vgg16_features(config.vgg_weights), ""
    cached = vgg16_cache_dir() / VGG16_FILE_NAME
    if cached.is_file():
        return load_vgg16_features(None), ""
    with contextlib.redirect_stdout(io.StringIO()):
        vgg = load_vgg16_features(None)
    return vgg, f"contextual loss: downloaded the ImageNet VGG16 weights into {cached}"
