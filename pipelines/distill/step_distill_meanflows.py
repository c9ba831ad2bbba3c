"""`step-distill` method `mean-flows`: the student learns the average velocity of the teacher's guided flow
over a step (Neodragon §3.4, after Mean Flows, Geng et al. 2025).

Inside pyramid stage s everything is in the stage's *local* time: the sampler's local sigma runs from 1
(the stage's start) to 0 (its end), x(sigma) = sigma start + (1 - sigma) end, and the MMDiT's velocity is
dx/dsigma = start - end, i.e. the velocity in global noise level scaled by (sigma_start - sigma_end) of
the stage; an Euler step is x_next = x + (sigma_next - sigma) v. The student's output is the *average*
velocity over [r, t] in those units, u(x_t, r, t) = (x_t - x_r) / (t - r) along the teacher's flow, so a
sampler step from t = sigma_k to r = sigma_{k+1} with u in place of v lands where the teacher's flow
would: a 1-1-1 student jumps from each stage's start to its end with u(x, r = 0, t = 1).

The student is the teacher's weights plus a second timestep embedding (beta: the step length in global
timesteps, T(t) - T(r) with T = `PyramidFlowScheduler.timestep_at`), whose output layer is zero at the
start (`PyramidFlowMMDiT(interval_conditioning=True)`): it starts as the teacher. The sampler gives it
the end of every step (`takes_step_end`).

Where v comes from (our choice): v is always the teacher's velocity with CFG at its sampling guidance
(the guided flow is what the student must shortcut - this is distillation, it learns no data velocity),
evaluated at points x_t on the stage's training path built from teacher-generated clean latents (the
`progressive` synthetic-data cache) with fresh noise and the earlier frames as history, at any
continuous t: no rollouts needed, and the points follow the teacher's own marginals.

Per update, at a drawn (latent frame, stage, student step k) (`draw_place`), each sample is
* with probability `mean_flows.fraction` (0.25) a Mean-Flows sample: r = sigma_{k+1} (the step's end),
  t ~ U(sigma_{k+1}, sigma_k] (the whole step, so the identity below holds where the sampler uses u);
* else a flow-matching sample: t ~ U(0, 1) over the stage, r = t.
Target (stop-gradient), the Mean-Flows identity in local time:

    u_tgt = v(x_t, t) - (t - r) du/dt,   du/dt = v . d_x u + d_t u  (r fixed)

with du/dt one forward-mode JVP of the student (torch.func.jvp along (v, 1, 0) for (x, t, r), no grad,
math attention kernel: the fused ones have no forward AD). For r = t it is the plain target v.
Loss: per sample err = mean((u - u_tgt)^2), weighted by 1 / sg(err + eps)^p (`adaptive_p`, 1.0;
0 gives plain MSE), averaged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from neodragon_cli.pipelines.distill.step_distill import (
    STUDENT,
    TEACHER,
    DistillContext,
    condition,
    data_point,
    draw_place,
    guided_velocity,
    noise_source,
    repeat_rows,
)
from neodragon_cli.pipelines.flow.sampler import mmdit_denoiser
from neodragon_cli.pipelines.flow.scheduler import PyramidFlowScheduler
from neodragon_cli.pipelines.train.trainer import MultiModelTrainer, Phase
from torch.nn.attention import SDPBackend, sdpa_kernel

AverageVelocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def average_velocity(model, history: list[torch.Tensor], text, scheduler: PyramidFlowScheduler, stage: int) -> AverageVelocity:
    """u(x, t, r): the Mean-Flows MMDiT's average velocity at current clip x over [r, t], both local sigmas
    [B] of `stage` (their global timesteps by `timestep_at`, so derivatives are in local time)."""
    denoise = mmdit_denoiser(model)

    def u(x: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return denoise(history + [x], text, scheduler.timestep_at(stage, t), scheduler.timestep_at(stage, r))

    return u


def mean_flow_target(u: AverageVelocity, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                     velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_tgt, du/dt): the stop-gradient Mean-Flows target v - (t - r) du/dt, du/dt the total derivative of
    u along the flow, one JVP with tangents (v, 1, 0) for (x, t, r); fp32, math attention, no grad."""
    x, t, r, velocity = x.float(), t.float(), r.float(), velocity.float()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), torch.autocast(x.device.type, enabled=False):
        _, dudt = torch.func.jvp(u, (x, t, r), (velocity, torch.ones_like(t), torch.zeros_like(r)))
    gap = (t - r).view(-1, *[1] * (x.dim() - 1))
    return (velocity - gap * dudt).detach(), dudt.detach()


def draw_times(ctx: DistillContext, stage: int, step: int, rows: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample local (t, r) [rows]: a `mean_flows.fraction` share of Mean-Flows samples, r = the end
    of student step `step`, t ~ U over the step (the start included); the rest t ~ U(0, 1), r = t."""
    sigmas = ctx.scheduler.sigmas(ctx.schedule[stage], stage)
    start, end = float(sigmas[step]), float(sigmas[step + 1])
    draw = lambda: torch.rand((rows,), generator=generator, device=generator.device)  # noqa: E731
    mean_flow = draw() < ctx.recipe.mean_flows.fraction
    within = end + (start - end) * (1 - draw())  # (end, start]
    anywhere = draw()
    t = torch.where(mean_flow, within, anywhere)
    r = torch.where(mean_flow, torch.full_like(t, end), t)
    return t, r


def adaptive_weighted(err: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """mean(err / sg(err + eps)^p) over samples (p = 0: the plain mean)."""
    return (err / (err.detach() + eps) ** p).mean() if p > 0 else err.mean()


def mean_flows_loss(ctx: DistillContext):
    sched, settings = ctx.scheduler, ctx.recipe.mean_flows

    def loss_fn(models, batch: dict, generator: torch.Generator):
        text = condition(models, batch["captions"])
        rows = len(text)
        negative = repeat_rows(condition(models, [ctx.negative_prompt]), rows) if ctx.needs_cfg() else None
        unit, stage, step = place = draw_place(ctx, batch)
        t, r = draw_times(ctx, stage, step, rows, generator)
        point = data_point(ctx, batch["latents"], place, noise_source(generator), ratio=t)
        x = point.latents.float()
        with torch.no_grad():
            velocity = guided_velocity(models[TEACHER], point.clips, text, negative, point.timestep, ctx.teacher_scale(unit))
        target, dudt = mean_flow_target(average_velocity(models[STUDENT], point.history, text, sched, stage), x, t, r, velocity)
        u = average_velocity(models[STUDENT], point.history, text, sched, stage)(x, t, r)
        err = (u - target).pow(2).flatten(1).mean(1)
        loss = adaptive_weighted(err, settings.adaptive_p, settings.adaptive_eps)
        # metric names must not depend on the draws: every rank logs the same keys
        return loss, {"mse": err.mean().detach(), "dudt_abs": dudt.abs().mean()}

    return loss_fn


def mean_flows_trainer(ctx: DistillContext, models: dict, data, out_dir, resume: bool, init) -> MultiModelTrainer:
    """One phase: the student's Mean-Flows update."""
    r = ctx.recipe
    phases = [Phase("student", mean_flows_loss(ctx), (STUDENT,))]
    return MultiModelTrainer(models, {STUDENT: r.train}, phases, data, r.train, out_dir, resume=resume)
