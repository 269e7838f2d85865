"""Channel pruning -> physically smaller conv/linear/BatchNorm layers (:func:`remove_pruned_channels`).

The pruned channels' constant outputs are folded into the next layer, so outputs stay equal; the
graph comes from ``torch.fx`` symbolic tracing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import Example, _args, _set_module
from .sparse_linear import SparseLinear


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
