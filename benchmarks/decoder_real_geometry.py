"""Real-size decoders at the real geometry: Pyramid-Flow's causal VAE decoder against Neodragon's
TAEHV-8x decoder, side by side in one run (random weights; paper Table 3, H100: 2.496 s vs 0.851 s).

Both decode raw latents [1, 16, T, 40, 64] to video [1, 3, 8(T-1)+1, 320, 512]; the default T = 7 is
the whole 49-frame 320x512 video. Each decoder is built in its own Python process (the VAE with its
real default config, then the encoder dropped: only the decoder and post_quant_conv stay), so that
one's memory does not mask the other's: peak RSS is the process's high-water mark during the decode
(reset after building, /proc/self/clear_refs), weights included; "resident before" is the RSS after
building. Time is the wall time of the decode, and its CPU time (process time of all threads: on a
shared machine the steadier measure of the work).

The decode streams latent chunks of `--window` latent frames (default 1) through each decoder's
`stream_decode`, as `neodragon generate` decodes (flat memory; the PF decoder on a whole 49-frame
clip at once needs tens of GB). Chunk 0 of the PF decoder gives 1 frame, later chunks 8 per latent
frame; TAEHV-8x computes 8 sub-frames for latent 0 too and keeps the last.

The PF decoder at real size takes a long time on a CPU (hundreds of TFLOP for 49 frames): with
`--frames T` (< 7) only the first T latent frames are decoded, and with --window 1 the full video's
time is also estimated as chunk 0 + 6 x the mean of the later chunks (needs T >= 2; with T = 1 only
chunk 0 is measured and nothing is estimated). Both decoders decode the same T.

    OMP_NUM_THREADS=1 python benchmarks/decoder_real_geometry.py [--frames 7] [--window 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

DECODERS = ("pyramid-flow", "taehv-8x")
LATENT = (16, 40, 64)  # channels, h, w of 320x512
FULL_LATENT_FRAMES = 7


def _status(key: str) -> int:
    """A /proc/self/status memory field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(name: str, frames: int, window: int, threads: int) -> dict:
    import torch

    from neodragon_cli.pipelines.models.causal_vae import AsymmetricCausalVideoVAE, CausalVideoVAE
    from neodragon_cli.pipelines.models.checkpoint import count_parameters

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    vae = (CausalVideoVAE if name == "pyramid-flow" else AsymmetricCausalVideoVAE)().eval()
    vae.encoder = None  # only the decoder side is measured
    gc.collect()
    params = count_parameters(vae)
    latents = torch.randn(1, LATENT[0], frames, *LATENT[1:], generator=torch.Generator().manual_seed(1))
    chunks = [latents[:, :, i : i + window] for i in range(0, frames, window)]
    resident = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark: the peak below is the decode's
    times, out_frames, finite = [], 0, True
    cpu = time.process_time()
    with torch.no_grad():
        stream = vae.stream_decode(iter(chunks))
        start = time.perf_counter()
        for video in stream:
            times.append(time.perf_counter() - start)
            out_frames += video.shape[2]
            finite = finite and bool(torch.isfinite(video).all())
            del video
            start = time.perf_counter()
    cpu = time.process_time() - cpu
    return {"name": name, "params": params, "seconds": sum(times), "cpu_seconds": cpu, "chunk_seconds": times, "frames": out_frames,
            "resident": resident, "peak": _status("VmHWM"), "finite": finite}


def run_child(name: str, args) -> dict:
    command = [sys.executable, __file__, "--child", name, "--frames", str(args.frames), "--window", str(args.window),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{name} decoder failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def full_video_estimate(result: dict, window: int) -> float | None:
    """chunk 0 + 6 x mean(later chunks), for one latent frame per chunk."""
    chunks = result["chunk_seconds"]
    if window != 1 or len(chunks) < 2:
        return None
    return chunks[0] + (FULL_LATENT_FRAMES - 1) * statistics.mean(chunks[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=FULL_LATENT_FRAMES, help="latent frames decoded (7 = 49 video frames)")
    parser.add_argument("--window", type=int, default=1, help="latent frames per streamed chunk")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=DECODERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.frames <= FULL_LATENT_FRAMES or args.window < 1:
        parser.error(f"--frames must be in 1..{FULL_LATENT_FRAMES} and --window at least 1")
    if args.child:
        print(json.dumps(child(args.child, args.frames, args.window, args.threads)))
        return

    results = {name: run_child(name, args) for name in DECODERS}
    video_frames = 8 * (args.frames - 1) + 1
    print(f"decode latents [16 x {args.frames} x 40 x 64] -> {video_frames} x 320 x 512"
          f"{'' if args.frames == FULL_LATENT_FRAMES else ' (the full video is 7 latent frames -> 49)'}, "
          f"random weights, fp32, streamed {args.window} latent frame(s) per chunk, {args.threads} thread(s), "
          f"one process per decoder")
    for name, r in results.items():
        estimate = full_video_estimate(r, args.window)
        extra = f"; full 49-frame video estimated {estimate:8.1f} s" if estimate is not None and args.frames < FULL_LATENT_FRAMES else ""
        print(f"{name:>13}: {r['params'] / 1e6:6.1f} M params  {r['seconds']:8.2f} s for {r['frames']} frames "
              f"(CPU {r['cpu_seconds']:.2f} s; chunks {', '.join(f'{t:.2f}' for t in r['chunk_seconds'])} s){extra}")
        print(f"{'':>13}  resident before {r['resident'] / 2**30:5.2f} GiB, peak during decode {r['peak'] / 2**30:5.2f} GiB"
              f"{'' if r['finite'] else '  (non-finite output!)'}")
    pf, tae = results["pyramid-flow"], results["taehv-8x"]
    line = (f"speed-up taehv-8x vs pyramid-flow: {pf['seconds'] / tae['seconds']:.1f}x wall, "
            f"{pf['cpu_seconds'] / tae['cpu_seconds']:.1f}x CPU time")
    estimates = full_video_estimate(pf, args.window), full_video_estimate(tae, args.window)
    if args.frames < FULL_LATENT_FRAMES and None not in estimates:
        line += f", {estimates[0] / estimates[1]:.1f}x on the full-video estimates"
    print(f"{line}; peak RSS ratio {pf['peak'] / tae['peak']:.1f}x  (paper, H100, full decode: 2.496 s vs 0.851 s = 2.9x)")


if __name__ == "__main__":
    main()
