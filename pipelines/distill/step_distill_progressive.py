"""`step-distill` methods `progressive` and `adversarial` (Neodragon §3.4, after progressive distillation
and LADD), on teacher-generated latents.

`progressive`: at a uniformly drawn (latent frame u, stage s, student step k) of a teacher-generated
video, the frame's clean latent is taken along the stage's path to the student's local level sigma_k
with fresh noise (earlier frames: the temporal-pyramid history). The teacher, quantised to
`teacher.steps` Euler steps per stage (CFG at its sampling guidance), solves without grad from there
over the teacher steps that student step k spans (`teacher_endpoint`), landing on x_T at sigma_{k+1};
the student's one step must land there too: the loss is MSE(v_student, (x_T - x_k) / (sigma_{k+1} -
sigma_k)), the velocity of that one step.

`adversarial`: w_recon * that loss + w_adv * a hinge GAN. The discriminator is a 4-layer MLP head
(`FeatureHead`) on the frozen teacher's visual tokens (block `adversarial.feature_block`) of the
current frame, re-noised along the stage's path at tau ~ U(0, 1): real = the teacher-generated clean
latent of the stage, fake = the student's clean prediction at x_k. Head update: relu(1 - D(real)) +
relu(1 + D(fake)); the student's adversarial term -D(fake) backpropagates through the frozen teacher.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from neodragon_cli.pipelines.distill.block_importance import block_calls
from neodragon_cli.pipelines.distill.step_distill import (
    HEAD,
    STUDENT,
    TEACHER,
    DistillContext,
    TrainingPoint,
    condition,
    data_point,
    draw_place,
    model_clean,
    model_velocity,
    noise_source,
    repeat_rows,
    teacher_endpoint,
)
from neodragon_cli.pipelines.flow.sampler import mmdit_denoiser
from neodragon_cli.pipelines.flow.scheduler import latent_pyramid
from neodragon_cli.pipelines.train.trainer import MultiModelTrainer, Phase
from torch import nn


def progressive_target(ctx: DistillContext, teacher, point: TrainingPoint, text, negative) -> torch.Tensor:
    """The velocity of the one Euler step from sigma_k that lands on the teacher's endpoint."""
    sigmas = ctx.scheduler.sigmas(ctx.schedule[point.stage], point.stage)
    end = teacher_endpoint(ctx, teacher, point, text, negative)
    return (end - point.latents.float()) / float(sigmas[point.step + 1] - sigmas[point.step])


def _setup(ctx: DistillContext, models, batch: dict, generator: torch.Generator):
    text = condition(models, batch["captions"])
    negative = repeat_rows(condition(models, [ctx.negative_prompt]), len(text)) if ctx.needs_cfg() else None
    noise = noise_source(generator)
    point = data_point(ctx, batch["latents"], draw_place(ctx, batch), noise)
    return text, negative, noise, point


def progressive_term(ctx: DistillContext, models, point: TrainingPoint, text, negative) -> torch.Tensor:
    target = progressive_target(ctx, models[TEACHER], point, text, negative)
    velocity = model_velocity(models[STUDENT], point.clips, text, point.timestep, point.stage, point.ratio, ctx.scheduler)
    return (velocity - target).pow(2).flatten(1).mean(1).mean()


def progressive_loss(ctx: DistillContext):
    def loss_fn(models, batch: dict, generator: torch.Generator):
        text, negative, _, point = _setup(ctx, models, batch, generator)
        loss = progressive_term(ctx, models, point, text, negative)
        return loss, {}  # metric names must not depend on the drawn stage: every rank logs the same keys

    return loss_fn


# ---------------------------------------------------------------------------------------------- adversarial


class FeatureHead(nn.Module):
    """Discriminator head: a 4-layer MLP on token features [b, N, D] -> one logit per sample (the
    mean of the per-token logits)."""

    def __init__(self, dim: int, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens.float()).mean(dim=(1, 2))


class _Enough(Exception):
    pass


@contextmanager
def _stop_after(model, block: int, keep: list):
    """Record block `block`'s visual-token output into `keep` and skip the blocks after it."""
    def on_call(k, args, out):
        if k == block:
            keep.append(out[0])
            raise _Enough

    with block_calls(model, on_call):
        try:
            yield
        except _Enough:
            pass


