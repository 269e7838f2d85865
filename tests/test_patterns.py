"""Patterns on real tensors: exact counts, whole units, N:M groups, no regrowth, global selection."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.pruning.patterns import (
    _PRUNED,
    NM,
    Block,
    Channel,
    MaskPattern,
    Unstructured,
    make_pattern,
    pruned_count,
    select_global,
    unstructured_mask,
)
from harness.pruning.spec import ChannelNorm, Pattern

SETTINGS = settings(max_examples=40, deadline=None)

dims = st.integers(1, 9)
linear_shapes = st.tuples(dims, dims)
conv_shapes = st.tuples(dims, dims, st.integers(1, 3), st.integers(1, 3))
shapes = st.one_of(st.tuples(st.integers(1, 30)), linear_shapes, conv_shapes)
sparsities = st.floats(0.0, 1.0)
seeds = st.integers(0, 2**31 - 1)


def rand(shape, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def zeros(mask: torch.Tensor) -> int:
    return int((mask == 0).sum())


def view_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() == 1 else t.reshape(t.shape[0], -1)


def blocks_of(t: torch.Tensor, rows: int, cols: int) -> list[torch.Tensor]:
    """Every block of the 2-D view, ragged edges included (a plain loop: the reference)."""
    v = view_2d(t)
    return [
        v[i : i + rows, j : j + cols] for i in range(0, v.shape[0], rows) for j in range(0, v.shape[1], cols)
    ]


def nm_groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """(groups, m): ``m`` consecutive input channels at fixed output and kernel position."""
    return (t.movedim(1, -1) if t.dim() > 2 else t).reshape(-1, m)


@st.composite
def nm_cases(draw):
    m = draw(st.sampled_from([2, 4, 8]))
    n = draw(st.integers(1, m - 1))
    inputs = m * draw(st.integers(1, 3))
    out = draw(dims)
    shape = draw(st.sampled_from([(out, inputs), (out, inputs, draw(st.integers(1, 3)), draw(st.integers(1, 3)))]))
    return n, m, shape


block_shapes = st.tuples(st.integers(1, 4), st.integers(1, 4))
patterns_for_any_shape = st.one_of(
    st.just(Unstructured()),
    block_shapes.map(lambda b: Block(*b)),
    st.sampled_from([Channel(ChannelNorm.l1), Channel(ChannelNorm.l2)]),
)


def granularity(pattern: MaskPattern, shape) -> int:
    """How far the pruned count may be from round(s * numel): the largest unit."""
    return int(pattern.unit_sizes(torch.Size(shape)).max())


# ----- counts and whole units -----


@SETTINGS
@given(shape=shapes, s=sparsities, seed=seeds)
def test_unstructured_prunes_exactly(shape, s, seed):
    mask = Unstructured().mask(rand(shape, seed), s, torch.ones(shape))
    assert mask.shape == torch.Size(shape) and mask.dtype == torch.float32
    assert zeros(mask) == pruned_count(math.prod(shape), s) == round(s * math.prod(shape))


@SETTINGS
@given(shape=shapes, block=block_shapes, s=sparsities, seed=seeds)
def test_block_prunes_whole_blocks_within_one_block(shape, block, s, seed):
    pattern = Block(*block)
    mask = pattern.mask(rand(shape, seed), s, torch.ones(shape))
    for b in blocks_of(mask, *block):  # ragged edge blocks too
        assert bool((b == b.flatten()[0]).all())
    assert abs(zeros(mask) - round(s * math.prod(shape))) <= block[0] * block[1]


@SETTINGS
@given(shape=shapes, norm=st.sampled_from(list(ChannelNorm)), s=sparsities, seed=seeds)
def test_channel_prunes_whole_output_channels(shape, norm, s, seed):
    mask = Channel(norm).mask(rand(shape, seed), s, torch.ones(shape))
    rows = view_2d(mask)
    assert bool(((rows == 0).all(1) | (rows == 1).all(1)).all())
    assert abs(zeros(mask) - round(s * math.prod(shape))) <= rows.shape[1]
    if mask.dim() > 1:  # a pruned output channel is zero across all inputs and kernel positions
        assert zeros(mask) == rows.shape[1] * int((rows == 0).all(1).sum())


@SETTINGS
@given(case=nm_cases(), s=sparsities, seed=seeds)
def test_nm_prunes_round_s_m_in_every_group(case, s, seed):
    n, m, shape = case
    s = min(s, 1 - n / m)
    mask = NM(n, m).mask(rand(shape, seed), s, torch.ones(shape))
    pruned_per_group = (nm_groups(mask, m) == 0).sum(1)
    assert bool((pruned_per_group == pruned_count(m, s)).all())


@SETTINGS
@given(case=nm_cases(), seed=seeds)
def test_nm_keeps_exactly_n_per_group_at_its_sparsity(case, seed):
    n, m, shape = case
    mask = NM(n, m).mask(rand(shape, seed), 1 - n / m, torch.ones(shape))
    assert bool(((nm_groups(mask, m) != 0).sum(1) == n).all())
    assert zeros(mask) == math.prod(shape) * (m - n) // m


def test_nm_groups_run_along_input_channels_of_a_conv():
    # Scores rise with the input channel within each group of 4 and do not depend on (kh, kw):
    # groups along the input dimension prune input channels 0, 1 of every group; groups
    # along any other dimension would not.
    out, inputs, kh, kw = 3, 8, 2, 3
    by_input = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0])
    scores = by_input.view(1, inputs, 1, 1).expand(out, inputs, kh, kw).contiguous()
    scores += torch.arange(out * kh * kw, dtype=torch.float32).view(out, 1, kh, kw) * 10  # irrelevant within groups
    mask = NM(2, 4).mask(scores, 0.5, torch.ones(out, inputs, kh, kw))
    kept_inputs = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(mask, kept_inputs.view(1, inputs, 1, 1).expand_as(mask))


def test_nm_groups_run_along_inputs_of_a_linear():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0, 8.0, 7.0, 6.0], [4.0, 3.0, 2.0, 1.0, 1.0, 9.0, 1.0, 9.0]])
    mask = NM(1, 4).mask(scores, 0.75, torch.ones(2, 8))
    expected = torch.tensor([[0.0, 0, 0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1, 0, 0]])
    assert torch.equal(mask, expected)


# ----- masks only shrink, and rank by score -----

all_patterns = st.one_of(
    patterns_for_any_shape.flatmap(lambda p: st.tuples(st.just(p), shapes)),
    nm_cases().map(lambda c: (NM(c[0], c[1]), c[2])),
)


@SETTINGS
@given(case=all_patterns, s1=sparsities, s2=sparsities, seed=seeds)
def test_no_regrowth_with_fresh_scores(case, s1, s2, seed):
    pattern, shape = case
    if isinstance(pattern, NM):
        s1, s2 = (min(s, 1 - pattern.n / pattern.m) for s in (s1, s2))
    lo, hi = sorted((s1, s2))
    first = pattern.mask(rand(shape, seed), lo, torch.ones(shape))
    second = pattern.mask(rand(shape, seed + 1), hi, first)
    assert bool((second <= first).all())
    # Even a lower sparsity never revives a pruned weight.
    third = pattern.mask(rand(shape, seed + 2), lo / 2, second)
    assert bool((third <= second).all())


@SETTINGS
@given(case=all_patterns, s1=sparsities, s2=sparsities, seed=seeds)
def test_kept_units_score_at_least_the_pruned_ones(case, s1, s2, seed):
    pattern, shape = case
    scores = rand(shape, seed)
    if isinstance(pattern, NM):
        s1, s2 = (min(s, 1 - pattern.n / pattern.m) for s in (s1, s2))
        lo, hi = sorted((s1, s2))
        current = pattern.mask(rand(shape, seed + 1), lo, torch.ones(shape))
        mask = pattern.mask(scores, hi, current)
        live = nm_groups(current, pattern.m) != 0
        kept = nm_groups(mask, pattern.m) != 0
        ranked = nm_groups(scores, pattern.m)
        lowest_kept = ranked.masked_fill(~kept, math.inf).min(1).values
        highest_pruned = ranked.masked_fill(~live | kept, -math.inf).max(1).values
        assert bool((lowest_kept >= highest_pruned).all())
        return
    lo, hi = sorted((s1, s2))
    current = pattern.mask(rand(shape, seed + 1), lo, torch.ones(shape))
    mask = pattern.mask(scores, hi, current)
    unit_scores = pattern.unit_scores(scores)
    live = pattern.unit_keep(current).bool()
    kept = pattern.unit_keep(mask).bool()
    if kept.any() and (live & ~kept).any():
        assert float(unit_scores[kept].min()) >= float(unit_scores[live & ~kept].max())


@SETTINGS
@given(case=all_patterns, s=sparsities, seed=seeds)
def test_unit_keep_and_expand_round_trip(case, s, seed):
    pattern, shape = case
    if isinstance(pattern, NM):
        s = min(s, 1 - pattern.n / pattern.m)
    mask = pattern.mask(rand(shape, seed), s, torch.ones(shape))
    keep = pattern.unit_keep(mask)
    assert keep.dim() == 1
    assert keep.numel() == pattern.unit_scores(mask).numel() == pattern.unit_sizes(mask.shape).numel()
    assert torch.equal(pattern.expand(keep, mask.shape), mask)
    assert int(pattern.unit_sizes(mask.shape).sum()) == mask.numel()


def test_mask_follows_the_current_masks_dtype():
    scores = rand((4, 8), 0)
    for pattern in (Unstructured(), NM(2, 4), Block(2, 2), Channel()):
        assert pattern.mask(scores, 0.5, torch.ones(4, 8, dtype=torch.float16)).dtype == torch.float16
        assert pattern.mask(scores, 0.5, torch.ones(4, 8, dtype=torch.bool)).dtype == torch.float32


def test_block_edges_are_smaller_blocks():
    pattern = Block(2, 3)
    assert pattern.unit_sizes(torch.Size((5, 7))).tolist() == [6, 6, 2, 6, 6, 2, 3, 3, 1]
    # The ragged corner block holds one weight of score 0.5: the cheapest block to prune.
    scores = torch.ones(5, 7)
    scores[4, 6] = 0.5
    mask = pattern.mask(scores, 1 / 35, torch.ones(5, 7))
    assert zeros(mask) == 1 and mask[4, 6] == 0


def test_channel_norms_rank_differently():
    scores = torch.tensor([[3.0, 3.0], [5.0, 0.0]])  # l1: 6 > 5; l2: 4.24 < 5
    assert Channel(ChannelNorm.l1).mask(scores, 0.5, torch.ones(2, 2))[:, 0].tolist() == [1.0, 0.0]
    assert Channel(ChannelNorm.l2).mask(scores, 0.5, torch.ones(2, 2))[:, 0].tolist() == [0.0, 1.0]


def test_unstructured_mask_wrapper():
    assert unstructured_mask(torch.tensor([3.0, 1.0, 2.0, 4.0]), 0.5, torch.ones(4)).tolist() == [1, 0, 0, 1]


# ----- check and validation -----


def test_nm_check_names_the_tensor_and_what_to_do():
    with pytest.raises(ValueError, match=r"conv1\.weight \(64, 3, 7, 7\) has 3 input channels.*m=4; exclude it"):
        NM(2, 4).check("conv1.weight", torch.Size((64, 3, 7, 7)))
    with pytest.raises(ValueError, match=r"fc\.weight \(10, 6\) has 6 inputs"):
        NM(2, 4).check("fc.weight", torch.Size((10, 6)))
    NM(2, 4).check("fc.weight", torch.Size((10, 8)))
    NM(2, 4).check("conv.weight", torch.Size((16, 8, 3, 3)))
    with pytest.raises(ValueError, match="has 6 inputs"):
        NM(2, 4).mask(torch.rand(2, 6), 0.5, torch.ones(2, 6))


def test_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="n=4"):
        NM(4, 4)
    with pytest.raises(ValueError, match=r"sparsity=0\.75.*at most 0\.5"):
        NM(2, 4).mask(torch.rand(1, 4), 0.75, torch.ones(1, 4))
    with pytest.raises(ValueError, match="block rows=0"):
        Block(0, 4)
    with pytest.raises(ValueError, match=r"sparsity=1\.5"):
        Unstructured().mask(torch.rand(4), 1.5, torch.ones(4))
    with pytest.raises(ValueError, match="channel_norm='l3'"):
        Channel("l3")
    with pytest.raises(ValueError, match="pattern='diagonal'"):
        make_pattern("diagonal")
    with pytest.raises(ValueError, match=r"scalar \(\) has no weights"):
        Unstructured().check("scalar", torch.Size(()))


def test_make_pattern():
    assert isinstance(make_pattern(Pattern.unstructured), Unstructured)
    nm = make_pattern("nm", n=1, m=8)
    assert isinstance(nm, NM) and (nm.n, nm.m) == (1, 8) and not nm.supports_global
    block = make_pattern(Pattern.block, block_shape=[4, 1])
    assert isinstance(block, Block) and (block.rows, block.cols) == (4, 1)
    channel = make_pattern(Pattern.channel, channel_norm="l2")
    assert isinstance(channel, Channel) and channel.norm == ChannelNorm.l2
    assert all(p.supports_global for p in (Unstructured(), block, channel))


# ----- select_global -----


def global_inputs(pattern: MaskPattern, scores: dict, masks: dict):
    return (
        {k: pattern.unit_scores(v) for k, v in scores.items()},
        {k: pattern.unit_sizes(v.shape) for k, v in scores.items()},
        {k: pattern.unit_keep(v) for k, v in masks.items()},
    )


def earlier_masks(pattern: MaskPattern, scores: dict, sparsity: float, seed: int) -> dict:
    """Masks from an earlier update, with other scores: some units already pruned."""
    return {
        k: pattern.mask(rand(v.shape, seed - 1 - i), sparsity, torch.ones_like(v))
        for i, (k, v) in enumerate(scores.items())
    }


def greedy_reference(unit_scores, keep, sparsity, max_sparsity):
    """Units of one weight: walk all units lowest first, skip a tensor once at its cap."""
    pruned = {k: int((v == 0).sum()) for k, v in keep.items()}
    total = sum(v.numel() for v in unit_scores.values())
    target = round(sparsity * total)
    live = sorted((float(s), name, i) for name, v in unit_scores.items() for i, s in enumerate(v) if keep[name][i])
    result = {k: v.clone() for k, v in keep.items()}
    for _, name, i in live:
        if sum(pruned.values()) >= target:
            break
        cap = math.floor(max_sparsity * unit_scores[name].numel() + 1e-6) if max_sparsity else math.inf
        if pruned[name] + 1 > cap:
            continue
        result[name][i] = 0
        pruned[name] += 1
    return result


tensor_sets = st.lists(st.integers(1, 40), min_size=1, max_size=5)


@SETTINGS
@given(sizes=tensor_sets, s0=sparsities, s=sparsities, cap=st.one_of(st.none(), st.floats(0.05, 1.0)), seed=seeds,
       ties=st.booleans())
def test_global_selection_in_a_scratch_buffer_is_the_same(sizes, s0, s, cap, seed, ties):
    """The engine's way: scores written into the second half of its buffer, the ranking in the
    first, the result read back from the second: the masks are the ones of a fresh selection."""
    pattern = Unstructured()
    scores = {f"t{i}": (rand(n, seed + i) * 3).floor() if ties else rand(n, seed + i) for i, n in enumerate(sizes)}
    masks = earlier_masks(pattern, scores, s0, seed)
    unit_scores, unit_sizes, keep = global_inputs(pattern, scores, masks)
    expected = select_global(unit_scores, unit_sizes, keep, s, max_sparsity=cap)
    total = sum(sizes)
    scratch = torch.full((2 * total + 3,), float("nan"))
    in_scratch = dict(zip(unit_scores, scratch[total: 2 * total].split(sizes)))
    for name, area in in_scratch.items():
        area.copy_(unit_scores[name])
    result = select_global(in_scratch, unit_sizes, keep, s, max_sparsity=cap, scratch=scratch)
    assert all(torch.equal(result[k], v) for k, v in expected.items())


@SETTINGS
@given(sizes=tensor_sets, s0=sparsities, s=sparsities, cap=st.one_of(st.none(), st.floats(0.05, 1.0)), seed=seeds)
def test_global_unstructured_is_the_greedy_choice(sizes, s0, s, cap, seed):
    pattern = Unstructured()
    scores = {f"t{i}": rand(n, seed + i) for i, n in enumerate(sizes)}
    masks = earlier_masks(pattern, scores, s0, seed)
    unit_scores, unit_sizes, keep = global_inputs(pattern, scores, masks)
    result = select_global(unit_scores, unit_sizes, keep, s, max_sparsity=cap)
    reference = greedy_reference(unit_scores, keep, s, cap)
    assert all(torch.equal(result[k], v) for k, v in reference.items())
    total, target = sum(sizes), round(s * sum(sizes))
    pruned = {k: zeros(v) for k, v in result.items()}
    already = sum(zeros(v) for v in keep.values())
    for k, v in result.items():
        assert bool((v <= keep[k]).all())  # never revives
        if cap is not None:
            assert pruned[k] <= max(math.floor(cap * v.numel() + 1e-6), zeros(keep[k]))
    room = sum(max(math.floor(cap * n + 1e-6), zeros(keep[k])) for k, n in zip(result, sizes)) if cap else total
    assert sum(pruned.values()) == max(already, min(target, room))


@SETTINGS
@given(
    shapes_=st.lists(st.one_of(linear_shapes, conv_shapes), min_size=1, max_size=4),
    pattern=st.one_of(block_shapes.map(lambda b: Block(*b)), st.just(Channel(ChannelNorm.l2))),
    s0=sparsities,
    s=sparsities,
    cap=st.one_of(st.none(), st.floats(0.05, 1.0)),
    seed=seeds,
)
def test_global_structured_respects_caps_and_keeps_pruned(shapes_, pattern, s0, s, cap, seed):
    scores = {f"t{i}": rand(shape, seed + i) for i, shape in enumerate(shapes_)}
    masks = earlier_masks(pattern, scores, s0, seed)
    unit_scores, unit_sizes, keep = global_inputs(pattern, scores, masks)
    result = select_global(unit_scores, unit_sizes, keep, s, max_sparsity=cap)
    pruned_weights = {k: int(unit_sizes[k][v == 0].sum()) for k, v in result.items()}
    for k, v in result.items():
        assert bool((v <= keep[k]).all())
        if cap is not None:
            before = int(unit_sizes[k][keep[k] == 0].sum())
            assert pruned_weights[k] <= max(math.floor(cap * masks[k].numel() + 1e-6), before)
    if cap is None:
        total = sum(m.numel() for m in masks.values())
        already = sum(int(unit_sizes[k][keep[k] == 0].sum()) for k in keep)
        largest = max(int(v.max()) for v in unit_sizes.values())
        assert sum(pruned_weights.values()) >= already
        assert sum(pruned_weights.values()) - max(already, round(s * total)) <= largest
        assert round(s * total) - sum(pruned_weights.values()) <= largest


@SETTINGS
@given(
    case=patterns_for_any_shape.flatmap(lambda p: st.tuples(st.just(p), shapes)),
    s0=sparsities,
    s=sparsities,
    seed=seeds,
)
def test_global_over_one_tensor_is_the_per_tensor_mask(case, s0, s, seed):
    pattern, shape = case
    current = pattern.mask(rand(shape, seed + 1), s0, torch.ones(shape))
    scores = rand(shape, seed)
    unit_scores, unit_sizes, keep = global_inputs(pattern, {"w": scores}, {"w": current})
    keep = select_global(unit_scores, unit_sizes, keep, s)["w"]
    assert torch.equal(pattern.expand(keep, current.shape), pattern.mask(scores, s, current))


def test_global_caps_move_pruning_to_other_tensors():
    unit_scores = {"small": torch.tensor([0.1, 0.2, 0.3, 0.4]), "big": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    ones = {k: torch.ones(4, dtype=torch.int64) for k in unit_scores}
    keep = {k: torch.ones(4) for k in unit_scores}
    uncapped = select_global(unit_scores, ones, keep, 0.5)
    assert uncapped["small"].tolist() == [0, 0, 0, 0] and uncapped["big"].tolist() == [1, 1, 1, 1]
    capped = select_global(unit_scores, ones, keep, 0.5, max_sparsity=0.5)
    assert capped["small"].tolist() == [0, 0, 1, 1] and capped["big"].tolist() == [0, 0, 1, 1]
    # Every tensor capped: stop short of the total.
    assert sum(zeros(v) for v in select_global(unit_scores, ones, keep, 0.9, max_sparsity=0.5).values()) == 4


def test_global_validation_names_the_bad_value():
    one = {"a": torch.ones(2)}
    sizes = {"a": torch.ones(2, dtype=torch.int64)}
    with pytest.raises(ValueError, match="max_sparsity=0"):
        select_global(one, sizes, one, 0.5, max_sparsity=0)
    with pytest.raises(ValueError, match=r"current_keep\['a'\]: 3 units"):
        select_global(one, sizes, {"a": torch.ones(3)}, 0.5)
    with pytest.raises(ValueError, match="unit_sizes: has no entry for 'a'"):
        select_global(one, {}, one, 0.5)


def test_global_runs_over_25_million_weights():
    pattern = Unstructured()
    generator = torch.Generator().manual_seed(0)
    shapes_ = [(1000, 500)] * 50
    unit_scores = {
        f"layer{i}.weight": torch.rand(shape, generator=generator).mul_(i + 1).reshape(-1)
        for i, shape in enumerate(shapes_)
    }
    unit_sizes = {k: pattern.unit_sizes(torch.Size((v.numel(),))) for k, v in unit_scores.items()}
    keep = {k: torch.ones(v.numel()) for k, v in unit_scores.items()}
    result = select_global(unit_scores, unit_sizes, keep, 0.7, max_sparsity=0.9)
    assert sum(zeros(v) for v in result.values()) == round(0.7 * 25_000_000)
    assert max(zeros(v) for v in result.values()) <= 450_000


def _stable_reference(ranked: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the ``k`` lowest by (value, index), and every already pruned one: a stable sort, the
    slow reference."""
    keep = torch.ones(ranked.numel(), dtype=torch.bool)
    keep[torch.argsort(ranked, stable=True)[: max(k, int((ranked == _PRUNED).sum()))]] = False
    return keep


