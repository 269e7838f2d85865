"""The sparsity frontier, three ways: the harness's sweep against what a user could do by hand.

    python -m harness.bench_frontier                          # 3 sampler seeds (tens of minutes on 2 cores)
    python -m harness.bench_frontier --skip-sweep --budget 30 --seeds 0
    python -m harness.bench_frontier --quick --skip-sweep     # a smoke run (under a minute)
    python -m harness.bench_frontier --outputs DIR --reuse-sweeps  # the sweeps of an earlier run in DIR, not re-run

One question, "what is the highest sparsity of the digits CNN that still meets the accuracy
goal (at most 1% relative drop of val accuracy against the dense baseline)?", answered on the
same data (scikit-learn digits, the harness's fixed train/val/test splits), the same model
(``digits_cnn``) and the same cached dense baseline (cached before any arm is timed, so no
arm pays for training it) by three arms:

1. the harness's sweep, ``python -m harness --multirun +sweep=max_sparsity`` with the sampler
   seed set, one subprocess per seed, timed from start to exit (process start, imports, the
   MLflow parent run, plots and confirmations included). Its answer is the confirmed best of
   ``optimization_results.yaml``: the sparsity of the trial's own run, the accuracies averaged
   over its confirmation runs. Its budget, in fine-tuning runs, is every search trial (whatever
   its state: a trial the pruner stopped early counts as a whole run) plus the confirmation runs;
2. a plain Optuna TPE loop over ``torch.nn.utils.prune``, written as a careful user would write
   it by hand (``hand_loop``): per trial, a copy of the dense model is fine-tuned with SGD and a
   cosine learning rate while ``global_unstructured`` L1 pruning rises along an AGP curve at the
   start of each epoch of the first half; ``amount`` and ``lr`` are searched, the measured
   sparsity is maximized under a constraint on the relative val drop (``trial.set_constraint``).
   It gets exactly the sweep's budget of runs (``--budget`` when the sweep is skipped, or failed);
   its answer is the sparsest trial that met the goal on val, one run, unconfirmed, timed from
   the first trial to the last. That answer is then checked, outside its budget and its time:
   the same setting (amount, lr, epochs) is fine-tuned again with 2 more fine-tuning seeds (the
   next ones after its own, as the sweep's confirmations), and the mean val and test accuracies of
   the 3 runs are reported beside the single run. When the mean misses the goal, the hand loop
   does not search further (that would exceed its budget): its answer did not hold;
3. a grid of the harness's own runs by hand, ``prune.scope=global`` at a few target sparsities,
   with the default fine-tuning recipe, with a long one (40 epochs, lr 0.1, cosine, pruning until
   epoch 16), and with the sweep's own starting recipe (the long one with distillation from the
   dense model, ``train.distill_weight=0.5``), in this process (``harness.runner.run``); its answer per recipe is the
   highest target that met the goal on val.

Every row reports test accuracy beside val, and whether the goal also holds on test (relative
drop against the dense model's test accuracy): val chose the answer, test is what it is worth.
Sparsity is always counted from the weights (exact zeros) over the conv and linear weights.

With ``--reuse-sweeps`` the sweep arm is not run: each seed's row is read from the
``<outputs>/sweep-N/optimization_results.yaml`` of an earlier run, its wall time from the
``<outputs>/sweep-N.wall`` file written after each timed sweep (or from ``--sweep-walls`` when that
file is absent; unknown otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from torch import nn
from torch.nn.utils import prune

from harness import runner
from harness.config import compose_config
from harness.experiment import dense_baseline, prepare
from harness.goal import judge
from harness.tracking import Tracker
from harness.training import evaluate, seed_everything

REPO = Path(__file__).resolve().parent.parent
GRID_SPARSITIES = (0.95, 0.97, 0.98, 0.985, 0.99, 0.995, 0.997, 0.998)
GRID_RECIPES: dict[str, dict[str, str]] = {
    "default": {},
    "long": {"train.finetune_epochs": "40", "train.finetune_lr": "0.1", "train.lr_schedule": "cosine",
             "prune.end_epoch": "16"},
    # the sweep's starting recipe (sweeps/max_sparsity.yaml): the long one, learning from the dense model too
    "long + distillation": {"train.finetune_epochs": "40", "train.finetune_lr": "0.1", "train.lr_schedule": "cosine",
                            "prune.end_epoch": "16", "train.distill_weight": "0.5"},
}
AMOUNT_RANGE = (0.5, 0.999)  # the hand loop's search space (up to the sweep's own cap)
LR_RANGE = (1e-3, 0.2)
QUICK_SWEEP_ARGS = ["hydra.sweeper.n_trials=3", "train.finetune_epochs=3", "prune.start_epoch=0", "prune.end_epoch=1"]
QUICK_GRID = {"train.finetune_epochs": "3", "prune.end_epoch": "1"}
CHECK_SEEDS = 2  # the hand loop's answer is re-run with this many more fine-tuning seeds, outside its budget


@dataclass(frozen=True)
class Settings:
    seeds: list[int]
    epochs: int  # the hand loop's fine-tuning epochs
    budget: int  # the hand loop's runs when the sweep arm gives none
    skip_sweep: bool
    sweep_args: list[str]
    reuse_sweeps: bool = False
    sweep_walls: dict[int, float] = field(default_factory=dict)  # per seed, when reused without a .wall file
    grid_sparsities: tuple[float, ...] = GRID_SPARSITIES
    grid_recipes: dict[str, dict[str, str]] = field(default_factory=lambda: dict(GRID_RECIPES))


@dataclass(frozen=True)
class Row:
    """One answer to the question: what an arm found with one sampler seed (or one grid recipe)."""

    arm: str
    seed: str
    runs: int
    wall_s: float | None  # None: unknown (a reused sweep without its wall time)
    sparsity: float | None = None  # None: nothing met the goal on val
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    goal_val: bool | None = None
    goal_test: bool | None = None
    note: str = ""
    # The answer re-run with other fine-tuning seeds: the sweep's confirmation, the hand loop's check
    # (outside its budget). mean_runs counts the answer's own run too; 0: not re-run.
    mean_runs: int = 0
    mean_val: float | None = None
    mean_test: float | None = None
    mean_goal_val: bool | None = None
    mean_goal_test: bool | None = None


# -- the shared ground: config, data, dense baseline --------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow what a harness run prints (its summary; its tqdm bar)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


@dataclass
class Dense:
    """The dense baseline every arm starts from, with the data and goal it is judged by."""

    cfg: Any
    data: Any
    model: nn.Module
    key: str
    val_accuracy: float
    test_accuracy: float
    reused: bool

    def goal_met(self, split: str, accuracy: float) -> bool:
        dense = self.val_accuracy if split == "val" else self.test_accuracy
        return judge(self.cfg.goal, dense, accuracy).met


def load_dense(outputs: Path) -> Dense:
    """The default config's dense baseline from ``outputs/baselines``, trained and cached there the
    way ``harness.runner.run`` does when absent; its val accuracy, measured here, must be the cached one."""
    cfg = compose_config(["tracking=none", f"outputs_dir={outputs}"])
    with quiet():
        exp = prepare(cfg)
        baseline = dense_baseline(exp, Tracker())
    data, model, device = exp.data, exp.model, exp.device
    val, test = evaluate(model, data.val, device), evaluate(model, data.test, device)
    assert val == baseline.val_accuracy, f"dense val accuracy {val} != cached {baseline.val_accuracy}"
    assert test == baseline.test_accuracy, f"dense test accuracy {test} != cached {baseline.test_accuracy}"
    return Dense(cfg, data, model, baseline.key, val, test, baseline.reused)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- arm 1: the harness's sweep ------------------------------------------------------------------


def sweep_command(seed: int, outputs: Path, extra: Sequence[str]) -> list[str]:
    """The sweep for one sampler seed. The seeds share one Optuna storage under ``outputs``; the sampler
    (with its seed) is part of a study's identity, so each seed runs a study of its own."""
    return [sys.executable, "-m", "harness", "--multirun", "+sweep=max_sparsity",
            f"hydra.sweeper.sampler.seed={seed}", f"outputs_dir={outputs}",
            f"hydra.sweep.dir={sweep_dir(outputs, seed)}", *extra]


