"""How much of a generation's wall time is spent outside the networks (sampler, pyramid bookkeeping,
block noise, streaming decode plumbing, uint8 conversion)?

One Neodragon-geometry hybrid run on CPU: 49 frames at 320x512 (latents 7 x 40 x 64), the published
Neodragon asymmetric VAE (real size, random weights: encoder for the first frame, TAEHV-style decoder
streaming), and a random-weight MMDiT of real width (24 heads x 64 = 1536) but only `--blocks` blocks,
1-1-1 steps (18 DiT calls). Text conditioning is random (the text encoders are not what is measured).
Every network call is timed by the pipeline's profiler; the rest of the wall time is overhead.

    nice python benchmarks/sampler_overhead.py [--blocks 1] [--threads 1] [--write out.mp4]

Prints the per-component table, the overhead fraction (target < 2 %) and the peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from neodragon_cli.pipelines.flow.pipeline import GenerationSettings, Profiler, VideoPipeline
from neodragon_cli.pipelines.flow.sampler import TextConditioning
from neodragon_cli.pipelines.models.causal_vae import AsymmetricCausalVideoVAE
from neodragon_cli.pipelines.models.mmdit import mmdit_from_preset

NETWORKS = ("mmdit", "vae_encoder", "decoder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1, help="MMDiT depth (real: 18)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--write", default=None, help="also stream the video into this mp4 (timed separately)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    build = time.perf_counter()
    mmdit = mmdit_from_preset("neodragon-18", num_layers=args.blocks).eval()
    pipe = VideoPipeline(mmdit=mmdit, vae=AsymmetricCausalVideoVAE().eval())
    text = TextConditioning(torch.randn(1, 128, 1536), torch.ones(1, 128, dtype=torch.long), torch.randn(1, 2048))
    settings = GenerationSettings(
        mode="hybrid", first_steps=[1, 1, 1], video_steps=[1, 1, 1], guidance=0.0, video_guidance=0.0,
        frames=args.frames, height=320, width=512, fps=24,
    ).resolved()  # fmt: skip
    image = np.random.default_rng(0).integers(0, 256, (320, 512, 3), dtype=np.uint8)
    print(f"built models in {time.perf_counter() - build:.1f} s; {args.threads} thread(s), MMDiT width 1536 x {args.blocks} block(s)")

    profile = Profiler()
    writer = None
    if args.write:
        from neodragon_cli.pipelines.data.video_io import VideoWriter

        writer = VideoWriter(args.write, fps=settings.fps)

    def sink(chunk):
        if writer is not None:
            with profile.section("writer"):
                writer.append(chunk)

    start = time.perf_counter()
    result = pipe.generate("", settings, seed=0, text=text, image=image, sink=sink, profile=profile)
    if writer is not None:
        with profile.section("writer"):
            writer.close()
    wall = time.perf_counter() - start

    print(f"\n{'component':<12} {'calls':>5} {'total s':>9} {'ms/call':>9}")
    for name, c in profile.components.items():
        print(f"{name:<12} {c.calls:>5} {c.seconds:>9.3f} {1000 * c.seconds / c.calls:>9.1f}")
    networks = sum(profile.components[n].seconds for n in NETWORKS if n in profile.components)
    written = profile.components["writer"].seconds if "writer" in profile.components else 0.0
    overhead = wall - networks - written
    print(f"\nframes {result.num_frames}, latents {tuple(result.latents.shape)}, wall {wall:.2f} s")
    print(f"network calls {networks:.2f} s, video writing {written:.2f} s")
    print(f"outside network calls (excluding writing): {overhead:.3f} s = {100 * overhead / wall:.2f} % of wall time (target < 2 %)")
    mmdit = profile.components["mmdit"].seconds
    print(f"the same overhead relative to the MMDiT calls alone: {100 * overhead / mmdit:.2f} %")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
