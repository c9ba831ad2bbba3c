"""Text-path latency per prompt: teacher CE(T5(prompt)) against student CA(DistilT5(prompt)), side by side.

The text path is what `distill-te` replaces: token ids -> the MMDiT's text input. The pooled CLIP
path is untouched by distillation and not timed. One prompt per call (batch 1), padded to the
pipeline's 128 T5 tokens as `TextEncoderBundle` does; tokenization (the same tokenizer on both
sides) is timed apart. Times are medians over prompts x repeats after one warm-up call, fp32, in
wall time and in CPU (process) time, the steadier measure on a shared machine.

1. Shapes: a teacher pipeline (default the embedded `shapes-teacher`: T5 encoder + the MMDiT's
   context embedder) against a `distill-te` output folder (`--student`): its DistilT5 + its
   ContextAdapter (rm, em), or + the context embedder its MMDiT kept (lora, tdt5).
2. Real size, random weights:
   - teacher: T5 v1.1 XXL encoder (24 layers, width 4096, 4.76 B parameters, 19 GB in fp32: more
     than this machine can hold beside other work) + Pyramid-Flow's context embedder (4096 -> 1536).
     Only `--xxl-layers` encoder layers are built, at real width; the full encoder's time is
     estimated as the measured forward (embedding, those layers, final norm) plus (24 - k) x the
     mean time of the measured layers after the first (the first also computes the relative
     position bias), each layer timed by forward hooks. State: estimate, not a full forward.
   - student: the whole published-size DistilT5 (flan-t5-base encoder, 12 layers, width 768, +
     projection head to 4096) + the 4-layer 4096-wide SkipMLP ContextAdapter (4096 -> 1536), run
     in full.
   Parameter counts of both real paths come from meta-device builds (no memory).

    OMP_NUM_THREADS=1 python benchmarks/text_path_latency.py --student DISTILL_TE_OUT [--teacher shapes-teacher]
        [--prompts 32] [--repeats 3] [--xxl-layers 2] [--skip-real] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from neodragon_cli.pipelines.data.shapes import prompt_corpus
from neodragon_cli.pipelines.distill.prune import load_parent
from neodragon_cli.pipelines.models.base import parameters_on_meta
from neodragon_cli.pipelines.models.checkpoint import count_parameters
from neodragon_cli.pipelines.models.context_adapter import ContextAdapter
from neodragon_cli.pipelines.models.text_encoders import T5_MAX_LENGTH, T5_SIZES, DistilT5, T5TextEncoder, t5_config

XXL_LAYERS = T5_SIZES["t5-v1_1-xxl"]["num_layers"]
PF_WIDTH = 1536  # Pyramid-Flow MMDiT inner width (24 heads x 64)


class TextPath(nn.Module):
    """token ids, mask -> [1, L, MMDiT width]: an encoder, then its head."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(ids, attention_mask=mask))


def pipeline_text_path(folder: str):
    """(tokenize(prompt) -> (ids, mask), TextPath) of a pipeline folder or embedded model."""
    parent = load_parent(folder)
    bundle, adapter = parent.conditioner.text_encoder, parent.conditioner.context_adapter
    head = adapter if adapter is not None else parent.mmdit.context_embedder
    return bundle.tokenize_t5, TextPath(bundle.t5_encoder, head).eval()


CPU_TIMES: dict[str, float] = {}  # label -> median CPU seconds of the last median_call with that label


def median_call(fn, inputs: list[tuple], repeats: int, label: str = "") -> float:
    """Median wall seconds of fn(*x) over every input x, `repeats` times each, after one warm-up
    call; the median CPU (process) seconds go to CPU_TIMES[label]."""
    fn(*inputs[0])
    times, cpu = [], []
    for _ in range(repeats):
        for x in inputs:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn(*x)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    CPU_TIMES[label] = statistics.median(cpu)
    return statistics.median(times)


def shapes_part(args) -> None:
    prompts = prompt_corpus(args.prompts, 0, "heldout")
    rows = {}
    for name, folder in (("teacher", args.teacher), ("student", args.student)):
        tokenize, path = pipeline_text_path(folder)
        inputs = [tokenize(p) for p in prompts]
        with torch.no_grad():
            seconds = median_call(path, inputs, args.repeats, name)
        tokenize_seconds = median_call(tokenize, [(p,) for p in prompts], args.repeats)
        rows[name] = (folder, count_parameters(path.encoder), count_parameters(path.head), seconds, tokenize_seconds)
    print(f"1. Shapes text path, batch 1, {T5_MAX_LENGTH} tokens, {len(prompts)} held-out prompts x {args.repeats}, fp32, "
          f"{torch.get_num_threads()} thread(s)")
    for name, (folder, enc, head, seconds, tok) in rows.items():
        print(f"  {name:>7} {folder}: encoder {enc:,} + head {head:,} params: {seconds * 1e3:8.3f} ms per prompt "
              f"(CPU {CPU_TIMES[name] * 1e3:.3f} ms; + tokenizer {tok * 1e3:.3f} ms)")
    print(f"  student speed-up {rows['teacher'][3] / rows['student'][3]:.2f}x wall, "
          f"{CPU_TIMES['teacher'] / CPU_TIMES['student']:.2f}x CPU time")


