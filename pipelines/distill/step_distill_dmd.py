"""`step-distill` method `dmd`: pyramidal distribution matching distillation (Neodragon §3.4, after DMD/DMD2).

Per update, on a micro-batch of prompts, at a uniformly drawn (latent frame u, stage s, step k of the
target schedule) - the student's tau_local is one of the schedule's fixed points of the stage (four
for 4-4-4: 1, 0.667, 0.334, 0.001):

1. the student samples with its own schedule up to that MMDiT call (no grad, `student_rollout`) and
   predicts the stage's clean latent z = G(x_k) there (with grad);
2. fake-score update (x2 per student update): z is re-noised along the stage's path at
   tau ~ U(0, 1) with fresh noise, and the fake model learns its velocity (pyramid FM loss);
3. student update: z is re-noised at tau ~ U(min_ratio, max_ratio) (DMD2's 2 %..98 %); the teacher
   (CFG at its sampling guidance) and the fake model predict the clean latent there (no grad), and the
   DMD gradient

       g = (z_fake - z_real) / mean(|z - z_real|)        (per sample; nan_to_num)

   is pushed into z by 0.5 * MSE(z, sg(z - g)); plus w_teacher * Cauchy(end_student, end_teacher):
   log(1 + (e / c)^2) averaged over elements, between the end of the stage the student's step implies
   (x_k - sigma_k v) and the teacher's multi-step end of the stage from x_k (its quantised schedule, CFG).

Everything is at the stage's resolution with the history the student generated, so the scores see the
same temporal-pyramid context as the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from neodragon_cli.pipelines.distill.step_distill import (
    FAKE,
    STUDENT,
    TEACHER,
    DistillContext,
    condition,
    draw_place,
    guided_velocity,
    make_student,
    model_clean,
    noise_source,
    repeat_rows,
    student_rollout,
    teacher_endpoint,
)
from neodragon_cli.pipelines.flow.sampler import mmdit_denoiser
from neodragon_cli.pipelines.train.trainer import MultiModelTrainer, Phase


def dmd_gradient(generated: torch.Tensor, real_clean: torch.Tensor, fake_clean: torch.Tensor) -> torch.Tensor:
    """(fake_clean - real_clean) / mean|generated - real_clean|, the mean per sample (DMD's weight; floored
    at 1e-8, where a sample equal to the real prediction would divide by 0)."""
    dims = tuple(range(1, generated.dim()))
    weight = 1.0 / (generated - real_clean).abs().mean(dim=dims, keepdim=True).clamp(min=1e-8)
    return torch.nan_to_num((fake_clean - real_clean) * weight)


def dmd_loss(generated: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """0.5 * MSE(generated, sg(generated - gradient)): its gradient in `generated` is gradient / numel."""
    return 0.5 * F.mse_loss(generated.float(), (generated - gradient).detach().float())


def cauchy_loss(prediction: torch.Tensor, target: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Mean over elements of log(1 + ((prediction - target) / scale)^2)."""
    return torch.log1p(((prediction.float() - target.float()) / scale) ** 2).mean()


def _uniform(generator: torch.Generator, rows: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand((rows,), generator=generator, device=generator.device)


def _negative(ctx: DistillContext, models, rows: int):
    return repeat_rows(condition(models, [ctx.negative_prompt]), rows) if ctx.needs_cfg() else None


def fake_loss(ctx: DistillContext):
    """The fake score model's pyramid flow-matching loss on the student's clean predictions."""
    sched = ctx.scheduler

    def loss_fn(models, batch: dict, generator: torch.Generator):
        text = condition(models, batch["captions"])
        place, noise = draw_place(ctx, batch), noise_source(generator)
        point = student_rollout(ctx, models[STUDENT], text, place, noise)
        stage = point.stage
        with torch.no_grad():
            clean = model_clean(models[STUDENT], point.clips, text, point.timestep, stage, point.ratio, sched)
        ratio, t = sched.training_point(_uniform(generator, len(text)), stage)
        x, target = sched.stage_point(clean, noise.randn(tuple(clean.shape), kind="noise").to(clean.device), stage, ratio)
        velocity = mmdit_denoiser(models[FAKE])(point.at(x), text, t)
        loss = (velocity - target).pow(2).flatten(1).mean(1).mean()
        return loss, {}  # metric names must not depend on the drawn stage: every rank logs the same keys

    return loss_fn


def student_loss(ctx: DistillContext):
    """The student's DMD loss plus the weighted Cauchy teacher loss (module docstring)."""
    sched, settings = ctx.scheduler, ctx.recipe.dmd

    def loss_fn(models, batch: dict, generator: torch.Generator):
        text = condition(models, batch["captions"])
        negative = _negative(ctx, models, len(text))
        place, noise = draw_place(ctx, batch), noise_source(generator)
        point = student_rollout(ctx, models[STUDENT], text, place, noise)
        stage, scale = point.stage, ctx.teacher_scale(point.unit)
        clean = model_clean(models[STUDENT], point.clips, text, point.timestep, stage, point.ratio, sched)
        ratio, t = sched.training_point(_uniform(generator, len(text), settings.min_ratio, settings.max_ratio), stage)
        with torch.no_grad():
            x, _ = sched.stage_point(clean.detach(), noise.randn(tuple(clean.shape), kind="noise").to(clean.device), stage, ratio)
            real = sched.clean_from_velocity(x, guided_velocity(models[TEACHER], point.at(x), text, negative, t, scale), stage, ratio)
            fake = sched.clean_from_velocity(x, mmdit_denoiser(models[FAKE])(point.at(x), text, t), stage, ratio)
            gradient = dmd_gradient(clean.detach(), real, fake)
        loss_dm = dmd_loss(clean, gradient)
        metrics = {"dm": loss_dm.detach(), "grad_abs": gradient.abs().mean()}
        loss = loss_dm
        if settings.w_teacher > 0:
            target = teacher_endpoint(ctx, models[TEACHER], point, text, negative, to_stage_end=True)
            x_k = point.latents.float()
            end = x_k - point.ratio * sched.velocity_from_clean(x_k, clean, stage, point.ratio)
            loss_teacher = cauchy_loss(end, target, settings.cauchy_scale)
            loss = loss + settings.w_teacher * loss_teacher
            metrics["teacher_cauchy"] = loss_teacher.detach()
        return loss, metrics

    return loss_fn


def dmd_trainer(ctx: DistillContext, models: dict, data, out_dir, resume: bool, init) -> MultiModelTrainer:
    """Phases: `dmd.fake_updates` fake-score updates, then one student update, per step."""
    r = ctx.recipe
    models = {**models, FAKE: make_student(init, "velocity")}
    phases = [Phase("fake", fake_loss(ctx), (FAKE,), repeats=r.dmd.fake_updates), Phase("student", student_loss(ctx), (STUDENT,))]
    return MultiModelTrainer(models, {STUDENT: r.train, FAKE: r.critic}, phases, data, r.train, out_dir, resume=resume)
