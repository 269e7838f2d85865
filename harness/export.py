"""Make pruned models smaller and faster for real, and measure it.

Plain PyTorch (no Hydra, MLflow or Optuna), like ``harness.pruning``; it works on the plain
model that :meth:`harness.pruning.Pruning.finalize` returns, whose pruned weights are exact zeros.

- :func:`measure_latency`, :func:`compare_latency`: median milliseconds per forward, side by side.
- :func:`count_macs`: dense and non-zero multiply-adds of the conv and linear layers.
- :func:`sparsify_linears`: unstructured sparsity -> sparse matmul kernels, chosen per layer by
  timing them against dense on the layer's real input; a kernel is kept only where it is faster.
- :func:`remove_pruned_channels`: channel pruning -> physically smaller conv/linear/BatchNorm layers,
  with the pruned channels' constant outputs folded into the next layer, so outputs stay equal.
- :func:`save_compressed`, :func:`load_compressed`: a checkpoint that stores sparse tensors as a
  bitmask plus the non-zero values; loading is bit-exact.
- :func:`semi_structured_2to4`: 2:4 sparse Linear weights -> NVIDIA's sparse tensor cores (CUDA only).

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

``python -m harness.bench --only g,h,i`` measures the exports against the dense models and
against plain ``torch.sparse``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CompressionReport",
    "DeploymentReport",
    "LayerChoice",
    "PrunedConv2d",
    "ScatteredBatchNorm2d",
    "ScatteredMaxPool2d",
    "SparseLinear",
    "compare_latency",
    "count_macs",
    "deployment_report",
    "load_compressed",
    "measure_latency",
    "remove_pruned_channels",
    "save_compressed",
    "semi_structured_2to4",
    "sparsify_linears",
]

Example = Tensor | Sequence[Tensor]


# -- shared helpers ---------------------------------------------------------------------------


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
    once = time.perf_counter() - start
    if once >= min_sample_s:
        return 1
    return min(1000, math.ceil(min_sample_s / max(once, 1e-7)))


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
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for r in range(rounds):
        for name in order if r % 2 == 0 else reversed(order):
            fn, number = fns[name], numbers[name]
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter() - start) / number)
    return {name: statistics.median(s) * 1e3 for name, s in samples.items()}


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


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
    number counts only non-zero weights. Works on the modules of this file too
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


# -- unstructured sparsity: sparse matmul kernels ---------------------------------------------

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


# -- channel surgery --------------------------------------------------------------------------


class PrunedConv2d(nn.Conv2d):
    """``nn.Conv2d`` without its pruned channels, putting back exactly what they contributed.

    Input side (``const_kernel``): a removed input channel ``j`` that carried a constant ``c_j``
    contributes ``conv2d(c_j * ones, W[:, j])``, a constant in the interior but not at zero-padded
    borders, so it cannot be folded into the bias. ``const_kernel`` (out, 1, kh, kw) is
    ``sum_j c_j * W[:, j]``; its map ``conv2d(ones(H, W), const_kernel)`` is computed once per input
    size, dtype and device and added to the output.

    Output side (``out_index``, ``fill_index``, ``fill_values``): zero filters whose channels cannot
    be removed downstream (they feed a residual addition) are not computed; the output of the
    kept filters is scattered to channels ``out_index`` of a ``full_out_channels`` wide output and
    channels ``fill_index`` get their constant, the bias (``fill_values``), as the zero filters gave.
    """

    def __init__(self, *args: Any, const_kernel: Tensor | None = None, out_index: Tensor | None = None,
                 fill_index: Tensor | None = None, fill_values: Tensor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.groups != 1 or self.padding_mode != "zeros":
            raise ValueError("PrunedConv2d: needs groups=1 and padding_mode='zeros'")
        if (out_index is None) != (fill_index is None) or (fill_index is None) != (fill_values is None):
            raise ValueError("PrunedConv2d: out_index, fill_index and fill_values go together")
        self.register_buffer("const_kernel", const_kernel)
        self.register_buffer("out_index", out_index)
        self.register_buffer("fill_index", fill_index)
        self.register_buffer("fill_values", fill_values)
        self.full_out_channels = self.out_channels + (0 if fill_index is None else fill_index.numel())
        self._maps: dict[tuple[Any, ...], Tensor] = {}
        self._zero_fill: bool | None = None

    def _map(self, x: Tensor) -> Tensor:
        key = (tuple(x.shape[-2:]), x.dtype, x.device)
        found = self._maps.get(key)
        if found is None:
            with torch.inference_mode(False), torch.no_grad():
                ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
                found = F.conv2d(ones, self.const_kernel.to(x.dtype), None, self.stride, self.padding,
                                 self.dilation)
            self._maps[key] = found
        return found if x.dim() == 4 else found[0]

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if self.const_kernel is not None:
            y = y.add_(self._map(x))  # in place: the conv's backward does not need its output
        if self.out_index is None:
            return y
        return _scatter_channels(self, y)

    def _apply(self, fn: Any, recurse: bool = True) -> PrunedConv2d:
        self._maps, self._zero_fill = {}, None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._maps, self._zero_fill = {}, None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        parts = [super().extra_repr()]
        if self.const_kernel is not None:
            parts.append("constant inputs folded")
        if self.out_index is not None:
            parts.append(f"scattered to {self.full_out_channels} output channels")
        return ", ".join(parts)


def _scatter_channels(module: Any, y: Tensor) -> Tensor:
    """``y`` (N, C, H, W or C, H, W) as channels ``module.out_index`` of a
    ``module.full_out_channels`` wide tensor whose channels ``module.fill_index`` hold the
    constants ``module.fill_values`` (whether they are all zero is read once, then kept in
    ``module._zero_fill``: a sync on a GPU)."""
    if module._zero_fill is None:
        module._zero_fill = not bool(module.fill_values.any())
    channels, out_index, fill_index = module.full_out_channels, module.out_index, module.fill_index
    batch = y if y.dim() == 4 else y.unsqueeze(0)
    n, _, h, w = batch.shape
    # A zeroed (or constant-filled) full-width tensor, then the computed channels assigned into
    # it: measured here about twice as fast as an index_copy_ plus an index_fill_ of the rest.
    if module._zero_fill:
        out = batch.new_zeros((n, channels, h, w))
    else:
        background = batch.new_zeros(channels)
        background[fill_index] = module.fill_values.to(batch.dtype)
        out = background.view(1, -1, 1, 1).expand(n, -1, h, w).contiguous()
    out[:, out_index] = batch
    return out if y.dim() == 4 else out[0]


class _ScatteredOutput:
    """Mixin for a channelwise module (BatchNorm2d, MaxPool2d) that runs on the kept channels of a
    pruned conv's output only and scatters its result to the full width, the removed channels
    filled with the constants they had there (a zero filter's output is constant through
    channelwise ops). Moves the scatter of :class:`PrunedConv2d` past the channelwise ops that
    follow the conv, so that they too run on the kept channels."""

    def _scatter_buffers(self, full: int, out_index: Tensor, fill_index: Tensor, fill_values: Tensor) -> None:
        self.full_out_channels = full
        self.register_buffer("out_index", out_index)
        self.register_buffer("fill_index", fill_index)
        self.register_buffer("fill_values", fill_values)
        self._zero_fill: bool | None = None  # read once from fill_values (a sync on a GPU)

    def forward(self, x: Tensor) -> Tensor:
        return _scatter_channels(self, super().forward(x))  # type: ignore[misc]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._zero_fill = None
        return super()._apply(fn, recurse)  # type: ignore[misc]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._zero_fill = None
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scattered to {self.full_out_channels} channels"  # type: ignore[misc]


class ScatteredBatchNorm2d(_ScatteredOutput, nn.BatchNorm2d):
    """A BatchNorm2d of the kept channels whose output is scattered to full width (see the mixin)."""


class ScatteredMaxPool2d(_ScatteredOutput, nn.MaxPool2d):
    """A MaxPool2d over the kept channels whose output is scattered to full width (see the mixin)."""


def _with_scatter(module: nn.Module, full: int, out_index: Tensor, fill_index: Tensor,
                  fill_values: Tensor) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d):
        ref = next((t for t in (module.weight, module.running_mean) if t is not None), None)
        factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        new: nn.Module = ScatteredBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                              module.track_running_stats, **factory)
        new.load_state_dict(module.state_dict())
    else:
        new = ScatteredMaxPool2d(module.kernel_size, module.stride, module.padding, module.dilation,
                                 module.return_indices, module.ceil_mode)
    new._scatter_buffers(full, out_index, fill_index, fill_values)
    new.train(module.training)
    return new


def _scatter_point(node: torch.fx.Node, modules: Mapping[str, nn.Module],
                   calls: Mapping[str, int]) -> tuple[torch.fx.Node, list[str]] | None:
    """The last module the conv at ``node`` reaches through single-user channelwise modules that can
    take the scatter (a BatchNorm2d or MaxPool2d called once), and the BatchNorms up to it."""
    cur, norms, found = node, [], None
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if nxt.op != "call_module" or not _only_input(nxt, cur):
            break
        module = modules[nxt.target]
        if isinstance(module, nn.BatchNorm2d) and calls[nxt.target] == 1:
            norms.append(nxt.target)
        elif not isinstance(module, (nn.MaxPool2d, *_ELEMENTWISE_MODULES)):
            break
        if isinstance(module, nn.BatchNorm2d | nn.MaxPool2d) and calls[nxt.target] == 1 \
                and not getattr(module, "return_indices", False):
            found = (nxt, list(norms))
        cur = nxt
    return found


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.AlphaDropout,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
_POOL_FUNCTIONS = {F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}


@dataclass
class _Chain:
    """producer conv/linear -> channelwise ops -> consumer conv/linear, in one line of single users."""

    producer: str
    consumer: str
    consumer_input: torch.fx.Node
    norms: list[tuple[str, bool]]  # BatchNorm module names, and whether after a flatten
    flatten_from: torch.fx.Node | None  # the node a flatten flattens


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, SparseLinear | PrunedConv2d | _ScatteredOutput) or super().is_leaf_module(m, qualname)


def _only_input(node: torch.fx.Node, prev: torch.fx.Node) -> bool:
    """``prev`` is the node's first argument and no other argument holds a node."""
    return bool(node.args) and node.args[0] is prev and not _nodes_in([*node.args[1:], *node.kwargs.values()])


