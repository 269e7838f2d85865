"""One float32 buffer the engine reuses from mask update to mask update while training."""

from __future__ import annotations

import torch


class Scratch:
    """A 1-D float32 buffer, grown when too small and kept between updates: the first touch of
    fresh memory costs several times a pass over it (page faults)."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def get(self, numel: int, device: torch.device) -> torch.Tensor:
        """The first ``numel`` values of the buffer, on ``device`` (contents undefined)."""
        if self._buffer is None or self._buffer.numel() < numel or self._buffer.device != device:
            self._buffer = torch.empty(numel, dtype=torch.float32, device=device)
        return self._buffer[:numel]

    def like(self, param: torch.Tensor) -> torch.Tensor:
        """The buffer's first values, viewed as ``param``'s shape on its device."""
        return self.get(param.numel(), param.device).view(param.shape)

    def release(self) -> None:
        """Free the memory (training ended); the next ``get`` allocates afresh."""
        self._buffer = None
