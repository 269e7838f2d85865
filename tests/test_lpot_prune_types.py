"""LPOT 1.6's prune types on the engine: gradient_sensitivity (elementwise and structured) and
pattern_lock; what cannot be honoured is a one-line error naming the key."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from harness.lpot import Pruning
from harness.lpot.document import read_lpot
from harness.pruning.criteria import GradientSensitivity, Taylor
from harness.pruning.patterns import Lock
from tests.test_lpot import lpot_loop, zeros


def wc(*pruners, **fields) -> dict:
    return {"pruning": {"approach": {"weight_compression": {**fields, "pruners": list(pruners)}}}}


class Wide(nn.Module):
    """Linear(6 -> 8) -> ReLU -> Linear(8 -> 3); input feature 0 is always 0 in the data below."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x)))


def batches(n: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(16, 6, generator=g)
        x[:, 0] = 0.0  # no gradient ever reaches the weights of input 0
        out.append((x, torch.randint(0, 3, (16,), generator=g)))
    return out


def test_gradient_sensitivity_sums_over_updates_where_taylor_restarts():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    w.grad = torch.tensor([3.0, 1.0])
    gs, taylor = GradientSensitivity(), Taylor()
    for scorer in (gs, taylor):
        scorer.observe("w", w)
        scorer.after_update("w")
        scorer.observe("w", w)
    assert torch.equal(gs.scores("w", w), torch.tensor([6.0, 4.0]))
    assert torch.equal(taylor.scores("w", w), torch.tensor([3.0, 2.0]))


def test_elementwise_gradient_sensitivity_prunes_weights_without_gradient_first():
    torch.manual_seed(0)
    net = Wide()
    with torch.no_grad():
        net.fc.weight[:, 0] = 5.0  # the largest weights, but no gradient ever reaches them
    conf = wc({"names": ["fc.weight"], "prune_type": "gradient_sensitivity", "target_sparsity": 0.125,
               "start_epoch": 1, "end_epoch": 1})
    prune = Pruning(conf)
    data = batches()
    prune(net, train_dataloader=data, pruning_func=lpot_loop(prune, data, epochs=2))
    assert zeros(net.fc.weight) == 6 == round(0.125 * 48)
    assert zeros(net.fc.weight[:, 0]) == 6  # |grad * w| = 0 there
    # Magnitude would have kept exactly those.
    net2 = Wide()
    with torch.no_grad():
        net2.fc.weight.fill_(1.0)
        net2.fc.weight[:, 0] = 5.0
    magnitude = Pruning(wc({"names": ["fc.weight"], "target_sparsity": 0.125, "start_epoch": 0, "end_epoch": 0}))
    magnitude(net2, train_dataloader=data, pruning_func=lpot_loop(magnitude, data, epochs=1))
    assert zeros(net2.fc.weight[:, 0]) == 0


def test_structured_gradient_sensitivity_keeps_target_groups_of_stride_rows_or_columns():
    params = {"target": 2, "stride": 2, "normalize": True, "transpose": False,
              "importance_inputs": ["fc.weight"], "importance_metric": "weighted_gradient"}
    conf = wc({"names": ["fc.weight"], "prune_type": "gradient_sensitivity", "start_epoch": 0, "end_epoch": 1,
               "parameters": params},
              {"names": ["out.weight"], "prune_type": "gradient_sensitivity", "start_epoch": 0, "end_epoch": 1,
               "parameters": {**params, "target": 3, "stride": 1, "transpose": True,
                              "importance_inputs": ["out.weight"]}})
    torch.manual_seed(0)
    net = Wide()
    prune = Pruning(conf)
    data = batches()
    prune(net, train_dataloader=data, pruning_func=lpot_loop(prune, data, epochs=2))
    rows = (net.fc.weight != 0).any(dim=1)  # 8 rows in groups of 2: 2 groups kept
    assert int(rows.sum()) == 4
    kept_groups = rows.view(4, 2)
    assert bool((kept_groups.all(dim=1) | ~kept_groups.any(dim=1)).all())  # whole groups, never half of one
    assert zeros(net.fc.weight) == 4 * 6
    columns = (net.out.weight != 0).any(dim=0)  # transpose: 8 columns in groups of 1, 3 kept
    assert int(columns.sum()) == 3 and zeros(net.out.weight) == 5 * 3


@pytest.mark.parametrize(("parameters", "key", "says"), [
    ({"target": 8, "stride": 64, "importance_inputs": ["head_mask"], "importance_metric": "abs_gradient"},
     "parameters.importance_metric='abs_gradient'", "not supported"),
    ({"target": 8, "stride": 64, "importance_inputs": ["head_mask"]},
     "parameters.importance_inputs=['head_mask']", "names a model input"),
    ({"stride": 64}, "parameters.target", "missing"),
    ({"target": 0, "stride": 1}, "parameters.target=0", "must be >= 1"),
    ({"target": 1, "stride": 1, "window": 3}, "parameters.window", "unknown gradient_sensitivity parameter"),
])
def test_what_cannot_be_honoured_is_one_line_naming_the_key(parameters, key, says):
    conf = wc({"names": ["fc.weight"], "prune_type": "gradient_sensitivity", "parameters": parameters})
    with pytest.raises(ValueError) as err:
        read_lpot(conf)
    message = str(err.value)
    assert f"pruning.approach.weight_compression.pruners[0].{key}" in message and says in message
    assert "\n" not in message


def test_a_structured_pruner_needs_the_model_so_the_command_line_says_to_use_python():
    from harness.lpot.migration import migrate

    conf = wc({"names": ["fc.weight"], "prune_type": "gradient_sensitivity", "parameters": {"target": 1, "stride": 1}})
    with pytest.raises(ValueError, match=re.escape("pruners[0].parameters: structured gradient_sensitivity")):
        migrate(read_lpot(conf))


def test_pattern_lock_keeps_the_zeros_of_a_pre_sparsified_model_while_fine_tuning():
    torch.manual_seed(0)
    net = Wide()
    with torch.no_grad():
        net.fc.weight[net.fc.weight.abs() < 0.2] = 0.0
    zero_pattern = net.fc.weight == 0
    assert 0 < int(zero_pattern.sum()) < 48
    before = net.fc.weight.detach().clone()
    prune = Pruning(wc({"names": ["fc.weight"], "prune_type": "pattern_lock"}, start_epoch=0, end_epoch=2))
    data = batches()

    # momentum and weight decay would revive zeros without the lock
    train_func = lpot_loop(prune, data, 3, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9,
                                                                                weight_decay=1e-3))

    prune(net, train_dataloader=data, pruning_func=train_func)
    assert torch.equal(net.fc.weight == 0, zero_pattern)  # the same zeros, no more, no fewer
    assert not torch.equal(net.fc.weight[~zero_pattern], before[~zero_pattern])  # the rest trained
    assert torch.equal(Lock().initial_mask(torch.tensor([0.0, 2.0, 0.0])), torch.tensor([0.0, 1.0, 0.0]))