def real_part(args) -> None:
    xxl = T5_SIZES["t5-v1_1-xxl"]
    with parameters_on_meta():
        full_teacher = count_parameters(T5TextEncoder(t5_config(**xxl)))
        student_encoder = count_parameters(DistilT5(t5_config(**T5_SIZES["flan-t5-base"]), project_out_dim=xxl["d_model"]))
        adapter_params = count_parameters(ContextAdapter(input_dims=xxl["d_model"], output_dims=PF_WIDTH))
    ce_params = xxl["d_model"] * PF_WIDTH + PF_WIDTH

    torch.manual_seed(0)
    ids = torch.randint(1, xxl["vocab_size"], (1, T5_MAX_LENGTH))
    mask = torch.ones_like(ids)
    mask[:, 40:] = 0  # a 40-token prompt padded to 128, as the pipeline calls it
    inputs = [(ids, mask)]

    k = args.xxl_layers
    teacher = T5TextEncoder(t5_config(**{**xxl, "num_layers": k}, dropout_rate=0.0)).eval()
    ce = nn.Linear(xxl["d_model"], PF_WIDTH)
    layer_times: list[list[tuple[float, float]]] = [[] for _ in range(k)]  # (wall, CPU) per call
    starts = {}

    def stop(i: int) -> None:
        layer_times[i].append((time.perf_counter() - starts[i][0], time.process_time() - starts[i][1]))

    blocks = teacher.encoder.encoder.block
    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: starts.__setitem__(i, (time.perf_counter(), time.process_time()))))
        hooks.append(block.register_forward_hook(lambda m, a, o, i=i: stop(i)))
    with torch.no_grad():
        measured = median_call(TextPath(teacher, ce), inputs, args.repeats, "xxl")
    for h in hooks:
        h.remove()
    # [1:]: drop the warm-up call; the layers after the first (which also computes the position bias)
    per_layer = [statistics.median(w for w, _ in t[1:]) for t in layer_times]
    per_layer_cpu = [statistics.median(c for _, c in t[1:]) for t in layer_times]
    estimate = measured + (XXL_LAYERS - k) * statistics.mean(per_layer[1:] or per_layer)
    cpu_estimate = CPU_TIMES["xxl"] + (XXL_LAYERS - k) * statistics.mean(per_layer_cpu[1:] or per_layer_cpu)
    del teacher

    student = TextPath(DistilT5(t5_config(**T5_SIZES["flan-t5-base"], dropout_rate=0.0), project_out_dim=xxl["d_model"]),
                       ContextAdapter(input_dims=xxl["d_model"], output_dims=PF_WIDTH)).eval()
    with torch.no_grad():
        student_seconds = median_call(student, inputs, args.repeats, "distilt5")

    print(f"2. Real size, random weights, batch 1, {T5_MAX_LENGTH} tokens (40 valid), fp32, {torch.get_num_threads()} thread(s)")
    print(f"  teacher T5-XXL encoder {full_teacher:,} + context embedder {ce_params:,} params "
          f"({(full_teacher + ce_params) * 4 / 2**30:.1f} GiB fp32): built with {k} of {XXL_LAYERS} layers")
    print(f"    measured {k}-layer forward + CE {measured:.3f} s; layers {', '.join(f'{t:.3f}' for t in per_layer)} s "
          f"-> estimated {XXL_LAYERS}-layer path {estimate:.2f} s per prompt")
    print(f"  student DistilT5 {student_encoder:,} + ContextAdapter {adapter_params:,} params "
          f"({(student_encoder + adapter_params) / 1e9:.3f} B), full forward: {student_seconds:.3f} s per prompt "
          f"(CPU {CPU_TIMES['distilt5']:.3f} s)")
    print(f"  CPU time: teacher {k}-layer path {CPU_TIMES['xxl']:.3f} s (layers {', '.join(f'{t:.3f}' for t in per_layer_cpu)} s) "
          f"-> estimated {XXL_LAYERS}-layer path {cpu_estimate:.2f} s; student {CPU_TIMES['distilt5']:.3f} s; "
          f"speed-up {cpu_estimate / CPU_TIMES['distilt5']:.1f}x")
    print(f"  student speed-up {estimate / student_seconds:.1f}x (estimated teacher / measured student), "
          f"parameters {(full_teacher + ce_params) / (student_encoder + adapter_params):.1f}x fewer")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="a distill-te output folder")
    parser.add_argument("--teacher", default="shapes-teacher", help="the teacher pipeline (folder or embedded name)")
    parser.add_argument("--prompts", type=int, default=32, help="Shapes held-out prompts timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--xxl-layers", type=int, default=2, help="real-width T5-XXL layers built (2..24)")
    parser.add_argument("--skip-real", action="store_true", help="only the Shapes comparison")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not 1 <= args.xxl_layers <= XXL_LAYERS:
        parser.error(f"--xxl-layers must be in 1..{XXL_LAYERS}")
    torch.set_num_threads(args.threads)
    shapes_part(args)
    if not args.skip_real:
        real_part(args)


if __name__ == "__main__":
    main()