def _large(kind: str, n: int = (1 << 21) + 12_345) -> torch.Tensor:
    """``n`` values, above the size where the sampled selection takes over."""
    g = torch.Generator().manual_seed(3)
    values = torch.rand(n, generator=g)
    if kind == "ties":  # a handful of distinct values: the threshold sits inside a huge tie
        values = torch.randint(0, 4, (n,), generator=g).float()
    elif kind == "already_pruned":  # 60% pruned earlier
        values[: int(0.6 * n)] = _PRUNED
    elif kind == "sorted":
        values = values.sort().values
    elif kind == "periodic":  # the strided sample sees one value only: the bracket misses
        values = (torch.arange(n) % (n // (1 << 16))).float()
    elif kind == "capped":  # units out of the race (+inf) and already pruned ones
        values[::3] = math.inf
        values[1::7] = _PRUNED
    return values


@pytest.mark.parametrize("kind", ["uniform", "ties", "already_pruned", "sorted", "periodic", "capped"])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.9, 0.999])
def test_threshold_selection_is_exact_on_large_tensors(kind, fraction):
    """The sampled threshold selection over millions of units prunes exactly the units a stable
    sort would (ties in index order), whatever the distribution; a sample that misleads it only
    makes it slower."""
    _assert_threshold_selection_exact(_large(kind), fraction)


