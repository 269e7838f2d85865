"""What a finished sweep reports: the best trial (or the Pareto front) with val and test
accuracy and the command that reproduces it, ``optimization_results.yaml``, and plots."""

from __future__ import annotations

import csv
import html
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from harness.config import GoalConfig, GoalCriterion
from harness.metrics import (
    BASELINE_ACCURACY,
    BASELINE_TEST_ACCURACY,
    FINAL_ACCURACY,
    FINAL_SPARSITY,
    FINAL_TEST_ACCURACY,
)
from harness.sweep.command import trial_command
from harness.sweep.confirm import Candidate
from harness.sweep.identity import StudyIdentity
from harness.sweep.pruners import is_feasible
from harness.sweep.space import SearchSpace


@dataclass(frozen=True)
class Chosen:
    """A trial the sweep recommends, with what the user needs to act on it."""

    number: int
    params: dict[str, Any]
    values: list[float]
    metrics: dict[str, float]
    command: str
    mlflow_run_id: str | None
    confirmation: Candidate | None = None  # its runs with other fine-tuning seeds, when confirmed


def chosen_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trial, or the feasible Pareto front for several objectives."""
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.number)
    try:
        return [study.best_trial]
    except ValueError:  # nothing complete, or nothing meets the accuracy goal
        return []


def describe(study: optuna.Study, space: SearchSpace, base: list[str], confirmed: list[Candidate],
             best: Candidate | None) -> list[Chosen]:
    """The recommended trials with their commands: the confirmed best when candidates were confirmed,
    else the best feasible trial or the Pareto front."""
    trials = ([best.trial] if best else []) if confirmed else chosen_trials(study)
    chosen = []
    for trial in trials:
        command = trial_command(base, space.to_overrides({**trial.params, **space.fixed}))
        chosen.append(Chosen(trial.number, dict(trial.params), list(trial.values or []),
                             dict(trial.user_attrs.get("metrics", {})), command,
                             trial.user_attrs.get("mlflow_run_id"), best if confirmed else None))
    return chosen


def write_results(path: Path, study: optuna.Study, chosen: list[Chosen], identity: StudyIdentity,
                  confirmed: list[Candidate]) -> None:
    """``optimization_results.yaml``, shaped like the published Optuna sweeper's, plus val/test accuracy,
    the confirmation runs and the command for each recommended trial."""
    def entry(c: Chosen) -> dict[str, Any]:
        item = {"number": c.number, "params": c.params, "values": c.values,
                "sparsity": c.metrics.get(FINAL_SPARSITY),
                "val_accuracy": c.metrics.get(FINAL_ACCURACY),
                "test_accuracy": c.metrics.get(FINAL_TEST_ACCURACY),
                "baseline_val_accuracy": c.metrics.get(BASELINE_ACCURACY),
                "baseline_test_accuracy": c.metrics.get(BASELINE_TEST_ACCURACY)}
        if c.confirmation is not None:
            item["confirmed"] = c.confirmation.summary()
        return item | {"command": c.command}

    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    # "name": the published plugin's key and value; "sweeper": this project's sweeper.
    results: dict[str, Any] = {"name": "optuna", "sweeper": "harness_optuna", "study": study.study_name,
                               "trials": {k: v for k, v in states.items() if v}}
    if len(study.directions) > 1:
        results["solutions"] = [entry(c) for c in chosen]
    elif chosen:
        results |= {"best_params": chosen[0].params, "best_value": chosen[0].values[0], "best": entry(chosen[0])}
    else:  # nothing meets the accuracy goal (on the mean of its runs, when confirmed): no best to report
        results |= {"best_params": None, "best_value": None, "best": None}
    if confirmed:
        results["candidates"] = [{"number": c.trial.number,
                                  "sparsity": c.trial.user_attrs.get("metrics", {}).get(FINAL_SPARSITY), **c.summary()}
                                 for c in confirmed]
        results["confirmation_runs"] = sum(len(c.runs) - 1 for c in confirmed)
    results["identity"] = {"digest": identity.digest(), **identity.as_dict()}
    path.write_text(yaml.safe_dump(_plain(results), sort_keys=False))


def write_confirmations_csv(path: Path, confirmed: list[Candidate]) -> Path:
    """One row per run of each confirmed candidate (the trial's own run first)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "finetune_seed", "original", "sparsity", "val_accuracy", "test_accuracy",
                         "mlflow_run_id", "error"])
        for c in confirmed:
            for r in c.runs:
                writer.writerow([c.trial.number, r.finetune_seed, r.original, r.sparsity, r.val_accuracy,
                                 r.test_accuracy, r.mlflow_run_id or "", r.error or ""])
    return path


