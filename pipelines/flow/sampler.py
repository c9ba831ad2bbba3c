"""Autoregressive pyramidal sampler (Pyramid-Flow / Neodragon generation loop).

A video of T latent frames is generated one latent frame ("unit") at a time. Every unit runs the
3 pyramid stages (1/4, 1/2, full resolution) with a few Euler steps each, jumping between stages
with `PyramidFlowScheduler.stage_jump`. Units after the first see the frames generated so far as a
clean *temporal-pyramid history*: the most recent frame at the current stage's resolution, one frame
further back per lower stage, and everything older at 1/4 resolution (`history_clips`).

Two ways to start:
  * monolithic: unit 0 (the first latent frame) is generated too, with its own steps and guidance;
  * hybrid: the caller gives latent 0 (a first-frame image through the VAE encoder), and only the
    later units are sampled (Neodragon: 1-1-1 steps at timesteps 1000/744/386, no CFG).

Every random number comes from a `NoiseSource`: `SeededNoise` (a private torch.Generator, so runs
are reproducible and independent of the global RNG) or `RecordedNoise` (replays tensors recorded by
the reference implementations, per kind and in order).

Layouts: latents `[B, C, T, H, W]` in the normalised latent space; text tensors as in
`TextConditioning`. The denoiser is any callable `(clips, text, timestep) -> velocity` where `clips`
is the history (oldest first) followed by the noisy current clip and the velocity has the current
clip's shape; `mmdit_denoiser` adapts an MMDiT with the reference call convention. A denoiser with
`takes_step_end = True` (a Mean-Flows MMDiT: the average velocity over the step) is called with a 4th
argument, the global timestep at the end of the Euler step (`PyramidFlowScheduler.timestep_at` of the
next local sigma; the stage's end for its last step). A denoiser that
predicts the stage's clean latent instead (`prediction="clean"`, an MMDiT config option) has its
output turned into the velocity it implies (`PyramidFlowScheduler.velocity_from_clean`) before
guidance and the Euler step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch

from neodragon_cli.pipelines.flow.scheduler import (
    PyramidFlowScheduler,
    arrange_blocks,
    block_noise_cholesky,
    latent_pyramid,
    noise_pyramid,
)
from neodragon_cli.pipelines.flow.settings import SamplingConfig

# ---------------------------------------------------------------------- randomness


class NoiseSource:
    """Where every random draw of sampling and training comes from.

    `kind` names the purpose of a draw ("initial", "block", "posterior", "timestep", ...), so a
    replaying source can hand out recorded tensors per purpose and check their shapes."""

    def randn(self, shape: Sequence[int], *, kind: str) -> torch.Tensor:
        raise NotImplementedError

    def rand(self, shape: Sequence[int], *, kind: str) -> torch.Tensor:
        raise NotImplementedError

    def block_noise(self, shape: Sequence[int], gamma: float, *, kind: str = "block") -> torch.Tensor:
        """`[B, C, T, H, W]` noise whose 2x2 blocks are N(0, (1+gamma) I - gamma 11^T)."""
        b, c, t, h, w = shape
        eps = self.randn((b, c, t, h // 2, w // 2, 4), kind=kind)
        return arrange_blocks(eps @ block_noise_cholesky(gamma).T)


class SeededNoise(NoiseSource):
    """Draws from a private CPU generator (float32): same seed, same numbers, on any device."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, shape, *, kind):
        return torch.randn(tuple(shape), generator=self.generator)

    def rand(self, shape, *, kind):
        return torch.rand(tuple(shape), generator=self.generator)


class RowNoise(NoiseSource):
    """One source per batch row: row i of every draw comes from `sources[i]`, drawn as a batch of one,
    so each video of a batch gets the numbers it would get alone. Every draw must have one row per source."""

    def __init__(self, sources: Sequence[NoiseSource]):
        self.sources = list(sources)

    def _rows(self, draw: str, shape, kind: str) -> torch.Tensor:
        if shape[0] != len(self.sources):
            raise ValueError(f"a '{kind}' draw of {shape[0]} rows from noise for {len(self.sources)} rows")
        return torch.cat([getattr(source, draw)((1, *shape[1:]), kind=kind) for source in self.sources])

    def randn(self, shape, *, kind):
        return self._rows("randn", shape, kind)

    def rand(self, shape, *, kind):
        return self._rows("rand", shape, kind)


