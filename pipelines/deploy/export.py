"""`export`: a video pipeline as static ONNX graphs for an NPU, validated against PyTorch.

    graphs = plan_graphs(pipe, Geometry(...), components)     # torch modules + recorded real inputs
    manifest = write_graphs(graphs, folder, opset=17, ...)     # .onnx files, graph pass, validation

Graphs (batch 1, fixed shapes; names are the files `<name>.onnx`):

    t5                input_ids [1, 128] int64, attention_mask [1, 128] int64 -> embeds [1, 128, D_t5]
    clip_<i>          input_ids [1, 77] int64 -> pooled [1, P_i]
    context_adapter   x [1, 128, D_t5] -> text [1, 128, D]
    mmdit_context     (Pyramid-Flow layout only: the MMDiT's context embedder) [1, 128, D_t5] -> [1, 128, D]
    mmdit_stage<s>    see mmdit_stage.py: current latent, padded history per level and host inputs -> [1, C, 1, H_s, W_s]
    vae_encoder       video [1, 3, 1, H, W] -> mean, std [1, C, 1, h, w]
    decoder_first     latent 0 [1, C, 1, h, w] -> frames [1, 3, 1, H, W], state_*
    decoder_step      latent [1, C, 1, h, w], state_* -> frames [1, 3, 8, H, W], state_*
                      (state: causal-conv carried frames, or the TAEHV-style decoder's MemBlock memory)
    sr                x [1, 3, H, W] in [0, 1] -> [1, 3, 2H, 2W]

Real inputs are recorded from one short PyTorch generation (1-1-1 steps, no guidance) at the export
geometry; each graph runs in ONNX Runtime (CPU) on them and is compared with the PyTorch module it
replaces (for the stage graphs: the unpadded MMDiT call). `export.json` holds, per graph, its inputs
and outputs, padding rule, source component hash, graph facts and validation result, plus what the
host needs to drive the graphs (geometry, latent normalisation, default settings, MMDiT layout).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from neodragon_cli.errors import NeodragonError, UsageError
from neodragon_cli.pipelines.deploy import onnx_tools
from neodragon_cli.pipelines.deploy.graphs import (
    T5_RESIDUAL_SCALE,
    FirstFrameEncoder,
    StreamingDecoderStep,
    StreamingTAEHVStep,
    max_t5_residual,
    rescale_t5_residuals,
    taehv_stream_reference,
)
from neodragon_cli.pipelines.deploy.mmdit_stage import DEFAULT_MASK_FILL, StageGraph, StageHost, StageLayout, dense_copy
from neodragon_cli.pipelines.models.causal_vae import AsymmetricCausalVideoVAE, CausalVideoVAE

MANIFEST = "export.json"
MANIFEST_FORMAT = "neodragon-export/1"
POSITIONS_FILE = "mmdit_positions.safetensors"
COMPONENTS = ("text", "context_adapter", "mmdit", "vae_encoder", "decoder", "sr")
DEFAULT_MIN_SQNR_DB = 60.0
CALIBRATION_PROMPT = "a red circle moving left"


class ValidationError(NeodragonError):
    """An exported graph disagrees with PyTorch beyond the tolerance: exit 1."""


@dataclass(frozen=True)
class Geometry:
    height: int
    width: int
    frames: int


@dataclass
class GraphSpec:
    """One graph to export: `module(*inputs)` traced with the first case; every case (inputs by
    name) validated against `references` (the PyTorch outputs it must reproduce)."""

    name: str
    component: str  # pipeline role whose weights it holds
    module: nn.Module
    output_names: list[str]
    cases: list[dict[str, torch.Tensor]]
    references: list[list[torch.Tensor]]
    padding: str = "none (fixed shapes)"
    notes: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------ checks


def check_geometry(pipe, geometry: Geometry) -> None:
    """UsageError unless H and W divide by VAE x pyramid x patch factors and frames by the VAE's."""
    factor = pipe.vae.spatial_compression * 4 * pipe.mmdit.patch_size
    step = pipe.vae.temporal_compression
    if geometry.height % factor or geometry.width % factor or geometry.height <= 0 or geometry.width <= 0:
        raise UsageError(f"height and width must be positive multiples of {factor} (VAE x pyramid x patch), "
                         f"got {geometry.height}x{geometry.width}")  # fmt: skip
    if geometry.frames < 1 or (geometry.frames - 1) % step:
        raise UsageError(f"frames must be 1 + {step}k, got {geometry.frames}")


