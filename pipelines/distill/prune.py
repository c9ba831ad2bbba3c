"""`prune`: MMDiT block pruning and recovery (Neodragon §3.3).

1. Choose the blocks to remove by `blocks.policy`: the lowest visual, text or mean block-importance
   score (`block_importance.py`; read from `blocks.scores` or measured on the parent first, into
   `OUT.work/scores/`), `guided` (mean score combined with drop-one agreement measurements in the
   scores report), or an explicit list. The last block is never removed (it ends the text stream).
2. Remove them (`PyramidFlowMMDiT.without_blocks`: same published layout, `num_layers` changed, keys
   renumbered).
3. Stage 1: data flow-matching fine-tune of the pruned MMDiT, the teacher's own objective (pyramid
   flow matching with temporal pyramid and history corruption, `train_t2v.t2v_flow_batch`) on
   Shapes videos encoded by the parent's VAE into a fingerprinted latent cache (`OUT.work/latents`).
4. Stage 2: distillation from the frozen unpruned teacher on the same batches, any weighted sum of
   the feature loss (per mapped block: MSE on the visual tokens + cosine distance 1 - cos on the
   valid text tokens, averaged over the mapped blocks), the teacher flow-matching loss (MSE to the
   teacher's velocity) and the data flow-matching loss. Mapping (paper Fig. 11): `simple` matches the
   student block that was teacher block k to teacher block k; `next-block` matches it to the teacher
   block just before the next kept block (the output it now has to produce). The last student block
   matches the teacher's last block either way.

The text path stays frozen. Each stage is its own resumable run (`OUT.work/stage{1,2}/`), capped by
`train.max_steps`. The artifact is the parent pipeline with the `mmdit` role swapped, operation `prune`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from neodragon_cli.artifacts import ArtifactWriter, resolve_model
from neodragon_cli.console import console
from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.data.latent_cache import encode_latent_cache
from neodragon_cli.pipelines.data.shapes import prompt_corpus
from neodragon_cli.pipelines.data.world_section import WorldSection
from neodragon_cli.pipelines.distill.block_importance import (
    SCORES_FILE,
    block_calls,
    calibration_scores,
    read_scores,
    write_report,
)
from neodragon_cli.pipelines.distill.prompts import read_prompts
from neodragon_cli.pipelines.flow.losses import pyramid_flow_loss
from neodragon_cli.pipelines.flow.pipeline import PIPELINE_FILE, VideoPipeline
from neodragon_cli.pipelines.models.checkpoint import count_parameters
from neodragon_cli.pipelines.models.latents import LatentNorm, get_scheme
from neodragon_cli.pipelines.models.mmdit import PyramidFlowMMDiT, check_removable_blocks
from neodragon_cli.pipelines.train import TrainingOutcome, distributed, training_command
from neodragon_cli.pipelines.train.train_t2v import (
    FlowSection,
    T2VDataSection,
    TextToVideoModel,
    TrainT2VRecipe,
    flow_batches,
    stage_losses,
    t2v_flow_batch,
)
from neodragon_cli.pipelines.train.trainer import MultiModelTrainer, Phase, TrainerConfig, latest_checkpoint, seed_everything
from neodragon_cli.recipes import setting

POLICIES = ("visual", "text", "mean", "guided", "explicit")
MAPPINGS = ("simple", "next-block")


@dataclass
class BlocksSection:
    policy: Literal["visual", "text", "mean", "guided", "explicit"] = setting("mean", "how blocks are chosen: lowest visual / text / mean importance, guided (mean + drop-one agreement), or the explicit list")
    remove: int = setting(1, "how many blocks to remove (score policies)")
    explicit: list[int] = setting([], "block indices to remove (policy explicit)")
    scores: str = setting("", "a scores.json of `neodragon prune scores`; empty: measure the parent first (calibration:)")


@dataclass
class CalibrationSection:
    prompts: str = setting("", "calibration prompt file (one per line, or .jsonl/.csv/.parquet); empty: Shapes captions")
    shapes_prompts: int = setting(100, "Shapes training-split captions used when no prompt file is given")
    videos_per_prompt: int = setting(5, "videos generated per prompt (paper: 100 prompts x 5 videos)")
    seed: int = setting(0, "seed of the calibration videos and captions")


@dataclass
class PruneDataSection:
    videos: int = setting(2000, "Shapes videos encoded once by the parent's VAE into OUT.work/latents.safetensors")


@dataclass
class Stage1Section:
    steps: int = setting(300, "data flow-matching fine-tune steps (0: skip)")


@dataclass
class Stage2Section:
    steps: int = setting(300, "distillation steps from the unpruned teacher (0: skip)")
    lr: float = setting(0.0, "learning rate of stage 2 (0: train.lr)")
    w_feature: float = setting(1.0, "feature loss weight (visual MSE + text cosine distance per mapped block)")
    w_teacher: float = setting(1.0, "teacher flow-matching loss weight (MSE to the teacher's velocity)")
    w_data: float = setting(1.0, "data flow-matching loss weight")
    mapping: Literal["simple", "next-block"] = setting("simple", "which teacher block each student block's output matches (paper Fig. 11)")


@dataclass
class PruneRecipe:
    """Block pruning of the parent's MMDiT, then Stage-1 and Stage-2 recovery."""

    parent: str = setting("shapes-teacher", "the pipeline to prune: a folder with pipeline.json, or an embedded model's name")
    blocks: BlocksSection = field(default_factory=BlocksSection, metadata={"doc": "which blocks go"})
    calibration: CalibrationSection = field(default_factory=CalibrationSection, metadata={"doc": "block-importance measurement (when blocks.scores is empty)"})
    world: WorldSection = field(default_factory=WorldSection, metadata={"doc": "the Shapes world of the training videos"})
    data: PruneDataSection = field(default_factory=PruneDataSection, metadata={"doc": "latent cache"})
    flow: FlowSection = field(default_factory=FlowSection, metadata={"doc": "pyramid flow matching (as the teacher was trained)"})
    stage1: Stage1Section = field(default_factory=Stage1Section, metadata={"doc": "data flow-matching fine-tune"})
    stage2: Stage2Section = field(default_factory=Stage2Section, metadata={"doc": "distillation from the unpruned teacher"})
    train: TrainerConfig = field(default_factory=TrainerConfig, metadata={"doc": "the trainer of both stages (max_steps caps each)"})

    def validate(self) -> list[str]:
        problems = []
        if self.blocks.policy == "explicit" and not self.blocks.explicit:
            problems.append("blocks.policy explicit needs blocks.explicit (a list of block indices)")
        if self.blocks.policy != "explicit" and self.blocks.remove < 1:
            problems.append(f"blocks.remove must be at least 1, got {self.blocks.remove}")
        s2 = self.stage2
        if min(s2.w_feature, s2.w_teacher, s2.w_data) < 0 or s2.w_feature + s2.w_teacher + s2.w_data == 0:
            problems.append("stage2 loss weights must be non-negative and not all zero")
        if self.stage1.steps < 0 or s2.steps < 0:
            problems.append("stage steps must not be negative")
        if s2.lr < 0:
            problems.append(f"stage2.lr must not be negative, got {s2.lr}")
        if len(self.flow.sample_ratios) != 3:
            problems.append("flow.sample_ratios needs one entry per pyramid stage (3)")
        elif self.train.batch_size % sum(self.flow.sample_ratios):
            problems.append(f"train.batch_size must be a multiple of sum(flow.sample_ratios) = {sum(self.flow.sample_ratios)}")
        return problems