def _nodes_in(args: Sequence[Any]) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(list(args), lambda n: found.append(n) or n)
    return found


def _flatten_start(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """The node flattens every dimension after the batch (``Flatten()``, ``torch.flatten(x, 1)``)."""
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False


def _find_chain(node: torch.fx.Node, modules: Mapping[str, nn.Module], calls: Mapping[str, int]) -> _Chain | None:
    producer = modules[node.target]
    is_conv = type(producer) is nn.Conv2d
    norms: list[tuple[str, bool]] = []
    flatten_from = None
    cur = node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            return None
        nxt = users[0]
        if not _only_input(nxt, cur):
            return None
        if nxt.op == "call_module":
            m = modules[nxt.target]
            if type(m) in (nn.Conv2d, nn.Linear):
                if calls[nxt.target] != 1 or nxt.kwargs or len(nxt.args) != 1:
                    return None
                if type(m) is nn.Conv2d and not (is_conv and flatten_from is None and m.groups == 1):
                    return None
                if type(m) is nn.Linear and is_conv and flatten_from is None:
                    return None
                return _Chain(node.target, nxt.target, cur, norms, flatten_from)
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                if calls[nxt.target] != 1:
                    return None
                norms.append((nxt.target, flatten_from is not None))
            elif isinstance(m, nn.MaxPool2d | nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d | nn.AvgPool2d):
                if not is_conv or flatten_from is not None:
                    return None
                if isinstance(m, nn.AvgPool2d) and (
                        (m.count_include_pad and m.padding not in (0, (0, 0))) or m.divisor_override):
                    return None  # padded windows would average a constant with zeros
            elif _flatten_start(nxt, modules):
                if not is_conv or flatten_from is not None:
                    return None
                flatten_from = cur
            elif not isinstance(m, _ELEMENTWISE_MODULES):
                return None
        elif nxt.op == "call_function":
            if nxt.target in _POOL_FUNCTIONS:
                if not is_conv or flatten_from is not None:
                    return None
            elif _flatten_start(nxt, modules):
                if not is_conv or flatten_from is not None:
                    return None
                flatten_from = cur
            elif nxt.target not in _ELEMENTWISE_FUNCTIONS:
                return None
        elif nxt.op == "call_method":
            if _flatten_start(nxt, modules):
                if not is_conv or flatten_from is not None:
                    return None
                flatten_from = cur
            elif nxt.target not in _ELEMENTWISE_METHODS:
                return None
        else:
            return None
        cur = nxt


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, keep: set[torch.fx.Node]) -> None:
        super().__init__(gm)
        self.keep = keep
        self.shapes: dict[torch.fx.Node, torch.Size] = {}
        self.values: dict[torch.fx.Node, Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, Tensor):
            self.shapes[n] = result.shape
            if n in self.keep:
                self.values[n] = result.detach().clone()
        return result


