"""Static per-stage MMDiT graphs (Neodragon §4.1) and the host-side inputs they take.

Every denoiser call of the pyramidal sampler runs one pyramid stage s, and the history it sees always
has the same structure: frames grouped by resolution level, level 0 (1/4 resolution) holding every
older frame and levels 1..s one frame each (`history_levels`). `StageLayout` fixes each level's
frame count at the largest history of the video (unit T-1 of T latent frames) and front-pads shorter
histories with zero frames. Padding goes at the front because the output keeps the trailing
(current-clip) tokens; padded tokens are masked out of every attention row, so the padded graph
computes what the unpadded call computes.

Everything that depends only on shapes is computed on the host (`StageHost.inputs`) and fed to the
graph: the additive attention bias with a finite fill, temporal RoPE cos/sin at rank 3, the
positional-embedding crops, and the timestep sinusoid (no `Sin` in the graph). The graph itself
(`StageGraph`) runs patchify, the timestep/pooled MLPs, the blocks with one dense attention per
block, and a rank-4 unpatchify (depth-to-space): no data-dependent control flow, no tensor above rank 5.

RoPE rotates adjacent channel pairs; the graph instead stores every head's q/k channels in the "half"
layout ([even channels | odd channels], for text and video alike), which leaves each q.k product
unchanged and turns the rotation into `x * cos + rotate_half(x) * sin` (no rank-5 stack).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.models.mmdit import (
    JointAttention,
    PyramidFlowMMDiT,
    crop_positions,
    joint_attention_mask,
    temporal_rope,
    timestep_sinusoid,
)

DEFAULT_MASK_FILL = -100.0


def history_levels(history_frames: int, stage: int) -> list[int]:
    """Frames per resolution level 0..stage in the history of `history_frames` clean frames at
    `stage` (as `sampler.history_clips` takes them): the newest at level `stage`, one further back per
    lower level down to 1, everything older at level 0."""
    counts = [0] * (stage + 1)
    remaining = history_frames
    for level in range(stage, 0, -1):
        counts[level] = min(1, remaining)
        remaining -= counts[level]
    counts[0] += remaining
    return counts


@dataclass(frozen=True)
class StageLayout:
    """The fixed shapes of one stage graph (batch 1).

    level_sizes: latent (H, W) of levels 0..stage (the last is the current clip's);
    level_frames: padded history frame count per level (the largest history of the video);
    interval: a Mean-Flows MMDiT's graph, which also takes the embedding of the step's length."""

    stage: int
    level_sizes: tuple[tuple[int, int], ...]
    level_frames: tuple[int, ...]
    text_length: int
    patch_size: int
    interval: bool = False

    @classmethod
    def for_video(cls, stage: int, num_stages: int, latent_size: tuple[int, int], num_latents: int,
                  text_length: int, patch_size: int, interval: bool = False) -> "StageLayout":  # fmt: skip
        """Stage `stage` of a video of `num_latents` latent frames of full-resolution `latent_size`."""
        h, w = latent_size
        sizes = tuple((h >> (num_stages - 1 - level), w >> (num_stages - 1 - level)) for level in range(stage + 1))
        return cls(stage, sizes, tuple(history_levels(num_latents - 1, stage)), text_length, patch_size, interval)

    def tokens_per_frame(self, level: int) -> int:
        h, w = self.level_sizes[level]
        return (h // self.patch_size) * (w // self.patch_size)

    @property
    def history_names(self) -> list[str]:
        return [f"history_{level}" for level, frames in enumerate(self.level_frames) if frames]

    @property
    def video_tokens(self) -> int:
        """Padded video tokens: every padded history frame plus the current clip."""
        return sum(f * self.tokens_per_frame(level) for level, f in enumerate(self.level_frames)) + self.tokens_per_frame(self.stage)

    @property
    def input_names(self) -> list[str]:
        return ["latents", *self.history_names, "text", "attention_bias", "rope_cos", "rope_sin", "positions",
                "timestep_embedding", *(["interval_embedding"] if self.interval else []), "pooled"]  # fmt: skip

    def describe(self) -> str:
        levels = ", ".join(f"level {lv}: {f} x {self.level_sizes[lv][0]}x{self.level_sizes[lv][1]}" for lv, f in enumerate(self.level_frames))
        return (f"history front-padded with zero frames to [{levels}] ({self.video_tokens} video + {self.text_length} text tokens); "
                "padded tokens masked out of every attention row; output = trailing current-clip tokens")  # fmt: skip


@dataclass
class StageHost:
    """What the host needs to compute a stage graph's shape-only inputs (no network weights):
    the [1, G*G, D] position table and the MMDiT's layout flags."""

    pos_table: torch.Tensor
    max_size: int
    head_dim: int
    patch_size: int
    interp_condition_pos: bool
    causal: bool

    @classmethod
    def from_model(cls, model: PyramidFlowMMDiT) -> "StageHost":
        embed = model.pos_embed
        return cls(embed.pos_embed.detach().float().cpu(), embed.max_size, model.head_dim, model.patch_size,
                   embed.interp_condition_pos, model.config["use_temporal_causal"])  # fmt: skip

    def meta(self) -> dict:
        return dict(max_size=self.max_size, head_dim=self.head_dim, patch_size=self.patch_size,
                    interp_condition_pos=self.interp_condition_pos, causal=self.causal)  # fmt: skip

    def inputs(self, layout: StageLayout, clips: Sequence[torch.Tensor], text: torch.Tensor, text_valid: torch.Tensor,
               timestep: torch.Tensor, pooled: torch.Tensor, fill: float = DEFAULT_MASK_FILL,
               timestep_end: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """The graph's inputs (float32, batch 1) for one unpadded call.

        clips: history clips oldest first then the current clip, each [1, C, T_i, H_i, W_i] (as the
        sampler passes them); text [1, L, D] (after the context embedder / ContextAdapter);
        text_valid [1, L] bool; timestep [1] (0..1000); pooled [1, P]; timestep_end [1], the step's end,
        only and always for a Mean-Flows graph (`layout.interval`)."""
        if (timestep_end is not None) != layout.interval:
            raise UsageError("a Mean-Flows stage graph needs the step's end (timestep_end); other graphs take none")
        p = self.patch_size
        current = clips[-1]
        if tuple(current.shape[-2:]) != layout.level_sizes[-1] or text.shape[1] != layout.text_length:
            raise UsageError(f"stage {layout.stage} graph takes a {layout.level_sizes[-1]} latent and {layout.text_length} text "
                             f"tokens, got {tuple(current.shape[-2:])} and {text.shape[1]}")  # fmt: skip
        levels: list[list[torch.Tensor]] = [[] for _ in layout.level_sizes]
        for clip in clips[:-1]:
            size = tuple(clip.shape[-2:])
            if size not in layout.level_sizes:
                raise UsageError(f"history clip of size {size} fits no level of the stage {layout.stage} graph")
            levels[layout.level_sizes.index(size)].append(clip)
        inputs: dict[str, torch.Tensor] = {"latents": current.float()}
        for level, padded in enumerate(layout.level_frames):
            frames = torch.cat(levels[level], dim=2) if levels[level] else current.new_zeros(*current.shape[:2], 0, *layout.level_sizes[level])
            if frames.shape[2] > padded:
                raise UsageError(f"history of {frames.shape[2]} frames at level {level} exceeds the graph's {padded}")
            if padded:
                inputs[f"history_{level}"] = F.pad(frames.float(), (0, 0, 0, 0, padded - frames.shape[2], 0))

        grid = (current.shape[-2] // p, current.shape[-1] // p)
        frame_sizes, positions = [], []
        for clip in clips:
            clip_grid = (clip.shape[-2] // p, clip.shape[-1] // p)
            table = crop_positions(self.pos_table, self.max_size, clip_grid, grid if self.interp_condition_pos else clip_grid)
            positions.append(table.repeat(clip.shape[2], 1))
            frame_sizes += [clip_grid[0] * clip_grid[1]] * clip.shape[2]
        pad = layout.video_tokens - sum(frame_sizes)
        cos, sin = temporal_rope(frame_sizes, self.head_dim)
        mask = joint_attention_mask(text_valid.bool().cpu(), frame_sizes, self.causal)[0, 0]
        length = layout.text_length
        keep = torch.cat([torch.arange(length), torch.arange(length + pad, length + layout.video_tokens)])
        padded_mask = torch.zeros(length + layout.video_tokens, length + layout.video_tokens, dtype=torch.bool)
        padded_mask[keep[:, None], keep[None, :]] = mask
        inputs.update(
            text=text.float(),
            attention_bias=torch.zeros(padded_mask.shape).masked_fill(~padded_mask, fill)[None, None],
            rope_cos=F.pad(torch.cat([cos, cos], dim=-1), (0, 0, pad, 0), value=1.0)[:, None],
            rope_sin=F.pad(torch.cat([sin, sin], dim=-1), (0, 0, pad, 0))[:, None],
            positions=F.pad(torch.cat(positions), (0, 0, pad, 0)),
            timestep_embedding=timestep_sinusoid(timestep.float().reshape(1)),
            pooled=pooled.float(),
        )
        if layout.interval:
            inputs["interval_embedding"] = timestep_sinusoid((timestep.float() - timestep_end.float()).reshape(1))
        return {name: inputs[name].contiguous() for name in layout.input_names}


def _half_layout(head_dim: int) -> torch.Tensor:
    """Channel order of one head in the half layout: even channels, then odd ones."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the half layout: x [b, N, heads, d], cos/sin [N, 1, d] ([angles | angles])."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class DenseJointAttention(nn.Module):
    """A `JointAttention` as a static graph: one attention over [text ; video] with an additive bias
    [b, 1, L+N, L+N] in place of the T5 mask, and RoPE from cos/sin inputs [N, 1, head_dim].
    Takes over `attention` (an export copy): its q/k projections and qk-norms move to the half layout."""

    def __init__(self, attention: JointAttention):
        super().__init__()
        self.inner = attention
        head_dim = attention.to_q.out_features // attention.heads
        order = _half_layout(head_dim)
        rows = (torch.arange(attention.heads)[:, None] * head_dim + order[None]).reshape(-1)
        with torch.no_grad():
            for name in ("to_q", "to_k", "add_q_proj", "add_k_proj"):
                linear = getattr(attention, name)
                linear.weight.copy_(linear.weight[rows])
                linear.bias.copy_(linear.bias[rows])
            for name in ("norm_q", "norm_k", "norm_add_q", "norm_add_k"):
                norm = getattr(attention, name)
                norm.weight.copy_(norm.weight[order])
        self.scale = head_dim**-0.5

    def forward(self, x, c, attention_bias, rope, frame_sizes=None):
        """x [b, N, D] video, c [b, L, D] text -> (video out, text out or c's attention output)."""
        a = self.inner
        cos, sin = rope
        q = _rotate(a.norm_q(a._split_heads(a.to_q(x))), cos, sin)
        k = _rotate(a.norm_k(a._split_heads(a.to_k(x))), cos, sin)
        v = a._split_heads(a.to_v(x))
        cq = a.norm_add_q(a._split_heads(a.add_q_proj(c)))
        ck = a.norm_add_k(a._split_heads(a.add_k_proj(c)))
        cv = a._split_heads(a.add_v_proj(c))
        q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((cq, q), (ck, k), (cv, v)))
        weights = (q @ k.transpose(-1, -2) * self.scale + attention_bias).softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).flatten(2)
        text_len = c.shape[1]
        x_out = a.to_out[0](out[:, text_len:])
        c_out = out[:, :text_len]
        return x_out, (c_out if a.context_pre_only else a.to_add_out(c_out))


def dense_copy(model: PyramidFlowMMDiT) -> PyramidFlowMMDiT:
    """A float32 eval copy of `model` whose blocks use `DenseJointAttention` (shared by the stage graphs)."""
    dense = copy.deepcopy(model).float().eval()
    for block in dense.transformer_blocks:
        block.attn = DenseJointAttention(block.attn)
    return dense


class StageGraph(nn.Module):
    """One pyramid stage as a static graph over `dense` (from `dense_copy`): positional inputs in
    `layout.input_names` order -> velocity (or clean prediction) [1, C, 1, H_s, W_s]."""

    def __init__(self, dense: PyramidFlowMMDiT, layout: StageLayout):
        super().__init__()
        self.model = dense
        self.layout = layout

    def _tokens(self, clip: torch.Tensor) -> torch.Tensor:
        """[b, C, t, H, W] -> patch tokens [b, t*h*w, D] (frame, then row-major patches)."""
        b, _, t = clip.shape[:3]
        x = self.model.pos_embed.proj(clip.transpose(1, 2).flatten(0, 1))
        return x.flatten(2).transpose(1, 2).reshape(b, -1, x.shape[1])

    def _unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Current-clip tokens [b, h*w, p*p*C] (features in (p1, p2, c) order) -> [b, C, 1, H, W]."""
        p, channels = self.model.patch_size, self.model.out_channels
        height, width = self.layout.level_sizes[-1]
        b = x.shape[0]
        x = x.reshape(b, -1, p * p, channels).permute(0, 3, 2, 1).reshape(b, channels * p * p, height // p, width // p)
        return F.pixel_shuffle(x, p).unsqueeze(2)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.layout.input_names, inputs))
        model = self.model
        clips = [named[name] for name in self.layout.history_names] + [named["latents"]]
        x = torch.cat([self._tokens(clip) for clip in clips], dim=1) + named["positions"]
        embed = model.time_text_embed
        temb = embed.timestep_embedder(named["timestep_embedding"]) + embed.text_embedder(named["pooled"])
        if self.layout.interval:
            temb = temb + embed.interval_embedder(named["interval_embedding"])
        text, rope = named["text"], (named["rope_cos"], named["rope_sin"])
        for block in model.transformer_blocks:
            x, text = block(x, text, temb, named["attention_bias"], rope, None)
        x = model.proj_out(model.norm_out(x, temb))
        return self._unpatchify(x[:, x.shape[1] - self.layout.tokens_per_frame(self.layout.stage) :])
