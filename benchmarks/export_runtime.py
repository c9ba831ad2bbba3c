"""Per exported graph: ONNX Runtime (CPU EP) vs PyTorch eager latency side by side, on the same inputs.

Two sets of graphs:
  * the Shapes pipeline (`--model`, default the embedded shapes-teacher) at its default geometry:
    every graph `neodragon export` writes, timed on the real inputs it validates with;
  * with `--real-width`: the MMDiT stage graphs of a random-weight MMDiT of real width (24 heads x 64 =
    1536, `--blocks` blocks) at Neodragon geometry 49 x 320 x 512 (stages 7 x 10 x 16, 7 x 20 x 32,
    7 x 40 x 64), timed at the longest history against the unpadded PyTorch call.

PyTorch runs the module each graph replaces (for stage graphs: the unpadded MMDiT call, i.e. the
blockwise-attention model; for T5: the unscaled encoder). A/B runs are interleaved, min of `--repeats`,
session creation and export excluded.

    nice python benchmarks/export_runtime.py [--threads 1] [--repeats 5] [--real-width --blocks 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from neodragon_cli.artifacts import resolve_model
from neodragon_cli.pipelines.deploy import onnx_tools
from neodragon_cli.pipelines.deploy.export import Geometry, export_graph, mmdit_graphs, plan_graphs, select_components
from neodragon_cli.pipelines.flow.pipeline import VideoPipeline
from neodragon_cli.pipelines.flow.sampler import history_clips
from neodragon_cli.pipelines.flow.scheduler import latent_pyramid
from neodragon_cli.pipelines.models.mmdit import mmdit_from_preset


def timed(call, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def compare(specs, torch_calls, folder: Path, repeats: int, threads: int) -> None:
    """Print one row per graph: size, first input shape, SQNR, PyTorch ms, ONNX Runtime ms, speed-up of ONNX Runtime."""
    print(f"{'graph':16s} {'MiB':>7s} {'first input':>18s} {'SQNR dB':>8s} {'torch ms':>9s} {'ORT ms':>8s} {'ORT x':>6s}")
    for spec, torch_call in zip(specs, torch_calls):
        entry = export_graph(spec, folder, opset=17, fill=-100.0)
        sess = onnx_tools.session(folder / entry["file"], threads=threads)
        case = spec.cases[0]
        sqnr = min(onnx_tools.sqnr_db(r, o) for r, o in zip(spec.references[0], onnx_tools.run(sess, case)))
        torch_ms, ort_ms = float("inf"), float("inf")
        with torch.no_grad():
            torch_call()
            onnx_tools.run(sess, case)
            for _ in range(repeats):  # interleaved A/B
                torch_ms = min(torch_ms, timed(torch_call, 1) * 1e3)
                ort_ms = min(ort_ms, timed(lambda: onnx_tools.run(sess, case), 1) * 1e3)
        shape = "x".join(map(str, entry["inputs"][0]["shape"]))
        print(f"{spec.name:16s} {entry['bytes'] / 2**20:7.2f} {shape:>18s} {sqnr:8.1f} {torch_ms:9.2f} {ort_ms:8.2f} {torch_ms / ort_ms:6.2f}")


def torch_reference(pipe, spec):
    """The PyTorch eager call a graph replaces, on the graph's first case."""
    case = spec.cases[0]
    if spec.name.startswith("mmdit_stage"):
        kwargs = spec.notes["call"]
        return lambda: pipe.mmdit(**kwargs)
    module = {"t5": pipe.text_encoder.t5_encoder if pipe.text_encoder else None}.get(spec.name, spec.module)
    return lambda: module(*case.values())


def shapes_pipeline(model: str, repeats: int, threads: int) -> None:
    pipe = VideoPipeline.from_pretrained(resolve_model(model))
    d = pipe.settings()
    specs, rec = plan_graphs(pipe, Geometry(d.height, d.width, d.frames), select_components(pipe, "all"))
    longest = {tuple(k["sample"][0][-1].shape[-2:]): k for k, _ in rec.mmdit}  # the last call per stage: longest history
    for spec in specs:
        if spec.name.startswith("mmdit_stage"):
            spec.notes["call"] = longest[spec.module.layout.level_sizes[-1]]
    print(f"== {model} at {d.frames}x{d.height}x{d.width}, {torch.get_num_threads()} torch threads")
    with tempfile.TemporaryDirectory() as folder:
        compare(specs, [torch_reference(pipe, s) for s in specs], Path(folder), repeats, threads)


def real_width(blocks: int, repeats: int, threads: int) -> None:
    torch.manual_seed(0)
    model = mmdit_from_preset("neodragon-18", num_layers=blocks).eval()
    for param in model.parameters():  # a fresh model outputs 0 (AdaLN-Zero): give every weight a value
        torch.nn.init.normal_(param, std=0.02)
    latents, (h, w), text = 7, (40, 64), 128
    pyramid = latent_pyramid(torch.randn(1, 16, latents, h, w), 3)
    calls = []
    for stage in range(3):
        side = (h >> (2 - stage), w >> (2 - stage))
        kwargs = dict(sample=[history_clips(pyramid, stage, latents - 1) + [torch.randn(1, 16, 1, *side)]],
                      encoder_hidden_states=torch.randn(1, text, model.text_width), encoder_attention_mask=torch.ones(1, text, dtype=torch.long),
                      pooled_projections=torch.randn(1, 2048), timestep_ratio=torch.tensor([500.0]))  # fmt: skip
        with torch.no_grad():
            calls.append((kwargs, model(**kwargs)[0]))
    specs = mmdit_graphs(model, (h, w), latents, calls)
    print(f"== real-width MMDiT (1536 wide, {blocks} blocks) at 49x320x512, longest history")
    with tempfile.TemporaryDirectory() as folder:
        compare(specs, [lambda k=k: model(**k) for k, _ in calls], Path(folder), repeats, threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-teacher")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--real-width", action="store_true")
    parser.add_argument("--blocks", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes_pipeline(args.model, args.repeats, args.threads)
    if args.real_width:
        real_width(args.blocks, args.repeats, args.threads)


if __name__ == "__main__":
    main()
