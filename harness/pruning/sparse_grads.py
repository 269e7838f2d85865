"""Weight gradients of highly pruned Linear layers, computed for the kept weights only.

Backward's ``grad_output.T @ input`` for a Linear weight computes every weight's gradient, and the
engine then zeroes the pruned ones. At high sparsity most of that product is thrown away:
``torch.sparse.sampled_addmm`` (SDDMM) computes only the kept entries, and scattering them into
a zeroed gradient gives the masked gradient directly, with no multiply by the mask afterwards.

Measured on the CPU here (2 cores), kept-only gradient / (dense product + mask): 2048x2048 weight,
128 rows of input: 0.4-0.6x at 10% density, 0.6x at 15%, even at 20%; 1024x1024: 0.4x (128
rows) to 0.6x (32 rows) at 10%, 0.9x at 15% with 32 rows, slower with 16; smaller weights
(512x512, 128x1024) are slower below 64-128 rows. Hence ``MAX_DENSITY``, ``MIN_WEIGHTS`` and
``MIN_ROWS`` (checked at each backward: fewer rows take the dense product, masked as usual).

The forward and the input's gradient stay the dense ones, so the model computes what it
computed before; the kept weights' gradients are the same dot products summed in another order
(equal up to float rounding, not bit for bit).

Only plain ``nn.Linear`` modules with float32 weights on the CPU take this path, only while
the engine trains (grad enabled, no autocast); the engine installs it by setting the module's
``forward`` on the instance and removes it when training ends. A second derivative through
such a layer (``create_graph=True``) raises; ``sparse_grads=False`` is the way for that.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .patterns import _count_ones

MAX_DENSITY = 0.15  # above it, the dense product and a mask are as fast or faster (measured, above)
MIN_WEIGHTS = 1 << 20  # below it, the saving needs more rows than a typical batch
MIN_ROWS = 32  # rows of input (batch x positions) below which the dense product is faster


def eligible(module: nn.Module, param: Tensor, mask: Tensor) -> bool:
    """Whether ``param``, the weight of ``module``, should take the kept-only gradient path."""
    return (type(module) is nn.Linear and module.weight is param and param.requires_grad
            and param.dtype == torch.float32 and param.device.type == "cpu"
            and param.numel() >= MIN_WEIGHTS
            and _count_ones(mask) <= MAX_DENSITY * param.numel())


class KeptPattern:
    """The kept positions of a 2-D mask, as the CSR pattern ``sampled_addmm`` samples at.

    ``made`` remembers which gradient tensor the last backward produced, (address, version),
    without holding it: autograd hands a tensor nobody else holds to ``.grad`` as it is. A
    gradient that is exactly that tensor, unchanged, is already masked; any other (summed with
    a gradient from another use of the weight, accumulated into an existing ``.grad``) is not
    known to be, and the engine masks it.
    """

    def __init__(self, mask: Tensor) -> None:
        rows, cols = mask.shape
        self.kept = mask.reshape(-1).nonzero().squeeze(1)
        crow = torch.zeros(rows + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(torch.div(self.kept, cols, rounding_mode="floor"), minlength=rows).cumsum(0)
        # beta=0 still reads the pattern's values (0 * NaN is NaN): zeros, never garbage.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.csr = torch.sparse_csr_tensor(crow, self.kept % cols, torch.zeros(self.kept.numel()), (rows, cols),
                                               check_invariants=False)  # valid by construction
        self.shape = (rows, cols)
        self.made: tuple[int, int] | None = None

    def weight_grad(self, grad_out: Tensor, inputs: Tensor) -> Tensor:
        """``(grad_out.T @ inputs) * mask`` from the kept entries only (2-D arguments)."""
        kept_values = torch.sparse.sampled_addmm(self.csr, grad_out.t(), inputs, beta=0.0).values()
        grad = torch.zeros(self.shape, dtype=grad_out.dtype)
        grad.view(-1).index_copy_(0, self.kept, kept_values)
        self.made = (grad.data_ptr(), grad._version)
        return grad

    def produced(self, grad: Tensor) -> bool:
        """Whether ``grad`` is the tensor the last backward produced, unchanged since."""
        made, self.made = self.made, None
        return made is not None and made == (grad.data_ptr(), grad._version)


class _KeptGradLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, pattern: KeptPattern) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.pattern = pattern
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable  # a second derivative through it is an error, never a silent wrong value
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight)
        if ctx.needs_input_grad[1]:
            x_2d = x.reshape(-1, x.shape[-1])
            if grad_2d.shape[0] >= MIN_ROWS:
                grad_w = ctx.pattern.weight_grad(grad_2d, x_2d)
            else:  # the dense product; the engine masks it as it does every other gradient
                ctx.pattern.made = None
                grad_w = grad_2d.t().mm(x_2d)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b, None


class KeptGradForward:
    """A Linear's ``forward`` whose weight gradient comes from ``pattern`` (set on the instance)."""

    def __init__(self, module: nn.Linear, pattern: KeptPattern) -> None:
        self.module = module
        self.pattern = pattern

    def __call__(self, x: Tensor) -> Tensor:
        m = self.module
        if not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
            return F.linear(x, m.weight, m.bias)
        return _KeptGradLinear.apply(x, m.weight, m.bias, self.pattern)


def install(module: nn.Linear, mask: Tensor) -> KeptPattern:
    """Route ``module``'s weight gradient through a pattern of ``mask``; returns the pattern."""
    pattern = KeptPattern(mask)
    module.forward = KeptGradForward(module, pattern)
    return pattern


def uninstall(module: nn.Module) -> None:
    """Give ``module`` back its class's ``forward``."""
    if isinstance(module.__dict__.get("forward"), KeptGradForward):
        del module.forward
