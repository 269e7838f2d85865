"""The engine's per-step fast path: gradients masked as backward accumulates them, optimizer state
kept at zero for pruned weights so that the step itself leaves them at zero, and the fall-back
when something changes a gradient between backward and the step."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from harness.pruning import Pruning


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32),
                         nn.ReLU(), nn.Linear(32, 4))


def batches(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


SPEC = {"target_sparsity": 0.8, "end_epoch": 2, "update_frequency": 0.5, "schedule": "cubic"}


def train(model, pruning, optimizer, data, epochs=4, after_backward=None, after_step=None):
    """A plain loop calling every callback (the engine must not mask twice when it has the optimizer)."""
    loss_fn = nn.CrossEntropyLoss()
    pruning.on_train_begin()
    for epoch in range(epochs):
        pruning.on_epoch_begin(epoch)
        for step, (x, y) in enumerate(data):
            pruning.on_batch_begin(step)
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            if after_backward:
                after_backward(model)
            pruning.on_before_optimizer_step()
            optimizer.step()
            pruning.on_batch_end()
            if after_step:
                after_step(pruning)
        pruning.on_epoch_end()
    pruning.on_train_end()


def pruned_are_zero(pruning: Pruning) -> None:
    for name, param in pruning.params.items():
        assert torch.count_nonzero(param[pruning.masks[name] == 0]) == 0, name


OPTIMIZERS = {
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "rmsprop-centered-momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=0.1),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),  # not known to the fast path: re-masks
}


@pytest.mark.parametrize("make_optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_optimizer_path_trains_exactly_like_the_callbacks_path(make_optimizer):
    """``attach(optimizer=)`` skips the per-step weight re-masking where the optimizer keeps pruned
    weights at zero by itself; the trained weights are the same, bit for bit, as re-masking after
    every step, and pruned weights are zero after every step on both paths."""
    data = batches()
    model_a, model_b = small_net(), small_net()
    opt_a, opt_b = make_optimizer(model_a.parameters()), make_optimizer(model_b.parameters())
    with_optimizer = Pruning(SPEC).attach(model_a, steps_per_epoch=len(data), optimizer=opt_a)
    callbacks_only = Pruning(SPEC).attach(model_b, steps_per_epoch=len(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back warning: nothing changes the gradients here
        train(model_a, with_optimizer, opt_a, data, after_step=pruned_are_zero)
    train(model_b, callbacks_only, opt_b, data, after_step=pruned_are_zero)

    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert with_optimizer.global_step == callbacks_only.global_step == 4 * len(data)
    for name, param in with_optimizer.params.items():
        assert (param == 0).float().mean().item() == pytest.approx(0.8, abs=0.01), name


def test_a_gradient_changed_after_backward_switches_to_remasking_every_step():
    """Noise added to every gradient after backward (as DP-SGD does) would move pruned weights
    through the optimizer; the engine notices at the first step after a mask update, warns once,
    and from then on re-masks after every step: pruned weights are still zero after every step."""
    data = batches()
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruning = Pruning(SPEC).attach(model, steps_per_epoch=len(data), optimizer=optimizer)
    g = torch.Generator().manual_seed(1)

    def add_noise(m: nn.Module) -> None:
        for p in m.parameters():
            p.grad.add_(torch.randn(p.shape, generator=g), alpha=1e-2)

    with pytest.warns(UserWarning, match="re-masking the weights after every step") as caught:
        train(model, pruning, optimizer, data, after_backward=add_noise, after_step=pruned_are_zero)
    assert len([w for w in caught if "re-masking" in str(w.message)]) == 1
    assert (torch.cat([p.detach().reshape(-1) for p in pruning.params.values()]) == 0).float().mean() \
        == pytest.approx(0.8, abs=0.01)


def test_gradients_are_masked_in_backward_while_training_only():
    """Between on_train_begin and on_train_end a pruned weight's gradient is zero as soon as
    backward returns; before and after, the model's gradients are its own (a dense baseline
    trained on the attached model pays nothing)."""
    model = small_net()
    x, y = batches(1)[0]
    pruning = Pruning({"target_sparsity": 0.5, "schedule": "one_shot"}).attach(model, steps_per_epoch=1)
    pruning.on_train_begin()
    pruning.on_epoch_begin(0)  # the one-shot update: half of every tensor pruned
    nn.CrossEntropyLoss()(model(x), y).backward()
    for name, param in pruning.params.items():
        pruned = pruning.masks[name] == 0
        assert pruned.any() and torch.count_nonzero(param.grad[pruned]) == 0, name
        assert torch.count_nonzero(param.grad[~pruned]) > 0, name

    pruning.on_train_end()
    model.zero_grad()
    nn.CrossEntropyLoss()(model(x), y).backward()
    assert any(torch.count_nonzero(p.grad[pruning.masks[n] == 0]) > 0 for n, p in pruning.params.items())

    # finalize() hands back the model without the engine's hooks, also when training did not end.
    again = copy.deepcopy(model)
    first = Pruning({"target_sparsity": 0.5, "schedule": "one_shot"}).attach(again, steps_per_epoch=1)
    first.on_train_begin()
    first.on_epoch_begin(0)
    first.finalize()
    again.zero_grad()
    nn.CrossEntropyLoss()(again(x), y).backward()
    assert any(torch.count_nonzero(p.grad[first.masks[n] == 0]) > 0 for n, p in first.params.items())


def test_the_check_tells_a_moved_pruned_weight_from_a_nan_kept_one():
    """The check after a mask update compares ``w * mask`` with ``w``; a kept NaN (NaN != NaN)
    makes them differ too, but only a pruned weight that is not 0 counts as moved."""
    from harness.pruning.optimizer_state import _pruned_moved

    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    scratch = torch.empty(4)
    assert not _pruned_moved(torch.tensor([0.5, 0.0, -1.0, -0.0]), mask, scratch)
    assert not _pruned_moved(torch.tensor([float("nan"), 0.0, 1.0, 0.0]), mask, scratch)
    assert _pruned_moved(torch.tensor([0.5, 1e-30, 1.0, 0.0]), mask, scratch)
    assert _pruned_moved(torch.tensor([0.5, 0.0, 1.0, float("nan")]), mask, scratch)
