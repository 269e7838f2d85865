"""Benchmarks of the pruning machinery: ratios measured side by side, in one process.

    python -m harness.bench                      # everything (under 10 minutes on 2 cores)
    python -m harness.bench --quick              # tiny sizes: a smoke run (under a minute)
    python -m harness.bench --only a,c --markdown bench.md

Every number is a ratio of two (or more) arms measured in the same process, interleaved
(A, B, A, B, ... with the order rotated at each repeat, never all A then all B), and
reported as the median over the repeats of the per-repeat ratio, so that a noisy, shared
machine slows both arms of a repeat alike (see ``interleave``). Each item gets a time
budget: it runs at least a few repeats and stops adding repeats when the next would not
fit. On a machine that other work keeps busy when the bench starts, OpenMP waits passively
(``OMP_WAIT_POLICY=PASSIVE``): spin-waiting threads then make steps several times slower at
random; on a quiet one it keeps its default (spin a while, then sleep), as a user's process
does. An ``OMP_WAIT_POLICY`` in the environment wins; the header says which was used.

Items (each line of the table: the ratio, its target, pass/fail, and the peer measured
beside it):

a. training-step overhead of the engine (90%, a mask update every 100 steps) on an MLP and
   on resnet18, and the same for ``torch.nn.utils.prune.global_unstructured``;
b. a step that recomputes the masks (global magnitude, resnet18) against a normal step;
c. global magnitude selection over resnet50's 25.5M conv/linear weights against one
   concatenated abs + kthvalue pass, and against ``torch.nn.utils.prune``;
d. the engine's ``apply_masks`` against an in-place ``copy_`` of the same tensors;
e. a default run with MLflow tracking against the same run with ``tracking=none``;
f. a 30-trial sweep through ``python -m harness --multirun`` against a plain Optuna loop;
g. the unstructured export (``sparsify_linears``) of an MLP pruned by the engine to 90% and 95%,
   against the dense model, with plain ``torch.sparse`` CSR (MKL) for every layer beside it;
h. the channel export (``remove_pruned_channels``) of resnet18 with 50% of its channels pruned by
   the engine, against the dense model, on one thread and on all, with the masked (not removed)
   model beside it;
i. the compressed checkpoint of the 90% MLP against its dense ``torch.save``, with a sparse COO
   ``torch.save`` beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _busy_machine(window_s: float = 0.5) -> bool:
    """Do other processes keep a third of a core or more busy right now? Read from /proc/stat
    over ``window_s`` (the load average lags by minutes); elsewhere, from the load average."""

    def cpu_times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    try:
        total0, idle0 = cpu_times()
        time.sleep(window_s)
        total1, idle1 = cpu_times()
        return (1 - (idle1 - idle0) / max(1, total1 - total0)) * (os.cpu_count() or 1) >= 0.33
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0] >= 0.5 * len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return False


# Set before torch loads OpenMP: on a shared machine whose cores are busy with other work,
# OpenMP's default spin-waiting makes a step 5-10x slower whenever one of torch's threads is
# descheduled (its peers spin until it runs again), and timings swing by as much; passive
# waiting keeps them stable. On a quiet machine passive waiting costs every parallel region a
# thread wake-up instead (a dense MLP step ran 20% slower, and small models worse), which is
# not what a user's process sees: there the default stays. An explicit setting wins.
if "OMP_WAIT_POLICY" not in os.environ and _busy_machine():
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402  (after the OpenMP setting above)
from torch import nn  # noqa: E402

OMP_POLICY = os.environ.get("OMP_WAIT_POLICY", "unset (libgomp's default)")
REPO = Path(__file__).resolve().parent.parent
SPARSITY = 0.9
UPDATE_EVERY = 100  # optimizer steps between mask updates (item a)


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One measured ratio against its target (lower is better; passed means ratio <= target)."""

    name: str
    ratio: float
    target: float
    passed: bool
    peer_text: str  # the peer measured beside it (or reference numbers)
    details: str  # what was measured: arms, medians, repeats

    @property
    def ratio_text(self) -> str:
        """Three decimals, or as many more as it takes not to round a miss onto its target."""
        for digits in range(3, 7):
            text = f"{self.ratio:.{digits}f}"
            if self.passed or not math.isfinite(self.ratio) or float(text) > self.target:
                break
        return text


def result(name: str, ratio: float, target: float, peer_text: str, details: str) -> Result:
    return Result(name, ratio, target, math.isfinite(ratio) and 0 < ratio <= target, peer_text, details)


@dataclass(frozen=True)
class Settings:
    """Sizes and time budgets; ``quick`` shrinks everything to a smoke run."""

    quick: bool = False
    mlp_hidden: int = 2048
    mlp_batch: int = 128
    resnet_batch: int = 32
    resnet_image: int = 64
    conv_model: str = "resnet18"  # items a, b, d
    global_model: str = "resnet50"  # item c
    budget_a_mlp: float = 50.0  # seconds per item (repeats stop when the next would not fit)
    budget_a_resnet: float = 60.0
    budget_b: float = 35.0
    budget_c: float = 40.0
    budget_d: float = 6.0
    budget_e: float = 60.0
    budget_e_process: float = 60.0
    budget_f: float = 220.0
    budget_g: float = 12.0  # per sparsity
    budget_h: float = 20.0
    min_repeats: int = 3
    e_overrides: tuple[str, ...] = ()  # the default run
    f_trials: int = 30
    f_overrides: tuple[str, ...] = ("train.finetune_epochs=2", "prune.end_epoch=1")
    f_pairs: int = 2
    export_hidden: int = 2048
    export_batch: int = 64
    surgery_model: str = "resnet18"
    surgery_batch: int = 8

    @classmethod
    def quick_sizes(cls) -> Settings:
        return cls(quick=True, mlp_hidden=256, mlp_batch=32, resnet_batch=4, resnet_image=16,
                   conv_model="small_cnn", global_model="mlp", budget_a_mlp=2.0, budget_a_resnet=3.0,
                   budget_b=2.0, budget_c=2.0, budget_d=1.0, budget_e=1.0, budget_e_process=1.0, budget_f=1.0,
                   min_repeats=3,
                   e_overrides=("train.epochs=1", "train.finetune_epochs=1", "prune.end_epoch=0"),
                   f_trials=1, f_overrides=("train.epochs=1", "train.finetune_epochs=1", "prune.end_epoch=0"),
                   f_pairs=1, export_hidden=256, export_batch=16, surgery_model="small_cnn", surgery_batch=4,
                   budget_g=1.0, budget_h=1.0)