def sweep_dir(outputs: Path, seed: int) -> Path:
    return outputs / f"sweep-{seed}"


def run_sweep(seed: int, outputs: Path, extra: Sequence[str], dense: Dense) -> tuple[Row, int | None]:
    """Run and time the sweep for ``seed``; its row and its budget (None when it failed)."""
    command = sweep_command(seed, outputs, extra)
    log = outputs / f"sweep-{seed}.log"
    # The default stores (under outputs), whatever the caller's environment points at.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")}
    progress(f"sweep seed {seed}: {shlex.join(command[1:])}  (log: {log})")
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    wall_file(outputs, seed).write_text(f"{wall:.3f}\n")
    results_path = sweep_dir(outputs, seed) / "optimization_results.yaml"
    if code != 0 or not results_path.exists():
        tail = " / ".join(line.strip() for line in log.read_text().strip().splitlines()[-3:])[-300:]
        return Row("sweep", str(seed), 0, wall, note=f"failed (exit {code}): {tail}"), None
    results = yaml.safe_load(results_path.read_text()) or {}
    budget = sweep_budget(results)
    return sweep_row(results, seed, wall, budget, dense), budget


def wall_file(outputs: Path, seed: int) -> Path:
    return outputs / f"sweep-{seed}.wall"


def reuse_sweep(seed: int, outputs: Path, dense: Dense, fallback_wall: float | None) -> tuple[Row, int | None]:
    """The row of the sweep for ``seed`` that an earlier run left in ``outputs``, not re-run; its wall time
    from ``sweep-N.wall``, else ``fallback_wall`` (None: unknown). Its budget is None when there is none."""
    results_path = sweep_dir(outputs, seed) / "optimization_results.yaml"
    wall = fallback_wall
    with contextlib.suppress(OSError, ValueError):
        wall = float(wall_file(outputs, seed).read_text().strip())
    if not results_path.exists():
        return Row("sweep", str(seed), 0, wall, note=f"failed (reused): no {results_path}"), None
    results = yaml.safe_load(results_path.read_text()) or {}
    budget = sweep_budget(results)
    row = sweep_row(results, seed, wall, budget, dense)
    progress(f"sweep seed {seed}: reused {results_path} (wall {'unknown' if wall is None else f'{wall:.1f} s'})")
    return dataclasses.replace(row, note=f"{row.note}; reused, not re-run"), budget


