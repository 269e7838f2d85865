"""Unstructured sparsity -> sparse matmul kernels (:func:`sparsify_linears`), chosen per layer by
timing them against dense on the layer's real input; a kernel is kept only where it is faster.

Example::

    pruned = pruning.finalize()
    x = torch.randn(64, 784)
    fast, choices = sparsify_linears(pruned, x)
    for c in choices:
        print(c.name, c.kind, c.reason)
    dense_ms, sparse_ms = compare_latency(pruned, fast, x)

The sparse CPU kernel that wins on this project's machines is ``csr``: the weight in CSR form
(row offsets, column indices, values) multiplied by ``torch.nn.functional.embedding_bag`` with
per-sample weights (FBGEMM's vectorised kernel: each output row is a weighted sum of rows of the
transposed input). ``csr_mkl`` (``torch.addmm`` with a ``torch.sparse_csr_tensor``, MKL) and ``bsr``
(square blocks, MKL) are timed too; on an AMD EPYC core the embedding-bag kernel ran a 2048x2048
layer at batch 64 in about 0.24 (90% sparse) and 0.14 (95%) of the dense time, MKL's CSR in 0.6-0.7
and 0.3-0.4.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import Example, _args, _eval_mode, _interleaved_ms, _set_module, _threads

SPARSE_KINDS = ("csr", "csr_mkl", "bsr")
_BSR_BLOCKS = (32, 16, 8, 4)


class SparseLinear(nn.Module):
    """``nn.Linear`` whose weight is stored and multiplied in a compressed sparse format.

    Kinds:
        ``csr``: CSR arrays multiplied by ``F.embedding_bag`` (FBGEMM), usually the fastest on CPU.
        ``csr_mkl``: ``torch.addmm`` with a ``torch.sparse_csr_tensor`` (MKL on CPU, cuSPARSE on CUDA).
        ``bsr``: ``torch.addmm`` with a ``torch.sparse_bsr_tensor`` of square ``blocksize`` blocks.

    The output is the transpose of a contiguous (out, N) result, i.e. a column-major (N, out)
    tensor: elementwise ops keep that layout, so a following :class:`SparseLinear` gets its
    transposed input for free. Inference-oriented: the weights are buffers, not parameters
    (gradients still flow to the input). Index dtype is int32.

    Example::

        layer = SparseLinear.from_linear(pruned_linear, "csr")
        torch.testing.assert_close(layer(x), pruned_linear(x))
    """

    def __init__(self, in_features: int, out_features: int, kind: str, crow_indices: Tensor,
                 col_indices: Tensor, values: Tensor, bias: Tensor | None, blocksize: int | None = None) -> None:
        super().__init__()
        if kind not in SPARSE_KINDS:
            raise ValueError(f"kind={kind!r}: must be one of {', '.join(SPARSE_KINDS)}")
        self.in_features, self.out_features, self.kind, self.blocksize = in_features, out_features, kind, blocksize
        self.register_buffer("crow_indices", crow_indices)
        self.register_buffer("col_indices", col_indices)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str = "csr", blocksize: int | None = None) -> SparseLinear:
        """The sparse twin of ``linear`` (its weight's exact zeros are not stored)."""
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        if kind == "bsr" and blocksize is None:
            raise ValueError("kind='bsr' needs a blocksize")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
            sparse = weight.to_sparse_bsr((blocksize, blocksize)) if kind == "bsr" else weight.to_sparse_csr()
        crow = sparse.crow_indices().to(torch.int32)
        col = sparse.col_indices().to(torch.int32)
        return cls(linear.in_features, linear.out_features, kind, crow, col, sparse.values().clone(), bias,
                   blocksize if kind == "bsr" else None)

    @property
    def nnz(self) -> int:
        """Non-zero weights (for ``bsr``: the non-zeros inside the stored blocks)."""
        return int(torch.count_nonzero(self.values))

    @property
    def weight(self) -> Tensor:
        """The dense weight (a new tensor), e.g. to check or to undo the conversion."""
        return self._sparse_weight().to_dense()

    def _sparse_weight(self) -> Tensor:
        size = (self.out_features, self.in_features)
        if self.kind == "bsr":
            return torch.sparse_bsr_tensor(self.crow_indices, self.col_indices, self.values, size,
                                           check_invariants=False)
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values, size, check_invariants=False)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.kind == "csr":
            # row o of the (out, N) result = sum over stored (o, i) of w_oi * (row i of x^T)
            yt = F.embedding_bag(self.col_indices, x2.t().contiguous(), self.crow_indices, mode="sum",
                                 per_sample_weights=self.values, include_last_offset=True)
            if self.bias is not None:
                yt = yt + self.bias.unsqueeze(1)
        elif self.bias is not None:
            yt = torch.addmm(self.bias.unsqueeze(1), self._sparse_weight(), x2.t())
        else:
            yt = torch.mm(self._sparse_weight(), x2.t())
        y = yt.t()
        return y if x.dim() == 2 else y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        block = f", blocksize={self.blocksize}" if self.blocksize else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}{block}, "
                f"nnz={self.nnz}, bias={self.bias is not None}")


@dataclass(frozen=True)
class LayerChoice:
    """What :func:`sparsify_linears` did with one ``nn.Linear``, and why.

    ``kind`` is ``dense`` or the sparse kind that replaced the layer; ``times_ms`` holds the
    median milliseconds of every kernel timed on the layer's real input (``dense`` included),
    empty when the layer was not timed; ``reason`` says why in words.
    """

    name: str
    kind: str
    sparsity: float
    times_ms: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    blocksize: int | None = None

    @property
    def speedup(self) -> float:
        """Dense time / time of the kind chosen (1.0 when dense was kept or nothing was timed)."""
        if self.kind == "dense" or self.kind not in self.times_ms or "dense" not in self.times_ms:
            return 1.0
        return self.times_ms["dense"] / self.times_ms[self.kind]