def _sliced_norm(bn: nn.Module, keep: Tensor) -> nn.Module:
    new = type(bn)(len(keep), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                   device=(bn.weight if bn.affine else bn.running_mean).device,
                   dtype=(bn.weight if bn.affine else bn.running_mean).dtype)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[keep])
            new.bias.copy_(bn.bias[keep])
            new.weight.requires_grad_(bn.weight.requires_grad)
            new.bias.requires_grad_(bn.bias.requires_grad)
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[keep])
            new.running_var.copy_(bn.running_var[keep])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def remove_pruned_channels(model: nn.Module, example: Example, scatter_outputs: float | None = 0.25) -> nn.Module:
    """A copy of ``model`` in eval mode without the channels that channel pruning zeroed.

    An output channel of a conv (groups=1) or linear layer whose weights are all exact zeros is
    removed when its output reaches the next conv/linear layer only through channelwise
    operations (BatchNorm, activations, dropout, pooling, a flatten before a linear): the layer
    loses that output channel, the BatchNorms in between lose that entry, and the next layer
    loses the matching input channel (for a flatten, the channel's columns).

    Exactness: a zero filter still outputs its bias, which BatchNorm and the activation turn
    into some constant ``c`` (``relu(beta - gamma * mean / sqrt(var + eps))`` for conv-BN-ReLU).
    The removed channel's contribution to the next layer is therefore folded in: into the
    bias of a linear layer or unpadded conv, and for a zero-padded conv (where the constant
    meets the padding at the borders) as a precomputed per-position map
    (:class:`PrunedConv2d`). The constant is read from the forward of ``example`` and a
    channel is removed only if it was constant over the batch (and positions, for a conv).
    Outputs equal ``model``'s in eval mode within float tolerance.

    Channels that feed a residual addition, a concatenation or anything else besides one next
    layer cannot be removed: the tensor keeps its width. For torchvision ResNets the removed
    channels are the internal ones of each block (conv1 -> bn1 of a BasicBlock; conv1 and conv2
    of a Bottleneck), never the residual stream's. A conv whose zero filters feed such a tensor
    (a block's last conv, a downsample, the stem) still skips computing them when at least
    ``scatter_outputs`` of its filters are zero: it computes the others and scatters them into the
    full-width output, the zero filters' channels filled with their bias (:class:`PrunedConv2d`;
    ``None`` leaves such layers as they are). Where the conv is followed by channelwise modules
    (BatchNorm, activations, the stem's max-pool) before the tensor branches, those run on the
    kept channels too and the last BatchNorm or max-pool on the way scatters instead, the removed
    channels filled with the constants they have there (read from ``example``, and only where
    they are constant; :class:`ScatteredBatchNorm2d`, :class:`ScatteredMaxPool2d`).

    The graph comes from ``torch.fx`` symbolic tracing (a model it cannot trace is a
    ``ValueError``). A layer always keeps one channel. The new layers keep the old names, so
    ``state_dict`` keys stay; the tensors are smaller.
    """
    out = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(out)
    except Exception as err:  # fx raises many kinds for untraceable code
        raise ValueError(f"remove_pruned_channels: cannot trace {type(model).__name__} with torch.fx "
                         f"({type(err).__name__}: {err})") from err
    gm = torch.fx.GraphModule(out, graph)
    modules = dict(out.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    chains: list[_Chain] = []
    unchained: list[str] = []  # layers with zero filters whose outputs cannot be narrowed
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in (nn.Conv2d, nn.Linear):
            continue
        if calls[node.target] != 1 or getattr(modules[node.target], "groups", 1) != 1:
            continue
        if not bool((modules[node.target].weight.detach().flatten(1) == 0).all(1).any()):
            continue
        chain = _find_chain(node, modules, calls)
        if chain is not None:
            chains.append(chain)
        else:
            unchained.append(node.target)
    if not chains and not unchained:
        return out

    points = {}  # conv -> where its scatter can move to (past the channelwise modules after it)
    for node in graph.nodes:
        if node.op == "call_module" and node.target in {*unchained, *(c.producer for c in chains)}:
            found = _scatter_point(node, modules, calls)
            if found is not None:
                points[node.target] = found
    recorder = _Recorder(gm, {c.consumer_input for c in chains} | {point for point, _ in points.values()})
    with torch.inference_mode():
        recorder.run(*_args(example))

    out_keep: dict[str, Tensor] = {}
    norm_keep: dict[str, Tensor] = {}
    in_plan: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # consumer -> kept cols, removed cols, their constants
    for chain in chains:
        producer, consumer = modules[chain.producer], modules[chain.consumer]
        if chain.consumer_input not in recorder.values:
            continue  # not run by the example
        weight = producer.weight.detach()
        channels = weight.shape[0]
        zero = (weight.flatten(1) == 0).all(1).nonzero().flatten().tolist()
        value = recorder.values[chain.consumer_input]
        spatial = 1
        if chain.flatten_from is not None:
            spatial = math.prod(recorder.shapes[chain.flatten_from][2:])
        if isinstance(consumer, nn.Linear):
            if value.dim() != 2 or consumer.in_features != channels * spatial:
                continue
        elif value.dim() != 4 or consumer.in_channels != channels:
            continue
        removed: dict[int, Tensor] = {}
        for j in zero:
            if isinstance(consumer, nn.Linear):
                cols = value[:, j * spatial:(j + 1) * spatial]
                if bool((cols == cols[:1]).all()):
                    removed[j] = cols[0]
            else:
                plane = value[:, j]
                if bool((plane == plane.reshape(-1)[0]).all()):
                    removed[j] = plane.reshape(-1)[:1]
        if len(removed) == channels:  # keep one channel
            removed.pop(min(removed))
        if not removed:
            continue
        keep = torch.tensor([j for j in range(channels) if j not in removed], dtype=torch.long)
        out_keep[chain.producer] = keep
        gone = sorted(removed)
        col_keep = (keep.view(-1, 1) * spatial + torch.arange(spatial)).flatten()
        col_gone = (torch.tensor(gone).view(-1, 1) * spatial + torch.arange(spatial)).flatten()
        for name, after_flatten in chain.norms:
            norm_keep[name] = col_keep if after_flatten else keep
        constants = torch.cat([removed[j] for j in gone]).to(torch.float64)
        in_plan[chain.consumer] = (col_keep, col_gone, constants)
    scattered = set()
    late_scatters: dict[str, tuple[int, Tensor, Tensor, Tensor]] = {}
    if scatter_outputs is not None:
        for chain in chains:
            if chain.producer not in out_keep:
                unchained.append(chain.producer)
        for name in unchained:
            layer = modules[name]
            zero = (layer.weight.detach().flatten(1) == 0).all(1)
            if isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and (
                    float(zero.float().mean()) >= scatter_outputs and not bool(zero.all())):
                out_keep[name] = (~zero).nonzero().flatten()
                late = _late_scatter(points.get(name), recorder, zero)
                if late is None:
                    scattered.add(name)
                else:  # the conv and the channelwise modules after it run on the kept channels only
                    point, norms, fill_values = late
                    for norm in norms:
                        norm_keep[norm] = out_keep[name]
                    late_scatters[point] = (len(zero), out_keep[name], zero.nonzero().flatten(), fill_values)

    for name, keep in norm_keep.items():
        _set_module(out, name, _sliced_norm(modules[name], keep))
    for name, (full, keep, gone, fill_values) in late_scatters.items():
        _set_module(out, name, _with_scatter(out.get_submodule(name), full, keep, gone, fill_values))
    for name in dict.fromkeys([*out_keep, *in_plan]):
        new = _rebuilt_layer(modules[name], out_keep.get(name), in_plan.get(name), name in scattered)
        _set_module(out, name, new)
    return out


def _late_scatter(found: tuple[torch.fx.Node, list[str]] | None, recorder: _Recorder,
                  zero: Tensor) -> tuple[str, list[str], Tensor] | None:
    """Where a conv's scatter moves to, the BatchNorms on the way, and the removed channels' constants
    there (read from the example's forward); ``None`` when a removed channel is not constant there."""
    if found is None or found[0] not in recorder.values:
        return None
    point, norms = found
    value = recorder.values[point]
    if value.dim() != 4 or value.shape[1] != zero.numel():
        return None
    planes = value[:, zero].transpose(0, 1).reshape(int(zero.sum()), -1)
    if not bool((planes == planes[:, :1]).all()):
        return None
    return point.target, norms, planes[:, 0].clone()


def _rebuilt_layer(layer: nn.Module, rows: Tensor | None, inputs: tuple[Tensor, Tensor, Tensor] | None,
                   scatter: bool) -> nn.Module:
    """``layer`` restricted to output ``rows`` and kept inputs, the removed inputs' constants folded in;
    with ``scatter``, the output is scattered back to full width (the other rows filled with their bias)."""
    weight = layer.weight.detach()
    extra_kwargs: dict[str, Tensor] = {}
    if scatter:
        assert rows is not None
        fill = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        fill[rows] = False
        fill_index = fill.nonzero().flatten()
        fill_values = layer.bias.detach()[fill_index] if layer.bias is not None else weight.new_zeros(len(fill_index))
        extra_kwargs = {"out_index": rows.clone(), "fill_index": fill_index, "fill_values": fill_values.clone()}
    if rows is not None:
        weight = weight[rows]
    bias = layer.bias.detach() if layer.bias is not None else None
    if bias is not None and rows is not None:
        bias = bias[rows]
    const_kernel = None
    if inputs is not None:
        keep, gone, constants = inputs
        removed = weight[:, gone].to(torch.float64)
        weight = weight[:, keep]
        if bool((constants != 0).any()):
            if isinstance(layer, nn.Linear):
                extra = removed @ constants
            else:
                kernel = (removed * constants.view(1, -1, 1, 1)).sum(1, keepdim=True)
                padded = layer.padding_mode == "zeros" and layer.padding not in ("valid", 0, (0, 0))
                if padded:
                    const_kernel = kernel.to(weight.dtype)
                    extra = None
                else:  # a constant plane stays constant: every position sees the whole kernel
                    extra = kernel.sum((1, 2, 3))
            if extra is not None:
                base = bias.to(torch.float64) if bias is not None else torch.zeros_like(extra)
                bias = (base + extra).to(weight.dtype)
    factory = dict(device=weight.device, dtype=weight.dtype)
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, **factory)
    else:
        conv_args = (weight.shape[1], weight.shape[0], layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, 1, bias is not None, layer.padding_mode)
        if const_kernel is not None or extra_kwargs:
            new = PrunedConv2d(*conv_args, const_kernel=const_kernel, **extra_kwargs, **factory)
        else:
            new = nn.Conv2d(*conv_args, **factory)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.weight.requires_grad_(layer.weight.requires_grad)
        if bias is not None:
            new.bias.copy_(bias)
            new.bias.requires_grad_(layer.bias.requires_grad if layer.bias is not None else True)
    new.train(layer.training)
    return new


