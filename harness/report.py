"""What a run shows and keeps: the printed summary, sparsity_report.csv, the per-layer picture
(curves.png) and summary.html."""

from __future__ import annotations

import base64
import csv
import html
from collections.abc import Sequence
from pathlib import Path

from harness import metrics as m
from harness.config import GoalConfig
from harness.goal import Verdict, goal_threshold
from harness.pruning import MaskUpdate, PlannedUpdate, Pruning, TensorSparsity, overall_sparsity
from harness.training import EpochResult

CURVES = "curves.png"  # the per-layer picture: an artifact of every pruned run, first in summary.html


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
    shape_w = max([len("shape")] + [len(shape_text(r)) for r in rows])
    lines = [f"{'tensor':<{name_w}}  {'shape':<{shape_w}}  {'params':>10}  {'sparsity':>8}"]
    lines += [f"{r.name:<{name_w}}  {shape_text(r):<{shape_w}}  {r.numel:>10,}  {r.sparsity:>8.2%}" for r in rows]
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


def plot_curves(updates: Sequence[MaskUpdate], history: Sequence[EpochResult], path: Path,
                dense_accuracy: float | None = None, goal: GoalConfig | None = None) -> None:
    """The per-layer story in one picture, against the global optimizer step: every tensor's counted
    sparsity on one shared 0-1 axis (the overall counted sparsity and the scheduled target bolder),
    ``val/accuracy`` on its own axis scaled to the data (with the dense baseline and the accuracy the
    goal allows), and a tensor-by-update heatmap of the sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(updates[-1].sparsity) if updates else []
    steps = [u.global_step for u in updates]
    last_step = max(steps + [h.global_step for h in history], default=0)
    # The sparsity holds between updates: draw each line on to the last step trained.
    line_steps = steps + ([last_step] if steps and last_step > steps[-1] else [])

    def held(values: list[float]) -> list[float]:
        return values + values[-1:] * (len(line_steps) - len(values))

    label_size = 7 if len(names) <= 24 else 5
    fig = plt.figure(figsize=(13, 10.5 + 0.12 * max(0, len(names) - 12)), layout="constrained")
    grid = fig.add_gridspec(3, 1, height_ratios=[3.2, 1.6, 0.9 + 0.16 * max(1, len(names))])
    per_tensor = fig.add_subplot(grid[0])
    accuracy = fig.add_subplot(grid[1], sharex=per_tensor)
    heat = fig.add_subplot(grid[2])

    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for i, name in enumerate(names):  # drawn over the bold lines, so a tensor that follows them still shows
        per_tensor.step(line_steps, held([u.sparsity.get(name, 0.0) for u in updates]), where="post", lw=1.2,
                        color=colours(i % colours.N), label=name, zorder=3)
    if updates:
        per_tensor.step(line_steps, held([u.overall for u in updates]), where="post", lw=4, color="black",
                        alpha=0.55, label=f"{m.SPARSITY_OVERALL} (counted)", zorder=2)
        per_tensor.step(line_steps, held([u.target for u in updates]), where="post", lw=3, ls="--",
                        color="tab:red", alpha=0.7, label=f"{m.SPARSITY_TARGET} (scheduled)", zorder=2)
    per_tensor.set_ylim(0, 1.02)
    per_tensor.set_ylabel("sparsity")
    per_tensor.set_title("Sparsity per tensor (counted from the weights)")
    per_tensor.grid(alpha=0.3)
    per_tensor.tick_params(labelbottom=False)
    per_tensor.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=label_size, borderaxespad=0,
                      ncol=1 if len(names) <= 30 else 2)

    accuracies = [h.val_accuracy for h in history]
    accuracy.plot([h.global_step for h in history], accuracies, "-o", ms=4, color="tab:blue", label=m.VAL_ACCURACY)
    if dense_accuracy is not None:
        accuracy.axhline(dense_accuracy, color="gray", lw=1.5, label=f"dense baseline {dense_accuracy:.4f}")
        accuracies.append(dense_accuracy)
        if goal is not None:
            allowed = goal_threshold(goal, dense_accuracy)
            accuracy.axhline(allowed, color="tab:red", lw=1.5, ls="--", label=f"goal threshold {allowed:.4f}")
            accuracies.append(allowed)
    if accuracies:  # scaled to the data, never the 0-1 of the sparsity
        low, high = min(accuracies), max(accuracies)
        pad = max(0.1 * (high - low), 0.002)
        accuracy.set_ylim(low - pad, high + pad)
    accuracy.set_ylabel(m.VAL_ACCURACY)
    accuracy.set_xlabel("optimizer step (global)")
    accuracy.set_title("Validation accuracy")
    accuracy.grid(alpha=0.3)
    accuracy.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)

    if updates:
        grid_values = [[u.sparsity.get(name, 0.0) for u in updates] for name in names]
        image = heat.imshow(grid_values, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        heat.set_yticks(range(len(names)), names, fontsize=label_size)
        heat.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
        heat.set_xticks([t for t in heat.get_xticks() if 0 <= t < len(updates)])
        heat.set_xticklabels([f"{int(t)}\n@{updates[int(t)].global_step}" for t in heat.get_xticks()], fontsize=7)
        fig.colorbar(image, cax=heat.inset_axes((1.01, 0.0, 0.015, 1.0)), label="sparsity")
    heat.set_xlabel("mask update (index, @ global step)")
    heat.set_title("Sparsity per tensor at each mask update")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_count(value: float) -> str:
    """A count for people: ``85.1 M`` MACs, ``1.23 G``, ``512``."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            scaled = value / scale
            return f"{scaled:.{2 if abs(scaled) < 10 else 1 if abs(scaled) < 100 else 0}f} {unit}"
    return f"{value:.0f}"