def select_components(pipe, requested: str) -> list[str]:
    """The components to export: "all" (those the pipeline has) or a comma list (each must exist)."""
    present = {
        "text": pipe.text_encoder is not None,
        "context_adapter": pipe.context_adapter is not None,
        "mmdit": True,
        "vae_encoder": True,
        "decoder": True,
        "sr": pipe.sr is not None,
    }
    if requested.strip() == "all":
        return [c for c in COMPONENTS if present[c]]
    names = [c.strip() for c in requested.split(",") if c.strip()]
    unknown = [c for c in names if c not in COMPONENTS]
    if unknown or not names:
        raise UsageError(f"unknown component '{unknown[0] if unknown else requested}'", hint=f"use all or a comma list of {', '.join(COMPONENTS)}")
    missing = [c for c in names if not present[c]]
    if missing:
        raise UsageError(f"this model has no {missing[0]} component", hint=f"it has: {', '.join(c for c in COMPONENTS if present[c])}")
    decoder = pipe.decoder or pipe.vae
    if "decoder" in names and not isinstance(decoder, (CausalVideoVAE, AsymmetricCausalVideoVAE)):
        raise UsageError(f"streaming decoder export supports the causal VAEs (vae/pyramid-flow, vae/neodragon-asymmetric), "
                         f"not {type(decoder).__name__}", hint="leave decoder out of --components")  # fmt: skip
    return names


# ------------------------------------------------------------------------------------ recording


@dataclass
class Recording:
    """Real inputs (and PyTorch outputs) of one short generation at the export geometry."""

    t5: list[tuple] = field(default_factory=list)  # (input_ids, attention_mask)
    clip: list[list[torch.Tensor]] = field(default_factory=list)  # per encoder: input_ids
    adapter: list[torch.Tensor] = field(default_factory=list)
    mmdit: list[tuple[dict, torch.Tensor]] = field(default_factory=list)  # (forward kwargs, output)
    latents: torch.Tensor | None = None  # normalised [1, C, T, h, w]
    frames: torch.Tensor | None = None  # uint8 [T, H, W, 3]


def record(pipe, geometry: Geometry, prompt: str = CALIBRATION_PROMPT, seed: int = 0) -> Recording:
    """Run the PyTorch pipeline once (monolithic, 1-1-1 steps, no guidance, no SR) with hooks."""
    from neodragon_cli.pipelines.flow.settings import GenerationSettings

    rec = Recording(clip=[[] for _ in getattr(pipe.text_encoder, "clip_encoders", [])])
    hooks = [pipe.mmdit.register_forward_hook(lambda _m, _a, kwargs, out: rec.mmdit.append((dict(kwargs), out[0])), with_kwargs=True)]
    if pipe.text_encoder is not None:
        hooks.append(pipe.text_encoder.t5_encoder.register_forward_pre_hook(
            lambda _m, args, kwargs: rec.t5.append((args[0], kwargs["attention_mask"])), with_kwargs=True))  # fmt: skip
        for i, encoder in enumerate(pipe.text_encoder.clip_encoders):
            hooks.append(encoder.register_forward_pre_hook(lambda _m, args, i=i: rec.clip[i].append(args[0])))
    if pipe.context_adapter is not None:
        hooks.append(pipe.context_adapter.register_forward_pre_hook(lambda _m, args: rec.adapter.append(args[0])))
    settings = pipe.settings(GenerationSettings(
        mode="monolithic", first_steps=[1, 1, 1], video_steps=[1, 1, 1], guidance=0.0, video_guidance=0.0,
        frames=geometry.frames, height=geometry.height, width=geometry.width, sr=False,
    ))  # fmt: skip
    try:
        result = pipe.generate(prompt, settings, seed=seed)
    finally:
        for hook in hooks:
            hook.remove()
    rec.latents, rec.frames = result.latents, torch.from_numpy(result.frames)
    return rec


