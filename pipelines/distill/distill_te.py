"""`distill-te`: text-encoder distillation (Neodragon §3.1).

The teacher path is `CE(T5(prompt))`: the parent pipeline's T5 encoder and its MMDiT's context
embedder, both frozen. The student path is a DistilT5 (a small T5 + projection head to the teacher's
T5 width, fed the teacher's token ids) and a head chosen by `mode`:

* `rm`   DistilT5 (frozen) -> ContextAdapter to the MMDiT width; the adapter replaces the CE.
* `em`   DistilT5 (frozen) -> ContextAdapter to the T5 width -> the frozen CE (folded into one RM
         adapter when saved).
* `lora` DistilT5 with LoRA adapters (base frozen) -> the frozen CE; no MLP adapter.
* `tdt5` DistilT5, all of it trained -> the frozen CE.

Loss: `w_mse * MSE + w_cd * (1 - cos)` between student and teacher token embeddings, each averaged over
a prompt's valid tokens, then over prompts (so ranks and accumulation steps weigh prompts alike). The
pooled CLIP path is untouched. Prompts come from corpus files and the Shapes caption generator
(`prompts.py`); the teacher's outputs are computed once into a sharded cache (`teacher_cache.py`).

The artifact is the parent pipeline folder with only the text path changed, in Neodragon's layout:
`text_encoder_3/` becomes the DistilT5 (`tokenizer_3/` is the teacher's: the student reads the same
ids), and in rm / em the MMDiT is saved without its context embedder (`mmdit/neodragon`) next to
`context_adapter/` (role `context_adapter`), so `neodragon generate --model OUT` uses it as it is.
`metrics.jsonl` ends with the held-out prompt MSE and cosine and the text path's parameter counts.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from neodragon_cli.artifacts import ArtifactWriter, resolve_model
from neodragon_cli.console import console
from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.data.shapes import prompt_corpus
from neodragon_cli.pipelines.distill.prompts import PromptMixture, PromptSource, read_prompts
from neodragon_cli.pipelines.distill.teacher_cache import TeacherTargets, cached_teacher_targets, teacher_fingerprint
from neodragon_cli.pipelines.flow.pipeline import PIPELINE_FILE
from neodragon_cli.pipelines.models.base import parameters_on_meta
from neodragon_cli.pipelines.models.checkpoint import count_parameters
from neodragon_cli.pipelines.models.context_adapter import ContextAdapter, LoRALinear, StudentTextPath
from neodragon_cli.pipelines.models.mmdit import PyramidFlowMMDiT
from neodragon_cli.pipelines.models.text_encoders import DistilT5, TextEncoderBundle, t5_config
from neodragon_cli.pipelines.train import TrainingOutcome, copy_metrics, distributed, training_command
from neodragon_cli.pipelines.train.trainer import Trainer, TrainerConfig, derive_seed, latest_checkpoint, seed_everything
from neodragon_cli.recipes import setting

MODES = ("rm", "em", "lora", "tdt5")
ADAPTER_MODES = ("rm", "em")


@dataclass
class StudentSection:
    path: str = setting("", "a DistilT5 folder (text_encoder_3 layout, e.g. LifuWang/DistillT5) to start from; empty: a fresh one of the sizes below")
    vocab_size: int = setting(0, "embedding rows of a fresh student (0: the teacher tokenizer's size)")
    d_model: int = setting(64, "fresh student: T5 width")
    num_layers: int = setting(2, "fresh student: encoder layers")
    num_heads: int = setting(2, "fresh student: attention heads")
    d_ff: int = setting(128, "fresh student: gated-GELU feed-forward width")
    d_kv: int = setting(0, "fresh student: per-head width (0: d_model / num_heads)")
    project_out_dim: int = setting(0, "fresh student: projection head width (0: the teacher T5's width)")
    dropout: float = setting(0.0, "fresh student: dropout inside the T5 stack")


@dataclass
class AdapterSection:
    layer_depths: list[int] = setting([128, 128, 128, 128], "ContextAdapter (SkipMLP) hidden widths (rm, em)")
    skips: list[bool] = setting([True, True, True, True], "input concatenated before each later layer")
    activation_fn: str = setting("gelu", "hidden activation: gelu, gelu_tanh, relu, silu")
    input_dims: int = setting(0, "width the adapter reads (0: the student's output width; otherwise it must equal it)")

    def validate(self) -> list[str]:
        problems = []
        if len(self.skips) != len(self.layer_depths):
            problems.append(f"skips needs one flag per hidden layer ({len(self.layer_depths)}), got {len(self.skips)}")
        if any(d < 1 for d in self.layer_depths):
            problems.append(f"layer_depths must be positive, got {self.layer_depths}")
        return problems


@dataclass
class LoraSection:
    rank: int = setting(8, "LoRA rank on the student's q, k, v, o, wi_0, wi_1, wo (lora mode)")
    alpha: float = setting(8.0, "LoRA scale numerator: the update is (alpha / rank) * up(down(x))")


@dataclass
class LossSection:
    w_mse: float = setting(1.0, "weight of the token-embedding MSE")
    w_cd: float = setting(0.1, "weight of the cosine distance 1 - cos")


@dataclass
class PromptDataSection:
    files: list[str] = setting([], "prompt corpora: .txt (one per line), .jsonl / .csv / .parquet (a text column)")
    weights: list[float] = setting([], "mixing weight of each file (empty: 1 each)")
    column: str = setting("text", "the prompt column of .jsonl / .csv / .parquet files")
    shapes_prompts: int = setting(0, "unique Shapes captions (train split) as a further source (0: none)")
    shapes_weight: float = setting(1.0, "mixing weight of the Shapes captions")
    shapes_seed: int = setting(0, "seed of the Shapes captions")
    heldout: int = setting(256, "held-out prompts measured at the end: the Shapes held-out split when shapes_prompts > 0, else a seeded subset of the files' prompts left out of training")
    cache_shard: int = setting(1024, "prompts per teacher-cache shard")
    teacher_batch: int = setting(64, "prompts per teacher forward while caching")
    teacher_dtype: Literal["float32", "bfloat16", "float16"] = setting("float32", "dtype the teacher runs in while caching")
    teacher_fsdp: bool = setting(False, "shard the teacher's weights over the ranks (FSDP2) while caching: a teacher too large for one device")

    def validate(self) -> list[str]:
        problems = []
        if self.weights and len(self.weights) != len(self.files):
            problems.append(f"weights needs one entry per file ({len(self.files)}), got {len(self.weights)}")
        if any(w <= 0 for w in self.weights) or self.shapes_weight <= 0:
            problems.append("mixing weights must be positive")
        for name in ("shapes_prompts", "heldout"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("cache_shard", "teacher_batch"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        return problems


@dataclass
class DistillTERecipe:
    """Text-encoder distillation: a DistilT5 student (+ ContextAdapter) learns CE(T5(prompt))."""

    parent: str = setting("shapes-teacher", "the teacher pipeline: a folder with pipeline.json, or an embedded model's name")
    mode: Literal["rm", "em", "lora", "tdt5"] = setting("rm", "rm: adapter replaces the CE; em: adapter, then the frozen CE; lora: LoRA on the student, then the frozen CE; tdt5: the whole student, then the frozen CE")
    student: StudentSection = field(default_factory=StudentSection, metadata={"doc": "the DistilT5 student"})
    adapter: AdapterSection = field(default_factory=AdapterSection, metadata={"doc": "the ContextAdapter (rm, em)"})
    lora: LoraSection = field(default_factory=LoraSection, metadata={"doc": "LoRA (lora mode)"})
    loss: LossSection = field(default_factory=LossSection, metadata={"doc": "the distillation loss"})
    data: PromptDataSection = field(default_factory=PromptDataSection, metadata={"doc": "prompt corpora and the teacher cache"})
    train: TrainerConfig = field(default_factory=TrainerConfig, metadata={"doc": "the trainer"})

    def validate(self) -> list[str]:
        problems = []
        if self.loss.w_mse < 0 or self.loss.w_cd < 0 or self.loss.w_mse + self.loss.w_cd == 0:
            problems.append("loss weights must be non-negative and not both zero")
        if self.lora.rank < 1:
            problems.append(f"lora.rank must be at least 1, got {self.lora.rank}")
        return problems


# ---------------------------------------------------------------------------------------------- teacher


@dataclass
class Teacher:
    """The parent pipeline and what distillation reads of it: its text bundle (the T5 side is the
    teacher encoder) and its MMDiT's context embedder."""

    folder: Path
    spec: dict
    bundle: TextEncoderBundle
    context_embedder: nn.Linear
    mmdit_width: int

    def role_path(self, role: str) -> str:
        return self.spec["components"][role]["path"]


