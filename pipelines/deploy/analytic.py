"""The compute model of pyramidal causal video generation (Neodragon's preliminaries) and FLOPs per
module per pyramid stage for a given model and schedule.

Closed-form attention model (image tokens only; t latent frames of n tokens each at full resolution):

    (1) bidirectional          D_bi  = (t n)^2                      every token sees every token
    (2) causal                 D_c   = n^2 t (t + 1) / 2            frame i (1-based) sees frames <= i
    (3) causal speed-up        D_bi / D_c = 2 t / (t + 1)           -> 2 for long videos
    (4) temporally-pyramidal   D_tp  = sum_i n (n + (i - 1) n / k)  = n^2 (t + t (t - 1) / (2 k)):
        causal                 the history is held at the coarsest pyramid level, k = r^(2 (S - 1))
                               times fewer tokens (k = 16 for S = 3 stages of side ratio r = 2)
    (5) its speed-up           D_bi / D_tp = 2 k t / (2 k + t - 1)  -> 2 k = 32 for long videos
    (6) spatial pyramid        stage s of S has n / r^(2 (S - 1 - s)) tokens; with the same steps at
                               every stage a quadratic cost is, against all steps at full resolution,
    (7) spatial factor         S / sum_s r^(-4 (S - 1 - s)) = 3 / (1 + 1/16 + 1/256) = 2.81
                               (linear layers: S / sum_s r^(-2 (S - 1 - s)) = 2.29)
    (8) combined speed-up      (5) x (7) -> 32 x 2.81 = 90 for long videos
    (9) as run                 per DiT call, the sequence [text, history clips..., current clip] under
                               the temporal-causal mask (no KV cache: history tokens are recomputed
                               every call): sum_f tokens_f x (text + sum_{g <= f} tokens_g), summed over
                               units, stages, steps and the CFG batch (`schedule_dot_products`)

FLOPs per module (`pipeline_flops`) come from running each network once under torch's FLOP counter on
the meta device (shapes only, no memory, no arithmetic): text encoders at their token lengths, the
ContextAdapter, the MMDiT for every (unit, stage) call shape of the schedule (a 2-block twin of the
model is counted and scaled to the real depth: every block but the last is identical), the VAE encoder
(hybrid first frame), the streaming decoder over the video's latent frames and the SR model per frame.
For exported graphs, `onnx_graph_flops` counts MatMul / Gemm / Conv from the graph's static shapes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from neodragon_cli.errors import UsageError

STAGES = 3
SIDE_RATIO = 2
REAL_SIZES = ("real:neodragon", "real:pyramid-flow")


# ------------------------------------------------------------------------------------ closed form (1)-(8)


def bidirectional_dot_products(t: int, n: int) -> float:
    """(1): every token of the t-frame video attends to every token."""
    return float(t * n) ** 2


def causal_dot_products(t: int, n: int) -> float:
    """(2): the tokens of frame i attend to frames 1..i."""
    return float(n) ** 2 * t * (t + 1) / 2


def causal_speedup(t: int) -> float:
    """(3) = (1) / (2) = 2t / (t + 1)."""
    return bidirectional_dot_products(t, 1) / causal_dot_products(t, 1)


def history_compression(stages: int = STAGES, ratio: int = SIDE_RATIO) -> int:
    """k: how many times fewer tokens a frame has at the coarsest pyramid level (16 for 3 stages of 2x)."""
    return ratio ** (2 * (stages - 1))


def pyramidal_causal_dot_products(t: int, n: int, k: float | None = None) -> float:
    """(4): frame i attends to itself at full resolution and to its i - 1 predecessors at 1/k tokens."""
    k = history_compression() if k is None else k
    return float(n) ** 2 * (t + t * (t - 1) / (2 * k))


def pyramidal_causal_speedup(t: int | None = None, k: float | None = None) -> float:
    """(5) = (1) / (4); t None: the long-video limit 2k."""
    k = history_compression() if k is None else k
    if t is None:
        return 2 * k
    return bidirectional_dot_products(t, 1) / pyramidal_causal_dot_products(t, 1, k)


def spatial_pyramid_factor(stages: int = STAGES, ratio: int = SIDE_RATIO, power: int = 2) -> float:
    """(7): cost of S stages at full resolution over the pyramid's, for a cost ~ tokens^power
    (2: attention, 1: linear layers), with the same number of steps per stage."""
    return stages / sum(ratio ** (-2 * power * (stages - 1 - s)) for s in range(stages))


def combined_speedup(t: int | None = None, stages: int = STAGES, ratio: int = SIDE_RATIO) -> float:
    """(8) = (5) x (7)."""
    return pyramidal_causal_speedup(t, history_compression(stages, ratio)) * spatial_pyramid_factor(stages, ratio)


def paper_figures(t: int = 7, stages: int = STAGES, ratio: int = SIDE_RATIO) -> dict:
    """The compute model's figures for t latent frames and in the long-video limit."""
    k = history_compression(stages, ratio)
    return {
        "latent_frames": t,
        "history_compression_k": k,
        "causal_speedup": causal_speedup(t),
        "causal_speedup_limit": 2.0,
        "pyramidal_causal_speedup": pyramidal_causal_speedup(t, k),
        "pyramidal_causal_speedup_limit": pyramidal_causal_speedup(None, k),
        "spatial_pyramid_factor": spatial_pyramid_factor(stages, ratio),
        "spatial_pyramid_factor_linear": spatial_pyramid_factor(stages, ratio, power=1),
        "combined_speedup": combined_speedup(t, stages, ratio),
        "combined_speedup_limit": combined_speedup(None, stages, ratio),
    }


