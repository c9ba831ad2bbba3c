"""Training the Shapes-world teacher: the real architectures at small widths, on two CPU cores.

Stage 1 (`train-vae`): the Pyramid-Flow causal video VAE (8x8x8, 16 latent channels) learns to
reconstruct Shapes clips. 3-D convolutions are only fast on this kind of CPU in bf16 with the
channels-last-3d layout (oneDNN/AMX), so training runs under bf16 autocast on random crops of short
clips; the VAE is fully convolutional and causal, so it then encodes whole 49-frame videos. The latent
normalisation factors (frame 0 vs later frames, as Pyramid-Flow has) are measured on encoded videos.

Stage 2 (`train-t2v`): a small T5 encoder (sentencepiece tokenizer trained on the caption grammar),
a small CLIP-style pooled encoder and the pyramidal MMDiT are trained together with the pyramidal
flow-matching loss with temporal pyramid (`pipelines/flow/losses.py`) on pre-encoded latents of
rendered videos. Every step draws a fresh caption of the video's scene (synonyms, omitted parts).
The result is a pipeline folder (`pipeline.json` layout) that `neodragon generate --model` loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from neodragon_cli.artifacts import ArtifactWriter
from neodragon_cli.atomic import save_safetensors, write_json
from neodragon_cli.console import console, progress
from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.data.shapes import (
    SIZES,
    ObjectSpec,
    PromptSpec,
    Scene,
    ShapesVideoDataset,
    ShapesWorld,
    caption,
    video_tensor,
)
from neodragon_cli.pipelines.flow.losses import build_flow_batch, pyramid_flow_loss
from neodragon_cli.pipelines.flow.sampler import SeededNoise, TextConditioning
from neodragon_cli.pipelines.models.causal_vae import CausalVideoVAE
from neodragon_cli.pipelines.models.latents import LatentNorm, Whitening, normalize
from neodragon_cli.pipelines.train.trainer import Trainer, TrainerConfig, derive_seed, latest_checkpoint
from neodragon_cli.recipes import recipe_schema, setting


@dataclass
class WorldSection:
    height: int = setting(128, "canvas height (multiple of 64)")
    width: int = setting(128, "canvas width (multiple of 64)")
    frames: int = setting(49, "frames per video (1 + 8k)")
    split: str = setting("train", "scene split the training data comes from")
    seed: int = setting(0, "data seed (video i is a pure function of (seed, i))")

    def validate(self) -> list[str]:
        problems = [f"{k} must be a multiple of 64" for k in ("height", "width") if getattr(self, k) % 64]
        if (self.frames - 1) % 8:
            problems.append("frames must be of the form 1 + 8k")
        return problems

    def world(self) -> ShapesWorld:
        return ShapesWorld(height=self.height, width=self.width, frames=self.frames)


# ---------------------------------------------------------------------------------------------- VAE


@dataclass
class VAEModelSection:
    block_out_channels: list[int] = setting([16, 32, 64, 64], "widths of the four encoder/decoder levels")
    layers_per_block: list[int] = setting([1, 1, 1, 1], "resnet blocks per level")
    decoder_block_out_channels: list[int] = setting([], "decoder widths when they differ from the encoder's (empty: block_out_channels)")
    decoder_layers_per_block: list[int] = setting(
        [], "decoder resnet blocks per level when they differ (empty: layers_per_block); with model.init and the "
        "parent's decoder widths, a deeper decoder keeps the parent's resnets and starts the added ones as identities")
    norm_num_groups: int = setting(8, "GroupNorm groups (must divide every width)")
    init: str = setting("", "start from the weights of this train-vae artifact (fine-tuning); empty: random init")
    train_encoder: bool = setting(True, "false: freeze the encoder (decoder-only fine-tuning keeps the latents, so an MMDiT trained on them stays valid)")

    def decoder_shape(self) -> tuple[list[int], list[int]]:
        return (list(self.decoder_block_out_channels or self.block_out_channels),
                list(self.decoder_layers_per_block or self.layers_per_block))

    def build(self) -> CausalVideoVAE:
        vae = self._build()
        if not self.train_encoder:
            for module in (vae.encoder, vae.quant_conv):
                module.requires_grad_(False)
        return vae

    def _build(self) -> CausalVideoVAE:
        widths, layers = self.decoder_shape()
        groups = self.norm_num_groups
        fresh = dict(decoder_block_out_channels=tuple(widths), decoder_layers_per_block=tuple(layers), decoder_norm_num_groups=groups)
        if not self.init:
            return CausalVideoVAE(
                encoder_block_out_channels=tuple(self.block_out_channels), encoder_layers_per_block=tuple(self.layers_per_block),
                encoder_norm_num_groups=groups, sample_size=128, **fresh,
            )
        # GroupNorm parameters are per channel, so the group count may change when fine-tuning
        vae = CausalVideoVAE.from_pretrained(_vae_folder(self.init), encoder_norm_num_groups=groups, decoder_norm_num_groups=groups)
        config = vae.config
        if list(config["encoder_block_out_channels"]) != list(self.block_out_channels):
            raise UsageError(f"model.init {self.init} has widths {list(config['encoder_block_out_channels'])}, "
                             f"the recipe asks for {self.block_out_channels}")
        parent_widths, parent_layers = list(config["decoder_block_out_channels"]), list(config["decoder_layers_per_block"])
        if (parent_widths, parent_layers) == (widths, layers):
            return vae
        other = CausalVideoVAE(**{**config, **fresh})
        deeper = parent_widths == widths and all(n >= p for n, p in zip(layers, parent_layers, strict=True))
        if deeper:
            _load_deepened(other, vae, parent_layers)
        else:  # another decoder shape: keep the encoder (so the latents) and start a new decoder
            kept = {k: v for k, v in vae.state_dict().items() if not k.startswith("decoder.")}
            other.load_state_dict({**other.state_dict(), **kept})
        return other


def _load_deepened(vae: CausalVideoVAE, parent: CausalVideoVAE, parent_layers: list[int]) -> None:
    """Load `parent` into `vae`, whose decoder has the same widths and at least as many resnets per block:
    each block's first resnets are the parent's, and the added ones start as identities (their last
    convolution zeroed), so the deeper decoder begins by decoding exactly as its parent."""
    missing, unexpected = vae.load_state_dict(parent.state_dict(), strict=False)
    added = []
    for i, block in enumerate(vae.decoder.up_blocks):
        for j in range(parent_layers[i], len(block.resnets)):
            conv = block.resnets[j].conv2.conv
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            added += [f"decoder.up_blocks.{i}.resnets.{j}.{k}" for k in block.resnets[j].state_dict()]
    assert not unexpected and sorted(missing) == sorted(added), "the parent's weights must fill all but the added resnets"


def _vae_folder(path: str | Path) -> Path:
    """The vae/ folder of a train-vae artifact (or the folder itself when it holds config.json)."""
    path = Path(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise UsageError(f"{path} is neither a train-vae artifact nor a VAE folder (no config.json)")
    return folder


@dataclass
class VAELossSection:
    l1: float = setting(1.0, "weight of the L1 reconstruction loss")
    mse: float = setting(1.0, "weight of the MSE reconstruction loss")
    kl: float = setting(1e-6, "weight of the KL term (per element)")
    foreground: float = setting(0.0, "extra reconstruction weight on pixels that differ from the clip's background")
    edge: float = setting(0.0, "extra reconstruction weight on pixels within about 1 px of an outline (a step between neighbouring pixels): corners and outlines set the judged shape")
    linear_colour: float = setting(0.0, "weight of the loss making latent channels 0-2 the mean RGB of the pixels each latent cell encodes")
    adversarial: float = setting(0.0, "hinge GAN term on the decoded frames, its gradient at the decoder's last layer this times the reconstruction loss's (0: off)")
    adversarial_start: int = setting(100, "critic-only batches before the decoder feels the critic")
    critic_frames: int = setting(8, "random frames per clip that the critic judges")
    latent_noise: float = setting(0.0, "largest std (relative to each latent channel's) of the noise added to the latent cells around objects before decoding: teaches the decoder the MMDiT's errors (0: off)")
    sample_posterior: bool = setting(False, "decode a posterior sample (true) or its mean (false: steadier on CPU budgets)")


@dataclass
class VAEDataSection:
    clip_frames: int = setting(9, "frames per training clip (1 + 8k)")
    crop: int = setting(64, "square random crop (pixels, multiple of 8)")
    object_crops: float = setting(0.0, "fraction of crops placed around an object (the rest anywhere)")
    norm_videos: int = setting(32, "whole videos encoded to measure the latent normalisation")
    judge_videos: int = setting(20, "held-out videos whose reconstructions are judged at the end (0: skip)")
    readout_videos: int = setting(0, "training scenes for the latent colour read-out check at the end (0: skip)")


@recipe_schema("train-vae")
@dataclass
class TrainVAERecipe:
    """Stage 1 of the Shapes teacher: the causal video VAE."""

    world: WorldSection = field(default_factory=WorldSection, metadata={"doc": "the Shapes world"})
    data: VAEDataSection = field(default_factory=VAEDataSection, metadata={"doc": "training clips"})
    model: VAEModelSection = field(default_factory=VAEModelSection, metadata={"doc": "VAE widths"})
    loss: VAELossSection = field(default_factory=VAELossSection, metadata={"doc": "loss weights"})
    train: TrainerConfig = field(default_factory=TrainerConfig, metadata={"doc": "the trainer"})

    def validate(self) -> list[str]:
        problems = []
        if (self.data.clip_frames - 1) % 8 or self.data.clip_frames > self.world.frames:
            problems.append("data.clip_frames must be 1 + 8k and at most world.frames")
        if self.data.crop % 8 or not 8 <= self.data.crop <= min(self.world.height, self.world.width):
            problems.append("data.crop must be a multiple of 8 within the canvas")
        widths, layers = self.model.decoder_shape()
        if any(c % self.model.norm_num_groups for c in [*self.model.block_out_channels, *widths]):
            problems.append("model.norm_num_groups must divide every block_out_channels and decoder_block_out_channels entry")
        if len(widths) != len(self.model.block_out_channels) or len(layers) != len(widths):
            problems.append("model.decoder_block_out_channels and model.decoder_layers_per_block need one entry per level "
                            f"({len(self.model.block_out_channels)})")
        if self.loss.adversarial < 0 or self.loss.adversarial_start < 0 or self.loss.critic_frames < 1:
            problems.append("loss.adversarial and loss.adversarial_start must be >= 0, loss.critic_frames >= 1")
        if self.loss.latent_noise < 0:
            problems.append(f"loss.latent_noise must be >= 0, got {self.loss.latent_noise}")
        if self.loss.foreground < 0 or self.loss.edge < 0:
            problems.append("loss.foreground and loss.edge must be >= 0")
        if self.loss.linear_colour < 0:
            problems.append(f"loss.linear_colour must be >= 0, got {self.loss.linear_colour}")
        elif self.loss.linear_colour and not self.model.train_encoder:
            problems.append("loss.linear_colour shapes the encoder's latents: it needs model.train_encoder=true")
        return problems


def _clip_sampler(recipe: TrainVAERecipe):
    dataset = ShapesVideoDataset(recipe.world.world(), length=10**9, seed=recipe.world.seed, split=recipe.world.split)
    t, c = recipe.data.clip_frames, recipe.data.crop

    def sample(index: int) -> torch.Tensor:
        scene, _, frames = dataset.item(index)
        video = video_tensor(frames)
        _, T, H, W = video.shape
        rng = np.random.default_rng((recipe.world.seed, index, 1))
        t0 = int(rng.integers(0, T - t + 1))
        if recipe.data.object_crops and rng.random() < recipe.data.object_crops:  # objects cover a few % of the canvas: show them more often
            obj = scene.objects[int(rng.integers(len(scene.objects)))]
            cx, cy = (float(v[t0 + t // 2]) for v in obj.centres(T))
            y0 = int(np.clip(cy * H - c / 2 + rng.uniform(-c / 4, c / 4), 0, H - c))
            x0 = int(np.clip(cx * W - c / 2 + rng.uniform(-c / 4, c / 4), 0, W - c))
        else:
            y0, x0 = int(rng.integers(0, H - c + 1)), int(rng.integers(0, W - c + 1))
        y0, x0 = y0 // 8 * 8, x0 // 8 * 8
        return video[:, t0 : t0 + t, y0 : y0 + c, x0 : x0 + c]

    return sample


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d)


def _foreground(clips: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """1 where a pixel of [B, 3, T, H, W] (in [-1, 1]) differs from its clip's background colour (the
    per-channel median: Shapes backgrounds are flat and cover most of the canvas), else 0."""
    background = clips.flatten(2).median(dim=2).values[:, :, None, None, None]
    return ((clips - background).abs().amax(dim=1, keepdim=True) > threshold).float()


def _edges(clips: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """1 on the pixels of [B, 3, T, H, W] (in [-1, 1]) within 1 px of a step of more than `threshold` in
    some channel between horizontal or vertical neighbours of a frame, else 0."""
    step = torch.zeros_like(clips[:, :1])
    dx = (clips[..., 1:] - clips[..., :-1]).abs().amax(dim=1, keepdim=True) > threshold
    dy = (clips[..., 1:, :] - clips[..., :-1, :]).abs().amax(dim=1, keepdim=True) > threshold
    step[..., 1:] += dx
    step[..., :-1] += dx
    step[..., 1:, :] += dy
    step[..., :-1, :] += dy
    return (F.max_pool3d(step, (1, 3, 3), stride=1, padding=(0, 1, 1)) > 0).float()


def pooled_colour(clips: torch.Tensor, temporal: int = 8, spatial: int = 8) -> torch.Tensor:
    """Mean RGB of the pixels each latent cell of the causal VAE encodes: `[B, 3, T, H, W]` ->
    `[B, 3, 1 + (T - 1) / temporal, H / spatial, W / spatial]` (frame 0 alone, then `temporal` frames each)."""
    first, rest = clips[:, :, :1], clips[:, :, 1:]
    b, c, t, h, w = rest.shape
    rest = rest.reshape(b, c, t // temporal, temporal, h, w).mean(3)
    return torch.nn.functional.avg_pool3d(torch.cat([first, rest], 2), (1, spatial, spatial))


def object_latent_noise(latents: torch.Tensor, clips: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Noise for the latents `[B, C, t, h, w]` of `clips` `[B, 3, T, H, W]`, on the cells within one cell of
    an object only, with per-channel std `s * std(channel)`, s ~ U(0, strength) per clip.

    Where the MMDiT's generated latents miss the encoder's, they miss on the objects (measured on latent 0
    from a true stage-1 start: mean squared error 0.33 on object cells, 0.02 on the background, five
    sixths of it at the finest 2x2 scale, larger in the high-variance channels). This noise shows the
    decoder inputs of that kind; on the shipped teacher it did not make the generated shapes better
    (docs/teacher_training.md)."""
    near_object = pooled_colour(_foreground(clips.float())) > 0
    near_object = F.max_pool3d(near_object.float(), (1, 3, 3), stride=1, padding=(0, 1, 1))
    channel_std = latents.detach().float().std(dim=(0, 2, 3, 4), keepdim=True)
    scale = strength * torch.rand(latents.shape[0], 1, 1, 1, 1, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    return (scale * channel_std * noise * near_object).to(latents.dtype)


class FrameCritic(nn.Module):
    """Patch discriminator on frames `[N, 3, H, W]` in [-1, 1] -> logits `[N, 1, H/4 - 2, W/4 - 2]`, one per
    34-pixel patch (PatchGAN layout: strided 4x4 convolutions, GroupNorm, LeakyReLU)."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int, norm: bool = True) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 4, stride, 1), *([nn.GroupNorm(8, c_out)] if norm else []), nn.LeakyReLU(0.2)]

        self.net = nn.Sequential(*block(3, width, 2, norm=False), *block(width, 2 * width, 2),
                                 *block(2 * width, 4 * width, 1), nn.Conv2d(4 * width, 1, 4, 1, 1))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames)


class VAEWithCritic(nn.Module):
    """What `train-vae` optimises when `loss.adversarial` > 0: the VAE and the critic of its frames, under one
    optimizer. `critic_batches` counts the critic's batches (checkpointed, so a resume keeps the warm-up)."""

    def __init__(self, vae: CausalVideoVAE, critic: FrameCritic):
        super().__init__()
        self.vae, self.critic = vae, critic
        self.register_buffer("critic_batches", torch.zeros((), dtype=torch.long))


def _adversarial(model: VAEWithCritic, clips: torch.Tensor, recon: torch.Tensor, reconstruction: torch.Tensor,
                 weights: VAELossSection, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Hinge GAN terms on `weights.critic_frames` random frames of each clip. The critic's loss sees the
    reconstruction detached and the decoder's sees the critic's weights detached, so one optimizer step
    moves each net by its own objective only. After the warm-up the decoder's term is scaled so that its
    gradient at the decoder's last layer is `weights.adversarial` times the reconstruction loss's (VQGAN's
    adaptive weight): plain pixel losses draw the mean of what a latent could be, a blur; the critic
    pays for edges."""
    _, _, t, h, w = clips.shape
    pick = torch.randperm(t, generator=generator)[: weights.critic_frames]
    real, fake = (x[:, :, pick].transpose(1, 2).reshape(-1, 3, h, w) for x in (clips.float(), recon))
    critic_loss = torch.relu(1 - model.critic(real)).mean() + torch.relu(1 + model.critic(fake.detach())).mean()
    frozen = {name: p.detach() for name, p in model.critic.named_parameters()}
    decoder_loss = -torch.func.functional_call(model.critic, frozen, (fake,)).mean()
    model.critic_batches += 1
    weight = torch.zeros(())  # built from gradients taken without a graph: a constant for the backward
    if model.critic_batches > weights.adversarial_start:
        last = model.vae.decoder.conv_out.conv.weight
        pixel_grad, = torch.autograd.grad(reconstruction, last, retain_graph=True)
        critic_grad, = torch.autograd.grad(decoder_loss, last, retain_graph=True)
        weight = weights.adversarial * (pixel_grad.norm() / (critic_grad.norm() + 1e-4)).clamp(max=1e4)
    loss = critic_loss + weight * decoder_loss
    return loss, {"critic": critic_loss.detach(), "adversarial": decoder_loss.detach(), "adversarial_weight": weight}


def vae_loss(weights: VAELossSection):
    def loss_fn(model: CausalVideoVAE | VAEWithCritic, clips: torch.Tensor, generator: torch.Generator):
        vae = model.vae if isinstance(model, VAEWithCritic) else model
        clips = _channels_last(clips)
        with torch.set_grad_enabled(vae.quant_conv.conv.weight.requires_grad):  # a frozen encoder needs no graph
            posterior = vae.encode(clips)
        latents = posterior.sample(generator) if weights.sample_posterior else posterior.mode()
        if weights.latent_noise:
            latents = latents + object_latent_noise(latents, clips, weights.latent_noise, generator)
        recon = vae.decode(latents).float()
        weight = 1.0
        if weights.foreground or weights.edge:
            weight = 1.0 + weights.foreground * _foreground(clips) + weights.edge * _edges(clips)
            weight = weight / weight.mean()  # same overall scale; objects and outlines get a larger share
        l1 = (weight * (recon - clips).abs()).mean()
        mse = (weight * (recon - clips) ** 2).mean()
        kl = posterior.kl().mean() / clips[0].numel()
        loss = weights.l1 * l1 + weights.mse * mse + weights.kl * kl
        metrics = {"l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach()}
        if weights.linear_colour:
            # A latent whose cells carry their pixels' mean colour linearly keeps colour through the
            # MMDiT's pyramid (2x2 latent means = mean colours of larger regions) and in few dimensions
            # the flow loss cannot ignore; left alone, this VAE entangles colour with shape.
            colour = ((posterior.mean[:, :3].float() - pooled_colour(clips.float())) ** 2).mean()
            loss = loss + weights.linear_colour * colour
            metrics["linear_colour"] = colour.detach()
        if isinstance(model, VAEWithCritic):
            adversarial, adversarial_metrics = _adversarial(model, clips, recon, loss, weights, generator)
            loss = loss + adversarial
            metrics.update(adversarial_metrics)
        return loss, metrics

    return loss_fn


@torch.no_grad()
def encode_videos(vae: CausalVideoVAE, videos: torch.Tensor) -> torch.Tensor:
    """Posterior means of float videos [B, 3, T, H, W] in [-1, 1] (bf16 convolutions, fp32 out)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return vae.encode(_channels_last(videos)).mean.float()


def measure_latent_norm(vae: CausalVideoVAE, world: WorldSection, count: int) -> LatentNorm:
    """Shift/scale giving zero-mean unit-variance latents, separately for frame 0 and later frames."""
    dataset = ShapesVideoDataset(world.world(), length=count, seed=world.seed + 7_777, split=world.split)
    latents = torch.cat([encode_videos(vae, dataset[i][0][None]) for i in range(count)])
    image, video = latents[:, :, :1], latents[:, :, 1:]
    return LatentNorm(
        image_shift=float(image.mean()), image_scale=float(1 / image.std()),
        video_shift=float(video.mean()), video_scale=float(1 / video.std()),
    )


def full_spec(scene) -> PromptSpec:
    """The prompt spec stating every attribute of a scene (what a reconstruction must preserve)."""
    objects = tuple(ObjectSpec(o.shape, o.colour, o.size, o.motion) for o in scene.objects)
    return PromptSpec(objects, scene.background, ordered=len(objects) > 1)


@torch.no_grad()
def judge_reconstructions(vae: CausalVideoVAE, world: WorldSection, count: int, split: str = "heldout") -> dict:
    """Judge scores of whole-clip VAE reconstructions of `count` scenes, every attribute stated:
    the ceiling a text-to-video model on these latents can reach. Also the mean PSNR (dB), and under
    "first_frame" the same for each first frame encoded and decoded alone, as a generated latent 0 is
    (motion is not judged on one frame)."""
    from neodragon_cli.pipelines.eval.judge import attribute_kind, judge
    from neodragon_cli.pipelines.eval.metrics import psnr

    def reconstruct(frames: np.ndarray) -> np.ndarray:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            recon = vae.decode(vae.encode(_channels_last(video_tensor(frames)[None])).mode()).float()
        return recon[0].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()

    def summary(results: list, psnrs: list[float]) -> dict:
        per_kind: dict[str, list[bool]] = {}
        for result in results:
            for name, ok in result.attributes.items():
                per_kind.setdefault(attribute_kind(name), []).append(ok)
        report = {"semantic": float(np.mean([r.semantic for r in results])),
                  "quality": float(np.mean([r.quality for r in results])), "psnr": float(np.mean(psnrs))}
        report.update({kind: float(np.mean(v)) for kind, v in sorted(per_kind.items())})
        return report

    dataset = ShapesVideoDataset(world.world(), length=count, seed=world.seed + 9_999, split=split)
    clips, images = ([], []), ([], [])
    for i in range(count):
        scene, _, frames = dataset.item(i)
        spec = full_spec(scene)
        for (results, psnrs), original in ((clips, frames), (images, frames[:1])):
            recon = reconstruct(original)
            psnrs.append(psnr(recon, original))
            if original is frames:
                results.append(judge(recon, spec))
            else:  # a still image has no motion to judge
                still = tuple(dataclasses.replace(o, motion=None) for o in spec.objects)
                results.append(judge(recon, dataclasses.replace(spec, objects=still)))
    return {**summary(*clips), "first_frame": summary(*images)}


@torch.no_grad()
def latent_colour_readout(vae: CausalVideoVAE, world: WorldSection, count: int) -> dict[str, float]:
    """How well a linear read-out names an object's colour from its latent, at each level of the
    MMDiT's pyramid (2x2 means). First frames of `count` one-object training scenes are encoded; the
    feature is the object cells' mean latent minus the background's (the per-channel median); class
    means and a pooled within-class covariance fitted on the first half classify the second half.
    Low accuracy means colour is not a simple function of the latent, which the MMDiT then has to learn."""
    from neodragon_cli.pipelines.data.shapes import COLOURS
    from neodragon_cli.pipelines.flow.scheduler import latent_pyramid

    w = world.world()
    dataset = ShapesVideoDataset(w, length=count, seed=world.seed + 5_555, split="train")
    features: list[list[torch.Tensor]] = [[], [], []]
    labels = []
    for i in range(count):
        scene, _, frames = dataset.item(i)
        if len(scene.objects) != 1:
            continue
        latent = encode_videos(vae, video_tensor(frames[:1])[None])  # the causal VAE encodes frame 0 alone
        mask = torch.from_numpy(latent_object_mask(w, scene, tuple(latent.shape[-2:])))[:1]
        for level, (lat, m) in enumerate(zip(latent_pyramid(latent, 3), latent_pyramid(mask[None, None], 3))):
            lat, m = lat[0, :, 0], m[0, 0, 0]
            features[level].append((lat * m).sum((1, 2)) / m.sum() - lat.flatten(1).median(1).values)
        labels.append(list(COLOURS).index(scene.objects[0].colour))
    y = torch.tensor(labels)
    fit, test = slice(0, len(y) // 2), slice(len(y) // 2, None)
    report = {}
    for level, rows in enumerate(features):
        x = torch.stack(rows).double()
        seen = sorted(set(y[fit].tolist()))  # a colour absent from the fitted half is never predicted
        means = torch.stack([x[fit][y[fit] == c].mean(0) for c in seen])
        within = torch.cov((x[fit] - means[[seen.index(c) for c in y[fit].tolist()]]).T)
        within = within + 1e-6 * torch.eye(x.shape[1], dtype=x.dtype)
        diff = x[test][:, None] - means[None]
        distance = torch.einsum("nci,ij,ncj->nc", diff, torch.linalg.inv(within), diff)
        predicted = torch.tensor(seen)[distance.argmin(1)]
        report[f"level{level}"] = float((predicted == y[test]).double().mean())
    return report


def _parent_norm_file(init: str) -> Path:
    if not init:
        raise UsageError("model.train_encoder=false needs model.init (a frozen random encoder encodes nothing)",
                         hint="pass model.init=PATH of the train-vae artifact the MMDiT was trained on")
    path = Path(init) / "latent_norm.json"
    if not path.is_file():
        raise UsageError(f"model.train_encoder=false: {init} is not a train-vae artifact (no latent_norm.json to keep)")
    return path


def train_vae(recipe: TrainVAERecipe, out: Path, *, recipe_yaml: str, resume: bool, overwrite: bool) -> Path:
    """Train, then write the artifact `out/` (vae/ folder + latent_norm.json)."""
    work = out.with_name(out.name + ".work")
    if not recipe.model.train_encoder:
        _parent_norm_file(recipe.model.init)  # fail before training, not after
    vae = recipe.model.build().to(memory_format=torch.channels_last_3d)
    model = VAEWithCritic(vae, FrameCritic()) if recipe.loss.adversarial else vae
    sample = _clip_sampler(recipe)
    trainer = Trainer(
        model, vae_loss(recipe.loss), lambda positions: torch.stack([sample(i) for i in positions]),
        recipe.train, work, resume=resume,
    )
    result = trainer.fit()
    if result.stopped:
        console.print(f"stopped at step {result.step}; continue with --resume (checkpoints in {work})")
        raise SystemExit(0)
    vae = vae.eval().to(memory_format=torch.contiguous_format)  # trained in place, with or without its critic
    if recipe.model.train_encoder:
        norm = measure_latent_norm(vae, recipe.world, recipe.data.norm_videos)
    else:  # same encoder, same latents: keep the normalisation a trained MMDiT expects
        norm = LatentNorm(**json.loads(_parent_norm_file(recipe.model.init).read_text()))
    reconstruction = {}
    if recipe.data.judge_videos:
        reconstruction = judge_reconstructions(vae, recipe.world, recipe.data.judge_videos)
        for what, scores in (("held-out videos", reconstruction), ("their first frames alone", reconstruction["first_frame"])):
            numbers = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != "first_frame")
            console.print(f"reconstructions of {what}: {numbers}")
    readout = {}
    if recipe.data.readout_videos:
        readout = latent_colour_readout(vae, recipe.world, recipe.data.readout_videos)
        console.print("latent colour read-out per pyramid level: " + ", ".join(f"{k} {v:.3f}" for k, v in readout.items()))
    parent = Path(recipe.model.init) if recipe.model.init and (Path(recipe.model.init) / "state.json").is_file() else None
    with ArtifactWriter(out, command="train-vae", recipe_yaml=recipe_yaml, overwrite=overwrite, parent=parent) as art:
        vae.save_pretrained(art.path / "vae")
        write_json(art.path / "latent_norm.json", norm.to_dict())
        _copy_metrics(work, art)
        art.record("train-vae", steps=result.step, latent_norm=norm.to_dict(), reconstruction=reconstruction,
                   latent_colour_readout=readout)
    return out


def _copy_metrics(work: Path, art: ArtifactWriter) -> None:
    metrics = work / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            art.log_metrics(json.loads(line))


# ---------------------------------------------------------------------------------------------- T2V


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
class SamplingSection:
    steps: list[int] = setting([10, 10, 10], "default steps per pyramid stage of the shipped pipeline")
    first_frame_steps: list[int] = setting([10, 10, 10], "steps per stage for the first latent frame")
    guidance: float = setting(7.0, "first-frame classifier-free guidance")
    video_guidance: float = setting(5.0, "later-frames classifier-free guidance")
    history_noise: float = setting(0.0, "noise mixed into the history frames when sampling (within flow.corrupt_ratio)")


@recipe_schema("train-t2v")
@dataclass
class TrainT2VRecipe:
    """Stage 2 of the Shapes teacher: text encoders + pyramidal MMDiT."""

    world: WorldSection = field(default_factory=WorldSection, metadata={"doc": "the Shapes world"})
    data: T2VDataSection = field(default_factory=T2VDataSection, metadata={"doc": "latent cache"})
    text: TextSection = field(default_factory=TextSection, metadata={"doc": "text encoders"})
    mmdit: MMDiTSection = field(default_factory=MMDiTSection, metadata={"doc": "the denoiser"})
    flow: FlowSection = field(default_factory=FlowSection, metadata={"doc": "pyramid flow matching"})
    sampling: SamplingSection = field(default_factory=SamplingSection, metadata={"doc": "defaults of the shipped pipeline"})
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
        if not 0 <= self.sampling.history_noise < 1:
            problems.append(f"sampling.history_noise must be in [0, 1), got {self.sampling.history_noise}")
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
    from neodragon_cli.pipelines.models.mmdit import PyramidFlowMMDiT
    from neodragon_cli.pipelines.models.text_encoders import (
        CLIPTextEncoder,
        T5TextEncoder,
        TextEncoderBundle,
        clip_text_config,
        load_tokenizer,
        t5_config,
    )

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


CACHE_SAVE_EVERY_S = 300.0


def encoder_fingerprint(vae: CausalVideoVAE, norm: LatentNorm) -> str:
    """sha256 of what a cached latent depends on in the VAE: the encoder's config and weights and the
    latent normalisation (a decoder-only fine-tune keeps the fingerprint, so its caches stay valid)."""
    encoder_config = {k: v for k, v in vae.config.items() if k.startswith("encoder_")}
    digest = hashlib.sha256(json.dumps([norm.to_dict(), encoder_config], sort_keys=True).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _cached_latents(path: Path, count: int, chunk: int, what: str, source: dict[str, str], encode) -> torch.Tensor:
    """`count` normalised latents of scenes 0..count-1 of `source` (the cache's provenance, stored in the
    file's metadata), fp16 on disk. A cache of the same provenance is reused: cut when it holds more,
    extended with `encode(range)` when it holds fewer (scenes are a pure function of their index); a
    cache of any other provenance is encoded again."""
    parts = []
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as cache:
            stored = cache.metadata() or {}
            if stored == source:
                parts.append(cache.get_tensor("latents")[:count])
            elif not stored:
                console.print(f"{path.name} has no record of what it was encoded from: encoding again")
            else:
                changed = sorted(k for k in source.keys() | stored.keys() if source.get(k) != stored.get(k))
                console.print(f"{path.name} was encoded from other settings ({', '.join(changed)}): encoding again")
    done = len(parts[0]) if parts else 0
    if done == count:
        return parts[0].float()
    saved = time.monotonic()
    with progress() as bar:
        task = bar.add_task(f"encoding {what}", total=count, completed=done)
        for start in range(done, count, chunk):
            parts.append(encode(range(start, min(start + chunk, count))).half())
            bar.advance(task, len(parts[-1]))
            if time.monotonic() - saved > CACHE_SAVE_EVERY_S:  # a stop loses at most this much encoding
                parts = [torch.cat(parts)]
                save_safetensors({"latents": parts[0]}, path, metadata=source)
                saved = time.monotonic()
    latents = torch.cat(parts)
    save_safetensors({"latents": latents}, path, metadata=source)
    return latents.float()


def _cache_source(recipe: "TrainT2VRecipe", vae: CausalVideoVAE, norm: LatentNorm, what: str, offset: int) -> dict[str, str]:
    """The provenance of a latent cache: which scenes (world, first scene index) and which encoder."""
    return {"what": what, "encoder": encoder_fingerprint(vae, norm), "offset": str(offset),
            "world": json.dumps(dataclasses.asdict(recipe.world), sort_keys=True)}


def _dataset(recipe: "TrainT2VRecipe") -> ShapesVideoDataset:
    """Scenes 0..videos-1 are the videos; the image scenes follow them, so the two never share a scene."""
    length = recipe.data.videos + recipe.data.images
    return ShapesVideoDataset(recipe.world.world(), length=length, seed=recipe.world.seed, split=recipe.world.split)


def encode_latent_cache(recipe: TrainT2VRecipe, vae: CausalVideoVAE, norm: LatentNorm, path: Path) -> torch.Tensor:
    """Normalised latents [N, 16, T', h, w] (fp16 on disk) of the first `data.videos` videos; resumable,
    and extended rather than redone when `data.videos` grows."""
    dataset = _dataset(recipe)

    def encode(indices: range) -> torch.Tensor:
        return normalize(encode_videos(vae, torch.stack([dataset[i][0] for i in indices])), norm)

    return _cached_latents(path, recipe.data.videos, 4, "videos", _cache_source(recipe, vae, norm, "videos", 0), encode)


def encode_image_cache(recipe: TrainT2VRecipe, vae: CausalVideoVAE, norm: LatentNorm, path: Path) -> torch.Tensor:
    """Normalised latents [N, 16, 1, h, w] of the first frames of the `data.images` scenes after the
    videos. The causal VAE encodes frame 0 alone, so each equals latent frame 0 of its whole video."""
    dataset, offset = _dataset(recipe), recipe.data.videos
    world = dataset.world

    def encode(indices: range) -> torch.Tensor:
        scenes = [world.sample_scene(np.random.default_rng((dataset.seed, offset + i)), dataset.split) for i in indices]
        return normalize(encode_videos(vae, torch.stack([video_tensor(world.render(s, frames=1)) for s in scenes])), norm)

    source = _cache_source(recipe, vae, norm, "first frames", offset)
    return _cached_latents(path, recipe.data.images, 64, "first frames", source, encode)


def cache_whitening(latents: torch.Tensor, floor: float, path: Path) -> LatentNorm:
    """The whitening of normalised latents [N, C, T, h, w] (frame 0 and later frames apart), as a
    LatentNorm that applies only it. Stored at `path` when first measured and read back after, so a
    resumed run (even on a grown cache) keeps the latent space its checkpoints were trained in."""
    if path.is_file():
        stored = json.loads(path.read_text())
    else:
        stored = {"image_whitening": Whitening.measure(latents[:, :, :1], floor).to_dict(),
                  "video_whitening": Whitening.measure(latents[:, :, 1:], floor).to_dict()}
        write_json(path, stored)
    return LatentNorm(image_shift=0.0, image_scale=1.0, video_shift=0.0, video_scale=1.0, **stored)


def latent_object_mask(world: ShapesWorld, scene: Scene, grid: tuple[int, int], temporal: int = 8) -> np.ndarray:
    """`[T', h, w]` float32: 1 on the latent cells that an object's bounding box touches during the
    pixel frames a latent frame encodes (frame 0 alone, then `temporal` frames each), else 0."""
    h, w = grid
    mask = np.zeros((1 + (world.frames - 1) // temporal, h, w), np.float32)
    for obj in scene.objects:
        cx, cy = obj.centres(world.frames)
        side = SIZES[obj.size] * min(world.height, world.width)
        hx, hy = side / 2 / world.width, side / 2 / world.height
        for k in range(mask.shape[0]):
            span = slice(0, 1) if k == 0 else slice(temporal * (k - 1) + 1, temporal * k + 1)
            x0, x1 = np.floor((cx[span].min() - hx) * w), np.ceil((cx[span].max() + hx) * w)
            y0, y1 = np.floor((cy[span].min() - hy) * h), np.ceil((cy[span].max() + hy) * h)
            mask[k, max(int(y0), 0) : max(int(y1), 0), max(int(x0), 0) : max(int(x1), 0)] = 1.0
    return mask


def draw_units(generator: torch.Generator, frames: int, first_share: float = 0.0) -> list[int]:
    """Latent frames trained per pyramid stage: 1..frames uniformly, or 1 alone (the first frame, an
    image) with probability `first_share`, since the first frame sets every later one."""
    units = torch.randint(1, frames + 1, (3,), generator=generator)
    if first_share > 0:
        units = torch.where(torch.rand(3, generator=generator) < first_share, 1, units)
    return [int(u) for u in units]


def t2v_loss(recipe: TrainT2VRecipe):
    ratios = tuple(recipe.flow.sample_ratios)

    def loss_fn(model: TextToVideoModel, batch: dict, generator: torch.Generator):
        noise = SeededNoise(int(torch.randint(0, 2**62, (1,), generator=generator)))
        latents = batch["latents"]
        text = model.condition(batch["captions"])
        null = model.condition([""])
        # temporal pyramid: each stage trains one frame position, with the frames before it as history
        units = draw_units(generator, latents.shape[2], recipe.flow.first_frame_share)
        flow = build_flow_batch(latents, text, null, noise, sample_ratios=ratios, units_per_stage=units,
                                corrupt_ratio=recipe.flow.corrupt_ratio, text_dropout=recipe.flow.text_dropout,
                                focus=batch.get("object_masks"), focus_weight=recipe.flow.object_weight)
        out = pyramid_flow_loss(model.mmdit, flow)
        stage_of_sample = torch.tensor([c.stage for c in flow.columns for _ in c.samples])  # column order
        per_stage = {f"loss_stage{s}": out.per_sample[stage_of_sample == s].mean().detach()
                     for s in sorted(set(stage_of_sample.tolist()))}
        return out.loss, per_stage

    return loss_fn


def _batches(recipe: TrainT2VRecipe, latents: torch.Tensor, images: torch.Tensor | None = None):
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
    hold velocity MMDiTs). A resume that would read the weights otherwise is refused, before any cache
    is encoded."""
    trained = latest_checkpoint(work / "run") is not None
    whitened_run = (work / "whitening.json").is_file()
    if trained and resume and whitened_run != recipe.data.whiten:
        raise UsageError(f"the checkpoints in {work} were trained on {'whitened' if whitened_run else 'unwhitened'} latents",
                         hint=f"resume with data.whiten={str(whitened_run).lower()}")
    path = work / "prediction.json"
    stored = json.loads(path.read_text())["prediction"] if path.is_file() else "velocity"
    if trained and resume and stored != recipe.mmdit.prediction:
        raise UsageError(f"the checkpoints in {work} are of an MMDiT that predicts {stored}",
                         hint=f"resume with mmdit.prediction={stored}")
    if not trained:
        write_json(path, {"prediction": recipe.mmdit.prediction})


def train_t2v(recipe: TrainT2VRecipe, out: Path, *, recipe_yaml: str, resume: bool, overwrite: bool) -> Path:
    from neodragon_cli.pipelines.data.caption_tokenizer import train_caption_tokenizer
    from neodragon_cli.pipelines.flow.pipeline import PIPELINE_FILE, PIPELINE_FORMAT

    if not recipe.data.vae:
        raise UsageError("data.vae is not set", hint="pass data.vae=PATH of a train-vae artifact")
    vae_dir = Path(recipe.data.vae)
    if not (vae_dir / "vae").is_dir() or not (vae_dir / "latent_norm.json").is_file():
        raise UsageError(f"{vae_dir} is not a train-vae artifact (no vae/ or latent_norm.json)")
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    _check_resume(work, recipe, resume)
    vae = CausalVideoVAE.from_pretrained(vae_dir / "vae").eval()
    norm = LatentNorm(**json.loads((vae_dir / "latent_norm.json").read_text()))
    tokenizer_dir = work / "tokenizer"
    if not (tokenizer_dir / "spiece.model").is_file():
        train_caption_tokenizer(tokenizer_dir, vocab_size=recipe.text.vocab_size, seed=recipe.world.seed)
    started = time.time()
    latents = encode_latent_cache(recipe, vae.to(memory_format=torch.channels_last_3d), norm, work / "latents.safetensors")
    console.print(f"latent cache {tuple(latents.shape)} ready ({time.time() - started:.0f} s)")
    images = None
    if recipe.data.images:
        started = time.time()
        images = encode_image_cache(recipe, vae, norm, work / "images.safetensors")
        console.print(f"image cache {tuple(images.shape)} ready ({time.time() - started:.0f} s)")
    if recipe.data.whiten:  # the caches stay scalar-normalised; the MMDiT trains on whitened latents
        whitening = cache_whitening(latents, recipe.data.whiten_floor, work / "whitening.json")
        latents = normalize(latents, whitening)
        images = None if images is None else normalize(images, whitening)
        norm = dataclasses.replace(norm, image_whitening=whitening.image_whitening, video_whitening=whitening.video_whitening)
    model = build_t2v(recipe, tokenizer_dir)
    trainer = Trainer(model, t2v_loss(recipe), _batches(recipe, latents, images), recipe.train, work / "run", resume=resume)
    result = trainer.fit()
    if result.stopped:
        console.print(f"stopped at step {result.step}; continue with --resume (checkpoints in {work})")
        raise SystemExit(0)
    model = trainer.model.eval()
    s = recipe.sampling
    spec = {
        "format": PIPELINE_FORMAT,
        "components": {
            "text_encoder": {"component": "text/bundle", "path": "text"},
            "mmdit": {"component": "mmdit/pyramid-flow", "path": "mmdit"},
            "vae": {"component": "vae/pyramid-flow", "path": "vae"},
        },
        "latent_norm": norm.to_dict(),
        "sampling": {
            "mode": "monolithic", "video_steps": list(s.steps), "first_steps": list(s.first_frame_steps),
            "guidance": s.guidance, "video_guidance": s.video_guidance, "history_noise": s.history_noise, "frames": recipe.world.frames,
            "height": recipe.world.height, "width": recipe.world.width, "fps": 24, "sr": False,
            "negative_prompt": "",
        },
    }
    with ArtifactWriter(out, command="train-t2v", recipe_yaml=recipe_yaml, parent=vae_dir, overwrite=overwrite) as art:
        model.text_encoder.save_pretrained(art.path / "text")
        model.mmdit.save_pretrained(art.path / "mmdit")
        vae.to(memory_format=torch.contiguous_format).save_pretrained(art.path / "vae")
        write_json(art.path / PIPELINE_FILE, spec)
        _copy_metrics(work / "run", art)
        art.record("train-t2v", steps=result.step, videos=recipe.data.videos, images=recipe.data.images,
                   image_share=recipe.data.image_share)
    return out


def ship_fp16(pipeline_dir: str | Path, dest: str | Path) -> Path:
    """Copy a trained pipeline folder with every floating tensor stored as fp16 (the embedded default
    ships this way; loading casts back to the run's dtype). Tokenizers and JSON files are copied."""
    import shutil

    from safetensors.torch import load_file

    src, dest = Path(pipeline_dir), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir() or path.name in ("metrics.jsonl",):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
            save_safetensors(tensors, target)
        else:
            shutil.copy2(path, target)
    return dest


if __name__ == "__main__":  # python -m neodragon_cli.pipelines.train.shapes_teacher RUN DEST
    import sys

    print(ship_fp16(sys.argv[1], sys.argv[2]))
