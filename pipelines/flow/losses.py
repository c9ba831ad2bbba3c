"""Pyramidal flow-matching training objective (Pyramid-Flow), reusable by every trainer.

A batch of B clean videos (normalised latents `[B, C, T, H, W]`) is split into "columns" by
`sample_ratios` (reference [1, 2, 1]: column j of 4 holds samples j::4 and trains stage
[0, 1, 1, 2][j]). For a sample trained at stage s with local ratio r:

    n_s   = unit-variance noise at stage s's resolution (one full-res draw, 2x2-mean x2 per level)
    start = n_0                                        (s = 0)
          = S_s n_s + (1 - S_s) Up(Down(z)_s)          (s > 0: previous level, nearest x2)
    end   = z_s                                         (last stage)
          = E_s n_s + (1 - E_s) z_s                     (otherwise)
    input = r start + (1 - r) end,   target velocity = start - end,   loss = MSE(pred, target)

with S_s / E_s the corrected start / end noise levels of the scheduler. With the temporal pyramid
(autoregressive training) only the last frame of the first `units` frames is noisy; the frames
before it are the clean history (as at inference, `history_clips`), each clip corrupted as
h <- c eps + (1 - c) h with c ~ U(0, corrupt_ratio) per sample. A fraction `text_dropout` of the
prompts is replaced by the empty-prompt conditioning (for classifier-free guidance).

Optionally (`focus`, `focus_weight` w) the squared error is weighted per latent cell by 1 + w m, with m
the fraction of the cell an object covers (2x2 means of a full-resolution mask per pyramid level), and
normalised by the mean weight of the sample: objects are a few % of the latent, so without it the
loss, and the gradient that reaches the text, is mostly about the background.

An MMDiT that predicts the stage's clean latent (config `prediction: clean`) is trained on the same
target: its output is turned into the velocity it implies (`velocity_from_clean`). In the last stage
that velocity is (x - z_hat) / r, so an error in z_hat costs 1 / r^2; samples with r below
`CLEAN_RATIO_FLOOR` are weighted by (r / floor)^2, which caps that cost at 1 / floor^2. (Clean-image
prediction scored by its velocity is the parametrisation of "Back to Basics: Let Denoising Generative
Models Denoise", Li & He 2025.)

Every draw goes through a `NoiseSource` (kinds: text_dropout, noise, timestep, history_sigma,
history_noise), so the reference's recorded draws replay exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from neodragon_cli.pipelines.flow.sampler import (
    NoiseSource,
    TextConditioning,
    corrupt_history,
    history_clips,
    prediction_type,
)
from neodragon_cli.pipelines.flow.scheduler import (
    PyramidFlowScheduler,
    latent_pyramid,
    noise_pyramid,
    upsample_nearest_2x,
)


@dataclass
class FlowColumn:
    """The samples of one stage: `clips` = history (oldest first) + the noisy clip, as the DiT
    takes them; `target` has the noisy clip's shape."""

    stage: int
    samples: list[int]  # indices into the batch
    clips: list[torch.Tensor]
    target: torch.Tensor
    ratios: torch.Tensor  # [b] local noise ratio r
    timesteps: torch.Tensor  # [b] global timestep fed to the DiT (0..1000)
    weight: torch.Tensor | None = None  # [b, 1, t, h, w] per-cell loss weight (None: plain MSE)


@dataclass
class FlowBatch:
    """Model inputs of one training step. Text/timestep rows are in batch order, which is the
    reference's interleaved column order (row = b_index * num_columns + column)."""

    columns: list[FlowColumn]
    text: TextConditioning
    timesteps: torch.Tensor  # [B]
    scheduler: PyramidFlowScheduler  # the one the inputs were built with (the loss reads it back)

    def model_inputs(self) -> dict:
        """Keyword arguments of an MMDiT with the reference (multi-column) call convention."""
        return dict(
            sample=[c.clips for c in self.columns],
            encoder_hidden_states=self.text.embeds,
            encoder_attention_mask=self.text.mask,
            pooled_projections=self.text.pooled,
            timestep_ratio=self.timesteps,
        )


