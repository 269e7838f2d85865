"""What a run shows and keeps: the printed summary, sparsity_report.csv and the curves plot."""

from __future__ import annotations

import base64
import csv
import html
from collections.abc import Sequence
from pathlib import Path

from harness import metrics as m
from harness.goal import Verdict
from harness.pruning import MaskUpdate, PlannedUpdate, Pruning, TensorSparsity, overall_sparsity
from harness.training import EpochResult


def write_sparsity_csv(rows: Sequence[TensorSparsity], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tensor", "shape", "parameters", "zeros", "sparsity"])
        for r in rows:
            writer.writerow([r.name, "x".join(map(str, r.shape)), r.numel, r.zeros, f"{r.sparsity:.6f}"])
        total = sum(r.numel for r in rows)
        writer.writerow(["(overall)", "", total, sum(r.zeros for r in rows), f"{overall_sparsity(rows):.6f}"])


def format_summary(
    rows: Sequence[TensorSparsity],
    accuracy: dict[str, float],
    verdict: Verdict | None,
    baseline_note: str,
    tracking_note: str,
    ui_command: str | None,
) -> str:
    """The end-of-run summary: per-layer table, accuracies on val and test, verdict, where to look."""
    name_w = max([len("tensor")] + [len(r.name) for r in rows])
    shape_w = max([len("shape")] + [len(_shape(r)) for r in rows])
    lines = [f"{'tensor':<{name_w}}  {'shape':<{shape_w}}  {'params':>10}  {'sparsity':>8}"]
    lines += [f"{r.name:<{name_w}}  {_shape(r):<{shape_w}}  {r.numel:>10,}  {r.sparsity:>8.2%}" for r in rows]
    total = sum(r.numel for r in rows)
    lines.append(f"{'overall':<{name_w}}  {'':<{shape_w}}  {total:>10,}  {overall_sparsity(rows):>8.2%}")
    lines += [
        "",
        f"{'':<8}{'val':>10}{'test':>10}",
        f"{'dense':<8}{accuracy[m.BASELINE_ACCURACY]:>10.4f}{accuracy[m.BASELINE_TEST_ACCURACY]:>10.4f}",
        f"{'pruned':<8}{accuracy[m.FINAL_ACCURACY]:>10.4f}{accuracy[m.FINAL_TEST_ACCURACY]:>10.4f}",
        "",
        baseline_note,
    ]
    if verdict is not None:
        lines.append(verdict.describe() + " (judged on val)")
    lines.append(tracking_note)
    if ui_command:
        lines.append(f"view: {ui_command}")
    return "\n".join(lines)


def format_deployment(metrics: dict[str, float]) -> str:
    """One line: what the pruned model costs against the dense one, as measured."""
    return (f"deploy (batch of the test split): {metrics[m.LATENCY_PRUNED_MS]:.3f} ms vs "
            f"{metrics[m.LATENCY_DENSE_MS]:.3f} ms dense (speedup {metrics[m.SPEEDUP]:.2f}x); "
            f"compressed checkpoint {metrics[m.SIZE_COMPRESSED_BYTES] / 1e6:.2f} MB vs "
            f"{metrics[m.SIZE_DENSE_BYTES] / 1e6:.2f} MB; non-zero MACs "
            f"{metrics[m.MACS_NONZERO] / max(1.0, metrics[m.MACS_DENSE]):.1%} of dense")


def format_plan(pruning: Pruning, planned: Sequence[PlannedUpdate]) -> str:
    """The dry run: which tensors each pruner matched, and the sparsity planned at every update."""
    lines = ["dry run: nothing trained, nothing written", ""]
    for i, pruner in enumerate(pruning.pruner_specs):
        names = [n for n, owner in pruning.owners.items() if owner == i]
        lines.append(f"pruner {i}: {pruner.pattern.value} pattern, {pruner.criterion.value} criterion, "
                     f"{pruner.scope.value} scope, {pruner.schedule.value} schedule "
                     f"{pruner.initial_sparsity:g} -> {pruner.target_sparsity:g} over epochs "
                     f"{pruner.start_epoch}..{pruner.end_epoch}"
                     + (f", cap {pruner.max_sparsity:g}" if pruner.max_sparsity is not None else ""))
        for name in names:
            shape = "x".join(map(str, pruning.params[name].shape))
            lines.append(f"    {name:<40} {shape:<16} {pruning.params[name].numel():>12,}")
    for name, reason in pruning.skipped.items():
        lines.append(f"not pruned: {name} ({reason})")
    lines += ["", f"{'epoch':>5} {'step':>6}  planned sparsity per pruner"]
    for update in planned:
        per_pruner = []
        for i in range(len(pruning.pruner_specs)):
            values = [v for n, v in update.sparsity.items() if pruning.owners[n] == i]
            per_pruner.append(f"{values[0]:.4f}" if values else "   -  ")
        lines.append(f"{update.epoch:>5} {update.step:>6}  " + "  ".join(per_pruner))
    lines.append(f"{len(planned)} updates")
    return "\n".join(lines)


def plot_curves(updates: Sequence[MaskUpdate], history: Sequence[EpochResult], path: Path) -> None:
    """Left: the schedule (scheduled and counted sparsity) and val accuracy; right: each tensor's
    counted sparsity; both against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, per_tensor) = plt.subplots(1, 2, figsize=(12, 4.2))
    steps = [u.global_step for u in updates]
    ax.step(steps, [u.target for u in updates], where="post", label=m.SPARSITY_TARGET)
    ax.plot(steps, [u.overall for u in updates], "o", ms=3, label=f"{m.SPARSITY_OVERALL} (counted)")
    ax.plot([h.global_step for h in history], [h.val_accuracy for h in history], "-s", ms=3,
            label=m.VAL_ACCURACY)
    ax.set_title("Pruning schedule and accuracy")
    for name in updates[-1].sparsity if updates else []:
        per_tensor.step(steps, [u.sparsity[name] for u in updates], where="post", label=name)
    per_tensor.set_title("Sparsity per tensor (counted from the weights)")
    for axis in (ax, per_tensor):
        axis.set_xlabel("optimizer step")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=7 if axis is per_tensor else None)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary_html(path: Path, title: str, rows: Sequence[TensorSparsity], metrics: dict[str, float],
                       verdict: Verdict | None, notes: Sequence[str], config_yaml: str, plot: Path | None) -> None:
    """The run on one page: verdict, accuracies (val and test), per-layer table, curves, deployment
    numbers and the config, self-contained (the plot is embedded)."""
    def table(header: Sequence[str], body: Sequence[Sequence[object]]) -> str:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        rows_html = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><tr>{head}</tr>{rows_html}</table>"

    accuracy = table(["", "val", "test"], [
        ["dense", f"{metrics[m.BASELINE_ACCURACY]:.4f}", f"{metrics[m.BASELINE_TEST_ACCURACY]:.4f}"],
        ["pruned", f"{metrics[m.FINAL_ACCURACY]:.4f}", f"{metrics[m.FINAL_TEST_ACCURACY]:.4f}"]])
    layers = table(["tensor", "shape", "parameters", "zeros", "sparsity"],
                   [[r.name, _shape(r), f"{r.numel:,}", f"{r.zeros:,}", f"{r.sparsity:.2%}"] for r in rows]
                   + [["overall", "", f"{sum(r.numel for r in rows):,}", f"{sum(r.zeros for r in rows):,}",
                       f"{overall_sparsity(rows):.2%}"]])
    other = table(["metric", "value"], [[k, f"{v:.6g}"] for k, v in sorted(metrics.items())])
    image = ""
    if plot is not None and plot.exists():
        data = base64.b64encode(plot.read_bytes()).decode()
        image = f'<img alt="schedule, accuracy and per-tensor sparsity" src="data:image/png;base64,{data}">'
    verdict_html = html.escape(verdict.describe() + " (judged on val)") if verdict else "dense only: no verdict"
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
             "pre{background:#f6f6f6;padding:1em;font-size:12px}")
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><p><b>{verdict_html}</b></p>"
        f"<h2>Accuracy</h2>{accuracy}<h2>Sparsity per tensor</h2>{layers}<h2>Curves</h2>{image}"
        f"<h2>Measured</h2>{other}<ul>{notes_html}</ul><h2>Config</h2><pre>{html.escape(config_yaml)}</pre>"
        "</body></html>")


def _shape(row: TensorSparsity) -> str:
    return "x".join(map(str, row.shape))
