"""Export forms of the non-DiT networks: torch modules whose positional inputs and tuple outputs are
exactly a static graph's (batch 1, fixed shapes).

* T5 / DistilT5 with the FP16-safe residual rescaling folded into the weights (`rescale_t5_residuals`);
* the causal VAE's first-frame encoder (posterior mean and std);
* the causal VAE decoder in streaming form: one latent frame per call, every causal conv's carried
  frames as explicit state inputs and outputs (`StreamingDecoderStep`);
* the TAEHV-style decoder of the Neodragon asymmetric VAE in the same streaming form, every MemBlock's
  previous-frame input as a state tensor (`StreamingTAEHVStep`, reference `taehv_stream_reference`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from neodragon_cli.pipelines.models.causal_vae import AsymmetricCausalVideoVAE, CausalConv3d, CausalTemporalUpsample2x, CausalVideoVAE
from neodragon_cli.pipelines.models.taehv import FrameStream, MemBlock, TGrow, TPool
from neodragon_cli.pipelines.models.text_encoders import T5TextEncoder

T5_RESIDUAL_SCALE = 16.0  # residual stream / 16 (the published T5-XXL peaks at ~3.3e5, 5x the fp16 max)


def rescale_t5_residuals(encoder: T5TextEncoder, scale: float = T5_RESIDUAL_SCALE) -> T5TextEncoder:
    """A copy of `encoder` (T5 or DistilT5) whose residual stream is `scale` times smaller, with the
    same outputs: the token embeddings and every sublayer's output projection (attention `o`, FFN
    `wo`) are divided by `scale`, and every RMS norm's epsilon by scale^2, so each norm sees x/scale
    and returns what it returned for x. Relative-position biases act on normed q.k and are unchanged."""
    scaled = copy.deepcopy(encoder)
    stack = scaled.encoder.encoder
    with torch.no_grad():
        stack.embed_tokens.weight.div_(scale)  # tied with `shared`: one tensor
        for block in stack.block:
            block.layer[0].SelfAttention.o.weight.div_(scale)
            block.layer[-1].DenseReluDense.wo.weight.div_(scale)
            for layer in block.layer:
                layer.layer_norm.variance_epsilon /= scale**2
    stack.final_layer_norm.variance_epsilon /= scale**2
    return scaled


def max_t5_residual(encoder: T5TextEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Largest |value| of the residual stream (every block's output) for one input."""
    peak = 0.0

    def track(_module, _inputs, output):
        nonlocal peak
        peak = max(peak, float(output[0].abs().max()))

    hooks = [block.register_forward_hook(track) for block in encoder.encoder.encoder.block]
    try:
        with torch.no_grad():
            encoder(input_ids, attention_mask=attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    return peak


class FirstFrameEncoder(nn.Module):
    """video [1, 3, 1, H, W] in [-1, 1] -> (posterior mean, std), each [1, C, 1, H/8, W/8]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(video)
        return posterior.mean, posterior.std


class Rank4TemporalUpsample(nn.Module):
    """`CausalTemporalUpsample2x` without its rank-6 reshape: channel c*2 + p -> frame 2t + p through
    [b*C, 2, t, h*w] (same values, same conv and cache entry)."""

    def __init__(self, upsample: CausalTemporalUpsample2x):
        super().__init__()
        self.conv = upsample.conv

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        starts_video = cache is None or self.conv not in cache
        y = self.conv(x, cache)
        b, c2, t, h, w = y.shape
        y = y.reshape(b * c2 // 2, 2, t, h * w).transpose(1, 2).reshape(b, c2 // 2, 2 * t, h, w)
        return y[:, :, 1:] if starts_video else y


class StreamingDecoderStep(nn.Module):
    """One call of `CausalVideoVAE.stream_decode` with its cache as tensors.

    first=True: raw latent 0 [1, C, 1, h, w] -> (frames [1, 3, 1, H, W], *state);
    first=False: (raw latent k [1, C, 1, h, w], *state) -> (frames [1, 3, 8, H, W], *state).
    `state` holds, per causal conv with a temporal kernel (in module order, `cached_convs`), the
    input frames it carries to the next call, [1, C_i, k_t - 1, h_i, w_i]. Holds a copy of the VAE
    whose temporal upsamplers are `Rank4TemporalUpsample` (no tensor above rank 5)."""

    def __init__(self, vae: CausalVideoVAE, first: bool):
        super().__init__()
        self.vae = copy.deepcopy(vae)
        for module in list(self.vae.modules()):
            for name, child in module.named_children():
                if isinstance(child, CausalTemporalUpsample2x):
                    setattr(module, name, Rank4TemporalUpsample(child))
        self.first = first

    @staticmethod
    def cached_convs(vae: CausalVideoVAE) -> list[CausalConv3d]:
        parts = [vae.post_quant_conv, vae.decoder] if vae.post_quant_conv is not None else [vae.decoder]
        return [m for part in parts for m in part.modules() if isinstance(m, CausalConv3d) and m.time_kernel > 1]

    def forward(self, latent: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        convs = self.cached_convs(self.vae)
        cache = {} if self.first else dict(zip(convs, state))
        frames = self.vae._decode_chunk(latent, cache)
        return (frames, *(cache[conv] for conv in convs))


class StreamingTAEHVStep(nn.Module):
    """One latent frame through `AsymmetricCausalVideoVAE` (post_quant_conv, then the TAEHV-style
    decoder as a `FrameStream`) with the stream's memory as tensors.

    first=True: raw latent 0 [1, C, 1, h, w] -> (frames [1, 3, 1, H, W], *state);
    first=False: (raw latent k [1, C, 1, h, w], *state) -> (frames [1, 3, 8, H, W], *state).
    `state` holds, per MemBlock in layer order, its input at the latest sub-frame, [1, n_i, h_i, w_i]
    (zeros before the video). Inside a call the sub-frames of a stage run as a batch in time order
    ([m, n, H, W], m = 1, 2, 4, 8): a MemBlock sees [state, frames 0..m-2] as its past, and a TGrow
    splits its conv output on channels into `stride` frames and interleaves them on the batch axis
    (no channel-to-time reshape). Latent 0 keeps only its last sub-frame (the image frame)."""

    def __init__(self, vae: AsymmetricCausalVideoVAE, first: bool):
        super().__init__()
        if any(isinstance(layer, TPool) for layer in vae.decoder.blocks):
            raise ValueError("a TAEHV decoder stack has no TPool")
        self.post_quant_conv = copy.deepcopy(vae.post_quant_conv)
        self.blocks = copy.deepcopy(vae.decoder.blocks)
        self.trim = vae.decoder.frames_to_trim
        self.first = first

    def forward(self, latent: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.post_quant_conv(latent)[:, :, 0]
        next_state: list[torch.Tensor] = []
        for layer in self.blocks:
            if isinstance(layer, MemBlock):
                past = torch.zeros_like(x[:1]) if self.first else state[len(next_state)]
                next_state.append(x[-1:])
                x = layer(x, torch.cat([past, x[:-1]]))
            elif isinstance(layer, TGrow):
                parts = layer(x).split(x.shape[1], dim=1)
                x = torch.cat([part[i : i + 1] for i in range(x.shape[0]) for part in parts])
            else:
                x = layer(x)
        frames = x[self.trim :] if self.first else x
        return (frames.transpose(0, 1)[None], *next_state)


def taehv_stream_reference(vae: AsymmetricCausalVideoVAE, latents: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """What `StreamingTAEHVStep` must return for consecutive raw latent frames [1, C, 1, h, w] from
    the video start, by the PyTorch streaming decode (`FrameStream`): per call (frames, *memory)."""
    stream = FrameStream(vae.decoder.blocks)
    mem_blocks = [i for i, layer in enumerate(stream.layers) if isinstance(layer, MemBlock)]
    calls = []
    with torch.no_grad():
        for k, latent in enumerate(latents):
            frames = stream.push(vae.post_quant_conv(latent)[:, :, 0])
            frames = frames[vae.decoder.frames_to_trim :] if k == 0 else frames
            calls.append((torch.stack(frames, dim=2), *(stream.memory[i] for i in mem_blocks)))
    return calls
