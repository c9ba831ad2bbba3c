"""QuickSRNet (Qualcomm, arXiv 2303.04336): the mobile super-resolution network used for Neodragon's 2x
output, in the aimet-model-zoo `QuickSRNetBase` layout.

    cnn       = [Conv3x3(3 -> C), Hardtanh(0, 1)] + num_intermediate_layers x [Conv3x3(C -> C), Hardtanh(0, 1)]
    conv_last = Conv3x3(C -> 3 s^2)
    anchor    = Conv1x1(3 -> 3 s^2)          (Large only: the trainable "input-to-output" connection)
    out       = PixelShuffle(s)(clamp(conv_last(cnn(x)) [+ anchor(x)], 0, 1))

Keys: `cnn.{0,2,4,...}.{weight,bias}` (convs at even Sequential indices), `conv_last.*`, and for Large
`anchor.net.*`. Input and output are RGB float in [0, 1], NCHW: [N, 3, h, w] -> [N, 3, s h, s w]; the
output is clipped before the depth-to-space.

Fresh models start near "repeat the input" (`initialize`): every cnn conv gets +1 on its centre
diagonal tap, and the input is repeated s^2 times before the depth-to-space (so the network starts as
nearest-neighbour upsampling plus a learned residual): through the anchor (initialised to the
channel repeat) for Large, folded into conv_last (+1 at weight[o, o // s^2, centre]) for Small/Medium.

Published checkpoints: `quicksrnet_{small,medium,large}_{s}x_checkpoint_float32.pth.tar` holding
`{"state_dict": ...}`, read with `torch.load(weights_only=True)`; the scale comes from the tensor shapes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.models.base import Checkpoint, PretrainedModel
from neodragon_cli.pipelines.models.checkpoint import read_state_dict
from neodragon_cli.registry import register

SCALES = (2, 3, 4)
RGB = dict(in_channels=3, out_channels=3)
VARIANTS = {
    "small": dict(num_channels=32, num_intermediate_layers=2, use_ito_connection=False, **RGB),
    "medium": dict(num_channels=32, num_intermediate_layers=5, use_ito_connection=False, **RGB),
    "large": dict(num_channels=64, num_intermediate_layers=11, use_ito_connection=True, **RGB),
}


class RepeatAnchor(nn.Module):
    """1x1 conv 3 -> 3 s^2 (key `net`), initialised so output channel o copies input channel o // s^2."""

    def __init__(self, scaling_factor: int, channels: int = 3):
        super().__init__()
        self.repeats = scaling_factor**2
        self.net = nn.Conv2d(channels, channels * self.repeats, 1)

    @torch.no_grad()
    def initialize(self) -> None:
        self.net.weight.zero_()
        self.net.bias.zero_()
        for o in range(self.net.out_channels):
            self.net.weight[o, o // self.repeats, 0, 0] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class QuickSRNet(PretrainedModel):
    """QuickSRNet at an integer scale (2, 3 or 4); see the module docstring.

    A folder written by `save_pretrained` holds config.json + model.safetensors; `save_published`
    writes the aimet-model-zoo torch file, whose config `from_pretrained` reads from the tensor shapes."""

    weights_names = ("model.safetensors",)
    repeated_blocks = ()  # cnn interleaves convs and activations in one Sequential
    keep_precision = ()

    def __init__(
        self,
        scaling_factor: int = 2,
        num_channels: int = 32,
        num_intermediate_layers: int = 2,
        use_ito_connection: bool = False,
        in_channels: int = 3,
        out_channels: int = 3,
    ):
        super().__init__()
        if scaling_factor not in SCALES:
            scales = ", ".join(map(str, SCALES))
            raise UsageError(f"QuickSRNet scale {scaling_factor} is not supported", hint=f"use one of {scales}")
        if use_ito_connection and in_channels != out_channels:
            raise UsageError("the input-to-output connection needs in_channels == out_channels")
        self.in_channels = in_channels
        self.scaling_factor = scaling_factor
        layers: list[nn.Module] = [nn.Conv2d(in_channels, num_channels, 3, padding=1), nn.Hardtanh(0.0, 1.0)]
        for _ in range(num_intermediate_layers):
            layers += [nn.Conv2d(num_channels, num_channels, 3, padding=1), nn.Hardtanh(0.0, 1.0)]
        self.cnn = nn.Sequential(*layers)
        self.conv_last = nn.Conv2d(num_channels, out_channels * scaling_factor**2, 3, padding=1)
        self.anchor = RepeatAnchor(scaling_factor, in_channels) if use_ito_connection else None
        self.depth_to_space = nn.PixelShuffle(scaling_factor)
        self.initialize()

    @torch.no_grad()
    def initialize(self) -> None:
        """Add the identity / input-repeat terms to the current weights (the reference `initialize()`)."""
        for conv in self.cnn:
            if isinstance(conv, nn.Conv2d):
                for i in range(min(conv.in_channels, conv.out_channels)):
                    conv.weight[i, i, 1, 1] += 1.0
        if self.anchor is not None:
            self.anchor.initialize()
        else:
            repeats = self.scaling_factor**2
            for o in range(self.conv_last.out_channels):
                self.conv_last.weight[o, o // repeats, 1, 1] += 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_last(self.cnn(x))
        if self.anchor is not None:
            y = y + self.anchor(x)
        return self.depth_to_space(y.clamp(0.0, 1.0))

    def example_inputs(self, batch: int = 1) -> dict:
        """x [batch, in_channels, 8, 8] in [0, 1]."""
        return {"x": torch.rand(batch, self.in_channels, 8, 8, **self._example_factory())}

    @classmethod
    def read_checkpoint(cls, path: Path) -> Checkpoint:
        """A published `.pth.tar` (or any torch / safetensors file of the same keys), the config read
        from the tensor shapes; or a folder written by `save_pretrained`."""
        if path.is_dir():
            return super().read_checkpoint(path)
        state = read_state_dict(path)
        return Checkpoint(config_from_state(state, str(path)), state, str(path))

    def save_published(self, path: str | Path) -> None:
        """Write the aimet-model-zoo layout: a torch file holding {"state_dict": ...}."""
        from neodragon_cli.atomic import atomic_path

        with atomic_path(path) as tmp:
            torch.save({"state_dict": {k: v.detach().contiguous() for k, v in self.state_dict().items()}}, tmp)


def config_from_state(state: dict[str, torch.Tensor], source: str) -> dict:
    """QuickSRNet constructor arguments read from a state dict's shapes."""
    if "cnn.0.weight" not in state or "conv_last.weight" not in state:
        raise CheckpointError(f"{source} is not a QuickSRNet checkpoint (no cnn.0.weight / conv_last.weight)")
    first, last = state["cnn.0.weight"], state["conv_last.weight"]
    convs = sum(1 for k in state if k.startswith("cnn.") and k.endswith(".weight"))
    has_anchor = "anchor.net.weight" in state
    out_channels = int(state["anchor.net.weight"].shape[1]) if has_anchor else int(first.shape[1])
    scale = math.isqrt(last.shape[0] // out_channels)
    return {
        "scaling_factor": scale,
        "num_channels": int(first.shape[0]),
        "num_intermediate_layers": convs - 1,
        "use_ito_connection": has_anchor,
        "in_channels": int(first.shape[1]),
        "out_channels": out_channels,
    }


def _variant_detector(variant: str):
    def detect(path: Path) -> bool:
        if path.is_file():
            return path.name.startswith(f"quicksrnet_{variant}_")
        config = path / "config.json"
        return config.is_file() and f'"QuickSRNet{variant.capitalize()}"' in config.read_text()

    return detect


class _QuickSRNetVariant(QuickSRNet):
    """A QuickSRNet with the variant's widths fixed (`preset`); only the scale is free (its config),
    so other widths in a checkpoint show up as key / shape mismatches. config.json still lists the
    widths, as the generic class reads them."""

    preset: ClassVar[dict]

    def __init__(self, scaling_factor: int = 2):
        super().__init__(scaling_factor=scaling_factor, **self.preset)

    def published_config(self) -> dict:
        return {"_class_name": type(self).__name__, **self.preset, **self.config}


@register("sr", "quicksrnet-small", description="QuickSRNet-Small (32 ch, 2 layers; 2x/3x/4x)", detect=_variant_detector("small"))
class QuickSRNetSmall(_QuickSRNetVariant):
    """QuickSRNet-Small: 32 channels, 2 intermediate layers, input repeat folded into conv_last."""

    preset = VARIANTS["small"]


@register("sr", "quicksrnet-medium", description="QuickSRNet-Medium (32 ch, 5 layers; 2x/3x/4x)", detect=_variant_detector("medium"))
class QuickSRNetMedium(_QuickSRNetVariant):
    """QuickSRNet-Medium: 32 channels, 5 intermediate layers, input repeat folded into conv_last."""

    preset = VARIANTS["medium"]


@register("sr", "quicksrnet-large", description="QuickSRNet-Large (64 ch, 11 layers, anchor)", detect=_variant_detector("large"))
class QuickSRNetLarge(_QuickSRNetVariant):
    """QuickSRNet-Large: 64 channels, 11 intermediate layers, trainable input-to-output anchor."""

    preset = VARIANTS["large"]
