"""`distill-decoder`: asymmetric decoder distillation (Neodragon §3.2).

The parent pipeline's causal-VAE encoder (with its quant_conv) is kept frozen, so the MMDiT's latent
space does not move; a new, lighter decoder learns `decoder(encoder(x)) ≈ x` with
`w_mse * MSE + w_perceptual * perceptual` (Pyramid-Flow's weighting 10 / 1), no KL. Families:

* `taehv-8x`: Neodragon's TAEHV-style decoder, TAEHV with its first TGrow at stride 2 (8x temporal to
  match the causal VAE). Started from a published TAEHV checkpoint (`decoder.init`: its
  `decoder.{i}` layers, the re-strided TGrow and any layer of another shape re-initialised), from a
  Neodragon asymmetric VAE's decoder, or from scratch. Saved as `vae/neodragon-asymmetric`.
* `causal-narrow`: the parent's own causal decoder at other widths (`vae/pyramid-flow`).

The perceptual term is LPIPS (AlexNet) from local weight files, or a substitute the recipe names
(`edge`: L1 between the horizontal and vertical pixel differences); the artifact records which.

Data: fixed clips `i = 0 .. data.clips-1` of `patch = [frames, height, width]`, each a pure function
of (seed, i): Shapes clips rendered on the fly (as train-vae samples them), or clips of real videos
listed by a `.jsonl` / `.csv` annotation file (`video_folders.py`). Their encoder latents (posterior
means, raw) are encoded once into `OUT.work/latents.safetensors`, fingerprinted by the encoder and the
data settings, and resumed or extended like the teacher's latent caches.

The artifact is the parent pipeline with its `vae` role replaced by the frozen encoder + the new
decoder (one folder, as Neodragon's `causal_video_vae/`), so `generate` decodes with it (streaming,
memory flat in the video length) without a flag; the latent normalisation stays the parent's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from neodragon_cli.artifacts import ArtifactWriter, resolve_model
from neodragon_cli.atomic import write_json
from neodragon_cli.console import console
from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.data.latent_cache import cached_latents, encode_videos, encoder_fingerprint
from neodragon_cli.pipelines.data.video_folders import VideoFolderClips
from neodragon_cli.pipelines.data.world_section import WorldSection
from neodragon_cli.pipelines.eval.metrics import LPIPS
from neodragon_cli.pipelines.eval.reconstruction import judge_reconstructions
from neodragon_cli.pipelines.flow.pipeline import PIPELINE_FILE
from neodragon_cli.pipelines.models.causal_vae import AsymmetricCausalVideoVAE, CausalEncodingVAE, CausalVideoVAE
from neodragon_cli.pipelines.models.checkpoint import count_parameters
from neodragon_cli.pipelines.models.latents import LatentNorm
from neodragon_cli.pipelines.models.taehv import TAEHV
from neodragon_cli.pipelines.train import TrainingOutcome, copy_metrics, distributed, training_command
from neodragon_cli.pipelines.train.train_vae import clip_sampler, vae_folder
from neodragon_cli.pipelines.train.trainer import IndexedBatches, Trainer, TrainerConfig, latest_checkpoint, seed_everything
from neodragon_cli.recipes import setting

FAMILIES = {"taehv-8x": "vae/neodragon-asymmetric", "causal-narrow": "vae/pyramid-flow"}
PERCEPTUAL = ("lpips", "edge")
FROZEN = ("encoder.", "quant_conv.")
RAW_LATENTS = LatentNorm(image_shift=0.0, image_scale=1.0, video_shift=0.0, video_scale=1.0)
# The published TAEHV decoder's first TGrow (Sequential index 7) has stride 1; taehv-8x gives it stride 2.
RESTRIDED_TGROW = "decoder.blocks.7."


@dataclass
class DecoderSection:
    family: str = setting("taehv-8x", f"the student decoder: {', '.join(FAMILIES)}")
    init: str = setting("", "start from this decoder: taehv-8x, a published TAEHV checkpoint (taehv.pth / .safetensors / folder) or a Neodragon asymmetric VAE folder; causal-narrow, a causal VAE folder of the same decoder shape; empty: from scratch")
    num_features: list[int] = setting([256, 128, 64, 64], "taehv-8x: widths of the three MemBlock stages and the last conv")
    block_out_channels: list[int] = setting([], "causal-narrow: decoder widths per level (empty: half the parent's)")
    layers_per_block: list[int] = setting([], "causal-narrow: resnets per level (empty: the parent's)")
    norm_num_groups: int = setting(0, "causal-narrow: GroupNorm groups (0: the parent's)")


@dataclass
class DecoderLossSection:
    w_mse: float = setting(10.0, "weight of the pixel MSE")
    w_perceptual: float = setting(1.0, "weight of the perceptual term")
    perceptual: str = setting("lpips", "lpips (needs lpips_backbone) or edge (L1 of pixel differences: the substitute where no LPIPS weights exist)")
    lpips_backbone: str = setting("", "local torchvision AlexNet weights (alexnet-owt-7be5be79.pth) for LPIPS")
    lpips_heads: str = setting("", "local LPIPS linear heads (the lpips package's weights/v0.1/alex.pth); empty: uncalibrated")


@dataclass
class DecoderDataSection:
    annotations: str = setting("", "a Pyramid-Flow .jsonl (video, text) or OpenSora .csv (path, text) of real videos; empty: the Shapes world")
    root: str = setting("", "folder the annotation file's video paths are relative to (empty: the file's folder)")
    patch: list[int] = setting([17, 64, 64], "clip size [frames, height, width]: frames 1 + k * temporal compression, sides multiples of the spatial compression")
    clips: int = setting(1024, "fixed training clips whose encoder latents are cached")
    object_crops: float = setting(0.5, "Shapes: fraction of crops placed around an object")
    encode_batch: int = setting(4, "clips per encoder forward while caching")
    judge_videos: int = setting(0, "Shapes: held-out videos reconstructed and judged at the end (0: skip)")


@dataclass
class DistillDecoderRecipe:
    """Asymmetric decoder distillation: the parent's encoder frozen, a light decoder trained on its latents."""

    parent: str = setting("shapes-teacher", "the pipeline whose VAE encoder is kept: a folder with pipeline.json, or an embedded model's name")
    decoder: DecoderSection = field(default_factory=DecoderSection, metadata={"doc": "the student decoder"})
    loss: DecoderLossSection = field(default_factory=DecoderLossSection, metadata={"doc": "the reconstruction loss"})
    data: DecoderDataSection = field(default_factory=DecoderDataSection, metadata={"doc": "training clips and the latent cache"})
    world: WorldSection = field(default_factory=WorldSection, metadata={"doc": "the Shapes world (when data.annotations is empty)"})
    train: TrainerConfig = field(default_factory=TrainerConfig, metadata={"doc": "the trainer"})

    def validate(self) -> list[str]:
        problems = []
        if self.decoder.family not in FAMILIES:
            problems.append(f"unknown decoder.family '{self.decoder.family}' (known: {', '.join(FAMILIES)})")
        if self.loss.perceptual not in PERCEPTUAL:
            problems.append(f"unknown loss.perceptual '{self.loss.perceptual}' (known: {', '.join(PERCEPTUAL)})")
        if self.loss.w_mse < 0 or self.loss.w_perceptual < 0 or self.loss.w_mse + self.loss.w_perceptual == 0:
            problems.append("loss weights must be non-negative and not both zero")
        if len(self.data.patch) != 3 or min(self.data.patch) < 1:
            problems.append(f"data.patch must be [frames, height, width] of positive sizes, got {self.data.patch}")
        if self.data.clips < 1 or self.data.encode_batch < 1:
            problems.append("data.clips and data.encode_batch must be at least 1")
        return problems