def load_mmdit(folder: Path, spec: dict) -> PyramidFlowMMDiT:
    from neodragon_cli import registry

    entry = spec["components"]["mmdit"]
    return registry.get(entry["component"]).load(folder / entry["path"]).eval()


def load_teacher(parent: str, dtype: str = "float32") -> Teacher:
    """The parent pipeline's T5 text path (UsageError when there is none to distil)."""
    if not parent:
        raise UsageError("no teacher pipeline given", hint="set parent=FOLDER (a pipeline folder with pipeline.json)")
    folder = resolve_model(parent)
    spec_path = folder / PIPELINE_FILE
    if not spec_path.is_file():
        raise UsageError(f"{folder} has no {PIPELINE_FILE}", hint="distill-te reads a neodragon pipeline folder (train-t2v, convert or distill outputs)")
    spec = json.loads(spec_path.read_text())
    components = spec.get("components", {})
    if "context_adapter" in components:
        raise UsageError(f"{folder} already has a ContextAdapter: its text path is distilled", hint="distil from the T5 teacher pipeline")
    if components.get("text_encoder", {}).get("component") != "text/bundle" or "mmdit" not in components:
        raise UsageError(f"{folder}: the teacher needs a text/bundle text encoder and an MMDiT in {PIPELINE_FILE}")
    try:
        bundle = TextEncoderBundle.from_pretrained(folder / components["text_encoder"]["path"], dtype)
        mmdit = load_mmdit(folder, spec)
    except CheckpointError as exc:
        raise UsageError(f"cannot load the teacher: {exc.message}", hint=exc.hint) from None
    if not mmdit.has_context_embedder:
        raise UsageError(f"{folder}: the MMDiT has no context embedder (the teacher path is CE(T5(prompt)))")
    embedder = copy.deepcopy(mmdit.context_embedder).float().requires_grad_(False)
    return Teacher(folder, spec, bundle, embedder, mmdit.inner_dim)


