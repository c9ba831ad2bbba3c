"""`step-distill`: step distillation of the pyramidal MMDiT to a few-step schedule (Neodragon §3.4).

The parent pipeline's MMDiT (the teacher, frozen, sampled with its classifier-free guidance) is
distilled into a student that runs the target schedule (`4-4-4`, `1-1-1`, any `a-b-c` Euler steps per
pyramid stage) without CFG. Every method works inside the pyramid as the sampler runs it
(`pipelines/flow/sampler.py`): local noise levels per stage, velocities start - end of the stage
(the Euler step scales them by the local sigma interval), stage jumps with the block-noise renoising,
and the temporal-pyramid history of the frames already generated.

Methods (their losses live in `step_distill_dmd.py` and `step_distill_progressive.py`):

* `dmd` (default): prompts only. The student generates (no grad) with the target schedule up to a
  random (latent frame, stage, step) - its own earlier frames are the history, as at inference - and
  predicts the stage's clean latent there. A fake score model (initialised from the teacher) learns
  the distribution of those predictions with the pyramid flow-matching loss (tau_local ~ U(0, 1)); the
  student's update follows the DMD gradient (fake - teacher-with-CFG clean predictions at a re-noised
  point, per-sample 1/mean|...| weight) plus a Cauchy loss to the teacher's own multi-step end of the
  stage (weight 0.5). Two fake updates per student update (trainer phases).
* `progressive`: teacher-generated latents (a built-in synthetic-data step, cached). The teacher's
  schedule is quantised to `teacher.steps` Euler steps per stage; the student's step k of a stage
  spans a whole number of them and learns their no-grad endpoint.
* `adversarial`: `progressive` plus a hinge GAN whose discriminator is a 4-layer MLP head on frozen
  teacher features of re-noised clean latents (teacher-generated = real, student = fake).
* `mean-flows` (`step_distill_meanflows.py`): the student gets a second timestep embedding, of the
  step length (zero-initialised), and learns the average velocity u(x, r, t) of the teacher's guided
  flow over [r, t] of a stage with the Mean-Flows JVP target; 25 % of the samples have r != t.

The student is the teacher's weights. With `student.prediction: velocity` (default) its output is
read as the clean latent through the exact inverse of `velocity_from_clean`
(`PyramidFlowScheduler.clean_from_velocity`), so training starts from the teacher itself and the saved
MMDiT samples with the plain Euler sampler; `clean` makes it an MMDiT with `prediction: clean` (the
output head then has to re-learn its meaning).

The artifact is the parent pipeline with the `mmdit` role swapped for the student and the recorded
sampling defaults set to the target schedule without CFG (both for a generated latent 0 and later
frames), so `neodragon generate --model OUT` runs it, in monolithic or hybrid mode.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from neodragon_cli.pipelines.data.shapes import prompt_corpus
from neodragon_cli.pipelines.distill.prompts import (
    PromptMixture,
    PromptSource,
    read_prompts,
)
from neodragon_cli.pipelines.distill.prune import Conditioner
from neodragon_cli.pipelines.distill.teacher_cache import stored_shard
from neodragon_cli.pipelines.flow.pipeline import PIPELINE_FILE, VideoPipeline
from neodragon_cli.pipelines.flow.sampler import (
    NoiseSource,
    PyramidSampler,
    SeededNoise,
    TextConditioning,
    corrupt_history,
    history_clips,
    mmdit_denoiser,
    prediction_type,
)
from neodragon_cli.pipelines.flow.scheduler import (
    PyramidFlowScheduler,
    latent_pyramid,
    parse_steps,
)
from neodragon_cli.pipelines.flow.settings import GenerationSettings, SamplingConfig
from neodragon_cli.pipelines.models.mmdit import PyramidFlowMMDiT
from neodragon_cli.pipelines.train import (
    TrainingOutcome,
    copy_metrics,
    distributed,
    training_command,
)
from neodragon_cli.pipelines.train.trainer import (
    OptimizerConfig,
    TrainerConfig,
    derive_seed,
    latest_checkpoint,
)

from neodragon_cli.artifacts import ArtifactWriter, applied_operations, resolve_model
from neodragon_cli.console import console
from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.recipes import setting

METHODS = ("dmd", "progressive", "adversarial", "mean-flows")
DATA_METHODS = ("progressive", "adversarial", "mean-flows")  # they learn from teacher-generated latents
GRID_METHODS = ("progressive", "adversarial")  # their targets are solves on the teacher's quantised grid

# model names in the trainer
STUDENT, FAKE, TEACHER, TEXT, HEAD = "student", "fake", "teacher", "text", "head"


# ---------------------------------------------------------------------------------------------- recipe


@dataclass
class StudentSection:
    prediction: Literal["velocity", "clean"] = setting("velocity", "velocity: the teacher's weights, output read as the clean latent through the exact inverse (starts as the teacher); clean: an MMDiT with prediction clean")


@dataclass
class TeacherSection:
    guidance: float | None = setting(None, "CFG scale of the teacher for latent 0 (null: the parent's recorded sampling guidance; 0: no CFG)")
    video_guidance: float | None = setting(None, "CFG scale of the teacher for later latent frames (null: the parent's)")
    steps: int = setting(16, "Euler steps per stage of the teacher's quantised schedule (progressive targets, DMD teacher loss)")
    dtype: Literal["fp32", "bf16"] = setting("fp32", "teacher weights (bf16 halves its memory; it runs without gradients to its weights)")


@dataclass
class RolloutSection:
    frames: int = setting(0, "video frames the student is trained on, 1 + 8k (0: the parent's recorded frames)")
    history_noise: float | None = setting(None, "history noise c of the student's sampling (null: the parent's; recorded in the output)")


@dataclass
class DMDSection:
    fake_updates: int = setting(2, "fake-score updates per student update (two-time-scale rule)")
    w_teacher: float = setting(0.5, "weight of the Cauchy loss to the teacher's multi-step end of the stage (0: off)")
    cauchy_scale: float = setting(1.0, "scale c of the Cauchy loss log(1 + (e / c)^2)")
    min_ratio: float = setting(0.02, "lowest local noise level of the DMD re-noising")
    max_ratio: float = setting(0.98, "highest local noise level of the DMD re-noising")


@dataclass
class AdversarialSection:
    w_recon: float = setting(10.0, "weight of the progressive (teacher-endpoint) loss")
    w_adv: float = setting(1.0, "weight of the generator's hinge loss -D(fake)")
    feature_block: int = setting(-1, "teacher block whose visual tokens the head reads (-1: the middle block)")
    head_width: int = setting(256, "hidden width of the 4-layer MLP head")


@dataclass
class MeanFlowsSection:
    fraction: float = setting(0.25, "share of samples with r != t (r: the end of the drawn student step, t ~ U over that step); the rest r = t (flow matching on the teacher's guided velocity)")
    adaptive_p: float = setting(1.0, "per-sample loss weight 1 / sg(err + adaptive_eps)^p (0: plain MSE)")
    adaptive_eps: float = setting(0.01, "eps of the adaptive loss weight")


@dataclass
class DataSection:
    prompts: str = setting("", "prompt file (one per line, or .jsonl/.csv/.parquet); empty: Shapes training captions")
    shapes_prompts: int = setting(2000, "Shapes training-split captions used when no prompt file is given")
    seed: int = setting(0, "seed of the caption list")
    synthetic_videos: int = setting(256, "teacher-generated videos for progressive/adversarial/mean-flows (cached in data.synthetic_dir)")
    synthetic_batch: int = setting(4, "videos generated per teacher batch")
    synthetic_dir: str = setting("", "folder of the teacher-video cache (empty: OUT.work/synthetic); runs of several methods can share one, each shard is checked against the teacher and settings")


@dataclass
class StepDistillRecipe:
    """Step distillation of the parent's MMDiT to the target schedule, without CFG."""

    parent: str = setting("shapes-teacher", "the pipeline to distil: a folder with pipeline.json, or an embedded model's name")
    method: str = setting("dmd", "dmd | progressive | adversarial | mean-flows")
    schedule: str = setting("4-4-4", "target Euler steps per pyramid stage (a-b-c, or N for N-N-N)")
    student: StudentSection = field(default_factory=StudentSection, metadata={"doc": "the distilled MMDiT"})
    teacher: TeacherSection = field(default_factory=TeacherSection, metadata={"doc": "the frozen parent MMDiT"})
    rollout: RolloutSection = field(default_factory=RolloutSection, metadata={"doc": "what the student generates in training"})
    dmd: DMDSection = field(default_factory=DMDSection, metadata={"doc": "method dmd"})
    adversarial: AdversarialSection = field(default_factory=AdversarialSection, metadata={"doc": "method adversarial"})
    mean_flows: MeanFlowsSection = field(default_factory=MeanFlowsSection, metadata={"doc": "method mean-flows"})
    data: DataSection = field(default_factory=DataSection, metadata={"doc": "prompts and teacher-generated latents"})
    train: TrainerConfig = field(default_factory=TrainerConfig, metadata={"doc": "the run and the student's optimizer (max_steps: student updates)"})
    critic: OptimizerConfig = field(default_factory=OptimizerConfig, metadata={"doc": "optimizer of the fake score model (dmd) or the discriminator head (adversarial)"})

    def validate(self) -> list[str]:
        problems = []
        if self.method not in METHODS:
            problems.append(f"unknown method '{self.method}' (known: {', '.join(METHODS)})")
        try:
            steps = parse_steps(self.schedule)
        except ValueError as exc:
            return problems + [f"schedule: {exc}"]
        if self.teacher.steps < 1:
            problems.append(f"teacher.steps must be at least 1, got {self.teacher.steps}")
        elif self.method in GRID_METHODS or (self.method == "dmd" and self.dmd.w_teacher > 0):
            bad = [n for n in steps if not spans_teacher_grid(n, self.teacher.steps)]
            if bad:
                problems.append(
                    f"schedule {self.schedule}: {bad[0]} steps per stage do not divide the teacher's {self.teacher.steps}"
                    f" (each student step must span whole teacher steps: {self.teacher.steps - 1} teacher intervals"
                    f" over {bad[0] - 1}; e.g. 1, 2, 4, 6 or 16 with 16)"
                )
        if self.dmd.fake_updates < 1:
            problems.append(f"dmd.fake_updates must be at least 1, got {self.dmd.fake_updates}")
        if not 0 <= self.dmd.min_ratio < self.dmd.max_ratio <= 1:
            problems.append("dmd.min_ratio and dmd.max_ratio must satisfy 0 <= min < max <= 1")
        if min(self.dmd.w_teacher, self.adversarial.w_recon, self.adversarial.w_adv) < 0 or self.dmd.cauchy_scale <= 0:
            problems.append("loss weights must be >= 0 and dmd.cauchy_scale > 0")
        if self.rollout.frames and (self.rollout.frames < 1 or (self.rollout.frames - 1) % 8):
            problems.append(f"rollout.frames must be 0 or 1 + 8k, got {self.rollout.frames}")
        if self.rollout.history_noise is not None and not 0 <= self.rollout.history_noise < 1:
            problems.append(f"rollout.history_noise must be in [0, 1), got {self.rollout.history_noise}")
        m = self.mean_flows
        if not 0 <= m.fraction <= 1 or m.adaptive_p < 0 or m.adaptive_eps <= 0:
            problems.append("mean_flows.fraction must be in [0, 1], adaptive_p >= 0 and adaptive_eps > 0")
        if self.method == "mean-flows" and self.student.prediction != "velocity":
            problems.append("method mean-flows learns an average velocity: student.prediction must be velocity")
        if self.data.synthetic_videos < 1 or self.data.synthetic_batch < 1:
            problems.append("data.synthetic_videos and data.synthetic_batch must be at least 1")
        return problems


