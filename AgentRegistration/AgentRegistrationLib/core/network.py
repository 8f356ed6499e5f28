"""The dual-stream Q-network (paper, section 3 and Fig. 1b), in 2-D and 3-D.

Two independent streams (fixed image, current moving image) extract features; their
concatenation goes through fully connected layers to 2d outputs, one Q-value per action.
Batch normalisation and ReLU follow every layer but the output. The layer class is chosen
from the dimension, so one definition serves 2-D and 3-D.

Architectures, by name:

* ``paper``: 3 conv layers (32, 64, 64 filters, kernel 3) and 2 max-pool layers per stream;
  FC 128, 128, 64.
* ``compact``: 3 strided conv layers (16, 32, 32 filters, kernel 3, stride 2) per stream and an
  adaptive pool to a small fixed size; FC 128, 64. Trains on CPU in minutes to an hour and
  ships at a few MB.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

ARCHITECTURES = ("paper", "compact")


@dataclass(frozen=True)
class NetworkConfig:
    architecture: str
    dim: int
    input_size: tuple[int, ...]  # ITK order (x, y[, z])
    num_actions: int

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown network architecture {self.architecture!r}; choose one of {ARCHITECTURES}")
        if self.dim not in (2, 3) or len(self.input_size) != self.dim:
            raise ValueError(f"network dimension {self.dim} does not match input size {self.input_size}")

    def to_dict(self) -> dict:
        return {**asdict(self), "input_size": list(self.input_size)}

    @classmethod
    def from_dict(cls, d: dict) -> NetworkConfig:
        return cls(str(d["architecture"]), int(d["dim"]), tuple(int(s) for s in d["input_size"]), int(d["num_actions"]))


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs on oneDNN on the CPU whatever the input's size.

    torch leaves oneDNN for its own loop (``slow_conv3d``) when one small input (batch 1, a few channels, 3 x 3 x 3
    kernels) comes in, which is what a registration gives at each step and to the localiser: oneDNN is 2-8 times as
    fast there on one thread (for example 60 -> 7 ms for the localiser's widest layer, 3.3 -> 1.4 ms per step for the
    Q-network's moving stream). Batches of more than one (training) take oneDNN in torch already. The parameters and
    the weights files are those of ``nn.Conv3d``; the results agree to float rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and torch.backends.mkldnn.is_available()
                and torch.backends.mkldnn.enabled):
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        return super().forward(x)


def _layers(dim: int):
    if dim == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d
    return Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d


def _stream(config: NetworkConfig) -> nn.Sequential:
    conv, bn, pool, adaptive = _layers(config.dim)
    if config.architecture == "paper":
        return nn.Sequential(
            conv(1, 32, 3, padding=1), bn(32), nn.ReLU(inplace=True), pool(2),
            conv(32, 64, 3, padding=1), bn(64), nn.ReLU(inplace=True), pool(2),
            conv(64, 64, 3, padding=1), bn(64), nn.ReLU(inplace=True),
        )
    pooled = (6, 6) if config.dim == 2 else (3, 6, 6)
    return nn.Sequential(
        conv(1, 16, 3, stride=2, padding=1), bn(16), nn.ReLU(inplace=True),
        conv(16, 32, 3, stride=2, padding=1), bn(32), nn.ReLU(inplace=True),
        conv(32, 32, 3, stride=2, padding=1), bn(32), nn.ReLU(inplace=True),
        adaptive(pooled),
    )


def _fc(n_in: int, n_out: int) -> list[nn.Module]:
    return [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.ReLU(inplace=True)]


class DualStreamQNetwork(nn.Module):
    """``forward(fixed, moving) -> (B, num_actions)`` Q-values; inputs ``(B, 1, *spatial)``."""

    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = config
        self.fixed_stream = _stream(config)
        self.moving_stream = _stream(config)
        with torch.no_grad():
            probe = torch.zeros(1, 1, *config.input_size[::-1])
            features = self.fixed_stream.eval()(probe).numel()
        widths = (128, 128, 64) if config.architecture == "paper" else (128, 64)
        layers: list[nn.Module] = []
        n = 2 * features
        for w in widths:
            layers += _fc(n, w)
            n = w
        layers.append(nn.Linear(n, config.num_actions))
        self.head = nn.Sequential(*layers)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        return self.q_values(self.fixed_features(fixed), moving)

    def fixed_features(self, fixed: torch.Tensor) -> torch.Tensor:
        """``(B, features)``: the fixed stream's output. The fixed image does not change during a registration, so
        the agent computes this once and gives it to :meth:`q_values` at every step (half of each step's work)."""
        return self.fixed_stream(fixed).flatten(1)

    def q_values(self, fixed_features: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """``(B, num_actions)`` from the fixed stream's features (:meth:`fixed_features`) and the moving image."""
        return self.head(torch.cat([fixed_features, self.moving_stream(moving).flatten(1)], dim=1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