# -- compressed checkpoints -------------------------------------------------------------------

_FORMAT = "harness.export.compressed/1"


@dataclass(frozen=True)
class CompressionReport:
    """Bytes of tensor data: as dense tensors, as stored (bitmask + values or dense), and per tensor.

    ``ratio`` is ``compressed_bytes / dense_bytes``; ``kinds`` maps each tensor name to ``dense``
    or ``bitmask``; ``file_bytes`` is the size of the written file (container overhead included).
    """

    dense_bytes: int
    compressed_bytes: int
    file_bytes: int
    kinds: dict[str, str] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.compressed_bytes / self.dense_bytes if self.dense_bytes else 1.0


_SIGNED_ZERO_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _packbits(bits: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(bits.numpy()))


def _unpackbits(packed: Tensor, count: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).astype(bool))


def _bitmask_entry(t: Tensor) -> tuple[dict[str, Any], int]:
    """``t`` as a bitmask of its non-zeros plus their values, and the bytes that takes.

    Floats: "non-zero" is ``!= 0`` (NaN included), and when some zeros are -0.0 (a negative
    weight times a 0 mask gives -0.0) a second bitmask over the zeros keeps their signs.
    Other dtypes: a non-zero bit pattern.
    """
    flat = t.contiguous().reshape(-1)
    entry: dict[str, Any] = {"shape": list(t.shape)}
    if t.dtype in _SIGNED_ZERO_DTYPES:
        nonzero = flat.ne(0)
        negative = torch.signbit(flat[~nonzero])
        if bool(negative.any()):
            entry["negzero"] = _packbits(negative)
    else:
        nonzero = flat.view(torch.uint8).reshape(-1, t.element_size()).ne(0).any(1)
    entry["mask"] = _packbits(nonzero)
    entry["values"] = flat[nonzero].clone()
    size = entry["mask"].numel() + entry["values"].numel() * t.element_size()
    return entry, size + (entry["negzero"].numel() if "negzero" in entry else 0)