# ---------------------------------------------------------------------------------------------- parent


@dataclass
class Parent:
    """The parent pipeline folder, its pipeline.json and its causal VAE (the frozen encoder's source)."""

    folder: Path
    spec: dict
    vae: CausalEncodingVAE

    @property
    def vae_path(self) -> str:
        return self.spec["components"]["vae"]["path"]


def load_parent(parent: str) -> Parent:
    """The parent pipeline's causal VAE (UsageError when it has none whose encoder could be kept)."""
    from neodragon_cli import registry

    folder = resolve_model(parent)
    spec_path = folder / PIPELINE_FILE
    if not spec_path.is_file():
        raise UsageError(f"{folder} has no {PIPELINE_FILE}", hint="distill-decoder reads a neodragon pipeline folder")
    spec = json.loads(spec_path.read_text())
    components = spec.get("components", {})
    if "decoder" in components:
        raise UsageError(f"{folder} decodes with a separate decoder role", hint="distil from a pipeline whose vae role decodes")
    entry = components.get("vae")
    if entry is None:
        raise UsageError(f"{folder}: no vae role in {PIPELINE_FILE}, so no encoder to keep")
    try:
        vae = registry.get(entry["component"]).load(folder / entry["path"])
    except CheckpointError as exc:
        raise UsageError(f"cannot load the parent's VAE: {exc.message}", hint=exc.hint) from None
    if not isinstance(vae, CausalEncodingVAE):
        raise UsageError(f"{folder}: its vae ({entry['component']}) has no causal-VAE encoder to keep",
                         hint="the parent's vae role must be vae/pyramid-flow or vae/neodragon-asymmetric")
    return Parent(folder, spec, vae.float().eval())


