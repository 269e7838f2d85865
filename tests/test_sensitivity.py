"""Sensitivity analysis on a really trained digits CNN, and the per-layer budgets drawn from it."""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from harness.config import DatasetConfig
from harness.data import build_data
from harness.models import DigitsCNN
from harness.pruning import PrunerSpec, Pruning, PruningSpec, count_sparsity
from harness.sensitivity import SensitivityTable, allocate_budgets, analyze_sensitivity, budgets_to_pruners
from harness.training import evaluate

SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98)
CPU = torch.device("cpu")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models train far faster on one thread, above all on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained():
    """(model, val loader, weights before the analysis, table): DigitsCNN after 2 epochs of Adam."""
    with one_thread():
        torch.manual_seed(0)
        data = build_data(DatasetConfig(), batch_size=64, eval_batch_size=512, seed=0)
        model = DigitsCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        for _ in range(2):
            for x, y in data.train:
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        table = analyze_sensitivity(model, None, lambda m: evaluate(m, data.val, CPU), sparsities=SPARSITIES)
    return model, data.val, before, table


def synthetic_table() -> SensitivityTable:
    """Four tensors, from robust to fragile, of different sizes; one with a noisy bump and a plateau."""
    return SensitivityTable(
        dense_accuracy=0.95,
        sparsities=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
        accuracies={
            "robust": (0.95, 0.95, 0.95, 0.94, 0.93, 0.90),
            "bumpy": (0.95, 0.96, 0.94, 0.93, 0.90, 0.80),  # better than dense at 0.7: counted as no drop
            "middle": (0.95, 0.94, 0.92, 0.88, 0.80, 0.60),
            "fragile": (0.90, 0.80, 0.60, 0.40, 0.20, 0.10),
        },
        numels={"robust": 100_000, "bumpy": 20_000, "middle": 5_000, "fragile": 300},
    )


def weighted_mean(table: SensitivityTable, budgets: dict[str, float]) -> float:
    return math.fsum(table.numels[n] * s for n, s in budgets.items()) / sum(table.numels.values())


# -- the analysis on the trained model ----------------------------------------------------------


def test_analysis_leaves_every_weight_unchanged(trained):
    model, _, before, table = trained
    after = model.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert table.names == ["features.0.weight", "features.2.weight", "classifier.1.weight", "classifier.3.weight"]
    assert table.numels == {n: p.numel() for n, p in model.named_parameters() if n in table.numels}


def test_accuracies_are_fractions_and_sparsity_zero_is_dense(trained):
    model, val, _, table = trained
    assert table.sparsities == SPARSITIES
    with one_thread():
        assert table.dense_accuracy == evaluate(model, val, CPU)
    assert table.dense_accuracy > 0.85  # the model really learned the digits
    for name in table.names:
        accuracies = table.accuracies[name]
        assert len(accuracies) == len(SPARSITIES)
        assert all(0.0 <= a <= 1.0 for a in accuracies)
        assert accuracies[0] == table.dense_accuracy, name  # sparsity 0.0 prunes nothing


def test_the_output_layer_is_more_fragile_than_the_big_hidden_layer(trained):
    *_, table = trained
    at = SPARSITIES.index(0.95)
    # 10x128 keeping 64 weights vs 128x1024 keeping 6,554: the output layer loses far more.
    assert table.drops("classifier.3.weight")[at] > table.drops("classifier.1.weight")[at] + 0.05
    ranked = table.most_sensitive()
    assert sorted(ranked) == sorted(table.names)
    assert [table.sensitivity(n) for n in ranked] == sorted((table.sensitivity(n) for n in ranked), reverse=True)
    assert ranked.index("classifier.3.weight") < ranked.index("classifier.1.weight")
    assert table.most_sensitive(2) == ranked[:2]