# ------------------------------------------------------------------------------------ graph plans


def _text_graphs(pipe, rec: Recording) -> list[GraphSpec]:
    bundle = pipe.text_encoder
    ids, mask = rec.t5[0]
    scaled = rescale_t5_residuals(bundle.t5_encoder.float().eval())
    with torch.no_grad():
        reference = bundle.t5_encoder(ids, attention_mask=mask)
    notes = {
        "residual_scale": T5_RESIDUAL_SCALE,
        "max_residual_before": max_t5_residual(bundle.t5_encoder, ids, mask),
        "max_residual_after": max_t5_residual(scaled, ids, mask),
        "architecture": type(bundle.t5_encoder).__name__,
    }
    specs = [GraphSpec("t5", "text_encoder", scaled, ["embeds"], [{"input_ids": ids, "attention_mask": mask}], [[reference]],
                       notes=notes)]  # fmt: skip
    for i, encoder in enumerate(bundle.clip_encoders):
        specs.append(module_graph(f"clip_{i}", "text_encoder", encoder, {"input_ids": rec.clip[i][0]}, ["pooled"]))
    return specs


def module_graph(name: str, component: str, module: nn.Module, inputs: dict[str, torch.Tensor], output_names: list[str]) -> GraphSpec:
    """The graph of `module(*inputs.values())` (batch 1), validated against the module's own PyTorch
    output on `inputs` (ContextAdapter x [1, L, D_t5] -> text; QuickSRNet x [1, 3, H, W] -> upscaled; ...)."""
    module = module.float().eval()
    with torch.no_grad():
        outputs = module(*inputs.values())
    references = list(outputs) if isinstance(outputs, tuple) else [outputs]
    return GraphSpec(name, component, module, output_names, [inputs], [references])


def _adapter_graph(pipe, rec: Recording) -> GraphSpec:
    return module_graph("context_adapter", "context_adapter", pipe.context_adapter, {"x": rec.adapter[0]}, ["text"])