# ------------------------------------------------------------------------------------ schedule (9)


@dataclass(frozen=True)
class DiTCall:
    """One MMDiT call shape of a schedule: `steps` x `batch` calls of it per video."""

    unit: int
    stage: int
    steps: int
    batch: int  # 2 under classifier-free guidance
    frame_tokens: tuple[int, ...]  # tokens per frame, oldest history frame first, the current frame last
    text_tokens: int
    frame_sizes: tuple[tuple[int, int], ...]  # latent (h, w) per frame, same order

    @property
    def tokens(self) -> int:
        return self.text_tokens + sum(self.frame_tokens)

    def dot_products(self, text: bool = False) -> float:
        """Query-key dot products of one batch row under the temporal-causal mask (text: with the
        text tokens, which see the text and frame 0)."""
        total, seen = 0.0, self.text_tokens if text else 0
        for tokens in self.frame_tokens:
            seen += tokens
            total += tokens * seen
        if text and self.text_tokens:
            total += self.text_tokens * (self.text_tokens + self.frame_tokens[0])
        return total


def history_sizes(stage: int, end: int, sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Latent sizes of the history frames for predicting frame `end` at `stage` (oldest first), the
    rule of `flow.sampler.history_clips`: frame end-1 at `stage`, end-2 at stage-1, ... down to
    stage 1, every older frame at stage 0."""
    frames, level = [], stage
    while end > 0 and (level > 0 or not frames):
        frames.append(sizes[level])
        end -= 1
        level -= 1
    frames.extend([sizes[0]] * end)
    return frames[::-1]


def schedule_calls(config, *, latent_frames: int, latent_size: tuple[int, int], patch_size: int, text_tokens: int,
                   hybrid: bool, stages: int = STAGES) -> list[DiTCall]:  # fmt: skip
    """Every (unit, stage) MMDiT call shape of one video under `config` (a SamplingConfig)."""
    h, w = latent_size
    sizes = [(h >> (stages - 1 - s), w >> (stages - 1 - s)) for s in range(stages)]
    calls = []
    for unit in range(1 if hybrid else 0, latent_frames):
        steps, guidance = config.unit_plan(unit)
        for stage in range(stages):
            frames = history_sizes(stage, unit, sizes) + [sizes[stage]]
            tokens = tuple((a // patch_size) * (b // patch_size) for a, b in frames)
            calls.append(DiTCall(unit, stage, steps[stage], 2 if guidance > 0 else 1, tokens, text_tokens, tuple(frames)))
    return calls


def schedule_dot_products(calls: Sequence[DiTCall], latent_frames: int, text: bool = False) -> dict:
    """(9) for the schedule, against bidirectional full-resolution generation of the same video with
    the same number of network evaluations per unit at the full-resolution token count."""
    as_run = sum(c.dot_products(text) * c.steps * c.batch for c in calls)
    full = max(c.frame_tokens[-1] for c in calls)
    units = {c.unit for c in calls}
    evaluations = sum(c.steps * c.batch for c in calls) / max(len(units), 1)
    bidirectional = evaluations * bidirectional_dot_products(latent_frames, full)
    return {"as_run": as_run, "bidirectional_full_resolution": bidirectional,
            "speedup": bidirectional / as_run if as_run else None}  # fmt: skip


# ------------------------------------------------------------------------------------ FLOPs per module


@dataclass
class ModuleFlops:
    """FLOPs of one pipeline module over one video (multiply-add = 2 FLOPs)."""

    name: str  # text_encoder, context_adapter, mmdit_stage<s>, vae_encoder, decoder, sr
    role: str
    calls: int  # network calls per video
    flops: float  # per video
    attention_flops: float = 0.0  # the part in batched matmuls (attention) where known
    stage: int | None = None
    per_call_max: float = 0.0  # the most expensive single call (MMDiT: the longest history)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Components:
    """The networks FLOPs are counted on (real modules, or built on the meta device)."""

    mmdit: torch.nn.Module
    t5: torch.nn.Module | None = None
    clips: list = field(default_factory=list)
    t5_length: int = 128
    context_adapter: torch.nn.Module | None = None
    vae: object | None = None  # encoder for the hybrid first frame
    decoder: object | None = None  # has stream_decode
    sr: torch.nn.Module | None = None
    spatial_compression: int = 8
    temporal_compression: int = 8
    name: str = ""

    @classmethod
    def from_pipeline(cls, pipe) -> Components:
        bundle = pipe.text_encoder
        return cls(
            mmdit=pipe.mmdit, t5=getattr(bundle, "t5_encoder", None), clips=list(getattr(bundle, "clip_encoders", [])),
            t5_length=getattr(bundle, "max_length", 128), context_adapter=pipe.context_adapter, vae=pipe.vae,
            decoder=pipe.decoder or pipe.vae, sr=pipe.sr, spatial_compression=pipe.vae.spatial_compression,
            temporal_compression=pipe.vae.temporal_compression, name=pipe.name,
        )  # fmt: skip

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal_compression + 1


def real_size_builders(name: str) -> dict[str, Callable[[], object]]:
    """Constructors of a published-size pipeline's networks, by Components field (clips: a list):
    real:neodragon (DistilT5, CLIP-L + CLIP-G pooled, ContextAdapter, 18-block MMDiT, asymmetric VAE
    with the TAEHV-style decoder, QuickSRNet-Large 2x) or real:pyramid-flow (T5-XXL, CLIP-L + CLIP-G,
    24-block SD3 MMDiT, causal VAE). Called on the meta device they allocate nothing."""
    from neodragon_cli.pipelines.models.causal_vae import (
        AsymmetricCausalVideoVAE,
        CausalVideoVAE,
    )
    from neodragon_cli.pipelines.models.context_adapter import ContextAdapter
    from neodragon_cli.pipelines.models.mmdit import mmdit_from_preset
    from neodragon_cli.pipelines.models.quicksrnet import QuickSRNetLarge
    from neodragon_cli.pipelines.models.text_encoders import (
        CLIP_SIZES,
        T5_SIZES,
        CLIPTextEncoder,
        DistilT5,
        T5TextEncoder,
        clip_text_config,
        t5_config,
    )

    if name not in REAL_SIZES:
        raise UsageError(f"unknown real-size pipeline '{name}'", hint=f"use one of: {', '.join(REAL_SIZES)}")
    clips = lambda: [CLIPTextEncoder(clip_text_config(**CLIP_SIZES[c])) for c in ("clip-l", "clip-g")]
    if name == "real:neodragon":
        return {"mmdit": lambda: mmdit_from_preset("neodragon-18"), "t5": lambda: DistilT5(t5_config(**T5_SIZES["flan-t5-base"])),
                "clips": clips, "context_adapter": ContextAdapter, "vae": AsymmetricCausalVideoVAE, "sr": lambda: QuickSRNetLarge(2)}  # fmt: skip
    return {"mmdit": lambda: mmdit_from_preset("pyramid-flow-sd3-2b"), "t5": lambda: T5TextEncoder(t5_config(**T5_SIZES["t5-v1_1-xxl"])),
            "clips": clips, "vae": CausalVideoVAE}  # fmt: skip


def real_size_components(name: str) -> Components:
    """A published-size pipeline (`real_size_builders`) with its parameters on the meta device."""
    from neodragon_cli.pipelines.models.base import parameters_on_meta

    builders = real_size_builders(name)
    with parameters_on_meta(), torch.device("meta"):
        return Components(**{key: build() for key, build in builders.items()}, name=name)


def count_flops(call: Callable[[], object], module_suffix: str | None = None) -> tuple[float, float, float, float]:
    """(total FLOPs, batched-matmul FLOPs) of `call()` under torch's FLOP counter, and the same two
    for the submodule whose qualified name ends with `module_suffix` (0 when none)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        call()
    counts = counter.get_flop_counts()

    def split(ops) -> tuple[float, float]:
        return float(sum(ops.values())), float(sum(v for k, v in ops.items() if "bmm" in str(k) or "attention" in str(k)))

    total = split(counts.get("Global", {}))
    sub = next((split(ops) for name, ops in counts.items() if module_suffix and name.endswith(module_suffix)), (0.0, 0.0))
    return (*total, *sub)


def _meta(module):
    """`module` itself when its parameters are on the meta device, else a meta-device copy (the
    weights are not copied)."""
    if module is None:
        return None
    first = next(iter(module.parameters()), None)
    return module if first is None or first.is_meta else _module_to_meta(module)


def _module_to_meta(module: torch.nn.Module) -> torch.nn.Module:
    memo = {id(p): torch.nn.Parameter(p.detach().to("meta"), requires_grad=False) for p in module.parameters()}
    memo.update({id(b): b.detach().to("meta") for b in module.buffers()})
    return copy.deepcopy(module, memo)


def two_block_twin(mmdit) -> tuple[torch.nn.Module, int]:
    """A meta-device MMDiT like `mmdit` with 2 blocks (a regular one and the context-pre-only last
    one), and the real depth."""
    from neodragon_cli.pipelines.models.base import parameters_on_meta

    depth = len(mmdit.transformer_blocks)
    with parameters_on_meta(), torch.device("meta"):
        twin = type(mmdit)(**{**mmdit.config, "num_layers": min(depth, 2)})
    return twin.eval(), depth


def mmdit_call_flops(twin, depth: int, call: DiTCall) -> tuple[float, float]:
    """(FLOPs, attention FLOPs) of one batch row of `call` for an MMDiT of `depth` blocks, counted
    on its 2-block meta twin: every block but the last (context pre-only) costs the same."""
    with torch.device("meta"):
        clips = [torch.empty(1, twin.out_channels, 1, h, w) for h, w in call.frame_sizes]
        kwargs = dict(sample=[clips], encoder_hidden_states=torch.empty(1, call.text_tokens, twin.text_width),
                      encoder_attention_mask=None, pooled_projections=torch.empty(1, twin.config["pooled_projection_dim"]),
                      timestep_ratio=torch.tensor([500.0]))  # fmt: skip
    total, attention, block, block_attention = count_flops(lambda: twin(**kwargs), "transformer_blocks.0")
    extra = max(depth - len(twin.transformer_blocks), 0)
    return total + extra * block, attention + extra * block_attention


def pipeline_flops(parts: Components, settings, *, stages: int = STAGES) -> tuple[list[ModuleFlops], list[DiTCall]]:
    """FLOPs per module over one video made with resolved `settings` (GenerationSettings)."""
    config = settings.sampling_config()
    hybrid = settings.mode == "hybrid"
    latents = parts.latent_frames(settings.frames)
    latent_size = (settings.height // parts.spatial_compression, settings.width // parts.spatial_compression)
    mmdit = parts.mmdit
    calls = schedule_calls(config, latent_frames=latents, latent_size=latent_size, patch_size=mmdit.patch_size,
                           text_tokens=parts.t5_length, hybrid=hybrid, stages=stages)  # fmt: skip
    cfg = any(c.batch > 1 for c in calls)
    text_calls = 2 if cfg else 1
    out: list[ModuleFlops] = []
    if parts.t5 is not None:
        t5 = _meta(parts.t5)
        with torch.device("meta"):
            ids = torch.zeros(1, parts.t5_length, dtype=torch.long)
        flops, attn, *_ = count_flops(lambda: t5(ids, attention_mask=None))  # all valid: the same FLOPs
        for clip in parts.clips:
            clip = _meta(clip)
            length = getattr(getattr(getattr(clip, "model", None), "config", None), "max_position_embeddings", 77)
            with torch.device("meta"):
                clip_ids = torch.zeros(1, length, dtype=torch.long)
            f, a, *_ = count_flops(lambda clip=clip, clip_ids=clip_ids: clip(clip_ids))
            flops, attn = flops + f, attn + a
        out.append(ModuleFlops("text_encoder", "text_encoder", text_calls, flops * text_calls, attn * text_calls, per_call_max=flops))
    if parts.context_adapter is not None:
        adapter = _meta(parts.context_adapter)
        width = parts.t5.output_dim if parts.t5 is not None and hasattr(parts.t5, "output_dim") else mmdit.text_width
        with torch.device("meta"):
            x = torch.empty(1, parts.t5_length, width)
        f, a, *_ = count_flops(lambda: adapter(x))
        out.append(ModuleFlops("context_adapter", "context_adapter", text_calls, f * text_calls, a * text_calls, per_call_max=f))
    cache: dict = {}
    twin, depth = two_block_twin(mmdit)
    for stage in range(stages):
        entry = ModuleFlops(f"mmdit_stage{stage}", "mmdit", 0, 0.0, 0.0, stage=stage)
        for call in (c for c in calls if c.stage == stage):
            key = (call.frame_sizes, call.text_tokens)
            if key not in cache:
                cache[key] = mmdit_call_flops(twin, depth, call)
            f, a = cache[key]
            n = call.steps * call.batch
            entry.calls += n
            entry.flops += f * n
            entry.attention_flops += a * n
            entry.per_call_max = max(entry.per_call_max, f)
        out.append(entry)
    h, w = settings.height, settings.width
    if hybrid and parts.vae is not None and hasattr(parts.vae, "encode"):
        vae = _meta(parts.vae)
        with torch.device("meta"):
            frame = torch.empty(1, 3, 1, h, w)
        f, a, *_ = count_flops(lambda: vae.encode(frame))
        out.append(ModuleFlops("vae_encoder", "vae", 1, f, a, per_call_max=f))
    decoder = parts.decoder or parts.vae
    if decoder is not None and hasattr(decoder, "stream_decode"):
        decoder = _meta(decoder)
        channels = mmdit.out_channels
        with torch.device("meta"):
            raw = [torch.empty(1, channels, 1, *latent_size) for _ in range(latents)]
        f, a, *_ = count_flops(lambda: list(decoder.stream_decode(iter(raw))))
        out.append(ModuleFlops("decoder", "decoder", latents, f, a, per_call_max=f / latents))
    if parts.sr is not None and settings.sr is not False:
        sr = _meta(parts.sr)
        with torch.device("meta"):
            frame = torch.empty(1, 3, h, w)
        f, a, *_ = count_flops(lambda: sr(frame))
        out.append(ModuleFlops("sr", "sr", settings.frames, f * settings.frames, a * settings.frames, per_call_max=f))
    return out, calls


# ------------------------------------------------------------------------------------ ONNX graphs


def onnx_graph_flops(path: str | Path) -> float:
    """MatMul / Gemm / Conv FLOPs of one run of an ONNX graph with static shapes (elementwise ops,
    norms and softmax are not counted; QDQ graphs count the same as float ones)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for tensor in model.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    total = 0.0
    for node in model.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        if node.op_type == "MatMul" and node.input[0] in shapes:
            total += 2.0 * math.prod(out) * shapes[node.input[0]][-1]
        elif node.op_type == "Gemm" and node.input[0] in shapes:
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            a = shapes[node.input[0]]
            total += 2.0 * math.prod(out) * (a[0] if trans_a else a[-1])
        elif node.op_type in ("Conv", "ConvTranspose") and node.input[1] in shapes:
            weight = shapes[node.input[1]]
            if node.op_type == "Conv":
                total += 2.0 * math.prod(out) * math.prod(weight[1:])
            else:
                total += 2.0 * math.prod(shapes.get(node.input[0], [0])) * math.prod(weight[1:])
    return total


# ------------------------------------------------------------------------------------ measured vs predicted


def predict_times(flops: dict[str, float], measured_ms: dict[str, float]) -> dict:
    """One throughput fitted over the modules with both numbers (sum FLOPs / sum time), and per module
    the time it predicts and measured / predicted (> 1: slower than the device's average rate)."""
    both = [k for k in flops if k in measured_ms and measured_ms[k] > 0 and flops[k] > 0]
    if not both:
        return {"gflops_per_s": None, "modules": {}}
    rate = sum(flops[k] for k in both) / (sum(measured_ms[k] for k in both) / 1e3)
    modules = {k: {"predicted_ms": flops[k] / rate * 1e3, "measured_over_predicted": measured_ms[k] / (flops[k] / rate * 1e3)} for k in both}
    return {"gflops_per_s": rate / 1e9, "modules": modules}
