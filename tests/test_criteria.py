"""Scorers on real tensors: magnitude, Taylor, snip_momentum, random, and their state."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.pruning.criteria import (
    CRITERIA,
    Magnitude,
    RandomScores,
    Scorer,
    SnipMomentum,
    Taylor,
    make_scorer,
)
from harness.pruning.patterns import Unstructured
from harness.pruning.spec import Criterion


def parameter(values) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


def observe_steps(scorer: Scorer, name: str, param: torch.nn.Parameter, steps) -> None:
    """One observed step per (weights, gradient): the weights change between steps, as with an optimizer."""
    for weights, grad in steps:
        with torch.no_grad():
            param.copy_(torch.tensor(weights))
        param.grad = torch.tensor(grad)
        scorer.observe(name, param)


STEPS = [
    ([1.0, -2.0, 0.5], [1.0, 1.0, -4.0]),  # |w * g| = [1, 2, 2]
    ([2.0, -2.0, 0.0], [1.0, 0.0, 3.0]),  # |w * g| = [2, 0, 0]
    ([1.0, 3.0, 1.0], [-3.0, 1.0, 1.0]),  # |w * g| = [3, 3, 1]
]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=20))
def test_magnitude_is_abs(values):
    w = parameter(values)
    scores = Magnitude().scores("w", w)
    assert scores.dtype == torch.float32 and torch.equal(scores, w.detach().abs())
    assert torch.equal(CRITERIA[Criterion.magnitude](w), scores)


def test_magnitude_of_half_weights_is_float32():
    w = torch.tensor([-1.5, 2.0], dtype=torch.float16)
    assert Magnitude().scores("w", w).dtype == torch.float32


def test_taylor_sums_abs_w_times_grad_and_resets_after_update():
    taylor, w = Taylor(), parameter([0.0, 0.0, 0.0])
    assert taylor.needs_gradients
    observe_steps(taylor, "w", w, STEPS)
    assert torch.equal(taylor.scores("w", w), torch.tensor([6.0, 5.0, 3.0]))
    assert torch.equal(taylor.scores("w", w), torch.tensor([6.0, 5.0, 3.0]))  # reading does not change it
    taylor.after_update("w")
    assert torch.equal(taylor.scores("w", w), w.detach().abs())  # nothing observed since: |w|
    observe_steps(taylor, "w", w, STEPS[1:2])
    assert torch.equal(taylor.scores("w", w), torch.tensor([2.0, 0.0, 0.0]))


def test_snip_momentum_follows_alpha_beta_recurrence_and_never_resets():
    snip, w = SnipMomentum(), parameter([0.0, 0.0, 0.0])
    assert (snip.alpha, snip.beta) == (0.9, 1.0)
    observe_steps(snip, "w", w, STEPS)
    # s1 = [1, 2, 2]; s2 = 0.9 * s1 + [2, 0, 0] = [2.9, 1.8, 1.8]; s3 = 0.9 * s2 + [3, 3, 1] = [5.61, 4.62, 2.62]
    expected = torch.tensor([5.61, 4.62, 2.62])
    torch.testing.assert_close(snip.scores("w", w), expected)
    snip.after_update("w")
    torch.testing.assert_close(snip.scores("w", w), expected)


def test_snip_momentum_with_other_alpha_beta():
    snip, w = SnipMomentum(alpha=0.5, beta=2.0), parameter([0.0, 0.0, 0.0])
    observe_steps(snip, "w", w, STEPS[:2])
    # s1 = 2 * [1, 2, 2] = [2, 4, 4]; s2 = 0.5 * s1 + 2 * [2, 0, 0] = [5, 2, 2]
    torch.testing.assert_close(snip.scores("w", w), torch.tensor([5.0, 2.0, 2.0]))


@pytest.mark.parametrize("scorer_type", [Taylor, SnipMomentum])
def test_gradient_criteria_fall_back_to_magnitude_before_any_gradient(scorer_type):
    scorer, w = scorer_type(), parameter([3.0, -1.0, 0.5])
    assert torch.equal(scorer.scores("w", w), torch.tensor([3.0, 1.0, 0.5]))
    w.grad = None  # a parameter unused at this step: nothing is observed
    scorer.observe("w", w)
    assert torch.equal(scorer.scores("w", w), torch.tensor([3.0, 1.0, 0.5]))


@pytest.mark.parametrize("scorer_type", [Taylor, SnipMomentum])
def test_gradient_criteria_keep_tensors_apart(scorer_type):
    scorer, a, b = scorer_type(), parameter([1.0, 2.0]), parameter([1.0, 1.0])
    a.grad, b.grad = torch.tensor([1.0, 1.0]), torch.tensor([5.0, 0.0])
    scorer.observe("a", a)
    scorer.observe("b", b)
    assert torch.equal(scorer.scores("a", a), torch.tensor([1.0, 2.0]))
    assert torch.equal(scorer.scores("b", b), torch.tensor([5.0, 0.0]))


@pytest.mark.parametrize("scorer_type", [Taylor, SnipMomentum])
def test_state_dict_round_trip(scorer_type):
    original, w = scorer_type(), parameter([0.0, 0.0, 0.0])
    observe_steps(original, "w", w, STEPS[:2])
    state = original.state_dict()
    assert all(t.device.type == "cpu" for t in state["scores"].values())

    resumed = scorer_type()
    resumed.load_state_dict(state)
    assert torch.equal(resumed.scores("w", w), original.scores("w", w))
    observe_steps(original, "w", w, STEPS[2:])
    observe_steps(resumed, "w", w, STEPS[2:])
    assert torch.equal(resumed.scores("w", w), original.scores("w", w))

    state_after_reset = scorer_type()
    original.after_update("w")
    state_after_reset.load_state_dict(original.state_dict())
    assert torch.equal(state_after_reset.scores("w", w), original.scores("w", w))


def test_random_scores_are_seeded_per_tensor_and_stable():
    w = torch.zeros(50)
    first = RandomScores(seed=3).scores("fc.weight", w)
    assert first.dtype == torch.float32 and bool((first >= 0).all()) and bool((first < 1).all())
    assert torch.equal(first, RandomScores(seed=3).scores("fc.weight", w))
    assert not torch.equal(first, RandomScores(seed=4).scores("fc.weight", w))
    assert not torch.equal(first, RandomScores(seed=3).scores("conv.weight", w))
    scorer = RandomScores(seed=3)
    scorer.scores("fc.weight", w).zero_()  # a caller's change does not reach the stored scores
    assert torch.equal(scorer.scores("fc.weight", w + 5), first)  # nor do the weights
    assert RandomScores().state_dict() == {} and not RandomScores.needs_gradients


def test_random_masks_are_nested_as_sparsity_rises():
    scorer, pattern, w = RandomScores(seed=7), Unstructured(), torch.zeros(20, 20)
    mask = torch.ones_like(w)
    for sparsity in (0.2, 0.5, 0.8):
        fresh = pattern.mask(scorer.scores("w", w), sparsity, torch.ones_like(w))
        assert torch.equal(pattern.mask(scorer.scores("w", w), sparsity, mask), fresh)  # nested without help
        mask = fresh


def test_make_scorer():
    assert isinstance(make_scorer(Criterion.magnitude), Magnitude)
    assert isinstance(make_scorer("taylor"), Taylor)
    assert isinstance(make_scorer(Criterion.snip_momentum), SnipMomentum)
    random = make_scorer(Criterion.random, seed=11)
    assert isinstance(random, RandomScores) and random.seed == 11
    with pytest.raises(ValueError, match="criterion='obd': must be one of magnitude, taylor"):
        make_scorer("obd")
    with pytest.raises(ValueError, match="alpha=-1"):
        SnipMomentum(alpha=-1)


@pytest.mark.parametrize("scorer_type", [Magnitude, Taylor, SnipMomentum, RandomScores])
def test_scores_into_writes_the_scores(scorer_type):
    """The engine's path (scores written into its buffer) gives the scores themselves."""
    scorer, w = scorer_type(), parameter([0.5, -2.0, 1.0])
    if scorer.needs_gradients:
        observe_steps(scorer, "w", w, STEPS)
    out = torch.full((3,), float("nan"))
    assert scorer.scores_into("w", w, out) is out
    assert torch.equal(out, scorer.scores("w", w))


def test_magnitude_into_half_weights():
    from harness.pruning.criteria import magnitude_into

    w = torch.tensor([-1.5, 2.0], dtype=torch.float16)
    assert torch.equal(magnitude_into(w, torch.empty(2)), torch.tensor([1.5, 2.0]))