def plot_all(study: optuna.Study, chosen: list[Chosen], folder: Path, goal: GoalConfig | None,
             commands: dict[int, str] | None = None) -> list[Path]:
    """Optimization history, accuracy against sparsity (goal line, chosen trials; also as an interactive
    page, ``accuracy_vs_sparsity.html``, whose points show each trial's ``commands`` entry), importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    files = []
    if complete:
        path = folder / "accuracy_vs_sparsity.png"
        _plot_frontier(plt, study, complete, chosen, path, goal)
        files.append(path)
        files.append(write_frontier_html(study, complete, chosen, folder / "accuracy_vs_sparsity.html", goal,
                                         commands or {}))
    if len(study.directions) == 1 and complete:
        ax = optuna.visualization.matplotlib.plot_optimization_history(study)
        files.append(_save(plt, ax, folder / "optimization_history.png"))
    if len(complete) >= 2 and study.trials[0].params:
        try:
            target = None if len(study.directions) == 1 else (lambda t: t.values[0])
            ax = optuna.visualization.matplotlib.plot_param_importances(study, target=target)
            files.append(_save(plt, ax, folder / "param_importances.png"))
        except (RuntimeError, ValueError, ZeroDivisionError):
            pass  # importances need trials that differ in their params
    return files


def goal_line(goal: GoalConfig, baseline: float) -> float:
    """The lowest val accuracy that meets the goal against ``baseline``."""
    return baseline * (1 - goal.max_drop) if goal.criterion == GoalCriterion.relative else baseline - goal.max_drop


def write_frontier_html(study: optuna.Study, complete: list[FrozenTrial], chosen: list[Chosen], path: Path,
                        goal: GoalConfig | None, commands: dict[int, str]) -> Path:
    """Accuracy against sparsity as one self-contained page (inline SVG and a few lines of script, nothing
    fetched): a point per complete trial; hovering (or clicking) one shows its number, sparsity, val and test
    accuracy and the command that reproduces it. The goal line, the dense baseline, the chosen trials."""
    width, height, left, right, top, bottom = 640, 380, 60, 20, 20, 50
    best = {c.number for c in chosen}
    points = [(t, _metric(t, FINAL_SPARSITY), _metric(t, FINAL_ACCURACY)) for t in complete]
    points = [(t, x, y) for t, x, y in points if x == x and y == y]  # nan: no metrics recorded
    baselines = [b for t in complete if (b := _metric(t, BASELINE_ACCURACY)) == b]
    base = max(baselines) if baselines else None
    threshold = goal_line(goal, base) if goal is not None and base is not None else None
    ys = [y for _, _, y in points] + [v for v in (base, threshold) if v is not None]
    xs = [x for _, x, _ in points]
    x0, x1 = _span(xs or [0.0, 1.0])
    y0, y1 = _span(ys or [0.0, 1.0])

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="val accuracy against final sparsity">',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           'fill="#fff" stroke="#999"/>']
    for i in range(6):
        gx, gy = x0 + (x1 - x0) * i / 5, y0 + (y1 - y0) * i / 5
        svg.append(f'<line x1="{px(gx):.1f}" y1="{top}" x2="{px(gx):.1f}" y2="{height - bottom}" stroke="#eee"/>'
                   f'<text x="{px(gx):.1f}" y="{height - bottom + 16}" text-anchor="middle" '
                   f'font-size="11">{gx:.3f}</text>')
        svg.append(f'<line x1="{left}" y1="{py(gy):.1f}" x2="{width - right}" y2="{py(gy):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{py(gy) + 4:.1f}" text-anchor="end" font-size="11">{gy:.3f}</text>')
    svg.append(f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle" font-size="12">'
               'final sparsity (counted from the weights)</text>')
    svg.append(f'<text transform="translate(14 {(top + height - bottom) / 2}) rotate(-90)" text-anchor="middle" '
               'font-size="12">val accuracy</text>')
    legend = []
    if threshold is not None and goal is not None:
        svg.append(f'<line x1="{left}" y1="{py(threshold):.1f}" x2="{width - right}" y2="{py(threshold):.1f}" '
                   'stroke="#555" stroke-dasharray="6 4"/>')
        legend.append(f'<span class="sw goal"></span>accuracy goal ({goal.criterion.value} drop '
                      f'{goal.max_drop:g}): {threshold:.4f}')
    if base is not None:
        svg.append(f'<line x1="{left}" y1="{py(base):.1f}" x2="{width - right}" y2="{py(base):.1f}" '
                   'stroke="#555" stroke-dasharray="2 3"/>')
        legend.append(f'<span class="sw base"></span>dense baseline: {base:.4f}')
    rows = []
    for trial, x, y in sorted(points, key=lambda p: p[0].number):
        test = _metric(trial, FINAL_TEST_ACCURACY)
        name = f"t{trial.number:02d}"
        ok = is_feasible(trial)
        command = commands.get(trial.number, "")
        info = (f"trial {trial.number} ({name}){' - best' if trial.number in best else ''}\n"
                f"sparsity {x:.4f}, val {y:.4f}, test {test:.4f}, goal {'met' if ok else 'missed'}"
                + (f"\nreproduce: {command}" if command else ""))
        colour = "crimson" if trial.number in best else ("#1f77b4" if ok else "#888")
        radius = 8 if trial.number in best else 5
        shape = (f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{radius}" fill="{colour}" fill-opacity="0.85"/>'
                 if ok else
                 f'<path d="M{px(x) - 5:.1f} {py(y) - 5:.1f}l10 10m0 -10l-10 10" stroke="{colour}" '
                 'stroke-width="2.5"/>')
        svg.append(f'<g class="pt" data-info="{html.escape(info)}" tabindex="0"><title>{html.escape(info)}</title>'
                   f'{shape}<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="10" fill="transparent"/></g>')
        rows.append(f"<tr><td>{name}</td><td>{x:.4f}</td><td>{y:.4f}</td><td>{test:.4f}</td>"
                    f"<td>{'met' if ok else 'missed'}{' (best)' if trial.number in best else ''}</td>"
                    f"<td><code>{html.escape(command)}</code></td></tr>")
    svg.append("</svg>")
    legend += ['<span class="sw ok"></span>meets the goal', '<span class="sw miss">&#215;</span>misses the goal',
               f'<span class="sw best"></span>{"Pareto front" if len(study.directions) > 1 else "best trial"}']
    title = f"Study {html.escape(study.study_name)}: accuracy against sparsity"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #222; }}
.wrap {{ display: flex; gap: 16px; align-items: flex-start; flex-wrap: wrap; }}
.legend div {{ margin: 4px 0; font-size: 13px; }}
.sw {{ display: inline-block; width: 18px; margin-right: 6px; text-align: center; color: #888; }}
.sw.goal {{ border-top: 2px dashed #555; height: 0; vertical-align: middle; }}
.sw.base {{ border-top: 2px dotted #555; height: 0; vertical-align: middle; }}
.sw.ok {{ width: 10px; height: 10px; border-radius: 50%; background: #1f77b4; margin: 0 10px 0 4px; }}
.sw.best {{ width: 14px; height: 14px; border-radius: 50%; background: crimson; margin: 0 8px 0 2px; }}
#info {{ white-space: pre-wrap; font-family: monospace; font-size: 12px; background: #f6f6f6; padding: 8px;
  min-height: 4em; max-width: 900px; word-break: break-all; }}
.pt {{ cursor: pointer; }} .pt:hover circle:first-child, .pt:focus circle:first-child {{ stroke: #000; }}
table {{ border-collapse: collapse; font-size: 12px; margin-top: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: left; }}
</style></head><body>
<h3>{title}</h3>
<div class="wrap">{"".join(svg)}
<div class="legend">{"".join(f"<div>{item}</div>" for item in legend)}</div></div>
<p>Hover over (or click) a point: its trial, metrics and the command that reproduces it.</p>
<div id="info"></div>
<table><tr><th>trial</th><th>sparsity</th><th>val accuracy</th><th>test accuracy</th><th>goal</th>
<th>reproduce</th></tr>{"".join(rows)}</table>
<script>
var info = document.getElementById("info");
document.querySelectorAll(".pt").forEach(function (p) {{
  var show = function () {{ info.textContent = p.getAttribute("data-info"); }};
  p.addEventListener("mouseenter", show); p.addEventListener("click", show); p.addEventListener("focus", show);
}});
</script>
</body></html>
"""
    path.write_text(page)
    return path


