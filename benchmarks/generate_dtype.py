"""bf16 against fp32 on this machine, side by side in one run.

1. The embedded default (`shapes-teacher`), loaded as `neodragon generate --dtype` loads it (bf16 with
   the float32 islands of `FLOAT32_MODULES`): wall time, per-component time, and how far the bf16
   frames are from the fp32 frames (uint8 levels, max and mean).
2. One stage call of an MMDiT of real Neodragon width (24 heads x 64 = 1536, random weights, `--blocks`
   blocks): the full-resolution 320p stage, one history frame and the current frame (latents 40 x 64),
   128 text tokens. Median time of `--repeats` calls and the relative difference of the outputs.

    nice python benchmarks/generate_dtype.py [--frames 9] [--steps 2-2-2] [--blocks 1] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from neodragon_cli.artifacts import resolve_model
from neodragon_cli.pipelines.flow.pipeline import DTYPES, FLOAT32_MODULES, Profiler, VideoPipeline, cast_for_generation
from neodragon_cli.pipelines.flow.scheduler import parse_steps
from neodragon_cli.pipelines.models.mmdit import mmdit_from_preset

PROMPT = "a red circle moving left"


def embedded_default(frames: int, steps: str) -> dict[str, dict]:
    runs = {}
    for name in ("fp32", "bf16"):
        pipe = VideoPipeline.from_pretrained(resolve_model("shapes-teacher"), dtype=DTYPES[name])
        plan = list(parse_steps(steps))
        settings = dataclasses.replace(pipe.settings(), frames=frames, first_steps=plan, video_steps=plan)
        profile = Profiler()
        start = time.perf_counter()
        result = pipe.generate(PROMPT, settings, seed=0, profile=profile)
        runs[name] = {"wall": time.perf_counter() - start, "profile": profile, "frames": result.frames.astype(np.int16)}
    return runs


def stage_call(blocks: int, repeats: int) -> dict[str, dict]:
    torch.manual_seed(0)
    reference = mmdit_from_preset("neodragon-18", num_layers=blocks).eval()
    with torch.no_grad():  # a fresh MMDiT outputs exactly 0 (AdaLN-Zero): give every weight a value
        for param in reference.parameters():
            param.normal_(0, 0.02)
    latent = lambda: torch.randn(1, reference.out_channels, 1, 40, 64)  # noqa: E731
    inputs = dict(
        sample=[[latent(), latent()]],
        encoder_hidden_states=torch.randn(1, 128, reference.text_width),
        encoder_attention_mask=torch.ones(1, 128, dtype=torch.long),
        pooled_projections=torch.randn(1, reference.config["pooled_projection_dim"]),
        timestep_ratio=torch.full((1,), 500.0),
    )
    state = reference.state_dict()
    runs = {}
    for name in ("fp32", "bf16"):
        model = mmdit_from_preset("neodragon-18", num_layers=blocks).eval()
        model.load_state_dict(state)
        dtype = DTYPES[name]
        cast_for_generation(model, dtype, FLOAT32_MODULES["mmdit"])
        cast = {k: v if k == "encoder_attention_mask" else v.to(dtype) for k, v in inputs.items() if k != "sample"}
        cast["sample"] = [[c.to(dtype) for c in inputs["sample"][0]]]
        times = []
        with torch.no_grad():
            for _ in range(repeats):
                start = time.perf_counter()
                out = model(**cast)[0].float()
                times.append(time.perf_counter() - start)
        runs[name] = {"seconds": statistics.median(times), "out": out}
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", default="2-2-2")
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    runs = embedded_default(args.frames, args.steps)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    print(f"\nembedded default, {args.frames} frames, steps {args.steps} (monolithic, CFG)")
    print(f"{'':18}{'fp32 s':>10}{'bf16 s':>10}{'bf16/fp32':>11}")
    for component in fp32["profile"].components:
        a, b = fp32["profile"].components[component].seconds, bf16["profile"].components[component].seconds
        print(f"{component:18}{a:10.2f}{b:10.2f}{b / a:10.2f}x")
    print(f"{'wall':18}{fp32['wall']:10.2f}{bf16['wall']:10.2f}{bf16['wall'] / fp32['wall']:10.2f}x")
    diff = np.abs(bf16["frames"] - fp32["frames"])
    print(f"frame difference bf16 vs fp32 (uint8 levels): max {diff.max()}, mean {diff.mean():.2f}")

    stage = stage_call(args.blocks, args.repeats)
    a, b = stage["fp32"]["seconds"], stage["bf16"]["seconds"]
    error = (stage["bf16"]["out"] - stage["fp32"]["out"]).norm() / stage["fp32"]["out"].norm()
    print(f"\nreal-width MMDiT stage call ({args.blocks} block(s) of 1536, latents 2 x 40 x 64, 128 text tokens)")
    print(f"fp32 {a:.3f} s, bf16 {b:.3f} s, bf16/fp32 {b / a:.2f}x; relative output difference {error:.2e}")


if __name__ == "__main__":
    main()
