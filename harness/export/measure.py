"""What an export buys, measured: milliseconds per forward, side by side, and multiply-adds."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._common import Example, _args, _calls_for, _eval_mode, _interleaved_ms, _threads, _timed_rounds
from .sparse_linear import SparseLinear

# -- latency ----------------------------------------------------------------------------------


def measure_latency(model: nn.Module, example: Example, repeats: int = 30, warmup: int = 5,
                    threads: int | None = None) -> float:
    """Median milliseconds per forward of ``model(example)`` in eval mode under ``torch.inference_mode``.

    ``example`` is a tensor or a tuple of the forward's arguments. Fast models are timed several
    calls per sample. ``threads`` sets ``torch.set_num_threads`` for the measurement (compare
    models under the same setting; on a shared machine one thread is the steadiest). The model's
    train/eval modes are restored afterwards.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: must be >= 1")
    args = _args(example)
    with _eval_mode(model), _threads(threads), torch.inference_mode():
        return _interleaved_ms({"model": lambda: model(*args)}, repeats, warmup)["model"]


def compare_latency(a: nn.Module, b: nn.Module, example: Example, rounds: int = 30, warmup: int = 5,
                    threads: int | None = None) -> tuple[float, float]:
    """Median milliseconds per forward of ``a`` and of ``b``, timed alternately (a, b, b, a, ...).

    Side by side, both see the same background load, so ``ms_b / ms_a`` is a fair ratio even on a
    busy machine. Same conventions as :func:`measure_latency`.
    """
    args = _args(example)
    with _eval_mode(a), _eval_mode(b), _threads(threads), torch.inference_mode():
        ms = _interleaved_ms({"a": lambda: a(*args), "b": lambda: b(*args)}, rounds, warmup)
    return ms["a"], ms["b"]


@dataclass(frozen=True)
class LatencyComparison:
    """:func:`compare_latency_within`'s answer: median milliseconds per forward of each model, the
    rounds timed and the seconds the timing took, warm-up included."""

    a_ms: float
    b_ms: float
    rounds: int
    seconds: float


def compare_latency_within(a: nn.Module, b: nn.Module, example: Example, time_limit_s: float,
                           max_rounds: int = 15, warmup: int = 3, threads: int | None = None) -> LatencyComparison:
    """:func:`compare_latency` within a time budget: ``a`` and ``b`` timed side by side (a, b, b, a, ...)
    until ``max_rounds``, or until the next round would not fit in ``time_limit_s`` (judged by the
    longest round so far). Warm-up counts: up to ``warmup`` calls of each, while the next fits in a
    quarter of the budget. At least one warm-up call and one round of each are made, so a model slower
    than the budget overruns it by about one round. Same conventions as :func:`measure_latency`.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds={max_rounds}: must be >= 1")
    args = _args(example)
    fns = {"a": lambda: a(*args), "b": lambda: b(*args)}
    start = time.perf_counter()
    with _eval_mode(a), _eval_mode(b), _threads(threads), torch.inference_mode():
        once: dict[str, float] = {}
        for _ in range(max(1, warmup)):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                once[name] = time.perf_counter() - t
            if time.perf_counter() - start + sum(once.values()) > time_limit_s / 4:
                break
        # several calls per sample for fast models (timer jitter), from the last warm-up call
        numbers = {name: _calls_for(t) for name, t in once.items()}
        samples = _timed_rounds(fns, numbers, max_rounds, until=start + time_limit_s)
    ms = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
    return LatencyComparison(ms["a"], ms["b"], len(samples["a"]), time.perf_counter() - start)


def batch_within_budget(a: nn.Module, b: nn.Module, example: torch.Tensor, time_limit_s: float) -> torch.Tensor:
    """The first rows of ``example`` that a side-by-side round of ``a`` and ``b`` times in about a tenth of
    ``time_limit_s`` (all of them when they fit), judged from one sample's cost (its second call: the
    first pays for allocations). A batch too slow for the budget (resnet18 at 224x224 on 64 images takes
    seconds per call on a CPU) would otherwise overrun it by a round and warm-up of its own."""
    if len(example) <= 1:
        return example
    one = example[:1]
    with _eval_mode(a), _eval_mode(b), torch.inference_mode():
        for _ in range(2):
            start = time.perf_counter()
            a(one)
            b(one)
            per_sample = time.perf_counter() - start
    fits = int(time_limit_s / 10 / max(per_sample, 1e-9))
    return example[:max(1, min(len(example), fits))]


# -- multiply-adds ----------------------------------------------------------------------------


def count_macs(model: nn.Module, example: Example) -> tuple[int, int]:
    """Multiply-adds of the conv and linear layers in one forward of ``example``: (dense, non-zero).

    Counted for the whole ``example`` (batch included; pass a batch of one for per-sample
    figures), per call (a layer called twice counts twice), biases not counted. At every output
    position each weight is one MAC; a weight that is an exact zero does no work, so the second
    number counts only non-zero weights. Works on the modules of this package too
    (:class:`SparseLinear`, :class:`PrunedConv2d`).
    """
    totals = [0, 0]

    def add(positions: int, dense: int, nonzero: int) -> None:
        totals[0] += positions * dense
        totals[1] += positions * nonzero

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if isinstance(module, SparseLinear):
            positions = inputs[0].numel() // module.in_features
            add(positions, module.in_features * module.out_features, module.nnz)
            return
        weight = module.weight.detach()
        nonzero = int(torch.count_nonzero(weight))
        if isinstance(module, nn.Linear):
            add(inputs[0].numel() // module.in_features, weight.numel(), nonzero)
        elif isinstance(module, nn.modules.conv._ConvTransposeNd):
            # every input element meets one input-channel slice of the weight
            add(inputs[0].numel() // module.in_channels, weight.numel(), nonzero)
        else:  # _ConvNd: every output element meets one output-channel slice
            add(output.numel() // getattr(module, "full_out_channels", module.out_channels), weight.numel(), nonzero)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Linear | nn.modules.conv._ConvNd | SparseLinear)]
    try:
        with _eval_mode(model), torch.inference_mode():
            model(*_args(example))
    finally:
        for h in handles:
            h.remove()
    return totals[0], totals[1]