class RecordedNoise(NoiseSource):
    """Replays recorded draws: `{kind: [tensor, ...]}`, handed out in order per kind.

    Block noise is recorded as the final `[B, C, T, H, W]` tensor, so `block_noise` replays it as is.
    A draw of the wrong shape, or one more than recorded, raises ValueError."""

    def __init__(self, draws: Mapping[str, Sequence[torch.Tensor]]):
        self.queues = {k: list(v) for k, v in draws.items()}
        self.taken: dict[str, int] = defaultdict(int)

    def _next(self, shape, kind: str) -> torch.Tensor:
        queue = self.queues.get(kind, [])
        i = self.taken[kind]
        if i >= len(queue):
            raise ValueError(f"no recorded '{kind}' draw left (recorded {len(queue)})")
        tensor = queue[i]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"recorded '{kind}' draw {i} has shape {tuple(tensor.shape)}, wanted {tuple(shape)}")
        self.taken[kind] = i + 1
        return tensor.float()

    def randn(self, shape, *, kind):
        return self._next(shape, kind)

    def rand(self, shape, *, kind):
        return self._next(shape, kind)

    def block_noise(self, shape, gamma, *, kind="block"):
        return self._next(shape, kind)

    def remaining(self) -> dict[str, int]:
        """Recorded draws not used (a full replay leaves none)."""
        return {k: len(q) - self.taken[k] for k, q in self.queues.items() if len(q) > self.taken[k]}


# ---------------------------------------------------------------------- conditioning


@dataclass
class TextConditioning:
    """What the DiT gets about the prompt, one row per video.

    embeds `[B, L, D]` (the DiT's text-token input: ContextAdapter output for Neodragon, T5 output
    for Pyramid-Flow, whose DiT embeds it itself), mask `[B, L]` int64 (1 = real token),
    pooled `[B, P]` (CLIP-L + CLIP-G pooled embeddings)."""

    embeds: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def cat(parts: Sequence["TextConditioning"]) -> "TextConditioning":
        return TextConditioning(
            torch.cat([p.embeds for p in parts]), torch.cat([p.mask for p in parts]), torch.cat([p.pooled for p in parts])
        )

    def where(self, keep: torch.Tensor, other: "TextConditioning") -> "TextConditioning":
        """Rows of self where `keep` [B] is true, else the (broadcast) rows of `other`."""
        pick = lambda a, b: torch.where(keep.view(-1, *[1] * (a.dim() - 1)), a, b.expand_as(a))  # noqa: E731
        return TextConditioning(pick(self.embeds, other.embeds), pick(self.mask, other.mask), pick(self.pooled, other.pooled))

    def to(self, device, dtype=None) -> "TextConditioning":
        return TextConditioning(
            self.embeds.to(device, dtype), self.mask.to(device), self.pooled.to(device, dtype)
        )


Denoiser = Callable[[list, TextConditioning, torch.Tensor], torch.Tensor]


def mmdit_denoiser(model) -> Denoiser:
    """Adapt an MMDiT with the reference call convention
    `model(sample=[[clips...]], encoder_hidden_states, encoder_attention_mask, pooled_projections,
    timestep_ratio) -> [velocity]` (one column) to a `Denoiser`; inputs but the timestep are cast to the
    model dtype."""
    dtype = next(model.parameters()).dtype

    def call(clips, text, timestep, timestep_end=None):
        end = {} if timestep_end is None else {"timestep_end": timestep_end.float()}  # a Mean-Flows MMDiT's step end
        out = model(
            sample=[[c.to(dtype) for c in clips]],
            encoder_hidden_states=text.embeds.to(dtype),
            encoder_attention_mask=text.mask,
            pooled_projections=text.pooled.to(dtype),
            timestep_ratio=timestep.float(),  # the sinusoid runs in fp32: bf16 would round t near 1000 to steps of 4
            **end,
        )
        return out[0].float()

    call.takes_step_end = takes_step_end(model)
    return call