# ---------------------------------------------------------------------------------------------- choice


def choose_blocks(policy: str, count: int, blocks: list[dict], num_layers: int, explicit: list[int] = ()) -> list[int]:
    """Block indices to remove, ascending. Score policies take the `count` lowest-scoring blocks of
    0..num_layers-2 (`blocks`: a scores report's entries); `guided` ranks by the sum of the mean
    score's rank and the rank of the drop-one PSNR (higher PSNR to the unpruned video = less needed),
    which each block's `drop_one.psnr` must hold. UsageError for choices that cannot be made."""
    if policy == "explicit":
        return sorted(check_removable_blocks(explicit, num_layers))
    if len(blocks) != num_layers:
        raise UsageError(f"the scores report covers {len(blocks)} blocks, the MMDiT has {num_layers}",
                         hint="measure this model's scores (`neodragon prune scores`)")
    check_removable_blocks(range(count), num_layers)  # too many blocks fails here, with its message
    candidates = [b for b in blocks if b["block"] != num_layers - 1]
    mean = {b["block"]: (b["visual"] + b["text"]) / 2 for b in candidates}
    if policy == "visual":
        key = {b["block"]: b["visual"] for b in candidates}
    elif policy == "text":
        key = {b["block"]: b["text"] for b in candidates}
    elif policy == "mean":
        key = mean
    elif policy == "guided":
        missing = [b["block"] for b in candidates if (b.get("drop_one") or {}).get("psnr") is None]
        if missing:
            raise UsageError(f"policy guided needs drop-one measurements; block {missing[0]} has none",
                             hint="use a scores.json with drop_one.psnr per block, or policy mean")
        by_mean = sorted(mean, key=mean.get)
        by_psnr = sorted(mean, key=lambda k: -blocks[k]["drop_one"]["psnr"])
        key = {k: by_mean.index(k) + by_psnr.index(k) + mean[k] / (1 + max(mean.values())) for k in mean}
    else:
        raise UsageError(f"unknown block policy '{policy}'", hint=f"known: {', '.join(POLICIES)}")
    return sorted(sorted(key, key=key.get)[:count])