@dataclass
class Context:
    settings: Settings
    threads: int
    workdir: Path  # temporary; shared by e and f so that they reuse one cached dense baseline
    warmed: set[str] = field(default_factory=set)  # dense baselines cached (keys) under workdir/outputs


# -- measuring ----------------------------------------------------------------------------


def interleave(arms: dict[str, Callable[[], float]], *, budget_s: float, min_repeats: int = 3,
               max_repeats: int = 1000, every: dict[str, int] | None = None,
               rounds: int = 1) -> dict[str, list[float]]:
    """Run every arm once per round, ``rounds`` rounds per repeat, rotating the order at each
    repeat (A B C A B C, then B C A B C A, ...); an arm's sample of a repeat is its fastest round.

    Each arm does its own untimed set-up and returns the seconds of its timed part. Rounds
    interleave the arms step by step, so that the arms of a repeat share the same spells of
    interference from other work on the machine, and that only ever adds time: the fastest
    round is the least disturbed. An arm named in ``every`` runs only in every n-th repeat
    (from the first) and then in its first round only. The rotation goes over the arms of the
    repeat, so that each arm takes each place equally often. The garbage collector runs
    between repeats, never inside one. Repeats stop at ``max_repeats`` or, after
    ``min_repeats``, when the next repeat would end past ``budget_s``.
    """
    every = every or {}
    names = list(arms)
    times: dict[str, list[float]] = {name: [] for name in names}
    rotations: dict[tuple[str, ...], int] = {}
    started = time.perf_counter()
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(max_repeats):
            elapsed = time.perf_counter() - started
            if r >= min_repeats and elapsed * (r + 1) / r > budget_s:
                break
            active = tuple(name for name in names if r % every.get(name, 1) == 0)
            shift = rotations.get(active, 0) % len(active)
            rotations[active] = shift + 1
            best: dict[str, float] = {}
            for round_ in range(rounds):
                for name in active[shift:] + active[:shift]:
                    if round_ == 0 or name not in every:
                        best[name] = min(best.get(name, math.inf), arms[name]())
            for name, seconds in best.items():
                times[name].append(seconds)
            gc.collect()
    finally:
        if gc_enabled:
            gc.enable()
    return times


def timed(work: Callable[[], Any], setup: Callable[[], Any] | None = None) -> Callable[[], float]:
    """An arm: untimed ``setup``, then ``work``; returns the seconds ``work`` took."""

    def arm() -> float:
        if setup is not None:
            setup()
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    return arm


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over repeats of the per-repeat ratio ``num[r] / den[r]``."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f} ms"


