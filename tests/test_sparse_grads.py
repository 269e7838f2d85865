"""Kept-only weight gradients for highly pruned Linear layers: the same training up to float
rounding, pruned weights' gradients exactly zero, and the plain path wherever that is not known."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.pruning import Pruning
from harness.pruning.sparse_grads import MAX_DENSITY, MIN_ROWS, MIN_WEIGHTS, KeptGradForward

SPEC = {"target_sparsity": 0.9, "schedule": "one_shot"}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def data(rows: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(rows, 1024, generator=g), torch.randint(0, 10, (rows,), generator=g)


def started(model: nn.Module, **spec) -> Pruning:
    pruning = Pruning({**SPEC, **spec}).attach(model, steps_per_epoch=1)
    pruning.on_train_begin()
    pruning.on_epoch_begin(0)  # the one-shot update: 90% of every weight pruned
    return pruning


def on_path(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m.__dict__.get("forward"), KeptGradForward)]


def test_large_sparse_linears_take_the_path_and_their_gradients_are_the_masked_ones():
    """Layers of at least MIN_WEIGHTS at <= MAX_DENSITY take the path (the 10-row output layer is
    too small); each gradient equals the dense gradient times the mask, pruned entries exactly 0."""
    model, reference = mlp(), mlp()
    pruning, plain = started(model), started(reference, sparse_grads=False)
    assert on_path(model) == ["0", "2"] and on_path(reference) == []
    assert MIN_WEIGHTS <= 1024 * 1024 and MAX_DENSITY >= 0.1 and MIN_ROWS <= 32
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
        if name in pruning.masks:
            assert torch.count_nonzero(p.grad[pruning.masks[name] == 0]) == 0, name
    assert plain.params.keys() == pruning.params.keys()


def test_training_matches_the_plain_path_and_ends_with_the_class_forward():
    """Ten SGD steps with momentum: the same weights up to float rounding, pruned weights 0 after
    every step; after on_train_end the modules run their class's forward again."""
    model, reference = mlp(), mlp()
    runs = []
    for m, spec in ((model, {}), (reference, {"sparse_grads": False})):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        pruning = Pruning({**SPEC, **spec}).attach(m, steps_per_epoch=10, optimizer=optimizer)
        pruning.on_train_begin()
        pruning.on_epoch_begin(0)
        for step in range(10):
            x, y = data()
            x = x + 0.01 * step
            optimizer.zero_grad()
            F.cross_entropy(m(x), y).backward()
            optimizer.step()
            for name, p in pruning.params.items():
                assert torch.count_nonzero(p[pruning.masks[name] == 0]) == 0, (step, name)
        pruning.on_train_end()
        runs.append(pruning)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name
    assert on_path(model) == [] and runs[0]._kept_grads == {}
    assert "forward" not in model[0].__dict__


def test_a_weight_also_used_elsewhere_is_still_masked():
    """A dense gradient from another use of the weight is added to the kept-only one: the sum is
    not the tensor the path made, so the engine masks it."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(1024, 1024)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + F.linear(x, self.fc.weight)  # the second use bypasses the module

    model = Shared()
    pruning = started(model)
    assert on_path(model) == ["fc"]
    model(torch.randn(32, 1024)).square().sum().backward()
    pruned = pruning.masks["fc.weight"] == 0
    assert torch.count_nonzero(model.fc.weight.grad[pruned]) == 0
    assert torch.count_nonzero(model.fc.weight.grad[~pruned]) > 0


def test_gradients_accumulated_over_micro_batches_stay_masked():
    model, reference = mlp(), mlp()
    pruning, _ = started(model), started(reference, sparse_grads=False)
    for rows in (32, 48):  # two backwards into the same .grad, no zero_grad between
        x, y = data(rows)
        F.cross_entropy(model(x), y).backward()
        F.cross_entropy(reference(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
    assert torch.count_nonzero(model[2].weight.grad[pruning.masks["2.weight"] == 0]) == 0


def test_sequence_inputs_and_no_grad_forward():
    """(batch, seq, features) inputs give the same gradients; under no_grad (evaluation) the forward
    is the plain one, and with the path its outputs are the module's own."""
    model, reference = mlp(), mlp()
    started(model), started(reference, sparse_grads=False)
    x = torch.randn(4, 8, 1024)
    model(x).square().mean().backward()
    reference(x).square().mean().backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert torch.equal(model(x), reference(x))


def test_what_stays_off_the_path():
    """Density above MAX_DENSITY, small layers, frozen weights, half precision, and the model before
    training starts (the runner's dense baseline) keep the plain path."""
    for model, spec in ((mlp(), {"target_sparsity": 0.5}), (mlp().to(torch.bfloat16), {})):
        started(model, **spec)
        assert on_path(model) == []
    frozen = mlp()
    frozen[0].weight.requires_grad_(False)
    started(frozen)
    assert on_path(frozen) == ["2"]  # frozen[0] is pruned, but not trained: no gradient to compute
    model = mlp()
    Pruning(SPEC).attach(model, steps_per_epoch=1)
    assert on_path(model) == []


def test_resume_and_finalize():
    """load_state_dict during training rebuilds the patterns from the loaded masks; finalize()
    leaves the plain model (a deep copy of it has no trace of the path either)."""
    model = mlp()
    pruning = started(model)
    state = pruning.state_dict()
    other = mlp()
    resumed = Pruning(SPEC).attach(other, steps_per_epoch=1)
    resumed.on_train_begin()
    resumed.load_state_dict(state)
    assert on_path(other) == ["0", "2"]
    x, y = data()
    F.cross_entropy(other(x), y).backward()
    assert torch.count_nonzero(other[0].weight.grad[resumed.masks["0.weight"] == 0]) == 0
    final = copy.deepcopy(pruning.finalize())
    assert on_path(model) == [] and on_path(final) == []


@pytest.mark.parametrize("value", ["yes", 2])
def test_sparse_grads_must_be_a_bool(value):
    with pytest.raises(ValueError, match=f"sparse_grads={value}"):
        Pruning({**SPEC, "sparse_grads": value})


def test_a_second_derivative_is_refused_not_wrong():
    model = mlp()
    started(model)
    x = torch.randn(32, 1024, requires_grad=True)
    (grad_x,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        grad_x.sum().backward()


def test_few_rows_take_the_dense_product_masked_as_usual():
    """Below MIN_ROWS rows of input the dense product is faster: the gradient is the engine's
    usual masked one."""
    model, reference = mlp(), mlp()
    pruning, _ = started(model), started(reference, sparse_grads=False)
    x, y = data(MIN_ROWS - 1)
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    assert torch.count_nonzero(model[0].weight.grad[pruning.masks["0.weight"] == 0]) == 0


def test_the_engine_skips_the_mask_multiply_only_for_the_gradient_the_path_made(monkeypatch):
    """The saving itself: the gradient the path made alone is taken as it is (no multiply by the
    mask); summed with another use of the weight, it is not, and gets masked."""
    from harness.pruning.sparse_grads import KeptPattern

    answers: list[bool] = []
    produced = KeptPattern.produced
    monkeypatch.setattr(KeptPattern, "produced", lambda self, grad: answers.append(produced(self, grad)) or answers[-1])
    model = mlp()
    started(model)
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    assert answers == [True, True]  # both large layers, backward's order

    answers.clear()
    model.zero_grad()
    h = model[0](x)
    (model[2](h) + F.linear(h, model[2].weight)).sum().backward()  # the weight used twice
    assert answers == [False, True]