def teach_fn(teacher: Teacher, env: distributed.DistEnv, *, shard: bool = False):
    """(ids, mask) -> CE(T5(ids, mask)) in float32, computed on this rank's device. `shard` spreads the
    T5's weights over the ranks with FSDP2 (one unit per block, gathered as each block runs): a teacher
    too large for one device still runs, every rank computing its share of the prompts."""
    device = env.device
    t5, embedder = teacher.bundle.t5_encoder.to(device).eval(), teacher.context_embedder.to(device).eval()
    if shard and env.distributed:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (env.world_size,))
        distributed.shard_blocks(t5, mesh)
        distributed.fully_shard(t5, mesh)

    def teach(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return embedder(t5(ids.to(device), attention_mask=mask.to(device)).float())

    return teach


# ---------------------------------------------------------------------------------------------- student


def build_student(section: StudentSection, vocab_size: int, teacher_width: int) -> DistilT5:
    """The DistilT5 student: loaded from `section.path`, or fresh (initialised by torch's current seed)."""
    if section.path:
        path = Path(section.path)
        if not path.is_dir():
            raise UsageError(f"student folder does not exist: {path}", hint="give a DistilT5 folder (text_encoder_3 layout)")
        try:
            student = DistilT5.from_pretrained(path)
        except CheckpointError as exc:
            raise UsageError(f"cannot load the student: {exc.message}", hint=exc.hint) from None
    else:
        rows = section.vocab_size or vocab_size
        config = t5_config(vocab_size=rows, d_model=section.d_model, num_layers=section.num_layers,
                           num_heads=section.num_heads, d_ff=section.d_ff, d_kv=section.d_kv or None,
                           dropout_rate=section.dropout)
        student = DistilT5(config, project_out_dim=section.project_out_dim or teacher_width)
    if student.encoder.config.vocab_size < vocab_size:
        raise UsageError(f"the student embeds {student.encoder.config.vocab_size} tokens, the teacher's tokenizer has {vocab_size}",
                         hint="the student reads the teacher's token ids: give it at least as many embedding rows")
    return student


def build_text_path(recipe: DistillTERecipe, student: nn.Module, student_width: int, context_embedder: nn.Linear,
                    mmdit_width: int) -> StudentTextPath:
    """The trained module of `recipe.mode` (UsageError when the student's width cannot feed its head)."""
    mode = recipe.mode
    if mode in ADAPTER_MODES:
        wanted = recipe.adapter.input_dims
        if wanted and wanted != student_width:
            raise UsageError(f"the student outputs width {student_width}, the adapter reads {wanted}",
                             hint=f"set adapter.input_dims=0 or {student_width}, or a student with project_out_dim={wanted}")
        adapter = ContextAdapter(input_dims=student_width,
                                 output_dims=context_embedder.in_features if mode == "em" else mmdit_width,
                                 layer_depths=recipe.adapter.layer_depths, skips=recipe.adapter.skips,
                                 activation_fn=recipe.adapter.activation_fn)
        embedder = copy.deepcopy(context_embedder) if mode == "em" else None
        return StudentTextPath(mode, student, adapter, context_embedder=embedder)
    if student_width != context_embedder.in_features:
        raise UsageError(f"{mode}: the student outputs width {student_width}, the context embedder reads {context_embedder.in_features}",
                         hint=f"give the student project_out_dim={context_embedder.in_features}")
    return StudentTextPath(mode, student, None, context_embedder=copy.deepcopy(context_embedder),
                           lora_rank=recipe.lora.rank, lora_alpha=recipe.lora.alpha)


def parameter_counts(path: StudentTextPath) -> dict[str, int]:
    """Parameters of the text path as the paper's Table 2 counts them: the student encoder (LoRA
    merged) and its head (the ContextAdapter, or the context embedder it feeds), plus the LoRA
    parameters a lora run trains on top."""
    lora = sum(count_parameters(m.down) + count_parameters(m.up) for m in path.student.modules() if isinstance(m, LoRALinear))
    student = count_parameters(path.student) - lora
    head = count_parameters(path.adapter)
    return {"params_text_encoder": student, "params_head": head, "params_text_path": student + head, "params_lora": lora}


# ---------------------------------------------------------------------------------------------- loss


def per_prompt_errors(student: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt: the MSE and the cosine similarity of its token embeddings [B, L, D], averaged over
    its valid tokens (mask [B, L], 1 = token). Returns two [B] tensors."""
    valid = mask.to(torch.float32)
    count = valid.sum(1).clamp_min(1)
    student, target = student.float(), target.float()
    mse = (student - target).pow(2).mean(-1)
    cosine = F.cosine_similarity(student, target, dim=-1, eps=1e-8)
    return (mse * valid).sum(1) / count, (cosine * valid).sum(1) / count


def distillation_loss(w_mse: float, w_cd: float):
    def loss_fn(model: StudentTextPath, batch: dict, generator: torch.Generator):
        mse, cosine = per_prompt_errors(model(batch["input_ids"], batch["attention_mask"]), batch["target"],
                                        batch["attention_mask"])
        mse, cosine = mse.mean(), cosine.mean()
        return w_mse * mse + w_cd * (1 - cosine), {"mse": mse.detach(), "cosine": cosine.detach()}

    return loss_fn


@torch.no_grad()
def heldout_metrics(model: StudentTextPath, targets: TeacherTargets, rows: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """Held-out prompt embedding MSE and cosine (means over prompts of their valid-token means)."""
    model.eval()
    device = next(model.parameters()).device
    mses, cosines = [], []
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in targets.batch(rows[start:start + batch_size]).items()}
        mse, cosine = per_prompt_errors(model(batch["input_ids"], batch["attention_mask"]), batch["target"], batch["attention_mask"])
        mses.append(mse.cpu())
        cosines.append(cosine.cpu())
    return {"heldout_mse": float(torch.cat(mses).mean()), "heldout_cosine": float(torch.cat(cosines).mean())}


# ---------------------------------------------------------------------------------------------- prompts


def prompt_sets(data: PromptDataSection, seed: int) -> tuple[PromptMixture, list[str]]:
    """The training mixture and the held-out prompts (UsageError for an empty or unreadable corpus)."""
    weights = data.weights or [1.0] * len(data.files)
    sources = [PromptSource(path, read_prompts(path, data.column), w) for path, w in zip(data.files, weights)]
    if data.shapes_prompts:
        sources.append(PromptSource("shapes", prompt_corpus(data.shapes_prompts, data.shapes_seed, "train"), data.shapes_weight))
        heldout = prompt_corpus(data.heldout, data.shapes_seed, "heldout") if data.heldout else []
    else:
        pool = list(dict.fromkeys(p for s in sources for p in s.prompts))
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(derive_seed(seed, 7))).tolist()
        heldout = [pool[i] for i in order[:data.heldout]]
        if len(heldout) >= len(pool):
            raise UsageError(f"the corpus has {len(pool)} prompts, no more than the {data.heldout} held out",
                             hint="lower data.heldout or give more prompts")
        left_out = set(heldout)
        sources = [PromptSource(s.name, [p for p in s.prompts if p not in left_out], s.weight) for s in sources]
    return PromptMixture(sources, seed), heldout


def prompt_batches(mixture: PromptMixture, targets: TeacherTargets):
    def batch(positions: range) -> dict[str, torch.Tensor]:
        return targets.batch(torch.tensor([mixture.position(p) for p in positions]))

    return batch


# ---------------------------------------------------------------------------------------------- artifact


def without_context_embedder(mmdit: PyramidFlowMMDiT) -> PyramidFlowMMDiT:
    """The same MMDiT without its context embedder: Neodragon's layout, where the ContextAdapter's
    output (already the inner width) enters the blocks."""
    with parameters_on_meta():
        bare = PyramidFlowMMDiT(**{**mmdit.config, "use_context_embedder": False})
    state = {k: v for k, v in mmdit.state_dict().items() if not k.startswith("context_embedder.")}
    bare.load_state_dict(state, strict=True, assign=True)
    return bare.eval()


def write_artifact(art: ArtifactWriter, teacher: Teacher, student: nn.Module, adapter: ContextAdapter | None) -> None:
    """The parent pipeline with the distilled text path (see the module docstring)."""
    replaced = "mmdit" if adapter is not None else None
    art.copy_pipeline(teacher.folder, replace=replaced)
    encoder_dir = art.path / teacher.role_path("text_encoder") / "text_encoder_3"
    shutil.rmtree(encoder_dir)
    student.save_pretrained(encoder_dir)
    if adapter is not None:
        mmdit_path = teacher.role_path("mmdit")
        without_context_embedder(load_mmdit(teacher.folder, teacher.spec)).save_pretrained(art.path / mmdit_path)
        adapter.save_pretrained(art.path / "context_adapter")
        art.set_role("mmdit", "mmdit/neodragon", mmdit_path)
        art.set_role("context_adapter", "adapter/context-adapter", "context_adapter")


@training_command("distill-te", DistillTERecipe)
def distill_te(recipe: DistillTERecipe, out: Path, *, recipe_yaml: str, resume: bool, overwrite: bool) -> TrainingOutcome:
    """Check everything, cache the teacher's targets and train in `OUT.work/`, then (rank 0) write `OUT`."""
    teacher = load_teacher(recipe.parent, recipe.data.teacher_dtype)
    mixture, heldout = prompt_sets(recipe.data, recipe.train.seed)
    tokenizer = teacher.bundle.t5_tokenizer
    seed_everything(recipe.train.seed)  # a fresh student and the adapter follow the recipe's seed
    student = build_student(recipe.student, len(tokenizer), teacher.bundle.t5_encoder.output_dim)
    path = build_text_path(recipe, student, student.output_dim, teacher.context_embedder, teacher.mmdit_width)
    work = out.with_name(out.name + ".work")
    if not resume and latest_checkpoint(work / "run") is not None:
        raise UsageError(f"{work} holds checkpoints of an earlier run", hint="pass --resume to continue it, or delete the folder")
    writer = ArtifactWriter(out, command="distill-te", recipe_yaml=recipe_yaml, parent=teacher.folder, overwrite=overwrite)

    env = distributed.setup()
    prompts = mixture.prompts + heldout
    ids, mask = teacher.bundle.tokenize_t5(prompts)
    fingerprint = teacher_fingerprint([teacher.bundle.t5_encoder, teacher.context_embedder])

    targets = cached_teacher_targets(work / "teacher_cache", ids, mask, teach_fn(teacher, env, shard=recipe.data.teacher_fsdp),
                                     fingerprint, shard_size=recipe.data.cache_shard, batch_size=recipe.data.teacher_batch,
                                     show_progress=env.is_main)
    teacher.bundle.t5_encoder = None  # the teacher encoder is done: free it for training
    trainer = Trainer(path, distillation_loss(recipe.loss.w_mse, recipe.loss.w_cd), prompt_batches(mixture, targets),
                      recipe.train, work / "run", resume=resume, samples="prompts")
    first_step, started = trainer.step, time.perf_counter()
    result = trainer.fit()
    prompts_s = (result.step - first_step) * recipe.train.batch_size / max(time.perf_counter() - started, 1e-9)
    if result.stopped or not env.is_main:
        return TrainingOutcome(result.step, work, artifact=None if result.stopped else out)
    model = trainer.model
    rows = torch.arange(len(mixture), len(prompts))
    measured = heldout_metrics(model, targets, rows) if len(rows) else {}
    counts = parameter_counts(model)
    student, adapter = model.cpu().export()
    summary = {"mode": recipe.mode, "steps": result.step, "train_prompts": len(mixture), "heldout_prompts": len(heldout),
               **measured, **counts, "prompts_s": prompts_s}
    with writer as art:
        write_artifact(art, teacher, student, adapter)
        copy_metrics(work / "run", art)
        art.log_metrics({"step": result.step, "split": "heldout", **summary})
        art.record("distill-te", **summary)
    console.print(f"distill-te {recipe.mode}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in summary.items() if k != "mode"))
    return TrainingOutcome(result.step, work, artifact=out)