def mmdit_graphs(model, geometry_latent: tuple[int, int], num_latents: int, calls: list[tuple[dict, torch.Tensor]],
                 fill: float = DEFAULT_MASK_FILL, num_stages: int = 3) -> list[GraphSpec]:  # fmt: skip
    """The stage graphs (and the context-embedder graph for the Pyramid-Flow layout) of `model` for
    videos of up to `num_latents` latent frames of full-resolution `geometry_latent`, validated on
    `calls`: recorded batch-1 `forward` kwargs of one column and their unpadded outputs."""
    host = StageHost.from_model(model)
    dense = dense_copy(model)
    text_length = calls[0][0]["encoder_hidden_states"].shape[1]
    specs, by_stage = [], {}
    for kwargs, output in calls:
        by_stage.setdefault(tuple(kwargs["sample"][0][-1].shape[-2:]), []).append((kwargs, output))
    if model.has_context_embedder:
        text = calls[0][0]["encoder_hidden_states"].float()
        with torch.no_grad():
            embedded = model.context_embedder(text)
        specs.append(GraphSpec("mmdit_context", "mmdit", model.context_embedder, ["text"], [{"text_embeds": text}], [[embedded]]))
    for stage in range(num_stages):
        layout = StageLayout.for_video(stage, num_stages, geometry_latent, num_latents, text_length, model.patch_size,
                                       interval=model.interval_conditioning)
        cases, references = [], []
        for kwargs, output in by_stage.get(layout.level_sizes[-1], []):
            with torch.no_grad():
                text = kwargs["encoder_hidden_states"].float()
                text = model.context_embedder(text) if model.has_context_embedder else text
                mask = kwargs["encoder_attention_mask"]
                valid = torch.ones(text.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
                t = torch.as_tensor(kwargs["timestep_ratio"]).reshape(1)
                end = kwargs.get("timestep_end")
                end = None if end is None else torch.as_tensor(end).reshape(1)
                cases.append(host.inputs(layout, kwargs["sample"][0], text, valid, t, kwargs["pooled_projections"], fill, end))
            references.append([output.float()])
        if not cases:
            raise UsageError(f"no recorded call of stage {stage} at latent size {layout.level_sizes[-1]}")
        specs.append(GraphSpec(f"mmdit_stage{stage}", "mmdit", StageGraph(dense, layout), ["prediction"], cases[::-1],
                               references[::-1], padding=layout.describe(),
                               notes={"stage": stage, "layout": dataclasses.asdict(layout)}))  # fmt: skip
    return specs


def _vae_encoder_graph(pipe, rec: Recording) -> GraphSpec:
    frame = rec.frames[0].float().div(255).mul(2).sub(1).permute(2, 0, 1)[None, :, None]
    return module_graph("vae_encoder", "vae", FirstFrameEncoder(pipe.vae), {"video": frame}, ["mean", "std"])


def decoder_graphs(vae, raw: list[torch.Tensor], role: str = "vae") -> list[GraphSpec]:
    """decoder_first / decoder_step of `vae` (CausalVideoVAE or AsymmetricCausalVideoVAE), validated on
    the consecutive raw latent frames `raw` ([1, C, 1, h, w] each, from the video start) against the
    PyTorch streaming decode (causal VAE: the cache-dict decode; asymmetric: its `FrameStream`)."""
    vae = vae.float().eval()
    if isinstance(vae, AsymmetricCausalVideoVAE):
        first, step = StreamingTAEHVStep(vae, first=True), StreamingTAEHVStep(vae, first=False)
        outputs = taehv_stream_reference(vae, raw)
        rule = "streaming: one latent frame per call; each MemBlock's previous-frame input is a state input/output"
    else:
        first, step = StreamingDecoderStep(vae, first=True), StreamingDecoderStep(vae, first=False)
        with torch.no_grad():
            outputs = [first(raw[0])]
            for latent in raw[1:]:
                outputs.append(step(latent, *outputs[-1][1:]))
        rule = "streaming: one latent frame per call; the causal convs' carried frames are state inputs/outputs"
    states = [f"state_{i}" for i in range(len(outputs[0]) - 1)]
    names = ["frames"] + [f"next_{s}" for s in states]
    specs = [GraphSpec("decoder_first", role, first, names, [{"latent": raw[0]}], [list(outputs[0])], padding=rule)]
    if len(raw) > 1:
        cases = [{"latent": latent, **dict(zip(states, previous[1:]))} for latent, previous in zip(raw[1:], outputs)]
        specs.append(GraphSpec("decoder_step", role, step, names, cases, [list(o) for o in outputs[1:]], padding=rule))
    return specs


def _decoder_graphs(pipe, rec: Recording) -> list[GraphSpec]:
    from neodragon_cli.pipelines.models.latents import denormalize

    raw = [denormalize(rec.latents[:, :, k : k + 1], pipe.latent_norm, start_frame=k).float() for k in range(rec.latents.shape[2])]
    return decoder_graphs(pipe.decoder or pipe.vae, raw, "decoder" if pipe.decoder is not None else "vae")


def _sr_graph(pipe, rec: Recording) -> GraphSpec:
    x = rec.frames[:1].float().div(255).permute(0, 3, 1, 2).contiguous()
    return module_graph("sr", "sr", pipe.sr, {"x": x}, ["upscaled"])


def plan_graphs(pipe, geometry: Geometry, components: list[str], fill: float = DEFAULT_MASK_FILL) -> tuple[list[GraphSpec], Recording]:
    rec = record(pipe, geometry)
    scale = pipe.vae.spatial_compression
    specs: list[GraphSpec] = []
    if "text" in components:
        specs += _text_graphs(pipe, rec)
    if "context_adapter" in components:
        specs.append(_adapter_graph(pipe, rec))
    if "mmdit" in components:
        latent = (geometry.height // scale, geometry.width // scale)
        specs += mmdit_graphs(pipe.mmdit.float(), latent, pipe.vae.latent_frames(geometry.frames), rec.mmdit, fill)
    if "vae_encoder" in components:
        specs.append(_vae_encoder_graph(pipe, rec))
    if "decoder" in components:
        specs += _decoder_graphs(pipe, rec)
    if "sr" in components:
        specs.append(_sr_graph(pipe, rec))
    return specs, rec


# ------------------------------------------------------------------------------------ writing


def export_graph(spec: GraphSpec, folder: Path, *, opset: int, fill: float) -> dict:
    """Trace, fold the shape arithmetic, rewrite mask constants, save `<name>.onnx` into `folder`; the
    manifest entry (no validation)."""
    path = folder / f"{spec.name}.onnx"
    with tempfile.TemporaryDirectory() as scratch:
        traced = Path(scratch) / path.name
        onnx_tools.export_module(spec.module.eval(), spec.cases[0], spec.output_names, traced, opset)
        model = onnx_tools.load(traced)
    simplified = onnx_tools.fold_constants(model)
    changes = onnx_tools.rewrite_mask_constants(model, fill)
    onnx_tools.save(model, path)
    files = sorted(p.name for p in folder.glob(f"{spec.name}.onnx*"))
    return {
        "file": path.name,
        "files": files,
        "bytes": sum((folder / f).stat().st_size for f in files),
        "component": spec.component,
        "inputs": onnx_tools.value_specs(model.graph.input),
        "outputs": onnx_tools.value_specs(model.graph.output),
        "padding": spec.padding,
        "mask_constants_rewritten": changes,
        "simplified": simplified,
        "graph": onnx_tools.graph_facts(model),
        **({"notes": spec.notes} if spec.notes else {}),
    }


def validate_graph(spec: GraphSpec, path: Path, min_sqnr_db: float) -> dict:
    """Every case through ONNX Runtime vs the PyTorch references: worst SQNR and max |diff| per output."""
    sess = onnx_tools.session(path)
    worst = {name: {"sqnr_db": onnx_tools.SQNR_CAP_DB, "max_abs_diff": 0.0} for name in spec.output_names}
    for case, references in zip(spec.cases, spec.references):
        outputs = onnx_tools.run(sess, case)
        for name, reference, output in zip(spec.output_names, references, outputs):
            entry = worst[name]
            entry["sqnr_db"] = min(entry["sqnr_db"], onnx_tools.sqnr_db(reference, output))
            entry["max_abs_diff"] = max(entry["max_abs_diff"], onnx_tools.max_abs_diff(reference, output))
    passed = all(e["sqnr_db"] >= min_sqnr_db for e in worst.values())
    return {"runtime": "onnxruntime CPUExecutionProvider", "cases": len(spec.cases), "min_sqnr_db": min_sqnr_db,
            "outputs": worst, "passed": passed}  # fmt: skip


def write_graphs(specs: list[GraphSpec], folder: Path, *, opset: int = 17, fill: float = DEFAULT_MASK_FILL,
                 min_sqnr_db: float = DEFAULT_MIN_SQNR_DB, progress=None) -> dict[str, dict]:  # fmt: skip
    """Export and validate every graph into `folder`; {name: manifest entry}. Raises ValidationError
    (after all graphs ran) naming the first graph below `min_sqnr_db`."""
    entries = {}
    for spec in specs:
        if progress is not None:
            progress(spec.name)
        entry = export_graph(spec, folder, opset=opset, fill=fill)
        entry["validation"] = validate_graph(spec, folder / entry["file"], min_sqnr_db)
        entries[spec.name] = entry
    failed = [(n, e) for n, e in entries.items() if not e["validation"]["passed"]]
    if failed:
        name, entry = failed[0]
        output, result = min(entry["validation"]["outputs"].items(), key=lambda kv: kv[1]["sqnr_db"])
        raise ValidationError(f"graph {name}: output {output} is {result['sqnr_db']:.1f} dB from PyTorch "
                              f"(tolerance {min_sqnr_db:.0f} dB; {len(failed)} graph(s) failed)",
                              hint="nothing was written; see docs/export.md")  # fmt: skip
    return entries


def host_manifest(pipe, geometry: Geometry, fill: float, folder: Path) -> dict:
    """What the host needs besides the graphs; writes the position table and the tokenizers into `folder`."""
    from safetensors.torch import save_file

    host = StageHost.from_model(pipe.mmdit)
    save_file({"pos_table": host.pos_table.contiguous()}, str(folder / POSITIONS_FILE))
    bundle_path = pipe.component_paths.get("text_encoder")
    tokenizers = []
    if bundle_path is not None:
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            if (bundle_path / name).is_dir():
                shutil.copytree(bundle_path / name, folder / name)
                tokenizers.append(name)
    bundle = pipe.text_encoder
    return {
        "geometry": dataclasses.asdict(geometry),
        "latent_frames": pipe.vae.latent_frames(geometry.frames),
        "spatial_compression": pipe.vae.spatial_compression,
        "temporal_compression": pipe.vae.temporal_compression,
        "latent_norm": dataclasses.asdict(pipe.latent_norm),
        "defaults": {k: v for k, v in dataclasses.asdict(pipe.defaults).items() if v is not None},
        "mask_fill": fill,
        "tokenizers": tokenizers,
        "text": None if bundle is None else {"max_length": bundle.max_length},
        "mmdit": {**host.meta(), "positions": POSITIONS_FILE, "prediction": pipe.mmdit.config["prediction"],
                  "out_channels": pipe.mmdit.out_channels, "has_context_embedder": pipe.mmdit.has_context_embedder},  # fmt: skip
    }


def export_pipeline(model_dir: Path, out: Path, *, components: str = "all", geometry: Geometry | None = None, opset: int = 17,
                    fill: float = DEFAULT_MASK_FILL, min_sqnr_db: float = DEFAULT_MIN_SQNR_DB, overwrite: bool = False,
                    progress=None) -> dict:  # fmt: skip
    """Export the pipeline folder `model_dir` into the artifact `out` (see the module docstring);
    `geometry` defaults to the pipeline's default size and frames. Returns the manifest. Bad input:
    UsageError / ArtifactError before any work; a failed validation: ValidationError, nothing written."""
    from neodragon_cli.artifacts import ArtifactWriter, folder_hash
    from neodragon_cli.atomic import write_json
    from neodragon_cli.pipelines.flow.pipeline import VideoPipeline

    writer = ArtifactWriter(out, command="export", parent=model_dir, overwrite=overwrite)
    pipe = VideoPipeline.from_pretrained(model_dir)
    defaults = pipe.settings()
    geometry = geometry or Geometry(defaults.height, defaults.width, defaults.frames)
    check_geometry(pipe, geometry)
    names = select_components(pipe, components)
    specs, _ = plan_graphs(pipe, geometry, names, fill)
    hashes = {role: folder_hash(path) for role, path in pipe.component_paths.items() if path.is_dir()}
    with writer as art:
        graphs = write_graphs(specs, art.path, opset=opset, fill=fill, min_sqnr_db=min_sqnr_db, progress=progress)
        for entry in graphs.values():
            entry["source_hash"] = hashes.get(entry["component"])
        manifest = {"format": MANIFEST_FORMAT, "opset": opset, "components": names, "graphs": graphs,
                    **host_manifest(pipe, geometry, fill, art.path)}  # fmt: skip
        write_json(art.path / MANIFEST, manifest)
        worst = min(o["sqnr_db"] for e in graphs.values() for o in e["validation"]["outputs"].values())
        art.record("export", graphs=sorted(graphs), geometry=dataclasses.asdict(geometry), opset=opset, worst_sqnr_db=worst)
    return manifest