def mapped_teacher_blocks(kept: list[int], mapping: str) -> list[int]:
    """For each student block (the kept teacher blocks `kept`, ascending, ending with the last), the
    teacher block whose output it matches in the feature loss."""
    if mapping == "simple":
        return list(kept)
    return [following - 1 for following in kept[1:]] + [kept[-1]]


# ---------------------------------------------------------------------------------------------- parent


@dataclass
class Parent:
    """The pipeline being pruned: folder, pipeline.json, its frozen conditioning and its MMDiT."""

    folder: Path
    spec: dict
    conditioner: nn.Module
    mmdit: PyramidFlowMMDiT

    def role(self, role: str) -> dict:
        return self.spec["components"][role]


class Conditioner(nn.Module):
    """The parent's frozen text path: prompts -> (embeds [B, L, D_mmdit-input], mask [B, L], pooled [B, P])."""

    def __init__(self, text_encoder: nn.Module, context_adapter: nn.Module | None):
        super().__init__()
        self.text_encoder, self.context_adapter = text_encoder, context_adapter

    def forward(self, prompts: list[str]):
        embeds, mask, pooled = self.text_encoder(prompts)
        if self.context_adapter is not None:
            embeds = self.context_adapter(embeds)
        return embeds, mask, pooled


def load_parent(parent: str) -> Parent:
    from neodragon_cli import registry

    folder = resolve_model(parent)
    if not (folder / PIPELINE_FILE).is_file():
        raise UsageError(f"{folder} has no {PIPELINE_FILE}", hint="prune reads a neodragon pipeline folder (train-t2v, convert or distill outputs)")
    spec = json.loads((folder / PIPELINE_FILE).read_text())
    components = spec.get("components", {})

    def load(role: str):
        entry = components[role]
        return registry.get(entry["component"]).load(folder / entry["path"]).eval()

    try:
        adapter = load("context_adapter") if "context_adapter" in components else None
        conditioner = Conditioner(load("text_encoder"), adapter).requires_grad_(False)
        mmdit = load("mmdit")
    except (CheckpointError, KeyError) as exc:
        raise UsageError(f"cannot load the parent {folder}: {getattr(exc, 'message', exc)}") from None
    if not isinstance(mmdit, PyramidFlowMMDiT):
        raise UsageError(f"{folder}: the mmdit role is not a pyramidal MMDiT")
    return Parent(folder, spec, conditioner, mmdit)


