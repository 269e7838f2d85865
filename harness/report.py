"""What a run shows and keeps: the printed summary, sparsity_report.csv and the curves plot."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

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
        f"{'dense':<8}{accuracy['baseline/accuracy']:>10.4f}{accuracy['baseline/test_accuracy']:>10.4f}",
        f"{'pruned':<8}{accuracy['final/accuracy']:>10.4f}{accuracy['final/test_accuracy']:>10.4f}",
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
    return (f"deploy (batch of the test split): {metrics['latency/pruned_ms']:.3f} ms vs "
            f"{metrics['latency/dense_ms']:.3f} ms dense (speedup {metrics['speedup']:.2f}x); "
            f"compressed checkpoint {metrics['size/compressed_bytes'] / 1e6:.2f} MB vs "
            f"{metrics['size/dense_bytes'] / 1e6:.2f} MB; non-zero MACs "
            f"{metrics['macs/nonzero'] / max(1.0, metrics['macs/dense']):.1%} of dense")


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
    """Scheduled and measured sparsity, and val accuracy, against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [u.global_step for u in updates]
    ax.step(steps, [u.target for u in updates], where="post", label="sparsity/target")
    ax.plot(steps, [u.overall for u in updates], "o", ms=3, label="sparsity/overall (counted)")
    ax.plot([h.global_step for h in history], [h.val_accuracy for h in history], "-s", ms=3,
            label="val/accuracy")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Pruning schedule and accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shape(row: TensorSparsity) -> str:
    return "x".join(map(str, row.shape))
