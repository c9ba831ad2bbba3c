"""Pyramidal flow-matching schedule (Pyramid-Flow / Neodragon), stateless.

Generation runs in `stages` (3) spatial resolutions, each a flow from a noisier, coarser latent to a
cleaner one:

    stage 0: 1/4 resolution, global noise level 1.0   -> 0.667
    stage 1: 1/2 resolution, corrected start 0.80024 -> 0.334
    stage 2: full resolution, corrected start 0.50075 -> 0

Inside a stage the model sees *local* sigmas running 1 -> 0 (Euler steps `x += (s_next - s) * v`)
and *global* timesteps on the 0..1000 scale (stage 0: 1000 -> 744, stage 1: 744 -> 386,
stage 2: 386 -> 1). Between stages the latent is upsampled (nearest x2) and re-noised with
correlated 2x2 block noise (`stage_jump`), which turns the end of stage k into the start of stage k+1.

Numbers follow the reference exactly: the global tables are float32 (1000 ... 1, sigma = t / 1000),
derived quantities are float64, the per-stage step lists are numpy-1.x float64 linspaces, and the
DiT receives timesteps cast to the latent dtype.

Tensor layout everywhere: latents `[B, C, T, H, W]` (normalised latent space, roughly unit variance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

STAGES = 3


def parse_steps(text: str | int | Sequence[int], stages: int = STAGES) -> tuple[int, ...]:
    """`"20-20-20"`, `"4"`, `10` or `[1, 1, 1]` -> one positive step count per stage.

    Raises ValueError with a readable message for anything else (callers turn it into a usage error).
    """
    if isinstance(text, bool) or not isinstance(text, (int, str, list, tuple)):
        raise ValueError(f"steps {text!r} must be N, N-N-N or a list of {stages} integers")
    if isinstance(text, int):
        parts = [text]
    elif isinstance(text, str):
        try:
            parts = [int(p) for p in text.replace(",", "-").split("-")]
        except ValueError:
            raise ValueError(f"steps '{text}' is not of the form N or N-N-N (e.g. 1-1-1, 20-20-20)") from None
    else:
        parts = list(text)
    if len(parts) == 1:
        parts = parts * stages
    if len(parts) != stages or any(not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in parts):
        raise ValueError(f"steps {text!r} must be {stages} positive integers (e.g. 1-1-1, 20-20-20)")
    return tuple(parts)


@dataclass(frozen=True)
class StageTables:
    """Noise levels of one stage (float64 of the reference float32 values where it has them)."""

    start_sigma: float  # corrected global noise level at the stage start
    end_sigma: float  # global noise level at the stage end (0 for the last stage)
    ori_start_sigma: float  # uncorrected start = previous stage's end level
    timestep_ratio: tuple[float, float]  # fraction of the 0..1000 timestep range this stage covers
    timesteps: np.ndarray = field(repr=False)  # [1000] float64 global timesteps of the training grid
    sigmas: np.ndarray = field(repr=False)  # [1000] float64 local sigmas 1.0 ... 0.001


class PyramidFlowScheduler:
    """Tables and update rules of pyramidal flow matching (no state; safe to share).

    `num_train_timesteps=1000, stages=3, stage_range=(0, 1/3, 2/3, 1), gamma=1/3` are the reference
    values; `gamma` is the block-noise correlation of the stage jumps.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        stages: int = STAGES,
        stage_range: Sequence[float] = (0.0, 1 / 3, 2 / 3, 1.0),
        gamma: float = 1 / 3,
    ):
        if len(stage_range) != stages + 1:
            raise ValueError(f"stage_range needs {stages + 1} entries, got {len(stage_range)}")
        self.num_train_timesteps = n = num_train_timesteps
        self.num_stages = stages
        self.stage_range = tuple(float(r) for r in stage_range)
        self.gamma = float(gamma)
        # global grid in float32 like the reference: sigma = t / 1000 for t = 1000 ... 1, and the
        # timesteps are recomputed as sigma * 1000 (a few of them are then off by ~3e-5)
        self.global_sigmas = np.linspace(1.0, n, n, dtype=np.float32)[::-1] / np.float32(n)
        self.global_timesteps = self.global_sigmas * np.float32(n)

        starts, ends, ori_starts = [], [], []
        for i in range(stages):
            start_idx, end_idx = int(self.stage_range[i] * n), int(self.stage_range[i + 1] * n)
            ori = float(self.global_sigmas[start_idx])
            end = float(self.global_sigmas[end_idx]) if end_idx < n else 0.0
            signal = 1.0 - ori
            if i > 0:  # the block-noise jump adds noise: the stage really starts noisier
                signal = signal / (math.sqrt(1 + 1 / self.gamma) * (1 - signal) + signal)
            starts.append(1.0 - signal)
            ends.append(end)
            ori_starts.append(ori)

        # timestep range of each stage is proportional to its length in global noise level
        lengths = [s - e for s, e in zip(starts, ends)]
        edges = np.concatenate([[0.0], np.cumsum(lengths) / sum(lengths)])
        self.stages: list[StageTables] = []
        for i in range(stages):
            t_max = float(self.global_timesteps[int(edges[i] * n)])
            t_min = float(self.global_timesteps[min(int(edges[i + 1] * n), n - 1)])
            self.stages.append(
                StageTables(
                    start_sigma=starts[i],
                    end_sigma=ends[i],
                    ori_start_sigma=ori_starts[i],
                    timestep_ratio=(float(edges[i]), float(edges[i + 1])),
                    timesteps=np.linspace(t_max, t_min, n + 1)[:-1],
                    sigmas=np.linspace(1.0, 0.0, n + 1)[:-1],
                )
            )

    # ------------------------------------------------------------------ sampling schedule

    def timesteps(self, num_steps: int, stage: int) -> np.ndarray:
        """[N] float64 global timesteps (0..1000 scale) at which the model is evaluated in `stage`."""
        table = self.stages[stage].timesteps
        return np.linspace(table[0], table[-1], num_steps)

    def sigmas(self, num_steps: int, stage: int) -> np.ndarray:
        """[N + 1] float64 local sigmas: N evaluations from 1 down to 0.001, then a final 0."""
        table = self.stages[stage].sigmas
        return np.append(np.linspace(table[0], table[-1], num_steps), 0.0)

    def timestep_at(self, stage: int, sigma):
        """The global timestep of local sigma `sigma` (a float or a tensor) in `stage`: the affine map of the
        training grid (sigma 1 -> its first timestep, 0.001 -> its last), continued to sigma 0 (the
        stage's end). The sampler's timesteps are this map at its sigmas."""
        table = self.stages[stage]
        first, last = float(table.timesteps[0]), float(table.timesteps[-1])
        return first + (first - last) / (1.0 - float(table.sigmas[-1])) * (sigma - 1.0)

    @staticmethod
    def step(velocity: torch.Tensor, sigma: float, sigma_next: float, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step of the local flow, in float32, cast back to the velocity's dtype."""
        return (sample.float() + (sigma_next - sigma) * velocity.float()).to(velocity.dtype)

    def velocity_from_clean(self, sample: torch.Tensor, clean: torch.Tensor, stage: int, ratio: float | torch.Tensor) -> torch.Tensor:
        """The velocity (start - end) that a prediction `clean` of the stage's clean latent implies at
        `sample`, both `[B, C, T, h, w]`; `ratio` is the local noise ratio r, a float or one per sample.

        Training builds x = r start + (1 - r) end with start = S n + (1 - S) Up(Down(z)) and
        end = E n + (1 - E) z from one noise n (`losses` module), so z fixes n and hence the velocity.
        In the last stage (E = 0) it is (x - z) / r: an Euler step to r = 0 lands on the prediction."""
        table = self.stages[stage]
        start, end = table.start_sigma, table.end_sigma
        if isinstance(ratio, torch.Tensor):
            ratio = ratio.to(sample).view(-1, *[1] * (sample.dim() - 1))
        clean = clean.to(sample.dtype)
        coarse = upsample_nearest_2x(downsample_2x(clean)) if stage > 0 else torch.zeros_like(clean)
        signal = ratio * (1 - start) * coarse + (1 - ratio) * (1 - end) * clean
        noise = (sample - signal) / (ratio * start + (1 - ratio) * end)
        return (start - end) * noise + (1 - start) * coarse - (1 - end) * clean

    def clean_from_velocity(self, sample: torch.Tensor, velocity: torch.Tensor, stage: int, ratio: float | torch.Tensor) -> torch.Tensor:
        """The stage's clean latent z that a velocity implies at `sample` (the inverse of
        `velocity_from_clean`), both `[B, C, T, h, w]`; `ratio` a float or one per sample.

        end = x - r v and start = x + (1 - r) v; their 2x2-block means P (= Up(Down(.))) give the coarse
        clean P z = (E P start - S P end) / (E - S), then the noise n = (start - (1 - S) P z) / S and
        z = (end - E n) / (1 - E). In the last stage (E = 0) z = end = x - r v; in stage 0 start is the
        noise itself."""
        table = self.stages[stage]
        start_level, end_level = table.start_sigma, table.end_sigma
        if isinstance(ratio, torch.Tensor):
            ratio = ratio.to(sample).view(-1, *[1] * (sample.dim() - 1))
        velocity = velocity.to(sample.dtype)
        end = sample - ratio * velocity
        if end_level == 0:
            return end
        start = end + velocity
        if stage == 0:
            noise = start
        else:
            block_mean = lambda y: upsample_nearest_2x(downsample_2x(y))  # noqa: E731
            coarse = (end_level * block_mean(start) - start_level * block_mean(end)) / (end_level - start_level)
            noise = (start - (1 - start_level) * coarse) / start_level
        return (end - end_level * noise) / (1 - end_level)

    def stage_point(self, clean: torch.Tensor, noise: torch.Tensor, stage: int, ratio: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, velocity) of the training path of `stage` at local ratio r for the stage's clean latent
        `clean` and unit-variance `noise` at its resolution (as `losses.build_flow_batch` draws them):
        start = S n + (1 - S) Up(Down(z)) (n in stage 0), end = E n + (1 - E) z, x = r start + (1 - r) end,
        velocity = start - end."""
        table = self.stages[stage]
        if isinstance(ratio, torch.Tensor):
            ratio = ratio.to(clean).view(-1, *[1] * (clean.dim() - 1))
        noise = noise.to(clean)
        if stage == 0:
            start = noise
        else:
            start = table.start_sigma * noise + (1 - table.start_sigma) * upsample_nearest_2x(downsample_2x(clean))
        end = clean if table.end_sigma == 0 else table.end_sigma * noise + (1 - table.end_sigma) * clean
        return ratio * start + (1 - ratio) * end, start - end

    # ------------------------------------------------------------------ stage jumps

    def jump_coefficients(self, stage: int) -> tuple[float, float]:
        """(alpha, beta) of the jump into `stage` >= 1: x = alpha * up(x) + beta * block_noise."""
        if not 1 <= stage < self.num_stages:
            raise ValueError(f"a stage jump goes into stage 1..{self.num_stages - 1}, not {stage}")
        sigma = self.stages[stage].ori_start_sigma  # noise level reached at the end of the previous stage
        alpha = 1.0 / (math.sqrt(1 + 1 / self.gamma) * sigma + (1 - sigma))
        beta = alpha * sigma / math.sqrt(self.gamma)
        return alpha, beta

    def stage_jump(self, latents: torch.Tensor, stage: int, block_noise: torch.Tensor) -> torch.Tensor:
        """Upsample the end of stage-1 (nearest x2) and re-noise it into the start of `stage`.

        `block_noise` has the upsampled shape `[B, C, T, 2H, 2W]` (see `sample_block_noise`)."""
        alpha, beta = self.jump_coefficients(stage)
        return alpha * upsample_nearest_2x(latents) + beta * block_noise.to(latents.dtype)

    def block_cholesky(self) -> torch.Tensor:
        return block_noise_cholesky(self.gamma)

    # ------------------------------------------------------------------ training draws

    def training_point(self, u: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Map uniform draws `u` [N] to (local ratio r, global timestep t), both float32 [N].

        The training grid has 1000 points per stage: idx = clamp(int(u * 1000), 0, 999)."""
        n = self.num_train_timesteps
        idx = (u.double() * n).long().clamp(0, n - 1).cpu().numpy()
        table = self.stages[stage]
        return (
            torch.from_numpy(table.sigmas[idx]).float().to(u.device),
            torch.from_numpy(table.timesteps[idx]).float().to(u.device),
        )


# ---------------------------------------------------------------------- resampling helpers


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D op to every frame of `[B, C, T, H, W]`."""
    b, c, t, h, w = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    out = fn(frames)
    return out.reshape(b, t, c, *out.shape[-2:]).permute(0, 2, 1, 3, 4)


def downsample_2x(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x1/2 per frame (align_corners=False: exactly the 2x2 mean). `[B,C,T,H,W]`."""
    return _per_frame(lambda f: F.interpolate(f, size=(f.shape[-2] // 2, f.shape[-1] // 2), mode="bilinear"), x)


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest x2 per frame. `[B,C,T,H,W]` -> `[B,C,T,2H,2W]`."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def latent_pyramid(x: torch.Tensor, stages: int = STAGES) -> list[torch.Tensor]:
    """[1/4, 1/2, full]-resolution versions of clean latents (2x2 means, no rescaling)."""
    levels = [x]
    for _ in range(stages - 1):
        levels.insert(0, downsample_2x(levels[0]))
    return levels


def noise_pyramid(noise: torch.Tensor, stages: int = STAGES) -> list[torch.Tensor]:
    """[1/4, 1/2, full] versions of unit-variance noise: each 2x2 mean is multiplied by 2 so the
    variance stays 1."""
    levels = [noise]
    for _ in range(stages - 1):
        levels.insert(0, 2.0 * downsample_2x(levels[0]))
    return levels


# ---------------------------------------------------------------------- block noise


def block_noise_cholesky(gamma: float = 1 / 3) -> torch.Tensor:
    """Lower-triangular L [4, 4] (float32) with L @ L.T = (1 + gamma) I - gamma 11^T.

    For gamma = 1/3 the covariance is singular (each 2x2 block of noise sums to 0), so a plain
    Cholesky fails; this computes it in float64 with non-positive pivots set to 0, which is the
    exact PSD square root (the reference fixtures were drawn with it)."""
    cov = (1 + gamma) * torch.eye(4, dtype=torch.float64) - gamma * torch.ones(4, 4, dtype=torch.float64)
    L = torch.zeros(4, 4, dtype=torch.float64)
    for j in range(4):
        pivot = cov[j, j] - (L[j, :j] ** 2).sum()
        L[j, j] = math.sqrt(pivot) if pivot > 1e-12 else 0.0
        for i in range(j + 1, 4):
            off = cov[i, j] - (L[i, :j] * L[j, :j]).sum()
            L[i, j] = off / L[j, j] if L[j, j] > 0 else 0.0
    return L.float()


def arrange_blocks(draws: torch.Tensor) -> torch.Tensor:
    """`[B, C, T, H/2, W/2, 4]` per-block draws -> `[B, C, T, H, W]`; the 4 values of a block fill
    [[v0, v1], [v2, v3]] (row-major)."""
    b, c, t, hb, wb, _ = draws.shape
    return draws.reshape(b, c, t, hb, wb, 2, 2).permute(0, 1, 2, 3, 5, 4, 6).reshape(b, c, t, 2 * hb, 2 * wb)


def sample_block_noise(
    shape: Sequence[int], gamma: float = 1 / 3, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Correlated 2x2-block noise of `shape` = [B, C, T, H, W] (H, W even), float32 on CPU.

    Every 2x2 spatial block is one draw of N(0, (1 + gamma) I - gamma 11^T), vectorised as L @ eps."""
    b, c, t, h, w = shape
    if h % 2 or w % 2:
        raise ValueError(f"block noise needs even height and width, got {h}x{w}")
    eps = torch.randn(b, c, t, h // 2, w // 2, 4, generator=generator)
    return arrange_blocks(eps @ block_noise_cholesky(gamma).T)