def stage_unit_counts(step: int, *, max_units: int, num_frames: int, rank: int = 0, sync_group: int = 8) -> tuple[int, ...]:
    """Units (latent frames) trained per stage (low, mid, high), the reference's balancing scheme:
    ranks of a sync group see the same video with different lengths at the top stage, so sequence
    lengths even out. `step` counts from 1 (the reference increments before use)."""
    turn = step % max(max_units // sync_group, 1)
    high = (rank % sync_group + 1) + turn * sync_group
    low = max(1 + max_units - high, 1)
    return tuple(min(n, num_frames) for n in (low, low, high))


def build_flow_batch(
    latents: torch.Tensor,
    text: TextConditioning,
    null_text: TextConditioning,
    noise: NoiseSource,
    *,
    scheduler: PyramidFlowScheduler | None = None,
    sample_ratios: Sequence[int] = (1, 2, 1),
    temporal_pyramid: bool = True,
    units_per_stage: Sequence[int] | None = None,
    corrupt_ratio: float = 1 / 3,
    text_dropout: float = 0.1,
    focus: torch.Tensor | None = None,
    focus_weight: float = 0.0,
) -> FlowBatch:
    """Draw one training step's inputs and targets (see the module docstring).

    latents: `[B, C, T, H, W]` normalised clean latents, H and W divisible by 4 (two halvings)
    and B divisible by sum(sample_ratios). text: B rows; null_text: 1 row (the empty prompt).
    units_per_stage: frames used per stage with the temporal pyramid (default: all T).
    focus: `[B, T, H, W]` object coverage in [0, 1] at full latent resolution; with `focus_weight` > 0
    it weights the loss (see the module docstring)."""
    sched = scheduler or PyramidFlowScheduler()
    n_stages = sched.num_stages
    column_stage = [s for s, n in enumerate(sample_ratios) for _ in range(n)]
    b, _, t, _, _ = latents.shape
    if len(sample_ratios) != n_stages or b % len(column_stage):
        raise ValueError(f"batch {b} must be a multiple of sum(sample_ratios) = {len(column_stage)} (one ratio per stage)")
    units = tuple(units_per_stage) if units_per_stage is not None else (t,) * n_stages

    keep = noise.rand((b,), kind="text_dropout").to(latents.device) >= text_dropout
    text = text.where(keep, null_text)
    noises = noise_pyramid(noise.randn(tuple(latents.shape), kind="noise").to(latents.device), n_stages)
    clean = latent_pyramid(latents, n_stages)
    weights = None
    if focus is not None and focus_weight > 0:
        weights = [1 + focus_weight * level for level in latent_pyramid(focus.unsqueeze(1).to(latents), n_stages)]

    columns, timesteps = [], torch.zeros(b, device=latents.device)
    for j, s in enumerate(column_stage):
        idx = list(range(j, b, len(column_stage)))
        table = sched.stages[s]
        ratio, tstep = sched.training_point(noise.rand((len(idx),), kind="timestep").to(latents.device), s)
        if s == 0:
            start = noises[0][idx]
        else:
            start = table.start_sigma * noises[s][idx] + (1 - table.start_sigma) * upsample_nearest_2x(clean[s - 1][idx])
        if s == n_stages - 1:
            end = clean[s][idx]
        else:
            end = table.end_sigma * noises[s][idx] + (1 - table.end_sigma) * clean[s][idx]
        history = []
        weight = None if weights is None else weights[s][idx]
        if temporal_pyramid:
            frames = min(units[s], t)
            start, end = start[:, :, frames - 1 : frames], end[:, :, frames - 1 : frames]
            weight = None if weight is None else weight[:, :, frames - 1 : frames]
            if frames > 1:
                history = history_clips([level[idx] for level in clean], s, frames - 1)
                c = corrupt_ratio * noise.rand((len(idx),), kind="history_sigma").to(latents.device)
                c = c.view(-1, 1, 1, 1, 1)
                # drawn newest clip first, like the reference, then kept oldest first
                history = [corrupt_history(h, c, noise) for h in history[::-1]][::-1]
        r = ratio.view(-1, 1, 1, 1, 1)
        columns.append(FlowColumn(s, idx, history + [r * start + (1 - r) * end], start - end, ratio, tstep, weight))
        timesteps[idx] = tstep
    return FlowBatch(columns, text, timesteps, sched)


@dataclass
class FlowLoss:
    loss: torch.Tensor  # scalar
    per_sample: torch.Tensor  # [B] in column order
    predictions: list[torch.Tensor]


def flow_matching_loss(
    predictions: Sequence[torch.Tensor], batch: FlowBatch, sample_weights: Sequence[torch.Tensor] | None = None
) -> FlowLoss:
    """Mean over samples of the per-sample MSE (float32) between predicted and target velocity,
    weighted per cell where a column carries a weight, and per sample by `sample_weights` (one [b]
    tensor per column) when given."""
    per_sample = []
    for j, (p, c) in enumerate(zip(predictions, batch.columns)):
        error = (p.float() - c.target.float()) ** 2
        if c.weight is None:
            loss = error.flatten(1).mean(1)
        else:
            weight = c.weight.float().expand_as(error)
            loss = (weight * error).flatten(1).mean(1) / weight.flatten(1).mean(1)
        per_sample.append(loss if sample_weights is None else loss * sample_weights[j].to(loss))
    per_sample = torch.cat(per_sample)
    return FlowLoss(per_sample.mean(), per_sample, list(predictions))


CLEAN_RATIO_FLOOR = 0.05


def pyramid_flow_loss(model, batch: FlowBatch) -> FlowLoss:
    """Run an MMDiT (reference multi-column convention, returns one tensor per column) on `batch`;
    a clean-latent predictor's outputs are scored as the velocities they imply (module docstring)."""
    outputs = model(**batch.model_inputs())
    if prediction_type(model) == "velocity":
        return flow_matching_loss(outputs, batch)
    sched = batch.scheduler
    velocities, weights = [], []
    for out, c in zip(outputs, batch.columns):
        velocities.append(sched.velocity_from_clean(c.clips[-1].float(), out.float(), c.stage, c.ratios))
        floored = (c.ratios.float() / CLEAN_RATIO_FLOOR).clamp(max=1) ** 2
        weights.append(floored if c.stage == sched.num_stages - 1 else torch.ones_like(floored))
    return flow_matching_loss(velocities, batch, weights)
