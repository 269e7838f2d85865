"""Patterns: turn scores and a sparsity into a keep-mask (1.0 keeps, 0.0 prunes).

A pattern says which weights are pruned together (its *units*: one weight, a block, an
output channel) and how a unit is scored from the scores of its weights. The selection is
shared: rank the units, lowest first, and prune until the sparsity is reached, either per
tensor (``MaskPattern.mask``) or over several tensors at once (``select_global``).
The engine updates its masks through ``update_mask`` (per tensor) and ``update_masks`` (global);
``Unstructured`` gives both a faster path that scores and ranks in the engine's reusable buffer.

Masks only shrink: a unit already fully pruned ranks below every live unit and is never
revived, whatever its score now. Masks have the parameter's shape and the dtype of the
current mask (float32 when that is not a floating type).

The 2-D view of a weight of shape ``(out, in, *kernel)`` has ``out`` rows and
``in * prod(kernel)`` columns; a 1-D weight is a single row.

Example::

    pattern = make_pattern(Pattern.block, block_shape=(1, 2))
    pattern.mask(torch.tensor([[1.0, 2.0, 5.0, 6.0]]), 0.5, torch.ones(1, 4))
    # tensor([[0., 0., 1., 1.]])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import torch

from .criteria import Scorer
from .scratch import Scratch
from .spec import ChannelNorm, Pattern

__all__ = [
    "NM",
    "Block",
    "Channel",
    "Lock",
    "MaskPattern",
    "Unstructured",
    "make_pattern",
    "pruned_count",
    "select_global",
    "unstructured_mask",
]

_PRUNED = -1.0  # the rank of an already-pruned unit: below every live one (scores are >= 0)


def pruned_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a ``sparsity`` prunes: the nearest whole number.

    LPOT thresholded at a percentile with ``<=`` and so pruned one weight more than asked.
    """
    return min(numel, max(0, round(sparsity * numel)))


def _check_sparsity(sparsity: float, key: str = "sparsity") -> None:
    if not 0.0 <= sparsity <= 1.0:  # also rejects NaN
        raise ValueError(f"{key}={sparsity}: must be in [0, 1]")


