"""`train-vae`: stage 1 of the Shapes teacher, the Pyramid-Flow causal video VAE (8x8x8, 16 latent
channels) at small widths, learning to reconstruct Shapes clips.

3-D convolutions are only fast on this kind of CPU in bf16 with the channels-last-3d layout
(oneDNN/AMX), so training runs on random crops of short clips; the VAE is fully convolutional and
causal, so it then encodes whole 49-frame videos. The latent normalisation factors (frame 0 vs later
frames, as Pyramid-Flow has) are measured on encoded videos. The artifact is `vae/` plus
`latent_norm.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from neodragon_cli.artifacts import ArtifactWriter
from neodragon_cli.atomic import write_json
from neodragon_cli.console import console
from neodragon_cli.errors import UsageError
from neodragon_cli.pipelines.data.latent_cache import channels_last, measure_latent_norm
from neodragon_cli.pipelines.data.shapes import ShapesVideoDataset, video_tensor
from neodragon_cli.pipelines.data.world_section import WorldSection
from neodragon_cli.pipelines.eval.reconstruction import judge_reconstructions, latent_colour_readout
from neodragon_cli.pipelines.models.causal_vae import CausalVideoVAE
from neodragon_cli.pipelines.models.latents import LatentNorm
from neodragon_cli.pipelines.train import TrainingOutcome, copy_metrics, training_command
from neodragon_cli.pipelines.train.critic import FrameCritic, VAEWithCritic, adversarial_loss
from neodragon_cli.pipelines.train.trainer import Trainer, TrainerConfig, seed_everything
from neodragon_cli.recipes import setting


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
        vae = CausalVideoVAE.from_pretrained(vae_folder(self.init), encoder_norm_num_groups=groups, decoder_norm_num_groups=groups)
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


def vae_folder(path: str | Path) -> Path:
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


def clip_sampler(recipe: TrainVAERecipe):
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


def vae_loss(weights: VAELossSection):
    def loss_fn(model: CausalVideoVAE | VAEWithCritic, clips: torch.Tensor, generator: torch.Generator):
        vae = model.vae if isinstance(model, VAEWithCritic) else model
        clips = channels_last(clips)
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
            adversarial, adversarial_metrics = adversarial_loss(
                model, clips, recon, loss, strength=weights.adversarial, warm_up=weights.adversarial_start,
                frames=weights.critic_frames, generator=generator)
            loss = loss + adversarial
            metrics.update(adversarial_metrics)
        return loss, metrics

    return loss_fn


def _parent_norm_file(init: str) -> Path:
    if not init:
        raise UsageError("model.train_encoder=false needs model.init (a frozen random encoder encodes nothing)",
                         hint="pass model.init=PATH of the train-vae artifact the MMDiT was trained on")
    path = Path(init) / "latent_norm.json"
    if not path.is_file():
        raise UsageError(f"model.train_encoder=false: {init} is not a train-vae artifact (no latent_norm.json to keep)")
    return path


@training_command("train-vae", TrainVAERecipe)
def train_vae(recipe: TrainVAERecipe, out: Path, *, recipe_yaml: str, resume: bool, overwrite: bool) -> TrainingOutcome:
    """Train in `OUT.work/`, then (rank 0) measure, judge and write the artifact `out/` (vae/ folder +
    latent_norm.json)."""
    work = out.with_name(out.name + ".work")
    if not recipe.model.train_encoder:
        _parent_norm_file(recipe.model.init)  # fail before training, not after
    seed_everything(recipe.train.seed)  # the initial weights too follow the recipe's seed
    vae = recipe.model.build().to(memory_format=torch.channels_last_3d)
    model = VAEWithCritic(vae, FrameCritic()) if recipe.loss.adversarial else vae
    sample = clip_sampler(recipe)
    trainer = Trainer(
        model, vae_loss(recipe.loss), lambda positions: torch.stack([sample(i) for i in positions]),
        recipe.train, work, resume=resume,
    )
    result = trainer.fit()
    if result.stopped:
        return TrainingOutcome(result.step, work, artifact=None)
    if not trainer.env.is_main:
        return TrainingOutcome(result.step, work, artifact=out)
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
        copy_metrics(work, art)
        art.record("train-vae", steps=result.step, latent_norm=norm.to_dict(), reconstruction=reconstruction,
                   latent_colour_readout=readout)
    return TrainingOutcome(result.step, work, artifact=out)
