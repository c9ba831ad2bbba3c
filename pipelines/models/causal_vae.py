"""Causal video VAEs: Pyramid-Flow's `CausalVideoVAE` and Neodragon's `AsymmetricCausalVideoVAE`.

Conventions: videos are `[B, 3, T, H, W]` with pixel values in [-1, 1]; latents are raw (not
normalised, see `latents.py`) `[B, 16, T_lat, H/8, W/8]`. Compression is 8x8x8 and causal in time:
1 + 8k frames <-> 1 + k latents, and a single image (T = 1) is one latent frame.

Causality. Every `CausalConv3d` pads time only at the front, with k_t - 1 zero frames, and pads H and W
symmetrically with k // 2 zeros; GroupNorm and the mid-block attention act on each frame separately.
So frame t of any layer depends only on input frames <= t, and a clip can be processed in chunks:
each causal conv keeps the last k_t - s_t input frames of the previous chunk (a `ConvCache`) and uses
them instead of the zero padding. Chunked results equal the full ones up to fp32 rounding, with
memory flat in the video length (decode is then also a stream: latent frames in, pixel frames out).

Temporal resampling. Downsampling is a stride-(2,1,1) conv: T -> (T - 1) // 2 + 1. Upsampling is a conv
to 2C channels split into 2 frames per input frame; at the start of a video the first of the two is
dropped (the image frame has no predecessor), so T -> 2T - 1 for the first chunk and 2T afterwards.

`CausalVideoVAE` (vae/pyramid-flow): PF encoder -> quant_conv -> diagonal Gaussian posterior (logvar
clamped to [-30, 20]); post_quant_conv -> PF causal decoder (225.8M params at real size).
`AsymmetricCausalVideoVAE` (vae/neodragon-asymmetric): the same encoder and key names, with Neodragon's
TAEHV-style decoder (`taehv.TAEHVDecoder`, 9.9M params, 8(T-1)+1 frames, not clamped).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.models.base import Checkpoint, PretrainedModel
from neodragon_cli.pipelines.models.checkpoint import read_config
from neodragon_cli.pipelines.models.taehv import TAEHVDecoder
from neodragon_cli.registry import register

GROUP_NORM_EPS = 1e-6

# CausalConv3d -> its input frames carried over to the next chunk. Passing None instead means
# "a whole clip from the video start" (zero padding everywhere).
ConvCache = dict


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


class CausalConv3d(nn.Module):
    """Conv3d causal in time (front padding k_t - 1 zero frames, or the cached tail of the previous
    chunk), zero padding k // 2 in H and W. Keys: `conv.weight`, `conv.bias`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        self.time_kernel, self.time_stride = kt, _triple(stride)[0]
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=_triple(stride), padding=(0, kh // 2, kw // 2))

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        if self.time_kernel > 1:
            if cache is not None and self in cache:
                x = torch.cat([cache[self], x], dim=2)
            else:
                x = F.pad(x, (0, 0, 0, 0, self.time_kernel - 1, 0))
            if cache is not None:  # the frames the next chunk's first outputs will need
                cache[self] = x[:, :, x.shape[2] - (self.time_kernel - self.time_stride) :]
        if _use_onednn(x):
            conv = self.conv
            return torch.mkldnn_convolution(x.contiguous(), conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups)
        return self.conv(x)


def _use_onednn(x: torch.Tensor) -> bool:
    """Whether to call oneDNN's conv directly. For a batch-1 input with few frames (a streamed decode
    chunk) PyTorch's CPU dispatch picks its im2col conv3d (a size heuristic tuned on 2-D convs), about
    2.8x slower than oneDNN's on the Shapes decoder (the same result to fp32 rounding). Only at inference
    on plain CPU float32 tensors: not under autograd, tracing or export."""
    return (
        type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == torch.float32
        and not torch.is_grad_enabled() and not torch.jit.is_tracing()
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )


class CausalGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame: [B, C, T, H, W] is normalised as B*T images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class CausalResnetBlock3D(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> dropout -> conv2, plus a 1x1x1 shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = CausalGroupNorm(groups, in_channels, eps=GROUP_NORM_EPS)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = CausalGroupNorm(groups, out_channels, eps=GROUP_NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))), cache)
        return h + (self.conv_shortcut(x) if self.conv_shortcut is not None else x)