def spans_teacher_grid(student_steps: int, teacher_steps: int) -> bool:
    """Whether every point of the sampler's `student_steps` schedule of a stage (local sigmas
    linspace(1, 0.001, N), then 0) is a point of the `teacher_steps` one, so that a student step spans
    whole teacher steps: N = 1, or (M - 1) divisible by (N - 1)."""
    return student_steps == 1 or (student_steps <= teacher_steps and (teacher_steps - 1) % (student_steps - 1) == 0)


def teacher_span(student_steps: int, teacher_steps: int, step: int) -> tuple[int, int]:
    """Teacher grid steps [first, end) that student step `step` of a stage spans (see `spans_teacher_grid`).
    The sampler's last step of a stage (0.001 -> 0) is the teacher's last one."""
    if student_steps == 1:
        return 0, teacher_steps
    per = (teacher_steps - 1) // (student_steps - 1)
    return step * per, (step + 1) * per if step < student_steps - 1 else teacher_steps


# ---------------------------------------------------------------------------------------------- parent and CFG


def cfg_capability(folder: Path, spec: dict) -> str | None:
    """Why the parent's MMDiT has no classifier-free guidance to offer (None: it has). A model can
    only be guided if it learnt an unconditional (empty-prompt) prediction: refused when its chain
    went through step-distill (students learn the guided teacher without prompt dropout), when it
    was trained by train-t2v with flow.text_dropout 0, or when its pipeline records sampling without
    CFG (guidance and video_guidance 0: the producer says it is sampled unguided, e.g. Neodragon's
    hybrid 1-1-1 MMDiT)."""
    operations = applied_operations(folder)
    if "step-distill" in operations:
        return "it is step-distilled (trained without prompt dropout, it has no unconditional prediction)"
    recipe = folder / "recipe.yaml"
    if recipe.is_file():
        try:
            data = yaml.safe_load(recipe.read_text()) or {}
        except yaml.YAMLError:
            data = {}
        if isinstance(data, dict) and data.get("command") == "train-t2v":
            dropout = (data.get("flow") or {}).get("text_dropout", 0.1)
            if not dropout:
                return "it was trained with flow.text_dropout 0 (no unconditional prediction)"
    sampling = spec.get("sampling", {})
    if sampling.get("guidance") == 0 and sampling.get("video_guidance") == 0:
        return "its pipeline records sampling without CFG (guidance 0)"
    return None


