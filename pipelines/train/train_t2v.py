"""`train-t2v`: stage 2 of the Shapes teacher, the text encoders and the pyramidal MMDiT.

A small T5 encoder (sentencepiece tokenizer trained on the caption grammar), a small CLIP-style
pooled encoder and the pyramidal MMDiT are trained together with the pyramidal flow-matching loss
with temporal pyramid (`pipelines/flow/losses.py`) on latents of rendered videos, encoded once by a
`train-vae` artifact (`pipelines/data/latent_cache.py`). Every step draws a fresh caption of the
video's scene (synonyms, omitted parts). The artifact is a pipeline folder (`pipeline.json` layout)
that `neodragon generate --model` loads.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from neodragon_cli.artifacts import ArtifactWriter
from neodragon_cli.atomic import write_json
from neodragon_cli.console import console
from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.data.caption_tokenizer import train_caption_tokenizer
from neodragon_cli.pipelines.data.latent_cache import (
    cache_whitening,
    encode_image_cache,
    encode_latent_cache,
    latent_object_mask,
)
from neodragon_cli.pipelines.data.shapes import ShapesVideoDataset, caption
from neodragon_cli.pipelines.data.world_section import WorldSection
from neodragon_cli.pipelines.flow.losses import FlowBatch, FlowLoss, build_flow_batch, pyramid_flow_loss
from neodragon_cli.pipelines.flow.pipeline import PIPELINE_FILE, PIPELINE_FORMAT
from neodragon_cli.pipelines.flow.sampler import SeededNoise, TextConditioning
from neodragon_cli.pipelines.flow.settings import GenerationSettings, SamplingConfig
from neodragon_cli.pipelines.models.causal_vae import CausalVideoVAE
from neodragon_cli.pipelines.models.latents import LatentNorm, normalize
from neodragon_cli.pipelines.models.mmdit import PyramidFlowMMDiT
from neodragon_cli.pipelines.models.text_encoders import (
    CLIPTextEncoder,
    T5TextEncoder,
    TextEncoderBundle,
    clip_text_config,
    load_tokenizer,
    t5_config,
)
from neodragon_cli.pipelines.train import TrainingOutcome, copy_metrics, distributed, training_command
from neodragon_cli.pipelines.train.trainer import Trainer, TrainerConfig, derive_seed, latest_checkpoint, seed_everything
from neodragon_cli.recipes import setting



@dataclass
class TextSection:
    vocab_size: int = setting(256, "sentencepiece vocabulary (the grammar supports fewer; capped by the trainer)")
    max_length: int = setting(32, "T5 tokens per prompt (padded)")
    t5_width: int = setting(128, "small T5: d_model")
    t5_layers: int = setting(2, "small T5: encoder layers")
    t5_heads: int = setting(4, "small T5: attention heads")
    clip_width: int = setting(128, "small CLIP: hidden size")
    clip_layers: int = setting(2, "small CLIP: layers")
    clip_heads: int = setting(4, "small CLIP: attention heads")
    pooled_dim: int = setting(64, "small CLIP: projection (pooled) size")


@dataclass
class MMDiTSection:
    num_layers: int = setting(6, "joint transformer blocks")
    num_attention_heads: int = setting(6, "heads")
    attention_head_dim: int = setting(32, "head width (inner width = heads x head width)")
    prediction: Literal["velocity", "clean"] = setting("velocity", "what the MMDiT outputs: velocity (as Pyramid-Flow) or clean (the stage's clean latent)")


@dataclass
class FlowSection:
    sample_ratios: list[int] = setting([1, 2, 1], "columns per pyramid stage (low, mid, high) in a batch")
    text_dropout: float = setting(0.1, "fraction of prompts replaced by the empty prompt (for CFG)")
    corrupt_ratio: float = setting(1 / 3, "history corruption c ~ U(0, corrupt_ratio)")
    object_weight: float = setting(0.0, "extra loss weight on latent cells an object's box covers (0 = plain MSE)")
    first_frame_share: float = setting(0.0, "probability that a stage trains latent frame 0 alone, else 1..T uniform")


@dataclass
class T2VDataSection:
    vae: str = setting("", "the train-vae artifact folder (required)")
    videos: int = setting(2000, "rendered videos encoded once into the latent cache")
    images: int = setting(0, "further scenes whose first frame alone (an image) is encoded into a second cache")
    image_share: float = setting(0.0, "fraction of batches drawn from the image cache (latent frame 0 only)")
    whiten: bool = setting(False, "whiten each latent cell (measured on the video cache, frame 0 apart) before the MMDiT sees it")
    whiten_floor: float = setting(0.01, "variance added to every direction before whitening (keeps near-empty ones small)")


@dataclass
class TrainT2VRecipe:
    """Stage 2 of the Shapes teacher: text encoders + pyramidal MMDiT."""

    world: WorldSection = field(default_factory=WorldSection, metadata={"doc": "the Shapes world"})
    data: T2VDataSection = field(default_factory=T2VDataSection, metadata={"doc": "latent cache"})
    text: TextSection = field(default_factory=TextSection, metadata={"doc": "text encoders"})
    mmdit: MMDiTSection = field(default_factory=MMDiTSection, metadata={"doc": "the denoiser"})
    flow: FlowSection = field(default_factory=FlowSection, metadata={"doc": "pyramid flow matching"})
    sampling: SamplingConfig = field(default_factory=SamplingConfig, metadata={"doc": "sampling defaults of the shipped pipeline"})
    train: TrainerConfig = field(default_factory=TrainerConfig, metadata={"doc": "the trainer"})

    def validate(self) -> list[str]:
        problems = []
        if len(self.flow.sample_ratios) != 3:
            problems.append("flow.sample_ratios needs one entry per pyramid stage (3)")
        elif self.train.batch_size % sum(self.flow.sample_ratios):
            problems.append(f"train.batch_size must be a multiple of sum(flow.sample_ratios) = {sum(self.flow.sample_ratios)}")
        if self.flow.object_weight < 0:
            problems.append(f"flow.object_weight must be >= 0, got {self.flow.object_weight}")
        if not 0 <= self.flow.first_frame_share <= 1:
            problems.append(f"flow.first_frame_share must be in [0, 1], got {self.flow.first_frame_share}")
        if self.data.images < 0:
            problems.append(f"data.images must be >= 0, got {self.data.images}")
        if not 0 <= self.data.image_share <= 1:
            problems.append(f"data.image_share must be in [0, 1], got {self.data.image_share}")
        elif self.data.image_share > 0 and self.data.images <= 0:
            problems.append("data.image_share > 0 needs data.images > 0 (the image cache it draws from)")
        if self.data.whiten_floor <= 0:
            problems.append(f"data.whiten_floor must be > 0, got {self.data.whiten_floor}")
        return problems


class TextToVideoModel(nn.Module):
    """What stage 2 trains: the text bundle and the MMDiT, as one module."""

    def __init__(self, text_encoder: nn.Module, mmdit: nn.Module):
        super().__init__()
        self.text_encoder, self.mmdit = text_encoder, mmdit

    def condition(self, prompts: list[str]) -> TextConditioning:
        embeds, mask, pooled = self.text_encoder(prompts)
        return TextConditioning(embeds, mask, pooled)


def build_t2v(recipe: TrainT2VRecipe, tokenizer_dir: Path) -> TextToVideoModel:
    tokenizer = load_tokenizer(tokenizer_dir)  # the class `text/bundle` loads it with again
    t = recipe.text
    t5 = T5TextEncoder(t5_config(vocab_size=len(tokenizer), d_model=t.t5_width, num_layers=t.t5_layers,
                                 num_heads=t.t5_heads, d_ff=2 * t.t5_width, dropout_rate=0.0))
    clip = CLIPTextEncoder(clip_text_config(vocab_size=len(tokenizer), hidden_size=t.clip_width, num_layers=t.clip_layers,
                                            num_heads=t.clip_heads, intermediate_size=2 * t.clip_width,
                                            projection_dim=t.pooled_dim, max_position_embeddings=t.max_length,
                                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id))
    tokenizer.model_max_length = t.max_length
    bundle = TextEncoderBundle(tokenizer, t5, [tokenizer], [clip], max_length=t.max_length)
    m = recipe.mmdit
    latent_size = recipe.world.height // 8
    mmdit = PyramidFlowMMDiT(
        sample_size=latent_size, patch_size=2, in_channels=16, num_layers=m.num_layers,
        attention_head_dim=m.attention_head_dim, num_attention_heads=m.num_attention_heads,
        caption_projection_dim=m.num_attention_heads * m.attention_head_dim, pooled_projection_dim=t.pooled_dim,
        pos_embed_max_size=max(latent_size // 2, 16), max_num_frames=64, joint_attention_dim=t.t5_width,
        prediction=m.prediction,
    )
    return TextToVideoModel(bundle, mmdit)


def draw_units(generator: torch.Generator, frames: int, first_share: float = 0.0) -> list[int]:
    """Latent frames trained per pyramid stage: 1..frames uniformly, or 1 alone (the first frame, an
    image) with probability `first_share`, since the first frame sets every later one."""
    units = torch.randint(1, frames + 1, (3,), generator=generator)
    if first_share > 0:
        units = torch.where(torch.rand(3, generator=generator) < first_share, 1, units)
    return [int(u) for u in units]


def t2v_flow_batch(flow_settings: FlowSection, model: TextToVideoModel, batch: dict, generator: torch.Generator) -> FlowBatch:
    """One training step's pyramid flow-matching inputs and targets for `batch` (latents, captions,
    optional object masks), every random draw from `generator`."""
    noise = SeededNoise(int(torch.randint(0, 2**62, (1,), generator=generator)))
    latents = batch["latents"]
    text = model.condition(batch["captions"])
    null = model.condition([""])
    # temporal pyramid: each stage trains one frame position, with the frames before it as history
    units = draw_units(generator, latents.shape[2], flow_settings.first_frame_share)
    return build_flow_batch(latents, text, null, noise, sample_ratios=tuple(flow_settings.sample_ratios),
                            units_per_stage=units, corrupt_ratio=flow_settings.corrupt_ratio,
                            text_dropout=flow_settings.text_dropout, focus=batch.get("object_masks"),
                            focus_weight=flow_settings.object_weight)


def stage_losses(out: FlowLoss, flow: FlowBatch) -> dict[str, torch.Tensor]:
    """The loss of each pyramid stage present in `flow` (`loss_stage{s}`, detached)."""
    stage_of_sample = torch.tensor([c.stage for c in flow.columns for _ in c.samples])  # column order
    return {f"loss_stage{s}": out.per_sample[stage_of_sample == s].mean().detach()
            for s in sorted(set(stage_of_sample.tolist()))}


def t2v_loss(recipe: TrainT2VRecipe):
    def loss_fn(model: TextToVideoModel, batch: dict, generator: torch.Generator):
        flow = t2v_flow_batch(recipe.flow, model, batch, generator)
        out = pyramid_flow_loss(model.mmdit, flow)
        return out.loss, stage_losses(out, flow)

    return loss_fn


def _dataset(recipe: TrainT2VRecipe) -> ShapesVideoDataset:
    """Scenes 0..videos-1 are the videos; the image scenes follow them, so the two never share a scene."""
    length = recipe.data.videos + recipe.data.images
    return ShapesVideoDataset(recipe.world.world(), length=length, seed=recipe.world.seed, split=recipe.world.split)


def flow_batches(recipe: TrainT2VRecipe, latents: torch.Tensor, images: torch.Tensor | None = None):
    """Batches of video latents, or (a `data.image_share` of them, chosen per batch from its first
    position) of first-frame latents of the image scenes."""
    dataset = _dataset(recipe)
    seed, share = recipe.world.seed, recipe.data.image_share
    scenes = {}

    def scene(i: int):
        if i not in scenes:  # the scene only (rendering is not needed: the latents are cached)
            rng = np.random.default_rng((dataset.seed, i))
            scenes[i] = dataset.world.sample_scene(rng, dataset.split)
        return scenes[i]

    def batch(positions: range) -> dict:
        use_images = share > 0 and np.random.default_rng((seed, positions.start, 3)).random() < share
        source, offset = (images, recipe.data.videos) if use_images else (latents, 0)
        index = [derive_seed(seed, p) % source.shape[0] for p in positions]
        chosen = [scene(offset + i) for i in index]
        captions = [caption(sc, np.random.default_rng((seed, p, 2))).text for sc, p in zip(chosen, positions)]
        out = {"latents": source[index], "captions": captions}
        if recipe.flow.object_weight > 0:
            grid = tuple(source.shape[-2:])
            masks = [latent_object_mask(dataset.world, sc, grid)[: source.shape[2]] for sc in chosen]
            out["object_masks"] = torch.from_numpy(np.stack(masks))
        return out

    return batch


def _check_resume(work: Path, recipe: TrainT2VRecipe, resume: bool) -> None:
    """Checkpoints hold weights only, so the work folder records what they were trained as: on whitened
    latents (`whitening.json`) and predicting what (`prediction.json`; folders from before the option
    hold velocity MMDiTs). A resume that would read the weights otherwise is refused, before the VAE is
    loaded or any cache encoded (reads only: every rank checks alike)."""
    if not (resume and latest_checkpoint(work / "run") is not None):
        return
    whitened_run = (work / "whitening.json").is_file()
    if whitened_run != recipe.data.whiten:
        raise UsageError(f"the checkpoints in {work} were trained on {'whitened' if whitened_run else 'unwhitened'} latents",
                         hint=f"resume with data.whiten={str(whitened_run).lower()}")
    stored = _stored_prediction(work)
    if stored != recipe.mmdit.prediction:
        raise UsageError(f"the checkpoints in {work} are of an MMDiT that predicts {stored}",
                         hint=f"resume with mmdit.prediction={stored}")


def _stored_prediction(work: Path) -> str:
    """What the work folder's MMDiT predicts (no record: velocity, as before the option)."""
    path = work / "prediction.json"
    return json.loads(path.read_text())["prediction"] if path.is_file() else "velocity"


