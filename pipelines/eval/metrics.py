"""Per-video metrics that need no downloaded weights (plus LPIPS from user-supplied local weights).

Videos are uint8 frames [T, H, W, 3] (RGB, 0..255), as `read_video` returns them; reconstruction
metrics compare a video with a reference of the same shape.

- `temporal_flicker`: VBench's temporal_flickering, (255 − mean_t mean|F_t − F_{t+1}|)/255, raw in
  [0, 1]; `vbench_normalise` maps it with VBench's Min/Max (0.6293..1) as VBench's aggregation does.
- `psnr`: over the whole clip (one MSE over all frames and pixels), in dB; +inf for identical videos.
- `ssim`: Wang et al. 2004 (Gaussian window 11, σ 1.5, K1 0.01, K2 0.03, valid region only), per
  frame and channel, averaged.
- `lpips`: the LPIPS distance (AlexNet variant) averaged over frames. The AlexNet backbone must be
  given as a local file (torchvision's `alexnet-owt-7be5be79.pth` layout); the calibrated linear heads
  (the `lpips` package's `weights/v0.1/alex.pth`) are optional — without them every channel weighs
  the same (LPIPS's uncalibrated "baseline" form).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neodragon_cli.errors import CheckpointError, UsageError

#: VBench's normalisation range for temporal_flickering (scripts/constant.py).
FLICKER_MIN, FLICKER_MAX = 0.6293, 1.0


def temporal_flicker(frames: np.ndarray) -> float:
    """VBench temporal_flickering of uint8 frames [T, H, W, 3] (raw score; 1 = no change at all)."""
    frames = np.asarray(frames)
    if len(frames) < 2:
        return 1.0
    # Every frame pair has the same pixel count, so the mean over pairs of per-pair means is one mean.
    mean_abs_diff = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(dtype=np.float64)
    return float((255.0 - mean_abs_diff) / 255.0)


def vbench_normalise(raw: float, low: float = FLICKER_MIN, high: float = FLICKER_MAX) -> float:
    """VBench's per-dimension normalisation (raw − Min)/(Max − Min), clipped to [0, 1]."""
    return float(min(1.0, max(0.0, (raw - low) / (high - low))))


def _check_pair(video: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    video, reference = np.asarray(video), np.asarray(reference)
    if video.shape != reference.shape:
        raise UsageError(f"video shape {tuple(video.shape)} differs from the reference's {tuple(reference.shape)}")
    return video, reference


def psnr(video: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> float:
    """PSNR in dB over the whole clip (+inf when identical)."""
    video, reference = _check_pair(video, reference)
    mse = float(np.mean((video.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(video: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM over frames and channels (valid-region Gaussian SSIM, as in Wang et al. 2004)."""
    from scipy import ndimage

    video, reference = _check_pair(video, reference)
    if min(video.shape[1:3]) < 11:
        raise UsageError(f"SSIM needs frames of at least 11x11 pixels, got {video.shape[1]}x{video.shape[2]}")
    taps = np.arange(11, dtype=np.float64) - 5
    g = np.exp(-(taps**2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(img: np.ndarray) -> np.ndarray:  # separable Gaussian over H and W; keep the valid region
        return ndimage.correlate1d(ndimage.correlate1d(img, g, axis=1), g, axis=2)[:, 5:-5, 5:-5]

    # Scaled to [0, 1] so that float32 keeps E[x²] − E[x]² accurate.
    x = np.asarray(video, np.float32) / data_range
    y = np.asarray(reference, np.float32) / data_range
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean(dtype=np.float64))


# ----------------------------------------------------------------------------------------------
# LPIPS (AlexNet) from local weight files
# ----------------------------------------------------------------------------------------------

# torchvision AlexNet `features` convolutions: (index in the Sequential, in, out, kernel, stride, padding).
_ALEX_CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1), (10, 256, 256, 3, 1, 1))
# LPIPS's input scaling of [-1, 1] images (its ScalingLayer constants).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPS(torch.nn.Module):
    """LPIPS distance with an AlexNet backbone: unit-normalise each layer's features over channels,
    square the difference, weight channels (linear heads), average over space, sum over the 5 layers."""

    def __init__(self, heads: bool = True):
        super().__init__()
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(i, o, k, s, p) for _, i, o, k, s, p in _ALEX_CONVS)
        self.heads = torch.nn.ParameterList(torch.nn.Parameter(torch.ones(1, c[2], 1, 1) / c[2]) for c in _ALEX_CONVS) if heads else None
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))

    @classmethod
    def from_files(cls, backbone: str | Path, heads: str | Path | None = None) -> "LPIPS":
        backbone = Path(backbone)
        if not backbone.is_file():
            raise UsageError(
                f"LPIPS backbone weights not found at {backbone}",
                hint="give a local copy of torchvision's alexnet-owt-7be5be79.pth (LPIPS never downloads weights here)",
            )
        model = cls(heads=heads is not None)
        state = torch.load(backbone, map_location="cpu", weights_only=True)
        for conv, (index, *_) in zip(model.convs, _ALEX_CONVS):
            for name in ("weight", "bias"):
                key = f"features.{index}.{name}"
                if key not in state or state[key].shape != getattr(conv, name).shape:
                    raise CheckpointError(f"{backbone} is not a torchvision AlexNet state dict (missing or mis-shaped '{key}')")
                getattr(conv, name).data.copy_(state[key])
        if heads is not None:
            heads = Path(heads)
            if not heads.is_file():
                raise UsageError(f"LPIPS linear heads not found at {heads}", hint="give the lpips package's weights/v0.1/alex.pth")
            head_state = torch.load(heads, map_location="cpu", weights_only=True)
            for k, param in enumerate(model.heads):
                key = next((n for n in head_state if n.startswith(f"lin{k}.") and n.endswith("weight")), None)
                if key is None or head_state[key].shape != param.shape:
                    raise CheckpointError(f"{heads} is not an LPIPS AlexNet linear-head file (no lin{k} weight of shape {tuple(param.shape)})")
                param.data.copy_(head_state[key])
        return model.eval()

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = (images - self.shift) / self.scale
        feats = []
        for k, conv in enumerate(self.convs):
            if k in (1, 2):  # AlexNet max-pools before conv2 and conv3
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(conv(x))
            feats.append(x)
        return feats

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: images [N, 3, H, W] in [-1, 1] → distance per image [N]."""
        total = 0.0
        for k, (fa, fb) in enumerate(zip(self.features(a), self.features(b))):
            fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
            fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
            diff = (fa - fb) ** 2
            diff = (diff * self.heads[k]).sum(1) if self.heads is not None else diff.sum(1)
            total = total + diff.mean((1, 2))
        return total


def lpips(
    video: np.ndarray,
    reference: np.ndarray,
    backbone: str | Path | None,
    heads: str | Path | None = None,
    model: LPIPS | None = None,
    batch: int = 16,
) -> float:
    """Mean LPIPS over frames. Needs local weights (see module docstring); pass `model` to reuse one."""
    video, reference = _check_pair(video, reference)
    if model is None:
        if backbone is None:
            raise UsageError("LPIPS needs local AlexNet weights", hint="pass --lpips-weights PATH (torchvision alexnet-owt-7be5be79.pth)")
        model = LPIPS.from_files(backbone, heads)

    def to_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    scores = []
    with torch.no_grad():
        for start in range(0, len(video), batch):
            scores.append(model(to_tensor(video[start : start + batch]), to_tensor(reference[start : start + batch])))
    return float(torch.cat(scores).mean())