@dataclass
class Parent:
    """The pipeline being distilled, loaded once: its folder and spec, components and sampling."""

    folder: Path
    spec: dict
    pipeline: VideoPipeline
    settings: GenerationSettings  # the parent's recorded sampling defaults, resolved

    @property
    def teacher(self) -> PyramidFlowMMDiT:
        return self.pipeline.mmdit


def load_parent(name: str) -> Parent:
    folder = resolve_model(name)
    if not (folder / PIPELINE_FILE).is_file():
        raise UsageError(f"{folder} has no {PIPELINE_FILE}", hint="step-distill reads a neodragon pipeline folder (train-t2v, convert or distill outputs)")
    spec = json.loads((folder / PIPELINE_FILE).read_text())
    try:
        pipeline = VideoPipeline.from_pretrained(folder, safety_checker=False)
    except CheckpointError as exc:
        raise UsageError(f"cannot load the parent {folder}: {exc.message}") from None
    if not isinstance(pipeline.mmdit, PyramidFlowMMDiT):
        raise UsageError(f"{folder}: the mmdit role is not a pyramidal MMDiT")
    if pipeline.mmdit.interval_conditioning:
        raise UsageError(f"{folder}: its MMDiT is a Mean-Flows student (average velocities over its steps), not a teacher",
                         hint="distil the pipeline it was distilled from")
    return Parent(folder, spec, pipeline, pipeline.settings())