def _prepare_work(recipe: TrainT2VRecipe, vae: CausalVideoVAE, norm: LatentNorm,
                  work: Path) -> tuple[torch.Tensor, torch.Tensor | None, LatentNorm]:
    """Fill the work folder (prediction record of a fresh run, caption tokenizer, latent caches,
    whitening) where it lacks them, and return the latents the MMDiT trains on (videos, first-frame
    images or None) and the latent normalisation the pipeline ships (with the whitening when used).
    Where the folder holds them already, as on the ranks after rank 0, this only reads."""
    work.mkdir(parents=True, exist_ok=True)
    if latest_checkpoint(work / "run") is None and _stored_prediction(work) != recipe.mmdit.prediction:
        write_json(work / "prediction.json", {"prediction": recipe.mmdit.prediction})
    tokenizer_dir = work / "tokenizer"
    if not (tokenizer_dir / "spiece.model").is_file():
        train_caption_tokenizer(tokenizer_dir, vocab_size=recipe.text.vocab_size, seed=recipe.world.seed)
    started = time.time()
    vae = vae.to(memory_format=torch.channels_last_3d)
    latents = encode_latent_cache(recipe.world, recipe.data.videos, vae, norm, work / "latents.safetensors")
    console.print(f"latent cache {tuple(latents.shape)} ready ({time.time() - started:.0f} s)")
    images = None
    if recipe.data.images:
        started = time.time()
        images = encode_image_cache(recipe.world, recipe.data.videos, recipe.data.images, vae, norm,
                                    work / "images.safetensors")
        console.print(f"image cache {tuple(images.shape)} ready ({time.time() - started:.0f} s)")
    if recipe.data.whiten:  # the caches stay scalar-normalised; the MMDiT trains on whitened latents
        whitening = cache_whitening(latents, recipe.data.whiten_floor, work / "whitening.json")
        latents = normalize(latents, whitening)
        images = None if images is None else normalize(images, whitening)
        norm = dataclasses.replace(norm, image_whitening=whitening.image_whitening, video_whitening=whitening.video_whitening)
    return latents, images, norm


