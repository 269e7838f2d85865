"""Per-tensor pruning sensitivity, and per-layer sparsity budgets derived from it.

Sensitivity analysis (Han et al. 2015; Distiller's "sensitivity analysis"): prune one tensor
alone, one-shot and without fine-tuning, to each of a few sparsities, and measure the accuracy
of the otherwise dense model; restore the tensor and go on to the next. A tensor whose accuracy
holds up is *robust* and can take more of the overall sparsity; a *fragile* one should take less.

:func:`allocate_budgets` turns a :class:`SensitivityTable` into one target sparsity per tensor
whose numel-weighted mean is a given overall target, and :func:`budgets_to_pruners` writes them
as ``prune.pruners`` entries for the engine. Plain PyTorch and matplotlib (imported when
plotting); no Hydra, MLflow or Optuna.

Example::

    table = analyze_sensitivity(model, None, lambda m: evaluate(m, data.val, device))
    table.save("sensitivity.json")
    budgets = allocate_budgets(table, overall_target=0.9, beta=1.0)
    spec = PruningSpec(end_epoch=4, pruners=[PrunerSpec(**p) for p in budgets_to_pruners(budgets)])
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.caches import set_aside
from harness.pruning import Criterion, Pattern, prunable_weights, select_tensors
from harness.pruning.criteria import Scorer, make_scorer
from harness.pruning.patterns import MaskPattern, Unstructured, make_pattern

__all__ = [
    "DEFAULT_SPARSITIES",
    "SensitivityTable",
    "allocate_budgets",
    "analyze_sensitivity",
    "budgets_to_pruners",
]

log = logging.getLogger(__name__)

DEFAULT_SPARSITIES: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
_FORMAT = "harness.sensitivity"
_VERSION = 1
_GRADIENT_CRITERIA = {Criterion.taylor, Criterion.snip_momentum}


# -- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SensitivityTable:
    """One-shot accuracy of the model with one tensor pruned at a time.

    Attributes:
        dense_accuracy: the accuracy of the unpruned model.
        sparsities: the sparsities measured, strictly increasing, each in [0, 1].
        accuracies: per tensor (in analysis order), the accuracy at each of ``sparsities``.
        numels: per tensor, its number of weights (the same keys, the same order).
        pattern: the pattern the tensors were pruned with (its ``repr``, e.g. ``"nm 2:4"``).
        criterion: the criterion the weights were ranked by (e.g. ``"magnitude"``).
    """

    dense_accuracy: float
    sparsities: tuple[float, ...]
    accuracies: Mapping[str, tuple[float, ...]]
    numels: Mapping[str, int]
    pattern: str = "unstructured"
    criterion: str = "magnitude"
    meta: Mapping[str, Any] = field(default_factory=dict)  # free-form, JSON-serialisable (e.g. the cache key)

    def __post_init__(self) -> None:
        # Normalise containers, so that a table equals its reloaded copy.
        object.__setattr__(self, "dense_accuracy", float(self.dense_accuracy))
        object.__setattr__(self, "sparsities", tuple(float(s) for s in self.sparsities))
        object.__setattr__(self, "accuracies",
                           {str(k): tuple(float(a) for a in v) for k, v in self.accuracies.items()})
        object.__setattr__(self, "numels", {str(k): int(v) for k, v in self.numels.items()})
        object.__setattr__(self, "meta", dict(self.meta))
        _check_accuracy("dense_accuracy", self.dense_accuracy)
        _check_sparsities(self.sparsities)
        if list(self.accuracies) != list(self.numels):
            raise ValueError(f"numels: tensors {list(self.numels)} differ from accuracies' {list(self.accuracies)}")
        if not self.accuracies:
            raise ValueError("accuracies: the table has no tensor")
        for name, values in self.accuracies.items():
            if len(values) != len(self.sparsities):
                raise ValueError(f"accuracies[{name!r}]: {len(values)} values for {len(self.sparsities)} sparsities")
            for s, a in zip(self.sparsities, values):
                _check_accuracy(f"accuracies[{name!r}] at sparsity {s:g}", a)
            if self.numels[name] < 1:
                raise ValueError(f"numels[{name!r}]={self.numels[name]}: must be >= 1")

    # -- reading ---------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The tensors, in analysis order."""
        return list(self.accuracies)

    def drops(self, name: str) -> tuple[float, ...]:
        """The accuracy drop (dense minus pruned, absolute) of ``name`` at each measured sparsity."""
        return tuple(self.dense_accuracy - a for a in self.accuracies[name])

    def drop_at(self, name: str, sparsity: float) -> float:
        """The drop of ``name`` at any ``sparsity`` in [0, 1], on the curve :func:`allocate_budgets` uses.

        That curve runs through (0, 0) (sparsity 0 is the dense model), the measured points
        with negative drops counted as 0, and, past the last measured sparsity, to (1, dense
        accuracy) (a fully pruned tensor is assumed to lose everything); it is made
        non-decreasing (each point is raised to the highest drop before it) and is linear
        between points.
        """
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity={sparsity}: must be in [0, 1]")
        xs, ys = self._curve(name)
        for k in range(len(xs) - 1):
            if sparsity <= xs[k + 1]:
                x0, x1, y0, y1 = xs[k], xs[k + 1], ys[k], ys[k + 1]
                return y0 if x1 == x0 else y0 + (y1 - y0) * (sparsity - x0) / (x1 - x0)
        return ys[-1]

    def sensitivity(self, name: str) -> float:
        """One number per tensor: its mean drop over the measured sparsities (higher: more fragile)."""
        drops = self.drops(name)
        return sum(drops) / len(drops) if drops else 0.0

    def most_sensitive(self, k: int | None = None) -> list[str]:
        """The ``k`` most fragile tensors (all when ``None``), most fragile first.

        Ranked by :meth:`sensitivity` (the mean drop over the measured sparsities), ties by the
        drop at the highest sparsity, then by analysis order.
        """
        order = {name: i for i, name in enumerate(self.names)}
        ranked = sorted(self.names, key=lambda n: (-self.sensitivity(n), -self.drops(n)[-1], order[n]))
        return ranked if k is None else ranked[: max(0, k)]

    def subset(self, names: Iterable[str]) -> SensitivityTable:
        """The same table restricted to ``names`` (e.g. to leave a tensor out of the budgets)."""
        names = list(names)
        unknown = [n for n in names if n not in self.accuracies]
        if unknown:
            raise ValueError(f"names: {unknown[0]!r} is not in the table; it has {', '.join(self.names)}")
        return SensitivityTable(self.dense_accuracy, self.sparsities, {n: self.accuracies[n] for n in names},
                                {n: self.numels[n] for n in names}, self.pattern, self.criterion, self.meta)

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per tensor and sparsity: tensor, numel, sparsity, accuracy, drop (for a CSV)."""
        return [
            {"tensor": name, "numel": self.numels[name], "sparsity": s, "accuracy": a,
             "drop": self.dense_accuracy - a}
            for name, values in self.accuracies.items()
            for s, a in zip(self.sparsities, values)
        ]

    def write_csv(self, path: str | os.PathLike) -> Path:
        """:meth:`to_rows` as a CSV file (accuracy and drop to 6 decimals); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["tensor", "numel", "sparsity", "accuracy", "drop"])
            writer.writeheader()
            for row in self.to_rows():
                writer.writerow(row | {"sparsity": f"{row['sparsity']:g}", "accuracy": f"{row['accuracy']:.6f}",
                                       "drop": f"{row['drop']:.6f}"})
        return path

    def format(self) -> str:
        """A text table: one line per tensor, one column of accuracy per sparsity, dense first."""
        name_w = max(len("tensor"), *(len(n) for n in self.names))
        head = f"{'tensor':<{name_w}}  {'params':>10}  " + "  ".join(f"{s:>7.2f}" for s in self.sparsities)
        lines = [head, f"{'(dense)':<{name_w}}  {'':>10}  " + "  ".join(
            f"{self.dense_accuracy:>7.4f}" for _ in self.sparsities)]
        for name, values in self.accuracies.items():
            lines.append(f"{name:<{name_w}}  {self.numels[name]:>10,}  " + "  ".join(f"{a:>7.4f}" for a in values))
        return "\n".join(lines)

    # -- saving ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "dense_accuracy": self.dense_accuracy,
            "sparsities": list(self.sparsities),
            "pattern": self.pattern,
            "criterion": self.criterion,
            "meta": dict(self.meta),
            "tensors": [{"name": n, "numel": self.numels[n], "accuracies": list(v)}
                        for n, v in self.accuracies.items()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityTable:
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise ValueError(f"not a sensitivity table of version {_VERSION}: "
                             f"format={data.get('format')!r}, version={data.get('version')!r}")
        tensors = data["tensors"]
        return cls(
            dense_accuracy=data["dense_accuracy"],
            sparsities=tuple(data["sparsities"]),
            accuracies={t["name"]: tuple(t["accuracies"]) for t in tensors},
            numels={t["name"]: t["numel"] for t in tensors},
            pattern=data["pattern"],
            criterion=data["criterion"],
            meta=data.get("meta", {}),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table as JSON, atomically (a cache read beside it never sees half a file).

        Floats are written with ``repr`` precision, so :meth:`load` gives back an equal table.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityTable:
        """Read a table written by :meth:`save`; ``ValueError`` if the file is not one."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not a sensitivity table ({err})") from None
        return cls.from_dict(data)

    # -- plotting --------------------------------------------------------------------------

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Accuracy against sparsity, one line per tensor, the dense accuracy dashed.

        The x axis is on a density log scale (``-log10(1 - s)``), so that 0.9, 0.95 and 0.98
        are apart; ticks sit at the measured sparsities. Lines use 20 distinct colours (the
        first ten the strongest) with markers cycling on top, and a new line style every 20;
        the legend, most fragile first and giving each tensor's size, sits outside on the right.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        eps = 1e-4

        def forward(s: Any) -> Any:
            return -np.log10(np.clip(1.0 - np.asarray(s, dtype=float), eps, None))

        def inverse(y: Any) -> Any:
            return 1.0 - np.power(10.0, -np.asarray(y, dtype=float))

        names = self.most_sensitive()
        n = len(names)
        fig, ax = plt.subplots(figsize=(10 if n <= 20 else 12, 5.5))
        cmap = plt.get_cmap("tab20")
        colours = [cmap(j) for j in (*range(0, 20, 2), *range(1, 20, 2))]  # 10 strong colours, then their light pairs
        markers = "os^vD<>pPX*h"
        styles = ["-", "--", "-.", ":"]
        xs = [min(s, 1.0 - eps) for s in self.sparsities]
        for i, name in enumerate(names):
            ax.plot(xs, self.accuracies[name], linestyle=styles[(i // 20) % len(styles)],
                    marker=markers[i % len(markers)], ms=4, lw=1.3, color=colours[i % 20],
                    label=f"{name} ({_short_count(self.numels[name])})")
        ax.axhline(self.dense_accuracy, color="black", linestyle="--", lw=1.2,
                   label=f"dense ({self.dense_accuracy:.4f})")
        ax.set_xscale("function", functions=(forward, inverse))
        ax.set_xticks(xs, [f"{s:g}" for s in self.sparsities])
        ax.set_xlim(float(inverse(forward(xs[0]) - 0.08)), float(inverse(forward(xs[-1]) + 0.08)))
        low = min(min(v) for v in self.accuracies.values())
        ax.set_ylim(max(0.0, low - 0.03), min(1.02, max(self.dense_accuracy, *map(max, self.accuracies.values()))
                                              + 0.03))
        ax.set_xlabel("sparsity of the one pruned tensor (density log scale)")
        ax.set_ylabel("accuracy")
        ax.set_title(title or f"one-shot sensitivity ({self.pattern}, {self.criterion}; no fine-tuning)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7 if n <= 20 else 6,
                  ncol=1 if n <= 24 else 2, frameon=False, title="most fragile first", title_fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return path

    # -- internals -------------------------------------------------------------------------

    def _curve(self, name: str) -> tuple[list[float], list[float]]:
        """The non-decreasing, piecewise-linear drop curve of ``name`` from (0, 0) to (1, ...)."""
        points = {0.0: 0.0}
        for s, d in zip(self.sparsities, self.drops(name)):
            if s > 0.0:
                points[s] = max(0.0, d)
        if 1.0 not in points:
            points[1.0] = max(self.dense_accuracy, 0.0)
        xs = sorted(points)
        ys, top = [], 0.0
        for x in xs:
            top = max(top, points[x])
            ys.append(top)
        return xs, ys


def _short_count(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _check_accuracy(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{key}={value}: an accuracy must be in [0, 1]")


def _check_sparsities(sparsities: Sequence[float]) -> None:
    if not sparsities:
        raise ValueError("sparsities=(): list at least one sparsity")
    for s in sparsities:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"sparsities: {s}: must be in [0, 1]")
    if any(b <= a for a, b in pairwise(sparsities)):
        raise ValueError(f"sparsities={list(sparsities)}: must be strictly increasing")


# -- the analysis ------------------------------------------------------------------------------


def analyze_sensitivity(
    model: nn.Module,
    names: Sequence[str] | None,
    evaluate_fn: Callable[[nn.Module], float],
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    pattern: MaskPattern | Pattern | str | None = None,
    criterion: Criterion | str | Scorer = "magnitude",
    progress: Callable[[str, float, float], None] | None = None,
) -> SensitivityTable:
    """Prune each tensor alone, one-shot, to each sparsity, and measure the accuracy.

    For every tensor: score it once (from its dense weights), then for each sparsity zero the
    lowest-scored units of the pattern (as the engine's ``MaskPattern.mask`` selects them, from
    an all-ones mask), call ``evaluate_fn(model)`` and put the original values back; no
    fine-tuning. The dense accuracy is measured once, first. Every weight is restored, also
    when ``evaluate_fn`` raises, so the model leaves as it came (``evaluate_fn`` itself must
    not train it). Cost: ``1 + len(names) * len(sparsities)`` evaluations.

    Args:
        model: the trained dense model (on any device).
        names: the tensors to analyse: exact parameter names, globs or ``re:`` regexes as in
            ``prune.names``; ``None``: every conv and linear weight.
        evaluate_fn: ``model -> accuracy in [0, 1]``; pass the val split (never test).
        sparsities: the sparsities to measure, each in [0, 1]; sorted and deduplicated.
        pattern: a ``MaskPattern`` or a pattern name (``unstructured``, ``nm``, ``block``,
            ``channel``, with their default parameters); default unstructured.
        criterion: ``magnitude`` or ``random`` by name, or a ``Scorer``. Gradient criteria
            (``taylor``, ``snip_momentum``) need a scorer that has observed training steps;
            by name they are refused rather than silently ranked by magnitude.
        progress: optional ``progress(tensor, sparsity, accuracy)`` after each measurement.

    Returns:
        A :class:`SensitivityTable`.

    Raises:
        ValueError: a sparsity out of range, an unknown tensor name, a pattern that cannot
            take a tensor, a gradient criterion by name, an accuracy outside [0, 1].
    """
    sparsities = sorted({float(s) for s in sparsities})
    _check_sparsities(sparsities)
    pattern_obj = Unstructured() if pattern is None else (
        pattern if isinstance(pattern, MaskPattern) else make_pattern(pattern))
    scorer, criterion_name = _scorer(criterion)
    named = dict(model.named_parameters())
    chosen = select_tensors(None if names is None else list(names), None, named, list(prunable_weights(model)))
    for name in chosen:
        pattern_obj.check(name, named[name].shape)

    dense = _accuracy(evaluate_fn(model), "evaluate_fn(model) on the dense model")
    log.info("sensitivity: dense accuracy %.4f; %d tensors x %d sparsities", dense, len(chosen), len(sparsities))
    accuracies: dict[str, tuple[float, ...]] = {}
    for name in chosen:
        param = named[name]
        original = param.detach().clone()
        scores = scorer.scores(name, param)
        ones = torch.ones_like(param, memory_format=torch.contiguous_format)
        measured = []
        started = time.perf_counter()
        try:
            for s in sparsities:
                with torch.no_grad():
                    param.mul_(pattern_obj.mask(scores, s, ones).to(param.dtype))
                accuracy = _accuracy(evaluate_fn(model), f"evaluate_fn(model) with {name} at sparsity {s:g}")
                with torch.no_grad():
                    param.copy_(original)
                measured.append(accuracy)
                if progress is not None:
                    progress(name, s, accuracy)
        finally:
            with torch.no_grad():
                param.copy_(original)
        accuracies[name] = tuple(measured)
        log.info("sensitivity: %s (%d weights): %s  [%.1fs]", name, param.numel(),
                 " ".join(f"{s:g}:{a:.4f}" for s, a in zip(sparsities, measured)), time.perf_counter() - started)
    return SensitivityTable(dense, tuple(sparsities), accuracies, {n: named[n].numel() for n in chosen},
                            repr(pattern_obj), criterion_name)


def _scorer(criterion: Criterion | str | Scorer) -> tuple[Scorer, str]:
    if isinstance(criterion, Scorer):
        return criterion, repr(criterion)
    scorer = make_scorer(criterion)  # validates the name
    value = Criterion(criterion)
    if value in _GRADIENT_CRITERIA:
        raise ValueError(f"criterion={value.value}: ranks by gradients, which a one-shot analysis has not seen; "
                         "pass a Scorer that has observed training steps, or use magnitude or random")
    return scorer, value.value


def _accuracy(value: Any, what: str) -> float:
    accuracy = float(value)
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"{what} returned {value!r}: an accuracy must be in [0, 1]")
    return accuracy


# -- budgets -----------------------------------------------------------------------------------


def allocate_budgets(
    table: SensitivityTable,
    overall_target: float,
    max_sparsity: float = 0.99,
    min_sparsity: float = 0.0,
    beta: float = 1.0,
) -> dict[str, float]:
    """One target sparsity per tensor: the robust ones pruned more, the mean exactly ``overall_target``.

    Method (a common accuracy-drop threshold, as in Han et al. 2015's sensitivity-based
    thresholds, solved for a size budget):

    1. Each tensor's drop curve ``d_i(s)`` is the table's, interpolated linearly between the
       measured sparsities, through (0, 0) and on to (1, dense accuracy), with negative drops
       counted as 0 and made non-decreasing (:meth:`SensitivityTable.drop_at`).
    2. For a threshold ``t``, tensor ``i`` gets ``s_i(t)``: the largest sparsity whose drop
       is ``<= t``, clipped to ``[min_sparsity, max_sparsity]``. Every ``s_i(t)`` is
       non-decreasing in ``t``, and so is the weighted mean ``S(t) = sum(n_i s_i(t)) / sum(n_i)``.
    3. ``t`` is bisected, keeping ``S(t_lo) <= overall_target <= S(t_hi)``, until
       ``t_hi - t_lo <= 1e-13``; where ``S`` jumps (curves flat at one drop, e.g. several tensors with no
       drop at all up to some sparsity) the answer is ``a + lam * (b - a)`` with
       ``a = s(t_lo)``, ``b = s(t_hi)`` and the one ``lam`` in [0, 1] that meets the target.
       This is deterministic, and a tensor whose curve lies nowhere above another's gets at
       least its sparsity.
    4. ``beta`` blends with the uniform allocation: ``(1 - beta) * overall_target + beta * s_i``.
       Both terms have the weighted mean ``overall_target``, so the blend has it too, and it
       stays within the bounds; ``beta=0`` is uniform, ``beta=1`` fully sensitivity-driven.

    The drops are those of one tensor pruned alone without fine-tuning; they rank the tensors
    but do not predict the accuracy of all of them pruned together and fine-tuned.

    Args:
        table: from :func:`analyze_sensitivity` (use :meth:`SensitivityTable.subset` to leave
            tensors out).
        overall_target: the numel-weighted mean sparsity to reach, in ``[min_sparsity, max_sparsity]``.
        max_sparsity: the most any tensor gets, < 1 (the engine's targets must be below 1).
        min_sparsity: the least any tensor gets, >= 0.
        beta: in [0, 1], how far to follow the sensitivities (0: uniform).

    Returns:
        ``{tensor: sparsity}`` in table order; ``sum(numel * s) / sum(numel) == overall_target``
        to about 1e-12.

    Raises:
        ValueError: naming the value, when a bound or ``beta`` is out of range or the target
            is infeasible (outside ``[min_sparsity, max_sparsity]``).
    """
    for key, value in (("overall_target", overall_target), ("max_sparsity", max_sparsity),
                       ("min_sparsity", min_sparsity), ("beta", beta)):
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
            raise ValueError(f"{key}={value!r}: must be a number")
    if not 0.0 <= min_sparsity < 1.0:
        raise ValueError(f"min_sparsity={min_sparsity}: must be in [0, 1)")
    if not min_sparsity <= max_sparsity < 1.0:
        raise ValueError(f"max_sparsity={max_sparsity}: must be in [min_sparsity={min_sparsity}, 1)")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta}: must be in [0, 1] (0: uniform, 1: fully sensitivity-driven)")
    if overall_target > max_sparsity:
        raise ValueError(f"overall_target={overall_target}: infeasible, above max_sparsity={max_sparsity}")
    if overall_target < min_sparsity:
        raise ValueError(f"overall_target={overall_target}: infeasible, below min_sparsity={min_sparsity}")

    names = table.names
    weights = [table.numels[n] for n in names]
    total = float(sum(weights))
    curves = [table._curve(n) for n in names]

    def sparsities_at(t: float) -> list[float]:
        return [min(max_sparsity, max(min_sparsity, _largest_within(xs, ys, t))) for xs, ys in curves]

    def mean(values: list[float]) -> float:
        return math.fsum(w * v for w, v in zip(weights, values)) / total

    t_lo, t_hi = -1.0, max(ys[-1] for _, ys in curves) + 1.0
    lo_values, hi_values = sparsities_at(t_lo), sparsities_at(t_hi)  # all min_sparsity, all max_sparsity
    for _ in range(200):  # about 45 halvings reach the width below
        mid = (t_lo + t_hi) / 2.0
        if t_hi - t_lo <= 1e-13 or not t_lo < mid < t_hi:
            break
        values = sparsities_at(mid)
        if mean(values) >= overall_target:
            t_hi, hi_values = mid, values
        else:
            t_lo, lo_values = mid, values
    s_lo, s_hi = mean(lo_values), mean(hi_values)
    lam = 1.0 if s_hi <= s_lo else min(1.0, max(0.0, (overall_target - s_lo) / (s_hi - s_lo)))
    driven = [a + lam * (b - a) for a, b in zip(lo_values, hi_values)]
    blended = [(1.0 - beta) * overall_target + beta * s for s in driven]
    return {n: min(max_sparsity, max(min_sparsity, s)) for n, s in zip(names, blended)}


def _largest_within(xs: list[float], ys: list[float], t: float) -> float:
    """The largest x in [0, 1] with curve(x) <= t on a non-decreasing piecewise-linear curve; 0 if none."""
    if t < ys[0]:
        return 0.0
    k = 0
    while k + 1 < len(xs) and ys[k + 1] <= t:
        k += 1
    if k + 1 == len(xs):
        return xs[-1]
    return xs[k] + (t - ys[k]) / (ys[k + 1] - ys[k]) * (xs[k + 1] - xs[k])


def budgets_to_pruners(budgets: Mapping[str, float], **fields: Any) -> list[dict[str, Any]]:
    """``prune.pruners`` entries, one per tensor: ``{"names": [name], "target_sparsity": s}``.

    ``fields`` (e.g. ``initial_sparsity=0.0``) are added to every entry. The entries give exact
    names, so each tensor gets its own pruner; the other fields inherit the global ones (note
    that a global ``initial_sparsity`` or ``max_sparsity`` must not exceed a tensor's budget).
    Use as ``PruningSpec(..., pruners=[PrunerSpec(**p) for p in budgets_to_pruners(budgets)])``.

    Raises:
        ValueError: a budget outside [0, 1), naming the tensor and the value.
    """
    entries = []
    for name, value in budgets.items():
        value = float(value)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"budgets[{name!r}]={value}: a target sparsity must be in [0, 1)")
        entries.append({"names": [name], "target_sparsity": value, **fields})
    return entries


def cached_sensitivity(
    model: nn.Module,
    names: Sequence[str] | None,
    evaluate_fn: Callable[[nn.Module], float],
    sparsities: Sequence[float],
    cache_dir: Path,
    baseline_key: str,
    pattern: MaskPattern | Pattern | str | None = None,
) -> tuple[SensitivityTable, Path, bool]:
    """:func:`analyze_sensitivity`, cached beside the dense baseline it measured.

    The cache file is keyed by the baseline's key, the tensors, the sparsities and the pattern;
    returns the table, its file, and whether it was reused.
    """
    what = json.dumps({"names": list(names) if names is not None else None,
                       "sparsities": [float(s) for s in sparsities], "pattern": str(pattern)}, sort_keys=True)
    path = Path(cache_dir) / f"{baseline_key}-{hashlib.sha256(what.encode()).hexdigest()[:12]}.json"
    if path.exists():
        try:
            return SensitivityTable.load(path), path, True
        except Exception as err:  # whatever fails to read our own cache means it is damaged: measure again
            set_aside(path, f"{type(err).__name__}: {err}"[:200])
    table = analyze_sensitivity(model, names, evaluate_fn, sparsities, pattern=pattern)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.save(path)
    return table, path, False
