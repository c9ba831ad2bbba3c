"""One denoising step across the three pyramid stages at real width and geometry: the 24-block
Pyramid-Flow MMDiT against the 18-block pruned one (paper §3.3: NPU 1.15 s -> 0.74 s), side by side.

Geometry: 320x512 video (latents 40x64, patch 2), the last autoregressive unit of a 49-frame video
(latent frame 6, 6 frames of history), 128 text tokens, batch `--batch` (1: Neodragon's hybrid
sampling without CFG; 2: a CFG call). Per stage s (1/4, 1/2, full resolution) the MMDiT gets the
sampler's own temporal-pyramid history (`sampler.history_clips`: frame 5 at stage s, one frame
further back per lower stage, the older ones at 1/4) and the current clip at stage s: 1/4 -> 40
current + 240 history tokens, 1/2 -> 160 + 360, full -> 640 + 960.

Method (a 2-billion-parameter model at fp32 is 8 GB and a full step takes minutes on a CPU): an
MMDiT of the real config (24 heads x 64 = 1536 wide, random weights) with only `--blocks` blocks is
built and called per stage; forward hooks time each block, in wall time and in CPU time (process
time: on a shared machine the steadier measure of the work). Per stage, the cost of an N-block
model is estimated as the measured call minus its blocks (patch and time embeddings, the context
embedder, norm_out / proj_out) plus N x the median block time; all blocks have the same shape, so
a block costs the same wherever it sits. The step is the sum over the three stages. Parameter
counts of both models come from meta-device builds of the real 24-block model and of it with 6
blocks removed (`without_blocks`).

    OMP_NUM_THREADS=1 python benchmarks/prune_step.py [--blocks 2] [--repeats 2] [--batch 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from neodragon_cli.pipelines.flow.sampler import history_clips
from neodragon_cli.pipelines.models.base import parameters_on_meta
from neodragon_cli.pipelines.models.checkpoint import count_parameters
from neodragon_cli.pipelines.models.mmdit import mmdit_from_preset

PRESET = "pyramid-flow-sd3-2b"
FULL, PRUNED = 24, 18
LATENT = (16, 40, 64)
UNIT = 6  # the last latent frame of a 49-frame video
TEXT_TOKENS = 128


def stage_inputs(model, stage: int, batch: int, generator: torch.Generator) -> dict:
    c, h, w = LATENT
    pyramid = [torch.randn(batch, c, UNIT, h >> (2 - s), w >> (2 - s), generator=generator) for s in range(3)]
    clips = history_clips(pyramid, stage, UNIT) + [torch.randn(batch, c, 1, h >> (2 - stage), w >> (2 - stage), generator=generator)]
    return dict(
        sample=[clips],
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, model.text_width, generator=generator),
        encoder_attention_mask=torch.ones(batch, TEXT_TOKENS, dtype=torch.long),
        pooled_projections=torch.randn(batch, model.config["pooled_projection_dim"], generator=generator),
        timestep_ratio=torch.full((batch,), 500.0),
    )


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def time_stage(model, inputs: dict, repeats: int) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """Median (wall, CPU) seconds of a call and of each block, over `repeats` calls after a warm-up."""
    blocks = model.transformer_blocks
    starts, block_times = {}, [[] for _ in blocks]

    def stop(i: int) -> None:
        wall, cpu = _clocks()
        block_times[i].append((wall - starts[i][0], cpu - starts[i][1]))

    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: starts.__setitem__(i, _clocks())) for i, b in enumerate(blocks)]
    hooks += [b.register_forward_hook(lambda m, a, o, i=i: stop(i)) for i, b in enumerate(blocks)]
    calls = []
    with torch.no_grad():
        model(**inputs)  # warm-up
        for _ in range(repeats):
            wall, cpu = _clocks()
            model(**inputs)
            end = _clocks()
            calls.append((end[0] - wall, end[1] - cpu))
    for h in hooks:
        h.remove()

    def median(pairs):
        return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)

    return median(calls), [median(t[1:]) for t in block_times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2, help="real-width blocks built and timed")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="1 = hybrid without CFG, 2 = a CFG call")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with parameters_on_meta():
        full = mmdit_from_preset(PRESET)
    params = {FULL: count_parameters(full), PRUNED: count_parameters(full.without_blocks(range(0, 2 * (FULL - PRUNED), 2)))}
    del full

    torch.manual_seed(0)
    model = mmdit_from_preset(PRESET, num_layers=args.blocks).eval()
    with torch.no_grad():  # a fresh MMDiT is the identity (AdaLN-Zero): give every weight a value
        for p in model.parameters():
            p.normal_(0, 0.02)
    generator = torch.Generator().manual_seed(1)
    rows = []
    for stage in range(3):
        inputs = stage_inputs(model, stage, args.batch, generator)
        tokens = sum(c.shape[2] * c.shape[3] * c.shape[4] // 4 for c in inputs["sample"][0])
        call, blocks = time_stage(model, inputs, args.repeats)
        per_clock = []
        for clock in (0, 1):  # wall, CPU
            block = statistics.median(b[clock] for b in blocks)
            per_clock.append((block, max(0.0, call[clock] - sum(b[clock] for b in blocks))))
        rows.append((stage, tokens, per_clock))

    print(f"one denoising step, 3 pyramid stages, 320x512, unit {UNIT} of 7, batch {args.batch}, {TEXT_TOKENS} text tokens, "
          f"real width 1536, random weights, fp32, {torch.get_num_threads()} thread(s); {args.blocks} block(s) timed per stage")
    for clock, name in ((0, "wall"), (1, "CPU")):
        totals = {FULL: 0.0, PRUNED: 0.0}
        print(f" {name} time:")
        for stage, tokens, per_clock in rows:
            block, rest = per_clock[clock]
            estimates = {n: rest + n * block for n in totals}
            for n in totals:
                totals[n] += estimates[n]
            print(f"  stage {stage} ({['1/4', '1/2', 'full'][stage]:>4}, {tokens:5d} video tokens): block {block:7.3f} s, "
                  f"outside blocks {rest:6.3f} s -> {FULL} blocks {estimates[FULL]:7.2f} s, {PRUNED} blocks {estimates[PRUNED]:7.2f} s")
        print(f"  step across the 3 stages: {FULL} blocks {totals[FULL]:.2f} s, {PRUNED} blocks {totals[PRUNED]:.2f} s, "
              f"speed-up {totals[FULL] / totals[PRUNED]:.2f}x")
    print(f"parameters: {FULL} blocks {params[FULL]:,}, {PRUNED} blocks {params[PRUNED]:,} ({params[FULL] / params[PRUNED]:.2f}x); "
          f"paper NPU step: 1.15 s -> 0.74 s = {1.15 / 0.74:.2f}x")


if __name__ == "__main__":
    main()