def _span(values: list[float]) -> tuple[float, float]:
    """The axis range around ``values``, with a margin."""
    low, high = min(values), max(values)
    pad = (high - low) * 0.08 or 0.05
    return low - pad, high + pad


def _plot_frontier(plt: Any, study: optuna.Study, complete: list[FrozenTrial], chosen: list[Chosen],
                   path: Path, goal: GoalConfig | None) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    feasible = [t for t in complete if is_feasible(t)]
    missed = [t for t in complete if t not in feasible]
    for trials, style, label in ((feasible, "o", "meets the goal"), (missed, "x", "misses the goal")):
        if trials:
            ax.plot([_metric(t, FINAL_SPARSITY) for t in trials], [_metric(t, FINAL_ACCURACY) for t in trials],
                    style, label=label, alpha=0.8)
    baselines = [_metric(t, BASELINE_ACCURACY) for t in complete]
    if goal is not None and baselines:
        base = max(baselines)
        relative = goal.criterion == GoalCriterion.relative
        ax.axhline(base * (1 - goal.max_drop) if relative else base - goal.max_drop, color="gray", ls="--",
                   label=f"accuracy goal ({'relative' if relative else 'absolute'} drop {goal.max_drop:g})")
        ax.axhline(base, color="gray", ls=":", label="dense baseline")
    front = sorted((c.metrics.get(FINAL_SPARSITY, 0.0), c.metrics.get(FINAL_ACCURACY, 0.0)) for c in chosen)
    if front:
        ax.plot(*zip(*front, strict=True), "-*", color="crimson", ms=10,
                label="Pareto front" if len(study.directions) > 1 else "best trial")
    ax.set_xlabel("final sparsity (counted from the weights)")
    ax.set_ylabel("val accuracy")
    ax.set_title(f"Study {study.study_name}: accuracy against sparsity")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _save(plt: Any, ax: Any, path: Path) -> Path:
    fig = ax.get_figure()
    fig.set_size_inches(8, 4.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metric(trial: FrozenTrial, name: str) -> float:
    return float(trial.user_attrs.get("metrics", {}).get(name, float("nan")))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