# -- models and training steps ---------------------------------------------------------------


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def small_cnn() -> nn.Module:
    """The --quick stand-in for resnet18: a few convolutions, a few seconds for everything."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def torchvision_model(name: str, num_classes: int = 10) -> nn.Module:
    if name == "small_cnn":
        return small_cnn()
    import torchvision

    return getattr(torchvision.models, name)(num_classes=num_classes)


class Trainer:
    """One model, one SGD optimizer (momentum 0.9), one fixed batch: ``step()`` is a training step."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.model = model.train()
        self.inputs, self.targets = inputs, targets
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.loss_fn = nn.CrossEntropyLoss()

    def step(self, before_step: Callable[[], None] | None = None, after_step: Callable[[], None] | None = None) -> None:
        loss = self.loss_fn(self.model(self.inputs), self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        self.optimizer.step()
        if after_step is not None:
            after_step()


class EngineArm:
    """The engine in a plain loop: its callbacks around each step, a mask update every ``every`` steps.

    Every timed update is a real recomputation that changes the masks: ``rewind()`` (untimed)
    loads the engine's ``state_dict`` and the weights as they were at 89% (after the schedule's
    first update), with the clock at step ``every``, so that the next step re-scores every
    weight and prunes from 89% to 90% (linear schedule, ``initial_sparsity`` 0.89, ending at
    step ``every``). Normal steps run at 90%, after that update. The engine is also given the
    optimizer (``attach(optimizer=...)``, as docs/engine.md offers, and as the harness's own loop
    does): its step hooks count the steps, and the step callbacks, still called, leave it to them.
    """

    def __init__(self, trainer: Trainer, scope: str = "per_tensor", every: int = UPDATE_EVERY) -> None:
        from harness.pruning import Pruning

        self.trainer = trainer
        spec = {"initial_sparsity": SPARSITY - 0.01, "target_sparsity": SPARSITY, "schedule": "linear",
                "start_epoch": 0, "end_epoch": 1, "update_frequency_steps": every, "scope": scope}
        self.pruning = Pruning(spec).attach(trainer.model, steps_per_epoch=every, optimizer=trainer.optimizer)
        self.pruning.on_train_begin()
        self.pruning.on_epoch_begin(0)  # the first update (step 0): 89%
        self.step()
        state = self.pruning.state_dict()
        self._at_update = {**state, "global_step": every, "epoch_start_step": 0}
        self._weights = {name: p.detach().clone() for name, p in self.pruning.params.items()}
        self.rewind()
        self.step()  # the update to 90%; the steps after it run at 90% with no further update

    def step(self) -> None:
        self.pruning.on_batch_begin()
        self.trainer.step(self.pruning.on_before_optimizer_step, self.pruning.on_batch_end)

    @torch.no_grad()
    def rewind(self) -> None:
        for name, param in self.pruning.params.items():
            param.copy_(self._weights[name])
        self.pruning.load_state_dict(self._at_update)

    def last_update_step(self) -> int:
        return int(self.pruning.state_dict()["clocks"][0]["last_position"])

    def sparsity(self) -> float:
        from harness.pruning import overall_sparsity

        return overall_sparsity(self.pruning.sparsity())


def prunable_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every conv and linear weight: the engine's default selection."""
    from harness.pruning import prunable_weights

    return [(model.get_submodule(name.rpartition(".")[0]), "weight") for name in prunable_weights(model)]


class TorchPruneArm:
    """``torch.nn.utils.prune.global_unstructured`` (L1, forward pre-hooks): the peer.

    ``update()`` recomputes the masks as its users do: ``prune.remove`` then
    ``global_unstructured`` again at the same amount (the parameters stay the same objects,
    so the optimizer keeps training them).
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.params = prunable_modules(trainer.model)
        self._prune()
        self.step()

    def _prune(self) -> None:
        from torch.nn.utils import prune

        prune.global_unstructured(self.params, pruning_method=prune.L1Unstructured, amount=SPARSITY)

    def update(self) -> None:
        from torch.nn.utils import prune

        for module, name in self.params:
            prune.remove(module, name)
        self._prune()

    def step(self) -> None:
        self.trainer.step()

    def update_step(self) -> None:
        self.update()
        self.trainer.step()

    def sparsity(self) -> float:
        masks = [getattr(m, f"{n}_mask") for m, n in self.params]
        return sum(int((m == 0).sum()) for m in masks) / sum(m.numel() for m in masks)


def trainers(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, count: int) -> list[Trainer]:
    """``count`` identical copies of ``model``, each with its own optimizer, on the same batch."""
    return [Trainer(copy.deepcopy(model), inputs, targets) for _ in range(count)]


# -- a. training-step overhead ------------------------------------------------------------------


def step_overhead(label: str, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  budget_s: float, min_repeats: int, steps: int) -> list[Result]:
    """Pruning on / off: the engine (and torch.nn.utils.prune) against dense steps.

    The step time with an update every ``UPDATE_EVERY`` steps is the normal masked step plus
    the extra time of a step with an update divided by ``UPDATE_EVERY``. The extra time is the
    median over the repeats that time an update step (every third repeat: a scheduled update
    after the clock is rewound, untimed, to step ``UPDATE_EVERY``) of the update step minus the
    same repeat's normal step; every repeat's normal steps get it added.
    """
    dense_t, ours_t, peer_t = trainers(model, inputs, targets, 3)
    ours, peer = EngineArm(ours_t), TorchPruneArm(peer_t)
    for _ in range(2):  # warm-up
        dense_t.step(), ours.step(), peer.step()
    arms = {
        "dense": timed(dense_t.step),
        "ours": timed(ours.step),
        "peer": timed(peer.step),
        "ours_update": timed(ours.step, setup=ours.rewind),
        "peer_update": timed(peer.update_step),
    }
    every = 3
    t = interleave(arms, budget_s=budget_s, min_repeats=max(min_repeats, every + 1), rounds=steps,
                   every={name: every for name in arms if name.endswith("_update")})
    updated_at = ours.last_update_step()

    def amortized(normal: list[float], update: list[float]) -> list[float]:
        extra = statistics.median(u - n for u, n in zip(update, normal[::every]))
        return [n + extra / UPDATE_EVERY for n in normal]

    ours_a, peer_a = amortized(t["ours"], t["ours_update"]), amortized(t["peer"], t["peer_update"])
    ours_ratio, peer_ratio = median_ratio(ours_a, t["dense"]), median_ratio(peer_a, t["dense"])
    vs_peer = median_ratio(ours_a, peer_a)
    details = (f"median step: dense {ms(t['dense'])}, ours {ms(t['ours'])} (update step {ms(t['ours_update'])}), "
               f"torch prune {ms(t['peer'])} (update step {ms(t['peer_update'])}); updates amortized over "
               f"{UPDATE_EVERY} steps; {len(t['dense'])} repeats of {steps} interleaved round(s), each arm's "
               f"fastest round ({len(t['ours_update'])} repeats with update steps); ours = attach(optimizer=) + the "
               f"callbacks in a plain loop")
    kept_only = sorted(ours.pruning._kept_grads)
    details += (f"; counted sparsity ours {ours.sparsity():.2%}, torch prune {peer.sparsity():.2%}; "
                f"the timed update ran at step {updated_at}; weight gradients of kept weights only "
                f"(prune.sparse_grads) for {', '.join(kept_only) if kept_only else 'no layer'}")
    peer_text = f"torch prune {peer_ratio:.3f}x"
    return [
        result(f"a. step on/off, {label}", ours_ratio, 1.05, peer_text, details),
        result(f"a. ours/peer, {label}", vs_peer, 0.97, f"ours {ours_ratio:.3f}x vs torch prune {peer_ratio:.3f}x",
               "per repeat: (ours amortized step) / (torch prune amortized step)"),
    ]


def item_a(ctx: Context) -> list[Result]:
    s = ctx.settings
    torch.manual_seed(0)
    label = f"MLP 784-{s.mlp_hidden}-{s.mlp_hidden}-10 b{s.mlp_batch}"
    rows = step_overhead(label, mlp(s.mlp_hidden), torch.randn(s.mlp_batch, 784),
                         torch.randint(0, 10, (s.mlp_batch,)), s.budget_a_mlp, s.min_repeats, steps=3)
    label = f"{s.conv_model} b{s.resnet_batch} {s.resnet_image}x{s.resnet_image}"
    rows += step_overhead(label, torchvision_model(s.conv_model),
                          torch.randn(s.resnet_batch, 3, s.resnet_image, s.resnet_image),
                          torch.randint(0, 10, (s.resnet_batch,)), s.budget_a_resnet, s.min_repeats, steps=2)
    return rows


# -- b. a step that recomputes the masks --------------------------------------------------------


def item_b(ctx: Context) -> list[Result]:
    s = ctx.settings
    torch.manual_seed(0)
    model = torchvision_model(s.conv_model)
    inputs = torch.randn(s.resnet_batch, 3, s.resnet_image, s.resnet_image)
    targets = torch.randint(0, 10, (s.resnet_batch,))
    ours_t, peer_t = trainers(model, inputs, targets, 2)
    ours, peer = EngineArm(ours_t, scope="global"), TorchPruneArm(peer_t)
    ours.step(), peer.step()
    arms = {
        "ours_update": timed(ours.step, setup=ours.rewind),
        "ours": timed(ours.step),
        "peer_update": timed(peer.update_step),
        "peer": timed(peer.step),
    }
    t = interleave(arms, budget_s=s.budget_b, min_repeats=s.min_repeats)
    updated_at = ours.last_update_step()
    ratio = median_ratio(t["ours_update"], t["ours"])
    peer_ratio = median_ratio(t["peer_update"], t["peer"])
    details = (f"{s.conv_model} b{s.resnet_batch} {s.resnet_image}x{s.resnet_image}, scope=global magnitude at 90%: "
               f"update step {ms(t['ours_update'])} vs step {ms(t['ours'])}; torch prune (remove + "
               f"global_unstructured + step) {ms(t['peer_update'])} vs {ms(t['peer'])}; "
               f"{len(t['ours'])} interleaved repeats; counted sparsity {ours.sparsity():.2%}; the timed update "
               f"ran at step {updated_at}")
    peer_text = (f"torch prune {peer_ratio:.2f}x measured; reference (not installable here): "
                 "torch prune ~6x, Intel Neural Compressor 7x, LPOT 29x")
    return [result(f"b. update step / step, {s.conv_model}", ratio, 2.0, peer_text, details)]


# -- c. global magnitude selection -----------------------------------------------------------


def engine_global_masks(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                        sparsity: float) -> dict[str, torch.Tensor]:
    """The engine's global selection, as ``Pruning`` does it for ``scope=global``: unit scores
    (``|w|``), the current keep-masks, ``select_global``, and the masks expanded to the weights."""
    from harness.pruning.criteria import magnitude
    from harness.pruning.patterns import Unstructured, select_global

    pattern = Unstructured()
    scores = {n: pattern.unit_scores(magnitude(w)) for n, w in weights.items()}
    sizes = {n: pattern.unit_sizes(w.shape) for n, w in weights.items()}
    keep_now = {n: pattern.unit_keep(masks[n]) for n in weights}
    keep = select_global(scores, sizes, keep_now, sparsity)
    return {n: pattern.expand(keep[n], w.shape) for n, w in weights.items()}


@torch.no_grad()
def kthvalue_masks(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """The baseline: one concatenated ``|w|`` (written straight into one buffer), one
    ``kthvalue`` for the threshold, one comparison per tensor for its mask."""
    from harness.pruning.patterns import pruned_count

    counts = [w.numel() for w in weights.values()]
    flat = torch.empty(sum(counts), dtype=torch.float32)
    chunks = flat.split(counts)
    for chunk, w in zip(chunks, weights.values()):
        torch.abs(w.detach().reshape(-1), out=chunk)
    threshold = flat.kthvalue(pruned_count(flat.numel(), sparsity)).values
    return {n: chunk.gt(threshold).to(torch.float32).view(w.shape)
            for (n, w), chunk in zip(weights.items(), chunks)}


def item_c(ctx: Context) -> list[Result]:
    from harness.pruning import Pruning, prunable_weights

    s = ctx.settings
    torch.manual_seed(0)
    model = mlp(512) if s.global_model == "mlp" else torchvision_model(s.global_model, num_classes=1000)
    label = "MLP 784-512-512-10" if s.global_model == "mlp" else s.global_model
    weights = {n: p.detach() for n, p in prunable_weights(model).items()}
    total = sum(w.numel() for w in weights.values())
    ones = {n: torch.ones_like(w) for n, w in weights.items()}
    out: dict[str, dict[str, torch.Tensor]] = {}

    def engine() -> None:
        out["engine"] = engine_global_masks(weights, ones, SPARSITY)

    def kth() -> None:
        out["kth"] = kthvalue_masks(weights, SPARSITY)

    fresh: dict[str, Any] = {}  # a copy of the model for the arms that prune it (torch prune, Pruning)

    def fresh_copy() -> nn.Module:
        fresh.clear()
        gc.collect()
        fresh["model"] = copy.deepcopy(model)
        return fresh["model"]

    def peer() -> None:
        from torch.nn.utils import prune

        prune.global_unstructured(prunable_modules(fresh["model"]), pruning_method=prune.L1Unstructured,
                                  amount=SPARSITY)

    def pruning_setup() -> None:
        fresh["pruning"] = Pruning({"scope": "global", "target_sparsity": SPARSITY,
                                    "schedule": "one_shot"}).attach(fresh_copy(), steps_per_epoch=1)

    def pruning_update() -> None:
        fresh["pruning"].on_epoch_begin(0)

    arms = {"engine": timed(engine), "kth": timed(kth), "peer": timed(peer, setup=fresh_copy),
            "pruning": timed(pruning_update, setup=pruning_setup)}
    t = interleave(arms, budget_s=s.budget_c, min_repeats=s.min_repeats if not s.quick else 2)
    fresh.clear()
    pruned = {k: sum(int((m == 0).sum()) for m in v.values()) for k, v in out.items()}
    vs_kth = median_ratio(t["engine"], t["kth"])
    vs_peer = median_ratio(t["engine"], t["peer"])
    details = (f"{label}: {len(weights)} conv/linear weights, {total:,} values, 90% global magnitude; "
               f"median: select_global path {ms(t['engine'])}, abs+kthvalue {ms(t['kth'])}, torch prune "
               f"global_unstructured {ms(t['peer'])}, Pruning(scope=global) one update incl. applying the masks "
               f"{ms(t['pruning'])}; pruned: engine {pruned['engine']:,}, kthvalue {pruned['kth']:,}; "
               f"{len(t['engine'])} interleaved repeats")
    return [
        result(f"c. global select vs abs+kthvalue, {label}", vs_kth, 1.0,
               f"abs+kthvalue {ms(t['kth'])}", details),
        result(f"c. global select vs torch prune, {label}", vs_peer, 0.1,
               f"torch prune global_unstructured {ms(t['peer'])}", "same measurement as the line above"),
    ]


# -- d. mask application ------------------------------------------------------------------------


def item_d(ctx: Context) -> list[Result]:
    from torch.nn.utils import prune

    from harness.pruning import Pruning

    s = ctx.settings
    torch.manual_seed(0)
    model, label = torchvision_model(s.conv_model), s.conv_model
    pruning = Pruning({"target_sparsity": SPARSITY, "schedule": "one_shot"}).attach(model, steps_per_epoch=1)
    pruning.on_epoch_begin(0)
    params = list(pruning.params.values())
    sources = [p.detach().clone() for p in params]  # the same values: copy_ leaves the weights as they are

    @torch.no_grad()
    def copy_all() -> None:
        for p, src in zip(params, sources):
            p.copy_(src)

    peer_model = copy.deepcopy(model)
    peer_params = prunable_modules(peer_model)
    prune.global_unstructured(peer_params, pruning_method=prune.L1Unstructured, amount=SPARSITY)
    hooks = [(m, h) for m, _ in peer_params for h in m._forward_pre_hooks.values()
             if isinstance(h, prune.BasePruningMethod)]

    @torch.no_grad()
    def peer_apply() -> None:  # what torch prune's forward pre-hooks do before each forward
        for module, hook in hooks:
            hook(module, None)

    repeat = 5
    arms = {"apply": timed(pruning.apply_masks), "copy": timed(copy_all), "peer": timed(peer_apply)}
    t = interleave(arms, budget_s=s.budget_d, min_repeats=10, max_repeats=200, rounds=repeat)
    ratio = median_ratio(t["apply"], t["copy"])
    peer_ratio = median_ratio(t["peer"], t["copy"])
    numel = sum(p.numel() for p in params)
    details = (f"{label}: {len(params)} tensors, {numel:,} values; median apply_masks {ms(t['apply'])}, "
               f"copy_ {ms(t['copy'])}, torch prune pre-hooks (w = orig * mask) {ms(t['peer'])}; "
               f"{len(t['apply'])} repeats of {repeat} interleaved rounds, each arm's fastest round")
    return [result(f"d. apply_masks / copy_, {label}", ratio, 2.0, f"torch prune hooks {peer_ratio:.2f}x copy_",
                   details)]


# -- e. tracking overhead -----------------------------------------------------------------------


def compose(overrides: Sequence[str]) -> Any:
    """The typed config for ``overrides``, composed as the command line does (tests/conftest.py)."""
    from harness.config import compose_config

    return compose_config(list(overrides))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow what a run prints (its summary; tqdm sees no terminal and stays off)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


@contextlib.contextmanager
def default_tracking_env() -> Iterator[None]:
    """Runs use the default store (``outputs_dir/mlflow.db``), whatever MLFLOW_TRACKING_URI says."""
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def child_env(ctx: Context) -> dict[str, str]:
    """The environment of a timed ``python -m harness``: the default stores, the bench's threads."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    return env | {"OMP_NUM_THREADS": str(ctx.threads), "MKL_NUM_THREADS": str(ctx.threads)}


def launch(command: list[str], env: dict[str, str], log: Path) -> tuple[float, int]:
    """Seconds from start to exit of ``command`` run from the checkout (output to ``log``), and its
    exit status."""
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return time.perf_counter() - start, code


def item_e(ctx: Context) -> list[Result]:
    from harness import runner
    from harness.baseline import baseline_key

    s = ctx.settings
    outputs = ctx.workdir / "outputs"
    common = [*s.e_overrides, f"outputs_dir={outputs}"]
    tracked, untracked = compose(common), compose([*common, "tracking=none"])
    runs = ctx.workdir / "e-runs"
    counter = iter(range(10**6))

    def run(cfg: Any) -> Callable[[], None]:
        def go() -> None:
            with quiet():
                runner.run(cfg, runs / str(next(counter)))

        return go

    with default_tracking_env():
        # Untimed warm-up: trains and caches the dense baseline, starts the MLflow writer process and
        # creates the SQLite store's schema, imports matplotlib; every timed run then reuses the same
        # cached baseline and writer.
        warm = time.perf_counter()
        run(tracked)()
        warm = time.perf_counter() - warm
        ctx.warmed.add(baseline_key(tracked))
        t = interleave({"mlflow": timed(run(tracked)), "none": timed(run(untracked))},
                       budget_s=s.budget_e, min_repeats=2 if not s.quick else 1, max_repeats=12, rounds=3)
    ratio = median_ratio(t["mlflow"], t["none"])
    process_ratio, process_details = _e_processes(ctx, common, runs)
    what = "the default config" + (f" with {' '.join(s.e_overrides)}" if s.e_overrides else "")
    details = (f"harness.runner.run on {what} (dense baseline cached), MLflow SQLite store in a temp dir, "
               f"written by the process's MLflow writer (started by the warm-up run); "
               f"median run {statistics.median(t['mlflow']):.2f} s with MLflow, "
               f"{statistics.median(t['none']):.2f} s with tracking=none; {len(t['none'])} interleaved repeats of 3 "
               f"rounds, each arm's fastest round "
               f"(untimed warm-up run {warm:.1f} s); beside it, {process_details}")
    return [result("e. run with MLflow / tracking=none", ratio, 1.05,
                   f"whole python -m harness process {process_ratio:.2f}x", details)]


def _e_processes(ctx: Context, common: list[str], runs: Path) -> tuple[float, str]:
    """Item e as a user meets it: the whole ``python -m harness`` process (interpreter start,
    imports, MLflow's writer process starting beside it, exit), with MLflow and with
    ``tracking=none``; the baseline cached by the in-process warm-up. Printed beside the
    in-process ratio: seven-second processes on two shared cores swing more than runs do."""
    s = ctx.settings
    env, failures, counter = child_env(ctx), [], iter(range(10**6))

    def process(extra: list[str]) -> Callable[[], float]:
        def go() -> float:
            where = runs / f"process-{next(counter)}"
            seconds, code = launch([sys.executable, "-m", "harness", *common, *extra, f"hydra.run.dir={where}"],
                                   env, runs / f"{where.name}.log")
            if code != 0:
                failures.append(f"python -m harness {' '.join(extra)} exited {code}: "
                                f"{(runs / f'{where.name}.log').read_text()[-1500:]}")
            return seconds

        return go

    with default_tracking_env():
        t = interleave({"mlflow": process([]), "none": process(["tracking=none"])}, budget_s=s.budget_e_process,
                       min_repeats=3 if not s.quick else 1, max_repeats=10)
    if failures:
        raise RuntimeError("; ".join(failures))
    details = (f"`python -m harness` timed from start to exit: median {statistics.median(t['mlflow']):.2f} s "
               f"with MLflow, {statistics.median(t['none']):.2f} s with tracking=none, {len(t['none'])} "
               f"interleaved repeats")
    return median_ratio(t["mlflow"], t["none"]), details


# -- f. sweep overhead --------------------------------------------------------------------------

# Both arms run in a fresh subprocess each, timed from start to exit: the sweep *is* a process
# (`python -m harness --multirun`: Hydra composes the sweep, the sweeper opens the study and a
# parent MLflow run, launches each trial as a Hydra job in that process and writes its report
# and plots at the end), so the plain Optuna loop gets the same process start (interpreter,
# torch, Optuna, Hydra, MLflow imports) and the same stores: one SQLite Optuna storage and the
# default SQLite MLflow store under one outputs_dir, schemas created and the dense baseline
# cached before any timed arm. Both ask the same sampler (TPE, seed 0, multivariate) for the same
# two parameters and run the same reduced config through harness.runner.run. The sweep's pruner
# and its confirmation runs are turned off, so both arms train the same trials to the end.

SWEEP_SPACE = {"prune.target_sparsity": (0.5, 0.95), "prune.schedule": ["linear", "cubic"]}


def plain_optuna_loop(spec: dict[str, Any]) -> None:
    """The plain loop of item f (run in its own process): ``study.optimize`` calling ``runner.run``."""
    import optuna
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from harness import runner
    from harness.__main__ import CONF_DIR
    from harness.config import register_configs, to_config

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    register_configs()
    low, high = SWEEP_SPACE["prune.target_sparsity"]
    run_dir = Path(spec["run_dir"])

    def objective(trial: optuna.Trial) -> float:
        sparsity = trial.suggest_float("prune.target_sparsity", low, high)
        schedule = trial.suggest_categorical("prune.schedule", SWEEP_SPACE["prune.schedule"])
        overrides = [*spec["fixed"], f"prune.target_sparsity={sparsity!r}", f"prune.schedule={schedule}"]
        cfg = to_config(hydra_compose(config_name="config", overrides=overrides))
        return runner.run(cfg, run_dir / str(trial.number)).metrics["final/sparsity"]

    study = optuna.create_study(study_name=spec["study"], storage=spec["storage"], direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=0, multivariate=True))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        study.optimize(objective, n_trials=spec["trials"])