def _ranked(scores: torch.Tensor, keep: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """1-D float32 ranks: the scores (>= 0) of live units, ``_PRUNED`` for pruned ones (keep 0).

    ``(keep - 1) + scores * keep``: two vectorised float passes, exact for live units (a bool
    ``masked_fill`` takes several times as long on this machine's CPUs).
    """
    scores = scores.detach().reshape(-1).to(torch.float32)
    _check_non_negative(scores)
    keep = keep.reshape(-1).to(device=scores.device, dtype=torch.float32)  # no copy when already so
    return torch.sub(keep, 1.0, out=out).addcmul_(scores, keep)


def _check_non_negative(scores: torch.Tensor) -> None:
    if scores.numel() and float(scores.min()) < 0:
        raise ValueError(f"scores: {float(scores.min())} is negative; criteria score weights >= 0")


def _mask_dtype(mask: torch.Tensor) -> torch.dtype:
    return mask.dtype if mask.is_floating_point() else torch.float32


def _shape_2d(shape: torch.Size) -> tuple[int, int]:
    """Rows and columns of the 2-D view: ``(out, in * prod(kernel))``; a 1-D weight is one row."""
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


class MaskPattern:
    """Base class: units, their scores and sizes; the selection lives here once.

    A subclass says what its units are: ``unit_scores`` (scores -> one score per unit),
    ``unit_sizes`` (weights per unit) and ``expand`` (a unit keep-mask -> a weight mask).
    ``unit_keep`` and ``mask`` follow from these; ``unit_keep`` relies on a unit score being
    positive exactly when one of its weights has a positive score (sums and norms are).

    ``supports_global``: whether its units may be ranked across tensors (``select_global``).
    """

    supports_global: ClassVar[bool] = True

    def check(self, name: str, shape: torch.Size) -> None:
        """Raise ``ValueError`` naming the tensor when this pattern cannot apply to it.

        Args:
            name: the parameter's name, for the message.
            shape: the parameter's shape.
        """
        if len(shape) == 0 or math.prod(shape) == 0:
            raise ValueError(f"pattern={self}: {name} {tuple(shape)} has no weights to prune; exclude it")

    def initial_mask(self, param: torch.Tensor) -> torch.Tensor:
        """The mask a tensor starts with when the engine attaches: all ones (nothing pruned yet)."""
        return torch.ones_like(param, memory_format=torch.contiguous_format).detach()

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """One float32 score per unit (1-D), from the scores of the weights."""
        raise NotImplementedError(f"{type(self).__name__} must implement unit_scores()")

    def unit_sizes(self, shape: torch.Size) -> torch.Tensor:
        """Weights per unit (1-D int64, aligned with ``unit_scores``; may be a read-only view)."""
        raise NotImplementedError(f"{type(self).__name__} must implement unit_sizes()")

    def expand(self, unit_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """A 1-D unit keep-mask -> a weight mask of ``shape`` (the dtype of ``unit_keep``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement expand()")

    def unit_keep(self, mask: torch.Tensor) -> torch.Tensor:
        """A weight mask -> a 1-D unit keep-mask; a unit is pruned when all its weights are."""
        live = self.unit_scores(mask.ne(0).to(torch.float32)) > 0
        return live.to(_mask_dtype(mask))

    def mask(self, scores: torch.Tensor, sparsity: float, current_mask: torch.Tensor, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The new weight mask of one tensor: prune its lowest units, already-pruned first.

        Prunes until ``round(sparsity * numel)`` weights are pruned; with equal units that is
        ``round(sparsity * n_units)`` units, with ragged units the count is met up to the
        unit that crosses it (the closer side). Already-pruned units stay pruned, also when
        ``sparsity`` is lower than the current one.

        Args:
            scores: the criterion's scores, the parameter's shape (>= 0).
            sparsity: the fraction of weights to prune, in [0, 1].
            current_mask: the mask in force (1 keeps, 0 prunes).
            out: optional contiguous tensor of the mask's shape to write the mask into (it may be
                ``current_mask`` itself: the engine updates its masks in place).

        Returns:
            The mask, of ``scores.shape`` and the dtype of ``current_mask`` (``out`` when given).
        """
        _check_sparsity(sparsity)
        keep = select_global(
            {"": self.unit_scores(scores)},
            {"": self.unit_sizes(scores.shape)},
            {"": self.unit_keep(current_mask)},
            sparsity,
        )[""]
        return _into(self.expand(keep, scores.shape).to(_mask_dtype(current_mask)), out)

    def update_mask(self, scorer: Scorer, name: str, param: torch.Tensor, mask: torch.Tensor, sparsity: float,
                    scratch: Scratch) -> None:
        """The engine's update of one tensor (per-tensor scope): ``mask`` rewritten in place.

        Args:
            scorer: scores ``param``.
            name: the parameter's name, for the scorer.
            param: the parameter.
            mask: its mask in force, overwritten with the new one.
            sparsity: the fraction of its weights to prune.
            scratch: the engine's reusable buffer, for a pattern that scores and ranks in it.
        """
        self.mask(scorer.scores(name, param), sparsity, mask, out=mask)

    def update_masks(self, scorer: Scorer, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                     sparsity: float, max_sparsity: float | None, scratch: Scratch) -> None:
        """The engine's update of several tensors ranked together (global scope, ``select_global``).

        Args:
            scorer: scores the parameters.
            params: the parameters, by name.
            masks: their masks in force (by the same names; others are left alone), overwritten in place.
            sparsity: the fraction of all their weights together to prune.
            max_sparsity: a cap on each tensor's own sparsity, or ``None``.
            scratch: the engine's reusable buffer, for a pattern that scores and ranks in it.
        """
        ranking_buffer, unit_scores = self._global_unit_scores(scorer, params, masks, scratch)
        unit_sizes = {name: self.unit_sizes(param.shape) for name, param in params.items()}
        current = {name: self.unit_keep(masks[name]) for name in params}
        keep = select_global(unit_scores, unit_sizes, current, sparsity, max_sparsity, scratch=ranking_buffer)
        for name, param in params.items():
            masks[name].copy_(self.expand(keep[name], param.shape))

    def _global_unit_scores(self, scorer: Scorer, params: Mapping[str, torch.Tensor],
                            masks: Mapping[str, torch.Tensor],
                            scratch: Scratch) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Each tensor's unit scores for ``update_masks``, and the buffer ``select_global`` may rank
        in (``None``: its own memory)."""
        return None, {name: self.unit_scores(scorer.scores(name, param)) for name, param in params.items()}

    def __repr__(self) -> str:
        return type(self).__name__.lower()


class _OneWeightUnits(MaskPattern):
    """Units of one weight each: the unit view is the flat tensor."""

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.detach().reshape(-1).to(torch.float32)

    def unit_sizes(self, shape: torch.Size) -> torch.Tensor:
        return torch.ones(1, dtype=torch.int64).expand(math.prod(shape))

    def expand(self, unit_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return unit_keep.reshape(shape)

    def unit_keep(self, mask: torch.Tensor) -> torch.Tensor:
        flat = mask.reshape(-1)  # a float mask of 0s and 1s is its own unit keep-mask: no copy
        return flat if flat.is_floating_point() else flat.ne(0).to(torch.float32)


class Unstructured(_OneWeightUnits):
    """Each weight on its own: exactly ``round(sparsity * numel)`` weights are pruned.

    Example::

        Unstructured().mask(torch.tensor([3.0, 1.0, 2.0, 4.0]), 0.5, torch.ones(4))
        # tensor([1., 0., 0., 1.])
    """

    def mask(self, scores: torch.Tensor, sparsity: float, current_mask: torch.Tensor, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
        _check_sparsity(sparsity)
        ranked = _ranked(scores, current_mask)
        # Already pruned stays pruned, even if fewer are asked for now (_keep_above_kth).
        keep = _keep_above_kth(ranked, pruned_count(ranked.numel(), sparsity), _mask_dtype(current_mask),
                               out=None if out is None else out.view(-1))
        return out if out is not None else keep.view(scores.shape)

    def update_in_place(self, scores: torch.Tensor, sparsity: float, mask: torch.Tensor) -> torch.Tensor:
        """``mask(scores, sparsity, mask, out=mask)`` with no fresh memory: ``scores`` is the
        ranking buffer, so both are overwritten (the engine's own buffers: first touches of new
        memory cost several times the passes here). Both float32 and contiguous.
        """
        _check_sparsity(sparsity)
        ranked, keep = scores.view(-1), mask.view(-1)
        _check_non_negative(ranked)
        # The ranks of _ranked, the same sum in the other order: scores * keep, plus keep - 1
        # (0 for live units, _PRUNED for pruned ones), which the mask holds until it is rewritten.
        ranked.mul_(keep)
        ranked.add_(keep.sub_(1.0))
        _keep_above_kth(ranked, pruned_count(ranked.numel(), sparsity), torch.float32, out=keep)
        return mask

    def update_mask(self, scorer: Scorer, name: str, param: torch.Tensor, mask: torch.Tensor, sparsity: float,
                    scratch: Scratch) -> None:
        if mask.dtype != torch.float32:
            super().update_mask(scorer, name, param, mask, sparsity, scratch)
            return
        # Scores straight into the engine's buffer, which then holds the ranking.
        self.update_in_place(scorer.scores_into(name, param, scratch.like(param)), sparsity, mask)

    def _global_unit_scores(self, scorer: Scorer, params: Mapping[str, torch.Tensor],
                            masks: Mapping[str, torch.Tensor],
                            scratch: Scratch) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        targets = [masks[name] for name in params]
        if not (all(m.dtype == torch.float32 for m in targets) and len({m.device for m in targets}) == 1):
            return super()._global_unit_scores(scorer, params, masks, scratch)
        # Scores straight into the second half of the engine's buffer, ranking into the first.
        sizes = [param.numel() for param in params.values()]
        buffer = scratch.get(2 * sum(sizes), targets[0].device)
        score_areas = buffer[sum(sizes):].split(sizes)
        return buffer, {name: scorer.scores_into(name, param, area.view(param.shape)).view(-1)
                        for (name, param), area in zip(params.items(), score_areas, strict=True)}


class NM(_OneWeightUnits):
    """N:M: in every group of ``m`` consecutive weights along the input dimension, keep ``n``.

    Groups follow NVIDIA ASP: for a Linear weight ``(out, in)`` they run along ``in``; for a
    conv weight ``(out, in, kh, kw)`` along ``in`` at each fixed ``(kh, kw)`` (the weight
    viewed as ``(out, kh, kw, in)``). At ``sparsity = 1 - n/m`` every group keeps exactly
    ``n``; below that each group prunes ``round(sparsity * m)`` (already-pruned first), so
    the sparsity is reached up to the granularity ``1/m``. Ranking is within groups only,
    so there is no global selection.

    Args:
        n: weights kept per group at the target, ``1 <= n < m``.
        m: group size.

    Example::

        NM(2, 4).mask(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 0.5, torch.ones(1, 4))
        # tensor([[1., 0., 1., 0.]])
    """

    supports_global: ClassVar[bool] = False

    def __init__(self, n: int, m: int) -> None:
        for key, value in (("n", n), ("m", m)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{key}={value!r}: must be an int")
        if not 1 <= n < m:
            raise ValueError(f"n={n}: N:M needs 1 <= n < m (m={m})")
        self.n, self.m = n, m

    def check(self, name: str, shape: torch.Size) -> None:
        super().check(name, shape)
        inputs = shape[0] if len(shape) == 1 else shape[1]
        if inputs % self.m:
            what = "input channels" if len(shape) > 2 else "inputs"
            raise ValueError(
                f"pattern={self}: {name} {tuple(shape)} has {inputs} {what}, not a multiple of m={self.m}; "
                "exclude it"
            )

    def mask(self, scores: torch.Tensor, sparsity: float, current_mask: torch.Tensor, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
        _check_sparsity(sparsity)
        if sparsity > 1 - self.n / self.m + 1e-9:
            raise ValueError(
                f"sparsity={sparsity}: {self} keeps {self.n} of every {self.m} weights, "
                f"so at most {1 - self.n / self.m:g}"
            )
        self.check("the tensor", scores.shape)
        live = self._groups(current_mask.ne(0))
        ranked = self._groups(scores.detach().to(torch.float32)).masked_fill(~live, _PRUNED)
        keep = live.clone()
        k = pruned_count(self.m, sparsity)
        if k > 0:
            keep.scatter_(1, torch.topk(ranked, k, dim=1, largest=False, sorted=False).indices, False)
        return _into(self._ungroup(keep, scores.shape).to(_mask_dtype(current_mask)), out)

    @staticmethod
    def _input_last(t: torch.Tensor) -> torch.Tensor:
        return t.movedim(1, -1) if t.dim() > 2 else t

    def _groups(self, t: torch.Tensor) -> torch.Tensor:
        """``(groups, m)``: each row is ``m`` consecutive inputs at fixed output and kernel position."""
        return self._input_last(t).reshape(-1, self.m)

    @staticmethod
    def _ungroup(groups: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if len(shape) <= 2:
            return groups.reshape(shape)
        return groups.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1).contiguous()

    def __repr__(self) -> str:
        return f"nm {self.n}:{self.m}"


class Block(MaskPattern):
    """Blocks of ``rows x cols`` on the 2-D view, scored by the sum of their scores.

    Blocks at the right and bottom edges that do not fill are smaller, and count with their
    real size. ``(1, 4)`` prunes four consecutive inputs of one output; ``(4, 1)`` one input
    of four consecutive outputs.

    Args:
        rows: block height (outputs).
        cols: block width (columns of the 2-D view).

    Example::

        Block(1, 2).mask(torch.tensor([[1.0, 2.0, 5.0, 6.0, 0.5]]), 0.4, torch.ones(1, 5))
        # tensor([[1., 1., 1., 1., 0.]]): the edge block [0.5] is one weight
    """

    def __init__(self, rows: int, cols: int) -> None:
        for key, value in (("rows", rows), ("cols", cols)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"block {key}={value!r}: must be an int")
            if value < 1:
                raise ValueError(f"block {key}={value}: must be >= 1")
        self.rows, self.cols = rows, cols

    def _grid(self, shape: torch.Size) -> tuple[int, int, int, int]:
        """The 2-D view ``(R, C)`` and the number of block rows and columns."""
        r, c = _shape_2d(shape)
        return r, c, -(-r // self.rows), -(-c // self.cols)

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        r, c, block_rows, block_cols = self._grid(scores.shape)
        view = scores.detach().reshape(r, c).to(torch.float32)
        if r % self.rows or c % self.cols:
            padded = view.new_zeros(block_rows * self.rows, block_cols * self.cols)
            padded[:r, :c] = view
            view = padded
        return view.reshape(block_rows, self.rows, block_cols, self.cols).sum((1, 3)).reshape(-1)

    def unit_sizes(self, shape: torch.Size) -> torch.Tensor:
        r, c, block_rows, block_cols = self._grid(shape)
        heights = torch.full((block_rows,), self.rows, dtype=torch.int64)
        heights[-1] = r - self.rows * (block_rows - 1)
        widths = torch.full((block_cols,), self.cols, dtype=torch.int64)
        widths[-1] = c - self.cols * (block_cols - 1)
        return (heights[:, None] * widths[None, :]).reshape(-1)

    def expand(self, unit_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        r, c, block_rows, block_cols = self._grid(shape)
        full = unit_keep.reshape(block_rows, 1, block_cols, 1).expand(block_rows, self.rows, block_cols, self.cols)
        return full.reshape(block_rows * self.rows, block_cols * self.cols)[:r, :c].reshape(shape)

    def __repr__(self) -> str:
        return f"block {self.rows}x{self.cols}"


class Channel(MaskPattern):
    """Whole output channels (rows of the 2-D view), scored by the L1 or L2 norm of their scores.

    Args:
        norm: ``ChannelNorm.l1`` (sum of the scores) or ``ChannelNorm.l2`` (square root of
            the sum of squares).

    Example::

        scores = torch.tensor([[1.0, 1.0], [5.0, 0.0], [2.0, 2.0]])
        Channel(ChannelNorm.l1).mask(scores, 0.34, torch.ones(3, 2))  # prunes row 0 (sum 2)
        Channel(ChannelNorm.l2).mask(scores, 0.34, torch.ones(3, 2))  # prunes row 0 (norm 1.41)
    """

    def __init__(self, norm: ChannelNorm | str = ChannelNorm.l1) -> None:
        try:
            self.norm = ChannelNorm(norm)
        except ValueError:
            allowed = ", ".join(v.value for v in ChannelNorm)
            raise ValueError(f"channel_norm={norm!r}: must be one of {allowed}") from None

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        view = scores.detach().reshape(_shape_2d(scores.shape)).to(torch.float32)
        if self.norm == ChannelNorm.l1:
            return view.sum(1)
        return view.square().sum(1).sqrt()

    def unit_sizes(self, shape: torch.Size) -> torch.Tensor:
        rows, cols = _shape_2d(shape)
        return torch.full((rows,), cols, dtype=torch.int64)

    def expand(self, unit_keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        rows, cols = _shape_2d(shape)
        return unit_keep.reshape(rows, 1).expand(rows, cols).reshape(shape)

    def __repr__(self) -> str:
        return f"channel {self.norm.value}"


class Lock(_OneWeightUnits):
    """The zeros a weight has when the engine attaches stay zeros; nothing else is pruned
    (LPOT's ``pattern_lock``: fine-tune a model that was sparsified before, keeping its pattern).
    The schedule's sparsity is not used: updates keep the mask as it is.

    Example::

        w = torch.tensor([0.0, 2.0, 0.0, -1.0])
        Lock().initial_mask(w)  # tensor([0., 1., 0., 1.])
    """

    def initial_mask(self, param: torch.Tensor) -> torch.Tensor:
        return param.detach().ne(0).to(param.dtype if param.is_floating_point() else torch.float32) \
            .contiguous()

    def mask(self, scores: torch.Tensor, sparsity: float, current_mask: torch.Tensor, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
        return _into(current_mask.clone(), out)

    def update_mask(self, scorer: Scorer, name: str, param: torch.Tensor, mask: torch.Tensor, sparsity: float,
                    scratch: Scratch) -> None:
        pass  # the pattern is locked at attach

    def update_masks(self, scorer: Scorer, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                     sparsity: float, max_sparsity: float | None, scratch: Scratch) -> None:
        pass


def make_pattern(
    pattern: Pattern | str,
    n: int = 2,
    m: int = 4,
    block_shape: Sequence[int] = (1, 4),
    channel_norm: ChannelNorm | str = ChannelNorm.l1,
) -> MaskPattern:
    """The pattern named by the spec's fields.

    Args:
        pattern: a ``Pattern`` or its value.
        n, m: for ``nm``.
        block_shape: ``(rows, cols)`` for ``block``.
        channel_norm: for ``channel``.

    Example::

        make_pattern("nm", n=2, m=4)  # nm 2:4
    """
    try:
        pattern = Pattern(pattern)
    except ValueError:
        allowed = ", ".join(p.value for p in Pattern)
        raise ValueError(f"pattern={pattern!r}: must be one of {allowed}") from None
    if pattern == Pattern.unstructured:
        return Unstructured()
    if pattern == Pattern.nm:
        return NM(n, m)
    if pattern == Pattern.lock:
        return Lock()
    if pattern == Pattern.block:
        if len(block_shape) != 2:
            raise ValueError(f"block_shape={list(block_shape)}: must be [rows, columns]")
        return Block(int(block_shape[0]), int(block_shape[1]))
    return Channel(channel_norm)


def select_global(
    unit_scores: Mapping[str, torch.Tensor],
    unit_sizes: Mapping[str, torch.Tensor],
    current_keep: Mapping[str, torch.Tensor],
    sparsity: float,
    max_sparsity: float | None = None,
    *,
    scratch: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Rank the units of several tensors together and prune the lowest, already-pruned first.

    Prunes until ``round(sparsity * total weights)`` weights are pruned: exactly, for units of
    one weight; otherwise up to the unit that crosses the count, whichever side is closer
    (ties: fewer; with units all of one size: ``round(sparsity * n_units)`` units).
    Already-pruned units stay pruned. A tensor that reaches ``max_sparsity`` takes no more
    units (it stops at the last of its units within the cap), and the rest of the pruning
    goes to the next-lowest units of the other tensors; when every tensor is capped, the
    total is not reached.

    Cost: one concatenation and one exact threshold selection (units of one weight: a few
    parallel passes, see ``_kth_smallest``) or stable sort (other units) over all units; with
    ``max_sparsity``, one more selection per tensor first, which leaves in the race only the
    units each tensor may still lose.

    Args:
        unit_scores: per tensor, the 1-D unit scores (``MaskPattern.unit_scores``).
        unit_sizes: per tensor, the 1-D int64 weights per unit (``MaskPattern.unit_sizes``).
        current_keep: per tensor, the 1-D unit keep-mask in force (1 keeps, 0 pruned).
        sparsity: the fraction of all the tensors' weights together to prune, in [0, 1].
        max_sparsity: a cap on each tensor's own sparsity, in (0, 1], or ``None``.
        scratch: optional 1-D float32 buffer of at least twice the units, so that the ranking
            and the selection touch no fresh memory. Its first half holds the ranking; for
            units of one weight the returned keep-masks (float32 ones) are views of its second
            half, which may also hold the unit scores on the way in (read before it is written).

    Returns:
        Per tensor, the new 1-D unit keep-mask, in the dtype of its ``current_keep``
        (float32 when that is not a floating type).

    Example::

        select_global({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 0.5])},
                      {"a": torch.ones(2, dtype=torch.int64), "b": torch.ones(2, dtype=torch.int64)},
                      {"a": torch.ones(2), "b": torch.ones(2)}, 0.5)
        # {"a": tensor([0., 1.]), "b": tensor([1., 0.])}
    """
    _check_sparsity(sparsity)
    if max_sparsity is not None and not 0.0 < max_sparsity <= 1.0:
        raise ValueError(f"max_sparsity={max_sparsity}: must be in (0, 1]")
    names = list(unit_scores)
    for name in names:
        for what, mapping in (("unit_sizes", unit_sizes), ("current_keep", current_keep)):
            if name not in mapping:
                raise ValueError(f"{what}: has no entry for {name!r}")
            if mapping[name].numel() != unit_scores[name].numel():
                raise ValueError(
                    f"{what}[{name!r}]: {mapping[name].numel()} units, but unit_scores has "
                    f"{unit_scores[name].numel()}"
                )
    if not names:
        return {}

    # One ranking of every unit: scores, with already-pruned units at _PRUNED.
    device = unit_scores[names[0]].device
    counts = [unit_scores[name].numel() for name in names]
    total_units = sum(counts)
    if scratch is not None and scratch.numel() >= 2 * total_units:
        ranked, keep_out = scratch[:total_units], scratch[total_units: 2 * total_units]
    else:
        ranked, keep_out = torch.empty(total_units, dtype=torch.float32, device=device), None
    ranked_of = dict(zip(names, ranked.split(counts)))
    for name, chunk in ranked_of.items():
        _ranked(unit_scores[name], current_keep[name], out=chunk)
    weights = {name: _total(unit_sizes[name].reshape(-1)) for name in names}
    one_weight_units = sum(weights.values()) == ranked.numel()  # sizes are >= 1
    sizes = {} if one_weight_units else {
        name: unit_sizes[name].to(device=device, dtype=torch.int64).reshape(-1) for name in names
    }

    unit_size = 1 if one_weight_units else _common_unit_size(sizes.values())
    if unit_size is not None:
        target = pruned_count(ranked.numel(), sparsity) * unit_size
    else:
        target = pruned_count(sum(weights.values()), sparsity)

    if max_sparsity is not None:
        # The units a tensor may lose are its lowest, up to its cap (or what it already lost);
        # the others leave the race (+inf), so the lowest units that remain are the greedy
        # choice that skips a tensor once it is capped.
        for name, chunk in ranked_of.items():
            cap = math.floor(max_sparsity * weights[name] + 1e-6)
            if cap < weights[name]:
                kept_at_cap = _prune_lowest(chunk, None if one_weight_units else sizes[name], cap, closest=False)
                chunk.masked_fill_(kept_at_cap, math.inf)

    all_sizes = None if one_weight_units else torch.cat([sizes[name] for name in names])
    keep = _prune_lowest(ranked, all_sizes, target, closest=True, out_of_race=max_sparsity is not None,
                         dtype=torch.float32, out=keep_out)
    return {name: k.to(_mask_dtype(current_keep[name])) for name, k in zip(names, keep.split(counts))}


def _total(sizes: torch.Tensor) -> int:
    """``int(sizes.sum())``, without a pass over an expanded view of one size (``Unstructured``)."""
    if sizes.numel() > 1 and sizes.stride() == (0,):
        return int(sizes[0]) * sizes.numel()
    return int(sizes.sum())


def _common_unit_size(sizes: Iterable[torch.Tensor]) -> int | None:
    """The size shared by every unit of every tensor, or ``None`` when sizes differ."""
    common = None
    for s in sizes:
        if s.numel() == 0:
            continue
        lo, hi = int(s.min()), int(s.max())
        if lo != hi or (common is not None and lo != common):
            return None
        common = lo
    return common


def _prune_lowest(ranked: torch.Tensor, sizes: torch.Tensor | None, target: int, closest: bool,
                  out_of_race: bool = False, dtype: torch.dtype = torch.bool,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask (``dtype``, 1 keeps) that prunes the lowest-ranked units up to ``target`` weights.

    In ``ranked``, already-pruned units are ``_PRUNED`` and always pruned; with ``out_of_race``,
    units at ``+inf`` are out of the race and never pruned. ``sizes=None`` means one weight per
    unit: then exactly ``target`` (by a threshold, :func:`_keep_above_kth`). Otherwise, in
    stable sort order, ``closest`` stops at whichever side of the crossing unit is closer to the
    target (ties: fewer), and not ``closest`` stops before it (for a cap: never above).
    ``out``: with ``sizes=None``, a 1-D float buffer to write the mask into.
    """
    n = ranked.numel()
    # count_nonzero: a bool .sum() first copies the mask to int64 (8 bytes per unit).
    in_race = n - int(torch.count_nonzero(torch.isposinf(ranked))) if out_of_race else n
    if sizes is None:  # already-pruned units are pruned whatever the target (_keep_above_kth)
        return _keep_above_kth(ranked, min(target, in_race), dtype, out=out)
    already = int(torch.count_nonzero(ranked == _PRUNED))
    keep = torch.ones(n, dtype=torch.bool, device=ranked.device)
    order = torch.argsort(ranked, stable=True)
    cumulative = sizes[order].cumsum(0)
    target_t = torch.tensor([target], dtype=cumulative.dtype, device=cumulative.device)
    if closest:
        j = int(torch.searchsorted(cumulative, target_t))
        if j >= n:
            k = n
        else:
            above = int(cumulative[j]) - target
            below = target - (int(cumulative[j - 1]) if j > 0 else 0)
            k = j + 1 if above < below else j
    else:
        k = int(torch.searchsorted(cumulative, target_t, right=True))
    k = min(max(k, already), in_race)
    keep[order[:k]] = False
    return keep.to(dtype)


_SAMPLE = 1 << 16  # values sampled to bracket the k-th smallest
_EXACT_BELOW = 1 << 18  # below this many values, kthvalue directly (measured: the sampled way wins above)


def _count_ones(flags: torch.Tensor) -> int:
    """The number of 1.0s in a float tensor of 0.0s and 1.0s. A float sum is several times faster
    than counting a bool tensor, and exact: every partial sum is a whole number below 2**24."""
    flat = flags.reshape(-1)
    return sum(int(chunk.sum()) for chunk in flat.split(1 << 24)) if flat.numel() else 0


def _kth_smallest(x: torch.Tensor, k: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k``-th smallest value of the 1-D float32 ``x`` (1-based), exactly, as a 0-d tensor.

    ``kthvalue`` (and ``topk``) run a single-threaded selection over all values. Instead, a
    strided sample brackets the answer between two of its order statistics (a margin of about
    eight standard deviations of the sample rank), one parallel pass counts the values below the
    bracket, and ``kthvalue`` runs only on the values inside it (about 2% of them). If the answer
    is not inside the bracket (a sample that misrepresents ``x``), it falls back to ``kthvalue``
    over everything: always exact, only slower. ``scratch``: a float32 buffer like ``x`` to count in.
    """
    n = x.numel()
    if n <= _EXACT_BELOW:
        return x.kthvalue(k).values
    sample = x[:: n // _SAMPLE].contiguous()
    m = sample.numel()
    at = (k - 0.5) * m / n
    margin = 8.0 * math.sqrt(m * (k / n) * (1 - k / n)) + 16
    lo = sample.kthvalue(max(1, int(at - margin) + 1)).values
    hi = sample.kthvalue(min(m, int(at + margin) + 2)).values
    flags = scratch if scratch is not None else torch.empty_like(x)
    below = _count_ones(torch.le(x, lo, out=flags))
    if below >= k:  # the answer is lo itself when it holds rank k among ties (e.g. the already pruned)
        if _count_ones(torch.lt(x, lo, out=flags)) < k:
            return lo
        return x.kthvalue(k).values
    # The band's flags as two bool views of the scratch's bytes: no fresh memory.
    raw = flags.view(torch.uint8)
    inside, upper = raw[:n].view(torch.bool), raw[n: 2 * n].view(torch.bool)
    band = x[torch.gt(x, lo, out=inside).logical_and_(torch.le(x, hi, out=upper))]
    if k <= below + band.numel():
        return band.kthvalue(k - below).values
    return x.kthvalue(k).values


def _keep_above_kth(ranked: torch.Tensor, k: int, dtype: torch.dtype = torch.bool,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask (``dtype``, 1 keeps) that prunes the ``k`` lowest of the 1-D float32 ``ranked``,
    and always every ``_PRUNED`` (already pruned), also when there are more than ``k`` of them.
    Ties at the threshold are pruned in index order (deterministic, unlike ``topk``). Written into
    ``out`` (1-D, any float dtype) when given."""
    n = ranked.numel()
    # Float comparisons written straight into a float32 buffer, and counted by a float sum: both
    # several times faster than with bool tensors. A float32 ``out`` is that buffer itself.
    out_is_buffer = out is not None and out.dtype == torch.float32
    keep = out if out_is_buffer else torch.empty(n, dtype=torch.float32, device=ranked.device)
    if k >= n:
        keep.zero_()
    elif k <= 0:  # nothing asked for: only the already pruned
        torch.gt(ranked, _PRUNED, out=keep)
    else:
        threshold = _kth_smallest(ranked, k, keep)
        torch.gt(ranked, threshold, out=keep)
        surplus = k - (n - _count_ones(keep))  # < 0: more ties at the threshold than needed
        if surplus < 0 and float(threshold) > _PRUNED:  # the already pruned are never kept
            ties = torch.nonzero(ranked == threshold).squeeze(1)
            keep[ties[surplus:]] = 1.0  # the last -surplus ties stay
    if out is None:
        return keep.to(dtype)
    return out if out_is_buffer else out.copy_(keep)


def _into(mask: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return mask if out is None else out.copy_(mask)


def unstructured_mask(scores: torch.Tensor, sparsity: float, current_mask: torch.Tensor) -> torch.Tensor:
    """``Unstructured().mask(...)``: the engine's former interface, kept until it uses patterns.

    Example::

        unstructured_mask(torch.tensor([3., 1., 2., 4.]), 0.5, torch.ones(4))
        # tensor([1., 0., 0., 1.])
    """
    return Unstructured().mask(scores, sparsity, current_mask)
