"""The training loop: epochs of optimizer steps that call the engine's callbacks, and evaluation.

The loop reads top to bottom; a pruning engine (or anything else with the same hook
names) plugs in through ``callbacks`` without changing its shape.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from harness import distributed
from harness.config import LrSchedule, Optimizer, TrainConfig
from harness.errors import ConfigError, HarnessError, Interrupted
from harness.metrics import TRAIN_LOSS, VAL_ACCURACY

log = logging.getLogger(__name__)

HOOKS = (
    "on_train_begin", "on_epoch_begin", "on_batch_begin", "on_before_optimizer_step",
    "on_batch_end", "on_epoch_end", "on_validation", "on_train_end",
)

MetricsSink = Callable[[dict[str, float], int], None]


class _CallbackList:
    """Calls a hook on every callback that defines it, in order."""

    def __init__(self, callbacks: Iterable[object]) -> None:
        self._hooks = {name: [getattr(c, name) for c in callbacks if hasattr(c, name)] for name in HOOKS}

    def __call__(self, hook: str, *args: float) -> None:
        for fn in self._hooks[hook]:
            fn(*args)


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    train_loss: float
    val_accuracy: float
    global_step: int


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators: a model's initial weights and any RNG use follow."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device; a CUDA device that is not here is a :class:`ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count()  # 0 without a driver; never raises
        if count == 0:
            raise ConfigError(f"train.device={name}: no CUDA device here; use train.device=cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"train.device={name}: this machine has {count} CUDA device(s), cuda:0 to "
                              f"cuda:{count - 1}; use one of them, or train.device=auto")
    return device


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == Optimizer.sgd:
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == Optimizer.adam:
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                      total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step learning-rate schedule over ``total_steps`` optimizer steps."""
    if cfg.lr_schedule == LrSchedule.cosine:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    if cfg.lr_schedule == LrSchedule.step:
        milestones = [total_steps // 2, (3 * total_steps) // 4]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` (on several processes: over every rank's share)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for inputs, targets in loader:
        logits = model(inputs.to(device, non_blocking=True))
        correct += int((logits.argmax(dim=1) == targets.to(device)).sum())
        total += targets.numel()
    model.train(was_training)
    correct, total = distributed.reduce_sum([correct, total], distributed.current())
    return correct / total if total else 0.0


@dataclass
class LoopState:
    """Where a training loop stands between two steps: everything needed to continue it exactly."""

    epoch: int
    step: int  # the next batch of ``epoch``
    global_step: int
    loss_sum: float
    history: list[EpochResult]
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    loader_generator: torch.Tensor | None  # the train loader's generator at the start of ``epoch``
    rng: dict[str, Any]  # torch, numpy and random at the interruption


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, _inputs: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, targets)


class DistillationLoss:
    """Cross-entropy on the labels mixed with the KL divergence to a teacher's softened outputs
    (weight ``w`` on the teacher, temperature ``T``; scaled by T^2 so its gradients keep their size)."""

    def __init__(self, teacher: nn.Module, weight: float, temperature: float) -> None:
        self.teacher, self.weight, self.temperature = teacher, weight, temperature

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        t = self.temperature
        soft = nn.functional.kl_div(nn.functional.log_softmax(logits / t, dim=1),
                                    nn.functional.log_softmax(teacher_logits / t, dim=1),
                                    reduction="batchmean", log_target=True) * t * t
        return (1 - self.weight) * nn.functional.cross_entropy(logits, targets) + self.weight * soft


class Diverged(HarnessError):
    """The training loss became NaN or infinite."""


