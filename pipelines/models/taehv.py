"""TAEHV: the tiny video autoencoder (madebyollin/taehv layout) and the Neodragon TAEHV-style decoder.

Everything is 2-D convolutions applied per frame; time is carried by three kinds of layers:

* `MemBlock`: a residual conv block that also sees its own input of the previous frame (zeros at t=0);
* `TPool(n, s)`: concatenates `s` consecutive frames on channels (earliest first) and mixes them (1x1 conv);
* `TGrow(n, s)`: a 1x1 conv to `s*n` channels split into `s` frames (channels [0:n] are the earliest).

A layer stack runs either in parallel (all frames at once, memory O(T)) or frame by frame
(`FrameStream`, memory O(1) in T, outputs as soon as they are complete). Both give the same result.

Two models are built from these layers:

* `TAEHV`: the original encoder + decoder (`taehv.pth`, keys `encoder.{i}` / `decoder.{i}`; 4x temporal
  and 8x spatial compression for the base variant, 16 latent channels). Its decoder grows time with
  TGrow strides (1, 2, 2): T latents give 4T frames of which the first 3 are dropped, i.e. 4(T-1)+1.
* `TAEHVDecoder`: the Neodragon variant used in the asymmetric VAE (keys `decoder.blocks.{i}`): TGrow
  stride 2 at all three stages (8x temporal), input raw causal-VAE latents, output not clamped;
  T latents give 8T frames of which the first 7 are dropped, i.e. 8(T-1)+1.

Project conventions at the public API: videos are `[B, 3, T, H, W]` with pixel values in [-1, 1];
latents are `[B, C, T, H/8, W/8]`. (The reference TAEHV API uses NTCHW in [0, 1]; the conversion
happens inside `TAEHV.encode` / `TAEHV.decode`.)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.models.base import Checkpoint, PretrainedModel
from neodragon_cli.pipelines.models.checkpoint import find_file, read_config, read_state_dict
from neodragon_cli.registry import register

ENCODER_WIDTH = 64
DECODER_WIDTHS = (256, 128, 64, 64)


def conv3x3(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the latent to about +-3: tanh(x / 3) * 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """ReLU(conv(cat[x, past]) + skip(x)); `past` is this block's input at the previous frame."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(conv3x3(2 * n_in, n_out), nn.ReLU(), conv3x3(n_out, n_out), nn.ReLU(), conv3x3(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TPool(nn.Module):
    """Temporal downsample: input [M, stride*n, H, W] (stride frames on channels) -> [M, n, H, W]."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class TGrow(nn.Module):
    """Temporal upsample: [M, n, H, W] -> [M, stride*n, H, W], channel group j is output frame j."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def build_encoder(latent_channels: int, patch_size: int, time_downscale: tuple[bool, bool, bool]) -> nn.Sequential:
    """conv, ReLU, then 3 x [TPool, stride-2 conv, 3 MemBlocks], then conv to the latent (18 entries)."""
    n = ENCODER_WIDTH
    layers: list[nn.Module] = [conv3x3(3 * patch_size**2, n), nn.ReLU()]
    for down in time_downscale:
        layers += [TPool(n, 2 if down else 1), conv3x3(n, n, stride=2, bias=False)]
        layers += [MemBlock(n, n) for _ in range(3)]
    layers.append(conv3x3(n, latent_channels))
    return nn.Sequential(*layers)


def build_decoder(
    latent_channels: int,
    out_channels: int,
    num_features: tuple[int, int, int, int],
    time_upscale: tuple[bool, bool, bool],
    space_upscale: tuple[bool, bool, bool],
) -> nn.Sequential:
    """Clamp, conv, ReLU, then 3 x [3 MemBlocks, Upsample, TGrow, conv], then ReLU, conv (23 entries)."""
    n = num_features
    layers: list[nn.Module] = [Clamp(), conv3x3(latent_channels, n[0]), nn.ReLU()]
    for i in range(3):
        layers += [MemBlock(n[i], n[i]) for _ in range(3)]
        layers += [nn.Upsample(scale_factor=2) if space_upscale[i] else nn.Identity(), TGrow(n[i], 2 if time_upscale[i] else 1)]
        layers.append(conv3x3(n[i], n[i + 1], bias=False))
    layers += [nn.ReLU(), conv3x3(n[3], out_channels)]
    return nn.Sequential(*layers)


def time_factor(layers: nn.Sequential, kind: type) -> int:
    """Product of the strides of the TPool (or TGrow) layers: the temporal compression of a stack."""
    return math.prod(layer.stride for layer in layers if isinstance(layer, kind))


# ---------------------------------------------------------------------------------------------------
# Running a layer stack in time