# ---------------------------------------------------------------------------------------------- context


@dataclass
class DistillContext:
    """Everything the losses need besides the models: the schedules, guidance, geometry."""

    recipe: StepDistillRecipe
    scheduler: PyramidFlowScheduler
    schedule: tuple[int, ...]  # student Euler steps per stage
    teacher_steps: int
    guidance: tuple[float, float]  # teacher CFG for latent 0 and later frames
    history_noise: float
    num_units: int  # latent frames
    latent_channels: int
    latent_size: tuple[int, int]
    negative_prompt: str

    def student_config(self) -> SamplingConfig:
        return SamplingConfig(first_steps=self.schedule, video_steps=self.schedule, guidance=0.0, video_guidance=0.0,
                              history_noise=self.history_noise)

    def teacher_scale(self, unit: int) -> float:
        return self.guidance[0] if unit == 0 else self.guidance[1]

    def needs_cfg(self) -> bool:
        return max(self.guidance) > 0


def make_context(recipe: StepDistillRecipe, parent: Parent) -> DistillContext:
    s = parent.settings
    guidance = (s.guidance if recipe.teacher.guidance is None else recipe.teacher.guidance,
                s.video_guidance if recipe.teacher.video_guidance is None else recipe.teacher.video_guidance)
    if max(guidance) > 0:
        missing = cfg_capability(parent.folder, parent.spec)
        if missing:
            raise UsageError(f"the teacher {parent.folder.name} cannot be sampled with CFG: {missing}",
                             hint="set teacher.guidance=0 teacher.video_guidance=0, or distil a teacher trained with prompt dropout")
    frames = recipe.rollout.frames or s.frames
    vae = parent.pipeline.vae
    scale = vae.spatial_compression
    return DistillContext(
        recipe=recipe, scheduler=PyramidFlowScheduler(), schedule=parse_steps(recipe.schedule),
        teacher_steps=recipe.teacher.steps, guidance=(float(guidance[0]), float(guidance[1])),
        history_noise=s.history_noise if recipe.rollout.history_noise is None else recipe.rollout.history_noise,
        num_units=vae.latent_frames(frames), latent_channels=parent.teacher.out_channels,
        latent_size=(s.height // scale, s.width // scale), negative_prompt=s.negative_prompt or "",
    )


# ---------------------------------------------------------------------------------------------- model calls


def condition(models, prompts: list[str]) -> TextConditioning:
    """The parent's frozen text path on `prompts` (float32, no grad)."""
    with torch.no_grad():
        embeds, mask, pooled = models[TEXT](prompts)
    return TextConditioning(embeds.float(), mask, pooled.float())


def repeat_rows(text: TextConditioning, rows: int) -> TextConditioning:
    """A one-row conditioning (the negative prompt) for `rows` samples."""
    return TextConditioning(text.embeds.expand(rows, -1, -1), text.mask.expand(rows, -1), text.pooled.expand(rows, -1))


def guided_velocity(model, clips: list[torch.Tensor], text: TextConditioning, negative: TextConditioning | None,
                    t: torch.Tensor, scale: float) -> torch.Tensor:
    """The velocity of a velocity MMDiT, with CFG v_neg + g (v_pos - v_neg) when `scale` > 0
    ([negative, positive] batch, history duplicated, as the sampler does)."""
    denoise = mmdit_denoiser(model)
    if scale <= 0:
        return denoise(clips, text, t)
    both = denoise([torch.cat([c, c]) for c in clips], TextConditioning.cat([negative, text]), torch.cat([t, t]))
    uncond, positive = both.chunk(2)
    return uncond + scale * (positive - uncond)


def model_velocity(model, clips, text, t, stage: int, ratio, scheduler: PyramidFlowScheduler) -> torch.Tensor:
    """The velocity of a velocity or clean MMDiT at the current clip `clips[-1]` (float32)."""
    out = mmdit_denoiser(model)(clips, text, t)
    if prediction_type(model) == "clean":
        return scheduler.velocity_from_clean(clips[-1].float(), out, stage, ratio)
    return out


def model_clean(model, clips, text, t, stage: int, ratio, scheduler: PyramidFlowScheduler) -> torch.Tensor:
    """The stage's clean latent a velocity or clean MMDiT predicts at `clips[-1]` (float32)."""
    out = mmdit_denoiser(model)(clips, text, t)
    if prediction_type(model) == "clean":
        return out
    return scheduler.clean_from_velocity(clips[-1].float(), out, stage, ratio)


# ---------------------------------------------------------------------------------------------- training points


@dataclass
class TrainingPoint:
    """Where in the pyramid a student step is trained: latent frame `unit`, `stage`, Euler `step` of
    the target schedule; `clips` = the history (oldest first) + the current noisy clip, as the MMDiT
    takes them; `timestep` [B] as fed to the MMDiT; `ratio` the local noise level."""

    unit: int
    stage: int
    step: int
    clips: list[torch.Tensor]
    timestep: torch.Tensor
    ratio: float

    @property
    def history(self) -> list[torch.Tensor]:
        return self.clips[:-1]

    @property
    def latents(self) -> torch.Tensor:
        return self.clips[-1]

    def at(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """The clips with another current clip."""
        return self.history + [latents]


def draw_place(ctx: DistillContext, batch: dict) -> tuple[int, int, int]:
    """A uniform (latent frame, stage, step of the target schedule) to train at, one per optimizer update
    (`batch["draw"]`, the update's global batch): every rank and micro-batch of the update trains at the
    same place, so they run the same MMDiT calls (FSDP gathers shards in lockstep; Self-Forcing likewise
    shares its exit step)."""
    generator = torch.Generator().manual_seed(derive_seed(ctx.recipe.train.seed, int(batch["draw"]), 7))
    unit = int(torch.randint(0, ctx.num_units, (1,), generator=generator))
    stage = int(torch.randint(0, ctx.scheduler.num_stages, (1,), generator=generator))
    step = int(torch.randint(0, ctx.schedule[stage], (1,), generator=generator))
    return unit, stage, step


def noise_source(generator: torch.Generator) -> SeededNoise:
    return SeededNoise(int(torch.randint(0, 2**62, (1,), generator=generator)))


class _Reached(Exception):
    pass


def student_rollout(ctx: DistillContext, student, text: TextConditioning, place: tuple[int, int, int],
                    noise: NoiseSource) -> TrainingPoint:
    """Run the student's own sampler (target schedule, no CFG, no grad) from fresh noise until the
    MMDiT call of `place` = (unit, stage, step), and return that call's inputs: the frames it made
    before are the history, the stage jumps and Euler steps before it are the sampler's."""
    unit, stage, step = place
    calls_before = unit * sum(ctx.schedule) + sum(ctx.schedule[:stage]) + step
    denoise = mmdit_denoiser(student)
    captured: dict = {}
    calls = [0]

    def denoiser(clips, cond, t):
        if calls[0] == calls_before:
            captured.update(clips=[c.detach() for c in clips], t=t)
            raise _Reached
        calls[0] += 1
        with torch.no_grad():
            return denoise(clips, cond, t)

    sampler = PyramidSampler(denoiser, ctx.scheduler, prediction=prediction_type(student))
    device = text.embeds.device
    try:
        for _ in sampler.latent_frames(text, num_frames=unit + 1, latent_channels=ctx.latent_channels,
                                       latent_size=ctx.latent_size, config=ctx.student_config(), noise=noise,
                                       device=device):
            pass
    except _Reached:
        pass
    if not captured:
        raise RuntimeError(f"the rollout never reached {place}")  # a bug, not a user error
    ratio = float(ctx.scheduler.sigmas(ctx.schedule[stage], stage)[step])
    return TrainingPoint(unit, stage, step, captured["clips"], captured["t"].float(), ratio)


def data_point(ctx: DistillContext, latents: torch.Tensor, place: tuple[int, int, int], noise: NoiseSource,
               ratio: torch.Tensor | None = None) -> TrainingPoint:
    """The training point `place` of clean videos `latents` [B, C, T, H, W] (teacher-generated): the
    frame's stage-resolution clean latent taken along the stage's path to the student's local noise
    level with fresh noise, the earlier frames as the temporal-pyramid history (with the sampling's
    history noise, as the student will see its own frames). `ratio` [B]: per-sample local noise levels
    instead (any in [0, 1]; their timesteps by `PyramidFlowScheduler.timestep_at`)."""
    unit, stage, step = place
    sched = ctx.scheduler
    pyramid = latent_pyramid(latents[:, :, : unit + 1].float(), sched.num_stages)
    clean = pyramid[stage][:, :, unit : unit + 1]
    history = history_clips(pyramid, stage, unit) if unit > 0 else []
    if ctx.history_noise > 0:
        history = [corrupt_history(h, ctx.history_noise, noise) for h in history]
    if ratio is None:
        ratio = float(sched.sigmas(ctx.schedule[stage], stage)[step])
        t = torch.full((latents.shape[0],), float(sched.timesteps(ctx.schedule[stage], stage)[step]), dtype=torch.float32,
                       device=latents.device)
    else:
        t = sched.timestep_at(stage, ratio.double()).float().to(latents.device)
    x, _ = sched.stage_point(clean, noise.randn(tuple(clean.shape), kind="noise").to(clean.device), stage, ratio)
    return TrainingPoint(unit, stage, step, history + [x], t, ratio)


def teacher_endpoint(ctx: DistillContext, teacher, point: TrainingPoint, text: TextConditioning,
                     negative: TextConditioning | None, *, to_stage_end: bool = False) -> torch.Tensor:
    """The teacher's no-grad multi-step solve from the point's clip: the Euler steps of its quantised
    schedule (`teacher.steps` per stage, CFG at its sampling guidance) that student step `point.step`
    spans, or (`to_stage_end`) all of them to the end of the stage. The same grid, timesteps and
    updates as `PyramidSampler` with `teacher.steps` steps per stage."""
    sched = ctx.scheduler
    first, end = teacher_span(ctx.schedule[point.stage], ctx.teacher_steps, point.step)
    if to_stage_end:
        end = ctx.teacher_steps
    sigmas = sched.sigmas(ctx.teacher_steps, point.stage)
    timesteps = sched.timesteps(ctx.teacher_steps, point.stage)
    x = point.latents.float()
    scale = ctx.teacher_scale(point.unit)
    with torch.no_grad():
        for i in range(first, end):
            t = torch.full((x.shape[0],), float(timesteps[i]), dtype=x.dtype, device=x.device)
            v = guided_velocity(teacher, point.at(x), text, negative, t, scale)
            x = sched.step(v, float(sigmas[i]), float(sigmas[i + 1]), x)
    return x


# ---------------------------------------------------------------------------------------------- data


def training_prompts(recipe: StepDistillRecipe) -> list[str]:
    d = recipe.data
    return read_prompts(d.prompts) if d.prompts else prompt_corpus(d.shapes_prompts, d.seed, "train")


def prompt_batches(prompts: list[str], seed: int, batch_size: int):
    """Batches {"captions": [...], "draw": the global batch's index}: stream position p is a pure function
    of (seed, p)."""
    mixture = PromptMixture([PromptSource("prompts", prompts, 1.0)], seed)

    def batch(positions: range) -> dict:
        return {"captions": [mixture.prompts[mixture.position(p)] for p in positions], "draw": positions.start // batch_size}

    return batch


def synthetic_latents(ctx: DistillContext, parent: Parent, teacher, conditioner, prompts: list[str], count: int,
                      batch_size: int, folder: Path) -> tuple[torch.Tensor, list[str]]:
    """`count` latent videos [count, C, T, h, w] the teacher generates at its recorded sampling
    defaults (steps and CFG; monolithic), video i from prompt i mod len(prompts) and seed (data.seed, i),
    cached in `folder` in shards of `batch_size` videos whose metadata records the teacher's
    fingerprint, the settings and the prompts: a matching shard is reused, any other regenerated."""
    from neodragon_cli.pipelines.distill.teacher_cache import teacher_fingerprint

    from neodragon_cli.atomic import save_safetensors
    from neodragon_cli.console import progress

    settings = parent.settings
    config = settings.sampling_config()
    fingerprint = teacher_fingerprint([teacher])
    describe = json.dumps({"sampling": dataclasses.asdict(config), "units": ctx.num_units, "size": ctx.latent_size,
                           "negative": ctx.negative_prompt, "seed": ctx.recipe.data.seed}, sort_keys=True)
    folder.mkdir(parents=True, exist_ok=True)
    chosen = [prompts[i % len(prompts)] for i in range(count)]
    parts = []
    with progress() as bar:
        task = bar.add_task("teacher videos (synthetic data)", total=count)
        for index, start in enumerate(range(0, count, batch_size)):
            batch_prompts = chosen[start:start + batch_size]
            record = {"teacher": fingerprint, "settings": describe, "first": str(start),
                      "prompts": hashlib.sha256("\n".join(batch_prompts).encode()).hexdigest()}
            path = folder / f"shard-{index:05d}.safetensors"
            latents = stored_shard(path, record, "latents", "synthetic-data")
            if latents is None:
                latents = _teacher_videos(ctx, teacher, conditioner, batch_prompts, config, start)
                save_safetensors({"latents": latents}, path, metadata=record)
            parts.append(latents)
            bar.advance(task, len(batch_prompts))
    return torch.cat(parts), chosen


def _teacher_videos(ctx: DistillContext, teacher, conditioner, prompts: list[str], config: SamplingConfig,
                    first: int) -> torch.Tensor:
    """Latents [n, C, T, h, w] of one video per prompt, video i seeded by (data.seed, first + i)."""
    text = condition({TEXT: conditioner}, prompts)
    negative = condition({TEXT: conditioner}, [ctx.negative_prompt]) if max(config.guidance, config.video_guidance) > 0 else None
    denoise = mmdit_denoiser(teacher)

    def denoiser(clips, cond, t):
        with torch.no_grad():
            return denoise(clips, cond, t)

    sampler = PyramidSampler(denoiser, ctx.scheduler, prediction=prediction_type(teacher))
    videos = []
    for i in range(len(prompts)):
        row = TextConditioning(text.embeds[i : i + 1], text.mask[i : i + 1], text.pooled[i : i + 1])
        noise = SeededNoise(derive_seed(ctx.recipe.data.seed, first + i))
        frames = list(sampler.latent_frames(row, num_frames=ctx.num_units, latent_channels=ctx.latent_channels,
                                            latent_size=ctx.latent_size, config=config, noise=noise, negative=negative))
        videos.append(torch.cat(frames, dim=2).float().cpu())
    return torch.cat(videos)


def latent_batches(latents: torch.Tensor, prompts: list[str], seed: int, batch_size: int):
    """Batches {"latents", "captions", "draw"} of the synthetic videos, sample p drawn by (seed, p)."""

    def batch(positions: range) -> dict:
        index = [derive_seed(seed, p) % latents.shape[0] for p in positions]
        return {"latents": latents[index], "captions": [prompts[i] for i in index], "draw": positions.start // batch_size}

    return batch


# ---------------------------------------------------------------------------------------------- models


def make_student(teacher: PyramidFlowMMDiT, prediction: str, interval: bool = False) -> PyramidFlowMMDiT:
    """A trainable float32 copy of the teacher's weights, predicting `prediction`; with `interval` (mean-flows)
    plus the step-length embedding, freshly initialised with a zero output (it starts as the teacher)."""
    student = PyramidFlowMMDiT(**{**teacher.config, "prediction": prediction, "interval_conditioning": interval})
    missing, unexpected = student.load_state_dict({k: v.float() for k, v in teacher.state_dict().items()}, strict=False)
    if unexpected or any(".interval_embedder." not in k for k in missing):
        raise RuntimeError(f"student and teacher weights differ: missing {missing}, unexpected {unexpected}")  # a bug
    return student.train()


def distilled_sampling(ctx: DistillContext) -> dict:
    """The output pipeline's sampling defaults: the target schedule without CFG."""
    steps = list(ctx.schedule)
    return {"first_steps": steps, "video_steps": steps, "guidance": 0.0, "video_guidance": 0.0,
            "history_noise": ctx.history_noise, "linear_guidance": False}


def nfe_per_video(first_steps, video_steps, guidance: float, video_guidance: float, units: int, *, hybrid: bool = False) -> int:
    """MMDiT calls (batch rows) of one video: per latent frame the sum of its stage steps, doubled under CFG."""
    total = 0
    for unit in range(1 if hybrid else 0, units):
        steps, scale = (first_steps, guidance) if unit == 0 else (video_steps, video_guidance)
        total += sum(steps) * (2 if scale > 0 else 1)
    return total


# ---------------------------------------------------------------------------------------------- command


@training_command("step-distill", StepDistillRecipe)
def step_distill(recipe: StepDistillRecipe, out: Path, *, recipe_yaml: str, resume: bool, overwrite: bool) -> TrainingOutcome:
    """Distil in `OUT.work/` (synthetic data, then the run), then (rank 0) write the pipeline `OUT`."""
    parent = load_parent(recipe.parent)
    ctx = make_context(recipe, parent)
    work = out.with_name(out.name + ".work")
    if not resume and latest_checkpoint(work / "run") is not None:
        raise UsageError(f"{work} holds checkpoints of an earlier run", hint="pass --resume to continue it, or delete the folder")
    writer = ArtifactWriter(out, command="step-distill", recipe_yaml=recipe_yaml, parent=parent.folder, overwrite=overwrite)

    teacher = parent.teacher.float()
    conditioner = Conditioner(parent.pipeline.text_encoder, parent.pipeline.context_adapter).requires_grad_(False)
    torch.manual_seed(recipe.train.seed)  # new weights (discriminator head, step-length embedding) follow the recipe's seed
    interval = recipe.method == "mean-flows"
    student = make_student(teacher, recipe.student.prediction, interval)
    prompts = training_prompts(recipe)
    if recipe.method in DATA_METHODS:
        latents, captions = distributed.rank_zero_first(lambda: synthetic_latents(
            ctx, parent, teacher, conditioner, prompts, recipe.data.synthetic_videos, recipe.data.synthetic_batch,
            Path(recipe.data.synthetic_dir) if recipe.data.synthetic_dir else work / "synthetic"))
        data = latent_batches(latents, captions, recipe.train.seed, recipe.train.batch_size)
    else:
        data = prompt_batches(prompts, recipe.train.seed, recipe.train.batch_size)
    if recipe.teacher.dtype == "bf16":
        teacher = copy.deepcopy(teacher).to(torch.bfloat16)
    models = {STUDENT: student, TEACHER: teacher, TEXT: conditioner}

    if recipe.method == "dmd":
        from neodragon_cli.pipelines.distill.step_distill_dmd import (
            dmd_trainer as make_trainer,
        )
    elif recipe.method == "mean-flows":
        from neodragon_cli.pipelines.distill.step_distill_meanflows import (
            mean_flows_trainer as make_trainer,
        )
    else:
        from neodragon_cli.pipelines.distill.step_distill_progressive import (
            progressive_trainer as make_trainer,
        )
    trainer = make_trainer(ctx, models, data, work / "run", resume, init=parent.teacher)
    console.print(f"step-distill ({recipe.method}): {'-'.join(map(str, ctx.schedule))} steps per stage, teacher CFG "
                  f"{ctx.guidance[0]:g}/{ctx.guidance[1]:g}, {ctx.num_units} latent frames, {len(prompts)} prompts")
    result = trainer.fit()
    if result.stopped:
        return TrainingOutcome(result.step, work, artifact=None)
    state = trainer.model_state_dict(STUDENT)  # collective under FSDP
    if not distributed.setup().is_main:
        return TrainingOutcome(result.step, work, artifact=out)

    final = make_student(teacher, recipe.student.prediction, interval)
    final.load_state_dict(state)
    s = parent.settings
    summary = {
        "method": recipe.method, "schedule": list(ctx.schedule), "steps": result.step,
        "teacher_guidance": list(ctx.guidance), "teacher_steps": ctx.teacher_steps, "prediction": recipe.student.prediction,
        "nfe_per_video": {
            "teacher": nfe_per_video(s.first_steps, s.video_steps, s.guidance, s.video_guidance, ctx.num_units),
            "student": nfe_per_video(ctx.schedule, ctx.schedule, 0, 0, ctx.num_units),
        },
    }
    with writer as art:
        entry = parent.spec["components"]["mmdit"]
        art.copy_pipeline(parent.folder, replace="mmdit")
        final.eval().save_pretrained(art.path / entry["path"])
        art.set_role("mmdit", entry["component"], entry["path"], sampling=distilled_sampling(ctx))
        copy_metrics(work / "run", art)
        art.record("step-distill", **summary)
    n = summary["nfe_per_video"]
    console.print(f"step-distill: {n['teacher']} -> {n['student']} MMDiT calls per video; wrote {out}")
    return TrainingOutcome(result.step, work, artifact=out)
