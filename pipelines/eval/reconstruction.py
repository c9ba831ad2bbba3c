"""How well a causal VAE keeps what the Shapes judge checks: judged reconstructions (the ceiling a
text-to-video model on its latents can reach) and a linear colour read-out of its latents."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from neodragon_cli.pipelines.data.latent_cache import channels_last, encode_videos, latent_object_mask
from neodragon_cli.pipelines.data.shapes import COLOURS, ObjectSpec, PromptSpec, ShapesVideoDataset, video_tensor
from neodragon_cli.pipelines.data.world_section import WorldSection
from neodragon_cli.pipelines.eval.judge import attribute_kind, judge
from neodragon_cli.pipelines.eval.metrics import psnr, ssim
from neodragon_cli.pipelines.flow.scheduler import latent_pyramid
from neodragon_cli.pipelines.models.causal_vae import CausalVideoVAE
from neodragon_cli.pipelines.train.trainer import resolve_precision


def full_spec(scene) -> PromptSpec:
    """The prompt spec stating every attribute of a scene (what a reconstruction must preserve)."""
    objects = tuple(ObjectSpec(o.shape, o.colour, o.size, o.motion) for o in scene.objects)
    return PromptSpec(objects, scene.background, ordered=len(objects) > 1)


@torch.no_grad()
def judge_reconstructions(vae: CausalVideoVAE, world: WorldSection, count: int, split: str = "heldout",
                          precision: str = "auto") -> dict:
    """Judge scores of whole-clip VAE reconstructions of `count` scenes, every attribute stated:
    the ceiling a text-to-video model on these latents can reach. Also the mean PSNR (dB) and SSIM, and
    under "first_frame" the same for each first frame encoded and decoded alone, as a generated latent 0
    is (motion is not judged on one frame). `precision` as the trainer's: `auto` runs the VAE under bf16
    autocast only where the CPU computes bf16 natively (elsewhere it is emulated, many times slower)."""
    bf16 = resolve_precision(precision, torch.device("cpu")) == "bf16"

    def reconstruct(frames: np.ndarray) -> np.ndarray:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            recon = vae.decode(vae.encode(channels_last(video_tensor(frames)[None])).mode()).float()
        return recon[0].clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()

    def summary(results: list, psnrs: list[float], ssims: list[float]) -> dict:
        per_kind: dict[str, list[bool]] = {}
        for result in results:
            for name, ok in result.attributes.items():
                per_kind.setdefault(attribute_kind(name), []).append(ok)
        report = {"semantic": float(np.mean([r.semantic for r in results])),
                  "quality": float(np.mean([r.quality for r in results])),
                  "psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}
        report.update({kind: float(np.mean(v)) for kind, v in sorted(per_kind.items())})
        return report

    dataset = ShapesVideoDataset(world.world(), length=count, seed=world.seed + 9_999, split=split)
    clips, images = ([], [], []), ([], [], [])
    for i in range(count):
        scene, _, frames = dataset.item(i)
        spec = full_spec(scene)
        for (results, psnrs, ssims), original in ((clips, frames), (images, frames[:1])):
            recon = reconstruct(original)
            psnrs.append(psnr(recon, original))
            ssims.append(ssim(recon, original))
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
