"""How far do a text-to-video model's later latent frames drift when it feeds on its own output?

For a few rendered Shapes videos, encoded by the model's own VAE (normalised latents, roughly unit
variance), every latent frame k >= 1 is sampled twice with the same noise and the video's caption:
  * teacher-forced: the history is the true frames 0..k-1 (what training shows the model);
  * free-running: the history is the model's own frames 1..k-1 after the true frame 0 (generation).
Each is compared with the true frame k (MSE in the normalised latent space), next to the MSE of simply
repeating frame k-1. A model that had learnt the dynamics would sit well below that baseline when
teacher-forced; free-running errors that grow with k are exposure bias.

    python benchmarks/autoregressive_drift.py [MODEL] [--videos 4] [--split train] [--guidance 0] [--history-noise 0]

MODEL is a pipeline folder or an embedded model name (default: the embedded default). Prints the
per-frame table and the ratio free-running / teacher-forced error on the last frame.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from neodragon_cli.artifacts import resolve_model
from neodragon_cli.commands.generate import DEFAULT_MODEL
from neodragon_cli.pipelines.data.shapes import ShapesVideoDataset, ShapesWorld
from neodragon_cli.pipelines.flow.pipeline import Profiler, VideoPipeline
from neodragon_cli.pipelines.flow.sampler import PyramidSampler, SamplingConfig, SeededNoise, mmdit_denoiser, prediction_type
from neodragon_cli.pipelines.flow.scheduler import noise_pyramid, parse_steps
from neodragon_cli.pipelines.models.latents import normalize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--split", default="train", choices=("train", "heldout"))
    parser.add_argument("--seed", type=int, default=123, help="seed of the rendered videos (training used 0)")
    parser.add_argument("--steps", default="10-10-10")
    parser.add_argument("--guidance", type=float, default=0.0, help="CFG scale for every frame (0: off)")
    parser.add_argument("--history-noise", type=float, default=0.0, help="noise mixed into the history when sampling (both histories)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = VideoPipeline.from_pretrained(resolve_model(args.model))
    steps = parse_steps(args.steps)
    config = SamplingConfig(first_steps=steps, video_steps=steps, guidance=args.guidance, video_guidance=args.guidance,
                            history_noise=args.history_noise)
    sampler = PyramidSampler(mmdit_denoiser(pipe.mmdit), prediction=prediction_type(pipe.mmdit))
    negative = pipe.encode_prompts([""], Profiler())
    dataset = ShapesVideoDataset(ShapesWorld(), length=args.videos, seed=args.seed, split=args.split)

    errors = {"teacher-forced": [], "free-running": [], "repeat previous": []}
    for i in range(args.videos):
        video, prompt = dataset[i]
        with torch.no_grad():
            true = normalize(pipe.vae.encode(video[None]).mean.float(), pipe.latent_norm)
        text = pipe.encode_prompts([prompt], Profiler())
        frames = [true[:, :, k : k + 1] for k in range(true.shape[2])]
        initial = SeededNoise(i).randn(tuple(true.shape), kind="initial")
        stage0 = noise_pyramid(initial, sampler.scheduler.num_stages)[0]
        own = frames[:1]
        per = {name: [] for name in errors}
        for k in range(1, len(frames)):
            def sample(history):  # same noise for both histories
                with torch.no_grad():
                    return sampler.sample_unit(k, len(frames), stage0[:, :, k : k + 1], history, text, negative, config, SeededNoise(1000 * i + k))

            per["teacher-forced"].append(float(((sample(frames[:k]) - frames[k]) ** 2).mean()))
            own.append(sample(own))
            per["free-running"].append(float(((own[k] - frames[k]) ** 2).mean()))
            per["repeat previous"].append(float(((frames[k - 1] - frames[k]) ** 2).mean()))
        for name in errors:
            errors[name].append(per[name])
        print(f"video {i}: {prompt}")

    print(f"\nlatent MSE to the true frame, mean over {args.videos} {args.split} videos ({args.steps} steps, CFG {args.guidance:g}, history noise {args.history_noise:g})")
    print(f"{'latent frame':<16}" + "".join(f"{k:>8}" for k in range(1, true.shape[2])))
    for name, rows in errors.items():
        print(f"{name:<16}" + "".join(f"{v:>8.3f}" for v in np.mean(rows, axis=0)))
    last = {name: float(np.mean([r[-1] for r in rows])) for name, rows in errors.items()}
    print(f"\nlast frame: free-running / teacher-forced = {last['free-running'] / last['teacher-forced']:.1f}x")


if __name__ == "__main__":
    main()
