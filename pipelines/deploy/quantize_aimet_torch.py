"""`quantize --backend aimet-torch`: AIMET QuantSim on the PyTorch modules the graphs were exported from.

    modules = rebuild_modules(export, manifest, ["vae_encoder", "decoder_first"])
    model, encodings = torch_quantize(modules["vae_encoder"], entry, feeds, "w8a16", adaround_iterations=0)

The plan, calibration recordings, SQNR table, QNN HTP check and artifact are `quantize.py`'s; only
"graph + calibration feeds -> QDQ ONNX + encodings" differs from the aimet-onnx backend:

1. The module of each graph is built again as `export` built it: the export's source model (the
   parent its `export` operation recorded, checked by content hash) through `plan_graphs` at the
   export's geometry, components and mask fill; each module's outputs are checked against the
   exported float graph on the export's own cases (its validation tolerance).
2. `aimet_torch.model_preparer.prepare_model` traces it with torch.fx so every functional op
   (add, mul, silu, group norm, matmul, softmax, ...) becomes a module with its own quantizers, as
   every node of the ONNX graph gets them in aimet-onnx. aimet-torch has no quantized
   scaled-dot-product attention, so attention is traced as its math (q k^T scale, softmax, @ v).
3. QuantSim with AIMET's HTP v79 per-channel config (int8 weights per output channel; 16- or 8-bit
   activations; min-max), AdaRound first where planned (`Adaround.apply_adaround`, its weight
   encodings frozen into the QuantSim), `compute_encodings` over the recorded calibration feeds.
4. `aimet_torch.onnx.export`: one ONNX graph with QuantizeLinear / DequantizeLinear (opset 21, for
   16-bit), under the export's input and output names; the shape arithmetic torch.fx leaves is
   folded as `export` folds it, the Q/DQ nodes kept. Biases stay float, as in aimet-onnx's QDQ
   graphs (the QNN EP quantizes them): with aimet-torch's int32 bias export the HTP simulator's
   per-channel Conv3d disagrees with the CPU EP (-15 dB where the float-bias graph gives 56 dB).
   Encodings are read off that graph (`qdq_encodings`), so they name the tensors of the file shipped.

Graphs whose PyTorch module computes a mask fill (-inf, finfo.min) at run time (the text encoders:
`export` rewrote those constants in the ONNX graph, `mask_constants_rewritten`) cannot be calibrated
on the module: a quantizer would see -3.4e38. They stay fp16 or go through `--backend aimet`.
"""

from __future__ import annotations

import importlib
import math
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from neodragon_cli.errors import NeodragonError, UsageError
from neodragon_cli.pipelines.deploy import onnx_tools
from neodragon_cli.pipelines.deploy.quantize import AIMET_CONFIG, SCHEMES, _quiet_aimet, qdq_encodings

QDQ_OPSET = 21  # 16-bit QuantizeLinear / DequantizeLinear
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
AIMET_TORCH_LOGGERS = ("ModelPreparer", "AdaRound")


class GraphTraceError(NeodragonError):
    """torch.fx cannot trace a graph's module for aimet-torch: exit 1, naming the graph."""


def _aimet_torch(module: str):
    """`aimet_torch.<module>`, imported by name: the optional `aimet-torch` extra is not a declared
    dependency (as `check_aimet_torch`); only called after that check passed."""
    return importlib.import_module(f"aimet_torch.{module}")


# ------------------------------------------------------------------------------------ the modules


def graph_component(graph: str) -> str:
    """The `export --components` entry that makes graph `graph`."""
    if graph == "t5" or graph.startswith("clip_"):
        return "text"
    if graph.startswith("mmdit_"):
        return "mmdit"
    if graph.startswith("decoder_"):
        return "decoder"
    return graph  # context_adapter, vae_encoder, sr


def export_source(export: Path) -> Path:
    """The model folder `export` was made from, as its `export` operation recorded it; UsageError when
    it is not recorded, not there, or its content changed since (hash)."""
    from neodragon_cli.artifacts import folder_hash, read_state
    from neodragon_cli.pipelines.flow.pipeline import PIPELINE_FILE

    operations = read_state(export).get("operations", [])
    parent = operations[-1].get("parent") if operations and operations[-1].get("operation") == "export" else None
    hint = "--backend aimet-torch rebuilds each graph's PyTorch module from the model the export was made from; use --backend aimet"
    if not parent:
        raise UsageError(f"{export} records no source model (its state.json has no export operation with a parent)", hint=hint)
    source = Path(parent["path"])
    if not (source / PIPELINE_FILE).is_file():
        raise UsageError(f"the export's source model {source} is not there (no {PIPELINE_FILE})",
                         hint="run quantize where the export was made (its path is as export recorded it), or use --backend aimet")  # fmt: skip
    if folder_hash(source) != parent["hash"]:
        raise UsageError(f"the export's source model {source} changed since the export (content hash differs)",
                         hint="export it again from this model, or use --backend aimet")  # fmt: skip
    return source