def item_f(ctx: Context) -> list[Result]:
    import optuna

    from harness import runner
    from harness.baseline import baseline_key

    s = ctx.settings
    outputs = ctx.workdir / "outputs"
    fixed = [*s.f_overrides, f"outputs_dir={outputs}"]
    env = child_env(ctx)
    logs = ctx.workdir / "f-logs"
    logs.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{outputs / 'optuna.db'}"
    low, high = SWEEP_SPACE["prune.target_sparsity"]
    choices = ", ".join(SWEEP_SPACE["prune.schedule"])
    repeat = iter(range(10**6))
    failures: list[str] = []

    with default_tracking_env():
        warm = time.perf_counter()
        if baseline_key(compose(fixed)) not in ctx.warmed:  # else e cached it and created the MLflow schema
            with quiet():
                runner.run(compose(fixed), ctx.workdir / "f-warmup")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optuna.create_study(study_name="bench-warmup", storage=storage)  # Optuna schema created
        warm = time.perf_counter() - warm

    def run(kind: str, command: list[str]) -> float:
        log = logs / f"{kind}-{len(list(logs.iterdir()))}.log"
        elapsed, code = launch(command, env, log)
        if code != 0:
            failures.append(f"{kind} exited {code}: {log.read_text()[-1500:]}")
        return elapsed

    def sweep() -> float:
        r = next(repeat)
        return run("sweep", [
            sys.executable, "-m", "harness", "--multirun", "hydra/sweeper=harness_optuna",
            f"hydra.sweeper.n_trials={s.f_trials}", f"hydra.sweeper.study_name=bench-sweep-{r}",
            # like for like with the plain loop: no trial pruning, no confirmation runs
            "hydra.sweeper.pruner.name=none", "hydra.sweeper.confirm.seeds=0",
            f"prune.target_sparsity=interval({low}, {high})", f"prune.schedule=choice({choices})",
            *fixed, f"hydra.sweep.dir={ctx.workdir / f'sweep-{r}'}"])

    def plain() -> float:
        r = next(repeat)
        spec = {"trials": s.f_trials, "study": f"bench-plain-{r}", "storage": storage, "fixed": fixed,
                "run_dir": str(ctx.workdir / f"plain-{r}")}
        return run("plain", [sys.executable, "-m", "harness.bench", "--plain-optuna-loop", json.dumps(spec)])

    t = interleave({"sweep": sweep, "plain": plain}, budget_s=s.budget_f, min_repeats=1, max_repeats=s.f_pairs)
    if failures:
        raise RuntimeError("; ".join(failures))
    ratio = median_ratio(t["sweep"], t["plain"])
    per_trial = (statistics.median(t["sweep"]) - statistics.median(t["plain"])) / s.f_trials
    details = (f"{s.f_trials} trials, reduced config ({' '.join(s.f_overrides)}), search space "
               f"target_sparsity interval({low}, {high}) x schedule choice({choices}), TPE seed 0; "
               f"median {statistics.median(t['sweep']):.1f} s `python -m harness --multirun "
               f"hydra/sweeper=harness_optuna` vs {statistics.median(t['plain']):.1f} s plain study.optimize + "
               f"runner.run, each a fresh process (start included); {per_trial * 1e3:+.0f} ms per trial; "
               f"{len(t['sweep'])} interleaved pair(s); untimed warm-up {warm:.1f} s")
    return [result("f. sweep / plain Optuna loop", ratio, 1.25, "-", details)]