def sweep_budget(results: dict[str, Any]) -> int:
    """Fine-tuning runs the sweep spent: every search trial, whatever its state, and the confirmations."""
    trials = results.get("trials") or {}
    return sum(int(n) for n in trials.values()) + int(results.get("confirmation_runs") or 0)


def sweep_row(results: dict[str, Any], seed: int, wall: float | None, budget: int, dense: Dense) -> Row:
    """The confirmed best: its own run's sparsity, the mean accuracies of its confirmation runs."""
    best = results.get("best")
    if not best:
        return Row("sweep", str(seed), budget, wall, note="no trial met the goal")
    confirmed = best.get("confirmed") or {}
    val = confirmed.get("val_accuracy_mean", best.get("val_accuracy"))
    test = confirmed.get("test_accuracy_mean", best.get("test_accuracy"))
    dense_val = best.get("baseline_val_accuracy", dense.val_accuracy)
    dense_test = best.get("baseline_test_accuracy", dense.test_accuracy)
    runs = confirmed.get("runs") or []
    note = f"trial {best.get('number')}"
    note += (f"; mean of {len(runs)} fine-tuning seeds (val std {confirmed.get('val_accuracy_std', math.nan):.4f})"
             if runs else "; unconfirmed")
    if (dense_val, dense_test) != (dense.val_accuracy, dense.test_accuracy):
        note += f"; its dense baseline differs: val {dense_val}, test {dense_test}"

    goal_val = None if val is None else judge(dense.cfg.goal, dense_val, val).met
    goal_test = None if test is None else judge(dense.cfg.goal, dense_test, test).met
    row = Row("sweep", str(seed), budget, wall, best.get("sparsity"), val, test, goal_val, goal_test, note)
    if runs:  # its val and test are already the means of its runs
        row = dataclasses.replace(row, mean_runs=len(runs), mean_val=val, mean_test=test, mean_goal_val=goal_val,
                                  mean_goal_test=goal_test)
    return row


