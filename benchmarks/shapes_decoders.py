"""Shapes analogue of the paper's Table 3: the decoders of several pipelines side by side in one run.

For each pipeline (a folder or an embedded name) whose `vae` role holds an encoder and a decoder: the
decoder's parameters (with post_quant_conv), the wall time of decoding one whole 49-frame held-out video
from its latents, streamed one latent frame per chunk as `neodragon generate` decodes (the best of
`--repeats` rounds in which the pipelines take turns), and the reconstruction of `--clips` held-out Shapes videos through the pipeline's own
encoder: PSNR, SSIM and the judge's scores with every attribute stated (`judge_reconstructions`; the
same scenes for every row). Distilled decoders keep the parent's encoder bit-identical, so every row
decodes the same latents. The first pipeline is the reference of the speed ratios.

    OMP_NUM_THREADS=1 python benchmarks/shapes_decoders.py shapes-teacher runs/dd/taehv [--clips 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from neodragon_cli.pipelines.data.latent_cache import channels_last
from neodragon_cli.pipelines.data.shapes import ShapesVideoDataset, video_tensor
from neodragon_cli.pipelines.data.world_section import WorldSection
from neodragon_cli.pipelines.distill.distill_decoder import load_parent
from neodragon_cli.pipelines.eval.reconstruction import judge_reconstructions
from neodragon_cli.pipelines.models.checkpoint import count_parameters


@torch.no_grad()
def decode_seconds(vaes: list, frames, repeats: int) -> list[float]:
    """Best wall time per VAE of a streamed decode of the latents of `frames` (uint8 [T, H, W, 3]); the
    VAEs take turns in each round, so a change in the machine's load reaches every row alike."""
    latents = [vae.encode(channels_last(video_tensor(frames)[None])).mode() for vae in vaes]
    best = [float("inf")] * len(vaes)
    for _ in range(repeats):
        for i, (vae, z) in enumerate(zip(vaes, latents)):
            started = time.perf_counter()
            for _chunk in vae.stream_decode(z[:, :, t : t + 1] for t in range(z.shape[2])):
                pass
            best[i] = min(best[i], time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="pipeline folders or embedded names; the first is the reference")
    parser.add_argument("--clips", type=int, default=20, help="held-out videos reconstructed and judged")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, each decoding once with every pipeline (the best counts)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    world = WorldSection()  # the Shapes world the teacher was trained on: 49 x 128 x 128
    _, _, timed_video = ShapesVideoDataset(world.world(), length=1, seed=world.seed + 9_999, split="heldout").item(0)
    vaes = [load_parent(model).vae for model in args.models]
    seconds = decode_seconds(vaes, timed_video, args.repeats)
    rows = []
    for model, vae, decode_s in zip(args.models, vaes, seconds):
        row = {"model": model, "decoder": type(vae).__name__,
               "params_decoder": count_parameters(vae.decoder) + count_parameters(vae.post_quant_conv),
               "decode_s": decode_s,
               "reconstruction": judge_reconstructions(vae, world, args.clips, precision="fp32")}
        rows.append(row)
        r = row["reconstruction"]
        print(f"{model}: {row['params_decoder']:,} decoder parameters, {row['decode_s']:.2f} s per 49-frame video, "
              f"PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, Semantic {r['semantic']:.3f}, Quality {r['quality']:.3f}",
              flush=True)
    reference = rows[0]
    print(f"\n{'model':<28} {'params':>10} {'decode s':>9} {'speed-up':>8} {'PSNR':>6} {'SSIM':>6} {'Sem':>6} {'Qual':>6}")
    for row in rows:
        r = row["reconstruction"]
        row["speedup"] = reference["decode_s"] / row["decode_s"]
        print(f"{row['model']:<28} {row['params_decoder']:>10,} {row['decode_s']:>9.2f} {row['speedup']:>7.2f}x "
              f"{r['psnr']:>6.2f} {r['ssim']:>6.3f} {r['semantic']:>6.3f} {r['quality']:>6.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"clips": args.clips, "threads": args.threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