@training_command("train-t2v", TrainT2VRecipe)
def train_t2v(recipe: TrainT2VRecipe, out: Path, *, recipe_yaml: str, resume: bool, overwrite: bool) -> TrainingOutcome:
    """Encode the caches and train in `OUT.work/`, then (rank 0) write the pipeline folder `out/`."""
    if not recipe.data.vae:
        raise UsageError("data.vae is not set", hint="pass data.vae=PATH of a train-vae artifact")
    vae_dir = Path(recipe.data.vae)
    if not (vae_dir / "vae").is_dir() or not (vae_dir / "latent_norm.json").is_file():
        raise UsageError(f"{vae_dir} is not a train-vae artifact (no vae/ or latent_norm.json)")
    work = out.with_name(out.name + ".work")
    _check_resume(work, recipe, resume)
    vae = CausalVideoVAE.from_pretrained(vae_dir / "vae").eval()
    norm = LatentNorm(**json.loads((vae_dir / "latent_norm.json").read_text()))
    latents, images, norm = distributed.rank_zero_first(lambda: _prepare_work(recipe, vae, norm, work))
    seed_everything(recipe.train.seed)  # the initial weights too follow the recipe's seed
    model = build_t2v(recipe, work / "tokenizer")
    trainer = Trainer(model, t2v_loss(recipe), flow_batches(recipe, latents, images), recipe.train, work / "run", resume=resume)
    result = trainer.fit()
    if result.stopped:
        return TrainingOutcome(result.step, work, artifact=None)
    if not trainer.env.is_main:
        return TrainingOutcome(result.step, work, artifact=out)
    model = trainer.model.eval()
    spec = {
        "format": PIPELINE_FORMAT,
        "components": {
            "text_encoder": {"component": "text/bundle", "path": "text"},
            "mmdit": {"component": "mmdit/pyramid-flow", "path": "mmdit"},
            "vae": {"component": "vae/pyramid-flow", "path": "vae"},
        },
        "latent_norm": norm.to_dict(),
        "sampling": GenerationSettings.from_config(
            recipe.sampling, mode="monolithic", frames=recipe.world.frames, height=recipe.world.height,
            width=recipe.world.width, fps=24, sr=False, negative_prompt="",
        ).as_dict(),
    }
    with ArtifactWriter(out, command="train-t2v", recipe_yaml=recipe_yaml, parent=vae_dir, overwrite=overwrite) as art:
        model.text_encoder.save_pretrained(art.path / "text")
        model.mmdit.save_pretrained(art.path / "mmdit")
        vae.to(memory_format=torch.contiguous_format).save_pretrained(art.path / "vae")
        write_json(art.path / PIPELINE_FILE, spec)
        copy_metrics(work / "run", art)
        art.record("train-t2v", steps=result.step, videos=recipe.data.videos, images=recipe.data.images,
                   image_share=recipe.data.image_share)
    return TrainingOutcome(result.step, work, artifact=out)