class SpatialAttention(nn.Module):
    """Single-head self-attention over the H*W positions of each frame, GroupNorm in front, residual.
    Keys as diffusers' Attention: group_norm, to_q, to_k, to_v, to_out.0."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        tokens = self.group_norm(frames).flatten(2).transpose(1, 2)  # [B*T, H*W, C]
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[1](self.to_out[0](out)).transpose(1, 2).reshape(b * t, c, h, w)
        return (out + frames).reshape(b, t, c, h, w).transpose(1, 2)


class CausalMidBlock(nn.Module):
    """resnet -> per-frame spatial attention -> resnet."""

    def __init__(self, channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.resnets = nn.ModuleList([CausalResnetBlock3D(channels, channels, groups, dropout) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialAttention(channels, groups)])

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class CausalDownsample(nn.Module):
    """Causal conv k3 with stride (1, 2, 2) (spatial /2) or (2, 1, 1) (temporal /2: T -> (T - 1) // 2 + 1)."""

    def __init__(self, channels: int, stride: tuple[int, int, int]):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=stride)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        return self.conv(x, cache)


class CausalUpsample2x(nn.Module):
    """Spatial x2: causal conv C -> 4C, then depth-to-space per frame (channel c*4 + 2*p + q -> pixel (p, q))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, 4 * channels, 3)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        y = self.conv(x, cache)
        b, c4, t, h, w = y.shape
        y = F.pixel_shuffle(y.transpose(1, 2).reshape(b * t, c4, h, w), 2)
        return y.reshape(b, t, c4 // 4, 2 * h, 2 * w).transpose(1, 2)


class CausalTemporalUpsample2x(nn.Module):
    """Temporal x2: causal conv C -> 2C, channel c*2 + p becomes frame 2t + p; at the start of a video
    the first output frame is dropped (T -> 2T - 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, 2 * channels, 3)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        starts_video = cache is None or self.conv not in cache
        y = self.conv(x, cache)
        b, c2, t, h, w = y.shape
        y = y.reshape(b, c2 // 2, 2, t, h, w).transpose(2, 3).reshape(b, c2 // 2, 2 * t, h, w)
        return y[:, :, 1:] if starts_video else y


class _CausalStage(nn.Module):
    """resnets -> optional spatial resampler -> optional temporal resampler. Subclasses name the two
    resamplers (`resamplers`: (attribute, factory) pairs); each sits in a one-entry ModuleList, as
    in the published key names."""

    resamplers: tuple[tuple[str, Callable[[int], nn.Module]], ...]

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, spatial: bool, temporal: bool,
                 dropout: float):  # fmt: skip
        super().__init__()
        widths = [in_channels] + [out_channels] * num_layers
        self.resnets = nn.ModuleList(CausalResnetBlock3D(widths[i], out_channels, groups, dropout) for i in range(num_layers))
        for (name, build), wanted in zip(self.resamplers, (spatial, temporal)):
            setattr(self, name, nn.ModuleList([build(out_channels)]) if wanted else None)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        for name, _ in self.resamplers:
            resampler = getattr(self, name)
            if resampler is not None:
                x = resampler[0](x, cache)
        return x


class DownEncoderBlockCausal3D(_CausalStage):
    """resnets -> optional spatial /2 -> optional temporal /2."""

    resamplers = (
        ("downsamplers", partial(CausalDownsample, stride=(1, 2, 2))),
        ("temporal_downsamplers", partial(CausalDownsample, stride=(2, 1, 1))),
    )


class UpDecoderBlockCausal3D(_CausalStage):
    """resnets -> optional spatial x2 -> optional temporal x2."""

    resamplers = (("upsamplers", CausalUpsample2x), ("temporal_upsamplers", CausalTemporalUpsample2x))


class CausalVaeEncoder(nn.Module):
    """video [B, in, T, H, W] -> moments [B, 2*out, T', H', W'] (before quant_conv)."""

    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, spatial_down, temporal_down, groups,
                 dropout):  # fmt: skip
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0], 3)
        widths = [block_out_channels[0], *block_out_channels]
        self.down_blocks = nn.ModuleList(
            DownEncoderBlockCausal3D(
                widths[i], widths[i + 1], layers_per_block[i], groups, spatial_down[i], temporal_down[i], dropout[i]
            )
            for i in range(len(block_out_channels))
        )
        self.mid_block = CausalMidBlock(block_out_channels[-1], groups)
        self.conv_norm_out = CausalGroupNorm(groups, block_out_channels[-1], eps=GROUP_NORM_EPS)
        self.conv_out = CausalConv3d(block_out_channels[-1], 2 * out_channels, 3)

    @classmethod
    def from_vae_config(cls, config: dict) -> "CausalVaeEncoder":
        """The encoder described by the `encoder_*` fields of a VAE config (both VAEs share them)."""
        c = {k.removeprefix("encoder_"): v for k, v in config.items() if k.startswith("encoder_")}
        _require(c["act_fn"] == "silu", "only the silu activation is implemented")
        _require(set(c["down_block_types"]) == {"DownEncoderBlockCausal3D"}, f"down block types {c['down_block_types']}")
        return cls(
            c["in_channels"], c["out_channels"], c["block_out_channels"], c["layers_per_block"],
            c["spatial_down_sample"], c["temporal_down_sample"], c["norm_num_groups"], c["block_dropout"],
        )  # fmt: skip

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.conv_norm_out(x)), cache)