def sweep_epochs(outputs: Path, seed: int) -> set[int]:
    """The fine-tuning epochs the sweep's trials ran with, read from their config.yaml files, to check
    that the hand loop matches the sweep's recipe."""
    epochs = set()
    for path in sweep_dir(outputs, seed).glob("*/config.yaml"):
        with contextlib.suppress(Exception):
            epochs.add(int(yaml.safe_load(path.read_text())["train"]["finetune_epochs"]))
    return epochs


# -- arm 2: a plain Optuna loop over torch.nn.utils.prune, as a user would write it ------------------


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every conv and linear weight: the harness's default selection."""
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def agp_targets(final: float, points: int) -> list[float]:
    """Zhu & Gupta's cubic ramp to ``final``, sampled at ``points`` updates (the last reaches it)."""
    return [final * (1 - (1 - (k + 1) / points) ** 3) for k in range(points)]


def prune_to(params: list[tuple[nn.Module, str]], fraction: float) -> None:
    """Raise the global L1 sparsity of ``params`` to ``fraction`` of all their weights.

    torch's ``amount`` on an already-pruned parameter applies to the weights still remaining, so
    the step is passed as a count: the weights to prune now, on top of those already pruned.
    Importance comes from the current weights (``weight`` is recomputed only at the next forward,
    so after an optimizer step it is one step stale).
    """
    total = sum(getattr(m, n).numel() for m, n in params)
    pruned = sum(int((getattr(m, n + "_mask") == 0).sum()) for m, n in params if prune.is_pruned(m))
    count = round(fraction * total) - pruned
    if count <= 0:
        return
    scores = {(m, n): getattr(m, n + "_orig", getattr(m, n)).detach() for m, n in params}
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, importance_scores=scores,
                              amount=count)


def measured_sparsity(params: list[tuple[nn.Module, str]]) -> float:
    """Exact zeros over all weights of ``params``."""
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in params)
    return zeros / sum(getattr(m, n).numel() for m, n in params)


def base_finetune_seed(dense: Dense) -> int:
    """The fine-tuning seed of every search trial: the harness's (``train.finetune_seed_for``)."""
    return dense.cfg.train.finetune_seed_for(dense.cfg.seed)


