"""Criteria: score every weight; the lowest scores are pruned first.

A scorer turns a parameter into a score tensor of the same shape (float32, >= 0). Scorers
that need gradients (``needs_gradients``) see every optimizer step through ``observe``,
called after ``backward()`` (with the gradient already masked) and before ``optimizer.step()``;
the others only answer ``scores`` at a mask update.

Example::

    scorer = make_scorer(Criterion.taylor)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        scorer.observe("fc.weight", model.fc.weight)
        optimizer.step()
    scores = scorer.scores("fc.weight", model.fc.weight)  # sum over the steps of |w * grad|
    scorer.after_update("fc.weight")                     # Taylor starts a fresh sum
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from .spec import Criterion

__all__ = [
    "CRITERIA",
    "GradientSensitivity",
    "Magnitude",
    "RandomScores",
    "Scorer",
    "SnipMomentum",
    "Taylor",
    "magnitude",
    "make_scorer",
]


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """L1 magnitude, ``|w|`` as float32: LPOT's ``basic_magnitude`` and Han et al. 2015."""
    return weight.detach().abs().to(torch.float32)


def magnitude_into(weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``magnitude(weight)`` written into ``out`` (float32, the weight's shape)."""
    weight = weight.detach()
    if weight.dtype == torch.float32:
        return torch.abs(weight, out=out)
    return out.copy_(weight).abs_()


class Scorer:
    """Base class: how weights are scored. Subclasses override ``scores`` and, if they
    accumulate over training, ``observe``, ``after_update`` and the state methods.

    Example::

        Magnitude().scores("fc.weight", torch.tensor([[-3.0, 1.0]]))  # tensor([[3., 1.]])
    """

    needs_gradients: ClassVar[bool] = False

    def observe(self, name: str, param: torch.Tensor) -> None:
        """See one optimizer step of ``name`` (after backward, before ``optimizer.step()``).

        Args:
            name: the parameter's name, the key of everything this scorer keeps.
            param: the parameter; ``param.grad`` holds the (masked) gradient.
        """

    def scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """Scores of ``param``: same shape, float32, >= 0; the lowest are pruned first.

        Args:
            name: the parameter's name.
            param: the parameter (its current, masked values).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement scores()")

    def scores_into(self, name: str, param: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``scores`` written into ``out`` (float32, the parameter's shape) and returned. The engine
        scores into a buffer it keeps between updates: fresh memory costs its first touch, several
        times a pass over it. Overriding is optional (the default copies what ``scores`` returns).
        """
        return out.copy_(self.scores(name, param))

    def after_update(self, name: str) -> None:
        """Called after the mask of ``name`` was updated; by default nothing."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep to resume the scores (tensors on CPU)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Magnitude(Scorer):
    """``|w|``: the smallest weights are pruned first.

    Example::

        Magnitude().scores("w", torch.tensor([-2.0, 0.5]))  # tensor([2.0000, 0.5000])
    """

    def scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        return magnitude(param)

    def scores_into(self, name: str, param: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return magnitude_into(param, out)


class _GradientScorer(Scorer):
    """Shared work of the scorers that accumulate ``|w * grad|`` per optimizer step.

    Each tensor has one float32 buffer, allocated at its first observed step and updated in
    place afterwards; ``|w * grad|`` is formed in a scratch buffer shared by all tensors on a
    device, so a step allocates nothing and never synchronises with the device. A tensor
    whose gradient is ``None`` at a step (unused in that forward) is skipped for that step.

    Before any step was observed for a tensor (an update at the very first batch, or a
    Taylor sum just reset), there is no gradient information, and the scores are ``|w|``.
    """

    needs_gradients: ClassVar[bool] = True
    reset_after_update: ClassVar[bool] = False

    def __init__(self) -> None:
        self._accumulated: dict[str, torch.Tensor] = {}
        self._steps: dict[str, int] = {}  # steps observed since the last reset, per tensor
        self._scratch: dict[torch.device, torch.Tensor] = {}

    def _accumulate(self, accumulated: torch.Tensor, step_scores: torch.Tensor) -> None:
        """Fold one step's ``|w * grad|`` into ``accumulated``, in place."""
        raise NotImplementedError

    def observe(self, name: str, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        weight = param.detach()
        accumulated = self._buffer(name, weight)
        step_scores = self._scratch_for(weight)
        step_scores.copy_(weight)
        step_scores.mul_(grad)
        step_scores.abs_()
        self._accumulate(accumulated, step_scores)
        self._steps[name] = self._steps.get(name, 0) + 1

    def scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        observed = self._observed(name, param)
        return magnitude(param) if observed is None else observed.clone()

    def scores_into(self, name: str, param: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        observed = self._observed(name, param)
        return magnitude_into(param, out) if observed is None else out.copy_(observed)

    def _observed(self, name: str, param: torch.Tensor) -> torch.Tensor | None:
        """The accumulated scores of ``name``, or ``None`` before any step was observed."""
        if self._steps.get(name):
            buffer = self._buffer(name, param.detach())  # may reset if the shape changed
            if self._steps[name]:
                return buffer
        return None

    def after_update(self, name: str) -> None:
        if self.reset_after_update and name in self._accumulated:
            self._accumulated[name].zero_()
            self._steps[name] = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "scores": {name: t.detach().cpu().clone() for name, t in self._accumulated.items()},
            "steps": dict(self._steps),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Buffers stay on the CPU until the parameter they score is next seen.
        self._accumulated = {name: t.to(torch.float32).clone() for name, t in state.get("scores", {}).items()}
        self._steps = {name: int(v) for name, v in state.get("steps", {}).items()}

    def _buffer(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        buffer = self._accumulated.get(name)
        if buffer is None or buffer.shape != weight.shape:
            buffer = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            self._accumulated[name] = buffer
            self._steps[name] = 0
        elif buffer.device != weight.device:  # loaded from a checkpoint
            buffer = buffer.to(weight.device)
            self._accumulated[name] = buffer
        return buffer

    def _scratch_for(self, weight: torch.Tensor) -> torch.Tensor:
        scratch = self._scratch.get(weight.device)
        if scratch is None or scratch.numel() < weight.numel():
            scratch = torch.empty(weight.numel(), dtype=torch.float32, device=weight.device)
            self._scratch[weight.device] = scratch
        return scratch[: weight.numel()].view(weight.shape)


class Taylor(_GradientScorer):
    """First-order Taylor importance: ``|w * grad|`` summed over the steps observed since the
    last mask update of that tensor (Molchanov et al. 2019, per weight). The sum restarts
    after each update, so each update ranks by the gradients of its own interval.

    Before any step was observed since the last reset, the scores are ``|w|``.

    Example::

        w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        w.grad = torch.tensor([3.0, 1.0])
        taylor = Taylor()
        taylor.observe("w", w)
        taylor.observe("w", w)
        taylor.scores("w", w)  # tensor([6., 4.])
    """

    reset_after_update: ClassVar[bool] = True

    def _accumulate(self, accumulated: torch.Tensor, step_scores: torch.Tensor) -> None:
        accumulated.add_(step_scores)


class GradientSensitivity(_GradientScorer):
    """LPOT 1.6's elementwise ``gradient_sensitivity``: ``|w * grad|`` summed over every observed
    step since training began, never reset (Taylor restarts its sum after each update).

    Before any step was observed, the scores are ``|w|``.

    Example::

        w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        w.grad = torch.tensor([3.0, 1.0])
        gs = GradientSensitivity()
        gs.observe("w", w)
        gs.after_update("w")
        gs.observe("w", w)
        gs.scores("w", w)  # tensor([6., 4.]): the sum goes on across updates
    """

    def _accumulate(self, accumulated: torch.Tensor, step_scores: torch.Tensor) -> None:
        accumulated.add_(step_scores)


class SnipMomentum(_GradientScorer):
    """Intel Neural Compressor's ``snip_momentum``: ``score = alpha * score + beta * |w * grad|``
    at every observed step, starting from zero and never reset.

    Before any step was observed, the scores are ``|w|``.

    Args:
        alpha: decay of the running score (INC: 0.9).
        beta: weight of the new step (INC: 1.0).

    Example::

        w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        w.grad = torch.tensor([3.0, 1.0])
        snip = SnipMomentum(alpha=0.5)
        snip.observe("w", w)
        snip.observe("w", w)
        snip.scores("w", w)  # 0.5 * [3, 2] + [3, 2] = tensor([4.5000, 3.0000])
    """

    def __init__(self, alpha: float = 0.9, beta: float = 1.0) -> None:
        super().__init__()
        if not alpha >= 0:
            raise ValueError(f"alpha={alpha}: must be >= 0")
        if not beta > 0:
            raise ValueError(f"beta={beta}: must be > 0")
        self.alpha = float(alpha)
        self.beta = float(beta)

    def _accumulate(self, accumulated: torch.Tensor, step_scores: torch.Tensor) -> None:
        accumulated.mul_(self.alpha).add_(step_scores, alpha=self.beta)

    def __repr__(self) -> str:
        return f"SnipMomentum(alpha={self.alpha}, beta={self.beta})"


class RandomScores(Scorer):
    """Fixed random scores in [0, 1), drawn once per tensor and reused.

    The generator of a tensor is seeded with ``zlib.crc32`` of the seed and its name, and
    the scores are drawn on the CPU: the same seed gives the same masks on every
    device and run, different tensors get independent scores, and because the scores never
    change, a rising sparsity prunes nested subsets.

    Args:
        seed: the run's seed.

    Example::

        a = RandomScores(seed=1).scores("fc.weight", torch.zeros(3))
        b = RandomScores(seed=1).scores("fc.weight", torch.zeros(3))
        torch.equal(a, b)  # True
    """

    def __init__(self, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed={seed!r}: must be an int")
        self.seed = seed
        self._drawn: dict[str, torch.Tensor] = {}

    def scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        drawn = self._drawn.get(name)
        if drawn is None or drawn.shape != param.shape:
            generator = torch.Generator().manual_seed(self._tensor_seed(name))
            drawn = torch.rand(param.shape, generator=generator, dtype=torch.float32)
        if drawn.device != param.device:
            drawn = drawn.to(param.device)
        self._drawn[name] = drawn
        return drawn.clone()

    def _tensor_seed(self, name: str) -> int:
        # One 32-bit hash of both: torch's CPU generator (mt19937) keeps only a seed's low 32 bits.
        return zlib.crc32(f"{self.seed}/{name}".encode())

    def __repr__(self) -> str:
        return f"RandomScores(seed={self.seed})"


_SCORERS: dict[Criterion, Callable[[int], Scorer]] = {
    Criterion.magnitude: lambda seed: Magnitude(),
    Criterion.taylor: lambda seed: Taylor(),
    Criterion.snip_momentum: lambda seed: SnipMomentum(),
    Criterion.random: lambda seed: RandomScores(seed),
    Criterion.gradient_sensitivity: lambda seed: GradientSensitivity(),
}


def make_scorer(criterion: Criterion | str, seed: int = 0) -> Scorer:
    """The scorer for a criterion (INC's defaults for ``snip_momentum``).

    Args:
        criterion: a ``Criterion`` or its value, e.g. ``"taylor"``.
        seed: for ``random``; ignored by the others.

    Example::

        make_scorer("snip_momentum")  # SnipMomentum(alpha=0.9, beta=1.0)
    """
    try:
        criterion = Criterion(criterion)
    except ValueError:
        allowed = ", ".join(c.value for c in Criterion)
        raise ValueError(f"criterion={criterion!r}: must be one of {allowed}") from None
    return _SCORERS[criterion](seed)


CriterionFn = Callable[[torch.Tensor], torch.Tensor]

# The engine's former interface, kept until it uses make_scorer.
CRITERIA: dict[Criterion, CriterionFn] = {
    Criterion.magnitude: magnitude,
}