# ---------------------------------------------------------------------------------------------- student


def _config_for(cls: type, config: dict) -> dict:
    fields = set(cls.config_fields())
    return {k: v for k, v in config.items() if k in fields}


def build_student(section: DecoderSection, parent: CausalEncodingVAE) -> tuple[CausalEncodingVAE, list[str]]:
    """The parent's encoder (weights copied, frozen) with a new decoder of `section.family`; returns it
    and the decoder keys left at their fresh initialisation when starting from `section.init`."""
    encoder_config = {k: v for k, v in parent.config.items() if k.startswith("encoder_")}
    if section.family == "taehv-8x":
        student = AsymmetricCausalVideoVAE(
            **_config_for(AsymmetricCausalVideoVAE, encoder_config), decoder_num_features=tuple(section.num_features),
            temporal_downsample_scale=parent.temporal_compression, spatial_downsample_scale=parent.spatial_compression)
    else:
        if not isinstance(parent, CausalVideoVAE):
            raise UsageError("decoder.family=causal-narrow narrows the parent's causal decoder; the parent's VAE has none",
                             hint="use decoder.family=taehv-8x, or a parent with a vae/pyramid-flow VAE")
        config = parent.config
        widths = section.block_out_channels or [max(1, w // 2) for w in config["decoder_block_out_channels"]]
        layers = section.layers_per_block or list(config["decoder_layers_per_block"])
        groups = section.norm_num_groups or config["decoder_norm_num_groups"]
        if len(widths) != len(config["decoder_block_out_channels"]) or len(layers) != len(widths) or any(w % groups for w in widths):
            raise UsageError(f"causal-narrow decoder widths {widths} / layers {layers} / groups {groups} do not fit the parent's "
                             f"{len(config['decoder_block_out_channels'])} levels", hint="one width and layer count per level, each width a multiple of the groups")
        student = CausalVideoVAE(**{**_config_for(CausalVideoVAE, config), "decoder_block_out_channels": tuple(widths),
                                    "decoder_layers_per_block": tuple(layers), "decoder_norm_num_groups": groups})
    kept = {k: v for k, v in parent.state_dict().items() if k.startswith((*FROZEN, "post_quant_conv."))}
    student.load_state_dict(kept, strict=False)
    fresh = _load_decoder_init(student, section) if section.init else []
    for module in (student.encoder, student.quant_conv):
        module.requires_grad_(False)
    return student, fresh


def _load_decoder_init(student: CausalEncodingVAE, section: DecoderSection) -> list[str]:
    """Load `section.init`'s decoder into `student`; returns the decoder keys left fresh."""
    from neodragon_cli import registry

    path = Path(section.init)
    if not path.exists():
        raise UsageError(f"decoder.init {path} does not exist")
    try:
        if section.family == "taehv-8x" and registry.get("vae/taehv").detect(path):
            published = TAEHV.read_checkpoint(path).state
            state = {f"decoder.blocks.{k.removeprefix('decoder.')}": v for k, v in published.items() if k.startswith("decoder.")}
            state = {k: v for k, v in state.items() if not k.startswith(RESTRIDED_TGROW)}
        else:
            cls = AsymmetricCausalVideoVAE if section.family == "taehv-8x" else CausalVideoVAE
            state = {k: v for k, v in cls.read_checkpoint(vae_folder(path)).state.items() if k.startswith("decoder.")}
    except CheckpointError as exc:
        raise UsageError(f"cannot read decoder.init: {exc.message}", hint=exc.hint) from None
    own = {k: v for k, v in student.state_dict().items() if k.startswith("decoder.")}
    matching = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    if not matching:
        raise UsageError(f"decoder.init {path} holds no decoder layer of this student's shapes",
                         hint=f"give a checkpoint of the {section.family} family with the recipe's widths")
    student.load_state_dict(matching, strict=False)
    return sorted(k for k in own if k not in matching)


# ---------------------------------------------------------------------------------------------- data


def check_patch(patch: list[int], vae: CausalEncodingVAE) -> None:
    """UsageError unless frames = 1 + k * temporal and the sides are multiples of spatial compression."""
    frames, height, width = patch
    t, s = vae.temporal_compression, vae.spatial_compression
    if (frames - 1) % t or height % s or width % s:
        raise UsageError(f"data.patch {patch} does not fit the VAE's compression ({t}x temporal, {s}x spatial)",
                         hint=f"frames 1 + k*{t}, height and width multiples of {s}")


def clip_source(recipe: DistillDecoderRecipe):
    """`clip(index) -> [3, frames, height, width]` in [-1, 1]: Shapes or the annotation file's videos."""
    data = recipe.data
    if data.annotations:
        return VideoFolderClips(data.annotations, tuple(data.patch), recipe.train.seed, data.root)
    frames, side, width = data.patch
    world = recipe.world
    if side != width or side > min(world.height, world.width) or frames > world.frames:
        raise UsageError(f"data.patch {data.patch} does not fit the Shapes world ({world.frames} x {world.height} x {world.width})",
                         hint="on the Shapes world the patch is square, within the canvas, at most world.frames long")
    settings = SimpleNamespace(world=recipe.world, data=SimpleNamespace(clip_frames=frames, crop=side, object_crops=data.object_crops))
    return clip_sampler(settings)


def cached_clip_latents(recipe: DistillDecoderRecipe, vae: CausalEncodingVAE, clip, path: Path) -> torch.Tensor:
    """Raw encoder latents (posterior means) [clips, C, t, h, w] of clips 0..clips-1, cached at `path`."""
    data = recipe.data
    source = {"what": "decoder clips", "encoder": encoder_fingerprint(vae, RAW_LATENTS),
              "clips": json.dumps({"annotations": data.annotations, "root": data.root, "patch": data.patch,
                                   "object_crops": data.object_crops, "seed": recipe.train.seed,
                                   "world": dataclasses.asdict(recipe.world)}, sort_keys=True)}

    def encode(indices: range) -> torch.Tensor:
        return encode_videos(vae, torch.stack([clip(i) for i in indices]))

    return cached_latents(path, data.clips, data.encode_batch, "clips", source, encode)


# ---------------------------------------------------------------------------------------------- loss


def _frames(video: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W]."""
    return video.transpose(1, 2).flatten(0, 1)


class EdgeDistance(nn.Module):
    """Per image: mean L1 between the horizontal and vertical pixel differences of a and b [N, 3, H, W]."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        dx = ((a[..., 1:] - a[..., :-1]) - (b[..., 1:] - b[..., :-1])).abs().mean((1, 2, 3))
        dy = ((a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])).abs().mean((1, 2, 3))
        return dx + dy


def perceptual_distance(section: DecoderLossSection) -> tuple[nn.Module | None, str]:
    """The perceptual network (frozen) and its description for the artifact."""
    if section.w_perceptual == 0:
        return None, "none (w_perceptual 0)"
    if section.perceptual == "edge":
        return EdgeDistance(), "edge (L1 of horizontal and vertical pixel differences, substitute for LPIPS)"
    if not section.lpips_backbone:
        raise UsageError("loss.perceptual=lpips needs loss.lpips_backbone=PATH (torchvision alexnet-owt-7be5be79.pth)",
                         hint="give local LPIPS weights, or name the substitute: loss.perceptual=edge")
    try:
        model = LPIPS.from_files(section.lpips_backbone, section.lpips_heads or None)
    except CheckpointError as exc:
        raise UsageError(exc.message, hint=exc.hint) from None
    heads = "calibrated heads" if section.lpips_heads else "uncalibrated (no linear heads)"
    return model.requires_grad_(False).eval(), f"lpips (AlexNet, {heads})"


def decoder_loss(section: DecoderLossSection, perceptual: nn.Module | None):
    """loss(vae, {latents, video}) = w_mse * MSE + w_perceptual * mean per-frame perceptual distance."""

    def loss_fn(vae: CausalEncodingVAE, batch: dict, generator: torch.Generator):
        recon = vae.decode(batch["latents"]).float()
        target = batch["video"]
        mse = F.mse_loss(recon, target)
        loss, metrics = section.w_mse * mse, {"mse": mse.detach()}
        if perceptual is not None:
            distance = perceptual(_frames(recon), _frames(target)).float().mean()
            loss = loss + section.w_perceptual * distance
            metrics["perceptual"] = distance.detach()
        return loss, metrics

    return loss_fn


# ---------------------------------------------------------------------------------------------- artifact


def write_artifact(art: ArtifactWriter, parent: Parent, student: CausalEncodingVAE, component: str) -> None:
    """The parent pipeline with its vae role replaced by `student`; the latent normalisation is
    written out when the parent took it from its VAE class (the student's class may name another)."""
    art.copy_pipeline(parent.folder, replace="vae")
    student.save_pretrained(art.path / parent.vae_path)
    art.set_role("vae", component, parent.vae_path)
    if "latent_norm" not in parent.spec:
        spec = json.loads((art.path / PIPELINE_FILE).read_text())
        spec["latent_norm"] = parent.vae.latent_norm
        write_json(art.path / PIPELINE_FILE, spec)


@training_command("distill-decoder", DistillDecoderRecipe)
def distill_decoder(recipe: DistillDecoderRecipe, out: Path, *, recipe_yaml: str, resume: bool, overwrite: bool) -> TrainingOutcome:
    """Check everything, cache the encoder latents and train in `OUT.work/`, then (rank 0) write `OUT`."""
    parent = load_parent(recipe.parent)
    check_patch(recipe.data.patch, parent.vae)
    perceptual, perceptual_name = perceptual_distance(recipe.loss)
    clip = clip_source(recipe)
    seed_everything(recipe.train.seed)  # a fresh decoder follows the recipe's seed
    student, fresh = build_student(recipe.decoder, parent.vae)
    work = out.with_name(out.name + ".work")
    if not resume and latest_checkpoint(work / "run") is not None:
        raise UsageError(f"{work} holds checkpoints of an earlier run", hint="pass --resume to continue it, or delete the folder")
    writer = ArtifactWriter(out, command="distill-decoder", recipe_yaml=recipe_yaml, parent=parent.folder, overwrite=overwrite)

    env = distributed.setup()
    cache = work / "latents.safetensors"
    if env.is_main:
        latents = cached_clip_latents(recipe, parent.vae, clip, cache)
    distributed.barrier()
    if not env.is_main:
        latents = cached_clip_latents(recipe, parent.vae, clip, cache)
    data = IndexedBatches(lambda i: {"latents": latents[i], "video": clip(i)}, length=recipe.data.clips, seed=recipe.train.seed)
    trainer = Trainer(student, decoder_loss(recipe.loss, perceptual), data, recipe.train, work / "run", resume=resume, samples="clips")
    first_step, started = trainer.step, time.perf_counter()
    result = trainer.fit()
    clips_s = (result.step - first_step) * recipe.train.batch_size / max(time.perf_counter() - started, 1e-9)
    if result.stopped or not env.is_main:
        return TrainingOutcome(result.step, work, artifact=None if result.stopped else out)
    student = trainer.model.cpu().eval()
    summary = {"family": recipe.decoder.family, "steps": result.step, "perceptual_loss": perceptual_name,
               "params_decoder": count_parameters(student.decoder) + count_parameters(student.post_quant_conv),
               "params_parent_decoder": count_parameters(parent.vae.decoder) + count_parameters(parent.vae.post_quant_conv),
               "decoder_init": recipe.decoder.init or None, "reinitialised_from_init": fresh, "clips_s": clips_s}
    if recipe.data.judge_videos and not recipe.data.annotations:
        summary["reconstruction"] = judge_reconstructions(student, recipe.world, recipe.data.judge_videos)
    with writer as art:
        write_artifact(art, parent, student, FAMILIES[recipe.decoder.family])
        copy_metrics(work / "run", art)
        art.log_metrics({"step": result.step, **{k: v for k, v in summary.items() if k != "reinitialised_from_init"}})
        art.record("distill-decoder", **summary)
    console.print(f"distill-decoder {recipe.decoder.family}: {result.step} steps, decoder {summary['params_decoder']:,} parameters "
                  f"(parent {summary['params_parent_decoder']:,}), perceptual term {perceptual_name}")
    return TrainingOutcome(result.step, work, artifact=out)