# -- g, h, i. what pruning buys: the exports ---------------------------------------------------------


def pruned_by_engine(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """``model`` pruned in one shot by the engine as configured (magnitude), masks baked in."""
    from harness.pruning import Pruning

    pruning = Pruning({"schedule": "one_shot", **spec}).attach(model, steps_per_epoch=1)
    pruning.on_epoch_begin(0)
    return pruning.finalize().eval()


def forward_arm(model: nn.Module, x: torch.Tensor) -> Callable[[], float]:
    @torch.inference_mode()
    def run() -> None:
        model(x)

    return timed(run)


def item_g(ctx: Context) -> list[Result]:
    from harness.export import sparsify_linears

    s = ctx.settings
    rows = []
    for sparsity, target in ((0.9, 0.45), (0.95, 0.25)):
        torch.manual_seed(0)
        dense = mlp(s.export_hidden).eval()
        pruned = pruned_by_engine(copy.deepcopy(dense), {"target_sparsity": sparsity})
        x = torch.randn(s.export_batch, 784)
        ours, choices = sparsify_linears(pruned, x, threads=ctx.threads)
        peer, _ = sparsify_linears(pruned, x, kinds=("csr_mkl",), min_speedup=0.0, threads=ctx.threads)
        with torch.inference_mode():
            error = max(float((ours(x) - pruned(x)).abs().max()), float((peer(x) - pruned(x)).abs().max()))
        t = interleave({"dense": forward_arm(dense, x), "ours": forward_arm(ours, x), "peer": forward_arm(peer, x)},
                       budget_s=s.budget_g, min_repeats=10, max_repeats=400, rounds=5)
        ratio, peer_ratio = median_ratio(t["ours"], t["dense"]), median_ratio(t["peer"], t["dense"])
        label = f"MLP 784-{s.export_hidden}-{s.export_hidden}-10 b{s.export_batch} {sparsity:.0%}"
        kinds = ", ".join(f"{c.name} {c.kind}" for c in choices)
        details = (f"{label}, pruned by the engine (magnitude, per tensor): forward median dense {ms(t['dense'])}, "
                   f"exported {ms(t['ours'])}, torch.sparse CSR (MKL addmm) for every layer {ms(t['peer'])}; "
                   f"layers: {kinds}; largest output difference to the masked model {error:.1e}; "
                   f"{len(t['dense'])} interleaved repeats of 5 rounds")
        rows.append(result(f"g. sparse export / dense, {label}", ratio, target,
                           f"torch.sparse CSR {peer_ratio:.3f}x", details))
    return rows


def item_h(ctx: Context) -> list[Result]:
    from harness.export import count_macs, remove_pruned_channels

    s = ctx.settings
    torch.manual_seed(0)
    dense = torchvision_model(s.surgery_model).eval()
    with torch.no_grad():  # BatchNorm statistics as after training, so that removed channels matter
        for m in dense.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
    masked = pruned_by_engine(copy.deepcopy(dense), {"target_sparsity": 0.5, "pattern": "channel"})
    x = torch.randn(s.surgery_batch, 3, s.resnet_image, s.resnet_image)
    small = remove_pruned_channels(masked, x).eval()
    with torch.inference_mode():
        error = float((small(x) - masked(x)).abs().max())
    params = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in dense.parameters())
    label = f"{s.surgery_model} b{s.surgery_batch} {s.resnet_image}x{s.resnet_image}, 50% channels"
    rows = []
    # One inference stream per core (1 thread) and one stream on every core: the smaller layers
    # gain less from a second thread than the dense ones, so the ratios differ.
    for threads in sorted({1, ctx.threads}):
        torch.set_num_threads(threads)
        try:
            t = interleave({"dense": forward_arm(dense, x), "small": forward_arm(small, x),
                            "masked": forward_arm(masked, x)}, budget_s=s.budget_h / 2, min_repeats=5,
                           max_repeats=200, rounds=3)
        finally:
            torch.set_num_threads(ctx.threads)
        ratio, masked_ratio = median_ratio(t["small"], t["dense"]), median_ratio(t["masked"], t["dense"])
        where = f"{threads} thread{'s' if threads > 1 else ''}"
        details = (f"{label}, {where} (prune=channel's selection, L1, every conv but none of the output layer): "
                   f"forward median dense {ms(t['dense'])}, channels removed {ms(t['small'])}, masked "
                   f"{ms(t['masked'])}; MACs {count_macs(dense, x)[0]:,} -> {count_macs(small, x)[0]:,}, parameters "
                   f"{params:.0%} of dense; largest output difference to the masked model {error:.1e}; "
                   f"{len(t['dense'])} interleaved repeats")
        rows.append(result(f"h. channels removed / dense, {label}, {where}", ratio, 0.6,
                           f"masked, not removed {masked_ratio:.3f}x", details))
    return rows