def takes_step_end(model) -> bool:
    """Whether an MMDiT predicts the average velocity over a step and needs its end (Mean-Flows)."""
    config = getattr(model, "config", None)
    return isinstance(config, dict) and bool(config.get("interval_conditioning", False))


PREDICTIONS = ("velocity", "clean")


def prediction_type(model) -> str:
    """What an MMDiT outputs: "velocity" (the stage's start - end, as the published models do) or
    "clean" (the stage's clean latent); read from its config's `prediction`."""
    return model.config["prediction"]


# ---------------------------------------------------------------------- presets (SamplingConfig: settings.py) and events


HYBRID = SamplingConfig(first_steps=(1, 1, 1), video_steps=(1, 1, 1), guidance=0.0, video_guidance=0.0)
MONOLITHIC = SamplingConfig()


@dataclass
class StepEvent:
    """Handed to the callback after every Euler step (tensors are the live ones: do not modify)."""

    unit: int
    num_units: int
    stage: int
    step: int
    num_steps: int
    timestep: float  # as fed to the DiT
    sigma: float
    sigma_next: float
    guidance: float
    latents_in: torch.Tensor  # current clip before the step [B, C, 1, h, w]
    velocity: torch.Tensor  # after CFG
    latents_out: torch.Tensor
    history: list[torch.Tensor] = field(default_factory=list)  # clean clips, oldest first
    raw_output: torch.Tensor | None = None  # denoiser output before CFG ([neg; pos] under CFG)


# ---------------------------------------------------------------------- history


def history_clips(pyramid: Sequence[torch.Tensor], stage: int, end: int) -> list[torch.Tensor]:
    """Temporal-pyramid history for predicting frame `end` at `stage`, oldest clip first.

    `pyramid` = [1/4, 1/2, full] clean latents `[B, C, T, h_s, w_s]` with T >= end. Frame end-1 is
    taken at `stage`'s resolution, end-2 at stage-1, ... down to stage 1; all older frames form one
    clip at stage 0. E.g. stage 2 -> [frames <= end-3 @1/4, end-2 @1/2, end-1 @full]."""
    clips = []
    level = stage
    while end > 0 and (level > 0 or not clips):
        clips.append(pyramid[level][:, :, end - 1 : end])
        end -= 1
        level -= 1
    if end > 0:
        clips.append(pyramid[0][:, :, :end])
    return clips[::-1]


def corrupt_history(clip: torch.Tensor, mix, noise: NoiseSource) -> torch.Tensor:
    """mix * eps + (1 - mix) * clip, eps a fresh `history_noise` draw; `mix` a float or a per-sample
    tensor broadcastable to the clip (training draws it per sample, sampling uses a fixed level)."""
    return mix * noise.randn(tuple(clip.shape), kind="history_noise").to(clip.device) + (1 - mix) * clip


# ---------------------------------------------------------------------- sampler


