"""The frontier bench: its hand-written pruning reaches exactly the sampled sparsity, it reads the sweep's
results defensively, and its quick mode runs its own arms end to end (no timing assertions)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from harness import bench_frontier as bf


def test_prune_to_reaches_each_target_exactly_although_torch_amounts_apply_to_the_remaining_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    params = bf.prunable(model)
    total = sum(m.weight.numel() for m, _ in params)
    for target in bf.agp_targets(0.9, 4):
        bf.prune_to(params, target)
        assert bf.measured_sparsity(params) == round(target * total) / total
    bf.prune_to(params, 0.5)  # never lowers it: masks only grow
    assert bf.measured_sparsity(params) == round(0.9 * total) / total
    for m, n in params:
        torch.nn.utils.prune.remove(m, n)
    assert bf.measured_sparsity(params) == round(0.9 * total) / total


def test_agp_targets_rise_along_the_cubic_and_end_at_the_final_sparsity():
    targets = bf.agp_targets(0.98, 13)
    assert targets[-1] == pytest.approx(0.98)
    assert all(a < b for a, b in itertools.pairwise(targets))
    assert targets[0] == pytest.approx(0.98 * (1 - (12 / 13) ** 3))


def _dense(val: float = 0.9815, test: float = 0.9741) -> SimpleNamespace:
    from harness.config import GoalConfig

    return SimpleNamespace(cfg=SimpleNamespace(goal=GoalConfig()), val_accuracy=val, test_accuracy=test)


def test_the_sweep_budget_counts_every_trial_state_and_the_confirmations():
    results = {"trials": {"COMPLETE": 25, "PRUNED": 4, "FAIL": 1}, "confirmation_runs": 6}
    assert bf.sweep_budget(results) == 36
    assert bf.sweep_budget({"trials": {"COMPLETE": 3}}) == 3  # a file without confirmations


def test_the_sweep_row_is_the_confirmed_mean_judged_against_the_files_baseline():
    results = {"trials": {"COMPLETE": 10}, "confirmation_runs": 2, "best": {
        "number": 7, "sparsity": 0.985, "val_accuracy": 0.98, "test_accuracy": 0.97,
        "baseline_val_accuracy": 0.9815, "baseline_test_accuracy": 0.9741,
        "confirmed": {"runs": [{}, {}, {}], "val_accuracy_mean": 0.9716, "val_accuracy_std": 0.003,
                      "test_accuracy_mean": 0.9700}}}
    row = bf.sweep_row(results, 1, 12.5, 12, _dense())
    assert (row.arm, row.seed, row.runs, row.sparsity) == ("sweep", "1", 12, 0.985)
    assert (row.val_accuracy, row.test_accuracy) == (0.9716, 0.9700)
    assert row.goal_val is False  # (0.9815 - 0.9716) / 0.9815 > 1%
    assert row.goal_test is True
    assert "3 fine-tuning seeds" in row.note
    nothing = bf.sweep_row({"trials": {"COMPLETE": 3}, "best": None}, 0, 1.0, 3, _dense())
    assert nothing.sparsity is None and "no trial met" in nothing.note


def test_the_summary_compares_the_sweep_with_the_hand_loop_per_seed():
    rows = [bf.Row("sweep", "0", 30, 1.0, 0.985), bf.Row("hand loop", "0", 30, 1.0, 0.98),
            bf.Row("sweep", "1", 30, 1.0, 0.97), bf.Row("hand loop", "1", 30, 1.0, 0.98),
            bf.Row("sweep", "2", 0, 1.0, note="failed (exit 1): ..."), bf.Row("hand loop", "2", 30, 1.0, 0.98)]
    lines = bf.compare(rows, [0, 1, 2, 3])
    assert lines[0].endswith("0.9850 >= hand loop's 0.9800: yes")
    assert lines[1].endswith(": no")
    assert "sweep failed" in lines[2] and "sweep skipped" in lines[3]


def test_quick_mode_runs_the_hand_loop_and_the_grid_and_writes_the_table(tmp_path, capsys):
    markdown = tmp_path / "frontier.md"
    rows = bf.main(["--quick", "--skip-sweep", "--outputs", str(tmp_path / "out"), "--markdown", str(markdown)])
    out = capsys.readouterr().out

    assert [r.arm for r in rows] == ["hand loop", "grid (default recipe)", "grid (long recipe)"]
    hand = rows[0]
    assert hand.runs == 3 and hand.seed == "0"
    if hand.sparsity is not None:  # the sparsest run that met the goal: its sparsity is its sampled amount
        assert 0.5 <= hand.sparsity <= 0.995 and hand.goal_val is True
    assert all(r.runs == 2 for r in rows[1:])
    text = markdown.read_text()
    assert text.strip() == out.strip()
    assert "| arm | seed | runs | wall (s) | best sparsity |" in text
    assert "dense baseline" in text and "sweep skipped" in text
