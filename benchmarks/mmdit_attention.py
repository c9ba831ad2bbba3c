"""Blockwise joint attention vs the reference's dense-mask SDPA, one attention layer at real width.

The call: stage 2 (full resolution) of the last autoregressive unit at 320x512 (latent 40x64,
patch 2): history [4 frames @1/4 (40 tokens each), 1 @1/2 (160), 1 @full (640)] + the current
frame (640) = 1,600 video tokens, plus 128 T5 tokens; 24 heads x 64 (inner width 1536).

Both variants get the same q, k, v [b, 24, 1728, 64]; the baseline includes building its dense
[b, 1, 1728, 1728] mask, as the reference does in every forward. Time is the median over repeats;
peak memory is the largest total of tensors allocated during one call beyond the inputs (CPU: the
torch profiler's memory timeline, a private torch API; CUDA: torch.cuda.max_memory_allocated).

    python benchmarks/mmdit_attention.py [--batch 2] [--valid-text 40] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

from neodragon_cli.pipelines.models.mmdit import joint_attention, joint_attention_mask

HEADS, HEAD_DIM, TEXT_LEN = 24, 64, 128
FRAME_SIZES = [40, 40, 40, 40, 160, 640, 640]


def make_inputs(args):
    gen = torch.Generator().manual_seed(0)
    total = TEXT_LEN + sum(FRAME_SIZES)
    q, k, v = (torch.randn(args.batch, HEADS, total, HEAD_DIM, generator=gen) for _ in range(3))
    text_valid = torch.zeros(args.batch, TEXT_LEN, dtype=torch.bool)
    text_valid[:, : args.valid_text] = True
    return [t.to(args.device) for t in (q, k, v, text_valid)]


def blockwise(q, k, v, text_valid):
    return joint_attention(q, k, v, text_valid, FRAME_SIZES, causal=True)


def dense(q, k, v, text_valid):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=joint_attention_mask(text_valid, FRAME_SIZES, causal=True))


VARIANTS = {"blockwise": blockwise, "dense-mask SDPA": dense}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn, inputs, device) -> int:
    """Peak bytes of tensors allocated by one call of fn (inputs excluded)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*inputs)
        _sync(device)
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn(*inputs)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    totals = [sum(row) for row in sizes]
    return max(totals) - totals[0]  # the first entry holds the tensors that existed before the call


def median_seconds(fn, inputs, device, repeats) -> float:
    fn(*inputs)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn(*inputs)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="1 = hybrid (no CFG), 2 = CFG batch")
    parser.add_argument("--valid-text", type=int, default=40, help="valid T5 tokens of the 128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    inputs = make_inputs(args)
    with torch.no_grad():
        diff = (blockwise(*inputs) - dense(*inputs)).abs().max().item()
        results = {
            name: (median_seconds(fn, inputs, args.device, args.repeats), peak_bytes(fn, inputs, args.device))
            for name, fn in VARIANTS.items()
        }

    total = TEXT_LEN + sum(FRAME_SIZES)
    print(f"stage-2 attention, 320x512, b={args.batch}: {sum(FRAME_SIZES)} video + {TEXT_LEN} text tokens "
          f"({args.valid_text} valid), {HEADS} heads x {HEAD_DIM}, {args.device}, {args.threads} thread(s)")
    pairs_dense = total * total
    pairs_block = TEXT_LEN * (TEXT_LEN + FRAME_SIZES[0]) + sum(
        n * (TEXT_LEN + sum(FRAME_SIZES[: i + 1])) for i, n in enumerate(FRAME_SIZES)
    )
    print(f"query-key pairs per head: blockwise {pairs_block:,} vs dense {pairs_dense:,} ({pairs_block / pairs_dense:.2f}x)")
    for name, (seconds, peak) in results.items():
        print(f"{name:>16}: {seconds * 1e3:8.1f} ms   peak +{peak / 2**20:7.1f} MiB")
    (tb, pb), (td, pd) = results["blockwise"], results["dense-mask SDPA"]
    print(f"speed-up {td / tb:.2f}x, peak memory ratio {pb / pd if pd else float('nan'):.2f}, max |blockwise - dense| = {diff:.2e}")


if __name__ == "__main__":
    main()
