"""Latent normalisation between the VAE latent space and the diffusion transformer's.

The DiT works on latents of roughly unit variance. The causal VAEs produce raw latents whose first
frame (the image) and later frames (video) have different statistics, so the pipelines shift and
scale them per frame group:

    normalised = (z - shift) * scale          (encode side)
    z          = normalised / scale + shift   (decode side)

with the image factors on latent frame 0 and the video factors on frames 1, 2, ...; a single-frame
latent (T == 1) is an image. Layout everywhere: `[B, C, T, H, W]`.

Schemes (constants as published by the reference pipelines):

| scheme | image shift | image scale | video shift | video scale |
|---|---|---|---|---|
| `pyramid-flow` (SD3 model) | 0.1490 | 1/1.8415 | -0.2343 | 1/3.0986 |
| `pyramid-flow-miniflux` | -0.04 | 1/1.8726 | -0.2343 | 1/3.0986 |
| `neodragon` | 0.1490 | 0.5430 | -0.2343 | 0.3031 |

Neodragon keeps Pyramid-Flow's image factors (rounded) and video shift but uses a different video
scale (0.3031 = 1/3.2992 instead of 1/3.0986): its checkpoints need their own scheme.

A measured norm may also whiten each latent cell after the shift and scale (`image_whitening`,
`video_whitening`: see `Whitening`). A scalar scale leaves a latent whose channels are strongly
correlated with most of its variance in one direction; flow matching adds unit noise in every
direction, so the weak directions are decided only at the very end of sampling and cost the loss
almost nothing. Whitening gives every direction the same weight.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from neodragon_cli.errors import UnknownNameError


@dataclass(frozen=True)
class Whitening:
    """Per-cell map of C-channel latent vectors x: y = ((x - mean) @ basis) / std, so that each
    component of y has variance var_k / (var_k + floor) (about 1 for the strong directions; `floor`
    keeps near-empty directions, mostly encoder noise, from being blown up).
    basis: [C, C] orthonormal columns (principal directions); mean, std: [C]."""

    mean: torch.Tensor
    basis: torch.Tensor
    std: torch.Tensor

    @classmethod
    def measure(cls, latents: torch.Tensor, floor: float) -> "Whitening":
        """From latents [N, C, T, H, W] (every cell is one sample)."""
        cells = latents.movedim(1, -1).reshape(-1, latents.shape[1]).double()
        mean = cells.mean(0)
        variances, basis = torch.linalg.eigh(torch.cov((cells - mean).T))
        order = variances.argsort(descending=True)
        std = (variances[order].clamp_min(0) + floor).sqrt()
        return cls(mean.float(), basis[:, order].float(), std.float())

    @classmethod
    def from_dict(cls, d: dict) -> "Whitening":
        return cls(*(torch.tensor(d[k], dtype=torch.float32) for k in ("mean", "basis", "std")))

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "basis": self.basis.tolist(), "std": self.std.tolist()}

    def apply(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x: [B, C, T, H, W]."""
        cells = x.movedim(1, -1)
        mean, basis, std = (t.to(x.device, x.dtype) for t in (self.mean, self.basis, self.std))
        out = (cells * std) @ basis.T + mean if inverse else ((cells - mean) @ basis) / std
        return out.movedim(-1, 1)


@dataclass(frozen=True)
class LatentNorm:
    """Per-frame-group affine map: frame 0 uses the image factors, later frames the video factors.
    A whitening (a `Whitening`, or its `to_dict()` as read from JSON), when set, is applied per latent
    cell after shift and scale."""

    image_shift: float
    image_scale: float
    video_shift: float
    video_scale: float
    image_whitening: Whitening | None = None
    video_whitening: Whitening | None = None

    def __post_init__(self):
        for name in ("image_whitening", "video_whitening"):  # once here, not on every normalize call
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, Whitening.from_dict(getattr(self, name)))

    def to_dict(self) -> dict:
        """JSON-ready fields (an unset whitening is left out); `LatentNorm(**d)` reads it back."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return {k: v.to_dict() if isinstance(v, Whitening) else v for k, v in out.items()}


SCHEMES: dict[str, LatentNorm] = {
    "pyramid-flow": LatentNorm(image_shift=0.1490, image_scale=1 / 1.8415, video_shift=-0.2343, video_scale=1 / 3.0986),
    "pyramid-flow-miniflux": LatentNorm(image_shift=-0.04, image_scale=1 / 1.8726, video_shift=-0.2343, video_scale=1 / 3.0986),
    "neodragon": LatentNorm(image_shift=0.1490, image_scale=0.5430, video_shift=-0.2343, video_scale=0.3031),
}


def get_scheme(scheme: str | LatentNorm) -> LatentNorm:
    """A scheme by name (see SCHEMES) or a LatentNorm given directly (e.g. measured on a trained VAE)."""
    if isinstance(scheme, LatentNorm):
        return scheme
    if scheme not in SCHEMES:
        from neodragon_cli.registry import did_you_mean

        raise UnknownNameError(
            f"unknown latent normalisation scheme '{scheme}'",
            hint=f"{did_you_mean(scheme, sorted(SCHEMES))}known schemes: {', '.join(sorted(SCHEMES))}",
        )
    return SCHEMES[scheme]


def _apply(z: torch.Tensor, scheme: str | LatentNorm, start_frame: int, inverse: bool) -> torch.Tensor:
    if z.ndim != 5:
        raise ValueError(f"latents must be [B, C, T, H, W], got shape {tuple(z.shape)}")
    norm = get_scheme(scheme)

    def affine(part: torch.Tensor, shift: float, scale: float, white: Whitening | None) -> torch.Tensor:
        if inverse:
            return (white.apply(part, inverse=True) if white else part) / scale + shift
        part = (part - shift) * scale
        return white.apply(part) if white else part

    video = (norm.video_shift, norm.video_scale, norm.video_whitening)
    if start_frame > 0:  # a chunk from the middle of a video holds only video frames
        return affine(z, *video)
    image = affine(z[:, :, :1], norm.image_shift, norm.image_scale, norm.image_whitening)
    return torch.cat([image, affine(z[:, :, 1:], *video)], dim=2)


def normalize(z: torch.Tensor, scheme: str | LatentNorm, *, start_frame: int = 0) -> torch.Tensor:
    """Raw VAE latents [B, C, T, H, W] -> DiT latents. `start_frame` is the index of z's first frame
    in the whole video (only frame 0 of a video is an image frame). Returns a new tensor."""
    return _apply(z, scheme, start_frame, inverse=False)


def denormalize(z: torch.Tensor, scheme: str | LatentNorm, *, start_frame: int = 0) -> torch.Tensor:
    """DiT latents [B, C, T, H, W] -> raw VAE latents (the inverse of `normalize`)."""
    return _apply(z, scheme, start_frame, inverse=True)
