"""Pyramidal MMDiT: Pyramid-Flow's SD3-based video diffusion transformer and Neodragon's pruned variant.

One joint (text + video) transformer, SD3 "MMDiT" style, extended for pyramidal flow matching:

* video latents [b, C, T, H, W] are patchified frame by frame (Conv2d, kernel = stride = patch_size);
* space: a fixed 2-D sincos table (`pos_embed.pos_embed`, stored in the checkpoint), centre-cropped to
  the current clip's patch grid; lower-resolution history clips get that same crop bilinearly resized
  to their own grid (`interp_condition_pos`), so they line up spatially with the current frame;
* time: 1-D RoPE on the frame index (theta 10000, full head dim, adjacent-pair rotation), applied to
  q and k after the RMS qk-norm; frames are numbered over the clip list, oldest history frame 0;
  text tokens have index 0 (identity rotation);
* joint attention with the T5 padding mask and the temporal-causal mask: a token of frame k sees the
  valid text and every token of frames <= k; valid text sees valid text and frame 0; padded text sees
  padded text only (it can never influence a video token);
* AdaLN-Zero modulation from temb = MLP(sinusoid(t)) + MLP(pooled CLIP embedding); the last block is
  "context pre-only" (its text stream ends there);
* only the current (last) clip of every column is unpatchified and returned.

Attention is computed blockwise (`joint_attention`): one SDPA call for the text queries and one per
frame, each over the prefix of keys that frame may see, with a key-padding mask for text only, so no
dense (L+N)^2 mask is ever built. The block structure comes from tensor shapes alone (frames per
clip), so one pyramid stage with a fixed (padded) history traces to one static graph.

One class (`PyramidFlowMMDiT`) serves two registered layouts; the published `_class_name` sets
`use_context_embedder` on load and is written back on save:

* `mmdit/pyramid-flow`: Pyramid-Flow `diffusion_transformer_{384p,768p}` folders, `_class_name`
  "PyramidDiffusionMMDiT"; has `context_embedder` (T5 width -> inner width).
* `mmdit/neodragon`: Neodragon `diffusion_transformer_320p[_multistep_t2v]` folders, `_class_name`
  "PyramidMMDiT"; 18 blocks (preset "neodragon-18"), no `context_embedder` (the ContextAdapter output,
  already inner_dim wide, is fed directly).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.flow.sampler import PREDICTIONS
from neodragon_cli.pipelines.models.base import PretrainedModel, parameters_on_meta
from neodragon_cli.registry import did_you_mean, register

WEIGHTS_NAME = PretrainedModel.weights_names[0]
ROPE_THETA = 10000.0
TIMESTEP_CHANNELS = 256

# ------------------------------------------------------------------------------------ positions


def sincos_2d_table(dim: int, grid_size: int, base_size: int, interpolation_scale: float = 1.0) -> torch.Tensor:
    """SD3 2-D sincos table [grid_size * grid_size, dim], rows in (h, w) row-major order.

    Coordinates are `arange(grid_size) / (grid_size / base_size) / interpolation_scale`; the first half
    of the channels encodes the w coordinate and the second half h, each as [sin | cos] with
    omega_k = 10000^(-k / (dim / 4)). Values in [-1, 1].
    """
    if dim % 4:
        raise UsageError(f"inner width {dim} must be divisible by 4 for the 2-D sincos table")
    # float32 coordinates, float64 trigonometry: the published table was built that way
    coords = (torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size) / interpolation_scale).double()
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    h = coords[:, None].expand(grid_size, grid_size).reshape(-1)
    w = coords[None, :].expand(grid_size, grid_size).reshape(-1)
    return torch.cat([encode(w), encode(h)], dim=1).float()


def temporal_rope(frame_sizes: Sequence[int], head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the temporal RoPE angles of every video token, each [N, head_dim // 2] float32.

    Frame f (0 = oldest history frame) of `frame_sizes[f]` tokens has angles f * theta^(-2k/head_dim).
    """
    frame_ids = torch.cat([torch.full((n,), float(f), dtype=torch.float64) for f, n in enumerate(frame_sizes)])
    omega = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = (frame_ids[:, None] * omega[None]).to(device)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [b, N, heads, d] by per-token angles (cos/sin [N, d/2]).

    (x0, x1) -> (cos x0 - sin x1, sin x0 + cos x1), computed in float32, returned in x's dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2).type_as(x)