def item_i(ctx: Context) -> list[Result]:
    from harness.export import load_compressed, save_compressed

    s = ctx.settings
    torch.manual_seed(0)
    rows = []
    for sparsity in (0.9, 0.95):
        pruned = pruned_by_engine(mlp(s.export_hidden), {"target_sparsity": sparsity})
        state = pruned.state_dict()
        folder = ctx.workdir / f"i-{sparsity}"
        folder.mkdir(parents=True, exist_ok=True)
        report = save_compressed(pruned, folder / "compressed.pt")
        torch.save(state, folder / "dense.pt")
        torch.save({k: v.to_sparse() for k, v in state.items()}, folder / "coo.pt")
        loaded = load_compressed(folder / "compressed.pt")
        exact = all(torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)) for k, v in state.items())
        dense_bytes = (folder / "dense.pt").stat().st_size
        ratio = (folder / "compressed.pt").stat().st_size / dense_bytes
        coo = (folder / "coo.pt").stat().st_size / dense_bytes
        # The bound of a bitmask format: the non-zero values (biases included), one bit per value,
        # and 1% for the file's framing.
        density = sum(int(torch.count_nonzero(v)) for v in state.values()) / sum(v.numel() for v in state.values())
        target = round(density + 1 / 32 + 0.01, 3)
        label = f"MLP 784-{s.export_hidden}-{s.export_hidden}-10 {sparsity:.0%}"
        details = (f"{label}: files on disk, compressed {report.compressed_bytes:,} B of payload, "
                   f"{(folder / 'compressed.pt').stat().st_size:,} B file vs torch.save {dense_bytes:,} B; "
                   f"loads back bit-exact: {'yes' if exact else 'NO'}")
        rows.append(result(f"i. compressed checkpoint / torch.save, {label}", ratio if exact else math.nan, target,
                           f"torch.save of COO tensors {coo:.3f}x", details))
    return rows