def fine_tune_pruned(dense: Dense, amount: float, lr: float, epochs: int,
                     finetune_seed: int | None = None) -> nn.Module:
    """A copy of the dense model fine-tuned for ``epochs`` while pruned up to ``amount`` along AGP at the
    start of each epoch of the first half, then with the masks made permanent. ``finetune_seed`` (default:
    the search's, ``base_finetune_seed``) drives the fine-tuning's randomness: the data order and the RNGs."""
    model = copy.deepcopy(dense.model).train()
    params = prunable(model)
    # The same fine-tuning randomness for every trial (as the harness's trials): they differ only in
    # their parameters. A check of the answer changes only this seed.
    seed = base_finetune_seed(dense) if finetune_seed is None else finetune_seed
    seed_everything(seed)
    dense.data.train.generator.manual_seed(seed)
    loader = dense.data.train
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
    last_prune_epoch = min(epochs // 2, epochs - 1)
    targets = agp_targets(amount, last_prune_epoch + 1)
    for epoch in range(epochs):
        if epoch <= last_prune_epoch:
            prune_to(params, targets[epoch])
        for inputs, labels in loader:
            loss = nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    for m, n in params:
        prune.remove(m, n)
    return model.eval()


def hand_loop(dense: Dense, seed: int, budget: int, epochs: int) -> Row:
    """TPE over (amount, lr) for ``budget`` runs; the sparsest run that met the goal on val."""
    device = next(dense.model.parameters()).device
    max_drop = dense.cfg.goal.max_drop

    def objective(trial: optuna.Trial) -> float:
        amount = trial.suggest_float("amount", *AMOUNT_RANGE)
        lr = trial.suggest_float("lr", *LR_RANGE, log=True)
        model = fine_tune_pruned(dense, amount, lr, epochs)
        val, test = evaluate(model, dense.data.val, device), evaluate(model, dense.data.test, device)
        sparsity = measured_sparsity(prunable(model))
        drop = (dense.val_accuracy - val) / dense.val_accuracy
        trial.set_constraint("val_drop_excess", drop - max_drop)  # <= 0: feasible; TPE samples away from > 0
        trial.set_user_attr("result", {"val": val, "test": test, "met": dense.goal_met("val", val)})
        progress(f"hand loop seed {seed}: trial {trial.number + 1}/{budget} amount {amount:.4f} lr {lr:.4f} -> "
                 f"sparsity {sparsity:.4f} val {val:.4f} test {test:.4f}")
        return sparsity

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna 5 reads the trial's constraints itself (TPESampler's constraints_func is deprecated there).
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    start = time.perf_counter()
    study.optimize(objective, n_trials=budget)
    wall = time.perf_counter() - start
    met = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["result"]["met"]]
    if not met:
        return Row("hand loop", str(seed), budget, wall, note="no trial met the goal")
    best = max(met, key=lambda t: (t.value, t.user_attrs["result"]["val"]))
    result = best.user_attrs["result"]
    note = f"trial {best.number}: amount {best.params['amount']:.4f}, lr {best.params['lr']:.4f}; {len(met)} met"
    row = Row("hand loop", str(seed), budget, wall, best.value, result["val"], result["test"], True,
              dense.goal_met("test", result["test"]), note)
    return check_pick(dense, row, best.params["amount"], best.params["lr"], epochs, CHECK_SEEDS)


def check_pick(dense: Dense, row: Row, amount: float, lr: float, epochs: int, seeds: int) -> Row:
    """The hand loop's answer re-run (outside its budget and its wall time) with ``seeds`` more fine-tuning
    seeds, the ones after the search's own as in the sweep's confirmations; ``row`` with the means of all
    its runs (its own first). Nothing is searched further whatever the means show."""
    device = next(dense.model.parameters()).device
    base = base_finetune_seed(dense)
    vals, tests = [row.val_accuracy], [row.test_accuracy]
    start = time.perf_counter()
    for finetune_seed in range(base + 1, base + 1 + seeds):
        model = fine_tune_pruned(dense, amount, lr, epochs, finetune_seed)
        val, test = evaluate(model, dense.data.val, device), evaluate(model, dense.data.test, device)
        vals.append(val)
        tests.append(test)
        progress(f"hand loop seed {row.seed}: check {finetune_seed - base}/{seeds} of its pick (amount {amount:.4f} "
                 f"lr {lr:.4f}) with fine-tuning seed {finetune_seed} -> sparsity "
                 f"{measured_sparsity(prunable(model)):.4f} val {val:.4f} test {test:.4f}")
    wall = time.perf_counter() - start
    mean_val, mean_test = sum(vals) / len(vals), sum(tests) / len(tests)
    goal_val, goal_test = dense.goal_met("val", mean_val), dense.goal_met("test", mean_test)
    note = (f"{row.note}; its pick's single run, checked outside its budget with fine-tuning seeds "
            f"{base + 1}-{base + seeds} ({wall:.1f} s): val {', '.join(f'{v:.4f}' for v in vals)}; "
            f"{'holds' if goal_val else 'misses the goal'} on the mean val")
    return dataclasses.replace(row, note=note, mean_runs=len(vals), mean_val=mean_val, mean_test=mean_test,
                               mean_goal_val=goal_val, mean_goal_test=goal_test)