class CausalVaeDecoder(nn.Module):
    """latents [B, in, T, h, w] -> video [B, out, 8(T-1)+1, 8h, 8w] (with three temporal x2 stages)."""

    def __init__(self, in_channels, out_channels, block_out_channels, layers_per_block, spatial_up, temporal_up, groups, dropout):
        super().__init__()
        widths = list(reversed(block_out_channels))
        self.conv_in = CausalConv3d(in_channels, widths[0], 3)
        self.mid_block = CausalMidBlock(widths[0], groups)
        ins = [widths[0], *widths]
        self.up_blocks = nn.ModuleList(
            UpDecoderBlockCausal3D(ins[i], widths[i], layers_per_block[i], groups, spatial_up[i], temporal_up[i], dropout[i])
            for i in range(len(widths))
        )
        self.conv_norm_out = CausalGroupNorm(groups, widths[-1], eps=GROUP_NORM_EPS)
        self.conv_out = CausalConv3d(widths[-1], out_channels, 3)

    def forward(self, z: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(F.silu(self.conv_norm_out(x)), cache)


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from moments [B, 2C, T, h, w] = [mean | logvar]; logvar clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample [B], summed over C, T, h, w."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3, 4))


def _windows(x: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Pyramid-Flow's temporal chunks: the first 1 + window frames, then window frames at a time."""
    if window < 1:
        raise UsageError(f"temporal window must be >= 1, got {window}")
    rest = x[:, :, window + 1 :]
    return [x[:, :, : window + 1], *(rest.split(window, dim=2) if rest.shape[2] else [])]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(f"unsupported causal VAE config: {message}")


def _rename_legacy_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers attention-block names (query/key/value/proj_attn) -> to_q/to_k/to_v/to_out.0."""
    names = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        module_path, _, name = head.rpartition(".")
        if ".attentions." in key and name in names:
            key = f"{module_path}.{names[name]}.{leaf}"
        out[key] = value
    return out


def _checkpoint_folder(path: Path) -> Path:
    """The VAE folder itself, or a model root that contains `causal_video_vae/`."""
    sub = path / "causal_video_vae"
    return sub if (sub / "config.json").is_file() else path


def _class_name_is(path: Path, name: str, marker_key: str) -> bool:
    """Detection: the folder's config.json names `name` (or, without a class name, has `marker_key`)."""
    folder = _checkpoint_folder(path)
    if not (folder / "config.json").is_file():
        return False
    try:
        config = read_config(folder)
    except CheckpointError:  # a broken config is reported by the loader, not during detection
        return False
    return config.get("_class_name") == name or ("_class_name" not in config and marker_key in config)


class CausalEncodingVAE(PretrainedModel):
    """Encoding shared by both VAEs: `encoder` + `quant_conv` -> DiagonalGaussian, optionally in chunks.

    Declared for the later commands: `temporal_compression` / `spatial_compression` (pixels per latent
    in time / in H and W), `latent_norm` (the latents.py scheme of the published model); the stages are
    not interchangeable blocks (no `repeated_blocks`) and every conv quantizes (no `keep_precision`)."""

    latent_norm: ClassVar[str]
    temporal_compression: int  # a property of each VAE
    spatial_compression: int
    repeated_blocks = ()
    keep_precision = ()

    @property
    def latent_channels(self) -> int:
        return self.config["encoder_out_channels"]

    def example_inputs(self, batch: int = 1) -> dict:
        """video [batch, 3, 1 + temporal_compression, 2 * spatial_compression (H and W)]: two latent frames of 2x2."""
        side = 2 * self.spatial_compression
        return {"video": torch.rand(batch, 3, 1 + self.temporal_compression, side, side, **self._example_factory()) * 2 - 1}

    def encode(self, video: torch.Tensor, *, window: int | None = None) -> DiagonalGaussian:
        """video [B, 3, T, H, W] in [-1, 1] -> posterior over [B, 16, (T-1)//8 + 1, H/8, W/8].

        window=None encodes the clip at once; window=w encodes the first 1+w frames, then w at a time,
        carrying the causal-conv caches (w and T-1 must be multiples of the temporal compression)."""
        if window is None:
            return DiagonalGaussian(self.quant_conv(self.encoder(video)))
        step = self.temporal_compression
        if window % step or (video.shape[2] - 1) % step:
            raise UsageError(f"chunked encode needs a window and T-1 divisible by {step} (window {window}, T {video.shape[2]})")
        cache: ConvCache = {}
        moments = [self.quant_conv(self.encoder(chunk, cache), cache) for chunk in _windows(video, window)]
        return DiagonalGaussian(torch.cat(moments, dim=2))

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_compression + 1

    def pixel_frames(self, num_latent_frames: int) -> int:
        return (num_latent_frames - 1) * self.temporal_compression + 1

    def forward(self, video: torch.Tensor, *, sample_posterior: bool = True, generator: torch.Generator | None = None):
        """Training path: (reconstruction [B, 3, T, H, W], posterior); use `posterior.kl()` for the KL term."""
        posterior = self.encode(video)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @classmethod
    def read_checkpoint(cls, path: Path) -> Checkpoint:
        """A `causal_video_vae/` folder (config.json + diffusion_pytorch_model.safetensors), or a model
        root containing one; old diffusers attention key names are renamed."""
        checkpoint = super().read_checkpoint(_checkpoint_folder(path))
        return replace(checkpoint, state=_rename_legacy_attention(checkpoint.state))


@register(
    "vae",
    "pyramid-flow",
    description="Pyramid-Flow causal video VAE (8x8x8, 16 latent channels; causal_video_vae/ folder)",
    detect=lambda p: _class_name_is(p, "CausalVideoVAE", "decoder_block_out_channels"),
)
class CausalVideoVAE(CausalEncodingVAE):
    """Pyramid-Flow's causal video VAE. Constructor arguments are the published config.json fields;
    the defaults are the real model (encoder 109.6M, decoder 225.8M parameters).

    `interpolate`, `sample_size`, `scaling_factor` and `downsample_scale` are recorded but unused: the
    pipeline loads with interpolate=False (conv + depth-to-space upsampling) and normalises latents
    with its own constants (see latents.py, scheme "pyramid-flow").
    """

    latent_norm = "pyramid-flow"

    def __init__(
        self,
        encoder_in_channels: int = 3,
        encoder_out_channels: int = 16,
        encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 2),
        encoder_down_block_types: tuple[str, ...] = ("DownEncoderBlockCausal3D",) * 4,
        encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        encoder_spatial_down_sample: tuple[bool, ...] = (True, True, True, False),
        encoder_temporal_down_sample: tuple[bool, ...] = (True, True, True, False),
        encoder_block_dropout: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0),
        encoder_act_fn: str = "silu",
        encoder_norm_num_groups: int = 32,
        encoder_double_z: bool = True,
        encoder_type: str = "causal_vae_conv",
        decoder_in_channels: int = 16,
        decoder_out_channels: int = 3,
        decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3),
        decoder_up_block_types: tuple[str, ...] = ("UpDecoderBlockCausal3D",) * 4,
        decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        decoder_spatial_up_sample: tuple[bool, ...] = (True, True, True, False),
        decoder_temporal_up_sample: tuple[bool, ...] = (True, True, True, False),
        decoder_block_dropout: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0),
        decoder_act_fn: str = "silu",
        decoder_norm_num_groups: int = 32,
        decoder_type: str = "causal_vae_conv",
        sample_size: int = 256,
        scaling_factor: float = 0.18215,
        add_post_quant_conv: bool = True,
        interpolate: bool = False,
        downsample_scale: int = 8,
    ):
        super().__init__()
        _require(decoder_act_fn == "silu", "only the silu activation is implemented")
        _require(encoder_double_z, "encoder_double_z must be true (the encoder outputs mean and logvar)")
        _require(encoder_type == decoder_type == "causal_vae_conv", f"encoder/decoder type {encoder_type}/{decoder_type}")
        _require(set(decoder_up_block_types) == {"UpDecoderBlockCausal3D"}, f"up block types {decoder_up_block_types}")
        _require(
            sum(encoder_temporal_down_sample) == sum(decoder_temporal_up_sample), "encoder and decoder temporal factors differ"
        )
        self.encoder = CausalVaeEncoder.from_vae_config(self.config)
        self.decoder = CausalVaeDecoder(
            decoder_in_channels, decoder_out_channels, decoder_block_out_channels, decoder_layers_per_block,
            decoder_spatial_up_sample, decoder_temporal_up_sample, decoder_norm_num_groups, decoder_block_dropout,
        )  # fmt: skip
        self.quant_conv = CausalConv3d(2 * encoder_out_channels, 2 * encoder_out_channels, 1)
        self.post_quant_conv = CausalConv3d(decoder_in_channels, decoder_in_channels, 1) if add_post_quant_conv else None

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.config["encoder_temporal_down_sample"])

    @property
    def spatial_compression(self) -> int:
        return 2 ** sum(self.config["encoder_spatial_down_sample"])

    def _decode_chunk(self, z: torch.Tensor, cache: ConvCache | None) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z, cache)
        return self.decoder(z, cache)

    def decode(self, latents: torch.Tensor, *, window: int | None = None) -> torch.Tensor:
        """raw latents [B, 16, T, h, w] -> video [B, 3, 8(T-1)+1, 8h, 8w] (about [-1, 1], not clamped).

        window=w decodes the first 1+w latent frames, then w at a time (Pyramid-Flow's chunked decode:
        w=1 is its save_memory path), equal to the full decode up to fp32 rounding."""
        if window is None:
            return self._decode_chunk(latents, None)
        return torch.cat(list(self.stream_decode(_windows(latents, window))), dim=2)

    def stream_decode(self, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Latent clips [B, 16, t, h, w] (consecutive, from the video's start) in -> pixel frames out:
        the first chunk gives 8(t-1)+1 frames, later chunks 8t. Memory is flat in the video length."""
        cache: ConvCache = {}
        for chunk in chunks:
            yield self._decode_chunk(chunk, cache)


@register(
    "vae",
    "neodragon-asymmetric",
    description="Neodragon asymmetric VAE: Pyramid-Flow causal encoder + TAEHV-style 8x-temporal decoder",
    detect=lambda p: _class_name_is(p, "AsymmetricCausalVideoVAE", "decoder_num_features"),
)
class AsymmetricCausalVideoVAE(CausalEncodingVAE):
    """Neodragon's VAE: Pyramid-Flow's causal encoder (same key names) and a light TAEHV-style decoder
    (`decoder.blocks.{i}`). The decoder reads raw latents through post_quant_conv and returns video
    [B, 3, 8(T-1)+1, 8h, 8w] in about [-1, 1] (not clamped). Defaults are the released model."""

    latent_norm = "neodragon"

    def __init__(
        self,
        encoder_in_channels: int = 3,
        encoder_out_channels: int = 16,
        encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 2),
        encoder_down_block_types: tuple[str, ...] = ("DownEncoderBlockCausal3D",) * 4,
        encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        encoder_spatial_down_sample: tuple[bool, ...] = (True, True, True, False),
        encoder_temporal_down_sample: tuple[bool, ...] = (True, True, True, False),
        encoder_block_dropout: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0),
        encoder_act_fn: str = "silu",
        encoder_norm_num_groups: int = 32,
        decoder_num_features: tuple[int, int, int, int] = (256, 128, 64, 64),
        decoder_time_upscale: tuple[bool, bool, bool] = (True, True, True),
        decoder_space_upscale: tuple[bool, bool, bool] = (True, True, True),
        sample_size: int = 256,
        temporal_downsample_scale: int = 8,
        spatial_downsample_scale: int = 8,
    ):
        super().__init__()
        temporal = (2 ** sum(encoder_temporal_down_sample), temporal_downsample_scale, 2 ** sum(decoder_time_upscale))
        _require(len(set(temporal)) == 1, f"temporal factors of encoder, config and decoder differ: {temporal}")
        self.encoder = CausalVaeEncoder.from_vae_config(self.config)
        self.quant_conv = CausalConv3d(2 * encoder_out_channels, 2 * encoder_out_channels, 1)
        self.post_quant_conv = CausalConv3d(encoder_out_channels, encoder_out_channels, 1)
        self.decoder = TAEHVDecoder(encoder_out_channels, decoder_num_features, decoder_time_upscale, decoder_space_upscale)

    @property
    def temporal_compression(self) -> int:
        return self.config["temporal_downsample_scale"]

    @property
    def spatial_compression(self) -> int:
        return self.config["spatial_downsample_scale"]

    def decode(self, latents: torch.Tensor, *, parallel: bool = True) -> torch.Tensor:
        """raw latents [B, 16, T, h, w] -> video [B, 3, 8(T-1)+1, 8h, 8w]; parallel=False runs frame by frame."""
        return self.decoder(self.post_quant_conv(latents), parallel=parallel)

    def stream_decode(self, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Latent clips in -> pixel frames out as they complete (latent 0 -> 1 frame, each later one -> 8)."""
        yield from self.decoder.stream(self.post_quant_conv(chunk) for chunk in chunks)