# -- the command line ----------------------------------------------------------------------------

ITEMS: dict[str, tuple[str, Callable[[Context], list[Result]]]] = {
    "a": ("training-step overhead (MLP, resnet18)", item_a),
    "b": ("mask-update step (resnet18, global)", item_b),
    "c": ("global magnitude selection", item_c),
    "d": ("mask application", item_d),
    "e": ("tracking overhead", item_e),
    "f": ("sweep overhead", item_f),
    "g": ("unstructured export: sparse linear kernels", item_g),
    "h": ("channel export: channels removed", item_h),
    "i": ("compressed checkpoint", item_i),
}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def header(settings: Settings) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return "\n".join([
        f"harness.bench{' --quick' if settings.quick else ''}  {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"machine: {cpu_model()}, {os.cpu_count()} cores ({usable_cores()} usable), load average {load}",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"({torch.get_num_interop_threads()} inter-op), OMP_WAIT_POLICY={OMP_POLICY}, "
        f"python {platform.python_version()}",
        "ratios: median over interleaved repeats of the per-repeat ratio; lower is better, pass = ratio <= target",
    ])


def format_table(results: Sequence[Result]) -> str:
    rows = [("item", "ratio", "target", "result", "peer measured beside it")]
    rows += [(r.name, r.ratio_text, f"<= {r.target:g}", "pass" if r.passed else "FAIL", r.peer_text)
             for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join([row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2]),
                        row[3].ljust(widths[3]), row[4]]).rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    notes = [f"  {r.name}: {r.details}" for r in results if r.details]
    passed = sum(r.passed for r in results)
    return "\n".join([*lines, "", f"{passed} of {len(results)} targets met", "", "details:", *notes])


