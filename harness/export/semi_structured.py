"""2:4 sparse Linear weights -> NVIDIA's sparse tensor cores (CUDA only)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.sparse import to_sparse_semi_structured


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