def save_compressed(model_or_state_dict: nn.Module | Mapping[str, Tensor], path: str | Path) -> CompressionReport:
    """Write a state_dict that stores each tensor dense or as (bitmask, non-zero values), whichever is smaller.

    :func:`load_compressed` gives back bit-identical tensors with their dtypes: NaN is a
    stored value, and the signs of -0.0 zeros (which masking negative weights produces) are
    kept in a second bitmask when there are any. Tensors are
    saved from the CPU. The file is ``torch.save`` of plain dicts, lists, strings and tensors
    (``torch.load(path, weights_only=True)`` reads it).
    """
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    entries: dict[str, dict[str, Any]] = {}
    kinds: dict[str, str] = {}
    dense_total = stored_total = 0
    for name, tensor in state.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"save_compressed: {name!r} is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach().cpu()
        dense_bytes = t.numel() * t.element_size()
        dense_total += dense_bytes
        if t.layout == torch.strided and not t.is_quantized and t.numel() > 0:
            entry, packed_bytes = _bitmask_entry(t)
            if packed_bytes < dense_bytes:
                entries[name] = entry
                kinds[name] = "bitmask"
                stored_total += packed_bytes
                continue
        if t.layout == torch.strided and t.untyped_storage().nbytes() != dense_bytes:
            t = t.clone()  # a view: do not write the whole storage it looks into
        entries[name] = {"dense": t}
        kinds[name] = "dense"
        stored_total += dense_bytes
    path = Path(path)
    torch.save({"format": _FORMAT, "tensors": entries}, path)
    return CompressionReport(dense_total, stored_total, path.stat().st_size, kinds)