def format_markdown(results: Sequence[Result], head: str) -> str:
    lines = ["```", head, "```", "", "| item | ratio | target | result | peer measured beside it |",
             "|---|---:|---|---|---|"]
    lines += [f"| {r.name} | {r.ratio_text} | <= {r.target:g} | {'pass' if r.passed else '**FAIL**'} | "
              f"{r.peer_text} |" for r in results]
    lines += ["", *[f"- **{r.name}**: {r.details}" for r in results if r.details]]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and budgets: a smoke run under a minute")
    parser.add_argument("--only", default=",".join(ITEMS), help="items to run, e.g. a,c,d (default: all)")
    parser.add_argument("--markdown", type=Path, help="also write the results table as markdown to this path")
    parser.add_argument("--threads", type=int, default=usable_cores(), help="torch threads (default: usable cores)")
    parser.add_argument("--plain-optuna-loop", help=argparse.SUPPRESS)  # item f's plain arm, in its own process
    args = parser.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in args.only if x not in ITEMS]
    if unknown or not args.only:
        parser.error(f"--only {','.join(unknown) or '(empty)'}: choose from {','.join(ITEMS)}")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[Result]:
    """Run the selected items, print the header and the table; returns the results."""
    args = parse_args(argv)
    if args.plain_optuna_loop:
        plain_optuna_loop(json.loads(args.plain_optuna_loop))
        return []
    settings = Settings.quick_sizes() if args.quick else Settings()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    head = header(settings)
    print(head, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="harness-bench-"))
    ctx = Context(settings, args.threads, workdir)
    results: list[Result] = []
    started = time.perf_counter()
    try:
        for letter in args.only:
            title, fn = ITEMS[letter]
            print(f"[{time.perf_counter() - started:6.1f} s] {letter}. {title} ...", file=sys.stderr, flush=True)
            try:
                results += fn(ctx)
            except Exception as err:  # one broken item must not lose the others' numbers
                traceback.print_exc()
                results.append(Result(f"{letter}. {title}", math.nan, math.nan, False, "-",
                                      f"error: {type(err).__name__}: {str(err)[:2000]}"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        torch.set_num_threads(threads_before)
    print(f"[{time.perf_counter() - started:6.1f} s] done", file=sys.stderr, flush=True)
    print()
    print(format_table(results), flush=True)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(format_markdown(results, head))
    return results


if __name__ == "__main__":
    main()