def teacher_features(ctx: DistillContext, teacher, point: TrainingPoint, clean: torch.Tensor, text,
                     generator: torch.Generator, noise) -> torch.Tensor:
    """The frozen teacher's visual tokens [b, n, D] of the current frame at block `feature_block`,
    with `clean` (the stage's clean latent) re-noised along the stage's path at tau ~ U(0, 1); the
    gradient reaches `clean` (the teacher's weights need none)."""
    sched, stage = ctx.scheduler, point.stage
    u = torch.rand((clean.shape[0],), generator=generator, device=generator.device)
    ratio, t = sched.training_point(u, stage)
    x, _ = sched.stage_point(clean, noise.randn(tuple(clean.shape), kind="noise").to(clean.device), stage, ratio)
    blocks = len(teacher.transformer_blocks)
    block = ctx.recipe.adversarial.feature_block % blocks if ctx.recipe.adversarial.feature_block >= 0 else blocks // 2
    keep: list = []
    with _stop_after(teacher, block, keep):
        mmdit_denoiser(teacher)(point.at(x), text, t)
    h, w = clean.shape[-2:]
    p = teacher.patch_size
    return keep[0][:, -(h // p) * (w // p):]


def _real_clean(ctx: DistillContext, batch: dict, point: TrainingPoint) -> torch.Tensor:
    pyramid = latent_pyramid(batch["latents"][:, :, : point.unit + 1].float(), ctx.scheduler.num_stages)
    return pyramid[point.stage][:, :, point.unit : point.unit + 1]


def head_loss(ctx: DistillContext):
    def loss_fn(models, batch: dict, generator: torch.Generator):
        text, _, noise, point = _setup(ctx, models, batch, generator)
        with torch.no_grad():
            fake = model_clean(models[STUDENT], point.clips, text, point.timestep, point.stage, point.ratio, ctx.scheduler)
            fake_tokens = teacher_features(ctx, models[TEACHER], point, fake, text, generator, noise)
            real_tokens = teacher_features(ctx, models[TEACHER], point, _real_clean(ctx, batch, point), text, generator, noise)
        real_logit, fake_logit = models[HEAD](real_tokens), models[HEAD](fake_tokens)
        loss = torch.relu(1 - real_logit).mean() + torch.relu(1 + fake_logit).mean()
        return loss, {"d_real": real_logit.mean().detach(), "d_fake": fake_logit.mean().detach()}

    return loss_fn


def adversarial_student_loss(ctx: DistillContext):
    a = ctx.recipe.adversarial

    def loss_fn(models, batch: dict, generator: torch.Generator):
        text, negative, noise, point = _setup(ctx, models, batch, generator)
        recon = progressive_term(ctx, models, point, text, negative)
        clean = model_clean(models[STUDENT], point.clips, text, point.timestep, point.stage, point.ratio, ctx.scheduler)
        adversarial = -models[HEAD](teacher_features(ctx, models[TEACHER], point, clean, text, generator, noise)).mean()
        loss = a.w_recon * recon + a.w_adv * adversarial
        return loss, {"recon": recon.detach(), "adversarial": adversarial.detach()}

    return loss_fn


def progressive_trainer(ctx: DistillContext, models: dict, data, out_dir, resume: bool, init) -> MultiModelTrainer:
    """progressive: one phase (the student); adversarial: the head's update, then the student's."""
    r = ctx.recipe
    if r.method == "progressive":
        phases = [Phase("student", progressive_loss(ctx), (STUDENT,))]
        return MultiModelTrainer(models, {STUDENT: r.train}, phases, data, r.train, out_dir, resume=resume)
    head = FeatureHead(init.inner_dim, r.adversarial.head_width)
    phases = [Phase("head", head_loss(ctx), (HEAD,)), Phase("student", adversarial_student_loss(ctx), (STUDENT,))]
    return MultiModelTrainer({**models, HEAD: head}, {STUDENT: r.train, HEAD: r.critic}, phases, data, r.train,
                             out_dir, resume=resume)