def load_compressed(path: str | Path) -> OrderedDict[str, Tensor]:
    """The state_dict written by :func:`save_compressed`, bit-exact, on the CPU."""
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a checkpoint written by harness.export.save_compressed")
    state: OrderedDict[str, Tensor] = OrderedDict()
    for name, entry in data["tensors"].items():
        if "dense" in entry:
            state[name] = entry["dense"]
            continue
        shape, values = entry["shape"], entry["values"]
        numel = math.prod(shape)
        nonzero = _unpackbits(entry["mask"], numel)
        flat = torch.zeros(numel, dtype=values.dtype)
        flat[nonzero] = values
        if "negzero" in entry:
            negative = _unpackbits(entry["negzero"], numel - values.numel())
            flat[~nonzero] = torch.where(negative, -0.0, 0.0).to(values.dtype)
        state[name] = flat.reshape(shape)
    return state


# -- 2:4 semi-structured sparsity (CUDA) ------------------------------------------------------


def _is_2to4(weight: Tensor) -> bool:
    """At most 2 non-zeros in every 4 consecutive weights along the input dimension."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(-1, 4) != 0).sum(1) <= 2).all())


def semi_structured_2to4(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose exactly-2:4-sparse ``nn.Linear`` weights use sparse tensor cores.

    Needs a CUDA GPU of compute capability 8.0 or newer (Ampere+) and the model on it, typically
    in float16 or bfloat16 (``model.cuda().half()``). Each ``nn.Linear`` whose weight has at most
    2 non-zeros in every 4 consecutive inputs (``prune=nm prune.n=2 prune.m=4``) gets a
    ``torch.sparse.to_sparse_semi_structured`` weight; layers that are not 2:4, or whose
    shape/dtype the kernels do not support, stay dense (inspect
    ``isinstance(m.weight, torch.sparse.SparseSemiStructuredTensor)``).

    Raises:
        RuntimeError: without CUDA, on an older GPU, or when the model's linear weights are not on CUDA.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("semi_structured_2to4: needs a CUDA GPU (torch.cuda.is_available() is False); "
                           "2:4 sparse kernels run only on NVIDIA GPUs of compute capability 8.0+. "
                           "On CPU use sparsify_linears.")
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        raise RuntimeError(f"semi_structured_2to4: GPU {torch.cuda.get_device_name()} has compute capability "
                           f"{capability[0]}.{capability[1]}; 2:4 sparse tensor cores need 8.0+ (Ampere or newer)")
    from torch.sparse import to_sparse_semi_structured

    out = copy.deepcopy(model)
    for name, module in out.named_modules():
        if type(module) is not nn.Linear:
            continue
        weight = module.weight.detach()
        if not weight.is_cuda:
            raise RuntimeError(f"semi_structured_2to4: {name}.weight is on {weight.device}; move the model to "
                               "CUDA first (e.g. model.cuda().half())")
        if not _is_2to4(weight):
            continue
        try:
            sparse = to_sparse_semi_structured(weight.contiguous())
        except RuntimeError:  # dtype or shape the kernels do not take: stays dense
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
    return out


# -- what a run reports ---------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentReport:
    """What pruning bought, measured on one batch: latency of the exported model against the
    dense one (timed side by side), multiply-adds, and the compressed checkpoint's size."""

    metrics: dict[str, float]
    notes: list[str]