def crop_positions(table: torch.Tensor, max_size: int, grid: tuple[int, int], crop: tuple[int, int]) -> torch.Tensor:
    """[h*w, D] positions of a clip with patch grid `grid` = (h, w): the centre crop of size `crop` of
    the [1, G*G, D] sincos table (G = max_size), bilinearly resized to `grid` when they differ."""
    top, left = (max_size - crop[0]) // 2, (max_size - crop[1]) // 2
    cropped = table.reshape(max_size, max_size, -1)[top : top + crop[0], left : left + crop[1]]
    if grid != crop:
        cropped = F.interpolate(cropped.permute(2, 0, 1)[None], size=grid, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    return cropped.reshape(grid[0] * grid[1], -1)


# ------------------------------------------------------------------------------------ attention


def joint_attention_mask(text_valid: torch.Tensor, frame_sizes: Sequence[int], causal: bool = True) -> torch.Tensor:
    """The dense boolean mask [b, 1, L+N, L+N] (True = may attend) of the reference implementation.

    Tokens are text (L) then video frames in order. Token ids: padded text 0, everything else 1
    (same id may attend); with `causal`, also order_query >= order_key where text has order 0 and a
    video token its frame index. `joint_attention` computes the same attention without this mask;
    this function is the specification it is tested and benchmarked against.
    """
    b = text_valid.shape[0]
    n = sum(frame_sizes)
    ids = torch.cat([text_valid.long(), text_valid.new_ones(b, n, dtype=torch.long)], dim=1)
    mask = ids[:, :, None] == ids[:, None, :]
    if causal:
        order = torch.cat(
            [torch.zeros(text_valid.shape[1], dtype=torch.long)]
            + [torch.full((size,), f, dtype=torch.long) for f, size in enumerate(frame_sizes)]
        ).to(text_valid.device)
        mask = mask & (order[:, None] >= order[None, :])
    return mask[:, None]


def joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_valid: torch.Tensor,
    frame_sizes: Sequence[int],
    causal: bool = True,
) -> torch.Tensor:
    """Masked joint attention computed block by block; equals SDPA with `joint_attention_mask`.

    q, k, v: [b, heads, L + N, d] with the L text tokens first, then the video tokens frame by
    frame (`frame_sizes[f]` tokens in frame f, N = sum). text_valid: [b, L] bool (T5 mask).
    Returns [b, heads, L + N, d].

    Causal: the text queries attend over [text, frame 0] with an [L, L + n_0] mask (valid -> valid
    text and frame 0, padded -> padded text); the queries of frame f attend over the key prefix
    [text, frames 0..f] with a key-padding mask on the text. Without `causal` every query sees the
    whole sequence (minus the padding rules) and the video queries form one group.
    """
    batch, length = text_valid.shape
    ends = [length + e for e in itertools.accumulate(frame_sizes)]
    starts = [length] + ends[:-1]
    total = ends[-1]

    text_keys = ends[0] if causal else total
    same_status = text_valid[:, :, None] == text_valid[:, None, :]
    sees_video = text_valid[:, :, None].expand(batch, length, text_keys - length)
    text_mask = torch.cat([same_status, sees_video], dim=2)[:, None]
    outputs = [F.scaled_dot_product_attention(q[:, :, :length], k[:, :, :text_keys], v[:, :, :text_keys], attn_mask=text_mask)]

    key_valid = torch.cat([text_valid, text_valid.new_ones(batch, total - length)], dim=1)[:, None, None]
    groups = zip(starts, ends) if causal else [(length, total)]
    for start, end in groups:
        outputs.append(
            F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=key_valid[..., :end])
        )
    return torch.cat(outputs, dim=2)


def cut_text_padding(text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """text [b, L, D] and mask [b, L] without the trailing columns that are padding in every row (one
    column kept at least). Exact: padded text only attends to padded text, so it never reaches a
    valid token. The T5s pad every prompt to 128 tokens while prompts are often much shorter
    (Shapes: ~20), so the padding is most of the text stream's cost."""
    valid = mask.bool().any(0).nonzero()
    length = int(valid[-1]) + 1 if len(valid) else 1
    return text[:, :length], mask[:, :length]


# ------------------------------------------------------------------------------------ layers


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _layer_norm(x) * (1 + scale) + shift


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned weight (qk-norm of each head, eps 1e-5)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(variance + self.eps) * self.weight).to(x.dtype)


class MLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (timestep and pooled-text embedders)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def timestep_sinusoid(t: torch.Tensor, channels: int = TIMESTEP_CHANNELS) -> torch.Tensor:
    """[cos | sin] embedding [B, channels] of timesteps t [B] (0..1000 scale), max period 10000."""
    half = channels // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t[:, None].float() * torch.exp(exponent)[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepTextEmbedding(nn.Module):
    """temb [B, D] = MLP(sinusoid_256(t)) + MLP(pooled); t [B] on the 0..1000 scale.

    With `interval` (a Mean-Flows student, off by default) a third MLP embeds the step's length
    t - t_end (0..1000 scale) the same way and adds it: `interval_embedder`, zero-initialised in its
    output layer so that it starts as the model without it."""

    def __init__(self, dim: int, pooled_dim: int, interval: bool = False):
        super().__init__()
        self.timestep_embedder = MLP(TIMESTEP_CHANNELS, dim)
        self.text_embedder = MLP(pooled_dim, dim)
        if interval:
            self.interval_embedder = MLP(TIMESTEP_CHANNELS, dim)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor, t_end: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.timestep_embedder(timestep_sinusoid(t).to(pooled.dtype)) + self.text_embedder(pooled)
        if t_end is not None:
            temb = temb + self.interval_embedder(timestep_sinusoid(t - t_end).to(pooled.dtype))
        return temb


class AdaLayerNormZero(nn.Module):
    """SiLU -> Linear(D, 6D) -> (shift, scale, gate) for attention and MLP; LayerNorm without affine."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(F.silu(temb))[:, None].chunk(6, dim=-1)
        return _modulate(x, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormContinuous(nn.Module):
    """SiLU -> Linear(D, 2D) -> (scale, shift) (this chunk order); LayerNorm without affine."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype))[:, None].chunk(2, dim=-1)
        return _modulate(x, shift, scale)


class GeluTanhProjection(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D); keys `net.0.proj`, `net.2` as published."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # slot 1 held a Dropout(0) in the published module; Identity keeps the key indices
        self.net = nn.Sequential(GeluTanhProjection(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class JointAttention(nn.Module):
    """Joint attention over [text ; video] with per-head RMS qk-norm and temporal RoPE.

    Video x [b, N, D] and text c [b, L, D] have their own q/k/v and output projections (the text
    output projection `to_add_out` is absent in a context-pre-only block).
    """

    def __init__(self, dim: int, heads: int, context_pre_only: bool, causal: bool):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.context_pre_only = context_pre_only
        head_dim = dim // heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k, self.norm_add_q, self.norm_add_k = (RMSNorm(head_dim) for _ in range(4))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # published key: to_out.0
        if not context_pre_only:
            self.to_add_out = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))  # [b, n, heads, d]

    def forward(self, x, c, text_valid, rope, frame_sizes):
        cos, sin = rope
        q = apply_rope(self.norm_q(self._split_heads(self.to_q(x))), cos, sin)
        k = apply_rope(self.norm_k(self._split_heads(self.to_k(x))), cos, sin)
        v = self._split_heads(self.to_v(x))
        cq = self.norm_add_q(self._split_heads(self.add_q_proj(c)))
        ck = self.norm_add_k(self._split_heads(self.add_k_proj(c)))
        cv = self._split_heads(self.add_v_proj(c))

        q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((cq, q), (ck, k), (cv, v)))
        out = joint_attention(q, k, v, text_valid, frame_sizes, self.causal).transpose(1, 2).flatten(2)
        text_len = c.shape[1]
        c_out, x_out = out[:, :text_len], out[:, text_len:]
        x_out = self.to_out[0](x_out)
        return x_out, (c_out if self.context_pre_only else self.to_add_out(c_out))