class PyramidSampler:
    """Runs the generation loop of one batch of videos; see the module docstring."""

    def __init__(self, denoiser: Denoiser, scheduler: PyramidFlowScheduler | None = None, prediction: str = "velocity"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        self.denoiser = denoiser
        self.scheduler = scheduler or PyramidFlowScheduler()
        self.prediction = prediction

    def latent_frames(
        self,
        text: TextConditioning,
        *,
        num_frames: int,
        latent_channels: int,
        latent_size: tuple[int, int],
        config: SamplingConfig = MONOLITHIC,
        noise: NoiseSource,
        negative: TextConditioning | None = None,
        first_latent: torch.Tensor | None = None,
        callback: Callable[[StepEvent], None] | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[torch.Tensor]:
        """Yield the `num_frames` latent frames `[B, C, 1, H, W]` one by one, as each completes.

        `latent_size` = (H, W) of the full-resolution latent (divisible by 2**(stages-1) * 2 so the
        coarsest stage has whole 2x2 patches). `first_latent` (hybrid) is yielded first as given."""
        stages = self.scheduler.num_stages
        h, w = latent_size
        factor = 2 ** (stages - 1)
        if h % factor or w % factor:
            raise ValueError(f"latent size {h}x{w} must be divisible by {factor}")
        batch = len(text)
        # one full-resolution draw for the whole video, brought down to stage 0 (unit k: frame k)
        initial = noise.randn((batch, latent_channels, num_frames, h, w), kind="initial").to(device)
        stage0_noise = noise_pyramid(initial, stages)[0]

        generated: list[torch.Tensor] = []
        if first_latent is not None:
            generated.append(first_latent.to(device, torch.float32))
            yield generated[0]
        for unit in range(len(generated), num_frames):
            latent = self.sample_unit(
                unit, num_frames, stage0_noise[:, :, unit : unit + 1], generated, text, negative, config, noise, callback
            )
            generated.append(latent)
            yield latent

    def sample_unit(self, unit, num_units, latents, generated, text, negative, config, noise, callback=None) -> torch.Tensor:
        """Latent frame `unit` `[B, C, 1, H, W]` from its stage-0 noise `latents` `[B, C, 1, H/4, W/4]`
        and the clean frames before it, `generated` (any frames: the sampler's own, or true ones for
        teacher forcing), through all stages."""
        sched = self.scheduler
        steps, scale = config.unit_plan(unit)
        cfg = scale > 0
        if cfg and negative is None:
            raise ValueError("classifier-free guidance needs a negative prompt conditioning")
        cond = TextConditioning.cat([negative, text]) if cfg else text
        pyramid = latent_pyramid(torch.cat(generated, dim=2), sched.num_stages) if generated else None
        for stage in range(sched.num_stages):
            if stage > 0:
                b, c, t, hh, ww = latents.shape
                block = noise.block_noise((b, c, t, 2 * hh, 2 * ww), sched.gamma).to(latents.device)
                latents = sched.stage_jump(latents, stage, block)
            history = history_clips(pyramid, stage, len(generated)) if generated else []
            if config.history_noise > 0:
                history = [corrupt_history(h, config.history_noise, noise) for h in history]
            model_history = [torch.cat([c, c]) for c in history] if cfg else history
            timesteps = sched.timesteps(steps[stage], stage)
            sigmas = sched.sigmas(steps[stage], stage)
            for k, t_value in enumerate(timesteps):
                model_in = torch.cat([latents, latents]) if cfg else latents
                t = torch.full((model_in.shape[0],), float(t_value), dtype=latents.dtype, device=latents.device)
                if getattr(self.denoiser, "takes_step_end", False):
                    end = torch.full_like(t, sched.timestep_at(stage, float(sigmas[k + 1])))
                    raw = self.denoiser(model_history + [model_in], cond, t, end)
                else:
                    raw = self.denoiser(model_history + [model_in], cond, t)
                velocities = raw.float()
                if self.prediction == "clean":
                    velocities = sched.velocity_from_clean(model_in.float(), velocities, stage, float(sigmas[k]))
                if cfg:
                    uncond, positive = velocities.chunk(2)
                    velocity = uncond + scale * (positive - uncond)
                else:
                    velocity = velocities
                new = sched.step(velocity, float(sigmas[k]), float(sigmas[k + 1]), latents)
                if callback is not None:
                    callback(
                        StepEvent(
                            unit=unit, num_units=num_units, stage=stage, step=k, num_steps=len(timesteps),
                            timestep=float(t[0]), sigma=float(sigmas[k]), sigma_next=float(sigmas[k + 1]),
                            guidance=scale, latents_in=latents, velocity=velocity, latents_out=new,
                            history=history, raw_output=raw,
                        )
                    )
                latents = new
        return latents