def run_parallel(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """All frames at once. x: [N, T, C, H, W] -> [N, T', C', H', W'] (T' = T / pools * grows)."""
    n, t = x.shape[:2]
    h = x.reshape(n * t, *x.shape[2:])
    for layer in layers:
        if isinstance(layer, MemBlock):
            frames = h.reshape(n, t, *h.shape[1:])
            past = torch.cat([torch.zeros_like(frames[:, :1]), frames[:, :-1]], dim=1)
            h = layer(h, past.reshape(h.shape))
        elif isinstance(layer, TPool):
            if t % layer.stride:
                raise UsageError(
                    f"{t} frames cannot be pooled by {layer.stride}", hint="pad the clip to a multiple of the temporal compression"
                )
            t //= layer.stride
            h = layer(h.reshape(n * t, -1, *h.shape[2:]))
        elif isinstance(layer, TGrow):
            h = layer(h)
            t *= layer.stride
            h = h.reshape(n * t, -1, *h.shape[2:])
        else:
            h = layer(h)
    return h.reshape(n, t, *h.shape[1:])


class FrameStream:
    """Runs a layer stack one frame at a time with the state that carries time between frames:
    each MemBlock's previous input, each TPool's incomplete group of frames.

    `push(frame [N, C, H, W])` returns the output frames completed by this input (0, 1 or several,
    in temporal order). The results equal `run_parallel` on the whole clip.
    """

    def __init__(self, layers: nn.Sequential):
        self.layers = list(layers)
        self.memory: dict[int, torch.Tensor] = {}
        self.pending: dict[int, list[torch.Tensor]] = {}

    def push(self, frame: torch.Tensor) -> list[torch.Tensor]:
        return self._run(frame, 0)

    def _run(self, x: torch.Tensor, start: int) -> list[torch.Tensor]:
        for i in range(start, len(self.layers)):
            layer = self.layers[i]
            if isinstance(layer, MemBlock):
                past = self.memory.get(i)
                self.memory[i] = x
                x = layer(x, torch.zeros_like(x) if past is None else past)
            elif isinstance(layer, TPool):
                group = self.pending.setdefault(i, [])
                group.append(x)
                if len(group) < layer.stride:
                    return []
                x = layer(torch.cat(group, dim=1))
                group.clear()
            elif isinstance(layer, TGrow):
                # each grown frame runs through the rest of the stack before the next one (time order)
                return [y for part in layer(x).chunk(layer.stride, dim=1) for y in self._run(part, i + 1)]
            else:
                x = layer(x)
        return [x]


def stream_stack(
    layers: nn.Sequential, chunks: Iterable[torch.Tensor], *, skip: int = 0, pad_to: int = 1
) -> Iterator[torch.Tensor]:
    """Feed clips [B, C, t, H, W] through `layers` frame by frame; yield the completed outputs as clips
    [B, C', n, H', W'] (one per input clip that completed something). The first `skip` output frames
    are dropped; at the end the last input frame is repeated until the input count is a multiple of `pad_to`."""
    stream, seen, last = FrameStream(layers), 0, None

    def emit(outputs: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        nonlocal skip
        drop = min(skip, len(outputs))
        skip -= drop
        if len(outputs) > drop:
            yield torch.stack(outputs[drop:], dim=2)

    for chunk in chunks:
        outputs = []
        for frame in chunk.unbind(dim=2):
            outputs += stream.push(frame)
            seen, last = seen + 1, frame
        yield from emit(outputs)
    if last is not None and seen % pad_to:
        outputs = []
        for _ in range(pad_to - seen % pad_to):
            outputs += stream.push(last)
        yield from emit(outputs)


def run_stack(layers: nn.Sequential, x: torch.Tensor, *, parallel: bool = True, skip: int = 0) -> torch.Tensor:
    """x [B, C, T, H, W] through `layers`, dropping the first `skip` output frames."""
    if parallel:
        return run_parallel(layers, x.transpose(1, 2)).transpose(1, 2)[:, :, skip:]
    return torch.cat(list(stream_stack(layers, [x], skip=skip)), dim=2)


# ---------------------------------------------------------------------------------------------------
# Original TAEHV


def _stride2_flags(state: dict[str, torch.Tensor], prefix: str, indices: tuple[int, ...], pooled: bool) -> list[bool]:
    """Whether each TPool (pooled: 1x1 conv in = 2*out) or TGrow (out = 2*in) at `indices` has stride 2."""
    flags = []
    for i in indices:
        n_out, n_in = state[f"{prefix}.{i}.conv.weight"].shape[:2]
        flags.append(bool(n_in == 2 * n_out) if pooled else bool(n_out == 2 * n_in))
    return flags


def _taehv_config_from_state(state: dict[str, torch.Tensor], source: str) -> dict:
    """Infer the TAEHV constructor arguments from a state dict (shapes of the base layout)."""
    needed = ("encoder.0.weight", "decoder.1.weight", "decoder.22.weight")
    if not all(k in state for k in needed):
        super_variant = "decoder.0.weight" in state
        raise CheckpointError(
            f"{source} is not a base TAEHV checkpoint (missing {', '.join(k for k in needed if k not in state)})",
            hint="the 'super' decoder variant is not supported" if super_variant else "expected encoder.{i}.* / decoder.{i}.* keys",
        )
    try:
        return {
            "latent_channels": int(state["decoder.1.weight"].shape[1]),
            "patch_size": int(round(math.sqrt(state["encoder.0.weight"].shape[1] / 3))),
            "encoder_time_downscale": _stride2_flags(state, "encoder", (2, 7, 12), pooled=True),
            "decoder_time_upscale": _stride2_flags(state, "decoder", (7, 13, 19), pooled=False),
        }
    except KeyError as exc:
        raise CheckpointError(f"{source} does not match TAEHV: missing key {exc}") from None


WEIGHT_FILES = ("taehv.safetensors", "taehv.pth")


def _looks_like_taehv(path: Path) -> bool:
    """A `tae*.pth` / `tae*.safetensors` file, or a folder holding one of WEIGHT_FILES (config.json optional)."""
    if path.is_file():
        return path.name.startswith("tae") and path.suffix in (".pth", ".pt", ".safetensors")
    if (path / "config.json").is_file():
        try:
            return read_config(path).get("_class_name") == "TAEHV"
        except CheckpointError:
            return False
    return any((path / name).is_file() for name in WEIGHT_FILES)


@register(
    "vae", "taehv", description="TAEHV tiny video autoencoder (taehv.pth layout; 4x temporal, 8x spatial)", detect=_looks_like_taehv
)
class TAEHV(PretrainedModel):
    """Original TAEHV encoder + decoder (keys `encoder.{i}.*`, `decoder.{i}.*`).

    encode: video [B, 3, T, H, W] in [-1, 1] -> latents [B, C, ceil(T/4), H/8, W/8] (the clip is padded at
    the end to a multiple of 4 frames by repeating its last frame). decode: latents [B, C, T, h, w] ->
    video [B, 3, 4(T-1)+1, 8h, 8w] clamped to [-1, 1]. No latent scaling: latents are the raw latent space
    of the video model the checkpoint was trained for.
    """

    latent_norm = None  # TAEHV works in the target model's raw latent space
    weights_names = WEIGHT_FILES
    published_class_name = "TAEHV"
    repeated_blocks = ()  # one Sequential of mixed layers per side
    keep_precision = ()

    def __init__(
        self,
        latent_channels: int = 16,
        patch_size: int = 1,
        encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False),
        decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True),
        decoder_space_upscale: tuple[bool, bool, bool] = (True, True, True),
    ):
        super().__init__()
        self.patch_size = patch_size
        self.encoder = build_encoder(latent_channels, patch_size, tuple(encoder_time_downscale))
        self.decoder = build_decoder(
            latent_channels, 3 * patch_size**2, DECODER_WIDTHS, tuple(decoder_time_upscale), tuple(decoder_space_upscale)
        )
        self.temporal_downscale = time_factor(self.encoder, TPool)
        self.temporal_upscale = time_factor(self.decoder, TGrow)
        self.frames_to_trim = self.temporal_upscale - 1

    @property
    def latent_channels(self) -> int:
        return self.config["latent_channels"]

    @property
    def temporal_compression(self) -> int:
        """Frames per latent frame of the encoder."""
        return self.temporal_downscale

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent pixel: the patch, then three stride-2 convs."""
        return self.patch_size * 8

    def example_inputs(self, batch: int = 1) -> dict:
        """video [batch, 3, 2 * temporal_compression, 2 * spatial_compression (H and W)]: two latent frames of 2x2."""
        side = 2 * self.spatial_compression
        return {"video": torch.rand(batch, 3, 2 * self.temporal_compression, side, side, **self._example_factory()) * 2 - 1}

    # -- frame counts
    def latent_frames(self, num_frames: int) -> int:
        return -(-num_frames // self.temporal_downscale)

    def pixel_frames(self, num_latent_frames: int) -> int:
        return self.temporal_upscale * num_latent_frames - self.frames_to_trim

    # -- pixel conventions: the layer stacks work on [0, 1] RGB, optionally space-to-depth patched
    def _pixels_in(self, video: torch.Tensor) -> torch.Tensor:
        x = (video + 1) / 2
        if self.patch_size > 1:
            b, c, t, h, w = x.shape
            x = F.pixel_unshuffle(x.transpose(1, 2).reshape(b * t, c, h, w), self.patch_size)
            x = x.reshape(b, t, *x.shape[1:]).transpose(1, 2)
        return x

    def _pixels_out(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch_size > 1:
            b, c, t, h, w = x.shape
            x = F.pixel_shuffle(x.transpose(1, 2).reshape(b * t, c, h, w), self.patch_size)
            x = x.reshape(b, t, *x.shape[1:]).transpose(1, 2)
        return x.clamp(0, 1) * 2 - 1

    def _pad_time(self, video: torch.Tensor) -> torch.Tensor:
        extra = -video.shape[2] % self.temporal_downscale
        return torch.cat([video, video[:, :, -1:].expand(-1, -1, extra, -1, -1)], dim=2) if extra else video

    def encode(self, video: torch.Tensor, *, parallel: bool = True) -> torch.Tensor:
        return run_stack(self.encoder, self._pixels_in(self._pad_time(video)), parallel=parallel)

    def decode(self, latents: torch.Tensor, *, parallel: bool = True) -> torch.Tensor:
        return self._pixels_out(run_stack(self.decoder, latents, parallel=parallel, skip=self.frames_to_trim))

    def stream_encode(self, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Video clips [B, 3, t, H, W] in -> latent frames [B, C, n, h, w] out as soon as complete."""
        pixels = (self._pixels_in(chunk) for chunk in chunks)
        yield from stream_stack(self.encoder, pixels, pad_to=self.temporal_downscale)

    def stream_decode(self, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Latent clips [B, C, t, h, w] in -> video frames [B, 3, n, H, W] in [-1, 1] out as they complete."""
        for frames in stream_stack(self.decoder, chunks, skip=self.frames_to_trim):
            yield self._pixels_out(frames)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction (encode then decode); same length as the input for 1+4k frames."""
        return self.decode(self.encode(video))

    @classmethod
    def read_checkpoint(cls, path: Path) -> Checkpoint:
        """`taehv.pth` (torch file, read with weights_only=True) or `*.safetensors`, the config
        inferred from the tensor shapes; or a folder with one of WEIGHT_FILES and, as written by
        `save_pretrained`, a config.json."""
        weights = find_file(path, WEIGHT_FILES) if path.is_dir() else path
        state = read_state_dict(weights)
        has_config = path.is_dir() and (path / "config.json").is_file()
        config = read_config(path) if has_config else _taehv_config_from_state(state, str(weights))
        return Checkpoint(config, state, str(path))


# ---------------------------------------------------------------------------------------------------
# Neodragon TAEHV-style decoder


class TAEHVDecoder(nn.Module):
    """Neodragon's TAEHV-style decoder (keys `blocks.{i}.*`), used inside AsymmetricCausalVideoVAE.

    Input: raw causal-VAE latents after post_quant_conv, [B, C, T, h, w]. Output: video
    [B, 3, 8(T-1)+1, 8h, 8w] meant to be in [-1, 1], not clamped. With TGrow stride 2 at all three
    stages the decoder emits 8 frames per latent and drops the first 7: latent 0 gives only its last
    sub-frame (the image frame), latent k >= 1 gives frames 8k-7 .. 8k.
    """

    def __init__(
        self,
        latent_channels: int = 16,
        num_features: tuple[int, int, int, int] = DECODER_WIDTHS,
        time_upscale: tuple[bool, bool, bool] = (True, True, True),
        space_upscale: tuple[bool, bool, bool] = (True, True, True),
    ):
        super().__init__()
        self.blocks = build_decoder(latent_channels, 3, tuple(num_features), tuple(time_upscale), tuple(space_upscale))
        # NHWC weights make oneDNN run every conv on NHWC activations (no layout reorders between the
        # many small per-frame convs): a streamed Shapes decode 1.27x faster, equal to 1e-7. Loading
        # assigns contiguous tensors, so the hook re-lays them; saving writes them contiguous.
        self._weights_nhwc()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._weights_nhwc())
        self.temporal_upscale = time_factor(self.blocks, TGrow)
        self.spatial_upscale = 2 ** sum(space_upscale)
        self.frames_to_trim = self.temporal_upscale - 1

    def _weights_nhwc(self) -> None:
        self.blocks.to(memory_format=torch.channels_last)

    @property
    def temporal_compression(self) -> int:
        """Frames per latent frame."""
        return self.temporal_upscale

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent pixel in H and W."""
        return self.spatial_upscale

    def forward(self, latents: torch.Tensor, *, parallel: bool = True) -> torch.Tensor:
        return run_stack(self.blocks, latents, parallel=parallel, skip=self.frames_to_trim)

    def stream(self, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Latent clips in, video frames out as they complete (same values as `forward`)."""
        yield from stream_stack(self.blocks, chunks, skip=self.frames_to_trim)