@pytest.mark.parametrize("kind", ["uniform", "ties", "already_pruned", "periodic"])
@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_threshold_selection_is_exact_just_above_the_sampled_size(kind, fraction):
    """Just above where sampling starts, the sample is a quarter of the values (stride 4)."""
    from harness.pruning.patterns import _EXACT_BELOW

    _assert_threshold_selection_exact(_large(kind, _EXACT_BELOW + 7), fraction)


def _assert_threshold_selection_exact(ranked: torch.Tensor, fraction: float) -> None:
    from harness.pruning.patterns import _keep_above_kth

    in_race = int((~torch.isposinf(ranked)).sum())
    k = min(round(fraction * ranked.numel()), in_race)
    assert torch.equal(_keep_above_kth(ranked, k), _stable_reference(ranked, k))
    assert torch.equal(_keep_above_kth(ranked, k, torch.float32), _stable_reference(ranked, k).float())


def test_negative_scores_are_refused():
    """Pruned units rank at -1 below every score, so scores must be >= 0 (every criterion's are)."""
    with pytest.raises(ValueError, match=r"scores: -0\.5 is negative"):
        Unstructured().mask(torch.tensor([1.0, -0.5]), 0.5, torch.ones(2))


def _in_place(scores: torch.Tensor, s: float, current: torch.Tensor) -> torch.Tensor:
    mask = current.clone()
    out = Unstructured().update_in_place(scores.clone(), s, mask)
    assert out is mask
    return mask


