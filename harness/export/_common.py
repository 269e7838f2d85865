"""Helpers that several export files share: the example-input type, running a model on it in eval mode,
timing calls fairly, and putting a new module in place of an old one.

They live here rather than in ``measure.py`` because ``measure.count_macs`` knows :class:`SparseLinear`
while ``sparse_linear.sparsify_linears`` times its kernels with the same timer: one shared home keeps
the imports one-way.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

Example = Tensor | Sequence[Tensor]


def _args(example: Example) -> tuple[Any, ...]:
    return (example,) if isinstance(example, Tensor) else tuple(example)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the duration, then every submodule's own mode back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the duration (None: leave it as it is)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _calls_per_sample(fn: Callable[[], Any], min_sample_s: float = 1e-3) -> int:
    """How many calls one timing sample makes, so that a sample is not dominated by timer jitter."""
    start = time.perf_counter()
    fn()
    return _calls_for(time.perf_counter() - start, min_sample_s)


def _calls_for(once_s: float, min_sample_s: float = 1e-3) -> int:
    """:func:`_calls_per_sample` for a call known to take ``once_s`` seconds."""
    if once_s >= min_sample_s:
        return 1
    return min(1000, math.ceil(min_sample_s / max(once_s, 1e-7)))


def _interleaved_ms(fns: Mapping[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in turns (a, b, c, then c, b, a, ...).

    Interleaving puts every function under the same background load, so their ratio is fair on
    a noisy machine; medians ignore the rounds that a burst of other work disturbed.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: must be >= 1")
    for fn in fns.values():
        for _ in range(max(0, warmup)):
            fn()
    numbers = {name: _calls_per_sample(fn) for name, fn in fns.items()}
    samples = _timed_rounds(fns, numbers, rounds)
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def _timed_rounds(fns: Mapping[str, Callable[[], Any]], numbers: Mapping[str, int], rounds: int,
                  until: float | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per round, in turns (a, b, then b, a, ...); with
    ``until`` (a ``time.perf_counter()`` value), no round starts that would end past it, judged by the
    longest round so far (the first round always runs)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    longest = 0.0
    for r in range(rounds):
        round_start = time.perf_counter()
        for name in order if r % 2 == 0 else reversed(order):
            fn, number = fns[name], numbers[name]
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter() - start) / number)
        longest = max(longest, time.perf_counter() - round_start)
        if until is not None and time.perf_counter() + longest > until:
            break
    return samples


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)
