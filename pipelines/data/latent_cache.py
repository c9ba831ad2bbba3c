"""Shapes videos as normalised causal-VAE latents, encoded once and cached on disk.

A cache file (safetensors, fp16) records in its metadata what it was encoded from: the scenes (the
world section, the first scene index) and the encoder (`encoder_fingerprint`). A cache of the same
provenance is reused, cut or extended; any other is encoded again. Also here: the latent
normalisation and whitening measured on encoded videos, and which latent cells a scene's objects touch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from neodragon_cli.atomic import save_safetensors, write_json
from neodragon_cli.console import console, progress
from neodragon_cli.errors import CheckpointError
from neodragon_cli.pipelines.data.shapes import SIZES, Scene, ShapesVideoDataset, ShapesWorld, video_tensor
from neodragon_cli.pipelines.data.world_section import WorldSection
from neodragon_cli.pipelines.models.causal_vae import CausalVideoVAE
from neodragon_cli.pipelines.models.latents import LatentNorm, Whitening, normalize

CACHE_SAVE_EVERY_S = 300.0


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """The channels-last-3d layout, in which this CPU's bf16 3-D convolutions are fast (oneDNN/AMX)."""
    return x.contiguous(memory_format=torch.channels_last_3d)


@torch.no_grad()
def encode_videos(vae: CausalVideoVAE, videos: torch.Tensor) -> torch.Tensor:
    """Posterior means of float videos [B, 3, T, H, W] in [-1, 1] (bf16 convolutions, fp32 out)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return vae.encode(channels_last(videos)).mean.float()


def measure_latent_norm(vae: CausalVideoVAE, world: WorldSection, count: int) -> LatentNorm:
    """Shift/scale giving zero-mean unit-variance latents, separately for frame 0 and later frames."""
    dataset = ShapesVideoDataset(world.world(), length=count, seed=world.seed + 7_777, split=world.split)
    latents = torch.cat([encode_videos(vae, dataset[i][0][None]) for i in range(count)])
    image, video = latents[:, :, :1], latents[:, :, 1:]
    return LatentNorm(
        image_shift=float(image.mean()), image_scale=float(1 / image.std()),
        video_shift=float(video.mean()), video_scale=float(1 / video.std()),
    )


def encoder_fingerprint(vae: CausalVideoVAE, norm: LatentNorm) -> str:
    """sha256 of what a cached latent depends on in the VAE: the encoder's config and weights and the
    latent normalisation (a decoder-only fine-tune keeps the fingerprint, so its caches stay valid)."""
    encoder_config = {k: v for k, v in vae.config.items() if k.startswith("encoder_")}
    digest = hashlib.sha256(json.dumps([norm.to_dict(), encoder_config], sort_keys=True).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cached_latents(path: Path, count: int, chunk: int, what: str, source: dict[str, str],
                    encode: Callable[[range], torch.Tensor]) -> torch.Tensor:
    """`count` normalised latents of scenes 0..count-1 of `source` (the cache's provenance, stored in the
    file's metadata), fp16 on disk. A cache of the same provenance is reused: cut when it holds more,
    extended with `encode(range)` when it holds fewer (scenes are a pure function of their index); a
    cache of any other provenance is encoded again."""
    parts = []
    if path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as cache:
                stored = cache.metadata() or {}
                if stored == source:
                    parts.append(cache.get_tensor("latents")[:count])
        except Exception as exc:  # safetensors raises its own error type for a damaged file
            raise CheckpointError(f"latent cache {path} is not a valid safetensors file ({exc})",
                                  hint="delete it to encode the cache again") from None
        if not stored:
            console.print(f"{path.name} has no record of what it was encoded from: encoding again")
        elif stored != source:
            changed = sorted(k for k in source.keys() | stored.keys() if source.get(k) != stored.get(k))
            console.print(f"{path.name} was encoded from other settings ({', '.join(changed)}): encoding again")
    done = len(parts[0]) if parts else 0
    if done == count:
        return parts[0].float()
    saved = time.monotonic()
    with progress() as bar:
        task = bar.add_task(f"encoding {what}", total=count, completed=done)
        for start in range(done, count, chunk):
            parts.append(encode(range(start, min(start + chunk, count))).half())
            bar.advance(task, len(parts[-1]))
            if time.monotonic() - saved > CACHE_SAVE_EVERY_S:  # a stop loses at most this much encoding
                parts = [torch.cat(parts)]
                save_safetensors({"latents": parts[0]}, path, metadata=source)
                saved = time.monotonic()
    latents = torch.cat(parts)
    save_safetensors({"latents": latents}, path, metadata=source)
    return latents.float()


def _cache_source(world: WorldSection, vae: CausalVideoVAE, norm: LatentNorm, what: str, offset: int) -> dict[str, str]:
    """The provenance of a latent cache: which scenes (world, first scene index) and which encoder."""
    return {"what": what, "encoder": encoder_fingerprint(vae, norm), "offset": str(offset),
            "world": json.dumps(dataclasses.asdict(world), sort_keys=True)}


def encode_latent_cache(world: WorldSection, count: int, vae: CausalVideoVAE, norm: LatentNorm, path: Path) -> torch.Tensor:
    """Normalised latents [N, 16, T', h, w] (fp16 on disk) of videos 0..count-1 of `world`; resumable,
    and extended rather than redone when `count` grows."""
    dataset = ShapesVideoDataset(world.world(), length=count, seed=world.seed, split=world.split)

    def encode(indices: range) -> torch.Tensor:
        return normalize(encode_videos(vae, torch.stack([dataset[i][0] for i in indices])), norm)

    return cached_latents(path, count, 4, "videos", _cache_source(world, vae, norm, "videos", 0), encode)


def encode_image_cache(world: WorldSection, first: int, count: int, vae: CausalVideoVAE, norm: LatentNorm,
                       path: Path) -> torch.Tensor:
    """Normalised latents [N, 16, 1, h, w] of the first frames of scenes first..first+count-1 of `world`.
    The causal VAE encodes frame 0 alone, so each equals latent frame 0 of its whole video."""
    shapes = world.world()

    def encode(indices: range) -> torch.Tensor:
        scenes = [shapes.sample_scene(np.random.default_rng((world.seed, first + i)), world.split) for i in indices]
        return normalize(encode_videos(vae, torch.stack([video_tensor(shapes.render(s, frames=1)) for s in scenes])), norm)

    source = _cache_source(world, vae, norm, "first frames", first)
    return cached_latents(path, count, 64, "first frames", source, encode)


def cache_whitening(latents: torch.Tensor, floor: float, path: Path) -> LatentNorm:
    """The whitening of normalised latents [N, C, T, h, w] (frame 0 and later frames apart), as a
    LatentNorm that applies only it. Stored at `path` when first measured and read back after, so a
    resumed run (even on a grown cache) keeps the latent space its checkpoints were trained in."""
    if path.is_file():
        stored = json.loads(path.read_text())
    else:
        stored = {"image_whitening": Whitening.measure(latents[:, :, :1], floor).to_dict(),
                  "video_whitening": Whitening.measure(latents[:, :, 1:], floor).to_dict()}
        write_json(path, stored)
    return LatentNorm(image_shift=0.0, image_scale=1.0, video_shift=0.0, video_scale=1.0, **stored)


def latent_object_mask(world: ShapesWorld, scene: Scene, grid: tuple[int, int], temporal: int = 8) -> np.ndarray:
    """`[T', h, w]` float32: 1 on the latent cells that an object's bounding box touches during the
    pixel frames a latent frame encodes (frame 0 alone, then `temporal` frames each), else 0."""
    h, w = grid
    mask = np.zeros((1 + (world.frames - 1) // temporal, h, w), np.float32)
    for obj in scene.objects:
        cx, cy = obj.centres(world.frames)
        side = SIZES[obj.size] * min(world.height, world.width)
        hx, hy = side / 2 / world.width, side / 2 / world.height
        for k in range(mask.shape[0]):
            span = slice(0, 1) if k == 0 else slice(temporal * (k - 1) + 1, temporal * k + 1)
            x0, x1 = np.floor((cx[span].min() - hx) * w), np.ceil((cx[span].max() + hx) * w)
            y0, y1 = np.floor((cy[span].min() - hy) * h), np.ceil((cy[span].max() + hy) * h)
            mask[k, max(int(y0), 0) : max(int(y1), 0), max(int(x0), 0) : max(int(x1), 0)] = 1.0
    return mask