def _bsr_blocksize(weight: Tensor, min_fill: float) -> tuple[int | None, str]:
    """The largest square block whose stored blocks are at least ``min_fill`` full, if any."""
    rows, cols = weight.shape
    nonzero = weight != 0
    nnz = int(nonzero.sum())
    best_fill = 0.0
    for bs in _BSR_BLOCKS:
        if rows % bs or cols % bs:
            continue
        blocks = nonzero.reshape(rows // bs, bs, cols // bs, bs).any(3).any(1)
        fill = nnz / max(1, int(blocks.sum()) * bs * bs)
        if fill >= min_fill:
            return bs, f"{bs}x{bs} blocks {fill:.0%} full"
        best_fill = max(best_fill, fill)
    return None, f"bsr not timed: no square blocking is {min_fill:.0%} full (best {best_fill:.0%})"


def sparsify_linears(model: nn.Module, example: Example, min_speedup: float = 1.05, min_sparsity: float = 0.5,
                     kinds: Sequence[str] = SPARSE_KINDS, rounds: int = 15, warmup: int = 3,
                     threads: int | None = None, bsr_min_fill: float = 0.5) -> tuple[nn.Module, list[LayerChoice]]:
    """A copy of ``model`` whose sparse ``nn.Linear`` layers run sparse kernels where that is faster.

    Each ``nn.Linear`` that the forward of ``example`` calls and whose weight has at least
    ``min_sparsity`` exact zeros is timed on its real input (captured with a hook) as dense
    ``F.linear`` and as every sparse kind of ``kinds`` (``bsr`` only where a square blocking is
    ``bsr_min_fill`` full), interleaved over ``rounds``; the fastest sparse kind replaces the layer
    (a :class:`SparseLinear`) only when it beats dense by ``min_speedup`` (1.05: 5% faster), so the
    result is never slower than dense beyond noise. ``min_speedup=0`` keeps the fastest sparse
    kind whatever the timing. Run with the thread count you deploy with (``threads``). Outputs
    equal the dense model's within float tolerance. ``model`` itself is not changed.

    Returns:
        The copy (in ``model``'s train/eval mode) and one :class:`LayerChoice` per ``nn.Linear``.
    """
    unknown = [k for k in kinds if k not in SPARSE_KINDS]
    if unknown:
        raise ValueError(f"kinds: {unknown[0]!r} is not one of {', '.join(SPARSE_KINDS)}")
    out = copy.deepcopy(model)
    # exact nn.Linear only: subclasses (e.g. inside nn.MultiheadAttention) are used through .weight
    linears = {name: m for name, m in out.named_modules() if type(m) is nn.Linear}
    inputs: dict[str, Tensor] = {}

    def capture(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            inputs.setdefault(name, args[0].detach().clone())
        return hook

    handles = [m.register_forward_pre_hook(capture(name)) for name, m in linears.items()]
    try:
        with _eval_mode(out), torch.inference_mode():
            out(*_args(example))
    finally:
        for h in handles:
            h.remove()

    choices = []
    with _threads(threads), torch.inference_mode():
        for name, linear in linears.items():
            weight = linear.weight.detach()
            sparsity = 1.0 - int(torch.count_nonzero(weight)) / max(1, weight.numel())
            if name not in inputs:
                choices.append(LayerChoice(name, "dense", sparsity, reason="not called by the example"))
                continue
            if sparsity < min_sparsity:
                choices.append(LayerChoice(name, "dense", sparsity,
                                           reason=f"sparsity {sparsity:.1%} below min_sparsity {min_sparsity:.0%}"))
                continue
            x, bias = inputs[name], linear.bias
            candidates: dict[str, SparseLinear] = {}
            notes = []
            blocksize = None
            for kind in kinds:
                if kind == "bsr":
                    blocksize, note = _bsr_blocksize(weight, bsr_min_fill)
                    notes.append(note)
                    if blocksize is None:
                        continue
                with torch.inference_mode(False):  # ordinary tensors: the copy may be trained through
                    candidates[kind] = SparseLinear.from_linear(linear, kind, blocksize)
            fns: dict[str, Callable[[], Any]] = {"dense": lambda x=x, w=weight, b=bias: F.linear(x, w, b)}
            fns |= {kind: (lambda x=x, m=m: m(x)) for kind, m in candidates.items()}
            times = _interleaved_ms(fns, rounds, warmup)
            if not candidates:
                reason = "; ".join(["no sparse kind to try", *notes])
                choices.append(LayerChoice(name, "dense", sparsity, times, reason))
                continue
            best = min(candidates, key=lambda k: times[k])
            speedup = times["dense"] / times[best]
            detail = "; ".join([", ".join(f"{k} {v:.3f} ms" for k, v in times.items()), *notes])
            if speedup >= min_speedup:
                _set_module(out, name, candidates[best])
                reason = f"{best} is {speedup:.2f}x faster than dense ({detail})"
                choices.append(LayerChoice(name, best, sparsity, times, reason, candidates[best].blocksize))
            else:
                reason = (f"kept dense: the best sparse kind, {best}, is {speedup:.2f}x as fast as dense, "
                          f"needs {min_speedup:.2f}x ({detail})")
                choices.append(LayerChoice(name, "dense", sparsity, times, reason))
    return out, choices
