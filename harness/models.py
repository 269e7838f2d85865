"""Model builders: the digits CNN, a LeNet-300-100 MLP, and any torchvision classifier."""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import torch
from torch import nn

from harness.config import ModelConfig
from harness.errors import ConfigError


class DigitsCNN(nn.Module):
    """The small CNN of our pruning comparisons (151,072 prunable weights on 8x8 digits)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * (image_size // 2) ** 2, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Fully connected network on the flattened input, LeNet-300-100 shaped by default."""

    def __init__(self, in_features: int, num_classes: int, hidden_sizes: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the configured model for inputs of ``input_shape`` (C, H, W) and ``num_classes``.

    Weights start from the seed set by the caller, or from ``cfg.checkpoint`` when given.
    """
    if cfg.source == "harness" and cfg.name == "digits_cnn":
        if len(input_shape) != 3 or input_shape[1] != input_shape[2]:
            raise ConfigError(f"model.name=digits_cnn: needs square images, the dataset gives {input_shape}")
        model: nn.Module = DigitsCNN(input_shape[0], num_classes, input_shape[1])
    elif cfg.source == "harness":
        model = MLP(math.prod(input_shape), num_classes, list(cfg.hidden_sizes))
    else:
        model = _torchvision_model(cfg.name, input_shape[0], num_classes)
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
    return model


def _torchvision_model(name: str, in_channels: int, num_classes: int) -> nn.Module:
    from torchvision import models

    available = models.list_models(module=models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"closest: {', '.join(close)}" if close else "see torchvision.models.list_models()"
        raise ConfigError(f"model.name={name}: not a torchvision classification model; {hint}")
    model = models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Give the stem convolution ``in_channels`` inputs (e.g. 1 for grayscale data)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, child_name, nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride,
                    child.padding, child.dilation, child.groups, child.bias is not None,
                ))
                return
    raise ConfigError(f"model: cannot adapt the model to {in_channels} input channels (no Conv2d found)")


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state_dict (or a dict holding one under ``state_dict``/``model``) strictly."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"model.checkpoint={path}: no such file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a corrupt file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"model.checkpoint={path}: not a readable PyTorch checkpoint ({reason})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ConfigError(
            f"model.checkpoint={path}: keys do not match the model ({what}; "
            f"{len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for key, tensor in own.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"model.checkpoint={path}: {key} has shape {tuple(state[key].shape)}, "
                f"the model needs {tuple(tensor.shape)}"
            )
    model.load_state_dict(state)