class JointTransformerBlock(nn.Module):
    """SD3 MMDiT block with AdaLN-Zero on both streams; the last block is context-pre-only
    (AdaLayerNormContinuous on the text, no text output)."""

    def __init__(self, dim: int, heads: int, context_pre_only: bool, causal: bool):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormContinuous(dim) if context_pre_only else AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, heads, context_pre_only, causal)
        self.ff = FeedForward(dim)
        if not context_pre_only:
            self.ff_context = FeedForward(dim)

    def forward(self, x, c, temb, text_valid, rope, frame_sizes):
        """x [b, N, D] video, c [b, L, D] text, temb [b, D] -> (x, c or None)."""
        x_n, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        if self.context_pre_only:
            c_n = self.norm1_context(c, temb)
        else:
            c_n, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, temb)

        attn_x, attn_c = self.attn(x_n, c_n, text_valid, rope, frame_sizes)
        x = x + gate_msa * attn_x
        x = x + gate_mlp * self.ff(_modulate(x, shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        c = c + c_gate_msa * attn_c
        c = c + c_gate_mlp * self.ff_context(_modulate(c, c_shift_mlp, c_scale_mlp))
        return x, c


class PatchEmbed3D(nn.Module):
    """Per-frame patchify plus the 2-D sincos position embedding (`pos_embed.*` keys).

    `pos_embed` is the persistent [1, G*G, D] table (G = pos_embed_max_size, coordinates scaled to
    base_size = sample_size // patch_size).
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, max_size: int, base_size: int, interp_condition_pos: bool):
        super().__init__()
        self.patch_size = patch_size
        self.max_size = max_size
        self.interp_condition_pos = interp_condition_pos
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_2d_table(dim, max_size, base_size)[None], persistent=True)

    def _positions(self, grid: tuple[int, int], crop: tuple[int, int]) -> torch.Tensor:
        return crop_positions(self.pos_embed, self.max_size, grid, crop)

    def forward(self, clips: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """clips [b, C, T_i, H_i, W_i] oldest first -> (tokens [b, N, D] in clip, t, h, w order,
        tokens per frame)."""
        p = self.patch_size
        current = (clips[-1].shape[-2] // p, clips[-1].shape[-1] // p)
        tokens, frame_sizes = [], []
        for clip in clips:
            b, _, t, height, width = clip.shape
            grid = (height // p, width // p)
            x = self.proj(clip.transpose(1, 2).flatten(0, 1)).flatten(2).transpose(1, 2)  # [b*t, h*w, D]
            pos = self._positions(grid, current if self.interp_condition_pos else grid)
            tokens.append((x + pos).to(x.dtype).reshape(b, t * grid[0] * grid[1], -1))
            frame_sizes += [grid[0] * grid[1]] * t
        return torch.cat(tokens, dim=1), frame_sizes


# ------------------------------------------------------------------------------------ the model


def _config_class_name(path: Path) -> str | None:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


# what the reference's build_pyramid_dit passes on top of a Pyramid-Flow config.json
PYRAMID_FLOW_RUNTIME_FLAGS = dict(
    use_t5_mask=True,
    add_temp_pos_embed=True,
    temp_pos_embed_type="rope",
    use_temporal_causal=True,
    interp_condition_pos=True,
    use_flash_attn=False,
)
# published `_class_name` -> the constructor arguments it implies on load (over config.json)
PUBLISHED_CLASS_NAMES = {
    "PyramidDiffusionMMDiT": dict(use_context_embedder=True, **PYRAMID_FLOW_RUNTIME_FLAGS),
    "PyramidMMDiT": dict(use_context_embedder=False),
}


@register(
    "mmdit",
    "neodragon",
    description="Neodragon pruned MMDiT (diffusion_transformer_320p folders), no context_embedder",
    detect=lambda path: _config_class_name(path) == "PyramidMMDiT",
)
@register(
    "mmdit",
    "pyramid-flow",
    description="Pyramid-Flow SD3 MMDiT (diffusion_transformer_384p/768p folders), temporal-pyramid AR",
    detect=lambda path: _config_class_name(path) == "PyramidDiffusionMMDiT",
)
class PyramidFlowMMDiT(PretrainedModel):
    """Pyramid-Flow's pyramidal MMDiT and Neodragon's pruned variant. Constructor arguments are the
    config.json fields plus `use_context_embedder`, which the published class name carries.

    Defaults are the *effective* published 2B model (the 384p/768p config plus the flags the
    reference pipeline passes at load time); `PRESETS` names the real sizes. Supported layout:
    pos_embed_type "sincos", temp_pos_embed_type "rope" with add_temp_pos_embed, qk_norm "rms_norm".
    `use_flash_attn` and `use_t5_mask` are accepted for config compatibility: attention always takes
    the blockwise SDPA path with the T5 mask. `use_temporal_causal` and `interp_condition_pos` switch
    the mask and the history positions as in the reference. With `use_gradient_checkpointing`, blocks
    from index int(num_layers * gradient_checkpointing_ratio) on are recomputed in backward.
    `prediction` says what the output is: "velocity" (the published models) or "clean", the stage's
    clean latent (our option; samplers and the flow loss turn it into the velocity it implies).
    Without `use_context_embedder` (Neodragon) the text input is already inner_dim wide (the
    ContextAdapter output); `joint_attention_dim` and `caption_projection_dim` are then unused.
    `interval_conditioning` (our option, off by default; `step-distill` method mean-flows) adds the
    embedding of the step's length t - t_end to the timestep embedding (`time_text_embed.interval_embedder`,
    zero output at init): the model then predicts the average velocity over the step and every call
    gives `timestep_end`.
    """

    repeated_blocks = ("transformer_blocks",)
    # the timestep sinusoid caps SQNR when quantized (deploy notes: run it on the host), and the
    # output projection writes the velocity itself
    keep_precision = ("time_text_embed", "time_text_embed.*", "proj_out")

    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 24,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        caption_projection_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        pos_embed_max_size: int = 192,
        max_num_frames: int = 200,
        qk_norm: str = "rms_norm",
        pos_embed_type: str = "sincos",
        temp_pos_embed_type: str = "rope",
        joint_attention_dim: int = 4096,
        use_gradient_checkpointing: bool = False,
        use_flash_attn: bool = False,
        use_temporal_causal: bool = True,
        use_t5_mask: bool = True,
        add_temp_pos_embed: bool = True,
        interp_condition_pos: bool = True,
        gradient_checkpointing_ratio: float = 0.6,
        prediction: str = "velocity",
        use_context_embedder: bool = True,
        interval_conditioning: bool = False,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        problems = []
        if pos_embed_type != "sincos":
            problems.append(f"pos_embed_type '{pos_embed_type}' (only 'sincos' works for video)")
        if temp_pos_embed_type != "rope" or not add_temp_pos_embed:
            problems.append("temporal positions other than temp_pos_embed_type='rope' with add_temp_pos_embed=True")
        if qk_norm != "rms_norm":
            problems.append(f"qk_norm '{qk_norm}'")
        if use_context_embedder and caption_projection_dim != dim:
            problems.append(f"caption_projection_dim {caption_projection_dim} != heads * head_dim = {dim}")
        if attention_head_dim % 2:
            problems.append(f"odd attention_head_dim {attention_head_dim} (RoPE rotates pairs)")
        if prediction not in PREDICTIONS:
            problems.append(f"prediction '{prediction}' (known: {', '.join(PREDICTIONS)})")
        if problems:
            raise UsageError("unsupported MMDiT config: " + "; ".join(problems))

        self.inner_dim, self.head_dim = dim, attention_head_dim
        self.patch_size = patch_size
        self.out_channels = in_channels
        self.has_context_embedder = use_context_embedder
        self.gradient_checkpointing = use_gradient_checkpointing
        self.gradient_checkpointing_ratio = gradient_checkpointing_ratio
        # published key name: the patch embedding is called pos_embed (SD3 heritage)
        self.pos_embed = PatchEmbed3D(
            in_channels, dim, patch_size, pos_embed_max_size, sample_size // patch_size, interp_condition_pos
        )
        self.interval_conditioning = interval_conditioning
        self.time_text_embed = TimestepTextEmbedding(dim, pooled_projection_dim, interval=interval_conditioning)
        if use_context_embedder:
            self.context_embedder = nn.Linear(joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(dim, num_attention_heads, context_pre_only=i == num_layers - 1, causal=use_temporal_causal)
            for i in range(num_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim)
        self.proj_out = nn.Linear(dim, patch_size**2 * in_channels)
        self.initialize_weights()

    @property
    def text_width(self) -> int:
        """Width of `encoder_hidden_states`: T5's (Pyramid-Flow) or inner_dim (Neodragon)."""
        return self.context_embedder.in_features if self.has_context_embedder else self.inner_dim

    def initialize_weights(self) -> None:
        """Training-from-scratch init: xavier-uniform linears/conv with zero bias, N(0, 0.02) for the
        conditioning embedders, and zeroed AdaLN modulations, norm_out and proj_out (AdaLN-Zero:
        every block starts as the identity and the model outputs 0)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # the patch conv is initialised like a Linear over its flattened kernel
        nn.init.xavier_uniform_(self.pos_embed.proj.weight.view(self.inner_dim, -1))
        embedders = [self.time_text_embed.timestep_embedder, self.time_text_embed.text_embedder]
        for linear in [m for e in embedders for m in (e.linear_1, e.linear_2)] + (
            [self.context_embedder] if self.has_context_embedder else []
        ):
            nn.init.normal_(linear.weight, std=0.02)
        zeroed = [b.norm1.linear for b in self.transformer_blocks] + [b.norm1_context.linear for b in self.transformer_blocks]
        for linear in zeroed + [self.norm_out.linear, self.proj_out]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        if self.interval_conditioning:  # zero output: a Mean-Flows student starts as its teacher
            interval = self.time_text_embed.interval_embedder
            nn.init.normal_(interval.linear_1.weight, std=0.02)
            nn.init.zeros_(interval.linear_2.weight)
            nn.init.zeros_(interval.linear_2.bias)

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        sample: Sequence,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        timestep_ratio: torch.Tensor,
        timestep_end: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Velocity of the current clip of every column (the reference call convention).

        sample: S columns (pyramid stages of a training batch; one column at inference). Column s is
            a list of clips [hist_oldest, ..., hist_newest, current], each [b, C, T_i, H_i, W_i]
            (C = in_channels latent channels, H_i/W_i latent pixels divisible by patch_size, history
            never larger than the current clip); a bare tensor is a one-clip column. Every column has
            the same batch b; frames are numbered over the list, oldest 0.
        encoder_hidden_states: [b*S, L, joint_attention_dim] T5 embeddings (Pyramid-Flow), or
            [b*S, L, inner_dim] ContextAdapter output (Neodragon, no context_embedder).
        encoder_attention_mask: [b*S, L] int/bool, 1 = valid token (None: all valid).
        pooled_projections: [b*S, pooled_projection_dim] pooled CLIP embeddings.
        timestep_ratio: [b*S] (or a scalar) timesteps on the global 0..1000 scale.
        Rows of the text/timestep tensors are interleaved: row = b_index * S + s.
        timestep_end: [b*S] (or a scalar) global timesteps at the end of the step, only and always for
            a Mean-Flows student (`interval_conditioning`), whose output is the average velocity over
            the step [timestep_end, timestep_ratio] (`PyramidSampler` passes it).

        Returns S tensors [b, C, T_cur, H_cur, W_cur]: the prediction for each column's last clip
        (history positions are not returned). Columns never attend to each other.
        """
        columns = [list(c) if isinstance(c, (list, tuple)) else [c] for c in sample]
        rows = encoder_hidden_states.shape[0]
        if encoder_attention_mask is not None and not torch.jit.is_tracing():  # a traced graph keeps its static L
            encoder_hidden_states, encoder_attention_mask = cut_text_padding(encoder_hidden_states, encoder_attention_mask)
        self._check_inputs(columns, encoder_hidden_states, rows)
        t = torch.as_tensor(timestep_ratio, device=encoder_hidden_states.device)
        if (timestep_end is not None) != self.interval_conditioning:
            raise UsageError("a Mean-Flows MMDiT (interval_conditioning) needs timestep_end, the step's end; other MMDiTs take none"
                             if self.interval_conditioning else "timestep_end is only for a Mean-Flows MMDiT (interval_conditioning)")
        end = None
        if timestep_end is not None:
            end = torch.as_tensor(timestep_end, device=encoder_hidden_states.device)
            end = end.expand(rows) if end.ndim == 0 else end
        temb = self.time_text_embed(t.expand(rows) if t.ndim == 0 else t, pooled_projections, end)
        text = self.context_embedder(encoder_hidden_states) if self.has_context_embedder else encoder_hidden_states
        if encoder_attention_mask is None:
            text_valid = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        else:
            text_valid = encoder_attention_mask.to(text.device).bool()
        stride = len(columns)
        return [
            self.forward_column(clips, text[s::stride], text_valid[s::stride], temb[s::stride])
            for s, clips in enumerate(columns)
        ]

    def forward_column(self, clips, text, text_valid, temb) -> torch.Tensor:
        """One column: clips as in `forward`, text [b, L, D] (already embedded), text_valid [b, L]
        bool, temb [b, D] -> [b, C, T_cur, H_cur, W_cur]. This is one pyramid stage's whole graph."""
        x, frame_sizes = self.pos_embed(clips)
        rope = temporal_rope(frame_sizes, self.head_dim, device=x.device)
        checkpoint_from = int(len(self.transformer_blocks) * self.gradient_checkpointing_ratio)
        for i, block in enumerate(self.transformer_blocks):
            if self.training and self.gradient_checkpointing and i >= checkpoint_from:
                x, text = checkpoint(block, x, text, temb, text_valid, rope, frame_sizes, use_reentrant=False)
            else:
                x, text = block(x, text, temb, text_valid, rope, frame_sizes)
        x = self.proj_out(self.norm_out(x, temb))
        return self._unpatchify(x, clips[-1].shape)

    def _unpatchify(self, x: torch.Tensor, shape) -> torch.Tensor:
        """Last T*h*w tokens of x [b, N, p*p*C] (features in (p1, p2, c) order) -> [b, C, T, H, W]."""
        b, _, t, height, width = shape
        p, h, w = self.patch_size, height // self.patch_size, width // self.patch_size
        x = x[:, x.shape[1] - t * h * w :].reshape(b, t, h, w, p, p, self.out_channels)
        return x.permute(0, 6, 1, 2, 4, 3, 5).reshape(b, self.out_channels, t, h * p, w * p)

    def _check_inputs(self, columns, encoder_hidden_states, rows) -> None:
        p = self.patch_size
        if not columns or rows % len(columns):
            raise UsageError(f"{rows} text rows cannot be split over {len(columns)} columns")
        batch = rows // len(columns)
        for s, clips in enumerate(columns):
            if not clips or clips[-1].ndim != 5:
                raise UsageError(f"sample[{s}] must be a non-empty list of [b, C, T, H, W] clips")
            current = clips[-1].shape[-2:]
            for i, clip in enumerate(clips):
                where = f"sample[{s}][{i}]"
                if clip.ndim != 5 or clip.shape[0] != batch or clip.shape[1] != self.out_channels:
                    raise UsageError(f"{where} has shape {tuple(clip.shape)}; expected [{batch}, {self.out_channels}, T, H, W]")
                if clip.shape[-2] % p or clip.shape[-1] % p:
                    raise UsageError(f"{where}: H and W must be multiples of patch_size {p}, got {tuple(clip.shape[-2:])}")
                if clip.shape[-2] > current[0] or clip.shape[-1] > current[1]:
                    raise UsageError(f"{where} is larger than the current clip {tuple(current)}")
            if max(current) // p > self.pos_embed.max_size:
                raise UsageError(f"column {s}: latent {tuple(current)} exceeds the position table ({self.pos_embed.max_size} patches)")
        if encoder_hidden_states.shape[-1] != self.text_width:
            raise UsageError(f"encoder_hidden_states width {encoder_hidden_states.shape[-1]} != {self.text_width} expected by this MMDiT")

    # ---------------------------------------------------------------- capabilities and checkpoints

    def example_inputs(self, batch: int = 1) -> dict:
        """One column of `forward`: a 1-frame history clip and the current 1-frame clip, each
        [batch, in_channels, 1, 2p, 2p]; 4 text tokens [batch, 4, text_width] with the last one
        padded; pooled [batch, pooled_projection_dim]; timestep_ratio [batch] at 500."""
        factory = self._example_factory()
        side = 2 * self.patch_size
        clip = lambda: torch.randn(batch, self.out_channels, 1, side, side, **factory)  # noqa: E731
        mask = torch.ones(batch, 4, dtype=torch.long, device=factory["device"])
        mask[:, -1] = 0
        return dict(
            sample=[[clip(), clip()]],
            encoder_hidden_states=torch.randn(batch, 4, self.text_width, **factory),
            encoder_attention_mask=mask,
            pooled_projections=torch.randn(batch, self.config["pooled_projection_dim"], **factory),
            timestep_ratio=torch.full((batch,), 500.0, **factory),
        )

    @property
    def published_class_name(self) -> str:
        return next(name for name, flags in PUBLISHED_CLASS_NAMES.items() if flags["use_context_embedder"] == self.has_context_embedder)

    @classmethod
    def config_from_published(cls, config: dict) -> dict:
        """config.json, then the flags its `_class_name` implies (the reference loader's runtime
        flags for Pyramid-Flow; no context embedder for Neodragon)."""
        name = config.get("_class_name", "PyramidDiffusionMMDiT")
        if name not in PUBLISHED_CLASS_NAMES:
            raise CheckpointError(f"unknown MMDiT class name '{name}'", hint=f"known: {', '.join(PUBLISHED_CLASS_NAMES)}")
        return {**super().config_from_published(config), **PUBLISHED_CLASS_NAMES[name]}

    def published_config(self) -> dict:
        """config.json: the published class name carries `use_context_embedder`; `interval_conditioning`
        is written only when on (our option: published configs stay as they were)."""
        return {k: v for k, v in super().published_config().items()
                if k != "use_context_embedder" and (k != "interval_conditioning" or v)}

    def without_blocks(self, indices: Sequence[int]) -> "PyramidFlowMMDiT":
        """A copy with the transformer blocks at `indices` removed (Neodragon's block pruning), in the
        same published layout: `num_layers` shrinks and the kept blocks are renumbered in order, so
        `transformer_blocks.{k}.*` of the j-th kept block k become `transformer_blocks.{j}.*`. The
        weights are cloned (the copy trains independently) and keep their device and dtype; the
        copy's forward equals this model's with those blocks skipped. UsageError for an index out of
        range, the last (context-pre-only) block, or every block."""
        removed = check_removable_blocks(indices, len(self.transformer_blocks))
        kept = [k for k in range(len(self.transformer_blocks)) if k not in removed]
        new_index = {old: new for new, old in enumerate(kept)}
        prefix = "transformer_blocks."
        state = {}
        for key, tensor in self.state_dict().items():
            if key.startswith(prefix):
                block, _, rest = key[len(prefix):].partition(".")
                if int(block) in removed:
                    continue
                key = f"{prefix}{new_index[int(block)]}.{rest}"
            state[key] = tensor.clone()
        with parameters_on_meta():
            pruned = type(self)(**{**self.config, "num_layers": len(kept)})
        pruned.load_state_dict(state, strict=True, assign=True)
        return pruned.train(self.training)


def check_removable_blocks(indices: Sequence[int], num_layers: int) -> set[int]:
    """The block indices to remove, checked against a model of `num_layers` blocks (UsageError for an
    index out of range, the last block, which alone ends the text stream, or every block)."""
    removed = {int(i) for i in indices}
    outside = sorted(i for i in removed if not 0 <= i < num_layers)
    if outside:
        raise UsageError(f"block index {outside[0]} is out of range: the MMDiT has blocks 0..{num_layers - 1}")
    if len(removed) >= num_layers:
        raise UsageError(f"cannot remove every block ({num_layers}) of the MMDiT", hint="remove fewer blocks")
    if num_layers - 1 in removed:
        raise UsageError(f"cannot remove the last block ({num_layers - 1}): it ends the text stream (context pre-only)",
                         hint=f"choose among blocks 0..{num_layers - 2}")
    return removed


# Real sizes (overrides of the defaults, which are the published Pyramid-Flow model).
PRESETS: dict[str, dict] = {
    "pyramid-flow-sd3-2b": {},
    "neodragon-18": dict(num_layers=18, use_context_embedder=False),
}


def mmdit_from_preset(name: str, **overrides) -> PyramidFlowMMDiT:
    """A freshly initialised model of a named size (wrap in `torch.device("meta")` to skip memory)."""
    if name not in PRESETS:
        raise UsageError(f"unknown MMDiT preset '{name}'", hint=f"{did_you_mean(name, list(PRESETS))}known: {', '.join(PRESETS)}")
    return PyramidFlowMMDiT(**{**PRESETS[name], **overrides})