def format_bytes(value: float) -> str:
    """A size for people: ``0.61 MB``, ``12.3 kB``, ``1.20 GB``."""
    if abs(value) >= 1e9:
        return f"{value / 1e9:.2f} GB"
    if abs(value) >= 1e5:
        return f"{value / 1e6:.2f} MB"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.1f} kB"
    return f"{value:.0f} B"


def format_metric(name: str, value: float) -> str:
    """One summary metric as people read it, by what its name says it measures."""
    base = name.removeprefix(m.CONFIRMED_PREFIX).removeprefix(m.BEST_PREFIX)
    if base.startswith("macs/"):
        return format_count(value)
    if base.startswith("size/"):
        return format_bytes(value)
    if base.startswith("latency/"):
        return f"{value:.3f} ms"
    if base == m.SPEEDUP:
        return f"{value:.2f}x"
    if base == m.GOAL_MET:
        return "yes" if value else "no"
    if base in (m.GOAL_ACCURACY_DROP, m.GOAL_EXCESS_DROP):
        return f"{value:+.2%}"
    if "sparsity" in base:
        return f"{value:.2%}"
    if "accuracy" in base or base.startswith("sensitivity/"):
        return f"{value:.4f}"
    if abs(value) >= 1e6:
        return format_count(value)
    return f"{value:.6g}"


def write_summary_html(path: Path, title: str, rows: Sequence[TensorSparsity], metrics: dict[str, float],
                       verdict: Verdict | None, notes: Sequence[str], config_yaml: str, plot: Path | None) -> None:
    """The run on one page: verdict (coloured), the per-layer picture first, then accuracies (val and
    test), the per-layer table, deployment numbers and the config, self-contained (the picture is
    embedded)."""
    def table(header: Sequence[str], body: Sequence[Sequence[object]]) -> str:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        rows_html = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
        return f"<table><tr>{head}</tr>{rows_html}</table>"

    def metric(name: str) -> str:
        return format_metric(name, metrics[name]) if name in metrics else "-"

    accuracy = table(["", "val", "test"], [
        ["dense", metric(m.BASELINE_ACCURACY), metric(m.BASELINE_TEST_ACCURACY)],
        ["pruned", metric(m.FINAL_ACCURACY), metric(m.FINAL_TEST_ACCURACY)]])
    layers = table(["tensor", "shape", "parameters", "zeros", "sparsity"],
                   [[r.name, shape_text(r), f"{r.numel:,}", f"{r.zeros:,}", f"{r.sparsity:.2%}"] for r in rows]
                   + [["overall", "", f"{sum(r.numel for r in rows):,}", f"{sum(r.zeros for r in rows):,}",
                       f"{overall_sparsity(rows):.2%}"]])
    deploy_rows = [[label, metric(dense), metric(pruned),
                    f"{metrics[pruned] / metrics[dense]:.1%}" if metrics[dense] else "-"]
                   for label, dense, pruned in (("latency", m.LATENCY_DENSE_MS, m.LATENCY_PRUNED_MS),
                                                ("checkpoint size", m.SIZE_DENSE_BYTES, m.SIZE_COMPRESSED_BYTES),
                                                ("MACs (non-zero)", m.MACS_DENSE, m.MACS_NONZERO))
                   if dense in metrics and pruned in metrics]
    deploy = table(["", "dense", "pruned", "pruned / dense"], deploy_rows) if deploy_rows else ""
    other = table(["metric", "value"], [[k, format_metric(k, v)] for k, v in sorted(metrics.items())])
    image = ""
    if plot is not None and plot.exists():
        data = base64.b64encode(plot.read_bytes()).decode()
        image = (f'<h2>Sparsity per tensor and accuracy</h2><img class="per-layer" alt="per-tensor sparsity, '
                 f'val accuracy and sparsity heatmap" src="data:image/png;base64,{data}">')
    if verdict is None:
        verdict_html = '<p class="verdict none">dense only: no verdict</p>'
    else:
        verdict_html = (f'<p class="verdict {"met" if verdict.met else "missed"}">'
                        f'{html.escape(verdict.describe() + " (judged on val)")}</p>')
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    style = ("body{font-family:sans-serif;max-width:1300px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
             "pre{background:#f6f6f6;padding:1em;font-size:12px}"
             ".verdict{font-weight:bold;padding:.4em .8em;border-radius:4px;display:inline-block}"
             ".verdict.met{color:#fff;background:#1a7f37}.verdict.missed{color:#fff;background:#c62828}"
             ".verdict.none{background:#eee}")
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{verdict_html}{image}"
        f"<h2>Accuracy</h2>{accuracy}<h2>Sparsity per tensor</h2>{layers}"
        + (f"<h2>Deployment</h2>{deploy}" if deploy else "")
        + f"<h2>Measured</h2>{other}<ul>{notes_html}</ul><h2>Config</h2><pre>{html.escape(config_yaml)}</pre>"
        "</body></html>")


def shape_text(row: TensorSparsity) -> str:
    """A tensor's shape as people write it: ``64x32x3x3``."""
    return "x".join(map(str, row.shape))