def parent_latents(recipe: PruneRecipe, parent: Parent, work: Path) -> torch.Tensor:
    """Normalised latents [videos, C, T, h, w] of Shapes videos 0..videos-1 encoded by the parent's
    VAE, cached in `work/latents.safetensors` (re-encoded when the encoder or world changes)."""
    from neodragon_cli import registry

    entry = parent.role("vae")
    vae = registry.get(entry["component"]).load(parent.folder / entry["path"]).eval()
    norm = parent.spec.get("latent_norm")
    norm = LatentNorm(**norm) if isinstance(norm, dict) else get_scheme(norm or vae.latent_norm)
    work.mkdir(parents=True, exist_ok=True)
    return encode_latent_cache(recipe.world, recipe.data.videos, vae, norm, work / "latents.safetensors")


# ---------------------------------------------------------------------------------------------- scores


def calibration_prompts(section: CalibrationSection) -> list[str]:
    if section.prompts:
        return read_prompts(section.prompts)
    return prompt_corpus(section.shapes_prompts, section.seed, "train")


def measure_scores(model: str | Path, prompts: list[str], videos_per_prompt: int, seed: int, report_dir: Path,
                   **provenance) -> dict:
    """Block importance of pipeline `model` (see `block_importance.calibration_scores`), written to
    `report_dir` as scores.json (with `provenance`) + chart; returns the report."""
    from neodragon_cli.console import progress

    if not prompts:
        raise UsageError("no calibration prompts", hint="give a prompts file with one prompt per line")
    folder = resolve_model(model)
    pipeline = VideoPipeline.from_pretrained(folder, safety_checker=False)
    bar = progress(disable=not distributed.setup().is_main)
    with bar:
        task = bar.add_task("calibration videos", total=len(prompts) * videos_per_prompt)
        blocks = calibration_scores(pipeline, prompts, videos_per_prompt=videos_per_prompt, seed=seed,
                                    progress=lambda done, _: bar.update(task, completed=done))
    return write_report(report_dir, blocks, model=str(folder), prompts=len(prompts),
                        videos_per_prompt=videos_per_prompt, seed=seed, **provenance)


def recipe_scores(recipe: PruneRecipe, parent: Parent, work: Path) -> list[dict]:
    """The scores the policy reads: `blocks.scores`, or the parent's measured into `work/scores`
    (reused when that report was made with the same calibration)."""
    if recipe.blocks.scores:
        return read_scores(Path(recipe.blocks.scores))
    c = recipe.calibration
    calibration = dataclasses.asdict(c)
    path = work / "scores" / SCORES_FILE

    def measured() -> list[dict]:
        if path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("calibration") == calibration and stored.get("model") == str(parent.folder):
                return stored["blocks"]
        report = measure_scores(parent.folder, calibration_prompts(c), c.videos_per_prompt, c.seed, path.parent,
                                calibration=calibration)
        return report["blocks"]

    return distributed.rank_zero_first(measured)


# ---------------------------------------------------------------------------------------------- losses


def _t2v_view(recipe: PruneRecipe) -> TrainT2VRecipe:
    """The teacher-training settings the shared flow-matching batch and loss code reads."""
    return TrainT2VRecipe(world=recipe.world, data=T2VDataSection(videos=recipe.data.videos), flow=recipe.flow)


def stage1_loss(recipe: PruneRecipe):
    def loss_fn(models, batch: dict, generator: torch.Generator):
        model = TextToVideoModel(models["text"], models["mmdit"])
        flow = t2v_flow_batch(recipe.flow, model, batch, generator)
        out = pyramid_flow_loss(model.mmdit, flow)
        return out.loss, stage_losses(out, flow)

    return loss_fn