def fit(
    model: nn.Module,
    train_loader: Sequence | torch.utils.data.DataLoader,
    val_loader: Iterable,
    cfg: TrainConfig,
    *,
    epochs: int,
    lr: float,
    device: torch.device,
    callbacks: Sequence[object] = (),
    log_metrics: MetricsSink | None = None,
    desc: str = "train",
    resume: LoopState | None = None,
    steps_per_epoch: int | None = None,
    teacher: nn.Module | None = None,
) -> list[EpochResult]:
    """Train ``model`` for ``epochs`` epochs, evaluating on ``val_loader`` after each.

    ``steps_per_epoch`` caps an epoch's optimizer steps (the first batches of its shuffle; None: all).
    With a ``teacher`` (and ``cfg.distill_weight`` > 0) the loss also pulls the model's softened
    outputs towards the teacher's (knowledge distillation, Hinton et al. 2015).
    ``log_metrics(metrics, step)`` receives ``train/loss`` at every optimizer step and
    ``val/accuracy`` at each epoch end, both at the global optimizer step. SIGINT and SIGTERM
    stop the loop between two steps with :class:`Interrupted`, which carries the state that
    ``resume=`` continues from; a NaN or infinite loss raises :class:`Diverged`.
    """
    world = distributed.current()
    steps = len(train_loader) if steps_per_epoch is None else min(steps_per_epoch, len(train_loader))
    optimizer = make_optimizer(model.parameters(), cfg, lr)
    scheduler = make_lr_scheduler(optimizer, cfg, epochs * steps)
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = _cross_entropy
    if teacher is not None and cfg.distill_weight > 0:
        teacher.to(device).eval()
        loss_fn = DistillationLoss(teacher, cfg.distill_weight, cfg.distill_temperature)
    hooks = _CallbackList(callbacks)
    model.to(device).train()
    # On several processes the steps go through DDP (gradients averaged over the ranks); the engine's
    # hooks stay on ``model``'s own parameters, which DDP shares.
    step_model = model if not world.distributed else nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    history: list[EpochResult] = []
    global_step, first_epoch, first_step, loss_carry = 0, 0, 0, 0.0
    generator = getattr(train_loader, "generator", None)
    if resume is not None:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        history, global_step = list(resume.history), resume.global_step
        first_epoch, first_step, loss_carry = resume.epoch, resume.step, resume.loss_sum
    # The pruning engine masks around the optimizer's own steps; handed the optimizer after a resume
    # has loaded its state, so that the engine zeroes the pruned entries of the state it will use.
    for callback in callbacks:
        if hasattr(callback, "use_optimizer"):
            callback.use_optimizer(optimizer)
    # disable=None: a bar on a terminal, nothing in a non-interactive log (the epoch lines stay).
    bar = tqdm(total=epochs * steps, initial=global_step, desc=desc, unit="step",
               disable=None if world.is_main else True, leave=False)
    hooks("on_train_begin")
    with _stop_on_signals(world) as stop:
        for epoch in range(first_epoch, epochs):
            resuming = resume is not None and epoch == first_epoch
            if resuming and generator is not None and resume.loader_generator is not None:
                generator.set_state(resume.loader_generator)
            epoch_generator = generator.get_state() if generator is not None else None
            if not resuming:  # a resumed epoch already had its beginning
                hooks("on_epoch_begin", epoch)
            loss_sum = loss_carry if resuming else 0.0
            batches = iter(train_loader)
            if resuming:
                for _ in range(first_step):
                    next(batches)  # the same data order as the interrupted run
                _set_rng(resume.rng)
            for step in range(first_step if resuming else 0, steps):
                if stop.signal_name:
                    raise Interrupted(stop.signal_name, LoopState(
                        epoch, step, global_step, float(loss_sum), list(history), _cpu(model.state_dict()),
                        optimizer.state_dict(), scheduler.state_dict(), epoch_generator, _get_rng()))
                inputs, targets = next(batches)
                hooks("on_batch_begin", step)
                inputs = inputs.to(device, non_blocking=True)
                loss = loss_fn(step_model(inputs), targets.to(device, non_blocking=True), inputs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                hooks("on_before_optimizer_step")
                optimizer.step()
                scheduler.step()
                hooks("on_batch_end")
                global_step += 1
                loss_value = stop.agree(loss.item())  # (on several processes: the mean over the ranks)
                if not math.isfinite(loss_value):
                    raise Diverged(f"{TRAIN_LOSS}={loss_value} at epoch {epoch} step {step} (global step "
                                   f"{global_step}): lower the learning rate ({lr}) or check the data")
                loss_sum += loss_value
                if log_metrics is not None:
                    log_metrics({TRAIN_LOSS: loss_value}, global_step)
                bar.update()
            hooks("on_epoch_end")
            val_accuracy = evaluate(model, val_loader, device)
            result = EpochResult(epoch, float(loss_sum) / max(1, steps), val_accuracy, global_step)
            history.append(result)
            if log_metrics is not None:
                log_metrics({VAL_ACCURACY: val_accuracy}, global_step)
            bar.set_postfix(loss=f"{result.train_loss:.4f}", val=f"{val_accuracy:.4f}")
            log.info("%s epoch %d/%d  loss %.4f  val accuracy %.4f", desc, epoch + 1, epochs,
                     result.train_loss, val_accuracy)
            hooks("on_validation", epoch, val_accuracy)  # e.g. a sweep trial reports, and may stop the run
    hooks("on_train_end")
    bar.close()
    return history


class _StopRequest:
    """A signal's request to stop at the next step boundary. On several processes the ranks agree on it
    after every step (with the step's loss, in one all-reduce), so that all stop at the same step, which
    a signal that reached one of them, or reached them during different steps, would not give."""

    def __init__(self, world: distributed.World) -> None:
        self.world = world
        self.signal_name: str | None = None
        self._received: str | None = None

    def receive(self, name: str) -> None:
        self._received = name
        if not self.world.distributed:
            self.signal_name = name

    def agree(self, loss: float) -> float:
        """The mean loss over the ranks; sets ``signal_name`` on every rank once any rank had a signal."""
        if not self.world.distributed:
            return loss
        names = ("SIGINT", "SIGTERM")
        total, *seen = distributed.reduce_sum([loss, *(float(self._received == n) for n in names)], self.world)
        if any(seen):
            self.signal_name = names[0] if seen[0] else names[1]
        return total / self.world.size


@contextlib.contextmanager
def _stop_on_signals(world: distributed.World) -> Iterator[_StopRequest]:
    """While training, SIGINT and SIGTERM only ask the loop to stop at the next step boundary,
    so that what it saves is consistent."""
    request = _StopRequest(world)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def ask_to_stop(signum: int, _frame: Any) -> None:
        request.receive(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _get_rng() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