def test_rows_save_load_and_plot(trained, tmp_path: Path):
    *_, table = trained
    rows = table.to_rows()
    assert len(rows) == len(table.names) * len(SPARSITIES)
    assert set(rows[0]) == {"tensor", "numel", "sparsity", "accuracy", "drop"}
    assert all(r["drop"] == pytest.approx(table.dense_accuracy - r["accuracy"]) for r in rows)

    path = table.save(tmp_path / "cache" / "sensitivity.json")
    loaded = SensitivityTable.load(path)
    assert loaded == table
    assert loaded.accuracies == table.accuracies and loaded.sparsities == table.sparsities
    assert json.loads(loaded.save(tmp_path / "again.json").read_text()) == json.loads(path.read_text())

    assert table.write_csv(tmp_path / "sensitivity.csv").read_text().count("\n") == len(rows) + 1
    png = table.plot(tmp_path / "sensitivity.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_weights_are_restored_when_evaluation_fails(trained):
    model, val, *_ = trained
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def flaky(m):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("evaluation failed")
        return evaluate(m, val, CPU)

    with one_thread(), pytest.raises(RuntimeError, match="evaluation failed"):
        analyze_sensitivity(model, ["classifier.*"], flaky, sparsities=(0.5, 0.9))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_structured_pattern_and_refused_gradient_criterion(trained):
    model, val, *_ = trained
    model = copy.deepcopy(model)
    with one_thread():
        table = analyze_sensitivity(model, ["features.2.weight"], lambda m: evaluate(m, val, CPU),
                                    sparsities=(0.9, 0.5), pattern="channel")
    assert table.sparsities == (0.5, 0.9) and table.pattern == "channel l1"
    with pytest.raises(ValueError, match="criterion=taylor"):
        analyze_sensitivity(model, None, lambda m: 1.0, criterion="taylor")
    with pytest.raises(ValueError, match="nosuch"):
        analyze_sensitivity(model, ["nosuch.weight"], lambda m: 1.0)


# -- budgets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_budgets_meet_the_overall_target_within_bounds(target, beta):
    table = synthetic_table()
    budgets = allocate_budgets(table, target, beta=beta)
    assert list(budgets) == table.names
    assert weighted_mean(table, budgets) == pytest.approx(target, abs=1e-6)
    assert all(0.0 <= s <= 0.99 for s in budgets.values())
    order = ["robust", "bumpy", "middle", "fragile"]  # no curve of a later one lies below an earlier one's
    for robust, fragile in pairwise(order):
        assert budgets[robust] >= budgets[fragile] - 1e-12, (robust, fragile, budgets)


def test_beta_zero_is_uniform_and_beta_moves_budgets_monotonically():
    table = synthetic_table()
    assert allocate_budgets(table, 0.8, beta=0.0) == dict.fromkeys(table.names, 0.8)
    full = allocate_budgets(table, 0.8, beta=1.0)
    half = allocate_budgets(table, 0.8, beta=0.5)
    assert full["fragile"] < half["fragile"] < 0.8 < full["robust"]
    for name in table.names:
        assert half[name] == pytest.approx((0.8 + full[name]) / 2, abs=1e-12)
    assert allocate_budgets(table, 0.8) == allocate_budgets(table, 0.8)  # deterministic


def test_budgets_respect_min_and_max_and_on_the_real_table(trained):
    table = synthetic_table()
    budgets = allocate_budgets(table, 0.85, max_sparsity=0.9, min_sparsity=0.5)
    assert all(0.5 <= s <= 0.9 for s in budgets.values())
    assert budgets["fragile"] == pytest.approx(0.5) and weighted_mean(table, budgets) == pytest.approx(0.85, abs=1e-6)
    assert allocate_budgets(table, 0.9, max_sparsity=0.9) == pytest.approx(dict.fromkeys(table.names, 0.9))

    *_, real = trained
    for target in (0.5, 0.8, 0.9):
        budgets = allocate_budgets(real, target)
        assert weighted_mean(real, budgets) == pytest.approx(target, abs=1e-6)
        assert budgets["classifier.3.weight"] <= budgets["classifier.1.weight"]


def test_a_single_tensor_and_flat_curves_get_the_target():
    flat = SensitivityTable(0.9, (0.5, 0.9), {"a": (0.9, 0.9), "b": (0.9, 0.9)}, {"a": 10, "b": 30})
    budgets = allocate_budgets(flat, 0.7)
    assert weighted_mean(flat, budgets) == pytest.approx(0.7, abs=1e-9)
    one = allocate_budgets(synthetic_table().subset(["middle"]), 0.42)
    assert one == {"middle": pytest.approx(0.42, abs=1e-9)}


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"overall_target": 0.995}, "overall_target=0.995"),
    ({"overall_target": 0.9, "max_sparsity": 0.8}, "overall_target=0.9"),
    ({"overall_target": 0.2, "min_sparsity": 0.3}, "overall_target=0.2"),
    ({"overall_target": 0.5, "beta": 1.5}, "beta=1.5"),
    ({"overall_target": 0.5, "max_sparsity": 1.0}, "max_sparsity=1.0"),
])
def test_infeasible_or_invalid_budgets_name_the_value(kwargs, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        allocate_budgets(synthetic_table(), **kwargs)


def test_budgets_drive_the_engine_to_each_tensor_target(trained):
    *_, real = trained
    model = copy.deepcopy(trained[0])
    budgets = allocate_budgets(real, 0.85)
    pruners = budgets_to_pruners(budgets)
    assert pruners == [{"names": [n], "target_sparsity": s} for n, s in budgets.items()]
    spec = PruningSpec(update_frequency=1, end_epoch=0, pruners=[PrunerSpec(**p) for p in pruners])
    pruning = Pruning(spec).attach(model)
    pruning.on_epoch_begin(0)
    rows = {r.name: r for r in count_sparsity(model, list(budgets))}
    for name, target in budgets.items():
        assert rows[name].zeros == round(target * rows[name].numel), name
    total = sum(r.numel for r in rows.values())
    assert sum(r.zeros for r in rows.values()) / total == pytest.approx(0.85, abs=1e-3)
    with pytest.raises(ValueError, match=r"budgets\['x'\]=1\.0"):
        budgets_to_pruners({"x": 1.0})
