"""What an export buys, measured: milliseconds per forward, side by side, and multiply-adds."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._common import Example, _args, _eval_mode, _interleaved_ms, _threads
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
