"""Run an exported pipeline (an `export` artifact) with every network call in ONNX Runtime.

`load_onnx_pipeline(folder)` returns a `VideoPipeline` whose components are stand-ins for the torch
modules, with the same call conventions, so the host side (tokenizers, the pyramid sampler and its
scheduler, latent normalisation, streaming decode) is the same Python code as for PyTorch:

* `OnnxT5`, `OnnxClip` inside a `TextEncoderBundle` (the export folder's tokenizers);
* `OnnxGraphModule` for the ContextAdapter and QuickSRNet;
* `OnnxMMDiT`: the reference `forward` convention; each call computes the stage graph's host inputs
  (`StageHost.inputs`) and runs the stage graph row by row (the graphs have batch 1);
* `OnnxVAE`: the first-frame encoder and `stream_decode` through the streaming decoder graphs,
  carrying the decoder state between calls.

The stand-ins hold one empty float32 parameter, so code that reads a module's dtype or device from
its parameters works unchanged. Sessions come from `session_factory(path)` (default: a CPU session),
so a caller can wrap them, e.g. to record every graph's inputs (`quantize` calibration).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from neodragon_cli.errors import CheckpointError, UsageError
from neodragon_cli.pipelines.deploy import onnx_tools
from neodragon_cli.pipelines.deploy.export import MANIFEST, MANIFEST_FORMAT
from neodragon_cli.pipelines.deploy.mmdit_stage import StageHost, StageLayout
from neodragon_cli.pipelines.flow.pipeline import VideoPipeline


class OnnxGraphModule(nn.Module):
    """One graph: `forward(*inputs)` (in the graph's input order) -> its first output."""

    def __init__(self, path: Path, session_factory: Callable = onnx_tools.session):
        super().__init__()
        self.session = session_factory(path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.dtype_marker = nn.Parameter(torch.zeros(0), requires_grad=False)

    def run(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        return onnx_tools.run(self.session, dict(zip(self.input_names, inputs)))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run(*inputs)[0]

    def output_shape(self) -> list[int]:
        return list(self.session.get_outputs()[0].shape)


class OnnxT5(OnnxGraphModule):
    """input_ids, attention_mask [1, L] int64 -> embeds [1, L, D] (as `T5TextEncoder`)."""

    @property
    def output_dim(self) -> int:
        return self.output_shape()[-1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([self.run(ids[None], mask[None])[0] for ids, mask in zip(input_ids, attention_mask)])


class OnnxClip(OnnxGraphModule):
    """input_ids [B, 77] -> pooled [B, P] (as `CLIPTextEncoder`), one row per call."""

    @property
    def output_dim(self) -> int:
        return self.output_shape()[-1]

    @property
    def max_positions(self) -> int:
        return self.session.get_inputs()[0].shape[1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.run(ids[None])[0] for ids in input_ids])


class OnnxRowwise(OnnxGraphModule):
    """A batch-1 graph applied to each row of a batch (ContextAdapter, QuickSRNet)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.run(row[None])[0] for row in x])


class OnnxMMDiT(nn.Module):
    """The stage graphs behind the MMDiT `forward` convention (one column; see `PyramidFlowMMDiT.forward`)."""

    def __init__(self, folder: Path, manifest: dict, session_factory: Callable = onnx_tools.session):
        super().__init__()
        meta = manifest["mmdit"]
        from safetensors.torch import load_file

        self.host = StageHost(load_file(str(folder / meta["positions"]))["pos_table"], meta["max_size"], meta["head_dim"],
                              meta["patch_size"], meta["interp_condition_pos"], meta["causal"])  # fmt: skip
        self.fill = manifest["mask_fill"]
        self.out_channels = meta["out_channels"]
        self.config = {"prediction": meta["prediction"]}
        self.context = OnnxRowwise(folder / "mmdit_context.onnx", session_factory) if meta["has_context_embedder"] else None
        self.stages = {}
        for name, entry in sorted(manifest["graphs"].items()):
            if name.startswith("mmdit_stage"):
                layout = StageLayout(**{k: _tuples(v) for k, v in entry["notes"]["layout"].items()})
                self.stages[layout.level_sizes[-1]] = (layout, session_factory(folder / entry["file"]))
        if any(layout.interval for layout, _ in self.stages.values()):  # the sampler passes the step's end
            self.config["interval_conditioning"] = True
        self.dtype_marker = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, sample, encoder_hidden_states, encoder_attention_mask, pooled_projections, timestep_ratio,
                timestep_end=None):
        (clips,) = sample
        size = tuple(clips[-1].shape[-2:])
        if size not in self.stages:
            raise UsageError(f"no exported stage graph for a {size} latent", hint=f"exported: {sorted(self.stages)}")
        layout, session = self.stages[size]
        text = encoder_hidden_states.float()
        text = self.context(text) if self.context is not None else text
        rows = text.shape[0]
        mask = torch.ones(text.shape[:2]) if encoder_attention_mask is None else encoder_attention_mask
        t = torch.as_tensor(timestep_ratio).float().expand(rows)
        end = None if timestep_end is None else torch.as_tensor(timestep_end).float().expand(rows)
        outputs = []
        for r in range(rows):
            inputs = self.host.inputs(layout, [c[r : r + 1] for c in clips], text[r : r + 1], mask[r : r + 1].bool(),
                                      t[r : r + 1], pooled_projections[r : r + 1], self.fill,
                                      None if end is None else end[r : r + 1])  # fmt: skip
            outputs.append(onnx_tools.run(session, inputs)[0])
        return [torch.cat(outputs)]


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class OnnxVAE:
    """First-frame encoder and streaming decoder graphs behind the VAE calls the pipeline makes."""

    def __init__(self, folder: Path, manifest: dict, session_factory: Callable = onnx_tools.session):
        self.spatial_compression = manifest["spatial_compression"]
        self.temporal_compression = manifest["temporal_compression"]
        graphs = manifest["graphs"]
        self.encoder = session_factory(folder / "vae_encoder.onnx") if "vae_encoder" in graphs else None
        self.first = session_factory(folder / "decoder_first.onnx") if "decoder_first" in graphs else None
        self.step = session_factory(folder / "decoder_step.onnx") if "decoder_step" in graphs else None
        if self.first is None:
            raise CheckpointError(f"{folder} has no decoder graphs", hint="export with --components including decoder")

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_compression + 1

    def encode(self, video: torch.Tensor) -> SimpleNamespace:
        """video [1, 3, 1, H, W] -> posterior with `mean` and `std` [1, C, 1, h, w]."""
        if self.encoder is None:
            raise UsageError("this export has no vae_encoder graph", hint="export with --components including vae_encoder")
        mean, std = onnx_tools.run(self.encoder, {"video": video.float()})
        return SimpleNamespace(mean=mean, std=std)

    def stream_decode(self, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Raw latent frames [1, C, 1, h, w] in (from frame 0) -> pixel frames out (1, then 8 per latent)."""
        state: list[torch.Tensor] | None = None
        for chunk in chunks:
            for k in range(chunk.shape[2]):
                latent = chunk[:, :, k : k + 1].float()
                if state is None:
                    frames, *state = onnx_tools.run(self.first, {"latent": latent})
                else:
                    names = [i.name for i in self.step.get_inputs()]
                    frames, *state = onnx_tools.run(self.step, dict(zip(names, [latent, *state])))
                yield frames


class OnnxVideoPipeline(VideoPipeline):
    """A `VideoPipeline` over exported graphs: the size must be the exported one and the video no
    longer than the frames the stage graphs were padded for."""

    max_batch = 1  # the graphs are exported for one video (two rows under CFG)

    def __init__(self, *, geometry: dict, **parts):
        super().__init__(**parts)
        self.geometry = geometry

    def check(self, settings, *, have_image: bool = False) -> None:
        g = self.geometry
        if (settings.height, settings.width) != (g["height"], g["width"]) or settings.frames > g["frames"]:
            raise UsageError(f"the exported graphs are for {g['height']}x{g['width']} and up to {g['frames']} frames, "
                             f"asked for {settings.height}x{settings.width}, {settings.frames} frames",
                             hint="export again with --height/--width/--frames")  # fmt: skip
        super().check(settings, have_image=have_image)


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} is not an export artifact (no {MANIFEST})", hint="make one with `neodragon export`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: unknown format {manifest.get('format')!r} (expected {MANIFEST_FORMAT})")
    return manifest


def load_onnx_pipeline(folder: str | Path, session_factory: Callable = onnx_tools.session) -> OnnxVideoPipeline:
    """The exported pipeline in `folder` with ONNX Runtime (CPU) sessions for every graph (or what
    `session_factory(path)` makes). A `quantize` artifact holds the same files with QDQ graphs."""
    from neodragon_cli.pipelines.flow.settings import GenerationSettings
    from neodragon_cli.pipelines.models.latents import LatentNorm
    from neodragon_cli.pipelines.models.text_encoders import TextEncoderBundle, load_tokenizer

    folder = Path(folder)
    manifest = read_manifest(folder)
    graphs = manifest["graphs"]
    missing = [g for g in ("t5", "mmdit_stage0", "decoder_first") if g not in graphs]
    if missing:
        raise CheckpointError(f"{folder}: generation needs the {missing[0]} graph", hint="export with --components all")
    clips = sorted(n for n in graphs if n.startswith("clip_"))
    clip_tokenizers = [t for t in ("tokenizer", "tokenizer_2") if t in manifest["tokenizers"]]
    text = TextEncoderBundle(
        load_tokenizer(folder / "tokenizer_3"), OnnxT5(folder / "t5.onnx", session_factory),
        [load_tokenizer(folder / t) for t in clip_tokenizers], [OnnxClip(folder / f"{n}.onnx", session_factory) for n in clips],
        manifest["text"]["max_length"],
    )  # fmt: skip
    optional = {role: OnnxRowwise(folder / f"{role}.onnx", session_factory) if role in graphs else None
                for role in ("context_adapter", "sr")}  # fmt: skip
    return OnnxVideoPipeline(
        mmdit=OnnxMMDiT(folder, manifest, session_factory), vae=OnnxVAE(folder, manifest, session_factory), text_encoder=text, **optional,
        latent_norm=LatentNorm(**manifest["latent_norm"]),
        defaults=GenerationSettings(**{**manifest["defaults"], **manifest["geometry"]}),
        component_paths={"export": folder}, name=folder.name, geometry=manifest["geometry"],
    )  # fmt: skip
