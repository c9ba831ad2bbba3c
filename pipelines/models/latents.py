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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neodragon_cli.errors import UnknownNameError


@dataclass(frozen=True)
class LatentNorm:
    """Per-frame-group affine map: frame 0 uses the image factors, later frames the video factors."""

    image_shift: float
    image_scale: float
    video_shift: float
    video_scale: float


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

    def affine(part: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
        return part / scale + shift if inverse else (part - shift) * scale

    if start_frame > 0:  # a chunk from the middle of a video holds only video frames
        return affine(z, norm.video_shift, norm.video_scale)
    image = affine(z[:, :, :1], norm.image_shift, norm.image_scale)
    video = affine(z[:, :, 1:], norm.video_shift, norm.video_scale)
    return torch.cat([image, video], dim=2)


def normalize(z: torch.Tensor, scheme: str | LatentNorm, *, start_frame: int = 0) -> torch.Tensor:
    """Raw VAE latents [B, C, T, H, W] -> DiT latents. `start_frame` is the index of z's first frame
    in the whole video (only frame 0 of a video is an image frame). Returns a new tensor."""
    return _apply(z, scheme, start_frame, inverse=False)


def denormalize(z: torch.Tensor, scheme: str | LatentNorm, *, start_frame: int = 0) -> torch.Tensor:
    """DiT latents [B, C, T, H, W] -> raw VAE latents (the inverse of `normalize`)."""
    return _apply(z, scheme, start_frame, inverse=True)