def _recorded(calls: list[list]):
    """A `block_calls` callback keeping each call's (text_valid, output) in calls[k]."""
    return lambda k, args, out: calls[k].append((args[3], out))


def feature_loss(student_calls: list[list], teacher_calls: list[list], targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over student blocks (and columns) of the visual-token MSE and of the valid-text-token
    cosine distance to the mapped teacher block's output; returns (visual, text), float32 scalars."""
    visual, text = [], []
    for student_block, teacher_block in enumerate(targets):
        for (valid, (x, c)), (_, (x_t, c_t)) in zip(student_calls[student_block], teacher_calls[teacher_block]):
            visual.append(F.mse_loss(x.float(), x_t.float()))
            if c is not None and c_t is not None:
                cosine = F.cosine_similarity(c.float(), c_t.float(), dim=-1, eps=1e-8)
                text.append((1 - cosine)[valid].mean())
    zero = torch.zeros((), device=visual[0].device)
    return torch.stack(visual).mean(), (torch.stack(text).mean() if text else zero)


def stage2_loss(recipe: PruneRecipe, targets: list[int]):
    s2 = recipe.stage2

    def loss_fn(models, batch: dict, generator: torch.Generator):
        model = TextToVideoModel(models["text"], models["mmdit"])
        flow = t2v_flow_batch(recipe.flow, model, batch, generator)
        teacher_calls = [[] for _ in models["teacher"].transformer_blocks]
        student_calls = [[] for _ in models["mmdit"].transformer_blocks]
        with torch.no_grad(), block_calls(models["teacher"], _recorded(teacher_calls)):
            teacher = pyramid_flow_loss(models["teacher"], flow)
        with block_calls(models["mmdit"], _recorded(student_calls)):
            student = pyramid_flow_loss(models["mmdit"], flow)
        visual, text = feature_loss(student_calls, teacher_calls, targets)
        teacher_fm = torch.cat([(s.float() - t.float()).pow(2).flatten(1).mean(1)
                                for s, t in zip(student.predictions, teacher.predictions)]).mean()
        loss = s2.w_feature * (visual + text) + s2.w_teacher * teacher_fm + s2.w_data * student.loss
        metrics = {"feature_visual": visual.detach(), "feature_text": text.detach(), "teacher_fm": teacher_fm.detach(),
                   "data_fm": student.loss.detach()}
        return loss, metrics

    return loss_fn


# ---------------------------------------------------------------------------------------------- command


def _stage_trainer(recipe: PruneRecipe, stage: int, steps: int, models: dict, loss_fn, data, work: Path,
                   resume: bool) -> MultiModelTrainer:
    loop = dataclasses.replace(recipe.train, max_steps=min(steps, recipe.train.max_steps))
    lr = recipe.stage2.lr if stage == 2 and recipe.stage2.lr > 0 else recipe.train.lr
    optimizer = dataclasses.replace(loop, lr=lr)
    phase = Phase(f"stage{stage}", loss_fn, ("mmdit",))
    return MultiModelTrainer(models, {"mmdit": optimizer}, [phase], data, loop, work / f"stage{stage}", resume=resume)


def _check_stage_order(recipe: PruneRecipe, work: Path) -> None:
    """Stage-2 checkpoints start from stage 1's final weights: refuse them when stage 1 is to train on."""
    stage1 = latest_checkpoint(work / "stage1")
    done = 0 if stage1 is None else int(stage1.stem.split("-")[1])
    wanted = min(recipe.stage1.steps, recipe.train.max_steps)
    if done < wanted and latest_checkpoint(work / "stage2") is not None:
        raise UsageError(f"{work / 'stage2'} holds stage-2 checkpoints, but stage 1 has {wanted - done} more steps to train",
                         hint="delete the stage2 folder to redo stage 2 from the longer stage 1")


def _log_stage_metrics(art: ArtifactWriter, work: Path) -> None:
    for stage in (1, 2):
        path = work / f"stage{stage}" / "metrics.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                art.log_metrics({"stage": stage, **json.loads(line)})


@training_command("prune", PruneRecipe)
def prune(recipe: PruneRecipe, out: Path, *, recipe_yaml: str, resume: bool, overwrite: bool) -> TrainingOutcome:
    """Choose and remove blocks, run Stage 1 and Stage 2 in `OUT.work/`, then (rank 0) write `OUT`."""
    parent = load_parent(recipe.parent)
    num_layers = len(parent.mmdit.transformer_blocks)
    work = out.with_name(out.name + ".work")
    if recipe.blocks.policy == "explicit":
        removed = choose_blocks("explicit", 0, [], num_layers, recipe.blocks.explicit)
    else:
        check_removable_blocks(range(recipe.blocks.remove), num_layers)
        removed = choose_blocks(recipe.blocks.policy, recipe.blocks.remove, recipe_scores(recipe, parent, work), num_layers)
    if not resume and any(latest_checkpoint(work / f"stage{s}") is not None for s in (1, 2)):
        raise UsageError(f"{work} holds checkpoints of an earlier run", hint="pass --resume to continue it, or delete the folder")
    _check_stage_order(recipe, work)
    writer = ArtifactWriter(out, command="prune", recipe_yaml=recipe_yaml, parent=parent.folder, overwrite=overwrite)
    kept = [k for k in range(num_layers) if k not in removed]
    console.print(f"prune: removing blocks {removed} of {num_layers} ({recipe.blocks.policy}), keeping {kept}")

    latents = distributed.rank_zero_first(lambda: parent_latents(recipe, parent, work))
    data = flow_batches(_t2v_view(recipe), latents)
    teacher = parent.mmdit.float()
    student = teacher.without_blocks(removed)
    seed_everything(recipe.train.seed)
    steps = {1: recipe.stage1.steps, 2: recipe.stage2.steps}
    losses = {1: stage1_loss(recipe), 2: stage2_loss(recipe, mapped_teacher_blocks(kept, recipe.stage2.mapping))}
    done = {}
    for stage in (1, 2):
        if steps[stage] == 0:
            done[stage] = 0
            continue
        models = {"mmdit": student, "text": parent.conditioner} | ({"teacher": teacher} if stage == 2 else {})
        trainer = _stage_trainer(recipe, stage, steps[stage], models, losses[stage], data, work, resume)
        result = trainer.fit()
        if result.stopped:
            return TrainingOutcome(result.step, work, artifact=None)
        student, done[stage] = trainer.models["mmdit"], result.step
    if not distributed.setup().is_main:
        return TrainingOutcome(done[2], work, artifact=out)

    student = student.cpu().eval()
    summary = {"policy": recipe.blocks.policy, "removed_blocks": removed, "kept_blocks": kept,
               "num_layers": [num_layers, len(kept)], "params": [count_parameters(teacher), count_parameters(student)],
               "stage1_steps": done[1], "stage2_steps": done[2], "mapping": recipe.stage2.mapping,
               "stage2_weights": {k: getattr(recipe.stage2, k) for k in ("w_feature", "w_teacher", "w_data")}}
    with writer as art:
        mmdit_entry = parent.role("mmdit")
        art.copy_pipeline(parent.folder, replace="mmdit")
        student.save_pretrained(art.path / mmdit_entry["path"])
        art.set_role("mmdit", mmdit_entry["component"], mmdit_entry["path"])
        _log_stage_metrics(art, work)
        art.record("prune", **summary)
    console.print(f"prune: {num_layers} -> {len(kept)} blocks, {summary['params'][0]:,} -> {summary['params'][1]:,} parameters")
    return TrainingOutcome(done[2], work, artifact=out)
