"""The two inference fast paths of `neodragon generate`, each against the path it replaced, in one run.

1. Text padding: the shipped T5s pad prompts to 128 tokens and the MMDiT's text stream computes all of
   them, although padded tokens are masked out of every valid query. The MMDiT's forward now cuts the
   columns that are padding in every row (`mmdit.cut_text_padding`). Timed: the whole sampling loop of the
   embedded default (its default schedule, with CFG) with the padding kept and cut, and the largest
   difference of the latents.
2. Streamed decoding: for a batch-1 chunk of a few latent frames PyTorch dispatches Conv3d to its im2col
   kernel; `CausalConv3d` calls oneDNN's directly at inference. Timed: the streamed decode of those
   latents both ways, and the largest difference of the frames.

    nice python benchmarks/generate_fast_paths.py [--frames 49] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from neodragon_cli.artifacts import resolve_model
from neodragon_cli.pipelines.flow.pipeline import Profiler, VideoPipeline
from neodragon_cli.pipelines.flow.sampler import PyramidSampler, SeededNoise, mmdit_denoiser
from neodragon_cli.pipelines.models import causal_vae, mmdit
from neodragon_cli.pipelines.models.latents import denormalize

PROMPT = "a red circle moving left"


def sample(pipe: VideoPipeline, settings, cut: bool) -> tuple[float, list[torch.Tensor]]:
    profile = Profiler()
    text = pipe.encode_prompts([PROMPT], profile)
    negative = pipe.encode_prompts([settings.negative_prompt], profile)
    scale = pipe.vae.spatial_compression
    chosen = mmdit.cut_text_padding
    mmdit.cut_text_padding = chosen if cut else (lambda text, mask: (text, mask))
    start = time.perf_counter()
    with torch.no_grad():
        latents = list(
            PyramidSampler(mmdit_denoiser(pipe.mmdit)).latent_frames(
                text, negative=negative, num_frames=pipe.vae.latent_frames(settings.frames),
                latent_channels=pipe.mmdit.out_channels, latent_size=(settings.height // scale, settings.width // scale),
                config=settings.sampling_config(), noise=SeededNoise(0),
            )
        )  # fmt: skip
    mmdit.cut_text_padding = chosen
    return time.perf_counter() - start, latents


def decode(pipe: VideoPipeline, latents: list[torch.Tensor], onednn: bool) -> tuple[float, torch.Tensor]:
    chosen = causal_vae._use_onednn
    causal_vae._use_onednn = chosen if onednn else (lambda x: False)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            raw = (denormalize(latent, pipe.latent_norm, start_frame=i) for i, latent in enumerate(latents))
            frames = torch.cat(list(pipe.vae.stream_decode(raw)), dim=2)
        return time.perf_counter() - start, frames
    finally:
        causal_vae._use_onednn = chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = VideoPipeline.from_pretrained(resolve_model("shapes-teacher"), safety_checker=False)
    settings = dataclasses.replace(pipe.settings(), frames=args.frames)
    print(f"shapes-teacher, {settings.frames} frames {settings.height}x{settings.width}, steps {settings.video_steps}, "
          f"guidance {settings.guidance}/{settings.video_guidance}, {torch.get_num_threads()} threads")

    kept_s, kept = sample(pipe, settings, cut=False)
    cut_s, cut = sample(pipe, settings, cut=True)
    gap = max((a - b).abs().max().item() for a, b in zip(kept, cut))
    print(f"sampling   padding kept {kept_s:7.2f} s   cut {cut_s:7.2f} s   x{kept_s / cut_s:.2f}   max |latent diff| {gap:.1e}")

    torch_s, torch_frames = decode(pipe, cut, onednn=False)
    onednn_s, onednn_frames = decode(pipe, cut, onednn=True)
    gap = (torch_frames - onednn_frames).abs().max().item()
    print(f"decoding   torch dispatch {torch_s:7.2f} s   oneDNN {onednn_s:7.2f} s   x{torch_s / onednn_s:.2f}   "
          f"max |frame diff| {gap:.1e} (frames in [-1, 1])")
    before, after = kept_s + torch_s, cut_s + onednn_s
    print(f"sampling + decoding   before {before:7.2f} s   after {after:7.2f} s   x{before / after:.2f}")


if __name__ == "__main__":
    main()