# -- arm 3: a grid of the harness's own runs, by hand ---------------------------------------------------


def grid(dense: Dense, outputs: Path, recipe: str, overrides: dict[str, str], sparsities: Sequence[float]) -> Row:
    """``prune.scope=global`` at each target sparsity with ``recipe``; the highest that met the goal on val."""
    fixed = [f"{k}={v}" for k, v in overrides.items()]
    runs: dict[float, Any] = {}
    start = time.perf_counter()
    for target in sparsities:
        cfg = compose_config(["prune.scope=global", f"prune.target_sparsity={target}", "tracking=none",
                       f"outputs_dir={outputs}", *fixed])
        with quiet():
            runs[target] = runner.run(cfg, outputs / "grid" / recipe / f"{target}").metrics
        m = runs[target]
        progress(f"grid {recipe}: target {target} -> sparsity {m['final/sparsity']:.4f} val {m['final/accuracy']:.4f} "
                 f"test {m['final/test_accuracy']:.4f} goal {'met' if m['goal/met'] else 'missed'}")
    wall = time.perf_counter() - start
    arm = f"grid ({recipe} recipe)"
    met = [t for t, m in runs.items() if m["goal/met"]]
    if not met:
        return Row(arm, "-", len(runs), wall, note="no target met the goal")
    m = runs[max(met)]
    if (m["baseline/accuracy"], m["baseline/test_accuracy"]) != (dense.val_accuracy, dense.test_accuracy):
        raise RuntimeError(f"grid {recipe}: the runs' dense baseline is not the bench's")
    note = f"target {max(met)}; met at {', '.join(f'{t:g}' for t in sorted(met))}"
    return Row(arm, "-", len(runs), wall, m["final/sparsity"], m["final/accuracy"], m["final/test_accuracy"], True,
               dense.goal_met("test", m["final/test_accuracy"]), note)


# -- the report ----------------------------------------------------------------------------------------


