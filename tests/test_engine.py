"""The engine's invariants: masks are the truth, exact counts, inheritance, names, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from harness.pruning import PrunerSpec, Pruning, PruningSpec, prunable_weights
from harness.pruning.patterns import pruned_count, unstructured_mask


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 4),
    )


def batches(n: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def train(model, pruning, optimizer, epochs, data, check=None, start_epoch=0):
    loss_fn = nn.CrossEntropyLoss()
    pruning.on_train_begin()
    for epoch in range(start_epoch, epochs):
        pruning.on_epoch_begin(epoch)
        for step, (x, y) in enumerate(data):
            pruning.on_batch_begin(step)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            pruning.on_before_optimizer_step()
            optimizer.step()
            pruning.on_batch_end()
            if check:
                check(pruning)
        pruning.on_epoch_end()
    pruning.on_train_end()


def assert_masked_weights_are_zero(pruning: Pruning) -> None:
    for name, param in pruning.params.items():
        assert torch.all(param[pruning.masks[name] == 0] == 0.0), name


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=1e-2),
], ids=["sgd-momentum-wd", "adamw", "adam"])
def test_pruned_weights_stay_zero_and_survivors_keep_training(make_optimizer):
    model = small_net()
    pruning = Pruning({"target_sparsity": 0.7, "end_epoch": 2, "update_frequency": 0.5,
                       "schedule": "linear"}).attach(model, steps_per_epoch=6)
    optimizer = make_optimizer(model.parameters())
    weights_before = {n: p.detach().clone() for n, p in pruning.params.items()}
    data = batches()
    train(model, pruning, optimizer, 2, data, check=assert_masked_weights_are_zero)
    masks_at_window_end = {n: m.clone() for n, m in pruning.masks.items()}
    after_pruning = {n: p.detach().clone() for n, p in pruning.params.items()}
    train(model, pruning, optimizer, 4, data, check=assert_masked_weights_are_zero, start_epoch=2)

    for name, param in pruning.params.items():
        assert torch.equal(pruning.masks[name][masks_at_window_end[name] == 0],
                           torch.zeros_like(pruning.masks[name][masks_at_window_end[name] == 0]))
        live = pruning.masks[name] == 1
        assert not torch.equal(param[live], after_pruning[name][live]), f"{name}: survivors frozen"
        assert not torch.equal(param[live], weights_before[name][live])
        assert (param == 0).float().mean().item() == pytest.approx(0.7, abs=0.01)
    # The optimizer trains the model's own parameter objects (LPOT replaced them).
    optimizer_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimizer_params for p in pruning.params.values())


def test_default_selection_is_conv_and_linear_weights_only():
    names = list(prunable_weights(small_net()))
    assert names == ["0.weight", "4.weight", "6.weight"]


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(1, 400), s1=st.floats(0.0, 0.99), s2=st.floats(0.0, 0.99), seed=st.integers(0, 99))
def test_unstructured_mask_prunes_exactly_and_never_regrows(numel, s1, s2, seed):
    lo, hi = sorted((s1, s2))
    scores = torch.randn(numel, generator=torch.Generator().manual_seed(seed)).abs()
    first = unstructured_mask(scores, lo, torch.ones(numel))
    assert int((first == 0).sum()) == pruned_count(numel, lo) == round(lo * numel)
    # The kept weights are the largest ones.
    if 0 < int(first.sum()) < numel:
        assert scores[first == 1].min() >= scores[first == 0].max()
    rescored = torch.randn(numel, generator=torch.Generator().manual_seed(seed + 1)).abs()
    second = unstructured_mask(rescored, hi, first)
    assert int((second == 0).sum()) == round(hi * numel)
    assert torch.all(second[first == 0] == 0)  # no regrowth


@settings(max_examples=25, deadline=None)
@given(target=st.floats(0.05, 0.95), seed=st.integers(0, 50))
def test_reaches_the_target_counted_from_the_weights(target, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    pruning = Pruning({"target_sparsity": target, "end_epoch": 1, "update_frequency": 1}).attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    data = [(torch.randn(8, 20), torch.randint(0, 5, (8,))) for _ in range(3)]
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(2):
        pruning.on_epoch_begin(epoch)
        for step, (x, y) in enumerate(data):
            pruning.on_batch_begin(step)
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            pruning.on_before_optimizer_step()
            optimizer.step()
            pruning.on_batch_end()
    for row in pruning.sparsity():
        assert row.zeros == round(target * row.numel)


def test_pruner_fields_inherit_unless_set_and_zero_is_a_value():
    spec = PruningSpec(initial_sparsity=0.2, target_sparsity=0.6, start_epoch=1, end_epoch=4, pruners=[
        PrunerSpec(names=["a"], initial_sparsity=0.0),  # explicit 0.0 overrides the global 0.2
        PrunerSpec(names=["b"], target_sparsity=0.9, start_epoch=0),
    ])
    first, second = spec.resolve()
    assert first.initial_sparsity == 0.0 and first.target_sparsity == 0.6 and first.start_epoch == 1
    assert second.initial_sparsity == 0.2 and second.target_sparsity == 0.9 and second.start_epoch == 0
    assert second.end_epoch == 4


@pytest.mark.parametrize(("spec", "message"), [
    ({"target_sparsity": 1.0}, "target_sparsity=1.0: must be in [0, 1)"),
    ({"initial_sparsity": -0.1}, "initial_sparsity=-0.1: must be in [0, 1)"),
    ({"initial_sparsity": 0.5, "target_sparsity": 0.4}, "must be >= initial_sparsity=0.5"),
    ({"start_epoch": 3, "end_epoch": 2}, "end_epoch=2: must be >= start_epoch=3"),
    ({"update_frequency": 0}, "update_frequency=0.0: must be > 0"),
    ({"schedule": "cube"}, "schedule='cube': must be one of one_shot, linear, cubic, exponential, cosine"),
    ({"pruners": [{"names": ["x"], "target_sparsity": 1.2}]}, "pruners[0].target_sparsity=1.2"),
    ({"pruners": [{"nmes": ["x"]}]}, "pruners[0].nmes: unknown pruning field"),
    ({"taget_sparsity": 0.5}, "taget_sparsity: unknown pruning field"),
])
def test_bad_fields_name_the_field_the_value_and_what_is_allowed(spec, message):
    with pytest.raises(ValueError) as err:
        Pruning(spec)
    assert message in str(err.value)


def test_unknown_tensor_name_lists_the_closest_names():
    with pytest.raises(ValueError, match=r"'4.wieght' matches no parameter.*closest: 4.weight"):
        Pruning({"names": ["4.wieght"]}).attach(small_net(), steps_per_epoch=4)


def test_a_tensor_belongs_to_one_pruner():
    spec = {"pruners": [{"names": ["0.weight"]}, {"names": ["0.weight", "4.weight"]}]}
    with pytest.raises(ValueError, match="already pruned by pruners"):
        Pruning(spec).attach(small_net(), steps_per_epoch=4)


def test_fractional_frequency_needs_steps_per_epoch():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Pruning({"update_frequency": 0.25}).attach(small_net())


def test_lpot_prune_type_name_is_accepted():
    pruning = Pruning({"prune_type": "basic_magnitude", "update_frequency": 1}).attach(small_net())
    assert pruning.pruner_specs[0].criterion.value == "magnitude"


def test_state_dict_resumes_mid_schedule_with_identical_masks():
    spec = {"target_sparsity": 0.8, "end_epoch": 3, "update_frequency": 0.5}
    data = batches(4)

    def fresh():
        model = small_net()
        pruning = Pruning(spec).attach(model, steps_per_epoch=4)
        return model, pruning, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    model, pruning, opt = fresh()
    train(model, pruning, opt, 4, data)

    model2, pruning2, opt2 = fresh()
    train(model2, pruning2, opt2, 2, data)
    saved = copy.deepcopy((model2.state_dict(), opt2.state_dict(), pruning2.state_dict()))
    model3, pruning3, opt3 = fresh()
    model3.load_state_dict(saved[0])
    opt3.load_state_dict(saved[1])
    pruning3.load_state_dict(saved[2])
    train(model3, pruning3, opt3, 4, data, start_epoch=2)

    for name in pruning.masks:
        assert torch.equal(pruning.masks[name], pruning3.masks[name])
        assert torch.allclose(pruning.params[name], pruning3.params[name])
    assert pruning3.global_step == pruning.global_step


def test_finalize_returns_the_plain_model_with_masks_baked_in():
    model = small_net()
    pruning = Pruning({"target_sparsity": 0.5, "update_frequency": 1, "end_epoch": 0}).attach(model)
    pruning.on_epoch_begin(0)
    plain = pruning.finalize()
    assert plain is model and type(plain) is nn.Sequential
    assert not plain._forward_pre_hooks and not plain[0]._forward_pre_hooks
    assert all(r.sparsity == pytest.approx(0.5, abs=0.01) for r in pruning.sparsity())
    # Pruned weights are +0.0 (no -0.0 left by masking negative weights), survivors unchanged.
    for name, param in pruning.params.items():
        assert not torch.signbit(param[pruning.masks[name] == 0]).any(), name
        assert torch.count_nonzero(param[pruning.masks[name] == 1]) == int(pruning.masks[name].sum()), name