@SETTINGS
@given(shape=shapes, s0=sparsities, s=sparsities, seed=seeds, ties=st.booleans())
def test_in_place_update_is_the_mask(shape, s0, s, seed, ties):
    """The engine's in-place update (its buffers overwritten) gives the mask ``mask()`` gives."""
    scores = rand(shape, seed)
    if ties:
        scores = (scores * 3).floor()
    current = Unstructured().mask(rand(shape, seed + 1), s0, torch.ones(shape))
    assert torch.equal(_in_place(scores, s, current), Unstructured().mask(scores, s, current))


@pytest.mark.parametrize("kind", ["uniform", "ties", "sorted", "periodic"])
@pytest.mark.parametrize("s0,s", [(0.0, 0.3), (0.89, 0.9), (0.6, 0.999)])
def test_in_place_update_is_exact_on_large_tensors(kind, s0, s):
    """Millions of weights: the sampled selection, its band flags written over the mask's bytes."""
    scores = _large(kind).clamp_min(0.0)
    current = torch.ones_like(scores)
    order = torch.randperm(scores.numel(), generator=torch.Generator().manual_seed(5))
    current[order[: round(s0 * scores.numel())]] = 0
    expected = Unstructured().mask(scores, s, current)
    assert torch.equal(_in_place(scores, s, current), expected)
    assert zeros(expected) == max(pruned_count(scores.numel(), s), zeros(current))


def test_in_place_update_refuses_negative_scores_and_keeps_the_mask():
    mask = torch.tensor([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"scores: -2\.0 is negative"):
        Unstructured().update_in_place(torch.tensor([1.0, 3.0, -2.0]), 0.5, mask)
    assert torch.equal(mask, torch.tensor([1.0, 0.0, 1.0]))