def check_mask_constants(manifest: dict, names: list[str]) -> None:
    """UsageError for a graph to quantize whose module computes a mask fill the export rewrote."""
    for name in names:
        rewritten = manifest["graphs"][name].get("mask_constants_rewritten") or []
        if rewritten:
            raise UsageError(f"--backend aimet-torch cannot quantize {name}: its PyTorch module computes mask fills "
                             f"(down to {min(c['was'] for c in rewritten):.3g}) that export rewrote only in the ONNX graph",
                             hint=f"keep it fp16 (--per-module fp16={name}) or use --backend aimet")  # fmt: skip


class _Positional(nn.Module):
    """`module(*inputs)` with a flat positional signature (torch.fx makes one placeholder per input,
    where a `*state` argument would be a single proxy)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *inputs):
        return self.module(*inputs)


def _attention_math(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention as the ops ONNX export writes for it, so torch.fx records a
    MatMul, Mul, Softmax and MatMul (each quantized) instead of one opaque call."""
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        raise ValueError("scaled_dot_product_attention with a mask, dropout, is_causal or GQA is not traced as its math")
    factor = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return (q @ k.transpose(-2, -1) * factor).softmax(dim=-1) @ v


@contextmanager
def _traced_attention():
    from unittest import mock

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _attention_math):
        yield