def format_markdown(rows: Sequence[Row], head: str, summary: Sequence[str]) -> str:
    def num(value: float | None, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def yes(value: bool | None) -> str:
        return "-" if value is None else ("yes" if value else "no")

    def mean(r: Row, value: float | None) -> str:
        return "-" if not r.mean_runs or value is None else f"{value:.4f} ({r.mean_runs})"

    lines = [head, "", LEGEND, "",
             "| arm | seed | runs | wall (s) | best sparsity | val acc | test acc | goal val | goal test "
             "| mean val (runs) | mean test (runs) | goal mean val | goal mean test | note |",
             "|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---|---|---|"]
    lines += [f"| {r.arm} | {r.seed} | {r.runs} | {'unknown' if r.wall_s is None else f'{r.wall_s:.1f}'} | "
              f"{num(r.sparsity)} | {num(r.val_accuracy)} | {num(r.test_accuracy)} | {yes(r.goal_val)} | "
              f"{yes(r.goal_test)} | {mean(r, r.mean_val)} | {mean(r, r.mean_test)} | "
              f"{yes(r.mean_goal_val if r.mean_runs else None)} | {yes(r.mean_goal_test if r.mean_runs else None)} | "
              f"{r.note.replace('|', '/')} |"
              for r in rows]
    return "\n".join([*lines, "", *summary]) + "\n"


LEGEND = ("runs: fine-tuning runs of the arm's budget; val/test acc: its answer as the arm reports it (the sweep: "
          "the mean over its confirmation runs; the hand loop and the grid: one run); mean val/test (runs): the "
          "answer re-run with other fine-tuning seeds, the mean over that many runs (the sweep: its own "
          f"confirmations, within its budget; the hand loop: its pick's run plus {CHECK_SEEDS} check runs, outside "
          "its budget and wall time); goal mean val/test: whether the goal holds on those means.")


def compare(rows: Sequence[Row], seeds: Sequence[int]) -> list[str]:
    """Per seed: the sweep's confirmed best against the hand loop's best whose mean over its runs (its pick
    and its check) meets the goal on val; an answer whose mean misses the goal did not hold."""
    lines = []
    for seed in seeds:
        sweep = next((r for r in rows if r.arm == "sweep" and r.seed == str(seed)), None)
        hand = next((r for r in rows if r.arm == "hand loop" and r.seed == str(seed)), None)
        if sweep is None or hand is None or sweep.note.startswith("failed"):
            lines.append(f"- seed {seed}: sweep {'skipped' if sweep is None else 'failed'}, nothing to compare")
            continue
        s, s_holds = answer(sweep, "sweep")
        h, h_holds = answer(hand, "hand loop")
        if s_holds and h_holds:
            verdict = ("the sweep's is at least as sparse" if (sweep.sparsity or 0) >= (hand.sparsity or 0)
                       else "the hand loop's is sparser")
        elif s_holds:
            verdict = "only the sweep's answer holds"
        elif h_holds:
            verdict = "only the hand loop's answer holds"
        else:
            verdict = "neither answer holds"
        lines.append(f"- seed {seed}: sweep {s} vs hand loop {h}: {verdict}")
    return lines


def answer(row: Row, arm: str) -> tuple[str, bool]:
    """An arm's answer in words, and whether it holds: its mean val over its runs meets the goal (a single
    run, not re-run, counts as not shown to hold)."""
    if row.sparsity is None:
        return "- (no answer met the goal on val)", False
    pick = "its confirmed best's" if arm == "sweep" else "its pick's"
    if not row.mean_runs or row.mean_val is None:
        return f"{row.sparsity:.4f} (one run, not re-run: val {row.val_accuracy:.4f})", False
    holds = bool(row.mean_goal_val)
    test = "meets it on test too" if row.mean_goal_test else "misses it on test"
    return (f"{row.sparsity:.4f} ({pick} {row.mean_runs}-run mean val {row.mean_val:.4f}: "
            f"{'meets the goal' if holds else 'misses the goal'}; mean test {row.mean_test:.4f}: {test})", holds)


def load_average() -> float:
    with contextlib.suppress(AttributeError, OSError):
        return os.getloadavg()[0]
    return math.nan


def header(settings: Settings, dense: Dense, outputs: Path, load_at_start: float) -> str:
    # Wall times are only comparable on an otherwise idle machine: another process on these cores
    # slows every arm several times over (OpenMP threads spin while a peer is descheduled).
    sweeps = ("sweeps reused from an earlier run in outputs (not re-run here)" if settings.reuse_sweeps
              else f"sweep args: {shlex.join(settings.sweep_args) or '(none)'}")
    return (f"## Sparsity frontier: digits_cnn, goal <= {dense.cfg.goal.max_drop:.0%} relative val drop\n\n"
            f"dense baseline {dense.key} ({'reused from cache' if dense.reused else 'trained for this bench'}): "
            f"val {dense.val_accuracy:.4f}, test {dense.test_accuracy:.4f}; "
            f"hand loop {settings.epochs} epochs per run; "
            f"grid targets {', '.join(f'{s:g}' for s in settings.grid_sparsities)}; {sweeps}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"load average {load_at_start:.2f} at the start, {load_average():.2f} at the end "
            f"(wall times assume an idle machine); outputs {outputs}")


# -- command line -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m harness.bench_frontier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="sampler seeds, one sweep and one hand loop each")
    parser.add_argument("--outputs", type=Path, help="outputs_dir of every arm (default: a fresh folder under "
                                                     "outputs/bench_frontier)")
    parser.add_argument("--skip-sweep", action="store_true", help="leave the sweep arm out")
    parser.add_argument("--reuse-sweeps", action="store_true",
                        help="do not run the sweeps: read each seed's row from <outputs>/sweep-N/"
                             "optimization_results.yaml and its wall time from <outputs>/sweep-N.wall")
    parser.add_argument("--sweep-walls", default="", help="with --reuse-sweeps: the sweeps' wall times in seconds, "
                        "one per seed of --seeds, used where no sweep-N.wall file exists")
    parser.add_argument("--budget", type=int, default=30, help="hand loop runs when the sweep gives no budget")
    parser.add_argument("--epochs", type=int, default=40, help="the hand loop's fine-tuning epochs (the sweep "
                                                               "recipe's)")
    parser.add_argument("--sweep-args", default="", help="extra overrides for every sweep, one shell-quoted string")
    parser.add_argument("--markdown", type=Path, help="also write the table to this path")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: one seed, 3-run arms, short epochs")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds}: comma-separated integers")
    if not seeds or args.budget < 1 or args.epochs < 1:
        parser.error("--seeds needs one seed at least; --budget and --epochs must be >= 1")
    if args.reuse_sweeps and args.skip_sweep:
        parser.error("--reuse-sweeps and --skip-sweep exclude each other")
    if args.reuse_sweeps and args.outputs is None:
        parser.error("--reuse-sweeps needs --outputs: the folder of the run whose sweeps are reused")
    walls: dict[int, float] = {}
    if args.sweep_walls:
        if not args.reuse_sweeps:
            parser.error("--sweep-walls needs --reuse-sweeps")
        try:
            values = [float(w) for w in args.sweep_walls.split(",")]
        except ValueError:
            parser.error(f"--sweep-walls {args.sweep_walls}: comma-separated seconds")
        if len(values) != len(seeds):
            parser.error(f"--sweep-walls: {len(values)} values for {len(seeds)} seeds ({args.seeds})")
        walls = dict(zip(seeds, values, strict=True))
    sweep_args = shlex.split(args.sweep_args)
    if args.quick:
        quick_recipes = {name: recipe | QUICK_GRID for name, recipe in GRID_RECIPES.items()}
        settings = Settings(seeds[:1], 2, 3, args.skip_sweep, [*QUICK_SWEEP_ARGS, *sweep_args], args.reuse_sweeps,
                            walls, (GRID_SPARSITIES[0], GRID_SPARSITIES[2]), quick_recipes)
    else:
        settings = Settings(seeds, args.epochs, args.budget, args.skip_sweep, sweep_args, args.reuse_sweeps, walls)
    return settings, args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Cache the dense baseline, run the arms, print (and write) the table; returns the rows."""
    settings, args = parse_args(argv)
    if args.outputs is None:  # beside the harness's own outputs (relative to the working directory)
        parent = Path("outputs/bench_frontier").resolve()
        parent.mkdir(parents=True, exist_ok=True)
        outputs = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=parent))
    else:
        outputs = args.outputs.resolve()
        outputs.mkdir(parents=True, exist_ok=True)
    load_at_start = load_average()
    progress(f"outputs: {outputs}")
    dense = load_dense(outputs)  # before any timed arm: every arm reuses it
    progress(f"dense baseline {dense.key}: val {dense.val_accuracy:.4f} test {dense.test_accuracy:.4f}")
    rows: list[Row] = []
    for seed in settings.seeds:
        budget = None
        if settings.reuse_sweeps:
            row, budget = reuse_sweep(seed, outputs, dense, settings.sweep_walls.get(seed))
        elif not settings.skip_sweep:
            row, budget = run_sweep(seed, outputs, settings.sweep_args, dense)
        if not settings.skip_sweep:
            rows.append(row)
            ran = sweep_epochs(outputs, seed)
            if not args.quick and ran and ran != {settings.epochs}:
                progress(f"warning: the sweep's trials fine-tuned for {sorted(ran)} epochs, the hand loop for "
                         f"{settings.epochs} (--epochs)")
        row = hand_loop(dense, seed, budget or settings.budget, settings.epochs)
        if budget is None and not settings.skip_sweep:
            row = dataclasses.replace(row, note=f"{row.note}; --budget runs (the sweep gave no budget)")
        rows.append(row)
    for recipe, overrides in settings.grid_recipes.items():
        rows.append(grid(dense, outputs, recipe, overrides, settings.grid_sparsities))
    text = format_markdown(rows, header(settings, dense, outputs, load_at_start), compare(rows, settings.seeds))
    print(text, flush=True)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return rows


if __name__ == "__main__":
    main()
