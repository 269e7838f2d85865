"""Compressed checkpoints: sparse tensors stored as a bitmask plus the non-zero values; loading is bit-exact."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

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