def prepare(name: str, module: nn.Module, inputs: int) -> torch.fx.GraphModule:
    """`module` (taking `inputs` tensors) traced for AIMET by `prepare_model`; GraphTraceError naming the graph."""
    prepare_model = _aimet_torch("model_preparer").prepare_model
    with _quiet_aimet(*AIMET_TORCH_LOGGERS), _traced_attention(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return prepare_model(_Positional(module.float().eval()), concrete_args=tuple(torch.fx.PH for _ in range(inputs)))
        except Exception as exc:  # torch.fx's TraceError (data-dependent control flow), or an op the preparer cannot map
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise GraphTraceError(f"aimet-torch: torch.fx cannot trace graph {name} ({type(exc).__name__}: {first})",
                                  hint=f"quantize it with --backend aimet, or keep it fp16 (--per-module fp16={name})") from None  # fmt: skip


def rebuild_modules(export: Path, manifest: dict, names: list[str], threads: int = 1) -> dict[str, torch.fx.GraphModule]:
    """{graph: its PyTorch module prepared for AIMET} for graphs `names` of `export`, rebuilt from the
    export's source model at the export's geometry and checked against the exported float graphs.
    UsageError before any work when that cannot be done (see `export_source`, `check_mask_constants`)."""
    from neodragon_cli.pipelines.deploy.export import Geometry, plan_graphs, validate_graph
    from neodragon_cli.pipelines.flow.pipeline import VideoPipeline

    if not names:
        return {}
    check_mask_constants(manifest, names)
    source = export_source(export)
    components = [c for c in manifest["components"] if c in {graph_component(n) for n in names}]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pipe = VideoPipeline.from_pretrained(source)
        specs, _ = plan_graphs(pipe, Geometry(**manifest["geometry"]), components, manifest["mask_fill"])
    finally:
        torch.set_num_threads(previous)
    specs = {s.name: s for s in specs}
    modules = {}
    for name in names:
        entry = manifest["graphs"][name]
        if name not in specs:
            raise UsageError(f"the export's source model {source} does not make graph {name} at the export's geometry",
                             hint="export it again, or use --backend aimet")  # fmt: skip
        tolerance = entry.get("validation", {}).get("min_sqnr_db", 60.0)
        check = validate_graph(specs[name], export / entry["file"], tolerance)
        if not check["passed"]:
            worst = min(o["sqnr_db"] for o in check["outputs"].values())
            raise UsageError(f"the PyTorch module rebuilt for {name} differs from the exported graph ({worst:.1f} dB, "
                             f"tolerance {tolerance:.0f} dB)", hint="export it again from this model, or use --backend aimet")  # fmt: skip
        modules[name] = prepare(name, specs[name].module, len(entry["inputs"]))
    return modules


# ------------------------------------------------------------------------------------ quantizing


@contextmanager
def _conv3d_as_conv():
    """aimet-torch's torch -> ONNX op-type table (`map_torch_types_to_onnx`, which its own model
    definitions extend) lacks Conv3d, so the HTP config's per-channel rule for `Conv` skips the VAE's
    3-D convs, which aimet-onnx quantizes per channel like every Conv node: map them while quantizing."""
    quantized = _aimet_torch("nn").QuantizationMixin.cls_to_qcls
    map_torch_types_to_onnx = _aimet_torch("onnx_utils").map_torch_types_to_onnx
    keys = [k for k in (nn.Conv3d, quantized.get(nn.Conv3d)) if k is not None and k not in map_torch_types_to_onnx]
    for key in keys:
        map_torch_types_to_onnx[key] = ["Conv"]
    try:
        yield
    finally:
        for key in keys:
            del map_torch_types_to_onnx[key]


def _batches(entry: dict, feeds: list[dict]) -> list[tuple[torch.Tensor, ...]]:
    names = [i["name"] for i in entry["inputs"]]
    return [tuple(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names) for feed in feeds]


def _run_all(model: nn.Module, batches) -> None:
    for batch in batches:
        model(*batch)


def _forward(model: nn.Module, batch) -> object:
    return model(*batch)


def _has_empty_parameter(module: nn.Module) -> bool:
    return any(p.numel() == 0 for p in module.parameters(recurse=False))


def _skip_empty_parameters(sim) -> None:
    """No quantizer on a zero-element parameter (a Linear from a zero-width input): AIMET cannot
    compute an encoding over nothing, and there is nothing to quantize."""
    for qmodule in sim.qmodules():
        for name, quantizer in qmodule.param_quantizers.items():
            if quantizer is not None and getattr(qmodule, name).numel() == 0:
                qmodule.param_quantizers[name] = None


def torch_quantize(module: torch.fx.GraphModule, entry: dict, calibration: list[dict], scheme: str, *,
                   adaround_iterations: int = 0, threads: int = 1):  # fmt: skip
    """aimet-torch QuantSim of `module` (from `rebuild_modules`; `entry`: its export.json graph entry)
    calibrated on `calibration` (recorded feeds by input name): (QDQ ModelProto, encodings read off it).
    With `adaround_iterations`, AdaRound optimises the weight rounding on `calibration` first."""
    import onnx

    adaround, export = _aimet_torch("adaround"), _aimet_torch("onnx").export
    min_max = _aimet_torch("common.defs").QuantScheme.min_max
    QuantizationSimModel = _aimet_torch("quantsim").QuantizationSimModel
    config = str(Path(_aimet_torch("common.quantsim_config").__file__).parent / AIMET_CONFIG)
    param_bits, activation_bits = (int(t.removeprefix("int")) for t in SCHEMES[scheme])
    batches = _batches(entry, calibration)
    example = batches[0]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _quiet_aimet(*AIMET_TORCH_LOGGERS), _conv3d_as_conv(), warnings.catch_warnings(), tempfile.TemporaryDirectory() as scratch:
            warnings.simplefilter("ignore")  # aimet's deprecations, the TorchScript exporter's tracer warnings
            if adaround_iterations:
                params = adaround.AdaroundParameters(batches, len(batches), default_num_iterations=adaround_iterations, forward_fn=_forward)
                module = adaround.Adaround.apply_adaround(
                    module, example, params, path=scratch, filename_prefix="adaround", default_param_bw=param_bits,
                    default_quant_scheme=min_max, default_config_file=config,
                    ignore_quant_ops_list=[m for m in module.modules() if _has_empty_parameter(m)] or None,
                )  # fmt: skip
            sim = QuantizationSimModel(module, example, quant_scheme=min_max, default_param_bw=param_bits,
                                       default_output_bw=activation_bits, config_file=config)  # fmt: skip
            _skip_empty_parameters(sim)
            if adaround_iterations:
                sim.set_and_freeze_param_encodings(str(Path(scratch) / "adaround.encodings"))
            sim.compute_encodings(_run_all, batches)
            path = Path(scratch) / "graph.onnx"
            export(sim.model, example, str(path), input_names=[i["name"] for i in entry["inputs"]],
                   output_names=[o["name"] for o in entry["outputs"]], opset_version=QDQ_OPSET, dynamo=False,
                   export_int32_bias=False)  # fmt: skip
            model = onnx.load(str(path))  # external data, if any, is read while the folder exists
    finally:
        torch.set_num_threads(previous)
    onnx_tools.fold_constants(model, keep=QDQ_OPS)
    return model, qdq_encodings(model)
