"""Schedule values, including LPOT's staircase for the seed document's example."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from harness.pruning import Pruning
from harness.pruning.schedules import cubic, linear


def lpot_update_sparsity(initial, target, start, end, freq, epoch):
    """LPOT 1.6 ``Pruner.update_sparsity``, written out from its source, as the reference."""
    if start == end:
        return initial
    if epoch < start:
        return 0
    if epoch > end:
        return target
    return initial + (target - initial) * ((epoch - start) // freq) * freq / (end - start)


class Seed(nn.Module):
    """A model with the tensor name the seed document prunes."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Module())
        self.layer1[0].conv1 = nn.Conv2d(4, 8, 3)
        self.fc = nn.Linear(8, 2)


def scheduled_updates(spec: dict, epochs: int, steps_per_epoch: int) -> dict[tuple[int, int], float]:
    """Drive the engine through the callbacks and record (epoch, step) -> scheduled sparsity."""
    model = Seed()
    pruning = Pruning(spec).attach(model, steps_per_epoch=steps_per_epoch)
    seen: dict[tuple[int, int], float] = {}
    pruning.add_listener(lambda u: seen.__setitem__((u.epoch, u.step), u.target))
    pruning.on_train_begin()
    for epoch in range(epochs):
        pruning.on_epoch_begin(epoch)
        for step in range(steps_per_epoch):
            pruning.on_batch_begin(step)
            pruning.on_batch_end()
        pruning.on_epoch_end()
    pruning.on_train_end()
    return seen


@given(
    initial=st.floats(0.0, 0.5),
    delta=st.floats(0.0, 0.49),
    start=st.integers(0, 5),
    length=st.integers(1, 12),
    freq=st.integers(1, 4),
)
def test_linear_is_lpot_staircase_to_the_bit_for_integer_frequencies(initial, delta, start, length, freq):
    target, end = initial + delta, start + length
    for epoch in range(start, end + 1, freq):
        q = (epoch - start) // freq
        assert linear(initial, target, q, float(freq), float(end - start)) == lpot_update_sparsity(
            initial, target, start, end, freq, epoch)


def test_engine_follows_lpot_staircase_at_epoch_begin():
    spec = {"initial_sparsity": 0.1, "target_sparsity": 0.7, "start_epoch": 1, "end_epoch": 7,
            "update_frequency": 2, "schedule": "linear"}
    seen = scheduled_updates(spec, epochs=9, steps_per_epoch=3)
    assert sorted(seen) == [(1, 0), (3, 0), (5, 0), (7, 0)]  # updates only at epoch begin
    for (epoch, _), value in seen.items():
        assert value == lpot_update_sparsity(0.1, 0.7, 1, 7, 2, epoch)


def test_engine_reaches_target_when_the_end_is_off_the_staircase():
    # LPOT stops at 0.8 * 4/5 here (the last staircase step) and never reaches the target.
    spec = {"target_sparsity": 0.8, "start_epoch": 0, "end_epoch": 5, "update_frequency": 2,
            "schedule": "linear"}
    seen = scheduled_updates(spec, epochs=7, steps_per_epoch=2)
    assert sorted(seen) == [(0, 0), (2, 0), (4, 0), (5, 0)]
    assert seen[(4, 0)] == pytest.approx(0.8 * 4 / 5)
    assert seen[(5, 0)] == 0.8


def test_seed_document_pruner_updates_ten_times_per_epoch():
    # The seed's YAML: global target 0.3, one pruner overriding it with 0.97 over epochs 0..2
    # at update_frequency 0.1 (ten updates per epoch).
    spec = {"initial_sparsity": 0.0, "target_sparsity": 0.3, "schedule": "linear", "pruners": [
        {"initial_sparsity": 0.0, "target_sparsity": 0.97, "names": ["layer1.0.conv1.weight"],
         "start_epoch": 0, "end_epoch": 2, "update_frequency": 0.1}]}
    seen = scheduled_updates(spec, epochs=3, steps_per_epoch=20)
    assert len(seen) == 21  # every 2 steps over two epochs, plus the final one at epoch 2
    assert seen[(0, 0)] == 0.0
    assert seen[(0, 2)] == pytest.approx(0.97 / 20)
    assert seen[(1, 0)] == pytest.approx(0.97 / 2)
    assert seen[(2, 0)] == pytest.approx(0.97)
    assert all(a <= b for a, b in zip(list(seen.values()), list(seen.values())[1:]))


def test_cubic_is_zhu_gupta_agp():
    assert cubic(0.1, 0.9, 0, 1.0, 4.0) == pytest.approx(0.1)
    assert cubic(0.1, 0.9, 2, 1.0, 4.0) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)
    assert cubic(0.1, 0.9, 4, 1.0, 4.0) == pytest.approx(0.9)
    # AGP front-loads pruning: above the straight line everywhere inside the window.
    assert cubic(0.0, 0.9, 1, 1.0, 4.0) > linear(0.0, 0.9, 1, 1.0, 4.0)


@given(initial=st.floats(0.0, 0.5), delta=st.floats(0.0, 0.49), span=st.integers(1, 50))
def test_schedules_are_monotone_and_bounded(initial, delta, span):
    target = initial + delta
    for schedule in (linear, cubic):
        values = [schedule(initial, target, q, 1.0, float(span)) for q in range(span + 1)]
        assert values[0] == pytest.approx(initial)
        assert values[-1] == pytest.approx(target)
        assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))


def test_one_shot_when_start_equals_end():
    seen = scheduled_updates({"target_sparsity": 0.6, "start_epoch": 1, "end_epoch": 1,
                              "update_frequency": 1}, epochs=3, steps_per_epoch=2)
    assert seen == {(1, 0): 0.6}


def test_training_that_starts_after_the_window_catches_up_once():
    model = Seed()
    pruning = Pruning({"target_sparsity": 0.5, "start_epoch": 0, "end_epoch": 1,
                       "update_frequency": 1}).attach(model)
    pruning.on_epoch_begin(3)  # e.g. a loop resumed late
    rows = pruning.sparsity()
    assert all(r.sparsity == pytest.approx(0.5, abs=0.01) for r in rows)