def deployment_report(dense: nn.Module, pruned: nn.Module, example: Tensor, checkpoint: Path,
                      channels: bool) -> DeploymentReport:
    """Export ``pruned`` the way its sparsity allows (channels removed, or sparse linear kernels where
    they are faster), time it against ``dense``, count MACs, and write the compressed checkpoint."""
    notes: list[str] = []
    try:
        if channels:
            exported = remove_pruned_channels(pruned, example)
            notes.append("export: pruned channels removed from the layers")
        else:
            exported, choices = sparsify_linears(pruned, example)
            notes += [f"export: {c.name} runs {c.kind} ({c.reason})" for c in choices]
    except Exception as err:  # a model the exporters cannot trace: measure it as it is, and say so
        exported = pruned
        notes.append(f"export: kept the masked model ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
    dense_ms, pruned_ms = compare_latency(dense, exported, example, rounds=15, warmup=3)
    dense_macs, nonzero_macs = count_macs(pruned, example)
    size = save_compressed(pruned, checkpoint)
    return DeploymentReport({
        "latency/dense_ms": dense_ms,
        "latency/pruned_ms": pruned_ms,
        "speedup": dense_ms / pruned_ms if pruned_ms > 0 else float("nan"),
        "size/dense_bytes": float(size.dense_bytes),
        "size/compressed_bytes": float(size.compressed_bytes),
        "macs/dense": float(dense_macs),
        "macs/nonzero": float(nonzero_macs),
    }, notes)
